//! The VXLAN device: created when missing, repaired when it drifted, and
//! recreated only when a setting the kernel cannot change in place differs.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    RouteNetlinkMessage,
};
use proto::MacAddr;
use tracing::{info, warn};

use super::links::{self, address_message, Link};
use super::netlink::{Netlink, NetlinkError};

/// What the VXLAN device must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Device name, `overlay.1` by default.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Group-based policy extension.
    pub gbp: bool,
    /// Local VTEP address (the underlay address).
    pub local: Ipv4Addr,
    /// Underlay interface index.
    pub underlay_index: u32,
    /// Device MTU.
    pub mtu: u32,
    /// Stable VTEP MAC.
    pub mac: MacAddr,
    /// `<own subnet>.0/32`.
    pub address: Ipv4Net,
}

/// Why the device could not be made right.
#[derive(Debug, thiserror::Error)]
#[error("VXLAN device {device}: {step}: {source}")]
pub struct DeviceError {
    device: String,
    step: &'static str,
    #[source]
    source: NetlinkError,
}

fn at<'a>(device: &'a str, step: &'static str) -> impl FnOnce(NetlinkError) -> DeviceError + 'a {
    move |source| DeviceError { device: device.to_string(), step, source }
}

fn io_at<'a>(device: &'a str, step: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError + 'a {
    move |e| DeviceError {
        device: device.to_string(),
        step,
        source: NetlinkError::Refused { what: step.to_string(), source: e },
    }
}

/// Whether an existing device's immutable settings match the spec.
fn compatible(link: &Link, spec: &DeviceSpec) -> bool {
    let Some(data) = &link.vxlan else {
        return false;
    };
    let mut id = None;
    let mut local = None;
    let mut port = None;
    let mut learning = None;
    let mut gbp = false;
    let mut lower = None;
    for attr in data {
        match attr {
            InfoVxlan::Id(v) => id = Some(*v),
            InfoVxlan::Local(v) => local = Some(*v),
            InfoVxlan::Port(v) => port = Some(*v),
            InfoVxlan::Learning(v) => learning = Some(*v),
            InfoVxlan::Gbp => gbp = true,
            InfoVxlan::Link(v) => lower = Some(*v),
            _ => {}
        }
    }
    id == Some(spec.vni)
        && local == Some(spec.local)
        && port == Some(spec.port)
        && learning == Some(false)
        && gbp == spec.gbp
        && lower == Some(spec.underlay_index)
}

fn create_message(spec: &DeviceSpec) -> LinkMessage {
    let mut data = vec![
        InfoVxlan::Id(spec.vni),
        InfoVxlan::Local(spec.local),
        InfoVxlan::Link(spec.underlay_index),
        InfoVxlan::Port(spec.port),
        InfoVxlan::Learning(false),
    ];
    if spec.gbp {
        data.push(InfoVxlan::Gbp);
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(spec.name.clone()));
    msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
    msg.attributes.push(LinkAttribute::Address(spec.mac.octets().to_vec()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Vxlan), LinkInfo::Data(InfoData::Vxlan(data))]));
    msg
}

/// Makes the device match `spec` and returns its index and whether it was (re)created.
pub fn ensure(nl: &mut Netlink, spec: &DeviceSpec) -> Result<(u32, bool), DeviceError> {
    let name = spec.name.as_str();
    let existing = links::by_name(nl, name).map_err(at(name, "look up"))?;
    let mut created = false;
    let link = match existing {
        Some(link) if compatible(&link, spec) => link,
        other => {
            if let Some(old) = other {
                warn!(device = name, kind = ?old.kind, "device exists with other settings (VNI, port, local address or kind); recreating it");
                let mut del = LinkMessage::default();
                del.header.index = old.index;
                nl.request(RouteNetlinkMessage::DelLink(del), 0).map_err(io_at(name, "delete old device"))?;
            }
            nl.request(RouteNetlinkMessage::NewLink(create_message(spec)), NLM_F_CREATE | NLM_F_EXCL)
                .map_err(io_at(name, "create"))?;
            info!(device = name, vni = spec.vni, port = spec.port, local = %spec.local, mtu = spec.mtu, mac = %spec.mac, "created VXLAN device");
            created = true;
            links::by_name(nl, name).map_err(at(name, "look up"))?.ok_or_else(|| DeviceError {
                device: name.into(),
                step: "look up after create",
                source: NetlinkError::Decode("device vanished right after creation".into()),
            })?
        }
    };
    if link.mtu != spec.mtu || link.mac != Some(spec.mac) || !link.up {
        let mut set = LinkMessage::default();
        set.header.index = link.index;
        set.header.flags = LinkFlags::Up;
        set.header.change_mask = LinkFlags::Up;
        set.attributes.push(LinkAttribute::Mtu(spec.mtu));
        if link.mac != Some(spec.mac) {
            set.attributes.push(LinkAttribute::Address(spec.mac.octets().to_vec()));
        }
        nl.request(RouteNetlinkMessage::SetLink(set), 0).map_err(io_at(name, "set MTU, MAC and up"))?;
    }
    ensure_address(nl, link.index, spec.address).map_err(at(name, "address"))?;
    Ok((link.index, created))
}

/// Exactly one IPv4 address on the device: `want`.
fn ensure_address(nl: &mut Netlink, index: u32, want: Ipv4Net) -> Result<(), NetlinkError> {
    let addrs = links::ipv4_addresses(nl)?;
    let mut present = false;
    for a in addrs.iter().filter(|a| a.index == index) {
        if a.net == want {
            present = true;
        } else {
            nl.request(RouteNetlinkMessage::DelAddress(address_message(index, a.net)), 0)
                .map_err(|e| NetlinkError::Refused { what: format!("remove stale address {}", a.net), source: e })?;
        }
    }
    if !present {
        nl.request(RouteNetlinkMessage::NewAddress(address_message(index, want)), NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(|e| NetlinkError::Refused { what: format!("add address {want}"), source: e })?;
    }
    Ok(())
}

/// Removes the device named `name`, if present (for `overlayd cleanup`).
pub fn remove(nl: &mut Netlink, name: &str) -> Result<bool, DeviceError> {
    let Some(link) = links::by_name(nl, name).map_err(at(name, "look up"))? else {
        return Ok(false);
    };
    let mut del = LinkMessage::default();
    del.header.index = link.index;
    nl.request(RouteNetlinkMessage::DelLink(del), 0).map_err(io_at(name, "delete"))?;
    Ok(true)
}
