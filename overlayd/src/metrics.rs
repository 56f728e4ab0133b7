//! What the daemon reports: Prometheus metrics (`/metrics`) and the
//! readiness behind `/readyz`, shared by the daemon loop and the HTTP server.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as Labelled;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use proto::Family;

use crate::status::{ResourceState, Status};

/// A piece of node state the reconcile owns; all but the subnet file exist once per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// `net.ipv4.ip_forward=1`, `net.ipv6.conf.all.forwarding=1` (when that family is on).
    Forwarding(Family),
    /// The VXLAN device: exists, up, MTU, MAC, address (absent when that family is off).
    Device(Family),
    /// The neighbour, FDB and route entries of every peer.
    Entries(Family),
    /// The nftables table `ip overlay` / `ip6 overlay` (present with `--ip-masq`, absent without).
    Masquerade(Family),
    /// The subnet file the CNI plugin reads.
    SubnetFile,
}

impl Resource {
    /// Every resource, in the order a reconcile handles them.
    pub const ALL: [Resource; 9] = [
        Resource::Forwarding(Family::V4),
        Resource::Forwarding(Family::V6),
        Resource::Device(Family::V4),
        Resource::Entries(Family::V4),
        Resource::Device(Family::V6),
        Resource::Entries(Family::V6),
        Resource::Masquerade(Family::V4),
        Resource::Masquerade(Family::V6),
        Resource::SubnetFile,
    ];

