//! What the node is, as the daemon knows it: which resources were right
//! after the last reconcile, whether the lease is held, whether policy is
//! enforced; that is readiness (`/readyz`), and with the status report
//! (`/status`) it is what the health server serves. Metrics observe it:
//! each change here is also set on the gauges.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use proto::Family;

use crate::metrics::Metrics;
use crate::status::{Event, Report, ResourceState, Status};

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
    /// Every resource, in the order a reconcile handles them. A new resource
    /// is added here, planned in `node_plan` and applied in `reconcile`.
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

/// What found a drift that a reconcile then repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// An rtnetlink event (a link, address, route, neighbour or FDB entry).
    Kernel,
    /// An nftables event (a table, chain or rule deleted).
    Nftables,
    /// The periodic resync, reading the node back.
    Resync,
    /// The node read back because the kernel dropped events we could not read in time.
    LostEvents,
}

impl Cause {
    /// Its label value.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Kernel => "kernel",
            Cause::Nftables => "nftables",
            Cause::Resync => "resync",
            Cause::LostEvents => "lost_events",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Cause::Kernel => "a kernel event",
            Cause::Nftables => "an nftables event",
            Cause::Resync => "the resync",
            Cause::LostEvents => "a read of the node after lost kernel events",
        }
    }
}

/// The node's state, shared by the daemon, the policy thread and the health server.
pub struct NodeState {
    /// The Prometheus metrics, which observe the rest.
    pub metrics: Metrics,
    /// What `overlayd status` shows.
    pub status: Status,
    lease_held: AtomicBool,
    /// Which resources were right after the last reconcile, one bit each.
    resources_ok: AtomicI64,
    reconciled: AtomicBool,
    /// The families that are on, one bit each (IPv4 1, IPv6 2): the other's
    /// resources are left out of readiness and metrics.
    families: AtomicU8,
    /// Whether this node enforces NetworkPolicy (`--network-policy`, Kubernetes mode).
    policy_enabled: bool,
    /// Whether the kernel held the compiled ruleset after the last sync.
    policy_synced: AtomicBool,
    /// Where `/explain` asks the policy thread, once it runs.
    pub explainer: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::policy::explain::Request>>,
}

impl Default for NodeState {
    fn default() -> Self {
        NodeState::new(false)
    }
}

impl NodeState {
    /// A node that holds nothing yet; `enforces_policy` in Kubernetes mode with --network-policy.
    pub fn new(enforces_policy: bool) -> Self {
        NodeState {
            metrics: Metrics::new(enforces_policy),
            status: Status::default(),
            lease_held: AtomicBool::new(false),
            resources_ok: AtomicI64::new(0),
            reconciled: AtomicBool::new(false),
            families: AtomicU8::new(0b11),
            policy_enabled: enforces_policy,
            policy_synced: AtomicBool::new(false),
            explainer: std::sync::OnceLock::new(),
        }
    }

    /// Says which families are on (the network config's).
    pub fn set_families(&self, families: &[Family]) {
        let bits = families.iter().fold(0, |bits, f| bits | (1 << *f as u8));
        self.families.store(bits, Relaxed);
    }

    /// Whether we hold a lease.
    pub fn lease_held(&self) -> bool {
        self.lease_held.load(Relaxed)
    }

    /// Records whether we hold a lease.
    pub fn set_lease_held(&self, held: bool) {
        self.lease_held.store(held, Relaxed);
        self.observe_ready();
    }

    /// Records how each resource came out of a reconcile that took `elapsed`.
    pub fn reconciled(&self, elapsed: Duration, outcomes: &[(Resource, bool)]) {
        let mut bits = self.resources_ok.load(Relaxed);
        let mut observed = Vec::with_capacity(outcomes.len());
        for (resource, ok) in outcomes.iter().filter(|(r, _)| self.is_on(*r)) {
            if *ok {
                bits |= resource.bit();
            } else {
                bits &= !resource.bit();
            }
            observed.push((resource.name(), *ok));
        }
        self.resources_ok.store(bits, Relaxed);
        self.reconciled.store(true, Relaxed);
        self.metrics.reconciled(elapsed, &observed);
        self.observe_ready();
    }

    /// Records a repair of `resource`, found by `cause`.
    pub fn repaired(&self, cause: Cause, resource: Resource) {
        self.metrics.repaired(cause.name(), resource.name());
        let what = format!("{} (found by {})", resource.name(), cause.words());
        self.status.update(|r| r.last_repair = Some(Event::now(what)));
    }

    /// Records the error of a reconcile that failed.
    pub fn failed(&self, what: String) {
        self.status.update(|r| r.last_error = Some(Event::now(what)));
    }

    /// Records whether the kernel holds the NetworkPolicy ruleset.
    pub fn set_policy_synced(&self, synced: bool) {
        self.policy_synced.store(synced, Relaxed);
        self.observe_ready();
    }

    /// Whether `resource` belongs to a family that is on (the subnet file always does).
    fn is_on(&self, resource: Resource) -> bool {
        match resource.family() {
            Some(family) => self.families.load(Relaxed) & (1 << family as u8) != 0,
            None => true,
        }
    }

