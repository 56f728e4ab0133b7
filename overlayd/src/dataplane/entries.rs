//! The peer entries as a resource: the plan's neighbours, FDB entries and
//! routes become netlink entries, are read back with filtered dumps, and are
//! written in batches. Blocking (the bulk socket): the reconcile runs these on
//! a blocking thread.

use overlay_netlink::{AddressFamily, Bulk, Change, Entry, FdbEntry, Neighbour, Route, RouteFilter};
use proto::{Address, Family, MacAddr};
use tracing::debug;

use crate::plan::{KernelState, Op, RouteVia};

/// The route protocol that marks our routes (`ip route` shows `proto 77`), so
/// reconciliation only ever touches routes this daemon made.
pub const ROUTE_PROTOCOL: u8 = 77;

/// The kernel's own routes (`proto kernel`: connected and link-local ones).
const PROTOCOL_KERNEL: u8 = 2;

/// How a route of ours leaves the node; none for a route that is not ours
/// (see `is_ours`) or has no gateway.
pub fn route_via<A: Address>(route: &Route, vxlan_index: Option<u32>) -> Option<RouteVia<A>> {
    if !is_ours(route, vxlan_index) {
        return None;
    }
    let gateway = route.gateway.and_then(A::from_ip)?;
    Some(if route.protocol != ROUTE_PROTOCOL {
        RouteVia::Adopted(gateway)
    } else if vxlan_index.is_some() && route.oif == vxlan_index && route.onlink {
        // Through the device and onlink: encapsulated.
        RouteVia::Vxlan(gateway)
    } else {
        // Anything else is a plain route, so one of ours on the device without
        // onlink differs from the plan and is replaced.
        RouteVia::Direct(gateway)
    })
}

/// Whether a route is ours to replace or delete: one we made (`proto 77`), or
/// one on our own VXLAN device that the kernel did not make. The second kind
/// is what flanneld left on the device we adopted from it; a route anywhere
/// else (the underlay's connected route, an operator's static route) is never ours.
pub fn is_ours(route: &Route, vxlan_index: Option<u32>) -> bool {
    route.protocol == ROUTE_PROTOCOL
        || (vxlan_index.is_some() && route.oif == vxlan_index && route.protocol != PROTOCOL_KERNEL)
}

/// The netlink entry an operation writes or removes.
fn change<A: Address>(vxlan_index: u32, op: &Op<A>) -> Change {
    let neighbour = |ip: A, mac| Entry::Neighbour(Neighbour { ifindex: vxlan_index, ip: ip.into(), mac });
    let fdb = |mac, dst: A| Entry::Fdb(FdbEntry { ifindex: vxlan_index, mac, dst: dst.into() });
    let route = |subnet, via| Entry::Route(route(vxlan_index, subnet, via));
    match *op {
        Op::SetNeighbour(ip, mac) => Change::Set(neighbour(ip, mac)),
        Op::DelNeighbour(ip, mac) => Change::Delete(neighbour(ip, mac)),
        Op::SetFdb(mac, dst) => Change::Set(fdb(mac, dst)),
        Op::DelFdb(mac, dst) => Change::Delete(fdb(mac, dst)),
        Op::SetRoute(subnet, via) => Change::Set(route(subnet, via)),
        Op::AddRoute(subnet, via) => Change::Add(route(subnet, via)),
        // Any protocol: a delete names a route read as ours, which may be one
        // flanneld made on the device we adopted (the kernel matches a set protocol).
        Op::DelRoute(subnet, via) => {
            Change::Delete(Entry::Route(Route { protocol: 0, ..self::route(vxlan_index, subnet, via) }))
        }
    }
}

