//! The peer view: the store's watch events folded into the set of peer
//! nodes the plan is made from, as kube-runtime's reflector folds a watch
//! into a store. A listing replaces the view at once (on `InitDone`), so a
//! relist that finds nothing new changes nothing. Every lease passes
//! [`admission`](crate::admission) first: only the leases it admits are peers.

use std::collections::{BTreeMap, HashMap};

use proto::{Address, LeaseKey, NetConfig};
use tracing::{info, warn};

pub use crate::admission::PeerLease;
use crate::admission::{self, Claim, Lease, Outcome, Refusal, Rules};
use crate::lease::{check_own, LeaseLost, OwnLease, WatchEvent};
use crate::plan::{Peer, PeerChange};
use crate::reflector::{Folded, Store};

/// What a batch of watch events did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Nothing the plan depends on (a listing in progress, an unchanged relist).
    Unchanged,
    /// The set of peers changed.
    Changed,
    /// Our own lease no longer says what we published.
    Lost(LeaseLost),
}

/// The peers, as the store's watch has shown them so far.
#[derive(Debug)]
pub struct PeerView {
    /// What config says a peer lease must be; our own part is set from our lease.
    config: NetConfig,
    rules: Rules,
    /// Every peer lease the store holds (ours is not one).
    leases: Store<LeaseKey, Lease>,
    /// What became of each: a peer, or skipped and why.
    outcomes: BTreeMap<LeaseKey, Outcome>,
    /// The skipped ones of `outcomes`, and why.
    skipped: BTreeMap<LeaseKey, Refusal>,
    /// How many leases that pass by themselves make each claim: a change
    /// that shares none is admitted alone, one that shares one admits anew.
    claimants: HashMap<Claim, u32>,
    /// What the listing under way said of our own key.
    own_listed: Option<proto::LeaseAttrs>,
    /// What changed since the changes were last taken.
    pending: Pending,
}

/// The peers that changed since the last plan, each as it was then.
#[derive(Debug)]
pub enum Pending {
    /// Changes, peer by peer.
    Peers(BTreeMap<LeaseKey, Option<PeerLease>>),
    /// The view was replaced (a listing): only a whole plan will do.
    Whole,
}

impl Default for Pending {
    fn default() -> Self {
        Pending::Peers(BTreeMap::new())
    }
}

impl Pending {
    /// Notes that `key` was `before`; a peer that changes twice keeps its first state.
    fn note(&mut self, key: LeaseKey, before: Option<PeerLease>) {
        if let Pending::Peers(changed) = self {
            changed.entry(key).or_insert(before);
        }
    }
}

impl PeerView {
    /// An empty view for a node of the network `config`, holding `own`.
    pub fn new(config: &NetConfig, own: &OwnLease) -> Self {
        PeerView {
            config: config.clone(),
            rules: Rules::new(config, own),
            leases: Store::default(),
            outcomes: BTreeMap::new(),
            skipped: BTreeMap::new(),
            claimants: HashMap::new(),
            own_listed: None,
            pending: Pending::default(),
        }
    }