    /// Its name in logs and in `/readyz` (IPv4's names are those of the IPv4-only releases).
    pub fn name(self) -> &'static str {
        use Family::{V4, V6};
        match self {
            Resource::Forwarding(V4) => "ip_forward",
            Resource::Forwarding(V6) => "ipv6_forwarding",
            Resource::Device(V4) => "device",
            Resource::Device(V6) => "device_v6",
            Resource::Entries(V4) => "entries",
            Resource::Entries(V6) => "entries_v6",
            Resource::Masquerade(V4) => "masquerade",
            Resource::Masquerade(V6) => "masquerade_v6",
            Resource::SubnetFile => "subnet_file",
        }
    }

    /// Its family; none for the subnet file, which serves both.
    pub fn family(self) -> Option<Family> {
        match self {
            Resource::Forwarding(f) | Resource::Device(f) | Resource::Entries(f) | Resource::Masquerade(f) => Some(f),
            Resource::SubnetFile => None,
        }
    }

    /// Its bit in the readiness mask.
    fn bit(self) -> i64 {
        1 << Resource::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl EncodeLabelValue for Resource {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabel {
    resource: Resource,
}

/// What found a drift that a reconcile then repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// An rtnetlink event (a link, address, route, neighbour or FDB entry).
    Kernel,
    /// An nftables event (a table, chain or rule deleted).
    Nftables,
    /// The periodic resync, reading the node back.
    Resync,
}

impl EncodeLabelValue for Cause {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let name = match self {
            Cause::Kernel => "kernel",
            Cause::Nftables => "nftables",
            Cause::Resync => "resync",
        };
        std::fmt::Write::write_str(encoder, name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RepairLabel {
    cause: Cause,
    resource: Resource,
}

/// An IP family, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FamilyValue(Family);

impl EncodeLabelValue for FamilyValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, if self.0 == Family::V4 { "ipv4" } else { "ipv6" })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EntriesLabel {
    family: FamilyValue,
    kind: &'static str,
}

/// Upper bounds of the apply-duration histogram's buckets, in seconds.
const APPLY_BUCKETS: [f64; 8] = [0.001, 0.004, 0.016, 0.064, 0.256, 1.024, 4.096, 16.384];

/// Counters, gauges and readiness.
pub struct Metrics {
    registry: Registry,
    /// Peer nodes programmed into the dataplane.
    pub peers: Gauge,
    /// Leases in the lease store, ours included.
    pub leases: Gauge,
    /// Peer leases that are not programmed: invalid, or contested and the newer claim.
    pub peers_skipped: Gauge,
    /// Peer entries the kernel refused at the last apply.
    pub entries_refused: Gauge,
    /// Netlink operations sent to change the node.
    pub netlink_ops: Counter,
    /// Netlink operations the kernel refused.
    pub netlink_errors: Counter,
    /// Reconciles run.
    pub reconciles: Counter,
    reconcile_seconds: Gauge<f64, AtomicU64>,
    last_renewal: Gauge,
    /// Lease renewals that failed.
    pub renewal_errors: Counter,
    /// Watch events received from the lease store.
    pub watch_events: Counter,
    resource_ready: Labelled<ResourceLabel, Gauge>,
    resource_errors: Labelled<ResourceLabel, Counter>,
    repairs: Labelled<RepairLabel, Counter>,
    apply_seconds: Histogram,
    /// Reconciles scheduled again after a failure.
    pub retries: Counter,
    entries: Labelled<EntriesLabel, Gauge>,
    lease_watch_last_event: Gauge,
    /// 1 when the VXLAN devices' TX checksum offload is on.
    pub tx_checksum_offload: Gauge,
    ready: Gauge,
    /// NetworkPolicy enforcement.
    pub policy: PolicyMetrics,
    lease_held: AtomicBool,
    /// Which resources were right after the last reconcile, one bit each.
    resources_ok: AtomicI64,
    reconciled: AtomicBool,
    /// The families that are on, one bit each (IPv4 1, IPv6 2): the other's
    /// resources are left out of readiness and metrics.
    families: AtomicU8,
    /// What `overlayd status` shows.
    pub status: Status,
    build_info: Labelled<BuildLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(false)
    }
}

impl Metrics {
    /// Every metric of the daemon; NetworkPolicy's only where it is `enforced`
    /// (Kubernetes mode with --network-policy), so etcd mode shows none.
    pub fn new(enforces_policy: bool) -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            peers: Gauge::default(),
            leases: Gauge::default(),
            peers_skipped: Gauge::default(),
            entries_refused: Gauge::default(),
            netlink_ops: Counter::default(),
            netlink_errors: Counter::default(),
            reconciles: Counter::default(),
            reconcile_seconds: Gauge::default(),
            last_renewal: Gauge::default(),
            renewal_errors: Counter::default(),
            watch_events: Counter::default(),
            resource_ready: Labelled::default(),
            resource_errors: Labelled::default(),
            repairs: Labelled::default(),
            // 1 ms to 16 s, by fours. Written out: computing them (powf) would link
            // libm, whose pages stay resident for the daemon's life (measured: 0.36 MiB).
            apply_seconds: Histogram::new(APPLY_BUCKETS),
            retries: Counter::default(),
            entries: Labelled::default(),
            lease_watch_last_event: Gauge::default(),
            tx_checksum_offload: Gauge::default(),
            ready: Gauge::default(),
            policy: PolicyMetrics::default(),
            lease_held: AtomicBool::new(false),
            resources_ok: AtomicI64::new(0),
            reconciled: AtomicBool::new(false),
            families: AtomicU8::new(0b11),
            status: Status::default(),
            build_info: Labelled::default(),
        };
        let r = &mut m.registry;
        r.register("overlay_peers", "Peer nodes programmed into the dataplane", m.peers.clone());
        r.register("overlay_leases", "Leases in the lease store, ours included", m.leases.clone());
        r.register(
            "overlay_peers_skipped",
            "Peer leases not programmed: invalid, or the newer of two contested claims (the log says why)",
            m.peers_skipped.clone(),
        );
        r.register(
            "overlay_entries_refused",
            "Peer entries the kernel refused at the last apply (a route overlayd did not make in the way)",
            m.entries_refused.clone(),
        );
        r.register("overlay_netlink_ops", "Netlink operations sent to change the node", m.netlink_ops.clone());
        r.register("overlay_netlink_errors", "Netlink operations refused by the kernel", m.netlink_errors.clone());
        r.register("overlay_resyncs", "Reconciles of the node", m.reconciles.clone());
        r.register("overlay_resync_duration_seconds", "Duration of the last reconcile", m.reconcile_seconds.clone());
        r.register(
            "overlay_lease_last_renewal_timestamp_seconds",
            "Unix time of the last successful lease renewal",
            m.last_renewal.clone(),
        );
        r.register("overlay_lease_renewal_errors", "Failed lease renewals", m.renewal_errors.clone());
        r.register("overlay_watch_events", "Watch events received from the lease store", m.watch_events.clone());
        r.register(
            "overlay_resource_ready",
            "1 when the node held what was planned for this resource after the last reconcile",
            m.resource_ready.clone(),
        );
        r.register(
            "overlay_reconcile_errors",
            "Reconciles in which this resource could not be made right",
            m.resource_errors.clone(),
        );
        r.register(
            "overlay_repairs",
            "Reconciles that repaired drift in this resource, by what found it: a kernel or nftables event, or the resync",
            m.repairs.clone(),
        );
        r.register("overlay_apply_duration_seconds", "Duration of each reconcile of the node", m.apply_seconds.clone());
        r.register("overlay_reconcile_retries", "Reconciles scheduled again after a failure", m.retries.clone());
        r.register(
            "overlay_kernel_entries",
            "Peer entries held after the last successful apply, by family and kind (neighbours, fdb, routes)",
            m.entries.clone(),
        );
        r.register(
            "overlay_lease_watch_last_event_timestamp_seconds",
            "Unix time of the last event from the lease store's watch (its age: time() minus this)",
            m.lease_watch_last_event.clone(),
        );
        r.register(
            "overlay_vxlan_tx_checksum_offload",
            "1 when TX checksum offload is on for the VXLAN devices (--vxlan-tx-checksum-offload)",
            m.tx_checksum_offload.clone(),
        );
        r.register("overlay_ready", "1 when the lease is held and every resource is right", m.ready.clone());
        r.register(
            "overlay_build_info",
            "overlayd's version, commit and build date, as labels (value 1)",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
                commit: crate::version::COMMIT,
                build_date: crate::version::BUILD_DATE,
            })
            .set(1);
        if enforces_policy {
            m.policy.enabled.store(true, Relaxed);
            m.policy.register(r);
        }
        m
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
    commit: &'static str,
    build_date: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// What NetworkPolicy enforcement reports.
