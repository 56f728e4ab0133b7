//! One reconcile that owns the node. Every trigger (start, a watch event, a
//! requeue, a new lease) plans what the node must hold, purely, and hands it
//! here; each resource is then read, diffed with its plan and applied:
//! `ip_forward`, the VXLAN device, the peer entries, the masquerade table
//! and the subnet file. The outcome is an [`Action`], as with kube-runtime's
//! controller, and every failure goes through one error policy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::{Ipv4Addr, Ipv6Addr};

use overlay_netlink::{Bulk, KernelEvent, Netlink, NFPROTO_IPV4, NFPROTO_IPV6};
use proto::{Address, Family, SubnetEnv};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::dataplane::masq::{self, Masquerade};
use crate::dataplane::subnet_file;
use crate::dataplane::{device, entries, sysctl, DeviceSpec};
use crate::node_plan::{EntriesPlan, FamilyPlan, NodePlan};
use crate::node_state::{Cause, NodeState, Resource};
use crate::plan::{self, KernelState, Planned};

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
    /// The kernel reported a change that is not what we applied (drift).
    Kernel,
    /// Kernel events were lost: anything may have changed, so the whole node is read back.
    Resync,
    /// News of the underlay that left it as it was (a route via it added or
    /// removed): the node is read back, and whatever differs drifted.
    Recheck,
    /// A watch event's changes could not be applied one by one (two peers
    /// claim one entry, or the entries were not applied): plan them whole,
    /// trusting what was applied.
    Replan,
}

impl Trigger {
    /// Whether the node is read back (drift is found), or the last successful
    /// apply is trusted: a watch event costs O(change), not a dump of every entry.
    fn reads_node(self) -> bool {
        !matches!(self, Trigger::Peers | Trigger::Replan)
    }
}

/// What happens next, as a reconcile decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until something changes (the next resync stays where it was).
    AwaitChange,
    /// Reconcile again, reading the whole node, after this long.
    Requeue(Duration),
    /// Plan again at once, whole: the changes planned could not be applied one by one.
    Replan,
}

/// The plan of each resource of one family after its last successful apply.
pub struct FamilyApplied<A: Address> {
    forwarding: Option<Option<String>>,
    /// The device spec (none: off) and its index.
    device: Option<(Option<DeviceSpec>, Option<u32>)>,
    entries: Option<(Option<u32>, Planned<A>)>,
    masquerade: Option<Option<Masquerade>>,
}

impl<A: Address> FamilyApplied<A> {
    /// Which resource `event` shows to differ from what was applied, if any.
    /// Our own writes match what was applied, so they are no drift; nor is
    /// anything about entries that are not ours (another device, another
    /// route protocol, a subnet that is not a peer's). Resources whose last
    /// apply failed have nothing recorded here: their retry is already due.
    fn drift(&self, event: &KernelEvent) -> Option<Resource> {
        let family = A::FAMILY;
        let device = match &self.device {
            Some((Some(spec), Some(index))) => Some((spec, *index)),
            _ => None,
        };
        let entries = self.entries.as_ref().map(|(_, planned)| &planned.state);
        let on_device = |ifindex: u32| device.is_some_and(|(_, ours)| ours == ifindex);
        let wrong = match event {
            // Lost events are no one resource's drift: the whole node is read back (`drift`).
            KernelEvent::Overflow => return None,
            KernelEvent::Link { index, name, up, mtu, mac, gone } => {
                let (spec, ours) = device?;
                if *index != ours {
                    // Another device. One of our name that appeared took our device's
                    // place; one of our name that went is the old device a recreate removed.
                    return (*name == spec.name && !gone).then_some(Resource::Device(family));
                }
                *gone || !up || mtu.is_some_and(|m| m != spec.mtu) || mac.is_some_and(|m| m != spec.mac)
            }
            KernelEvent::Address { index, gone } => *gone && on_device(*index),
            KernelEvent::Neighbour { entry, permanent, gone } => {
                let desired = entries?.neighbours.get(&A::from_ip(entry.ip)?)?;
                on_device(entry.ifindex) && (*gone || !permanent || entry.mac != *desired)
            }
            KernelEvent::Fdb { entry, gone } => {
                let desired = entries?.fdb.get(&entry.mac)?;
                on_device(entry.ifindex) && (*gone || A::from_ip(entry.dst) != Some(*desired))
            }
            KernelEvent::Route { route, gone } => {
                let desired = entries?.routes.get(&A::net_from(route.destination)?)?;
                let via = entries::route_via::<A>(route, device.map(|(_, index)| index));
                if *gone {
                    via.is_some()
                } else {
                    via != Some(*desired)
                }
            }
            KernelEvent::Nft { family: nf, table, gone } => {
                let ours = match family {
                    Family::V4 => NFPROTO_IPV4,
                    Family::V6 => NFPROTO_IPV6,
                };
                *gone && *nf == ours && table == masq::TABLE && matches!(self.masquerade, Some(Some(_)))
            }
        };
        let resource = match event {
            KernelEvent::Link { .. } | KernelEvent::Address { .. } => Resource::Device(family),
            KernelEvent::Nft { .. } => Resource::Masquerade(family),
            _ => Resource::Entries(family),
        };
        wrong.then_some(resource)
    }
}

