//! The kernel's news, as typed events: rtnetlink's multicast groups (links,
//! addresses, IPv4 and IPv6 routes, neighbours, and with them the bridge
//! FDB, which arrives as neighbour messages of family AF_BRIDGE), and
//! nftables' (a table, chain or rule deleted). The daemon holds each event
//! against what it last applied and repairs only what differs, so its own
//! writes, which the kernel reports too, cause no reconcile.

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    address::AddressMessage,
    link::{LinkAttribute, LinkFlags, LinkMessage},
    RouteNetlinkMessage,
};
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

/// nfnetlink: the protocol, nftables' group, subsystem and the messages that delete.
const NETLINK_NETFILTER: isize = 12;
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
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
    /// A table, or a chain or rule of it, was deleted (`nft flush ruleset`
    /// deletes them all). `family` is `NFPROTO_IPV4` or `NFPROTO_IPV6` for ours.
    NftDeleted { family: u8, table: String },
    /// The socket's buffer overflowed: some events were lost, so anything may have changed.
    Overflow,
}

/// A subscription to rtnetlink's groups, or to nftables'.
pub struct KernelEvents {
    socket: TokioSocket,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Route,
    Nftables,
}

impl KernelEvents {
    /// Links, addresses, routes, neighbours and FDB entries of this network namespace.
    pub fn route() -> Result<Self> {
        let socket = subscribe(
            NETLINK_ROUTE,
            &[
                RTNLGRP_LINK,
                RTNLGRP_NEIGH,
                RTNLGRP_IPV4_IFADDR,
                RTNLGRP_IPV4_ROUTE,
                RTNLGRP_IPV6_IFADDR,
                RTNLGRP_IPV6_ROUTE,
            ],
        )?;
        Ok(KernelEvents { socket, kind: Kind::Route })
    }

    /// Deletions of nftables tables, chains and rules in this network namespace (needs CAP_NET_ADMIN).
    pub fn nftables() -> Result<Self> {
        Ok(KernelEvents { socket: subscribe(NETLINK_NETFILTER, &[NFNLGRP_NFTABLES])?, kind: Kind::Nftables })
    }

    /// The events of the next datagram; `Overflow` when the kernel had to drop some.
    pub async fn next(&mut self) -> Result<Vec<KernelEvent>> {
        match self.socket.recv_from_full().await {
            Ok((datagram, _)) => Ok(match self.kind {
                Kind::Route => route_events(&datagram),
                Kind::Nftables => nftables_events(&datagram),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(vec![KernelEvent::Overflow]),
            Err(e) => Err(Error::socket("reading kernel events")(e)),
        }
    }
}

fn subscribe(protocol: isize, groups: &[u32]) -> Result<TokioSocket> {
    let what = "subscribing to kernel events";
    let mut socket = TokioSocket::new(protocol).map_err(Error::socket(what))?;
    let raw = socket.socket_mut();
    raw.bind_auto().map_err(Error::socket(what))?;
    // A burst (a flushed table of 5,000 routes) must fit, or it is an overflow and a full
    // resync. SO_RCVBUFFORCE passes net.core.rmem_max, for a holder of CAP_NET_ADMIN.
    let size: libc::c_int = 4 * 1024 * 1024;
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
    messages(datagram)
        .filter_map(|bytes| NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).ok())
        .filter_map(|m| match m.payload {
            NetlinkPayload::InnerMessage(inner) => route_event(inner),
            _ => None,
        })
        .collect()
}

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

/// nfnetlink messages: a 4-byte `nfgenmsg` (family, version, resource id)
/// after the netlink header, then attributes. Only deletions are events.
fn nftables_events(datagram: &[u8]) -> Vec<KernelEvent> {
    messages(datagram).filter_map(nftables_event).collect()
}

fn nftables_event(message: &[u8]) -> Option<KernelEvent> {
    let kind = u16::from_ne_bytes([*message.get(4)?, *message.get(5)?]);
    if kind >> 8 != NFNL_SUBSYS_NFTABLES
        || ![NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_DELRULE].contains(&(kind & 0xff))
    {
        return None;
    }
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
            return Some(KernelEvent::NftDeleted { family, table: String::from_utf8_lossy(name).into_owned() });
        }
        attributes = attributes.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn nftables_deletions_are_read_and_everything_else_ignored() {
        let mut datagram = nft_message(NFT_MSG_DELTABLE, NFPROTO_IPV4, "overlay");
        datagram.extend(nft_message(NFT_MSG_DELRULE, NFPROTO_IPV6, "overlay"));
        datagram.extend(nft_message(0 /* NEWTABLE */, NFPROTO_IPV4, "overlay"));
        datagram.extend(nft_message(NFT_MSG_DELCHAIN, NFPROTO_IPV4, "filter"));
        assert_eq!(
            nftables_events(&datagram),
            [
                KernelEvent::NftDeleted { family: NFPROTO_IPV4, table: "overlay".into() },
                KernelEvent::NftDeleted { family: NFPROTO_IPV6, table: "overlay".into() },
                KernelEvent::NftDeleted { family: NFPROTO_IPV4, table: "filter".into() },
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
