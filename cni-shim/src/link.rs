//! Kernel work for a pod: the bridge, the veth pair, and the pod's side of it
//! (address, routes), through the named netlink operations of
//! `overlay-netlink`. Work inside the pod's namespace runs on a thread that
//! entered it, so the plugin's own namespace is never changed.

use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

use ipnet::IpNet;
use overlay_netlink::{AddressFamily, Link, Netlink, Route, PROTOCOL_BOOT};
use proto::{FamilyEnv, MacAddr};

use crate::error::{code, CniError};

fn nl_err(what: impl std::fmt::Display) -> impl FnOnce(overlay_netlink::Error) -> CniError {
    move |e| CniError::io(what.to_string(), e)
}

/// A netlink connection in the plugin's own namespace (the host's).
pub fn connect() -> Result<Netlink, CniError> {
    Netlink::connect().map_err(|e| CniError::io("opening netlink socket", e))
}

async fn find(nl: &Netlink, name: &str) -> Result<Option<Link>, CniError> {
    nl.link(name).await.map_err(|e| CniError::io(format!("looking up {name}"), e))
}

/// The host-side veth name for an attachment: stable, at most 15 bytes.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let key = [container_id.as_bytes(), &[0], ifname.as_bytes()].concat();
    let hash = proto::hash::fnv1a(&key);
    format!("veth{:08x}", (hash ^ (hash >> 32)) as u32)
}

/// Opens `path` and checks it is a network namespace.
pub fn open_netns(path: &str) -> Result<File, CniError> {
    let bad = |why: String| {
        CniError::new(code::INVALID_ENV, format!("CNI_NETNS {path:?} is not a network namespace")).details(why)
    };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    // The plugin's own (the host's) namespace is no pod's: wiring a pod into
    // it would replace the host's default route.
    use std::os::unix::fs::MetadataExt;
    let id = |m: std::fs::Metadata| (m.dev(), m.ino());
    let own = std::fs::metadata("/proc/self/ns/net").map(id).ok();
    if own.is_some() && file.metadata().map(id).ok() == own {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {path:?} is the plugin's own network namespace (the host's), not a container's"),
        ));
    }
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| bad(e.to_string()))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(bad(format!("filesystem type {:#x} is not nsfs", fs.filesystem_type().0)));
    }
    // NS_GET_NSTYPE: a mount or PID namespace is nsfs too.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on an fd we own (nix has no wrapper for it).
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(bad("a namespace, but not a network namespace".into()));
    }
    Ok(file)
}

/// Runs `f` with a netlink connection inside the namespace `ns`, on a
/// thread of its own that entered it (with a runtime of its own: the
/// connection's socket lives in the namespace it was opened in).
pub fn in_netns<T, F, Fut>(ns: &File, f: F) -> Result<T, CniError>
where
    T: Send,
    F: FnOnce(Netlink) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            // Moves only this (scoped) thread into the namespace.
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| CniError::io("entering the container's network namespace", std::io::Error::from(e)))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| CniError::io("starting the netlink runtime", e))?;
            runtime.block_on(async { f(connect()?).await })
        })
        .join()
        .unwrap_or_else(|_| Err(CniError::new(code::IO, "netns worker thread panicked")))
    })
}

/// Makes sure the bridge exists, is up and holds the gateway address of each family.
pub async fn ensure_bridge(nl: &Netlink, name: &str, families: &[FamilyEnv], mtu: u32) -> Result<Link, CniError> {
    let gateway =
        families.first().map(|f| f.gateway).ok_or_else(|| CniError::new(code::INVALID_CONFIG, "no subnet to serve"))?;
    if find(nl, name).await?.is_none() {
        // A set MAC: otherwise the bridge takes its lowest port's MAC, which
        // changes as pods come and go and leaves every pod's ARP entry for
        // the gateway pointing at a MAC that no longer exists.
        let mac = MacAddr::from_seed(format!("overlay-bridge|{name}|{gateway}").as_bytes());
        match nl.create_bridge(name, mtu, mac).await {
            Ok(()) => without_dad(name),
            // Another plugin process created it a moment ago.
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(CniError::io(format!("creating bridge {name}"), e)),
        }
    }
    let bridge = find(nl, name).await?.ok_or_else(|| CniError::new(code::IO, format!("bridge {name} vanished")))?;
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(CniError::new(code::INVALID_CONFIG, format!("{name} exists and is not a bridge")));
    }
    for FamilyEnv { gateway, network, .. } in families {
        let family = if gateway.addr().is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let addresses = nl
            .addresses(bridge.index, family)
            .await
            .map_err(|e| CniError::io(format!("reading the addresses of {name}"), e))?;
        if !addresses.contains(gateway) {
            nl.add_address(bridge.index, *gateway).await.map_err(nl_err(format!("adding {gateway} to {name}")))?;
        }
        // A node renumbered: the old subnet's gateway (and its connected route) goes.
        for stale in addresses.iter().filter(|a| *a != gateway && network.contains(&a.addr())) {
            match nl.delete_address(bridge.index, *stale).await {
                Ok(()) => eprintln!("overlay-cni: removed {stale} from {name}: the node's subnet is now {gateway}"),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(nl_err(format!("removing the stale gateway {stale} from {name}"))(e)),
            }
        }
    }
    // NetworkPolicy between two pods of this node: their traffic is bridged,
    // and only br_netfilter shows it to overlayd's forward hook (docs/architecture.md).
    nl.set_bridge_netfilter(bridge.index, name, true)
        .await
        .map_err(nl_err(format!("passing {name}'s traffic through netfilter")))?;
    if !bridge.up {
        nl.set_up(bridge.index).await.map_err(nl_err(format!("setting {name} up")))?;
    }
    Ok(bridge)
}