impl<A: Address> Default for FamilyApplied<A> {
    fn default() -> Self {
        FamilyApplied { forwarding: None, device: None, entries: None, masquerade: None }
    }
}

/// What the node held after the last successful apply of each resource.
#[derive(Default)]
pub struct Applied {
    v4: FamilyApplied<Ipv4Addr>,
    v6: FamilyApplied<Ipv6Addr>,
    subnet_env: Option<SubnetEnv>,
}

/// Where a family's applied state is kept.
pub trait Slot: Address {
    #[doc(hidden)]
    fn slot(applied: &mut Applied) -> &mut FamilyApplied<Self>;
    #[doc(hidden)]
    fn slot_ref(applied: &Applied) -> &FamilyApplied<Self>;
}

impl Slot for Ipv4Addr {
    fn slot(applied: &mut Applied) -> &mut FamilyApplied<Self> {
        &mut applied.v4
    }
    fn slot_ref(applied: &Applied) -> &FamilyApplied<Self> {
        &applied.v4
    }
}

impl Slot for Ipv6Addr {
    fn slot(applied: &mut Applied) -> &mut FamilyApplied<Self> {
        &mut applied.v6
    }
    fn slot_ref(applied: &Applied) -> &FamilyApplied<Self> {
        &applied.v6
    }
}

/// A resource that could not be made right, and why.
struct Failure {
    resource: Resource,
    error: anyhow::Error,
}

/// How a family's entries came out.
enum Entries {
    /// The plan is what the node holds (but for entries the kernel refused).
    Applied,
    /// The changes planned could not be applied one by one: plan them whole.
    PlanWhole,
}

use crate::memory::{release_freed_memory, TRIM_AFTER};

/// Owns the node's state: reads, diffs and applies it.
pub struct Reconciler {
    nl: Netlink,
    /// The blocking socket, lent to a blocking thread for each bulk job.
    bulk: Option<Bulk>,
    subnet_file: PathBuf,
    resync: Duration,
    applied: Applied,
    backoff: Backoff,
    state: Arc<NodeState>,
    /// The resources this reconcile had to change: on a resync, each was a repair.
    changed: Vec<Resource>,
    /// Whether the last reconcile failed: then the next requeue is its retry, not a resync.
    retrying: bool,
    /// Changes of peers could not be applied one by one: the next plan must be whole.
    plan_whole: bool,
    /// The entries the kernel refused at the last apply of each family (IPv4,
    /// IPv6), in words: each is said once, not at every resync that retries it.
    refused: [std::collections::BTreeSet<String>; 2],
}