pub struct PolicyMetrics {
    drops: Labelled<DirectionLabel, Counter>,
    /// NetworkPolicies in the cluster.
    pub policies: Gauge,
    /// NetworkPolicies that select at least one pod of this node.
    pub policies_in_effect: Gauge,
    /// Pods of this node that some policy isolates.
    pub selected_pods: Gauge,
    /// Allowing rules in the table (one per family, pods, peers; ports merged).
    pub rules: Gauge,
    /// Parts of policies that could not be compiled (each logged once).
    pub problems: Gauge,
    /// From a change seen on the API watch to the kernel holding its rules.
    pub sync_seconds: Histogram,
    /// Bursts of API changes the kernel was made to hold (or found holding).
    pub syncs: Counter,
    /// Transactions that wrote the table.
    pub applies: Counter,
    /// Transactions that restored a table someone else changed.
    pub repairs: Counter,
    /// Reads or writes of the table that failed.
    pub errors: Counter,
    /// Whether this node enforces NetworkPolicy (`--network-policy`, Kubernetes mode).
    pub enabled: AtomicBool,
    /// Whether the kernel held the compiled ruleset after the last sync.
    pub synced: AtomicBool,
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        PolicyMetrics {
            drops: Labelled::default(),
            policies: Gauge::default(),
            policies_in_effect: Gauge::default(),
            selected_pods: Gauge::default(),
            rules: Gauge::default(),
            problems: Gauge::default(),
            sync_seconds: Histogram::new(APPLY_BUCKETS),
            syncs: Counter::default(),
            applies: Counter::default(),
            repairs: Counter::default(),
            errors: Counter::default(),
            enabled: AtomicBool::new(false),
            synced: AtomicBool::new(false),
        }
    }
}

impl PolicyMetrics {
    /// Ready as far as policy goes: off, or the kernel holds what the API
    /// says. `/readyz` waits for it, so a node does not report ready (to
    /// the DaemonSet's probe) before its pods' policies are enforced.
    pub fn ready(&self) -> bool {
        !self.enabled.load(Relaxed) || self.synced.load(Relaxed)
    }

