//! The pure core: what the kernel must hold for a set of peers, and the
//! operations that take what it does hold there.
//!
//! Every trigger (a watch event, start-up, a resync, a vanished device) goes
//! through `plan` → `diff` → apply, so there is exactly one reconcile path.
//! A watch event plans only the peers it changed (`delta`), against the
//! whole plan the node last applied; what it gives is exactly the whole
//! plan's change (a property test holds it to that), at a cost in
//! proportion to the change rather than to every peer.
//!
//! Family-generic: every type and function here is generic over the
//! family's address type (`Ipv4Addr`, `Ipv6Addr`; `proto::Address`), so a
//! dual-stack node plans each family with the same two functions, and an
//! IPv4 entry stays as small as an IPv4 address.

use std::collections::BTreeMap;

use proto::{Address, MacAddr};

/// A peer node, in one family, as the dataplane needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<A: Address> {
    /// The peer's pod subnet.
    pub subnet: A::Net,
    /// Its underlay address: VXLAN packets for its pods go there.
    pub public_ip: A,
    /// The MAC of its VXLAN device of this family.
    pub vtep_mac: MacAddr,
}

/// How packets for a peer's subnet leave this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteVia<A> {
    /// Encapsulated: `via <subnet network address> dev overlay.1 onlink`.
    Vxlan(A),
    /// Plain routing to a peer on our L2 segment: `via <public ip>` (DirectRouting).
    Direct(A),
    /// A route on our VXLAN device that another program made: flanneld, on
    /// the device we adopted from it. Read, never planned: so it is replaced
    /// by ours, or deleted.
    Adopted(A),
}

/// Kernel entries for the overlay in one family, desired or actual.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelState<A: Address> {
    /// Neighbour (ARP/NDP) entries on the VXLAN device: peer gateway → VTEP MAC.
    pub neighbours: BTreeMap<A, MacAddr>,
    /// FDB entries on the VXLAN device: VTEP MAC → peer underlay address.
    pub fdb: BTreeMap<MacAddr, A>,
    /// Routes to peer subnets.
    pub routes: BTreeMap<A::Net, RouteVia<A>>,
}

impl<A: Address> Default for KernelState<A> {
    fn default() -> Self {
        KernelState { neighbours: BTreeMap::new(), fdb: BTreeMap::new(), routes: BTreeMap::new() }
    }
}

impl<A: Address> KernelState<A> {
    /// How many entries: neighbours, FDB entries and routes.
    pub fn entry_count(&self) -> usize {
        self.neighbours.len() + self.fdb.len() + self.routes.len()
    }
}

/// What this node knows about its own place in the overlay, in one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local<A: Address> {
    /// Our own pod subnet; never programmed as a peer.
    pub subnet: A::Net,
    /// Our underlay address and prefix, to decide which peers are directly reachable.
    pub underlay: A::Net,
    /// Whether DirectRouting is on.
    pub direct_routing: bool,
}

/// One change to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<A: Address> {
    /// Add or replace a neighbour entry.
    SetNeighbour(A, MacAddr),
    /// Remove a neighbour entry.
    DelNeighbour(A, MacAddr),
    /// Add or replace an FDB entry.
    SetFdb(MacAddr, A),
    /// Remove an FDB entry.
    DelFdb(MacAddr, A),
    /// Replace a route of ours.
    SetRoute(A::Net, RouteVia<A>),
    /// Add a route where we hold none: never over one we did not make (the
    /// underlay's connected route, an operator's static route), which the
    /// kernel then refuses.
    AddRoute(A::Net, RouteVia<A>),
    /// Remove a route.
    DelRoute(A::Net, RouteVia<A>),
}

/// The gateway a peer subnet is reached through on the VXLAN device: its
/// network address (`10.244.7.0`, `fd00:10:244:7::`), as flannel uses.
pub fn vxlan_gateway<A: Address>(subnet: A::Net) -> A {
    A::network(&subnet)
}

/// The entries of one peer: its route, and for a peer reached through the
/// VXLAN device, its neighbour and FDB entry. None for a peer that is us.
struct PeerEntries<A: Address> {
    route: (A::Net, RouteVia<A>),
    vxlan: Option<((A, MacAddr), (MacAddr, A))>,
}

