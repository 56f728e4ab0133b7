//! The kernel's news, as typed events: rtnetlink's multicast groups (links,
//! addresses, IPv4 and IPv6 routes, neighbours, and with them the bridge
//! FDB, which arrives as neighbour messages of family AF_BRIDGE), and
//! nftables' (a table, chain or rule added or deleted). The daemon holds each event
//! against what it last applied and repairs only what differs, so its own
//! writes, which the kernel reports too, cause no reconcile.

use netlink_packet_core::NetlinkBuffer;
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, TokioSocket};
use proto::MacAddr;

use crate::entry::{FdbEntry, Neighbour, Route};
use crate::error::{Error, Result};

/// rtnetlink's multicast groups (`RTNLGRP_*`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// nfnetlink: the protocol, nftables' group, subsystem and the messages that add and delete.
const NETLINK_NETFILTER: isize = 12;
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_DELRULE: u16 = 8;
/// In table, chain and rule messages alike, attribute 1 is the table's name.
const NFTA_TABLE_NAME: u16 = 1;

/// nftables families (`NFPROTO_*`), as a table is addressed.
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

/// What the kernel said changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// A link appeared or changed, or went (`gone`).
    Link { index: u32, name: String, up: bool, mtu: Option<u32>, mac: Option<MacAddr>, gone: bool },
    /// An address was added to or removed from link `index`.
    Address { index: u32, gone: bool },
    /// A neighbour (ARP/NDP) entry was set or removed.
    Neighbour { entry: Neighbour, permanent: bool, gone: bool },
    /// A bridge FDB entry was set or removed.
    Fdb { entry: FdbEntry, gone: bool },
    /// A route of the main table was set or removed.
    Route { route: Route, gone: bool },
    /// A table, or a chain or rule of it, was added, or deleted (`gone`;
    /// `nft flush ruleset` deletes them all). `family` is `NFPROTO_IPV4` or
    /// `NFPROTO_IPV6` for ours. A transaction that rewrites a table reports
    /// its deletions first, then its additions: the last event tells.
    Nft { family: u8, table: String, gone: bool },
    /// The socket's buffer overflowed: some events were lost, so anything may have changed.
    Overflow,
}

/// A subscription to rtnetlink's groups, or to nftables'.
pub struct KernelEvents {
    socket: TokioSocket,
    kind: Kind,
    /// One datagram at a time, read into the same buffer.
    buf: Vec<u8>,
}

/// Far above any notification: a link with every attribute is a few KiB.
const DATAGRAM: usize = 64 * 1024;

#[derive(Clone, Copy)]
enum Kind {
    Route,
    Nftables,
}

impl KernelEvents {
    /// Links, addresses, routes, neighbours and FDB entries of this network
    /// namespace, with a receive buffer of `buffer` bytes ([`DEFAULT_BUFFER`]).
    pub fn route(buffer: usize) -> Result<Self> {
        let socket = subscribe(
            NETLINK_ROUTE,
            buffer,
            &[
                RTNLGRP_LINK,
                RTNLGRP_NEIGH,
                RTNLGRP_IPV4_IFADDR,
                RTNLGRP_IPV4_ROUTE,
                RTNLGRP_IPV6_IFADDR,
                RTNLGRP_IPV6_ROUTE,
            ],
        )?;
        Ok(KernelEvents { socket, kind: Kind::Route, buf: Vec::with_capacity(DATAGRAM) })
    }

    /// Additions and deletions of nftables tables, chains and rules in this network namespace (needs CAP_NET_ADMIN).
    pub fn nftables() -> Result<Self> {
        let socket = subscribe(NETLINK_NETFILTER, DEFAULT_BUFFER, &[NFNLGRP_NFTABLES])?;
        Ok(KernelEvents { socket, kind: Kind::Nftables, buf: Vec::with_capacity(DATAGRAM) })
    }

