//! One reconcile that owns the node. Every trigger (start, a watch event, a
//! requeue, a new lease) plans what the node must hold, purely, and hands it
//! here; each resource is then read, diffed with its plan and applied:
//! `ip_forward`, the VXLAN device, the peer entries, the masquerade table
//! and the subnet file. The outcome is an [`Action`], as with kube-runtime's
//! controller, and every failure goes through one error policy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use overlay_netlink::{Bulk, Netlink};
use proto::SubnetEnv;
use tracing::{error, info};

use crate::backoff::Backoff;
use crate::dataplane::{device, entries, sysctl, DeviceSpec};
use crate::masq::{self, Masquerade};
use crate::metrics::{Metrics, Resource};
use crate::plan::{self, KernelState};
use crate::subnet_file;

/// What the node must hold, planned purely from what the daemon knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// The VXLAN device.
    pub device: DeviceSpec,
    /// Every peer's neighbour, FDB entry and route.
    pub entries: KernelState,
    /// The masquerade table; none: no table.
    pub masquerade: Option<Masquerade>,
    /// The subnet file's content.
    pub subnet_env: SubnetEnv,
}

/// Why a reconcile runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The daemon started.
    Start,
    /// Peers changed (a watch event).
    Peers,
    /// A requeue: the periodic resync, or a retry after a failure.
    Requeue,
    /// Our own lease was claimed again.
    Lease,
}

impl Trigger {
    /// Whether the node is read back (drift is found), or the last successful
    /// apply is trusted: a watch event costs O(change), not a dump of every entry.
    fn reads_node(self) -> bool {
        self != Trigger::Peers
    }
}

/// What happens next, as a reconcile decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until something changes (the next resync stays where it was).
    AwaitChange,
    /// Reconcile again, reading the whole node, after this long.
    Requeue(Duration),
}

/// The plan of each resource the node held after its last successful apply.
#[derive(Default)]
struct Applied {
    ip_forward: bool,
    device: Option<(DeviceSpec, u32)>,
    entries: Option<(u32, KernelState)>,
    masquerade: Option<Option<Masquerade>>,
    subnet_env: Option<SubnetEnv>,
}

/// A resource that could not be made right, and why.
struct Failure {
    resource: Resource,
    error: anyhow::Error,
}

/// A reconcile this large (operations, or entries read back) leaves megabytes of freed buffers behind.
const TRIM_AFTER: usize = 256;

/// Owns the node's state: reads, diffs and applies it.
pub struct Reconciler {
    nl: Netlink,
    /// The blocking socket, lent to a blocking thread for each bulk job.
    bulk: Option<Bulk>,
    subnet_file: PathBuf,
    resync: Duration,
    applied: Applied,
    backoff: Backoff,
    metrics: Arc<Metrics>,
}

impl Reconciler {
    /// A reconciler for this network namespace.
    pub fn new(nl: Netlink, subnet_file: PathBuf, resync: Duration, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let bulk = Bulk::open()?;
        Ok(Reconciler {
            nl,
            bulk: Some(bulk),
            subnet_file,
            resync,
            applied: Applied::default(),
            backoff: Backoff::with_max(Duration::from_secs(30).min(resync)),
            metrics,
        })
    }