impl<A: Address> Local<A> {
    fn entries_of(&self, peer: &Peer<A>) -> Option<PeerEntries<A>> {
        if peer.subnet == self.subnet || A::contains(&peer.subnet, A::network(&self.subnet)) {
            return None;
        }
        let direct = self.direct_routing
            && A::contains(&self.underlay, peer.public_ip)
            && peer.public_ip != A::addr(&self.underlay);
        if direct {
            return Some(PeerEntries { route: (peer.subnet, RouteVia::Direct(peer.public_ip)), vxlan: None });
        }
        let gateway = vxlan_gateway::<A>(peer.subnet);
        Some(PeerEntries {
            route: (peer.subnet, RouteVia::Vxlan(gateway)),
            vxlan: Some(((gateway, peer.vtep_mac), (peer.vtep_mac, peer.public_ip))),
        })
    }
}

/// A plan of every peer's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned<A: Address> {
    /// The node's place it was planned for (none: a family that is off).
    pub local: Option<Local<A>>,
    /// The entries.
    pub state: KernelState<A>,
    /// Whether two peers claim one entry (the same subnet, gateway or VTEP
    /// MAC: only a damaged store has that). The later peer's entry wins then,
    /// and a change of either can only be planned whole.
    pub contested: bool,
}

/// The entries the kernel must hold for `peers`, and whether two peers claim one.
pub fn plan<A: Address>(local: &Local<A>, peers: impl IntoIterator<Item = Peer<A>>) -> Planned<A> {
    let mut state = KernelState::default();
    let mut contested = false;
    for entries in peers.into_iter().filter_map(|peer| local.entries_of(&peer)) {
        contested |= state.routes.insert(entries.route.0, entries.route.1).is_some();
        if let Some(((ip, mac), (fdb_mac, dst))) = entries.vxlan {
            contested |= state.neighbours.insert(ip, mac).is_some();
            contested |= state.fdb.insert(fdb_mac, dst).is_some();
        }
    }
    Planned { local: Some(*local), state, contested }
}

/// One peer's change, in one family: as the last plan had it, and as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerChange<A: Address> {
    /// The peer before (none: it is new).
    pub before: Option<Peer<A>>,
    /// The peer now (none: it is gone).
    pub after: Option<Peer<A>>,
}

/// A change of a plan that touches only some of its entries: what those
/// entries were, and what they become. Everything else stays as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta<A: Address> {
    /// The changed entries as they were.
    pub before: KernelState<A>,
    /// The changed entries as they become.
    pub after: KernelState<A>,
}

impl<A: Address> Planned<A> {
    /// The plan of a family that is off: nothing.
    pub fn nothing() -> Self {
        Planned { local: None, state: KernelState::default(), contested: false }
    }
}

impl<A: Address> Default for Delta<A> {
    fn default() -> Self {
        Delta { before: KernelState::default(), after: KernelState::default() }
    }
}

impl<A: Address> Delta<A> {
    /// The operations that take a node holding the old plan to the new one, in `diff`'s safe order.
    pub fn ops(&self) -> Vec<Op<A>> {
        diff(&self.after, &self.before)
    }

    /// Makes `state` (the old plan) the new one.
    pub fn apply_to(self, state: &mut KernelState<A>) {
        for ip in self.before.neighbours.keys() {
            state.neighbours.remove(ip);
        }
        for mac in self.before.fdb.keys() {
            state.fdb.remove(mac);
        }
        for subnet in self.before.routes.keys() {
            state.routes.remove(subnet);
        }
        state.neighbours.extend(self.after.neighbours);
        state.fdb.extend(self.after.fdb);
        state.routes.extend(self.after.routes);
    }
}

