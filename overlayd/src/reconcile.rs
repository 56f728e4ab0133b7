//! One reconcile that owns the node. Every trigger (start, a watch event, a
//! requeue, a new lease) plans what the node must hold, purely, and hands it
//! here; each resource is then read, diffed with its plan and applied:
//! `ip_forward`, the VXLAN device, the peer entries, the masquerade table
//! and the subnet file. The outcome is an [`Action`], as with kube-runtime's
//! controller, and every failure goes through one error policy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use overlay_netlink::{Bulk, Netlink};
use proto::{Family, SubnetEnv};
use tracing::{debug, error, info};

use crate::backoff::Backoff;
use crate::dataplane::{device, entries, sysctl, DeviceSpec};
use crate::masq::{self, Masquerade};
use crate::metrics::{Metrics, Resource};
use crate::plan::{self, KernelState};
use crate::subnet_file;

/// What the node must hold, planned purely from what the daemon knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// One part per family, IPv4 first; a family that is off is planned
    /// too: as nothing (no device, no entries, no table).
    pub families: [FamilyPlan; 2],
    /// The subnet file's content.
    pub subnet_env: SubnetEnv,
}

/// What one family needs on the node. The same resources, planned and
/// reconciled by the same code, in both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan {
    /// The family.
    pub family: Family,
    /// The VXLAN device's name (`overlay.1`, `overlay-v6.1`).
    pub device_name: String,
    /// The device; none: the family is off, and no device of that name may exist.
    pub device: Option<DeviceSpec>,
    /// Every peer's neighbour, FDB entry and route (none when off).
    pub entries: KernelState,
    /// The masquerade table; none: no table.
    pub masquerade: Option<Masquerade>,
    /// The underlay interface, when the family is on: forwarding must be on then.
    pub forwarding: Option<String>,
}