    /// Makes the node hold `plan`. It takes the plan whole: what was applied
    /// is kept as the next event's starting point, not copied.
    pub async fn reconcile(&mut self, plan: NodePlan, trigger: Trigger) -> Action {
        let started = Instant::now();
        let read = trigger.reads_node();
        let mut failures = Vec::new();
        let mut outcomes = Vec::with_capacity(Resource::ALL.len());
        let mut record = |resource, result: anyhow::Result<()>| {
            outcomes.push((resource, result.is_ok()));
            if let Err(error) = result {
                failures.push(Failure { resource, error });
            }
        };

        record(Resource::IpForward, self.ip_forward(read));
        match self.device(&plan.device, read).await {
            Ok(index) => {
                let result = self.entries(index, plan.entries, read).await;
                record(Resource::Device, Ok(()));
                record(Resource::Entries, result);
            }
            Err(e) => {
                record(Resource::Device, Err(e));
                record(Resource::Entries, Err(anyhow::anyhow!("not programmed: the device is not right")));
            }
        }
        record(Resource::Masquerade, self.masquerade(plan.masquerade.as_ref(), read).await);
        record(Resource::SubnetFile, self.subnet_file(&plan.subnet_env, read).await);

        self.metrics.reconciled(started.elapsed(), &outcomes);
        if !failures.is_empty() {
            return self.error_policy(trigger, failures);
        }
        self.backoff.reset();
        if read {
            Action::Requeue(self.resync)
        } else {
            Action::AwaitChange
        }
    }

    /// The one place failures are handled: said, counted, and retried with backoff.
    fn error_policy(&mut self, trigger: Trigger, failures: Vec<Failure>) -> Action {
        let retry_in = self.backoff.next_delay();
        for f in &failures {
            error!(
                resource = f.resource.name(),
                ?trigger,
                retry_in_ms = retry_in.as_millis() as u64,
                error = format!("{:#}", f.error),
                "reconcile failed"
            );
        }
        Action::Requeue(retry_in)
    }

    fn ip_forward(&mut self, read: bool) -> anyhow::Result<()> {
        if !read && self.applied.ip_forward {
            return Ok(());
        }
        self.applied.ip_forward = false;
        if sysctl::ensure_ip_forward()? {
            info!("turned on net.ipv4.ip_forward");
        }
        self.applied.ip_forward = true;
        Ok(())
    }

    /// The device's index, once it is right.
    async fn device(&mut self, spec: &DeviceSpec, read: bool) -> anyhow::Result<u32> {
        if let Some((applied, index)) = &self.applied.device {
            if !read && applied == spec {
                return Ok(*index);
            }
        }
        self.applied.device = None;
        let device = device::reconcile(&self.nl, spec).await?;
        self.metrics.netlink_ops.inc_by(device.changes as u64);
        if device.created {
            info!(device = %spec.name, "device (re)created; programming every peer");
            self.applied.entries = None;
        }
        self.applied.device = Some((spec.clone(), device.index));
        Ok(device.index)
    }