    fn resource_ok(&self, resource: Resource) -> bool {
        self.resources_ok.load(Relaxed) & resource.bit() != 0
    }

    /// The resources of the families that are on, and whether each was right.
    pub fn resource_states(&self) -> Vec<ResourceState> {
        Resource::ALL
            .iter()
            .filter(|r| self.is_on(**r))
            .map(|r| ResourceState { name: r.name().to_string(), ready: self.resource_ok(*r) })
            .collect()
    }

    /// The dataplane is ready: lease held, and every resource right after the last reconcile.
    pub fn dataplane_ready(&self) -> bool {
        self.lease_held.load(Relaxed)
            && self.reconciled.load(Relaxed)
            && Resource::ALL.iter().filter(|r| self.is_on(**r)).all(|r| self.resource_ok(*r))
    }

    /// Ready as far as policy goes: off, or the kernel holds what the API
    /// says. `/readyz` waits for it, so a node does not report ready (to
    /// the DaemonSet's probe) before its pods' policies are enforced.
    pub fn policy_ready(&self) -> bool {
        !self.policy_enabled || self.policy_synced.load(Relaxed)
    }

    /// Ready as `/readyz` says it: the dataplane and the policy.
    pub fn ready(&self) -> bool {
        self.dataplane_ready() && self.policy_ready()
    }

    fn observe_ready(&self) {
        self.metrics.set_ready(self.dataplane_ready());
    }

    /// Why not ready, for the body of a 503 `/readyz`.
    pub fn readiness_detail(&self) -> String {
        let mut parts = vec![format!("lease_held={}", self.lease_held.load(Relaxed))];
        if !self.reconciled.load(Relaxed) {
            parts.push("not reconciled yet".into());
        }
        parts.extend(self.resource_states().iter().map(|r| format!("{}={}", r.name, r.ready)));
        if self.policy_enabled {
            parts.push(format!("network_policy={}", self.policy_synced.load(Relaxed)));
        }
        format!("not ready: {}\n", parts.join(" "))
    }

    /// The status report, with readiness as it is now.
    pub fn report(&self) -> Report {
        let mut report = self.status.report();
        report.ready = self.ready();
        report.resources = self.resource_states();
        report.network_policy = self.policy_enabled.then(|| self.policy_synced.load(Relaxed));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_the_lease_and_every_resource() {
        let m = NodeState::default();
        assert!(!m.ready());
        m.set_lease_held(true);
        assert!(!m.ready(), "not before the first reconcile");
        let all_ok: Vec<_> = Resource::ALL.iter().map(|r| (*r, true)).collect();
        m.reconciled(Duration::from_millis(3), &all_ok);
        assert!(m.ready());
        m.reconciled(Duration::from_millis(3), &[(Resource::Masquerade(Family::V4), false)]);
        assert!(!m.ready());
        assert!(m.readiness_detail().contains("masquerade=false"), "{}", m.readiness_detail());
        let text = m.metrics.render();
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
        m.metrics.entries_held(Family::V6, 1, 2, 3);
        let text = m.metrics.render();
        assert!(text.contains(r#"overlay_repairs_total{cause="nftables",resource="masquerade_v6"} 1"#), "{text}");
        assert!(text.contains(r#"overlay_kernel_entries{family="ipv6",kind="routes"} 3"#), "{text}");
        assert!(text.contains("overlay_apply_duration_seconds_count 3"), "{text}");
        let last = m.report().last_repair.unwrap();
        assert_eq!(last.what, "masquerade_v6 (found by an nftables event)");
    }

    #[test]
    fn a_family_that_is_off_and_policy_in_etcd_mode_are_left_out() {
        let m = NodeState::default();
        m.set_families(&[Family::V4]);
        m.set_lease_held(true);
        let all_ok: Vec<_> = Resource::ALL.iter().map(|r| (*r, true)).collect();
        m.reconciled(Duration::from_millis(3), &all_ok);
        m.reconciled(Duration::from_millis(3), &[(Resource::Entries(Family::V6), false)]);
        assert!(m.ready(), "an IPv6 resource cannot make an IPv4-only node unready");
        let text = m.metrics.render();
        assert!(!text.contains("_v6"), "{text}");
        assert!(!text.contains("overlay_policy") && !text.contains("overlay_network_policies"), "{text}");
        assert!(text.contains("overlay_build_info{"), "{text}");
        m.reconciled(Duration::from_millis(3), &[(Resource::Device(Family::V4), false)]);
        let detail = m.readiness_detail();
        assert!(detail.contains("device=false") && !detail.contains("_v6"), "{detail}");
        let names: Vec<String> = m.report().resources.into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["ip_forward", "device", "entries", "masquerade", "subnet_file"]);
        let with_policy = NodeState::new(true);
        assert!(with_policy.metrics.render().contains("overlay_policy_rules"));
        assert_eq!(with_policy.report().network_policy, Some(false));
        with_policy.set_policy_synced(true);
        assert_eq!(with_policy.report().network_policy, Some(true));
    }
}