impl Reconciler {
    /// A reconciler for this network namespace.
    pub fn new(nl: Netlink, subnet_file: PathBuf, resync: Duration, state: Arc<NodeState>) -> anyhow::Result<Self> {
        let bulk = Bulk::open()?;
        Ok(Reconciler {
            nl,
            bulk: Some(bulk),
            subnet_file,
            resync,
            applied: Applied::default(),
            refused: Default::default(),
            backoff: Backoff::with_max(Duration::from_secs(30).min(resync)),
            state,
            changed: Vec::new(),
            retrying: false,
            plan_whole: false,
        })
    }

    /// The resource a kernel event shows to have drifted from what was last
    /// applied, if any: a reconcile is due then, not at the next resync.
    pub fn drift(&self, event: &KernelEvent) -> Option<Resource> {
        self.applied.v4.drift(event).or_else(|| self.applied.v6.drift(event))
    }

    /// The plan of the family's entries the node held after the last successful apply.
    fn planned<A: Slot>(&self) -> Option<&Planned<A>> {
        A::slot_ref(&self.applied).entries.as_ref().map(|(_, planned)| planned)
    }

    /// How many peer entries the node holds, both families, after the last apply.
    pub fn entry_count(&self) -> usize {
        self.planned::<Ipv4Addr>().map_or(0, |p| p.state.entry_count())
            + self.planned::<Ipv6Addr>().map_or(0, |p| p.state.entry_count())
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

        let NodePlan { v4, v6, subnet_env } = plan;
        let mut results = Vec::with_capacity(Resource::ALL.len());
        results.extend(self.family(v4, read).await);
        results.extend(self.family(v6, read).await);
        results.push((Resource::SubnetFile, self.subnet_file(&subnet_env, read).await));
        for (resource, result) in results {
            record(resource, result);
        }
        if let (Some(v4), Some(v6)) = (self.planned::<Ipv4Addr>(), self.planned::<Ipv6Addr>()) {
            self.state.metrics.peers.set(v4.state.routes.len().max(v6.state.routes.len()) as i64);
        }

        self.state.reconciled(started.elapsed(), &outcomes);
        // A read of the node that no event asked for (the resync, or lost
        // kernel events) found what drifted unreported: each change was a
        // repair. (A retry after a failure is a requeue too, but it finishes
        // its own work.)
        let unreported = match trigger {
            Trigger::Requeue if !self.retrying => Some(Cause::Resync),
            Trigger::Resync => Some(Cause::LostEvents),
            Trigger::Recheck => Some(Cause::Kernel),
            _ => None,
        };
        for resource in std::mem::take(&mut self.changed) {
            if let (Some(cause), true) = (unreported, failures.is_empty()) {
                info!(
                    resource = resource.name(),
                    cause = cause.name(),
                    "the node drifted from what was applied; repaired"
                );
                self.state.repaired(cause, resource);
            }
        }
        self.retrying = !failures.is_empty();
        let plan_whole = std::mem::take(&mut self.plan_whole);
        if !failures.is_empty() {
            return self.error_policy(trigger, failures);
        }
        self.backoff.reset();
        if plan_whole {
            return Action::Replan;
        }
        if read {
            Action::Requeue(self.resync)
        } else {
            Action::AwaitChange
        }
    }