/// Turns duplicate address detection off on a bridge we just made, before it
/// comes up. Its IPv6 link-local address is otherwise tentative for one to
/// two seconds, and the node cannot resolve a pod's address for forwarded
/// traffic until it is usable (neighbour solicitations need a link-local
/// source): a fresh node's first IPv6 packets to its pods would stall or
/// drop. The bridge's addresses are ours alone, so there is nothing to
/// detect. Best effort: without IPv6, or with a read-only /proc/sys, DAD
/// simply runs.
fn without_dad(bridge: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{bridge}/accept_dad"), "0");
}

/// Creates the veth pair with `ifname` already inside the container's
/// namespace, attaches the host end to the bridge (hairpin if asked) and sets it up.
pub async fn create_veth(
    nl: &Netlink,
    host: &str,
    ifname: &str,
    ns: &File,
    mtu: u32,
    bridge: &Link,
    hairpin: bool,
) -> Result<Link, CniError> {
    if let Some(stale) = find(nl, host).await? {
        // Left over from an attempt that died half-way: start clean.
        nl.delete_link(stale.index).await.map_err(nl_err(format!("removing stale {host}")))?;
    }
    nl.create_veth(host, ifname, ns.as_fd(), mtu).await.map_err(|e| {
        let hint = if e.is_exists() { " (is the interface name taken in the container?)" } else { "" };
        CniError::io(format!("creating veth {host} <-> {ifname}{hint}"), e)
    })?;
    let link = find(nl, host).await?.ok_or_else(|| CniError::new(code::IO, format!("veth {host} vanished")))?;
    nl.attach_up(link.index, bridge.index).await.map_err(nl_err(format!("attaching {host} to the bridge")))?;
    if hairpin {
        nl.set_hairpin(link.index, true).await.map_err(nl_err(format!("hairpin on {host}")))?;
    }
    Ok(link)
}

/// Removes a host link by name; a missing one is fine.
pub async fn delete_host_link(nl: &Netlink, name: &str) -> Result<(), CniError> {
    if let Some(link) = find(nl, name).await? {
        match nl.delete_link(link.index).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(CniError::io(format!("removing {name}"), e)),
        }
    }
    Ok(())
}

fn route(dst: IpNet, gw: IpAddr, oif: u32) -> Route {
    Route { destination: dst, gateway: Some(gw), oif: Some(oif), onlink: false, protocol: PROTOCOL_BOOT }
}

/// Inside the container: `ifname` up with `addresses`, loopback up, `routes` via their gateways.
pub fn configure_container(
    ns: &File,
    ifname: &str,
    addresses: &[IpNet],
    routes: &[(IpNet, IpAddr)],
) -> Result<Link, CniError> {
    in_netns(ns, |nl| async move {
        let link = find(&nl, ifname)
            .await?
            .ok_or_else(|| CniError::new(code::IO, format!("{ifname} missing in the container")))?;
        for address in addresses {
            nl.add_address(link.index, *address).await.map_err(nl_err(format!("adding {address} to {ifname}")))?;
        }
        nl.set_up(link.index).await.map_err(nl_err(format!("setting {ifname} up")))?;
        if let Some(lo) = find(&nl, "lo").await? {
            nl.set_up(lo.index).await.map_err(nl_err("setting lo up"))?;
        }
        for (dst, gw) in routes {
            nl.replace_route(&route(*dst, *gw, link.index))
                .await
                .map_err(nl_err(format!("adding route {dst} via {gw}")))?;
        }
        Ok(link)
    })
}

/// Inside the container: removes `ifname` (and with it the host end); missing is fine.
pub fn delete_in_container(ns: &File, ifname: &str) -> Result<(), CniError> {
    in_netns(ns, |nl| async move { delete_host_link(&nl, ifname).await })
}

/// What CHECK needs to see inside the container.
pub struct ContainerView {
    /// The interface, if present.
    pub link: Option<Link>,
    /// Its addresses, both families (not the kernel's link-local ones).
    pub addresses: Vec<IpNet>,
    /// Routes through it, both families: (destination, gateway).
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// Reads `ifname`'s addresses and routes inside the container.
pub fn inspect_container(ns: &File, ifname: &str) -> Result<ContainerView, CniError> {
    in_netns(ns, |nl| async move {
        let Some(link) = find(&nl, ifname).await? else {
            return Ok(ContainerView { link: None, addresses: vec![], routes: vec![] });
        };
        let mut addresses = Vec::new();
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            addresses.extend(
                nl.addresses(link.index, family)
                    .await
                    .map_err(|e| CniError::io("reading addresses", e))?
                    .into_iter()
                    .filter(|a| !proto::family::is_link_local(a.addr())),
            );
            routes.extend(
                nl.routes(family, Some(link.index))
                    .await
                    .map_err(|e| CniError::io("reading routes", e))?
                    .into_iter()
                    .map(|r| (r.destination, r.gateway)),
            );
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
        // A network namespace, but the plugin's own: the host's, never a pod's.
        let own = open_netns("/proc/self/ns/net").unwrap_err();
        assert_eq!(own.code, code::INVALID_ENV);
        assert!(own.msg.contains("own network namespace"), "{}", own.msg);
    }
}