/// The part of the plan that `changes` change, at a cost in proportion to
/// them rather than to every peer: `planned` is the whole plan of the peers
/// as they were. None when the peers cannot be planned one at a time: the
/// plan was contested, or a change would make it so (a new peer claims an
/// entry another peer holds). A whole plan decides then.
pub fn delta<A: Address>(
    local: &Local<A>,
    planned: &Planned<A>,
    changes: impl IntoIterator<Item = PeerChange<A>>,
) -> Option<Delta<A>> {
    if planned.contested || planned.local != Some(*local) {
        return None;
    }
    let state = &planned.state;
    let mut delta = Delta::default();
    let mut added = Vec::new();
    // Every entry a changed peer held goes; with no contest, each is that peer's alone.
    for change in changes {
        if let Some(entries) = change.before.and_then(|p| local.entries_of(&p)) {
            let (subnet, via) = entries.route;
            if state.routes.get(&subnet) != Some(&via) || delta.before.routes.insert(subnet, via).is_some() {
                return None;
            }
            if let Some(((ip, mac), (fdb_mac, dst))) = entries.vxlan {
                if state.neighbours.get(&ip) != Some(&mac)
                    || state.fdb.get(&fdb_mac) != Some(&dst)
                    || delta.before.neighbours.insert(ip, mac).is_some()
                    || delta.before.fdb.insert(fdb_mac, dst).is_some()
                {
                    return None;
                }
            }
        }
        added.extend(change.after.and_then(|p| local.entries_of(&p)));
    }
    // Then every entry a changed peer holds now comes, where no other peer holds one.
    let free = |held: bool, going: bool| !held || going;
    for entries in added {
        let (subnet, via) = entries.route;
        if !free(state.routes.contains_key(&subnet), delta.before.routes.contains_key(&subnet))
            || delta.after.routes.insert(subnet, via).is_some()
        {
            return None;
        }
        if let Some(((ip, mac), (fdb_mac, dst))) = entries.vxlan {
            if !free(state.neighbours.contains_key(&ip), delta.before.neighbours.contains_key(&ip))
                || !free(state.fdb.contains_key(&fdb_mac), delta.before.fdb.contains_key(&fdb_mac))
                || delta.after.neighbours.insert(ip, mac).is_some()
                || delta.after.fdb.insert(fdb_mac, dst).is_some()
            {
                return None;
            }
        }
    }
    Some(delta)
}