fn route<A: Address>(vxlan_index: u32, subnet: A::Net, via: RouteVia<A>) -> Route {
    let (gateway, oif, onlink) = match via {
        // Encapsulated: `via <subnet>.0 dev overlay.1 onlink`.
        RouteVia::Vxlan(gateway) => (gateway, Some(vxlan_index), true),
        // DirectRouting: plain `via <peer's underlay address>`.
        RouteVia::Direct(gateway) => (gateway, None, false),
        // Only ever deleted, or replaced by a planned route.
        RouteVia::Adopted(gateway) => (gateway, Some(vxlan_index), false),
    };
    Route { destination: subnet.into(), gateway: Some(gateway.into()), oif, onlink, protocol: ROUTE_PROTOCOL }
}

/// How an apply went: how many operations were sent and which the kernel refused.
#[derive(Debug)]
pub struct ApplyReport<A: Address> {
    /// Operations sent.
    pub sent: usize,
    /// Operations the kernel refused, with the reason.
    pub failed: Vec<(Op<A>, overlay_netlink::Error)>,
}

impl<A: Address> ApplyReport<A> {
    /// Takes what the kernel refused out of `state` (the plan just applied),
    /// so it says what the node holds: a refused entry is retried by the next
    /// whole plan, and a route that is not ours is never taken for ours.
    pub fn unapplied(&self, state: &mut KernelState<A>) {
        for (op, _) in &self.failed {
            match *op {
                Op::SetNeighbour(ip, _) => drop(state.neighbours.remove(&ip)),
                Op::SetFdb(mac, _) => drop(state.fdb.remove(&mac)),
                Op::SetRoute(subnet, _) | Op::AddRoute(subnet, _) => drop(state.routes.remove(&subnet)),
                // A delete the kernel refused leaves an entry of ours that the plan no longer has:
                // the next read of the node finds it again.
                Op::DelNeighbour(..) | Op::DelFdb(..) | Op::DelRoute(..) => {}
            }
        }
    }
}

/// Sends `ops` in batches. A delete of something already gone counts as done.
pub fn apply<A: Address>(bulk: &mut Bulk, vxlan_index: u32, ops: &[Op<A>]) -> overlay_netlink::Result<ApplyReport<A>> {
    let changes: Vec<Change> = ops.iter().map(|op| change(vxlan_index, op)).collect();
    let results = bulk.apply(&changes)?;
    let mut report = ApplyReport { sent: ops.len(), failed: Vec::new() };
    for (op, result) in ops.iter().zip(results) {
        match result {
            Ok(()) => debug!(?op, "applied"),
            Err(e) => report.failed.push((*op, e)),
        }
    }
    Ok(report)
}

/// An operation in words, as `ip` would show its entry.
pub fn describe<A: Address>(op: &Op<A>) -> String {
    let via = |via: &RouteVia<A>| match via {
        RouteVia::Vxlan(gateway) => format!("via {gateway} onlink"),
        RouteVia::Direct(gateway) => format!("via {gateway}"),
        RouteVia::Adopted(gateway) => format!("via {gateway} (not made by overlayd)"),
    };
    match op {
        Op::SetNeighbour(ip, mac) => format!("set neighbour {ip} lladdr {mac}"),
        Op::DelNeighbour(ip, mac) => format!("delete neighbour {ip} lladdr {mac}"),
        Op::SetFdb(mac, dst) => format!("set FDB entry {mac} dst {dst}"),
        Op::DelFdb(mac, dst) => format!("delete FDB entry {mac} dst {dst}"),
        Op::SetRoute(subnet, v) => format!("replace route {subnet} {}", via(v)),
        Op::AddRoute(subnet, v) => format!("add route {subnet} {}", via(v)),
        Op::DelRoute(subnet, v) => format!("delete route {subnet} {}", via(v)),
    }
}

/// What a refused operation means, for the one line that says it.
pub fn refusal<A: Address>(op: &Op<A>, error: &overlay_netlink::Error) -> String {
    match op {
        Op::AddRoute(subnet, _) if error.is_exists() => {
            format!("a route to {subnet} that overlayd did not make is there (another proto, or the kernel's own): left alone, and this peer is not routed")
        }
        _ => error.to_string(),
    }
}