impl FamilyPlan {
    /// A family that is off: nothing of it may remain on the node.
    pub fn off(family: Family, device_name: String) -> Self {
        FamilyPlan {
            family,
            device_name,
            device: None,
            entries: KernelState::default(),
            masquerade: None,
            forwarding: None,
        }
    }
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

/// The plan of each resource of one family after its last successful apply.
#[derive(Default)]
struct FamilyApplied {
    forwarding: Option<Option<String>>,
    /// The device spec (none: off) and its index.
    device: Option<(Option<DeviceSpec>, Option<u32>)>,
    entries: Option<(Option<u32>, KernelState)>,
    masquerade: Option<Option<Masquerade>>,
}

/// What the node held after the last successful apply of each resource.
#[derive(Default)]
struct Applied {
    families: [FamilyApplied; 2],
    subnet_env: Option<SubnetEnv>,
}

fn slot(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
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

        let NodePlan { families, subnet_env } = plan;
        self.metrics.peers.set(families.iter().map(|f| f.entries.routes.len()).max().unwrap_or(0) as i64);
        for family in &families {
            record(Resource::Forwarding(family.family), self.forwarding(family, read));
        }
        let mut masquerades = Vec::with_capacity(2);
        for family in families {
            let FamilyPlan { family, device_name, device, entries, masquerade, .. } = family;
            match self.device(family, &device_name, device.as_ref(), read).await {
                Ok(index) => {
                    let result = self.entries(family, index, entries, read).await;
                    record(Resource::Device(family), Ok(()));
                    record(Resource::Entries(family), result);
                }
                Err(e) => {
                    record(Resource::Device(family), Err(e));
                    record(Resource::Entries(family), Err(anyhow::anyhow!("not programmed: the device is not right")));
                }
            }
            masquerades.push((family, masquerade));
        }
        for (family, masquerade) in masquerades {
            record(Resource::Masquerade(family), self.masquerade(family, masquerade.as_ref(), read).await);
        }
        record(Resource::SubnetFile, self.subnet_file(&subnet_env, read).await);

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

    /// Forwarding of a family that is on; a family that is off leaves it as it is.
    fn forwarding(&mut self, plan: &FamilyPlan, read: bool) -> anyhow::Result<()> {
        let applied = &mut self.applied.families[slot(plan.family)].forwarding;
        if !read && applied.as_ref() == Some(&plan.forwarding) {
            return Ok(());
        }
        *applied = None;
        if let Some(underlay) = &plan.forwarding {
            if sysctl::ensure_forwarding(plan.family, Some(underlay))? {
                info!(family = %plan.family, "turned on forwarding");
            }
        }
        self.applied.families[slot(plan.family)].forwarding = Some(plan.forwarding.clone());
        Ok(())
    }

    /// The device's index once it is right; none when the family is off and the device gone.
    async fn device(
        &mut self,
        family: Family,
        name: &str,
        spec: Option<&DeviceSpec>,
        read: bool,
    ) -> anyhow::Result<Option<u32>> {
        let applied = &mut self.applied.families[slot(family)];
        if let Some((done, index)) = &applied.device {
            if !read && done.as_ref() == spec {
                return Ok(*index);
            }
        }
        applied.device = None;
        let Some(spec) = spec else {
            if device::remove(&self.nl, name).await? {
                info!(device = %name, %family, "removed the device of a family that is off");
            }
            self.applied.families[slot(family)].device = Some((None, None));
            return Ok(None);
        };
        let device = device::reconcile(&self.nl, spec).await?;
        self.metrics.netlink_ops.inc_by(device.changes as u64);
        let applied = &mut self.applied.families[slot(family)];
        if device.created {
            info!(device = %spec.name, "device (re)created; programming every peer");
            applied.entries = None;
        }
        applied.device = Some((Some(spec.clone()), Some(device.index)));
        Ok(Some(device.index))
    }

    async fn entries(
        &mut self,
        family: Family,
        index: Option<u32>,
        desired: KernelState,
        read: bool,
    ) -> anyhow::Result<()> {
        let assumed = match self.applied.families[slot(family)].entries.take() {
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
                    None => match entries::read(&mut bulk, index, family) {
                        Ok(state) => state,
                        // A family that is off may be off in the kernel too (ipv6.disable=1): nothing of it to remove.
                        Err(e) if index.is_none() && desired.entry_count() == 0 => {
                            debug!(%family, error = %e, "cannot read the routes of a family that is off");
                            KernelState::default()
                        }
                        Err(e) => return Err(e),
                    },
                };
                let ops = plan::diff(&desired, &actual);
                let report = entries::apply(&mut bulk, index.unwrap_or(0), &ops)?;
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
        if report.sent > 0 {
            info!(
                %family,
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
        self.applied.families[slot(family)].entries = Some((index, desired));
        Ok(())
    }

    async fn masquerade(&mut self, family: Family, desired: Option<&Masquerade>, read: bool) -> anyhow::Result<()> {
        let applied = &mut self.applied.families[slot(family)].masquerade;
        if !read && applied.as_ref() == Some(&desired.copied()) {
            return Ok(());
        }
        *applied = None;
        if masq::reconcile(family, desired, read).await? {
            match desired {
                Some(m) => info!(network = %m.network, subnet = %m.subnet, "masquerade rules (re)written"),
                None => info!(%family, "masquerade table removed"),
            }
        }
        self.applied.families[slot(family)].masquerade = Some(desired.copied());
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
            let subnets: Vec<String> = env.families().iter().map(|f| f.subnet().to_string()).collect();
            info!(path = %self.subnet_file.display(), subnets = %subnets.join(","), mtu = env.mtu, "wrote subnet file");
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

/// `overlayd cleanup`: removes both devices (and with them every peer entry
/// on them), our direct routes, our nftables tables and the subnet file.
pub async fn cleanup(device_names: &[(Family, &str)], subnet_file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let nl = Netlink::connect()?;
    let mut bulk = Bulk::open()?;
    let mut routes_left = 0;
    for (family, name) in device_names {
        if device::remove(&nl, name).await? {
            info!(device = %name, "removed VXLAN device and with it every peer entry");
        }
        // Direct routes live on the underlay, not on the device: remove them too.
        let state = match entries::read(&mut bulk, None, *family) {
            Ok(state) => state,
            Err(e) if *family == Family::V6 => {
                debug!(error = %e, "no IPv6 routes to read");
                KernelState::default()
            }
            Err(e) => return Err(e).context("reading overlay routes"),
        };
        let ops: Vec<_> = state.routes.iter().map(|(n, v)| plan::Op::DelRoute(*n, *v)).collect();
        if !ops.is_empty() {
            routes_left += entries::apply(&mut bulk, 0, &ops)?.failed.len();
        }
        masq::remove(*family).await.with_context(|| format!("removing {family} masquerade rules"))?;
    }
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

/// The subnet's network address as a host address (`10.244.33.0/32`,
/// `fd00:10:244:8::/128`): the VXLAN device's address, as flannel gives it.
pub fn device_address(subnet: IpNet) -> IpNet {
    Family::host(subnet.network())
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
        assert_eq!(device_address("fd00:10:244:8::/64".parse().unwrap()), "fd00:10:244:8::/128".parse().unwrap());
    }
}