/// The operations that turn `actual` into `desired`, in a safe order:
/// stale routes go first; then neighbours, FDB entries and routes are added
/// (route last, so the kernel never has to ARP for a gateway); then stale FDB
/// and neighbour entries go.
pub fn diff<A: Address>(desired: &KernelState<A>, actual: &KernelState<A>) -> Vec<Op<A>> {
    let mut ops = Vec::new();
    for (subnet, via) in &actual.routes {
        if !desired.routes.contains_key(subnet) {
            ops.push(Op::DelRoute(*subnet, *via));
        }
    }
    for (ip, mac) in &desired.neighbours {
        if actual.neighbours.get(ip) != Some(mac) {
            ops.push(Op::SetNeighbour(*ip, *mac));
        }
    }
    for (mac, dst) in &desired.fdb {
        if actual.fdb.get(mac) != Some(dst) {
            ops.push(Op::SetFdb(*mac, *dst));
        }
    }
    for (subnet, via) in &desired.routes {
        match actual.routes.get(subnet) {
            Some(held) if held == via => {}
            Some(_) => ops.push(Op::SetRoute(*subnet, *via)),
            None => ops.push(Op::AddRoute(*subnet, *via)),
        }
    }
    for (mac, dst) in &actual.fdb {
        if !desired.fdb.contains_key(mac) {
            ops.push(Op::DelFdb(*mac, *dst));
        }
    }
    for (ip, mac) in &actual.neighbours {
        if !desired.neighbours.contains_key(ip) {
            ops.push(Op::DelNeighbour(*ip, *mac));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    type Peer4 = Peer<Ipv4Addr>;

    /// The entries of a whole plan.
    fn plan<A: Address>(local: &Local<A>, peers: impl IntoIterator<Item = Peer<A>>) -> KernelState<A> {
        super::plan(local, peers).state
    }
    type Peer6 = Peer<Ipv6Addr>;

    fn local() -> Local<Ipv4Addr> {
        Local {
            subnet: "10.244.33.0/24".parse().unwrap(),
            underlay: "192.168.50.11/24".parse().unwrap(),
            direct_routing: false,
        }
    }

    fn peer(third: u8, host: u8, mac: &str) -> Peer4 {
        Peer {
            subnet: format!("10.244.{third}.0/24").parse().unwrap(),
            public_ip: Ipv4Addr::new(192, 168, 50, host),
            vtep_mac: mac.parse().unwrap(),
        }
    }

    fn local6() -> Local<Ipv6Addr> {
        Local {
            subnet: "fd00:10:244:8::/64".parse().unwrap(),
            underlay: "fd00:50::11/64".parse().unwrap(),
            direct_routing: false,
        }
    }

    fn peer6(subnet: u16, host: u16, mac: &str) -> Peer6 {
        Peer {
            subnet: format!("fd00:10:244:{subnet:x}::/64").parse().unwrap(),
            public_ip: Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, host),
            vtep_mac: mac.parse().unwrap(),
        }
    }

    /// The IPv6 entries flanneld v0.20.2 programmed on a dual-stack node (shared/compat).
    #[test]
    fn golden_flannel_dual_stack_node_state() {
        let peers = [
            peer6(0x18, 0x12, "d2:69:e8:6a:1c:03"),
            peer6(0x29, 0x13, "96:83:fb:1c:fc:87"),
            peer6(8, 0x11, "fe:e4:ca:57:1c:83"),
        ];
        let s = plan(&local6(), peers);
        let neigh: Vec<_> = s.neighbours.iter().map(|(ip, mac)| format!("{ip} lladdr {mac}")).collect();
        assert_eq!(neigh, ["fd00:10:244:18:: lladdr d2:69:e8:6a:1c:03", "fd00:10:244:29:: lladdr 96:83:fb:1c:fc:87"]);
        let fdb: Vec<_> = s.fdb.iter().map(|(mac, dst)| format!("{mac} dst {dst}")).collect();
        assert_eq!(fdb, ["96:83:fb:1c:fc:87 dst fd00:50::13", "d2:69:e8:6a:1c:03 dst fd00:50::12"]);
        let routes: Vec<_> = s.routes.iter().map(|(n, v)| format!("{n} {v:?}")).collect();
        assert_eq!(
            routes,
            ["fd00:10:244:18::/64 Vxlan(fd00:10:244:18::)", "fd00:10:244:29::/64 Vxlan(fd00:10:244:29::)"]
        );
        let mut d = local6();
        d.direct_routing = true;
        let s = plan(&d, peers);
        assert_eq!(s.routes[&"fd00:10:244:18::/64".parse().unwrap()], RouteVia::Direct("fd00:50::12".parse().unwrap()));
        assert!(s.fdb.is_empty());
    }

    /// The entries flanneld v0.20.2 programmed on node 1 (shared/compat).
    #[test]
    fn golden_flannel_node_state() {
        let peers =
            [peer(92, 12, "52:58:c0:08:52:6d"), peer(55, 13, "de:88:2d:39:68:fa"), peer(33, 11, "b2:5e:e8:32:3a:be")];
        let s = plan(&local(), peers);
        let neigh: Vec<_> = s.neighbours.iter().map(|(ip, mac)| format!("{ip} lladdr {mac}")).collect();
        assert_eq!(neigh, ["10.244.55.0 lladdr de:88:2d:39:68:fa", "10.244.92.0 lladdr 52:58:c0:08:52:6d"]);
        let fdb: Vec<_> = s.fdb.iter().map(|(mac, dst)| format!("{mac} dst {dst}")).collect();
        assert_eq!(fdb, ["52:58:c0:08:52:6d dst 192.168.50.12", "de:88:2d:39:68:fa dst 192.168.50.13"]);
        let routes: Vec<_> = s.routes.iter().map(|(n, v)| format!("{n} {v:?}")).collect();
        assert_eq!(routes, ["10.244.55.0/24 Vxlan(10.244.55.0)", "10.244.92.0/24 Vxlan(10.244.92.0)"]);
    }

    #[test]
    fn direct_routing_only_on_same_segment() {
        let mut l = local();
        l.direct_routing = true;
        let mut far = peer(7, 1, "02:00:00:00:00:07");
        far.public_ip = "172.16.0.1".parse().unwrap();
        let s = plan(&l, [peer(92, 12, "52:58:c0:08:52:6d"), far]);
        assert_eq!(s.routes[&"10.244.92.0/24".parse().unwrap()], RouteVia::Direct("192.168.50.12".parse().unwrap()));
        assert_eq!(s.routes[&"10.244.7.0/24".parse().unwrap()], RouteVia::Vxlan("10.244.7.0".parse().unwrap()));
        assert_eq!(s.fdb.len(), 1);
    }

    #[test]
    fn changed_mac_replaces_and_removes_old_entries() {
        let before = plan(&local(), [peer(92, 12, "52:58:c0:08:52:6d")]);
        let after = plan(&local(), [peer(92, 14, "02:11:22:33:44:55")]);
        let ops = diff(&after, &before);
        assert_eq!(
            ops,
            vec![
                Op::SetNeighbour("10.244.92.0".parse().unwrap(), "02:11:22:33:44:55".parse().unwrap()),
                Op::SetFdb("02:11:22:33:44:55".parse().unwrap(), "192.168.50.14".parse().unwrap()),
                Op::DelFdb("52:58:c0:08:52:6d".parse().unwrap(), "192.168.50.12".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn removal_order_is_route_first() {
        let before = plan(&local(), [peer(92, 12, "52:58:c0:08:52:6d")]);
        let ops = diff(&KernelState::default(), &before);
        assert!(matches!(ops[0], Op::DelRoute(..)));
        assert!(matches!(ops[1], Op::DelFdb(..)));
        assert!(matches!(ops[2], Op::DelNeighbour(..)));
        let adds = diff(&before, &KernelState::default());
        assert!(matches!(adds[0], Op::SetNeighbour(..)));
        assert!(matches!(adds[1], Op::SetFdb(..)));
        assert!(matches!(adds[2], Op::AddRoute(..)), "never over a route that is not ours");
        let moved = plan(&local(), [peer(92, 13, "52:58:c0:08:52:6d")]);
        let local_direct = Local { direct_routing: true, ..local() };
        let direct = plan(&local_direct, [peer(92, 13, "52:58:c0:08:52:6d")]);
        assert!(diff(&direct, &moved).iter().any(|op| matches!(op, Op::SetRoute(..))), "ours is replaced");
    }

    #[test]
    fn a_route_flanneld_left_on_our_device_is_replaced_by_ours_or_deleted() {
        let planned = plan(&local(), [peer(92, 12, "52:58:c0:08:52:6d")]);
        let mut held = planned.clone();
        let subnet = "10.244.92.0/24".parse().unwrap();
        held.routes.insert(subnet, RouteVia::Adopted("10.244.92.0".parse().unwrap()));
        assert_eq!(diff(&planned, &held), vec![Op::SetRoute(subnet, RouteVia::Vxlan("10.244.92.0".parse().unwrap()))]);
        let stale = diff(&KernelState::default(), &held);
        assert!(stale.contains(&Op::DelRoute(subnet, RouteVia::Adopted("10.244.92.0".parse().unwrap()))), "{stale:?}");
    }

    #[test]
    fn a_delta_touches_only_the_changed_peers_and_a_clash_is_planned_whole() {
        let a = peer(92, 12, "52:58:c0:08:52:6d");
        let b = peer(55, 13, "de:88:2d:39:68:fa");
        let planned = super::plan(&local(), [a]);
        let d = delta(&local(), &planned, [PeerChange { before: None, after: Some(b) }]).unwrap();
        assert_eq!(d.before.entry_count(), 0);
        assert_eq!(d.ops(), diff(&plan(&local(), [a, b]), &planned.state));
        let gone = delta(&local(), &planned, [PeerChange { before: Some(a), after: None }]).unwrap();
        assert_eq!(gone.ops().len(), 3);
        // A new peer with a's VTEP MAC: whichever wins, only a whole plan can say.
        let clash = Peer { vtep_mac: a.vtep_mac, ..b };
        assert_eq!(delta(&local(), &planned, [PeerChange { before: None, after: Some(clash) }]), None);
        assert!(super::plan(&local(), [a, clash]).contested);
        // Unless a gives the MAC up in the same change.
        let moved = [PeerChange { before: Some(a), after: None }, PeerChange { before: None, after: Some(clash) }];
        assert!(delta(&local(), &planned, moved).is_some());
    }

    fn apply(state: &mut KernelState<Ipv4Addr>, ops: &[Op<Ipv4Addr>]) {
        for op in ops {
            match *op {
                Op::SetNeighbour(ip, mac) => {
                    state.neighbours.insert(ip, mac);
                }
                Op::DelNeighbour(ip, _) => {
                    state.neighbours.remove(&ip);
                }
                Op::SetFdb(mac, dst) => {
                    state.fdb.insert(mac, dst);
                }
                Op::DelFdb(mac, _) => {
                    state.fdb.remove(&mac);
                }
                Op::SetRoute(n, v) | Op::AddRoute(n, v) => {
                    state.routes.insert(n, v);
                }
                Op::DelRoute(n, _) => {
                    state.routes.remove(&n);
                }
            }
        }
    }

    fn peers_strategy() -> impl Strategy<Value = Vec<Peer4>> {
        proptest::collection::vec((1u8..255, 1u8..20, any::<[u8; 6]>()), 0..30).prop_map(|v| {
            v.into_iter()
                .map(|(third, host, mac)| Peer {
                    subnet: format!("10.244.{third}.0/24").parse().unwrap(),
                    public_ip: Ipv4Addr::new(192, 168, 50, host),
                    vtep_mac: MacAddr([2, 0, 0, third, mac[4], mac[5]]),
                })
                .collect()
        })
    }

    /// Peers keyed by subnet, as the peer view holds them, from a few
    /// subnets, hosts and MACs, so that changes collide and contests happen.
    fn peer_sets() -> impl Strategy<Value = Vec<BTreeMap<u8, Peer4>>> {
        let peer = (1u8..12, 1u8..8, 1u8..10).prop_map(|(third, host, mac)| Peer {
            subnet: format!("10.244.{third}.0/24").parse().unwrap(),
            public_ip: Ipv4Addr::new(192, 168, 50, host),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, mac]),
        });
        let set = proptest::collection::vec((0u8..12, proptest::option::of(peer)), 0..12);
        proptest::collection::vec(set, 1..6).prop_map(|steps| {
            let mut view = BTreeMap::new();
            steps
                .into_iter()
                .map(|changes| {
                    for (key, peer) in changes {
                        match peer {
                            Some(p) => view.insert(key, p),
                            None => view.remove(&key),
                        };
                    }
                    view.clone()
                })
                .collect()
        })
    }

    proptest! {
        /// Planning the changes alone gives the whole plan, step after step,
        /// and its operations take the old plan's kernel to the new plan's.
        #[test]
        fn a_delta_is_the_whole_plan_s_change(steps in peer_sets(), direct in any::<bool>()) {
            let local = Local { direct_routing: direct, ..local() };
            let mut view: BTreeMap<u8, Peer4> = BTreeMap::new();
            let mut planned = super::plan(&local, []);
            for next in steps {
                let changes: Vec<_> = view
                    .keys()
                    .chain(next.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .map(|k| PeerChange { before: view.get(k).copied(), after: next.get(k).copied() })
                    .filter(|c| c.before != c.after)
                    .collect();
                let whole = super::plan(&local, next.values().copied());
                match delta(&local, &planned, changes) {
                    Some(d) => {
                        prop_assert!(!whole.contested, "a contest must be planned whole");
                        let mut kernel = planned.state.clone();
                        apply(&mut kernel, &d.ops());
                        prop_assert_eq!(&kernel, &whole.state);
                        d.apply_to(&mut planned.state);
                        prop_assert_eq!(&planned, &whole);
                    }
                    None => {
                        prop_assert!(planned.contested || whole.contested, "planned whole without a contest");
                        planned = whole;
                    }
                }
                view = next;
            }
        }

        /// Applying the diff always reaches the plan, and a second diff is empty.
        #[test]
        fn diff_converges(a in peers_strategy(), b in peers_strategy()) {
            let mut state = plan(&local(), a);
            let desired = plan(&local(), b);
            let ops = diff(&desired, &state);
            apply(&mut state, &ops);
            prop_assert_eq!(&state, &desired);
            prop_assert!(diff(&desired, &state).is_empty());
        }
    }
}
