//! Kernel work for a pod: the bridge, the veth pair, and the pod's side of it
//! (address, routes), over netlink. Work inside the pod's namespace runs on a
//! thread that entered it, so the plugin's own namespace is never changed.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    link::{
        InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
        LinkMessage,
    },
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use overlayd::dataplane::links::{self, address_message, Link};
use overlayd::dataplane::Netlink;
use proto::MacAddr;

use crate::error::{code, CniError};

fn nl_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::io(what.to_string(), e)
}

fn open() -> Result<Netlink, CniError> {
    Netlink::open().map_err(|e| CniError::io("opening netlink socket", e))
}

fn find(nl: &mut Netlink, name: &str) -> Result<Option<Link>, CniError> {
    links::by_name(nl, name).map_err(|e| CniError::io(format!("looking up {name}"), e))
}

/// The host-side veth name for an attachment: stable, at most 15 bytes.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("veth{hash:08x}")
}

/// Opens `path` and checks it is a network namespace.
pub fn open_netns(path: &str) -> Result<File, CniError> {
    let bad = |why: String| {
        CniError::new(code::INVALID_ENV, format!("CNI_NETNS {path:?} is not a network namespace")).details(why)
    };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    // SAFETY: fstatfs fills a zeroed struct for an fd we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    if st.f_type as i64 != NSFS_MAGIC {
        return Err(bad(format!("filesystem type {:#x} is not nsfs", st.f_type)));
    }
    // NS_GET_NSTYPE: a mount or PID namespace is nsfs too.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on an fd we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(bad("a namespace, but not a network namespace".into()));
    }
    Ok(file)
}

/// Runs `f` with a netlink socket inside the namespace `ns`.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce(&mut Netlink) -> Result<T, CniError> + Send) -> Result<T, CniError> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a namespace fd only moves this (scoped) thread.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(CniError::io(
                    "entering the container's network namespace",
                    std::io::Error::last_os_error(),
                ));
            }
            let mut nl = open()?;
            f(&mut nl)
        })
        .join()
        .unwrap_or_else(|_| Err(CniError::new(code::IO, "netns worker thread panicked")))
    })
}

/// Makes sure the bridge exists, is up and holds the gateway address.
pub fn ensure_bridge(name: &str, gateway: Ipv4Net, mtu: u32) -> Result<Link, CniError> {
    let mut nl = open()?;
    if find(&mut nl, name)?.is_none() {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        // A set MAC: otherwise the bridge takes its lowest port's MAC, which
        // changes as pods come and go and leaves every pod's ARP entry for
        // the gateway pointing at a MAC that no longer exists.
        let mac = MacAddr::from_seed(format!("overlay-bridge|{name}|{gateway}").as_bytes());
        msg.attributes.push(LinkAttribute::Address(mac.octets().to_vec()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        match nl.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => {}
            // Another plugin process created it a moment ago.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(CniError::io(format!("creating bridge {name}"), e)),
        }
    }
    let bridge = find(&mut nl, name)?.ok_or_else(|| CniError::new(code::IO, format!("bridge {name} vanished")))?;
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(CniError::new(code::INVALID_CONFIG, format!("{name} exists and is not a bridge")));
    }
    let addrs = links::ipv4_addresses(&mut nl).map_err(|e| CniError::io("reading addresses", e))?;
    if !addrs.iter().any(|a| a.index == bridge.index && a.net == gateway) {
        nl.request(
            RouteNetlinkMessage::NewAddress(address_message(bridge.index, gateway)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(nl_err(format!("adding {gateway} to {name}")))?;
    }
    if !bridge.up {
        set_up(&mut nl, bridge.index).map_err(nl_err(format!("setting {name} up")))?;
    }
    Ok(bridge)
}

fn set_up(nl: &mut Netlink, index: u32) -> std::io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(msg), 0)
}

/// Creates the veth pair with `ifname` already inside the container's
/// namespace, attaches the host end to the bridge (hairpin if asked) and sets it up.
pub fn create_veth(
    host: &str,
    ifname: &str,
    ns: &File,
    mtu: u32,
    bridge: &Link,
    hairpin: bool,
) -> Result<Link, CniError> {
    let mut nl = open()?;
    if let Some(stale) = find(&mut nl, host)? {
        // Left over from an attempt that died half-way: start clean.
        delete_link(&mut nl, stale.index).map_err(nl_err(format!("removing stale {host}")))?;
    }
    let mut peer = LinkMessage::default();
    peer.attributes.push(LinkAttribute::IfName(ifname.to_string()));
    peer.attributes.push(LinkAttribute::Mtu(mtu));
    peer.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(host.to_string()));
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    nl.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EEXIST) {
            " (is the interface name taken in the container?)"
        } else {
            ""
        };
        CniError::io(format!("creating veth {host} <-> {ifname}{hint}"), e)
    })?;
    let link = find(&mut nl, host)?.ok_or_else(|| CniError::new(code::IO, format!("veth {host} vanished")))?;
    let mut attach = LinkMessage::default();
    attach.header.index = link.index;
    attach.header.flags = LinkFlags::Up;
    attach.header.change_mask = LinkFlags::Up;
    attach.attributes.push(LinkAttribute::Controller(bridge.index));
    nl.request(RouteNetlinkMessage::SetLink(attach), 0).map_err(nl_err(format!("attaching {host} to the bridge")))?;
    if hairpin {
        let mut port = LinkMessage::default();
        port.header.index = link.index;
        port.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(true)])),
        ]));
        nl.request(RouteNetlinkMessage::NewLink(port), 0).map_err(nl_err(format!("hairpin on {host}")))?;
    }
    Ok(link)
}