    /// The one place failures are handled: said, counted, and retried with backoff.
    fn error_policy(&mut self, trigger: Trigger, failures: Vec<Failure>) -> Action {
        let retry_in = self.backoff.next_delay();
        self.state.metrics.retries.inc();
        if let Some(f) = failures.first() {
            let what = format!("{}: {:#}", f.resource.name(), f.error);
            self.state.failed(what);
        }
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

    /// Every resource of one family, in order: forwarding, the device, the
    /// entries (only once the device is right), the masquerade table.
    async fn family<A: Slot>(&mut self, plan: FamilyPlan<A>, read: bool) -> [(Resource, anyhow::Result<()>); 4] {
        let family = A::FAMILY;
        let FamilyPlan { device_name, device, entries, masquerade, forwarding } = plan;
        let forwarded = self.forwarding::<A>(forwarding, read).await;
        let (device_result, entries_result) = match self.device::<A>(&device_name, device.as_ref(), read).await {
            Ok(index) => {
                let entries = self.entries::<A>(index, entries, read).await;
                self.plan_whole |= matches!(entries, Ok(Entries::PlanWhole));
                (Ok(()), entries.map(|_| ()))
            }
            Err(e) => {
                // The entries are not applied: the next plan of them must be whole, not a delta
                // against a plan the node never got.
                A::slot(&mut self.applied).entries = None;
                (Err(e), Err(anyhow::anyhow!("not programmed: the device is not right")))
            }
        };
        let masqueraded = self.masquerade::<A>(masquerade.as_ref(), read).await;
        [
            (Resource::Forwarding(family), forwarded),
            (Resource::Device(family), device_result),
            (Resource::Entries(family), entries_result),
            (Resource::Masquerade(family), masqueraded),
        ]
    }

    /// Forwarding of a family that is on (`forwarding`: the underlay); a family that is off leaves it as it is.
    async fn forwarding<A: Slot>(&mut self, forwarding: Option<String>, read: bool) -> anyhow::Result<()> {
        let applied = &mut A::slot(&mut self.applied).forwarding;
        if !read && applied.as_ref() == Some(&forwarding) {
            return Ok(());
        }
        *applied = None;
        if let Some(underlay) = forwarding.clone() {
            // /proc writes: on a blocking thread, not the runtime's.
            let changed = tokio::task::spawn_blocking(move || sysctl::ensure_forwarding(A::FAMILY, Some(&underlay)))
                .await
                .map_err(|e| anyhow::anyhow!("the sysctl worker failed: {e}"))??;
            if changed {
                self.changed.push(Resource::Forwarding(A::FAMILY));
                info!(family = %A::FAMILY, "turned on forwarding");
            }
        }
        A::slot(&mut self.applied).forwarding = Some(forwarding);
        Ok(())
    }

    /// The device's index once it is right; none when the family is off and the device gone.
    async fn device<A: Slot>(
        &mut self,
        name: &str,
        spec: Option<&DeviceSpec>,
        read: bool,
    ) -> anyhow::Result<Option<u32>> {
        let applied = A::slot(&mut self.applied);
        if let Some((done, index)) = &applied.device {
            if !read && done.as_ref() == spec {
                return Ok(*index);
            }
        }
        applied.device = None;
        let Some(spec) = spec else {
            if device::remove(&self.nl, name).await? {
                info!(device = %name, family = %A::FAMILY, "removed the device of a family that is off");
            }
            A::slot(&mut self.applied).device = Some((None, None));
            return Ok(None);
        };
        let device = device::reconcile(&self.nl, spec).await?;
        self.state.metrics.netlink_ops.inc_by(device.changes as u64);
        if device.changes > 0 {
            self.changed.push(Resource::Device(A::FAMILY));
        }
        let applied = A::slot(&mut self.applied);
        if device.created {
            info!(device = %spec.name, "device (re)created; programming every peer");
            applied.entries = None;
        }
        applied.device = Some((Some(spec.clone()), Some(device.index)));
        Ok(Some(device.index))
    }

    async fn entries<A: Slot>(
        &mut self,
        index: Option<u32>,
        plan: EntriesPlan<A>,
        read: bool,
    ) -> anyhow::Result<Entries> {
        let family = A::FAMILY;
        let applied = match A::slot(&mut self.applied).entries.take() {
            Some((at, planned)) if !read && at == index => Some(planned),
            _ => None,
        };
        // A whole plan is diffed with what the node holds: read back, or as
        // last applied. Changes become a delta of what was applied, and its
        // operations are the diff of its own entries.
        let (planned, assumed, delta_ops) = match (plan, applied) {
            (EntriesPlan::Whole(planned), assumed) => (planned, assumed.map(|p| p.state), None),
            (EntriesPlan::Changes(local, changes), Some(mut planned)) => {
                let Some(delta) = plan::delta(&local, &planned, changes) else {
                    // Two peers claim one entry: only a whole plan can say who has it.
                    A::slot(&mut self.applied).entries = Some((index, planned));
                    return Ok(Entries::PlanWhole);
                };
                let ops = delta.ops();
                delta.apply_to(&mut planned.state);
                planned.local = Some(local);
                (planned, None, Some(ops))
            }
            (EntriesPlan::Changes(..), None) => return Ok(Entries::PlanWhole),
        };
        let read_entries = assumed.is_none() && delta_ops.is_none();
        let whole = delta_ops.is_none();
        // A socket lost with a failed worker is opened anew.
        let mut bulk = match self.bulk.take() {
            Some(bulk) => bulk,
            None => Bulk::open()?,
        };
        let started = Instant::now();
        // The bulk socket blocks: it runs on a blocking thread and comes back, with the plan.
        let joined = tokio::task::spawn_blocking(move || {
            let result = (|| {
                let (ops, read_back) = match delta_ops {
                    Some(ops) => (ops, 0),
                    None => {
                        let actual = match assumed {
                            Some(state) => state,
                            None => match entries::read::<A>(&mut bulk, index) {
                                Ok(state) => state,
                                // A family that is off may be off in the kernel too (ipv6.disable=1): nothing of it to remove.
                                Err(e) if index.is_none() && planned.state.entry_count() == 0 => {
                                    debug!(%family, error = %e, "cannot read the routes of a family that is off");
                                    KernelState::default()
                                }
                                Err(e) => return Err(e),
                            },
                        };
                        (plan::diff(&planned.state, &actual), actual.entry_count())
                    }
                };
                let report = entries::apply(&mut bulk, index.unwrap_or(0), &ops)?;
                Ok::<_, overlay_netlink::Error>((read_back, report))
            })();
            (bulk, planned, result)
        })
        .await;
        let (bulk, planned, result) = joined.map_err(|e| anyhow::anyhow!("the entries worker failed: {e}"))?;
        self.bulk = Some(bulk);
        let (read_back, report) = result?;
        self.state.metrics.netlink_ops.inc_by(report.sent as u64);
        self.state.metrics.netlink_errors.inc_by(report.failed.len() as u64);
        if report.sent > 0 {
            self.changed.push(Resource::Entries(family));
            info!(
                %family,
                ops = report.sent,
                failed = report.failed.len(),
                entries = planned.state.entry_count(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "dataplane updated"
            );
        }
        // A big apply, or a dump of a big table, leaves megabytes of freed buffers behind.
        if report.sent >= TRIM_AFTER || (read_entries && read_back >= TRIM_AFTER) {
            release_freed_memory();
        }
        // One peer's entries the kernel refuses (a route that is not ours in
        // the way) must not keep the others out, nor make the node unready:
        // they are left out of what is applied, said once, and counted.
        let mut planned = planned;
        report.unapplied(&mut planned.state);
        self.say_refused(family, &report, whole);
        let state = &planned.state;
        self.state.metrics.entries_held(family, state.neighbours.len(), state.fdb.len(), state.routes.len());
        A::slot(&mut self.applied).entries = Some((index, planned));
        Ok(Entries::Applied)
    }

    /// Says each entry the kernel refused that it did not refuse before.
    fn say_refused<A: Address>(&mut self, family: Family, report: &entries::ApplyReport<A>, whole: bool) {
        let refused = &mut self.refused[family as usize];
        let now: std::collections::BTreeSet<String> = report
            .failed
            .iter()
            .map(|(op, e)| format!("{}: {}", entries::describe(op), entries::refusal(op, e)))
            .collect();
        for line in now.difference(refused) {
            warn!(%family, refused = %line, "the kernel refused an entry of a peer; the others are programmed");
        }
        // A whole plan retries every entry: what it did not refuse again is no longer refused.
        if whole {
            *refused = now;
        } else {
            refused.extend(now);
        }
        self.state.metrics.entries_refused.set(self.refused.iter().map(|r| r.len() as i64).sum());
    }

    async fn masquerade<A: Slot>(&mut self, desired: Option<&Masquerade>, read: bool) -> anyhow::Result<()> {
        let family = A::FAMILY;
        let applied = &mut A::slot(&mut self.applied).masquerade;
        if !read && applied.as_ref() == Some(&desired.copied()) {
            return Ok(());
        }
        *applied = None;
        if masq::reconcile(family, desired, read).await? {
            self.changed.push(Resource::Masquerade(family));
            match desired {
                Some(m) => info!(network = %m.network, subnet = %m.subnet, "masquerade rules (re)written"),
                None => info!(%family, "masquerade table removed"),
            }
        }
        A::slot(&mut self.applied).masquerade = Some(desired.copied());
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
            self.changed.push(Resource::SubnetFile);
            let subnets: Vec<String> = env.families().iter().map(|f| f.subnet().to_string()).collect();
            info!(path = %self.subnet_file.display(), subnets = %subnets.join(","), mtu = env.mtu, "wrote subnet file");
        }
        self.applied.subnet_env = Some(env.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RouteVia;
    use proto::MacAddr;

    #[test]
    fn only_watch_events_trust_the_last_apply() {
        assert!(!Trigger::Peers.reads_node());
        for t in [Trigger::Start, Trigger::Requeue, Trigger::Lease, Trigger::Kernel, Trigger::Resync, Trigger::Recheck]
        {
            assert!(t.reads_node(), "{t:?}");
        }
    }

    /// What a node applied for one peer (10.244.2.0/24 behind 192.168.50.12) on device 7.
    fn applied_v4() -> FamilyApplied<Ipv4Addr> {
        let mac = MacAddr([0x0e, 0, 0, 0, 0, 2]);
        let spec = DeviceSpec { address: "10.244.1.0/32".parse().unwrap(), ..crate::dataplane::device::tests::spec() };
        let mut state = KernelState::default();
        state.neighbours.insert(Ipv4Addr::new(10, 244, 2, 0), mac);
        state.fdb.insert(mac, Ipv4Addr::new(192, 168, 50, 12));
        state.routes.insert("10.244.2.0/24".parse().unwrap(), RouteVia::Vxlan(Ipv4Addr::new(10, 244, 2, 0)));
        let masquerade =
            Masquerade { network: "10.244.0.0/16".parse().unwrap(), subnet: "10.244.1.0/24".parse().unwrap() };
        FamilyApplied {
            forwarding: Some(Some("eth0".into())),
            device: Some((Some(spec), Some(7))),
            entries: Some((Some(7), Planned { state, ..Planned::nothing() })),
            masquerade: Some(Some(masquerade)),
        }
    }

    #[test]
    fn kernel_events_are_drift_only_where_they_differ_from_what_was_applied() {
        use overlay_netlink::{FdbEntry, Neighbour, Route};
        let applied = applied_v4();
        let mac = MacAddr([0x0e, 0, 0, 0, 0, 2]);
        let neighbour = Neighbour { ifindex: 7, ip: "10.244.2.0".parse().unwrap(), mac };
        let fdb = FdbEntry { ifindex: 7, mac, dst: "192.168.50.12".parse().unwrap() };
        let route = Route {
            destination: "10.244.2.0/24".parse().unwrap(),
            gateway: Some("10.244.2.0".parse().unwrap()),
            oif: Some(7),
            onlink: true,
            protocol: entries::ROUTE_PROTOCOL,
        };
        let link = |index, name: &str, up, mtu, gone| KernelEvent::Link {
            index,
            name: name.into(),
            up,
            mtu: Some(mtu),
            mac: Some("b2:5e:e8:32:3a:be".parse().unwrap()),
            gone,
        };
        let device = Some(Resource::Device(Family::V4));
        let entries = Some(Resource::Entries(Family::V4));
        for (event, expected) in [
            // Our own writes, as the kernel reports them: no drift, so no loop.
            (KernelEvent::Neighbour { entry: neighbour, permanent: true, gone: false }, None),
            (KernelEvent::Fdb { entry: fdb, gone: false }, None),
            (KernelEvent::Route { route, gone: false }, None),
            (link(7, "overlay.1", true, 1450, false), None),
            // Removing what is not a peer's any more: ours too.
            (
                KernelEvent::Route {
                    route: Route { destination: "10.244.9.0/24".parse().unwrap(), ..route },
                    gone: true,
                },
                None,
            ),
            // Damage.
            (KernelEvent::Neighbour { entry: neighbour, permanent: true, gone: true }, entries),
            (KernelEvent::Neighbour { entry: neighbour, permanent: false, gone: false }, entries),
            (
                KernelEvent::Neighbour {
                    entry: Neighbour { mac: MacAddr([2; 6]), ..neighbour },
                    permanent: true,
                    gone: false,
                },
                entries,
            ),
            (KernelEvent::Fdb { entry: fdb, gone: true }, entries),
            (
                KernelEvent::Fdb { entry: FdbEntry { dst: "192.168.50.99".parse().unwrap(), ..fdb }, gone: false },
                entries,
            ),
            (KernelEvent::Route { route, gone: true }, entries),
            (KernelEvent::Route { route: Route { onlink: false, ..route }, gone: false }, entries),
            (KernelEvent::Route { route: Route { protocol: 3, ..route }, gone: false }, entries),
            (link(7, "overlay.1", true, 1450, true), device),
            (link(7, "overlay.1", false, 1450, false), device),
            (link(7, "overlay.1", true, 1400, false), device),
            (KernelEvent::Address { index: 7, gone: true }, device),
            (KernelEvent::Overflow, None),
            (
                KernelEvent::Nft { family: NFPROTO_IPV4, table: "overlay".into(), gone: true },
                Some(Resource::Masquerade(Family::V4)),
            ),
            // Not ours: another device, another table, another family, another protocol's route elsewhere.
            (link(9, "eth1", false, 1500, true), None),
            // A device of our name in our device's place (someone recreated it), and the old
            // one our own recreate removed, which is no drift.
            (link(8, "overlay.1", true, 1450, false), device),
            (link(6, "overlay.1", true, 1450, true), None),
            (KernelEvent::Address { index: 9, gone: true }, None),
            (
                KernelEvent::Neighbour { entry: Neighbour { ifindex: 9, ..neighbour }, permanent: true, gone: true },
                None,
            ),
            // Our own rewrite's additions.
            (KernelEvent::Nft { family: NFPROTO_IPV4, table: "overlay".into(), gone: false }, None),
            (KernelEvent::Nft { family: NFPROTO_IPV4, table: "filter".into(), gone: true }, None),
            (KernelEvent::Nft { family: NFPROTO_IPV6, table: "overlay".into(), gone: true }, None),
            (
                KernelEvent::Route {
                    route: Route { destination: "192.168.7.0/24".parse().unwrap(), protocol: 3, ..route },
                    gone: false,
                },
                None,
            ),
            (
                KernelEvent::Route { route: Route { protocol: 3, oif: Some(2), onlink: false, ..route }, gone: true },
                None,
            ),
            // flanneld's route on the device we adopted from it is the peer's route until ours replaces it.
            (KernelEvent::Route { route: Route { protocol: 3, ..route }, gone: true }, entries),
        ] {
            assert_eq!(applied.drift(&event), expected, "{event:?}");
        }
        // While a resource's apply is not recorded (failed, or under way), its retry is due anyway.
        let failed = FamilyApplied::<Ipv4Addr> { entries: None, ..applied_v4() };
        assert_eq!(failed.drift(&KernelEvent::Route { route, gone: true }), None);
    }
}