    /// The peers in the family of `A`: the nodes whose lease has a subnet and a VTEP in it.
    pub fn peers<A: Address>(&self) -> impl Iterator<Item = Peer<A>> + '_ {
        self.outcomes.iter().filter_map(|(key, outcome)| family_peer(key, outcome.admitted()?))
    }

    /// The leases that are not peers, and why: kept apart, so asking costs
    /// nothing at 5,000 peers (it is asked after every batch of events).
    pub fn skipped(&self) -> impl Iterator<Item = (&LeaseKey, &Refusal)> {
        self.skipped.iter()
    }

    /// What changed since this was last called: every plan takes them, the
    /// ones made whole too, so the next delta starts from the last plan.
    pub fn take_changes(&mut self) -> Pending {
        std::mem::take(&mut self.pending)
    }

    /// The changes of `pending` in the family of `A`: each peer as it was, and as it is now.
    pub fn changes<'a, A: Address>(
        &'a self,
        pending: &'a BTreeMap<LeaseKey, Option<PeerLease>>,
    ) -> impl Iterator<Item = PeerChange<A>> + 'a {
        pending.iter().filter_map(|(key, before)| {
            let change = PeerChange {
                before: before.as_ref().and_then(|lease| family_peer(key, lease)),
                after: self.admitted(key).and_then(|lease| family_peer(key, lease)),
            };
            (change.before != change.after).then_some(change)
        })
    }

    /// How many peer leases the store holds, peers or not.
    pub fn count(&self) -> usize {
        self.leases.len()
    }

    /// Whether a first listing has completed.
    pub fn listed(&self) -> bool {
        self.leases.listed()
    }

    /// Takes our own lease as it is now (claimed anew, or publishing a new
    /// address): what a peer may be depends on it. Whether the peers changed.
    pub fn set_own(&mut self, own: &OwnLease) -> bool {
        let rules = Rules::new(&self.config, own);
        if rules == self.rules {
            return false;
        }
        self.rules = rules;
        // A key that became ours is no peer lease (a new lease may be an old peer's).
        self.leases.apply(crate::reflector::WatchEvent::Delete(own.key));
        self.readmit()
    }

    /// Folds `events` into the view.
    pub fn apply(&mut self, own: &OwnLease, events: impl IntoIterator<Item = WatchEvent>) -> Update {
        let mut update = if self.set_own(own) { Update::Changed } else { Update::Unchanged };
        let mut note = |u: Update| {
            if !matches!(update, Update::Lost(_)) && u != Update::Unchanged {
                update = u;
            }
        };
        for event in events {
            // Our own key is no peer's: it is held against what we published, not admitted.
            let event = match event {
                WatchEvent::Init => {
                    self.own_listed = None;
                    WatchEvent::Init
                }
                WatchEvent::InitApply(key, (attrs, _)) if key == own.key => {
                    self.own_listed = Some(attrs);
                    continue;
                }
                WatchEvent::Apply(key, (attrs, _)) if key == own.key => {
                    if let Err(lost) = check_own(own, Some(&attrs)) {
                        note(Update::Lost(lost));
                    }
                    continue;
                }
                WatchEvent::Delete(key) if key == own.key => {
                    if let Err(lost) = check_own(own, None) {
                        note(Update::Lost(lost));
                    }
                    continue;
                }
                other => other,
            };
            let first = !self.leases.listed();
            match self.leases.apply(event.map(|key, (attrs, created)| Lease::new(key, &attrs, created))) {
                Folded::Nothing => {}
                Folded::Listed(_) => {
                    if let Err(lost) = check_own(own, self.own_listed.take().as_ref()) {
                        note(Update::Lost(lost));
                    }
                    if self.readmit() || first {
                        note(Update::Changed);
                        self.pending = Pending::Whole;
                    }
                }
                Folded::Changed(key, before) => {
                    if self.settle(key, before) {
                        note(Update::Changed);
                    }
                }
            }
        }
        update
    }

    fn admitted(&self, key: &LeaseKey) -> Option<&PeerLease> {
        self.outcomes.get(key).and_then(Outcome::admitted)
    }

    /// Admits the lease at `key` after it changed from `before`: by itself
    /// when it shares no claim with another lease, else every lease anew.
    /// Whether any peer changed.
    fn settle(&mut self, key: LeaseKey, before: Option<Lease>) -> bool {
        if before.as_ref() == self.leases.get(&key) {
            return false;
        }
        let old = before.and_then(|lease| self.claims_of(&key, &lease));
        let new = self.leases.get(&key).and_then(|lease| self.claims_of(&key, lease));
        for claim in old.iter().flatten() {
            if let Some(n) = self.claimants.get_mut(claim) {
                *n -= 1;
                if *n == 0 {
                    self.claimants.remove(claim);
                }
            }
        }
        for claim in new.iter().flatten() {
            *self.claimants.entry(*claim).or_default() += 1;
        }
        let mine = |claim: &Claim| u32::from(new.as_ref().is_some_and(|c| c.contains(claim)));
        let shared = old
            .iter()
            .chain(new.iter())
            .flatten()
            .any(|claim| self.claimants.get(claim).copied().unwrap_or(0) > mine(claim));
        if shared {
            return self.readmit();
        }
        let outcome = self.leases.get(&key).map(|lease| self.rules.check(&key, lease));
        self.record(key, outcome)
    }

    /// The claims of a lease that passes by itself; none for one that does not.
    fn claims_of(&self, key: &LeaseKey, lease: &Lease) -> Option<Vec<Claim>> {
        match self.rules.check(key, lease) {
            Outcome::Admitted { lease, .. } => Some(admission::claims(*key, lease).collect()),
            Outcome::Skipped(_) => None,
        }
    }

    /// Admits every lease anew; whether any peer changed.
    fn readmit(&mut self) -> bool {
        let outcomes = admission::admit(&self.rules, self.leases.iter());
        let claims: Vec<Claim> =
            self.leases.iter().filter_map(|(key, lease)| self.claims_of(key, lease)).flatten().collect();
        self.claimants.clear();
        for claim in claims {
            *self.claimants.entry(claim).or_default() += 1;
        }
        let mut changed = false;
        let gone: Vec<LeaseKey> = self.outcomes.keys().filter(|k| !outcomes.contains_key(k)).copied().collect();
        for key in gone {
            changed |= self.record(key, None);
        }
        for (key, outcome) in outcomes {
            changed |= self.record(key, Some(outcome));
        }
        changed
    }

    /// Sets what became of the lease at `key` (none: it is gone), says it
    /// when that is news, and notes a peer that changed; whether one did.
    fn record(&mut self, key: LeaseKey, outcome: Option<Outcome>) -> bool {
        let before = match &outcome {
            Some(outcome) => self.outcomes.insert(key, outcome.clone()),
            None => self.outcomes.remove(&key),
        };
        if before == outcome {
            return false;
        }
        if let Some(Outcome::Skipped(refusal)) = &outcome {
            self.skipped.insert(key, refusal.clone());
        } else {
            self.skipped.remove(&key);
        }
        match (&before, &outcome) {
            (_, Some(Outcome::Skipped(refusal))) => warn!(lease = %key, reason = %refusal, "skipping peer lease"),
            (Some(Outcome::Skipped(_)), Some(Outcome::Admitted { .. })) => {
                info!(lease = %key, "peer lease admitted: what kept it out is gone")
            }
            _ => {}
        }
        if let Some(Outcome::Admitted { missing: Some(family), .. }) = &outcome {
            let was_missing = matches!(before, Some(Outcome::Admitted { missing: Some(f), .. }) if f == *family);
            if !was_missing {
                warn!(lease = %key, %family, "peer lease has a subnet but no VTEP in this family: unreachable in it");
            }
        }
        let (was, is) =
            (before.as_ref().and_then(Outcome::admitted).copied(), outcome.as_ref().and_then(Outcome::admitted));
        if was.as_ref() == is {
            return false;
        }
        self.pending.note(key, was);
        true
    }
}

