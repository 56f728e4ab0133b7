//! The entries a node programs in bulk: neighbours (ARP/NDP), FDB entries and
//! routes, as typed values that know their netlink message and can be read
//! back from one. This module and `handle` are the only places that build
//! netlink messages.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    },
    AddressFamily,
};
use proto::MacAddr;

/// The route protocol of routes the runtime's plugins make (`proto boot`).
pub const PROTOCOL_BOOT: u8 = 3;

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

/// A permanent neighbour entry: `ip lladdr mac dev ifindex nud permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Neighbour {
    /// The device.
    pub ifindex: u32,
    /// The neighbour's address.
    pub ip: IpAddr,
    /// Its link-layer address.
    pub mac: MacAddr,
}

impl Neighbour {
    /// The netlink message that adds, replaces or deletes this entry.
    pub fn message(&self) -> NeighbourMessage {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(self.ip);
        msg.header.ifindex = self.ifindex;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(self.ip)));
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(self.mac.octets().to_vec()));
        msg
    }

    /// Reads an entry of the ARP or NDP table; the flag says whether it is permanent.
    pub fn from_message(msg: &NeighbourMessage) -> Option<(Neighbour, bool)> {
        if !matches!(msg.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
            return None;
        }
        let ip = destination(msg)?;
        // An entry still resolving has no link-layer address yet.
        let mac = link_layer_address(msg).unwrap_or(MacAddr([0; 6]));
        let permanent = msg.header.state == NeighbourState::Permanent;
        Some((Neighbour { ifindex: msg.header.ifindex, ip, mac }, permanent))
    }
}

/// A permanent FDB entry of a VXLAN device: `mac dev ifindex dst ip self permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    /// The VXLAN device.
    pub ifindex: u32,
    /// The remote VTEP's MAC.
    pub mac: MacAddr,
    /// The remote VTEP's underlay address.
    pub dst: IpAddr,
}

impl FdbEntry {
    /// The netlink message that adds, replaces or deletes this entry.
    pub fn message(&self) -> NeighbourMessage {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = self.ifindex;
        msg.header.state = NeighbourState::Permanent;
        // NTF_SELF: the entry belongs to the VXLAN device's own FDB, not a bridge's.
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(self.mac.octets().to_vec()));
        msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(self.dst)));
        msg
    }

    /// Reads an FDB entry with a remote destination; the all-zero (flood) MAC is not one.
    pub fn from_message(msg: &NeighbourMessage) -> Option<FdbEntry> {
        if msg.header.family != AddressFamily::Bridge {
            return None;
        }
        let mac = link_layer_address(msg).filter(|m| *m != MacAddr([0; 6]))?;
        Some(FdbEntry { ifindex: msg.header.ifindex, mac, dst: destination(msg)? })
    }
}

fn destination(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        // In AF_BRIDGE (FDB) messages the kernel's NDA_DST comes back undecoded.
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            16 => <[u8; 16]>::try_from(bytes.as_slice()).ok().map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        },
        _ => None,
    })
}

fn link_layer_address(msg: &NeighbourMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => MacAddr::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

/// A unicast route in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    /// Destination prefix.
    pub destination: IpNet,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output device, if pinned.
    pub oif: Option<u32>,
    /// `onlink`: the gateway is on the device whatever its addresses say.
    pub onlink: bool,
    /// The route protocol that marks who made it (`proto 77` for overlayd's).
    pub protocol: u8,
}

impl Route {
    /// The netlink message that adds, replaces or deletes this route.
    pub fn message(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(self.destination.addr());
        msg.header.destination_prefix_length = self.destination.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::from(self.protocol);
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        if self.onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        if self.destination.prefix_len() > 0 {
            msg.attributes.push(RouteAttribute::Destination(route_address(self.destination.network())));
        }
        if let Some(gateway) = self.gateway {
            msg.attributes.push(RouteAttribute::Gateway(route_address(gateway)));
        }
        if let Some(oif) = self.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        msg
    }

    /// Reads a route of the main table; others are none.
    pub fn from_message(msg: &RouteMessage) -> Option<Route> {
        let mut table = u32::from(msg.header.table);
        let mut dst = None;
        let mut gateway = None;
        let mut oif = None;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(IpAddr::V4(*ip)),
                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some(IpAddr::V6(*ip)),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            return None;
        }
        let dst = dst.unwrap_or(match msg.header.address_family {
            AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        });
        Some(Route {
            destination: IpNet::new(dst, msg.header.destination_prefix_length).ok()?,
            gateway,
            oif,
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
            protocol: u8::from(msg.header.protocol),
        })
    }
}

/// One entry of the node's bulk state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// A neighbour entry.
    Neighbour(Neighbour),
    /// An FDB entry.
    Fdb(FdbEntry),
    /// A route.
    Route(Route),
}

/// One change to the kernel, sent in a batch by [`Bulk::apply`](crate::Bulk::apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// Add the entry, or replace the one with the same key.
    Set(Entry),
    /// Add the entry where none has its key; the kernel refuses it (EEXIST)
    /// over one that does, whoever made it.
    Add(Entry),
    /// Remove the entry.
    Delete(Entry),
}

impl Change {
    /// Whether this removes something (a missing entry then counts as done).
    pub fn is_delete(&self) -> bool {
        matches!(self, Change::Delete(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_read_back_what_they_write() {
        let routes = [
            Route {
                destination: "10.244.2.0/24".parse().unwrap(),
                gateway: Some("10.244.2.0".parse().unwrap()),
                oif: Some(7),
                onlink: true,
                protocol: 77,
            },
            Route {
                destination: "0.0.0.0/0".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                oif: Some(2),
                onlink: false,
                protocol: PROTOCOL_BOOT,
            },
            Route {
                destination: "fd00:10:244:2::/64".parse().unwrap(),
                gateway: Some("fe80::1".parse().unwrap()),
                oif: None,
                onlink: false,
                protocol: 77,
            },
        ];
        for route in routes {
            assert_eq!(Route::from_message(&route.message()), Some(route));
        }
    }

    #[test]
    fn neighbours_and_fdb_entries_read_back() {
        let mac: MacAddr = "52:58:c0:08:52:6d".parse().unwrap();
        let n = Neighbour { ifindex: 4, ip: "10.244.2.0".parse().unwrap(), mac };
        assert_eq!(Neighbour::from_message(&n.message()), Some((n, true)));
        let f = FdbEntry { ifindex: 4, mac, dst: "192.168.50.12".parse().unwrap() };
        assert_eq!(FdbEntry::from_message(&f.message()), Some(f));
        assert_eq!(FdbEntry::from_message(&n.message()), None, "an ARP entry is not an FDB entry");
    }
}
