//! Reading links and IPv4 addresses: the raw facts the VXLAN device and the
//! underlay lookup are decided from.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    AddressFamily, RouteNetlinkMessage,
};
use proto::MacAddr;

use super::netlink::{Netlink, NetlinkError};

/// A network device as read from the kernel.
#[derive(Debug, Clone, Default)]
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
    /// VXLAN settings, when it is a VXLAN device.
    pub vxlan: Option<Vec<InfoVxlan>>,
    /// Whether it is some kind of device other than VXLAN (bridge, veth, ...).
    pub kind: Option<String>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link =
            Link { index: msg.header.index, up: msg.header.flags.contains(LinkFlags::Up), ..Link::default() };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Address(bytes) => link.mac = MacAddr::try_from(bytes.as_slice()).ok(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(InfoKind::Vxlan) => link.kind = Some("vxlan".into()),
                            LinkInfo::Kind(other) => link.kind = Some(other.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(data)) => link.vxlan = Some(data.clone()),
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

/// All links of the namespace.
pub fn list(nl: &mut Netlink) -> Result<Vec<Link>, NetlinkError> {
    Ok(nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
            _ => None,
        })
        .collect())
}

/// The link called `name`, if any.
pub fn by_name(nl: &mut Netlink, name: &str) -> Result<Option<Link>, NetlinkError> {
    Ok(list(nl)?.into_iter().find(|l| l.name == name))
}

/// An IPv4 address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddress {
    /// The link's index.
    pub index: u32,
    /// The address with its prefix length.
    pub net: Ipv4Net,
}

/// Every IPv4 address of the namespace.
pub fn ipv4_addresses(nl: &mut Netlink) -> Result<Vec<LinkAddress>, NetlinkError> {
    let mut req = AddressMessage::default();
    req.header.family = AddressFamily::Inet;
    let mut out = Vec::new();
    for msg in nl.dump(RouteNetlinkMessage::GetAddress(req))? {
        let RouteNetlinkMessage::NewAddress(a) = msg else {
            continue;
        };
        if a.header.family != AddressFamily::Inet {
            continue;
        }
        let local = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            if let Ok(net) = Ipv4Net::new(ip, a.header.prefix_len) {
                out.push(LinkAddress { index: a.header.index, net });
            }
        }
    }
    Ok(out)
}

/// The message that adds (or, with `delete`, removes) `net` on link `index`.
pub fn address_message(index: u32, net: Ipv4Net) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = net.prefix_len();
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(IpAddr::V4(net.addr())));
    msg.attributes.push(AddressAttribute::Address(IpAddr::V4(net.addr())));
    msg
}

/// The first IPv4 address on `index`, preferring `preferred` when present.
pub fn primary_address(addrs: &[LinkAddress], index: u32, preferred: Option<Ipv4Addr>) -> Option<Ipv4Net> {
    let mut on_link = addrs.iter().filter(|a| a.index == index).map(|a| a.net);
    match preferred {
        Some(p) => {
            let all: Vec<_> = on_link.collect();
            all.iter().copied().find(|n| n.addr() == p).or_else(|| all.first().copied())
        }
        None => on_link.next(),
    }
}