/// A lease as a peer in the family of `A`, when it has a subnet and a VTEP in it.
fn family_peer<A: Address>(key: &LeaseKey, lease: &PeerLease) -> Option<Peer<A>> {
    let subnet = A::net_from(key.subnet(A::FAMILY)?)?;
    let (ip, vtep_mac) = lease.vtep(A::FAMILY)?;
    Some(Peer { subnet, public_ip: A::from_ip(ip)?, vtep_mac })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proto::{LeaseAttrs, MacAddr, VxlanBackendData};

    use crate::lease::Created;

    fn config() -> NetConfig {
        NetConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap()
    }

    fn view(own: &OwnLease) -> PeerView {
        PeerView::new(&config(), own)
    }

    fn key(cidr: &str) -> LeaseKey {
        LeaseKey::v4(cidr.parse().unwrap())
    }

    fn attrs(ip: &str, mac: &str) -> LeaseAttrs {
        LeaseAttrs::vxlan(ip.parse().unwrap(), VxlanBackendData { vni: 1, vtep_mac: mac.parse().unwrap() })
    }

    fn own() -> OwnLease {
        OwnLease { key: key("10.244.1.0/24"), attrs: attrs("192.168.1.1", "02:00:00:00:00:01") }
    }

    fn listing(leases: &[(LeaseKey, LeaseAttrs)]) -> Vec<WatchEvent> {
        let mut events = vec![WatchEvent::Init];
        events.extend(leases.iter().map(|(k, a)| WatchEvent::InitApply(*k, (a.clone(), Created(1)))));
        events.push(WatchEvent::InitDone);
        events
    }

    #[test]
    fn a_listing_replaces_the_view_and_an_identical_relist_changes_nothing() {
        let own = own();
        let b = (key("10.244.2.0/24"), attrs("192.168.1.2", "02:00:00:00:00:02"));
        let mut view = view(&own);
        let first = listing(&[(own.key, own.attrs.clone()), b.clone()]);
        assert_eq!(view.apply(&own, first.clone()), Update::Changed);
        assert_eq!((view.count(), view.listed()), (1, true));
        assert_eq!(view.apply(&own, first), Update::Unchanged, "a 410 relist with nothing new");
        // Mid-listing, the old view stands.
        assert_eq!(view.apply(&own, [WatchEvent::Init]), Update::Unchanged);
        assert_eq!(view.count(), 1);
        assert_eq!(
            view.apply(&own, [WatchEvent::InitApply(own.key, (own.attrs.clone(), Created(1))), WatchEvent::InitDone]),
            Update::Changed
        );
        assert_eq!(view.count(), 0, "b was gone in the relist");
    }

    #[test]
    fn changes_to_peers_are_followed() {
        let own = own();
        let mut view = view(&own);
        view.apply(&own, listing(&[(own.key, own.attrs.clone())]));
        let k = key("10.244.2.0/24");
        assert_eq!(
            view.apply(&own, [WatchEvent::Apply(k, (attrs("192.168.1.2", "02:00:00:00:00:02"), Created(1)))]),
            Update::Changed
        );
        assert_eq!(
            view.apply(&own, [WatchEvent::Apply(k, (attrs("192.168.1.2", "02:00:00:00:00:02"), Created(1)))]),
            Update::Unchanged
        );
        assert_eq!(
            view.apply(&own, [WatchEvent::Apply(k, (attrs("192.168.1.2", "02:00:00:00:00:03"), Created(1)))]),
            Update::Changed
        );
        assert_eq!(view.apply(&own, [WatchEvent::Delete(k)]), Update::Changed);
        assert_eq!(view.apply(&own, [WatchEvent::Delete(k)]), Update::Unchanged);
    }

    #[test]
    fn dual_stack_leases_are_peers_in_each_family_they_carry() {
        let own = OwnLease { key: "10.244.1.0-24&fd00:0:0:1::-64".parse().unwrap(), attrs: own().attrs };
        let mut view = view(&own);
        view.apply(&own, listing(&[(own.key, own.attrs.clone())]));
        let data = |m: &str| VxlanBackendData { vni: 1, vtep_mac: m.parse().unwrap() };
        let dual_key: LeaseKey = "10.244.2.0-24&fd00:0:0:2::-64".parse().unwrap();
        let dual = LeaseAttrs::vxlan_families(
            Some(("192.168.1.2".parse().unwrap(), data("02:00:00:00:00:02"))),
            Some(("fd00:50::2".parse().unwrap(), data("02:00:00:00:06:02"))),
        );
        // A v4-only peer in a dual-stack network, and a malformed one.
        let v4_key = key("10.244.3.0/24");
        let v4_only = attrs("192.168.1.3", "02:00:00:00:00:03");
        let mut broken = dual.clone();
        broken.backend_v6_data = proto::lease::BackendData::Other(r#"{"VNI":1}"#.into());
        let broken_key: LeaseKey = "10.244.4.0-24&fd00:0:0:4::-64".parse().unwrap();
        let events = [
            WatchEvent::Apply(dual_key, (dual, Created(1))),
            WatchEvent::Apply(v4_key, (v4_only, Created(1))),
            WatchEvent::Apply(broken_key, (broken, Created(1))),
        ];
        assert_eq!(view.apply(&own, events), Update::Changed);
        let v4: Vec<String> = view.peers::<Ipv4Addr>().map(|p| p.subnet.to_string()).collect();
        assert_eq!(v4, ["10.244.2.0/24", "10.244.3.0/24"]);
        let v6: Vec<String> = view.peers::<Ipv6Addr>().map(|p| format!("{} {}", p.subnet, p.public_ip)).collect();
        assert_eq!(v6, ["fd00:0:0:2::/64 fd00:50::2"]);
    }

    #[test]
    fn the_changes_since_the_last_plan_are_each_peer_as_it_was_then() {
        let own = own();
        let mut view = view(&own);
        let (k2, k3) = (key("10.244.2.0/24"), key("10.244.3.0/24"));
        let a = attrs("192.168.1.2", "02:00:00:00:00:02");
        view.apply(&own, listing(&[(own.key, own.attrs.clone()), (k3, attrs("192.168.1.3", "02:00:00:00:00:03"))]));
        assert!(matches!(view.take_changes(), Pending::Whole), "a listing is planned whole");
        view.apply(&own, [WatchEvent::Apply(k2, (a.clone(), Created(1))), WatchEvent::Delete(k3)]);
        view.apply(&own, [WatchEvent::Apply(k2, (attrs("192.168.1.2", "02:00:00:00:00:22"), Created(1)))]);
        let Pending::Peers(pending) = view.take_changes() else { panic!("changes are peer by peer") };
        let changes: Vec<PeerChange<Ipv4Addr>> = view.changes(&pending).collect();
        let mac = |m: &str| m.parse::<MacAddr>().unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!((changes[0].before, changes[0].after.map(|p| p.vtep_mac)), (None, Some(mac("02:00:00:00:00:22"))));
        assert_eq!((changes[1].before.map(|p| p.vtep_mac), changes[1].after), (Some(mac("02:00:00:00:00:03")), None));
        assert_eq!(view.changes::<Ipv6Addr>(&pending).count(), 0, "no IPv6 in these leases");
        // Taken: the next plan starts from here. A change undone is no change.
        view.apply(&own, [WatchEvent::Apply(k2, (a.clone(), Created(1)))]);
        view.apply(&own, [WatchEvent::Apply(k2, (attrs("192.168.1.2", "02:00:00:00:00:22"), Created(1)))]);
        let Pending::Peers(pending) = view.take_changes() else { panic!() };
        assert_eq!(view.changes::<Ipv4Addr>(&pending).count(), 0);
    }

    #[test]
    fn our_own_lease_is_checked_in_every_kind_of_event() {
        let own = own();
        let mut view = view(&own);
        assert!(matches!(view.apply(&own, listing(&[])), Update::Lost(_)), "missing from the listing");
        assert_eq!(view.apply(&own, [WatchEvent::Apply(own.key, (own.attrs.clone(), Created(1)))]), Update::Unchanged);
        let taken = attrs("192.168.1.9", "02:00:00:00:00:09");
        assert!(matches!(view.apply(&own, [WatchEvent::Apply(own.key, (taken, Created(1)))]), Update::Lost(_)));
        // Lost wins over a peer change in the same batch.
        let batch = [
            WatchEvent::Delete(own.key),
            WatchEvent::Apply(key("10.244.3.0/24"), (attrs("192.168.1.3", "02:00:00:00:00:03"), Created(1))),
        ];
        assert!(matches!(view.apply(&own, batch), Update::Lost(_)));
        assert_eq!(view.count(), 1, "the peer change was still taken");
    }

    proptest::proptest! {
        /// Admitting lease by lease, as watch events come, ends where
        /// admitting every lease at once does; and the pending changes, applied
        /// to the peers before, give the peers after. Few subnets, MACs and
        /// addresses, so claims collide often.
        #[test]
        fn the_fold_admits_as_a_whole_admission_does(
            steps in proptest::collection::vec((2u8..7, proptest::option::of((1u8..4, 1u8..4, 0i64..4))), 1..40)
        ) {
            let own = own();
            let mut view = view(&own);
            view.apply(&own, listing(&[(own.key, own.attrs.clone())]));
            view.take_changes();
            let mut before: BTreeMap<LeaseKey, PeerLease> = BTreeMap::new();
            for (subnet, lease) in steps {
                let k = key(&format!("10.244.{subnet}.0/24"));
                let event = match lease {
                    Some((ip, mac, created)) => WatchEvent::Apply(
                        k,
                        (
                            attrs(&format!("192.168.1.{}", 10 + ip), &format!("02:00:00:00:00:{:02x}", 0x10 + mac)),
                            Created(created),
                        ),
                    ),
                    None => WatchEvent::Delete(k),
                };
                view.apply(&own, [event]);
                let whole = admission::admit(&view.rules, view.leases.iter());
                proptest::prop_assert_eq!(&view.outcomes, &whole);
                let skipped: Vec<_> = whole.iter().filter(|(_, o)| o.admitted().is_none()).map(|(k, _)| k).collect();
                proptest::prop_assert_eq!(view.skipped().map(|(k, _)| k).collect::<Vec<_>>(), skipped);
                let Pending::Peers(pending) = view.take_changes() else { panic!("no listing here") };
                for (k, was) in &pending {
                    proptest::prop_assert_eq!(before.get(k), was.as_ref(), "pending keeps the peer as planned");
                }
                before = view.outcomes.iter().filter_map(|(k, o)| Some((*k, *o.admitted()?))).collect();
            }
        }
    }
}
