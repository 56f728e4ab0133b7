//! A network device as the kernel reports it, decoded once into plain fields.

use std::net::IpAddr;

use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use proto::MacAddr;

/// A network device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, when it has one.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// The loopback device.
    pub loopback: bool,
    /// Its alias (`ip link set ... alias`), when it has one.
    pub alias: Option<String>,
    /// The kind (`vxlan`, `bridge`, `veth`, ...); none for a plain device.
    pub kind: Option<String>,
    /// The bridge (or other controller) it is attached to.
    pub controller: Option<u32>,
    /// Its VXLAN settings, when it is a VXLAN device.
    pub vxlan: Option<VxlanSettings>,
}

/// The settings of a VXLAN device that the kernel cannot change in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanSettings {
    /// VXLAN network identifier.
    pub vni: Option<u32>,
    /// Local VTEP address.
    pub local: Option<IpAddr>,
    /// UDP destination port.
    pub port: Option<u16>,
    /// Whether the device learns FDB entries from traffic.
    pub learning: Option<bool>,
    /// Group-based policy extension.
    pub gbp: bool,
    /// The underlay device it is bound to.
    pub lower: Option<u32>,
}

impl VxlanSettings {
    fn from_info(data: &[InfoVxlan]) -> Self {
        let mut s = VxlanSettings::default();
        for attr in data {
            match attr {
                InfoVxlan::Id(v) => s.vni = Some(*v),
                InfoVxlan::Local(v) => s.local = Some(IpAddr::V4(*v)),
                InfoVxlan::Local6(v) => s.local = Some(IpAddr::V6(*v)),
                InfoVxlan::Port(v) => s.port = Some(*v),
                InfoVxlan::Learning(v) => s.learning = Some(*v),
                InfoVxlan::Gbp => s.gbp = true,
                InfoVxlan::Link(v) => s.lower = Some(*v),
                _ => {}
            }
        }
        s
    }
}

impl Link {
    /// Decodes a link message.
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            ..Link::default()
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::IfAlias(alias) => link.alias = Some(alias.clone()),
                LinkAttribute::Address(bytes) => link.mac = MacAddr::try_from(bytes.as_slice()).ok(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Controller(index) => link.controller = Some(*index),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(InfoKind::Vxlan) => link.kind = Some("vxlan".into()),
                            LinkInfo::Kind(other) => link.kind = Some(other.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(data)) => link.vxlan = Some(VxlanSettings::from_info(data)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}