    /// The events of the next datagram; `Overflow` when the kernel had to drop some.
    pub async fn next(&mut self) -> Result<Vec<KernelEvent>> {
        self.buf.clear();
        match self.socket.recv(&mut self.buf).await {
            Ok(()) => Ok(match self.kind {
                Kind::Route => route_events(&self.buf),
                Kind::Nftables => nftables_events(&self.buf),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(vec![KernelEvent::Overflow]),
            Err(e) => Err(Error::socket("reading kernel events")(e)),
        }
    }
}

/// The receive buffer of an event socket: a burst (a flushed table of 5,000
/// routes) must fit, or it is an overflow and a full resync.
pub const DEFAULT_BUFFER: usize = 4 * 1024 * 1024;

fn subscribe(protocol: isize, buffer: usize, groups: &[u32]) -> Result<TokioSocket> {
    let what = "subscribing to kernel events";
    let mut socket = TokioSocket::new(protocol).map_err(Error::socket(what))?;
    let raw = socket.socket_mut();
    raw.bind_auto().map_err(Error::socket(what))?;
    // SO_RCVBUFFORCE passes net.core.rmem_max, for a holder of CAP_NET_ADMIN.
    let size = libc::c_int::try_from(buffer).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size` (an int, as the option takes) during the call only.
    let forced = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(raw),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = raw.set_rx_buf_sz(size as usize);
    }
    for group in groups {
        raw.add_membership(*group).map_err(Error::socket(what))?;
    }
    Ok(socket)
}

/// Every message of one datagram, in order.
fn messages(datagram: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        let buffer = NetlinkBuffer::new_checked(rest).ok()?;
        let len = (buffer.length() as usize).min(rest.len());
        if len < 16 {
            return None;
        }
        let (message, tail) = rest.split_at(len);
        // Messages are aligned to 4 bytes.
        rest = tail.get((len.next_multiple_of(4) - len).min(tail.len())..).unwrap_or_default();
        Some(message)
    })
}

fn route_events(datagram: &[u8]) -> Vec<KernelEvent> {
    messages(datagram).filter_map(|bytes| fast::event(bytes).flatten()).collect()
}

/// Link, address, neighbour, FDB and route messages, read in place. A big
/// apply sends back one of these for every entry it wrote, so they are a
/// hot path: netlink-packet-route's decoder allocates every message's
/// attributes (and a link's come with statistics and per-family settings,
/// whose decoding code would otherwise become resident for nothing), this
/// reads the few fields the drift check needs. It must agree with that
/// decoder (`Neighbour::from_message` and the others); a test holds it to that.
mod fast {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use ipnet::IpNet;
    use proto::MacAddr;

    use super::KernelEvent;
    use crate::entry::{FdbEntry, Neighbour, Route};

    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const RTM_NEWADDR: u16 = 20;
    const RTM_DELADDR: u16 = 21;
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const RTM_NEWNEIGH: u16 = 28;
    const RTM_DELNEIGH: u16 = 29;
    const AF_INET: u8 = 2;
    const AF_BRIDGE: u8 = 7;
    const AF_INET6: u8 = 10;
    const NUD_PERMANENT: u16 = 0x80;
    const NDA_DST: u16 = 1;
    const NDA_LLADDR: u16 = 2;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    const RTA_TABLE: u16 = 15;
    const RT_TABLE_MAIN: u32 = 254;
    const RTNH_F_ONLINK: u32 = 4;
    const IFLA_ADDRESS: u16 = 1;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_MTU: u16 = 4;
    const IFF_UP: u32 = 1;
    /// The netlink header; the fixed parts of `ifinfomsg`, and of `ndmsg` and `rtmsg`.
    /// (Of `ifaddrmsg`, only the index is read: no attributes.)
    const HEADER: usize = 16;
    const LINK: usize = 16;
    const FIXED: usize = 12;

    /// `Some(event or none)` for the message types read here; `None`: another type, for the general decoder.
    pub(super) fn event(message: &[u8]) -> Option<Option<KernelEvent>> {
        let kind = u16::from_ne_bytes([*message.get(4)?, *message.get(5)?]);
        let body = message.get(HEADER..)?;
        match kind {
            RTM_NEWLINK | RTM_DELLINK => Some(link(body, kind == RTM_DELLINK)),
            RTM_NEWADDR | RTM_DELADDR => Some(address(body, kind == RTM_DELADDR)),
            RTM_NEWNEIGH | RTM_DELNEIGH => Some(neighbour(body, kind == RTM_DELNEIGH)),
            RTM_NEWROUTE | RTM_DELROUTE => Some(route(body, kind == RTM_DELROUTE)),
            _ => None,
        }
    }

    /// Each (type, payload) of the attributes after the fixed part of `fixed` bytes.
    fn attributes(body: &[u8], fixed: usize) -> impl Iterator<Item = (u16, &[u8])> {
        let mut rest = body.get(fixed..).unwrap_or_default();
        std::iter::from_fn(move || {
            if rest.len() < 4 {
                return None;
            }
            let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
            let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
            if len < 4 || len > rest.len() {
                return None;
            }
            let payload = &rest[4..len];
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
            Some((kind, payload))
        })
    }

    fn ip(bytes: &[u8]) -> Option<IpAddr> {
        match bytes.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
            16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))),
            _ => None,
        }
    }

    fn u32_of(bytes: &[u8]) -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?))
    }

    fn link(body: &[u8], gone: bool) -> Option<KernelEvent> {
        let index = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
        let flags = u32::from_ne_bytes(body.get(8..12)?.try_into().ok()?);
        let (mut name, mut mtu, mut mac) = (String::new(), None, None);
        for (kind, payload) in attributes(body, LINK) {
            match kind {
                IFLA_IFNAME => {
                    let bytes = payload.split(|b| *b == 0).next().unwrap_or_default();
                    name = String::from_utf8_lossy(bytes).into_owned();
                }
                IFLA_MTU => mtu = u32_of(payload),
                IFLA_ADDRESS => mac = MacAddr::try_from(payload).ok(),
                _ => {}
            }
        }
        Some(KernelEvent::Link { index, name, up: flags & IFF_UP != 0, mtu, mac, gone })
    }

    fn address(body: &[u8], gone: bool) -> Option<KernelEvent> {
        let index = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
        Some(KernelEvent::Address { index, gone })
    }

    fn neighbour(body: &[u8], gone: bool) -> Option<KernelEvent> {
        let family = *body.first()?;
        let ifindex = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
        let state = u16::from_ne_bytes(body.get(8..10)?.try_into().ok()?);
        let (mut dst, mut mac) = (None, None);
        for (kind, payload) in attributes(body, FIXED) {
            match kind {
                NDA_DST => dst = ip(payload),
                NDA_LLADDR => mac = MacAddr::try_from(payload).ok(),
                _ => {}
            }
        }
        match family {
            AF_BRIDGE => {
                let mac = mac.filter(|m| *m != MacAddr([0; 6]))?;
                Some(KernelEvent::Fdb { entry: FdbEntry { ifindex, mac, dst: dst? }, gone })
            }
            AF_INET | AF_INET6 => {
                let entry = Neighbour { ifindex, ip: dst?, mac: mac.unwrap_or(MacAddr([0; 6])) };
                Some(KernelEvent::Neighbour { entry, permanent: state == NUD_PERMANENT, gone })
            }
            _ => None,
        }
    }

    fn route(body: &[u8], gone: bool) -> Option<KernelEvent> {
        let (family, prefix) = (*body.first()?, *body.get(1)?);
        let mut table = u32::from(*body.get(4)?);
        let protocol = *body.get(5)?;
        let flags = u32::from_ne_bytes(body.get(8..12)?.try_into().ok()?);
        let (mut dst, mut gateway, mut oif) = (None, None, None);
        for (kind, payload) in attributes(body, FIXED) {
            match kind {
                RTA_DST => dst = ip(payload),
                RTA_GATEWAY => gateway = ip(payload),
                RTA_OIF => oif = u32_of(payload),
                RTA_TABLE => table = u32_of(payload)?,
                _ => {}
            }
        }
        if table != RT_TABLE_MAIN {
            return None;
        }
        let dst = dst.unwrap_or(match family {
            AF_INET6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        });
        let route = Route {
            destination: IpNet::new(dst, prefix).ok()?,
            gateway,
            oif,
            onlink: flags & RTNH_F_ONLINK != 0,
            protocol,
        };
        Some(KernelEvent::Route { route, gone })
    }
}

/// nfnetlink messages: a 4-byte `nfgenmsg` (family, version, resource id)
/// after the netlink header, then attributes. Tables, chains and rules are events.
fn nftables_events(datagram: &[u8]) -> Vec<KernelEvent> {
    messages(datagram).filter_map(nftables_event).collect()
}

fn nftables_event(message: &[u8]) -> Option<KernelEvent> {
    let kind = u16::from_ne_bytes([*message.get(4)?, *message.get(5)?]);
    if kind >> 8 != NFNL_SUBSYS_NFTABLES {
        return None;
    }
    let gone = match kind & 0xff {
        NFT_MSG_NEWTABLE | NFT_MSG_NEWCHAIN | NFT_MSG_NEWRULE => false,
        NFT_MSG_DELTABLE | NFT_MSG_DELCHAIN | NFT_MSG_DELRULE => true,
        _ => return None,
    };
    let family = *message.get(16)?;
    let mut attributes = message.get(20..)?;
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
        if len < 4 || len > attributes.len() {
            return None;
        }
        if kind == NFTA_TABLE_NAME {
            let name = &attributes[4..len];
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            return Some(KernelEvent::Nft { family, table: String::from_utf8_lossy(name).into_owned(), gone });
        }
        attributes = attributes.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::{
        address::AddressMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
        RouteNetlinkMessage,
    };

    /// What netlink-packet-route's decoder makes of a message: the reference
    /// the in-place decoder is tested against.
    fn route_event(message: RouteNetlinkMessage) -> Option<KernelEvent> {
        use RouteNetlinkMessage as M;
        Some(match message {
            M::NewLink(link) => link_event(&link, false),
            M::DelLink(link) => link_event(&link, true),
            M::NewAddress(a) => address_event(&a, false),
            M::DelAddress(a) => address_event(&a, true),
            M::NewNeighbour(n) => neighbour_event(&n, false)?,
            M::DelNeighbour(n) => neighbour_event(&n, true)?,
            M::NewRoute(r) => KernelEvent::Route { route: Route::from_message(&r)?, gone: false },
            M::DelRoute(r) => KernelEvent::Route { route: Route::from_message(&r)?, gone: true },
            _ => return None,
        })
    }

    fn link_event(link: &LinkMessage, gone: bool) -> KernelEvent {
        let mut name = String::new();
        let (mut mtu, mut mac) = (None, None);
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                LinkAttribute::Address(bytes) => mac = MacAddr::try_from(bytes.as_slice()).ok(),
                _ => {}
            }
        }
        let up = link.header.flags.contains(LinkFlags::Up);
        KernelEvent::Link { index: link.header.index, name, up, mtu, mac, gone }
    }

    fn address_event(address: &AddressMessage, gone: bool) -> KernelEvent {
        KernelEvent::Address { index: address.header.index, gone }
    }

    fn neighbour_event(message: &netlink_packet_route::neighbour::NeighbourMessage, gone: bool) -> Option<KernelEvent> {
        if let Some(entry) = FdbEntry::from_message(message) {
            return Some(KernelEvent::Fdb { entry, gone });
        }
        let (entry, permanent) = Neighbour::from_message(message)?;
        Some(KernelEvent::Neighbour { entry, permanent, gone })
    }

    /// An nfnetlink message as the kernel sends it: header, nfgenmsg, one string attribute.
    fn nft_message(msg: u16, family: u8, table: &str) -> Vec<u8> {
        let mut attribute = Vec::new();
        let len = 4 + table.len() + 1;
        attribute.extend_from_slice(&(len as u16).to_ne_bytes());
        attribute.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
        attribute.extend_from_slice(table.as_bytes());
        attribute.push(0);
        attribute.resize(len.next_multiple_of(4), 0);
        let total = 16 + 4 + attribute.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(&attribute);
        m
    }

    /// A message as the kernel sends it, from the general encoder.
    fn encoded(message: RouteNetlinkMessage) -> Vec<u8> {
        let mut packet =
            NetlinkMessage::new(netlink_packet_core::NetlinkHeader::default(), NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        bytes
    }

    /// What the general decoder makes of the message.
    fn general(bytes: &[u8]) -> Option<KernelEvent> {
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).ok()?.payload {
            NetlinkPayload::InnerMessage(inner) => route_event(inner),
            _ => None,
        }
    }

    #[test]
    fn the_fast_decoder_agrees_with_the_general_one() {
        use crate::entry::{FdbEntry, Neighbour, Route};
        use netlink_packet_route::neighbour::NeighbourState;
        use RouteNetlinkMessage as M;
        let mac: MacAddr = "b2:5e:e8:32:3a:be".parse().unwrap();
        let neighbour = Neighbour { ifindex: 7, ip: "10.244.2.0".parse().unwrap(), mac };
        let neighbour6 = Neighbour { ifindex: 8, ip: "fd00:10:244:2::".parse().unwrap(), mac };
        let fdb = FdbEntry { ifindex: 7, mac, dst: "192.168.50.12".parse().unwrap() };
        let route = Route {
            destination: "10.244.2.0/24".parse().unwrap(),
            gateway: Some("10.244.2.0".parse().unwrap()),
            oif: Some(7),
            onlink: true,
            protocol: 77,
        };
        let default6 = Route {
            destination: "::/0".parse().unwrap(),
            gateway: Some("fd00:50::fe".parse().unwrap()),
            oif: None,
            onlink: false,
            protocol: 3,
        };
        let mut stale = neighbour.message();
        stale.header.state = NeighbourState::Stale;
        let mut resolving = neighbour6.message();
        resolving
            .attributes
            .retain(|a| !matches!(a, netlink_packet_route::neighbour::NeighbourAttribute::LinkLayerAddress(_)));
        let mut other_table = route.message();
        other_table.header.table = 100;
        let mut link = netlink_packet_route::link::LinkMessage::default();
        link.header.index = 7;
        link.header.flags = LinkFlags::Up | LinkFlags::Running;
        link.attributes = vec![
            LinkAttribute::IfName("overlay.1".into()),
            LinkAttribute::Mtu(1450),
            LinkAttribute::Address(mac.octets().to_vec()),
        ];
        let mut down = link.clone();
        down.header.flags = LinkFlags::empty();
        down.attributes.retain(|a| !matches!(a, LinkAttribute::Address(_)));
        let mut address = AddressMessage::default();
        address.header.index = 7;
        address.header.prefix_len = 32;
        let messages = [
            M::NewLink(link),
            M::DelLink(down.clone()),
            M::NewLink(down),
            M::NewAddress(address.clone()),
            M::DelAddress(address),
            M::NewNeighbour(neighbour.message()),
            M::DelNeighbour(neighbour6.message()),
            M::NewNeighbour(stale),
            M::NewNeighbour(resolving),
            M::NewNeighbour(fdb.message()),
            M::DelNeighbour(fdb.message()),
            M::NewRoute(route.message()),
            M::DelRoute(default6.message()),
            M::NewRoute(other_table),
        ];
        for message in messages {
            let bytes = encoded(message.clone());
            let fast = fast::event(&bytes).expect("a type the fast decoder reads");
            assert_eq!(fast, general(&bytes), "{message:?}");
            // Cut short anywhere: no panic, and never an event the full message would not give.
            for cut in 0..bytes.len() {
                let _ = fast::event(&bytes[..cut]);
            }
        }
        assert!(fast::event(&encoded(M::NewRule(Default::default()))).is_none(), "not a type we follow");
    }

    #[test]
    fn nftables_additions_and_deletions_are_read_and_everything_else_ignored() {
        let mut datagram = nft_message(NFT_MSG_DELTABLE, NFPROTO_IPV4, "overlay");
        datagram.extend(nft_message(NFT_MSG_DELRULE, NFPROTO_IPV6, "overlay"));
        datagram.extend(nft_message(16 /* NEWGEN */, NFPROTO_IPV4, "overlay"));
        datagram.extend(nft_message(NFT_MSG_NEWRULE, NFPROTO_IPV4, "overlay"));
        datagram.extend(nft_message(NFT_MSG_DELCHAIN, NFPROTO_IPV4, "filter"));
        let nft = |family, table: &str, gone| KernelEvent::Nft { family, table: table.into(), gone };
        assert_eq!(
            nftables_events(&datagram),
            [
                nft(NFPROTO_IPV4, "overlay", true),
                nft(NFPROTO_IPV6, "overlay", true),
                nft(NFPROTO_IPV4, "overlay", false),
                nft(NFPROTO_IPV4, "filter", true),
            ]
        );
        // Truncated or garbled input is no event, and no panic.
        for cut in 0..datagram.len() {
            let _ = nftables_events(&datagram[..cut]);
        }
        let mut bad = nft_message(NFT_MSG_DELTABLE, NFPROTO_IPV4, "overlay");
        bad[20] = 0xff;
        assert!(nftables_events(&bad).is_empty());
    }
}
