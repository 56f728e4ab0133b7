//! Neighbour, FDB and route entries on the VXLAN device: netlink messages to
//! set and remove them, and reading back what the kernel holds.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};
use proto::MacAddr;

use super::netlink::{Netlink, NetlinkError};
use crate::plan::{KernelState, Op, RouteVia};

/// The route protocol that marks our routes (`ip route` shows `proto 77`), so
/// reconciliation only ever touches routes this daemon made.
pub const ROUTE_PROTOCOL: u8 = 77;

fn neighbour(family: AddressFamily, ifindex: u32, flags: NeighbourFlags) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = flags;
    msg
}

fn arp_entry(ifindex: u32, ip: Ipv4Addr, mac: MacAddr) -> NeighbourMessage {
    let mut msg = neighbour(AddressFamily::Inet, ifindex, NeighbourFlags::empty());
    msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    msg
}

fn fdb_entry(ifindex: u32, mac: MacAddr, dst: Ipv4Addr) -> NeighbourMessage {
    // NTF_SELF: the entry belongs to the VXLAN device's own FDB, not a bridge's.
    let mut msg = neighbour(AddressFamily::Bridge, ifindex, NeighbourFlags::Own);
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    msg
}

fn route(vxlan_index: u32, subnet: Ipv4Net, via: RouteVia) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = subnet.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(subnet.network())));
    match via {
        RouteVia::Vxlan(gateway) => {
            msg.header.flags = RouteFlags::Onlink;
            msg.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
            msg.attributes.push(RouteAttribute::Oif(vxlan_index));
        }
        RouteVia::Direct(gateway) => {
            msg.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        }
    }
    msg
}

/// The netlink request for one operation, with its flags and a description for errors.
pub fn request(vxlan_index: u32, op: &Op) -> (RouteNetlinkMessage, u16) {
    const SET: u16 = NLM_F_CREATE | NLM_F_REPLACE;
    match *op {
        Op::SetNeighbour(ip, mac) => (RouteNetlinkMessage::NewNeighbour(arp_entry(vxlan_index, ip, mac)), SET),
        Op::DelNeighbour(ip, mac) => (RouteNetlinkMessage::DelNeighbour(arp_entry(vxlan_index, ip, mac)), 0),
        Op::SetFdb(mac, dst) => (RouteNetlinkMessage::NewNeighbour(fdb_entry(vxlan_index, mac, dst)), SET),
        Op::DelFdb(mac, dst) => (RouteNetlinkMessage::DelNeighbour(fdb_entry(vxlan_index, mac, dst)), 0),
        Op::SetRoute(subnet, via) => (RouteNetlinkMessage::NewRoute(route(vxlan_index, subnet, via)), SET),
        Op::DelRoute(subnet, via) => (RouteNetlinkMessage::DelRoute(route(vxlan_index, subnet, via)), 0),
    }
}

/// Reads the overlay entries the kernel holds for the device `vxlan_index`.
pub fn read(nl: &mut Netlink, vxlan_index: u32) -> Result<KernelState, NetlinkError> {
    let mut state = KernelState::default();
    for msg in nl.dump(RouteNetlinkMessage::GetNeighbour(neighbour(AddressFamily::Inet, 0, NeighbourFlags::empty())))? {
        let RouteNetlinkMessage::NewNeighbour(n) = msg else {
            continue;
        };
        if n.header.ifindex != vxlan_index || n.header.family != AddressFamily::Inet {
            continue;
        }
        if let (Some(ip), Some(mac)) = (neighbour_ip(&n), neighbour_mac(&n)) {
            // A learned (non-permanent) entry is treated as absent so it gets replaced.
            if n.header.state == NeighbourState::Permanent {
                state.neighbours.insert(ip, mac);
            } else {
                state.neighbours.entry(ip).or_insert(MacAddr([0; 6]));
            }
        }
    }
    for msg in
        nl.dump(RouteNetlinkMessage::GetNeighbour(neighbour(AddressFamily::Bridge, 0, NeighbourFlags::empty())))?
    {
        let RouteNetlinkMessage::NewNeighbour(n) = msg else {
            continue;
        };
        if n.header.ifindex != vxlan_index {
            continue;
        }
        if let (Some(ip), Some(mac)) = (neighbour_ip(&n), neighbour_mac(&n)) {
            // The all-zero MAC is a default (flood) destination, which we never program.
            if mac != MacAddr([0; 6]) {
                state.fdb.insert(mac, ip);
            }
        }
    }
    let mut get_routes = RouteMessage::default();
    get_routes.header.address_family = AddressFamily::Inet;
    for msg in nl.dump(RouteNetlinkMessage::GetRoute(get_routes))? {
        let RouteNetlinkMessage::NewRoute(r) = msg else {
            continue;
        };
        if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) || r.header.address_family != AddressFamily::Inet {
            continue;
        }
        if let Some((subnet, via)) = parse_route(&r, vxlan_index) {
            state.routes.insert(subnet, via);
        }
    }
    Ok(state)
}

fn neighbour_ip(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // In AF_BRIDGE (FDB) messages the kernel's NDA_DST comes back undecoded.
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
            <[u8; 4]>::try_from(bytes.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

fn neighbour_mac(n: &NeighbourMessage) -> Option<MacAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => MacAddr::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

fn parse_route(r: &RouteMessage, vxlan_index: u32) -> Option<(Ipv4Net, RouteVia)> {
    let table = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    });
    if table.unwrap_or(u32::from(r.header.table)) != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let subnet = Ipv4Net::new(dst?, r.header.destination_prefix_length).ok()?;
    let gateway = gateway?;
    let via = if oif == Some(vxlan_index) && r.header.flags.contains(RouteFlags::Onlink) {
        RouteVia::Vxlan(gateway)
    } else if oif == Some(vxlan_index) {
        // Ours, but not onlink: report it so the diff replaces it.
        RouteVia::Vxlan(Ipv4Addr::UNSPECIFIED)
    } else {
        RouteVia::Direct(gateway)
    };
    Some((subnet, via))
}