    /// The drop counter of a direction.
    pub fn drops(&self, direction: crate::policy::compile::Direction) -> Counter {
        self.drops.get_or_create(&DirectionLabel { direction: direction.name() }).clone()
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "overlay_policy_dropped_packets",
            "Packets dropped by NetworkPolicy, by direction (ingress to or egress from this node's pods)",
            self.drops.clone(),
        );
        r.register("overlay_network_policies", "NetworkPolicies in the cluster", self.policies.clone());
        r.register(
            "overlay_network_policies_in_effect",
            "NetworkPolicies selecting at least one pod of this node",
            self.policies_in_effect.clone(),
        );
        r.register(
            "overlay_policy_selected_pods",
            "Pods of this node isolated by some policy",
            self.selected_pods.clone(),
        );
        r.register("overlay_policy_rules", "Rules in the NetworkPolicy table", self.rules.clone());
        r.register("overlay_policy_problems", "Parts of policies that could not be compiled", self.problems.clone());
        r.register(
            "overlay_policy_sync_duration_seconds",
            "From an API change seen on the watch to its rules in the kernel",
            self.sync_seconds.clone(),
        );
        r.register(
            "overlay_policy_syncs",
            "Times the kernel was made to hold, or found holding, the compiled NetworkPolicy ruleset",
            self.syncs.clone(),
        );
        r.register(
            "overlay_policy_applies",
            "nftables transactions that wrote the NetworkPolicy table",
            self.applies.clone(),
        );
        r.register(
            "overlay_policy_repairs",
            "NetworkPolicy tables restored after someone else changed them",
            self.repairs.clone(),
        );
        r.register("overlay_policy_errors", "Failed reads or writes of the NetworkPolicy table", self.errors.clone());
    }
}

impl Metrics {
    /// Records a successful renewal now.
    pub fn renewed_now(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.last_renewal.set(now as i64);
    }

    /// Whether we hold a lease.
    pub fn lease_held(&self) -> bool {
        self.lease_held.load(Relaxed)
    }

    /// Records whether we hold a lease.
    pub fn set_lease_held(&self, held: bool) {
        self.lease_held.store(held, Relaxed);
        self.update_ready();
    }

    /// Records how each resource came out of a reconcile that took `elapsed`.
    pub fn reconciled(&self, elapsed: Duration, outcomes: &[(Resource, bool)]) {
        self.reconciles.inc();
        self.reconcile_seconds.set(elapsed.as_secs_f64());
        self.apply_seconds.observe(elapsed.as_secs_f64());
        let mut bits = self.resources_ok.load(Relaxed);
        for (resource, ok) in outcomes.iter().filter(|(r, _)| self.is_on(*r)) {
            let label = ResourceLabel { resource: *resource };
            self.resource_ready.get_or_create(&label).set(i64::from(*ok));
            if *ok {
                bits |= resource.bit();
            } else {
                bits &= !resource.bit();
                self.resource_errors.get_or_create(&label).inc();
            }
        }
        self.resources_ok.store(bits, Relaxed);
        self.reconciled.store(true, Relaxed);
        self.update_ready();
    }

    /// Records a repair of `resource`, found by `cause`.
    pub fn repaired(&self, cause: Cause, resource: Resource) {
        self.repairs.get_or_create(&RepairLabel { cause, resource }).inc();
        let found_by = match cause {
            Cause::Kernel => "a kernel event",
            Cause::Nftables => "an nftables event",
            Cause::Resync => "the resync",
        };
        let what = format!("{} (found by {found_by})", resource.name());
        self.status.update(|r| r.last_repair = Some(crate::status::Event::now(what)));
    }

    /// Records the peer entries of `family` held after a successful apply.
    pub fn entries_held(&self, family: Family, neighbours: usize, fdb: usize, routes: usize) {
        for (kind, n) in [("neighbours", neighbours), ("fdb", fdb), ("routes", routes)] {
            self.entries.get_or_create(&EntriesLabel { family: FamilyValue(family), kind }).set(n as i64);
        }
    }

    /// Records that the lease store's watch delivered events now.
    pub fn lease_watch_event_now(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.lease_watch_last_event.set(now as i64);
    }

    /// Says which families are on (the network config's).
    pub fn set_families(&self, families: &[Family]) {
        let bits = families.iter().fold(0, |bits, f| bits | (1 << *f as u8));
        self.families.store(bits, Relaxed);
    }

    /// Whether `resource` belongs to a family that is on (the subnet file always does).
    fn is_on(&self, resource: Resource) -> bool {
        match resource.family() {
            Some(family) => self.families.load(Relaxed) & (1 << family as u8) != 0,
            None => true,
        }
    }

    /// The resources of the families that are on, and whether each was right.
    pub fn resource_states(&self) -> Vec<ResourceState> {
        Resource::ALL
            .iter()
            .filter(|r| self.is_on(**r))
            .map(|r| ResourceState { name: r.name().to_string(), ready: self.resource_ok(*r) })
            .collect()
    }

    /// The status report, with readiness as it is now.
    pub fn report(&self) -> crate::status::Report {
        let mut report = self.status.report();
        report.ready = self.ready() && self.policy.ready();
        report.resources = self.resource_states();
        report.network_policy = self.policy.enabled.load(Relaxed).then(|| self.policy.synced.load(Relaxed));
        report
    }

