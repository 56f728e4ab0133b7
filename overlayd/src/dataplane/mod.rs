//! The kernel side: the VXLAN device and the per-peer entries, over netlink.

pub mod entries;
pub mod links;
pub mod netlink;
pub mod underlay;
pub mod vxlan;

use std::io;

use tracing::{debug, warn};

use crate::plan::{KernelState, Op};
pub use netlink::{Netlink, NetlinkError};
pub use underlay::Underlay;
pub use vxlan::DeviceSpec;

/// How an apply went: how many operations were sent and which failed.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Operations sent.
    pub sent: usize,
    /// Operations the kernel refused, with the reason.
    pub failed: Vec<(Op, io::Error)>,
}

/// Reads the overlay entries the kernel holds on the device.
pub fn read(nl: &mut Netlink, vxlan_index: u32) -> Result<KernelState, NetlinkError> {
    entries::read(nl, vxlan_index)
}

/// Sends `ops` in batches. A delete of something already gone counts as done.
pub fn apply(nl: &mut Netlink, vxlan_index: u32, ops: &[Op]) -> Result<ApplyReport, NetlinkError> {
    let requests = ops.iter().map(|op| entries::request(vxlan_index, op)).collect();
    let results = nl.batch(requests)?;
    let mut report = ApplyReport { sent: ops.len(), failed: Vec::new() };
    for (op, result) in ops.iter().zip(results) {
        match result {
            Ok(()) => debug!(?op, "applied"),
            Err(e) if is_delete(op) && matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) => {}
            Err(e) => {
                warn!(?op, error = %e, "kernel refused overlay entry");
                report.failed.push((*op, e));
            }
        }
    }
    Ok(report)
}

fn is_delete(op: &Op) -> bool {
    matches!(op, Op::DelNeighbour(..) | Op::DelFdb(..) | Op::DelRoute(..))
}

/// Sets `net.ipv4.ip_forward=1` in this network namespace.
pub fn enable_ip_forward() -> io::Result<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1")
}
