//! The peer entries as a resource: the plan's neighbours, FDB entries and
//! routes become netlink entries, are read back with filtered dumps, and are
//! written in batches. Blocking (the bulk socket): the reconcile runs these on
//! a blocking thread.

use overlay_netlink::{AddressFamily, Bulk, Change, Entry, FdbEntry, Neighbour, Route};
use proto::{Family, MacAddr};

use ipnet::IpNet;
use tracing::{debug, warn};

use crate::plan::{KernelState, Op, RouteVia};

/// The route protocol that marks our routes (`ip route` shows `proto 77`), so
/// reconciliation only ever touches routes this daemon made.
pub const ROUTE_PROTOCOL: u8 = 77;

/// The netlink entry an operation writes or removes.
fn change(vxlan_index: u32, op: &Op) -> Change {
    let neighbour = |ip, mac| Entry::Neighbour(Neighbour { ifindex: vxlan_index, ip, mac });
    let fdb = |mac, dst| Entry::Fdb(FdbEntry { ifindex: vxlan_index, mac, dst });
    let route = |subnet, via| Entry::Route(route(vxlan_index, subnet, via));
    match *op {
        Op::SetNeighbour(ip, mac) => Change::Set(neighbour(ip, mac)),
        Op::DelNeighbour(ip, mac) => Change::Delete(neighbour(ip, mac)),
        Op::SetFdb(mac, dst) => Change::Set(fdb(mac, dst)),
        Op::DelFdb(mac, dst) => Change::Delete(fdb(mac, dst)),
        Op::SetRoute(subnet, via) => Change::Set(route(subnet, via)),
        Op::DelRoute(subnet, via) => Change::Delete(route(subnet, via)),
    }
}

fn route(vxlan_index: u32, subnet: IpNet, via: RouteVia) -> Route {
    let (gateway, oif, onlink) = match via {
        // Encapsulated: `via <subnet>.0 dev overlay.1 onlink`.
        RouteVia::Vxlan(gateway) => (gateway, Some(vxlan_index), true),
        // DirectRouting: plain `via <peer's underlay address>`.
        RouteVia::Direct(gateway) => (gateway, None, false),
    };
    Route { destination: subnet, gateway: Some(gateway), oif, onlink, protocol: ROUTE_PROTOCOL }
}

/// How an apply went: how many operations were sent and which the kernel refused.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Operations sent.
    pub sent: usize,
    /// Operations the kernel refused, with the reason.
    pub failed: Vec<(Op, overlay_netlink::Error)>,
}

/// Sends `ops` in batches. A delete of something already gone counts as done.
pub fn apply(bulk: &mut Bulk, vxlan_index: u32, ops: &[Op]) -> overlay_netlink::Result<ApplyReport> {
    let changes: Vec<Change> = ops.iter().map(|op| change(vxlan_index, op)).collect();
    let results = bulk.apply(&changes)?;
    let mut report = ApplyReport { sent: ops.len(), failed: Vec::new() };
    for (op, result) in ops.iter().zip(results) {
        match result {
            Ok(()) => debug!(?op, "applied"),
            Err(e) => {
                warn!(?op, error = %e, "kernel refused overlay entry");
                report.failed.push((*op, e));
            }
        }
    }
    Ok(report)
}

/// The netlink family of an IP family.
pub fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// Reads the overlay entries of `family` the kernel holds for the device
/// `vxlan_index`; with `None` (no device), only our routes.
pub fn read(bulk: &mut Bulk, vxlan_index: Option<u32>, family: Family) -> overlay_netlink::Result<KernelState> {
    let mut state = KernelState::default();
    if let Some(index) = vxlan_index {
        for (n, permanent) in bulk.neighbours(index, address_family(family))? {
            if Family::of(n.ip) != family {
                continue;
            }
            // A learned (non-permanent) entry is treated as absent so it gets replaced.
            let mac = if permanent { n.mac } else { MacAddr([0; 6]) };
            state.neighbours.insert(n.ip, mac);
        }
        for f in bulk.fdb(index)? {
            if Family::of(f.dst) == family {
                state.fdb.insert(f.mac, f.dst);
            }
        }
    }
    for r in bulk.routes(address_family(family), ROUTE_PROTOCOL)? {
        let (subnet, Some(gateway)) = (r.destination, r.gateway) else { continue };
        if Family::of_net(&subnet) != family {
            continue;
        }
        let via = match (vxlan_index.is_some() && r.oif == vxlan_index, r.onlink) {
            (true, true) => RouteVia::Vxlan(gateway),
            // Ours, but not onlink: report it so the diff replaces it.
            (true, false) => RouteVia::Vxlan(family.unspecified()),
            (false, _) => RouteVia::Direct(gateway),
        };
        state.routes.insert(subnet, via);
    }
    Ok(state)
}
