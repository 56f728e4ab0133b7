//! The peer view: the store's watch events folded into the set of peer
//! nodes the plan is made from, as kube-runtime's reflector folds a watch
//! into a store. A listing replaces the view at once (on `InitDone`), so a
//! relist that finds nothing new changes nothing.

use std::collections::BTreeMap;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proto::{Address, Family, LeaseAttrs, LeaseKey, MacAddr};
use tracing::warn;

use crate::lease::{check_own, LeaseLost, OwnLease, WatchEvent};
use crate::plan::{Peer, PeerChange};

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
#[derive(Debug, Default)]
pub struct PeerView {
    peers: BTreeMap<LeaseKey, PeerLease>,
    /// A listing in progress, and what it said of our own key.
    listing: Option<(BTreeMap<LeaseKey, PeerLease>, Option<LeaseAttrs>)>,
    /// Whether a listing has completed: until then the view is not to be planned from.
    listed: bool,
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
    /// The peers in the family of `A`: the nodes whose lease has a subnet and a VTEP in it.
    pub fn peers<A: Address>(&self) -> impl Iterator<Item = Peer<A>> + '_ {
        self.peers.iter().filter_map(|(key, lease)| family_peer(key, lease))
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
                after: self.peers.get(key).and_then(|lease| family_peer(key, lease)),
            };
            (change.before != change.after).then_some(change)
        })
    }

    /// How many peers.
    pub fn count(&self) -> usize {
        self.peers.len()
    }

    /// Whether a first listing has completed.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// Forgets a key that became ours (a new lease may be an old peer's).
    pub fn forget(&mut self, key: &LeaseKey) {
        if let Some(before) = self.peers.remove(key) {
            self.pending.note(*key, Some(before));
        }
    }

    /// Folds `events` into the view.
    pub fn apply(&mut self, own: &OwnLease, events: impl IntoIterator<Item = WatchEvent>) -> Update {
        let mut update = Update::Unchanged;
        let mut note = |u: Update| {
            if !matches!(update, Update::Lost(_)) && u != Update::Unchanged {
                update = u;
            }
        };
        for event in events {
            match event {
                WatchEvent::Init => self.listing = Some((BTreeMap::new(), None)),
                WatchEvent::InitApply(key, attrs) => {
                    let (listing, own_seen) = self.listing.get_or_insert_with(Default::default);
                    if key == own.key {
                        *own_seen = Some(attrs);
                    } else if let Some(peer) = peer(key, &attrs) {
                        listing.insert(key, peer);
                    }
                }
                WatchEvent::InitDone => {
                    let (listing, own_seen) = self.listing.take().unwrap_or_default();
                    if let Err(lost) = check_own(own, own_seen.as_ref()) {
                        note(Update::Lost(lost));
                    }
                    if !self.listed || listing != self.peers {
                        note(Update::Changed);
                        self.pending = Pending::Whole;
                    }
                    self.peers = listing;
                    self.listed = true;
                }
                WatchEvent::Apply(key, attrs) if key == own.key => {
                    if let Err(lost) = check_own(own, Some(&attrs)) {
                        note(Update::Lost(lost));
                    }
                }
                WatchEvent::Delete(key) if key == own.key => {
                    if let Err(lost) = check_own(own, None) {
                        note(Update::Lost(lost));
                    }
                }
                WatchEvent::Apply(key, attrs) => {
                    let before = match peer(key, &attrs) {
                        Some(p) => self.peers.insert(key, p),
                        None => self.peers.remove(&key),
                    };
                    if before.as_ref() != self.peers.get(&key) {
                        note(Update::Changed);
                        self.pending.note(key, before);
                    }
                }
                WatchEvent::Delete(key) => {
                    if let Some(before) = self.peers.remove(&key) {
                        note(Update::Changed);
                        self.pending.note(key, Some(before));
                    }
                }
            }
        }
        update
    }
}

/// A lease as a peer in the family of `A`, when it has a subnet and a VTEP in it.
fn family_peer<A: Address>(key: &LeaseKey, lease: &PeerLease) -> Option<Peer<A>> {
    let subnet = A::net_from(key.subnet(A::FAMILY)?)?;
    let (ip, vtep_mac) = lease.vtep(A::FAMILY)?;
    Some(Peer { subnet, public_ip: A::from_ip(ip)?, vtep_mac })
}

/// A peer node's VTEP in each family its lease carries (the subnets are
/// the lease key's): as compact as each family's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerLease {
    v4: Option<(Ipv4Addr, MacAddr)>,
    v6: Option<(Ipv6Addr, MacAddr)>,
}

impl PeerLease {
    fn vtep(&self, family: Family) -> Option<(IpAddr, MacAddr)> {
        match family {
            Family::V4 => self.v4.map(|(ip, mac)| (ip.into(), mac)),
            Family::V6 => self.v6.map(|(ip, mac)| (ip.into(), mac)),
        }
    }
}