fn delete_link(nl: &mut Netlink, index: u32) -> std::io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    nl.request(RouteNetlinkMessage::DelLink(msg), 0)
}

/// Removes a host link by name; a missing one is fine.
pub fn delete_host_link(name: &str) -> Result<(), CniError> {
    let mut nl = open()?;
    if let Some(link) = find(&mut nl, name)? {
        match delete_link(&mut nl, link.index) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => return Err(CniError::io(format!("removing {name}"), e)),
        }
    }
    Ok(())
}

fn route(dst: Ipv4Net, gw: Ipv4Addr, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = dst.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    if dst.prefix_len() > 0 {
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(dst.network())));
    }
    msg.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    msg.attributes.push(RouteAttribute::Oif(oif));
    msg
}

/// Inside the container: `ifname` up with `address`, loopback up, `routes` via their gateways.
pub fn configure_container(
    ns: &File,
    ifname: &str,
    address: Ipv4Net,
    routes: &[(Ipv4Net, Ipv4Addr)],
) -> Result<Link, CniError> {
    in_netns(ns, |nl| {
        let link =
            find(nl, ifname)?.ok_or_else(|| CniError::new(code::IO, format!("{ifname} missing in the container")))?;
        nl.request(RouteNetlinkMessage::NewAddress(address_message(link.index, address)), NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(nl_err(format!("adding {address} to {ifname}")))?;
        set_up(nl, link.index).map_err(nl_err(format!("setting {ifname} up")))?;
        if let Some(lo) = find(nl, "lo")? {
            set_up(nl, lo.index).map_err(nl_err("setting lo up"))?;
        }
        for (dst, gw) in routes {
            nl.request(RouteNetlinkMessage::NewRoute(route(*dst, *gw, link.index)), NLM_F_CREATE | NLM_F_REPLACE)
                .map_err(nl_err(format!("adding route {dst} via {gw}")))?;
        }
        Ok(link)
    })
}

/// Inside the container: removes `ifname` (and with it the host end); missing is fine.
pub fn delete_in_container(ns: &File, ifname: &str) -> Result<(), CniError> {
    in_netns(ns, |nl| {
        if let Some(link) = find(nl, ifname)? {
            match delete_link(nl, link.index) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => return Err(CniError::io(format!("removing {ifname}"), e)),
            }
        }
        Ok(())
    })
}

/// What CHECK needs to see inside the container.
pub struct ContainerView {
    /// The interface, if present.
    pub link: Option<Link>,
    /// Its IPv4 addresses.
    pub addresses: Vec<Ipv4Net>,
    /// IPv4 routes through it: (destination, gateway).
    pub routes: Vec<(Ipv4Net, Option<Ipv4Addr>)>,
}

/// Reads `ifname`'s addresses and routes inside the container.
pub fn inspect_container(ns: &File, ifname: &str) -> Result<ContainerView, CniError> {
    in_netns(ns, |nl| {
        let Some(link) = find(nl, ifname)? else {
            return Ok(ContainerView { link: None, addresses: vec![], routes: vec![] });
        };
        let addresses = links::ipv4_addresses(nl)
            .map_err(|e| CniError::io("reading addresses", e))?
            .into_iter()
            .filter(|a| a.index == link.index)
            .map(|a| a.net)
            .collect();
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let mut routes = Vec::new();
        for msg in nl.dump(RouteNetlinkMessage::GetRoute(req)).map_err(|e| CniError::io("reading routes", e))? {
            let RouteNetlinkMessage::NewRoute(r) = msg else { continue };
            if r.header.table != RouteHeader::RT_TABLE_MAIN {
                continue;
            }
            let (mut dst, mut gw, mut oif) = (Ipv4Addr::UNSPECIFIED, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if oif == Some(link.index) {
                if let Ok(net) = Ipv4Net::new(dst, r.header.destination_prefix_length) {
                    routes.push((net, gw));
                }
            }
        }
        Ok(ContainerView { link: Some(link), addresses, routes })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_and_are_stable() {
        let a = host_veth_name("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 12);
        assert_eq!(a, host_veth_name("0123456789abcdef0123456789abcdef", "eth0"));
        assert_ne!(a, host_veth_name("0123456789abcdef0123456789abcdef", "eth1"));
    }

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let e = open_netns("/etc/hostname").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(open_netns("/nonexistent/netns").is_err());
        assert!(open_netns("/proc/self/status").is_err());
        assert!(open_netns("/proc/self/ns/mnt").is_err(), "a mount namespace is not a network namespace");
        assert!(open_netns("/proc/self/ns/net").is_ok(), "runtimes may pass /proc/<pid>/ns/net");
    }
}
