//! The daemon's Prometheus metrics (`/metrics`). They only observe: the
//! state they count lives in `node_state` (readiness, resources) and in the
//! components that act; labels are plain names, so this module depends on
//! nothing of the daemon's.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as Labelled;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use proto::Family;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabel {
    resource: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RepairLabel {
    cause: &'static str,
    resource: &'static str,
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

/// Counters and gauges.
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
    /// Times kernel events were lost (the socket overflowed) and the node was read back.
    pub kernel_event_overflows: Counter,
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
    /// Packets the fast path (`--fast-path`) carried past the host's stack.
    pub fast_path_packets: Counter,
    /// Flows the fast path learned from the slow path (each again once a second while it lasts).
    pub fast_path_flows_learned: Counter,
    ready: Gauge,
    /// NetworkPolicy enforcement.
    pub policy: PolicyMetrics,
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
            kernel_event_overflows: Counter::default(),
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
            fast_path_packets: Counter::default(),
            fast_path_flows_learned: Counter::default(),
            ready: Gauge::default(),
            policy: PolicyMetrics::default(),
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
            "overlay_kernel_event_overflows",
            "Times kernel events were lost (the event socket overflowed) and the whole node was read back",
            m.kernel_event_overflows.clone(),
        );
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
        r.register(
            "overlay_fast_path_packets",
            "Packets the fast path (--fast-path) carried past the host's forwarding, bridge and netfilter",
            m.fast_path_packets.clone(),
        );
        r.register(
            "overlay_fast_path_flows_learned",
            "Flows the fast path learned from the slow path (each again once a second while it lasts)",
            m.fast_path_flows_learned.clone(),
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

/// A rule of a policy, as labels: which policy accepts or drops traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RuleLabels {
    /// `NetworkPolicy` or `ClusterNetworkPolicy`.
    pub kind: &'static str,
    /// "" for a ClusterNetworkPolicy.
    pub namespace: String,
    pub name: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Its index among the policy's rules of that direction.
    pub rule: String,
    /// `accept`, `deny` or `pass`.
    pub action: &'static str,
}

/// What NetworkPolicy enforcement reports.
pub struct PolicyMetrics {
    drops: Labelled<DirectionLabel, Counter>,
    rule_packets: Labelled<RuleLabels, Counter>,
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
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        PolicyMetrics {
            drops: Labelled::default(),
            rule_packets: Labelled::default(),
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
        }
    }
}

impl PolicyMetrics {
    /// The drop counter of a direction (`ingress`, `egress`).
    pub fn drops(&self, direction: &'static str) -> Counter {
        self.drops.get_or_create(&DirectionLabel { direction }).clone()
    }

    /// The packet counter of a policy rule.
    pub fn rule_packets(&self, labels: &RuleLabels) -> Counter {
        self.rule_packets.get_or_create(labels).clone()
    }

    /// Forgets a policy rule's counter (the rule is gone).
    pub fn forget_rule(&self, labels: &RuleLabels) {
        self.rule_packets.remove(labels);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "overlay_policy_rule_packets",
            "Packets each policy rule decided (new connections: replies and established flows are not counted), \
             by policy kind, namespace, name, direction, rule index and action",
            self.rule_packets.clone(),
        );
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

    /// Observes a reconcile that took `elapsed`, and each resource's outcome (by name).
    pub fn reconciled(&self, elapsed: Duration, outcomes: &[(&'static str, bool)]) {
        self.reconciles.inc();
        self.reconcile_seconds.set(elapsed.as_secs_f64());
        self.apply_seconds.observe(elapsed.as_secs_f64());
        for (resource, ok) in outcomes {
            let label = ResourceLabel { resource };
            self.resource_ready.get_or_create(&label).set(i64::from(*ok));
            if !ok {
                self.resource_errors.get_or_create(&label).inc();
            }
        }
    }

    /// Observes a repair of `resource`, found by `cause`.
    pub fn repaired(&self, cause: &'static str, resource: &'static str) {
        self.repairs.get_or_create(&RepairLabel { cause, resource }).inc();
    }

    /// Observes whether the node is ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
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

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