/// A lease as a peer of the dataplane, one half per family; none (and said)
/// when its backend data does not parse or it carries no family at all.
fn peer(key: LeaseKey, attrs: &LeaseAttrs) -> Option<PeerLease> {
    let mut lease = PeerLease::default();
    for family in Family::ALL {
        if key.subnet(family).is_none() {
            continue;
        }
        match attrs.vxlan_peer(family) {
            Ok(Some((public_ip, data))) => match public_ip {
                IpAddr::V4(ip) => lease.v4 = Some((ip, data.vtep_mac)),
                IpAddr::V6(ip) => lease.v6 = Some((ip, data.vtep_mac)),
            },
            Ok(None) => {}
            Err(e) => {
                warn!(lease = %key, %family, error = %e, "skipping peer lease");
                return None;
            }
        }
    }
    (lease != PeerLease::default()).then_some(lease)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::VxlanBackendData;

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
        events.extend(leases.iter().map(|(k, a)| WatchEvent::InitApply(*k, a.clone())));
        events.push(WatchEvent::InitDone);
        events
    }

    #[test]
    fn a_listing_replaces_the_view_and_an_identical_relist_changes_nothing() {
        let own = own();
        let b = (key("10.244.2.0/24"), attrs("192.168.1.2", "02:00:00:00:00:02"));
        let mut view = PeerView::default();
        let first = listing(&[(own.key, own.attrs.clone()), b.clone()]);
        assert_eq!(view.apply(&own, first.clone()), Update::Changed);
        assert_eq!((view.count(), view.listed()), (1, true));
        assert_eq!(view.apply(&own, first), Update::Unchanged, "a 410 relist with nothing new");
        // Mid-listing, the old view stands.
        assert_eq!(view.apply(&own, [WatchEvent::Init]), Update::Unchanged);
        assert_eq!(view.count(), 1);
        assert_eq!(
            view.apply(&own, [WatchEvent::InitApply(own.key, own.attrs.clone()), WatchEvent::InitDone]),
            Update::Changed
        );
        assert_eq!(view.count(), 0, "b was gone in the relist");
    }

    #[test]
    fn changes_to_peers_are_followed() {
        let own = own();
        let mut view = PeerView::default();
        view.apply(&own, listing(&[(own.key, own.attrs.clone())]));
        let k = key("10.244.2.0/24");
        assert_eq!(
            view.apply(&own, [WatchEvent::Apply(k, attrs("192.168.1.2", "02:00:00:00:00:02"))]),
            Update::Changed
        );
        assert_eq!(
            view.apply(&own, [WatchEvent::Apply(k, attrs("192.168.1.2", "02:00:00:00:00:02"))]),
            Update::Unchanged
        );
        assert_eq!(
            view.apply(&own, [WatchEvent::Apply(k, attrs("192.168.1.2", "02:00:00:00:00:03"))]),
            Update::Changed
        );
        assert_eq!(view.apply(&own, [WatchEvent::Delete(k)]), Update::Changed);
        assert_eq!(view.apply(&own, [WatchEvent::Delete(k)]), Update::Unchanged);
    }

    #[test]
    fn dual_stack_leases_are_peers_in_each_family_they_carry() {
        let own = own();
        let mut view = PeerView::default();
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
            WatchEvent::Apply(dual_key, dual),
            WatchEvent::Apply(v4_key, v4_only),
            WatchEvent::Apply(broken_key, broken),
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
        let mut view = PeerView::default();
        let (k2, k3) = (key("10.244.2.0/24"), key("10.244.3.0/24"));
        let a = attrs("192.168.1.2", "02:00:00:00:00:02");
        view.apply(&own, listing(&[(own.key, own.attrs.clone()), (k3, attrs("192.168.1.3", "02:00:00:00:00:03"))]));
        assert!(matches!(view.take_changes(), Pending::Whole), "a listing is planned whole");
        view.apply(&own, [WatchEvent::Apply(k2, a.clone()), WatchEvent::Delete(k3)]);
        view.apply(&own, [WatchEvent::Apply(k2, attrs("192.168.1.2", "02:00:00:00:00:22"))]);
        let Pending::Peers(pending) = view.take_changes() else { panic!("changes are peer by peer") };
        let changes: Vec<PeerChange<Ipv4Addr>> = view.changes(&pending).collect();
        let mac = |m: &str| m.parse::<MacAddr>().unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!((changes[0].before, changes[0].after.map(|p| p.vtep_mac)), (None, Some(mac("02:00:00:00:00:22"))));
        assert_eq!((changes[1].before.map(|p| p.vtep_mac), changes[1].after), (Some(mac("02:00:00:00:00:03")), None));
        assert_eq!(view.changes::<Ipv6Addr>(&pending).count(), 0, "no IPv6 in these leases");
        // Taken: the next plan starts from here. A change undone is no change.
        view.apply(&own, [WatchEvent::Apply(k2, a.clone())]);
        view.apply(&own, [WatchEvent::Apply(k2, attrs("192.168.1.2", "02:00:00:00:00:22"))]);
        let Pending::Peers(pending) = view.take_changes() else { panic!() };
        assert_eq!(view.changes::<Ipv4Addr>(&pending).count(), 0);
    }

    #[test]
    fn our_own_lease_is_checked_in_every_kind_of_event() {
        let own = own();
        let mut view = PeerView::default();
        assert!(matches!(view.apply(&own, listing(&[])), Update::Lost(_)), "missing from the listing");
        assert_eq!(view.apply(&own, [WatchEvent::Apply(own.key, own.attrs.clone())]), Update::Unchanged);
        let taken = attrs("192.168.1.9", "02:00:00:00:00:09");
        assert!(matches!(view.apply(&own, [WatchEvent::Apply(own.key, taken)]), Update::Lost(_)));
        // Lost wins over a peer change in the same batch.
        let batch = [
            WatchEvent::Delete(own.key),
            WatchEvent::Apply(key("10.244.3.0/24"), attrs("192.168.1.3", "02:00:00:00:00:03")),
        ];
        assert!(matches!(view.apply(&own, batch), Update::Lost(_)));
        assert_eq!(view.count(), 1, "the peer change was still taken");
    }
}
