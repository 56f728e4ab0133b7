//! The peer entries as a resource: the plan's neighbours, FDB entries and
//! routes become netlink entries, are read back with filtered dumps, and are
//! written in batches. Blocking (the bulk socket): the reconcile runs these on
//! a blocking thread.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use overlay_netlink::{AddressFamily, Bulk, Change, Entry, FdbEntry, Neighbour, Route};
use proto::MacAddr;
use tracing::{debug, warn};

use crate::plan::{KernelState, Op, RouteVia};

/// The route protocol that marks our routes (`ip route` shows `proto 77`), so
/// reconciliation only ever touches routes this daemon made.
pub const ROUTE_PROTOCOL: u8 = 77;

/// The netlink entry an operation writes or removes.
fn change(vxlan_index: u32, op: &Op) -> Change {
    let neighbour = |ip: Ipv4Addr, mac| Entry::Neighbour(Neighbour { ifindex: vxlan_index, ip: IpAddr::V4(ip), mac });
    let fdb = |mac, dst: Ipv4Addr| Entry::Fdb(FdbEntry { ifindex: vxlan_index, mac, dst: IpAddr::V4(dst) });
    let route = |subnet: Ipv4Net, via| Entry::Route(route(vxlan_index, subnet, via));
    match *op {
        Op::SetNeighbour(ip, mac) => Change::Set(neighbour(ip, mac)),
        Op::DelNeighbour(ip, mac) => Change::Delete(neighbour(ip, mac)),
        Op::SetFdb(mac, dst) => Change::Set(fdb(mac, dst)),
        Op::DelFdb(mac, dst) => Change::Delete(fdb(mac, dst)),
        Op::SetRoute(subnet, via) => Change::Set(route(subnet, via)),
        Op::DelRoute(subnet, via) => Change::Delete(route(subnet, via)),
    }
}

fn route(vxlan_index: u32, subnet: Ipv4Net, via: RouteVia) -> Route {
    let (gateway, oif, onlink) = match via {
        // Encapsulated: `via <subnet>.0 dev overlay.1 onlink`.
        RouteVia::Vxlan(gateway) => (gateway, Some(vxlan_index), true),
        // DirectRouting: plain `via <peer's underlay address>`.
        RouteVia::Direct(gateway) => (gateway, None, false),
    };
    Route { destination: IpNet::V4(subnet), gateway: Some(IpAddr::V4(gateway)), oif, onlink, protocol: ROUTE_PROTOCOL }
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

/// Reads the overlay entries the kernel holds for the device `vxlan_index`
/// (all of our routes, with `u32::MAX`).
pub fn read(bulk: &mut Bulk, vxlan_index: u32) -> overlay_netlink::Result<KernelState> {
    let mut state = KernelState::default();
    for (n, permanent) in bulk.neighbours(vxlan_index, AddressFamily::Inet)? {
        let IpAddr::V4(ip) = n.ip else { continue };
        // A learned (non-permanent) entry is treated as absent so it gets replaced.
        let mac = if permanent { n.mac } else { MacAddr([0; 6]) };
        state.neighbours.insert(ip, mac);
    }
    for f in bulk.fdb(vxlan_index)? {
        if let IpAddr::V4(dst) = f.dst {
            state.fdb.insert(f.mac, dst);
        }
    }
    for r in bulk.routes(AddressFamily::Inet, ROUTE_PROTOCOL)? {
        let (IpNet::V4(subnet), Some(IpAddr::V4(gateway))) = (r.destination, r.gateway) else { continue };
        let via = match (r.oif == Some(vxlan_index), r.onlink) {
            (true, true) => RouteVia::Vxlan(gateway),
            // Ours, but not onlink: report it so the diff replaces it.
            (true, false) => RouteVia::Vxlan(Ipv4Addr::UNSPECIFIED),
            (false, _) => RouteVia::Direct(gateway),
        };
        state.routes.insert(subnet, via);
    }
    Ok(state)
}