    fn resource_ok(&self, resource: Resource) -> bool {
        self.resources_ok.load(Relaxed) & resource.bit() != 0
    }

    fn update_ready(&self) {
        self.ready.set(i64::from(self.ready()));
    }

    /// Ready means: lease held, and every resource right after the last reconcile.
    pub fn ready(&self) -> bool {
        self.lease_held.load(Relaxed)
            && self.reconciled.load(Relaxed)
            && Resource::ALL.iter().filter(|r| self.is_on(**r)).all(|r| self.resource_ok(*r))
    }

    /// Why not ready, for the body of a 503 `/readyz`.
    pub fn readiness_detail(&self) -> String {
        let mut parts = vec![format!("lease_held={}", self.lease_held.load(Relaxed))];
        if !self.reconciled.load(Relaxed) {
            parts.push("not reconciled yet".into());
        }
        parts.extend(self.resource_states().iter().map(|r| format!("{}={}", r.name, r.ready)));
        if self.policy.enabled.load(Relaxed) {
            parts.push(format!("network_policy={}", self.policy.synced.load(Relaxed)));
        }
        format!("not ready: {}\n", parts.join(" "))
    }

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_the_lease_and_every_resource() {
        let m = Metrics::default();
        assert!(!m.ready());
        m.set_lease_held(true);
        assert!(!m.ready(), "not before the first reconcile");
        let all_ok: Vec<_> = Resource::ALL.iter().map(|r| (*r, true)).collect();
        m.reconciled(Duration::from_millis(3), &all_ok);
        assert!(m.ready());
        m.reconciled(Duration::from_millis(3), &[(Resource::Masquerade(Family::V4), false)]);
        assert!(!m.ready());
        assert!(m.readiness_detail().contains("masquerade=false"), "{}", m.readiness_detail());
        let text = m.render();
        assert!(text.contains("overlay_ready 0"), "{text}");
        assert!(text.contains(r#"overlay_resource_ready{resource="masquerade"} 0"#), "{text}");
        assert!(text.contains(r#"overlay_reconcile_errors_total{resource="masquerade"} 1"#), "{text}");
        assert!(text.contains("overlay_resyncs_total 2"), "{text}");
        m.reconciled(
            Duration::from_millis(3),
            &[(Resource::Masquerade(Family::V4), true), (Resource::Entries(Family::V6), false)],
        );
        assert!(m.readiness_detail().contains("entries_v6=false"), "{}", m.readiness_detail());
        m.repaired(Cause::Nftables, Resource::Masquerade(Family::V6));
        m.entries_held(Family::V6, 1, 2, 3);
        let text = m.render();
        assert!(text.contains(r#"overlay_repairs_total{cause="nftables",resource="masquerade_v6"} 1"#), "{text}");
        assert!(text.contains(r#"overlay_kernel_entries{family="ipv6",kind="routes"} 3"#), "{text}");
        assert!(text.contains("overlay_apply_duration_seconds_count 3"), "{text}");
    }

    #[test]
    fn a_family_that_is_off_and_policy_in_etcd_mode_are_left_out() {
        let m = Metrics::default();
        m.set_families(&[Family::V4]);
        m.set_lease_held(true);
        let all_ok: Vec<_> = Resource::ALL.iter().map(|r| (*r, true)).collect();
        m.reconciled(Duration::from_millis(3), &all_ok);
        m.reconciled(Duration::from_millis(3), &[(Resource::Entries(Family::V6), false)]);
        assert!(m.ready(), "an IPv6 resource cannot make an IPv4-only node unready");
        let text = m.render();
        assert!(!text.contains("_v6"), "{text}");
        assert!(!text.contains("overlay_policy") && !text.contains("overlay_network_policies"), "{text}");
        assert!(text.contains("overlay_build_info{"), "{text}");
        m.reconciled(Duration::from_millis(3), &[(Resource::Device(Family::V4), false)]);
        let detail = m.readiness_detail();
        assert!(detail.contains("device=false") && !detail.contains("_v6"), "{detail}");
        let names: Vec<String> = m.report().resources.into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["ip_forward", "device", "entries", "masquerade", "subnet_file"]);
        let with_policy = Metrics::new(true);
        assert!(with_policy.render().contains("overlay_policy_rules"));
        assert!(with_policy.report().network_policy == Some(false));
    }
}