    async fn entries(&mut self, index: u32, desired: KernelState, read: bool) -> anyhow::Result<()> {
        let assumed = match self.applied.entries.take() {
            Some((at, state)) if !read && at == index => Some(state),
            _ => None,
        };
        let read_entries = assumed.is_none();
        // A socket lost with a failed worker is opened anew.
        let mut bulk = match self.bulk.take() {
            Some(bulk) => bulk,
            None => Bulk::open()?,
        };
        let started = Instant::now();
        // The bulk socket blocks: it runs on a blocking thread and comes back, with the plan.
        let joined = tokio::task::spawn_blocking(move || {
            let result = (|| {
                let actual = match assumed {
                    Some(state) => state,
                    None => entries::read(&mut bulk, index)?,
                };
                let ops = plan::diff(&desired, &actual);
                let report = entries::apply(&mut bulk, index, &ops)?;
                Ok::<_, overlay_netlink::Error>((actual.entry_count(), report))
            })();
            (bulk, desired, result)
        })
        .await;
        let (bulk, desired, result) = joined.map_err(|e| anyhow::anyhow!("the entries worker failed: {e}"))?;
        self.bulk = Some(bulk);
        let (read_back, report) = result?;
        self.metrics.netlink_ops.inc_by(report.sent as u64);
        self.metrics.netlink_errors.inc_by(report.failed.len() as u64);
        self.metrics.peers.set(desired.routes.len() as i64);
        if report.sent > 0 {
            info!(
                ops = report.sent,
                failed = report.failed.len(),
                entries = desired.entry_count(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "dataplane updated"
            );
        }
        // A big apply, or a dump of a big table, leaves megabytes of freed buffers behind.
        if report.sent >= TRIM_AFTER || (read_entries && read_back >= TRIM_AFTER) {
            release_freed_memory();
        }
        if let Some((op, e)) = report.failed.first() {
            anyhow::bail!("{} of {} entries refused by the kernel, e.g. {op:?}: {e}", report.failed.len(), report.sent);
        }
        self.applied.entries = Some((index, desired));
        Ok(())
    }

    async fn masquerade(&mut self, desired: Option<&Masquerade>, read: bool) -> anyhow::Result<()> {
        if !read && self.applied.masquerade.as_ref() == Some(&desired.copied()) {
            return Ok(());
        }
        self.applied.masquerade = None;
        if masq::reconcile(desired, read).await? {
            match desired {
                Some(m) => info!(network = %m.network, subnet = %m.subnet, "masquerade rules (re)written"),
                None => info!("masquerade table removed"),
            }
        }
        self.applied.masquerade = Some(desired.copied());
        Ok(())
    }

    async fn subnet_file(&mut self, env: &SubnetEnv, read: bool) -> anyhow::Result<()> {
        if !read && self.applied.subnet_env.as_ref() == Some(env) {
            return Ok(());
        }
        self.applied.subnet_env = None;
        let path = self.subnet_file.clone();
        let owned = env.clone();
        // An fsync may wait on the disk: not on the runtime's thread.
        let written = tokio::task::spawn_blocking(move || subnet_file::write(&path, &owned))
            .await
            .map_err(|e| anyhow::anyhow!("the subnet file worker failed: {e}"))?
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", self.subnet_file.display()))?;
        if written {
            info!(path = %self.subnet_file.display(), subnet = %env.subnet, mtu = env.mtu, "wrote subnet file");
        }
        self.applied.subnet_env = Some(env.clone());
        Ok(())
    }
}

/// Hands freed heap back to the kernel. A big reconcile or listing peaks at a
/// few MiB of transient buffers that glibc would otherwise keep for good.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory of glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `overlayd cleanup`: removes the device (and with it every peer entry on
/// it), our direct routes, our nftables table and the subnet file.
pub async fn cleanup(device_name: &str, subnet_file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let nl = Netlink::connect()?;
    if device::remove(&nl, device_name).await? {
        info!(device = %device_name, "removed VXLAN device and with it every peer entry");
    }
    // Direct routes live on the underlay, not on the device: remove them too.
    let mut bulk = Bulk::open()?;
    let state = entries::read(&mut bulk, u32::MAX).context("reading overlay routes")?;
    let ops: Vec<_> = state.routes.iter().map(|(n, v)| plan::Op::DelRoute(*n, *v)).collect();
    let routes_left = if ops.is_empty() { 0 } else { entries::apply(&mut bulk, 0, &ops)?.failed.len() };
    masq::remove().await.context("removing masquerade rules")?;
    match std::fs::remove_file(subnet_file) {
        Ok(()) => info!(path = %subnet_file.display(), "removed subnet file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", subnet_file.display())),
    }
    if routes_left > 0 {
        anyhow::bail!("{routes_left} overlay routes could not be removed");
    }
    Ok(())
}

/// `<subnet>.0/32`: the VXLAN device's address, as flannel gives it.
pub fn device_address(subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new_assert(subnet.network(), 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_watch_events_trust_the_last_apply() {
        assert!(!Trigger::Peers.reads_node());
        for t in [Trigger::Start, Trigger::Requeue, Trigger::Lease] {
            assert!(t.reads_node(), "{t:?}");
        }
    }

    #[test]
    fn the_device_address_is_the_subnet_s_zero() {
        assert_eq!(device_address("10.244.33.0/24".parse().unwrap()), "10.244.33.0/32".parse().unwrap());
    }
}