/// The netlink family of an IP family.
pub fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// Reads the overlay entries of the family of `A` the kernel holds for the
/// device `vxlan_index`; with `None` (no device), only our routes.
pub fn read<A: Address>(bulk: &mut Bulk, vxlan_index: Option<u32>) -> overlay_netlink::Result<KernelState<A>> {
    let mut state = KernelState::default();
    let family = address_family(A::FAMILY);
    if let Some(index) = vxlan_index {
        for (n, permanent) in bulk.neighbours(index, family)? {
            // The kernel's own entries (IPv6 multicast, link-local) are not ours to manage.
            if n.ip.is_multicast() || proto::family::is_link_local(n.ip) {
                continue;
            }
            let Some(ip) = A::from_ip(n.ip) else { continue };
            // A learned (non-permanent) entry is treated as absent so it gets replaced.
            let mac = if permanent { n.mac } else { MacAddr([0; 6]) };
            state.neighbours.insert(ip, mac);
        }
        for f in bulk.fdb(index)? {
            if let Some(dst) = A::from_ip(f.dst) {
                state.fdb.insert(f.mac, dst);
            }
        }
    }
    // Ours, and whatever else is on our device (flanneld's, on the device we adopted).
    let mut routes = bulk.routes(family, RouteFilter::Protocol(ROUTE_PROTOCOL))?;
    if let Some(index) = vxlan_index {
        routes.extend(
            bulk.routes(family, RouteFilter::Device(index))?.into_iter().filter(|r| r.protocol != ROUTE_PROTOCOL),
        );
    }
    for r in routes {
        if let (Some(subnet), Some(via)) = (A::net_from(r.destination), route_via(&r, vxlan_index)) {
            state.routes.insert(subnet, via);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn route(oif: u32, protocol: u8, onlink: bool) -> Route {
        Route {
            destination: "10.244.7.0/24".parse().unwrap(),
            gateway: Some("10.244.7.0".parse().unwrap()),
            oif: Some(oif),
            onlink,
            protocol,
        }
    }

    #[test]
    fn only_our_routes_and_those_on_our_device_are_ours() {
        let device = Some(5);
        let via = |r: &Route| route_via::<Ipv4Addr>(r, device);
        let gateway = Ipv4Addr::new(10, 244, 7, 0);
        assert_eq!(via(&route(5, ROUTE_PROTOCOL, true)), Some(RouteVia::Vxlan(gateway)));
        assert_eq!(via(&route(5, ROUTE_PROTOCOL, false)), Some(RouteVia::Direct(gateway)));
        // flanneld's route on the device we adopted (proto boot).
        assert_eq!(via(&route(5, 3, true)), Some(RouteVia::Adopted(gateway)));
        // Elsewhere: an operator's static route, the underlay's connected one, the kernel's own.
        assert_eq!(via(&route(2, 3, false)), None);
        assert_eq!(via(&route(2, PROTOCOL_KERNEL, false)), None);
        assert_eq!(via(&route(5, PROTOCOL_KERNEL, false)), None);
        assert_eq!(route_via::<Ipv4Addr>(&route(5, 3, true), None), None, "no device, nothing adopted");
    }

    #[test]
    fn a_delete_matches_any_protocol_and_a_write_is_marked_ours() {
        let subnet = "10.244.7.0/24".parse().unwrap();
        let gateway = Ipv4Addr::new(10, 244, 7, 0);
        let Change::Delete(Entry::Route(del)) = change(5, &Op::DelRoute(subnet, RouteVia::Adopted(gateway))) else {
            panic!("a delete")
        };
        assert_eq!(del.protocol, 0);
        let Change::Set(Entry::Route(set)) = change(5, &Op::SetRoute(subnet, RouteVia::Vxlan(gateway))) else {
            panic!("a replace")
        };
        assert_eq!((set.protocol, set.oif, set.onlink), (ROUTE_PROTOCOL, Some(5), true));
    }
}
