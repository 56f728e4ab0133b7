//! NetworkPolicy, compiled: the pure core of enforcement. The inputs are
//! what the watches hold (policies, pods, namespaces) and this node's name;
//! the output is the [`Ruleset`] the node's nftables table must hold. No
//! I/O here, so every rule of the API's semantics is a unit test.
//!
//! The shape of the output keeps the rule count proportional to the
//! policies, not to pods × pods: each policy rule becomes one nftables rule
//! per family and port entry, matching its pods and peers through named
//! sets. Sets are interned by content, so the thousand policies that select
//! `app=web` share one set of addresses.
//!
//! Semantics (Kubernetes docs, upstream conformance tests):
//! - a pod is isolated for a direction when a policy of its namespace
//!   selects it with that policy type; a pod no policy selects is open;
//! - policies are additive: a packet passes when any rule of any policy
//!   selecting the pod allows it; a packet between two pods must be allowed
//!   by the sender's egress and the receiver's ingress;
//! - replies of allowed connections pass (conntrack, in the chain);
//! - `policyTypes` defaults to Ingress, plus Egress when egress rules exist.
//!
//! A part of a policy that cannot be compiled (a bad CIDR, an unknown
//! protocol, a port name a pod does not declare) allows nothing and is
//! reported as a [`Problem`]; the rest of the policy, and every other
//! policy, is enforced. Failing closed keeps a broken policy from opening
//! what it was meant to restrict.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proto::family::value;
use proto::Family;

use super::cluster_policy;
use super::selector::{Labels, Selector, Str};
use crate::reflector::Store;

/// A transport protocol a policy port names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The API's name (`TCP` when none is given, as the API defaults it).
    pub fn parse(name: Option<&str>) -> Result<Protocol, String> {
        match name.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?} (TCP, UDP or SCTP)")),
        }
    }

    /// Its name in nftables (`meta l4proto tcp`).
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A port a container declares, which named policy ports resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Str,
    pub protocol: Protocol,
    pub port: u16,
}

/// What policy needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// `spec.nodeName` ("" while unscheduled).
    pub node: Str,
    pub labels: Labels,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// Named container ports.
    pub ports: Vec<ContainerPort>,
}

/// A namespace and name.
pub type Key = (String, String);

/// What ClusterNetworkPolicy's `nodes` peer needs of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub labels: Labels,
    /// `status.addresses` that are addresses (InternalIP, ExternalIP).
    pub ips: Vec<IpAddr>,
}

/// What the compiler needs of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceInfo {
    pub labels: Labels,
    /// Its annotation [`LOG_DROPS_ANNOTATION`] is `"true"`: drops of its pods' traffic are logged.
    pub log_drops: bool,
}

/// The Namespace annotation that logs the drops of its pods' traffic (each
/// pod's own direction: what its egress or its ingress policy drops), as
/// `--log-policy-drops` logs every drop of the node.
pub const LOG_DROPS_ANNOTATION: &str = "overlay-net.io/log-policy-drops";

/// Everything the watches hold.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub pods: Store<Key, PodInfo>,
    pub namespaces: Store<String, NamespaceInfo>,
    pub policies: Store<Key, NetworkPolicySpec>,
    /// ClusterNetworkPolicies, by name (listed empty when the CRD is absent).
    pub cluster_policies: Store<String, cluster_policy::Spec>,
    pub nodes: Store<String, NodeInfo>,
}

/// Where a rule stands in the order of evaluation: the Admin tier, then
/// NetworkPolicy, then the Baseline tier, then the default (allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    NetworkPolicy,
    Baseline,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::NetworkPolicy => "NetworkPolicy",
            Tier::Baseline => "Baseline",
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Allowed: no later rule of any tier is asked.
    Accept,
    /// Dropped: no later rule of any tier is asked.
    Deny,
    /// The rest of this tier is skipped: on to the next tier.
    Pass,
}

/// Which way a packet goes, seen from the pod a policy selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// A named set of addresses of one family, as sorted, disjoint, inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrSet {
    pub name: String,
    pub family: Family,
    pub ranges: Vec<(u128, u128)>,
}

/// A named set of (address, protocol, port): a named port resolved per pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet {
    pub name: String,
    pub family: Family,
    pub elements: Vec<(u128, Protocol, u16)>,
}

/// What a rule matches of the transport header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMatch {
    /// Every protocol, every port (a rule without ports).
    Any,
    /// Destination port ranges, by protocol: sorted, disjoint (a port entry
    /// without a port is 0-65535). The port entries of every rule with the
    /// same pods and peers are one list, so a hundred policies that open a
    /// port each for the same peers are one rule, not a hundred in a row.
    Ports(Vec<(Protocol, u16, u16)>),
    /// A named port: the address it belongs to, protocol and port, in this set.
    Named(String),
}

/// Sorts port ranges and merges those of one protocol that overlap or touch
/// (an nftables interval set refuses overlaps).
fn merge_ports(mut ports: Vec<(Protocol, u16, u16)>) -> Vec<(Protocol, u16, u16)> {
    ports.sort_unstable();
    let mut out: Vec<(Protocol, u16, u16)> = Vec::with_capacity(ports.len());
    for (p, s, e) in ports {
        match out.last_mut() {
            Some(last) if last.0 == p && u32::from(s) <= u32::from(last.2) + 1 => last.2 = last.2.max(e),
            _ => out.push((p, s, e)),
        }
    }
    out
}

/// Merges the rules that differ only in their ports into one, in the order
/// their first rule came. Named-port rules stay as they are.
fn group(rules: Vec<Rule>) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::with_capacity(rules.len());
    let mut by_key: HashMap<(Direction, Family, String, Option<String>), usize> = HashMap::new();
    // The policies each rule stands for, for its comment.
    let mut policies: Vec<BTreeSet<String>> = Vec::new();
    for rule in rules {
        let key = (rule.direction, rule.family, rule.pods.clone(), rule.peers.clone());
        match by_key.get(&key) {
            Some(&i) if !matches!(rule.ports, PortMatch::Named(_)) => {
                policies[i].insert(rule.policy);
                let into = &mut out[i];
                into.ports = match (std::mem::replace(&mut into.ports, PortMatch::Any), rule.ports) {
                    (PortMatch::Ports(mut a), PortMatch::Ports(b)) => {
                        a.extend(b);
                        PortMatch::Ports(merge_ports(a))
                    }
                    _ => PortMatch::Any,
                };
            }
            _ => {
                if !matches!(rule.ports, PortMatch::Named(_)) {
                    by_key.insert(key, out.len());
                }
                policies.push(BTreeSet::from([rule.policy.clone()]));
                out.push(rule);
            }
        }
    }
    for (rule, names) in out.iter_mut().zip(policies) {
        if names.len() > 1 {
            rule.policy = format!("{} and {} more", rule.policy, names.len() - 1);
        }
    }
    out
}

/// One allowing rule: packets of `family` whose selected pod is in `pods`
/// and whose other end is in `peers` (any when `None`) pass when the ports match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub direction: Direction,
    pub family: Family,
    pub tier: Tier,
    /// Always `Accept` in the NetworkPolicy tier.
    pub action: Action,
    /// `namespace/name`, or the ClusterNetworkPolicy and rule, for the rule's comment.
    pub policy: String,
    /// The policy rule it comes from (the first, when rules were merged).
    pub origin: Origin,
    pub pods: String,
    pub peers: Option<String>,
    pub ports: PortMatch,
}

/// What the node's policy table must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub sets: Vec<AddrSet>,
    pub port_sets: Vec<PortSet>,
    /// In order: the Admin tier's (by priority, then name, rules as
    /// written); NetworkPolicy's (policies sorted by namespace and name,
    /// rules as written); the Baseline tier's.
    pub rules: Vec<Rule>,
    /// The sets of this node's pods that NetworkPolicy isolates for ingress
    /// (IPv4, IPv6), then egress.
    pub isolated: [String; 4],
    /// The sets of this node's pods any policy applies to (NetworkPolicy's
    /// isolated pods, and ClusterNetworkPolicy's subjects), same order: only
    /// their packets are checked at all.
    pub policed: [String; 4],
    /// Which dropped packets are logged (NFLOG, rate-limited).
    pub log_drops: DropLogging,
}

/// Which of the packets policy drops the table logs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DropLogging {
    #[default]
    Off,
    /// Every one (`--log-policy-drops`).
    All,
    /// Those whose policed pod (the sender for egress, the receiver for
    /// ingress) is one of this node's pods in an annotated namespace: the
    /// sets of their addresses (IPv4, IPv6).
    Pods([String; 2]),
}

impl Ruleset {
    /// The name of the set of this node's pods isolated for a direction, in a family.
    pub fn isolated_set(&self, direction: Direction, family: Family) -> &str {
        &self.isolated[set_index(direction, family)]
    }

    /// The name of the set of this node's pods that some policy applies to, for a direction, in a family.
    pub fn policed_set(&self, direction: Direction, family: Family) -> &str {
        &self.policed[set_index(direction, family)]
    }
}

fn set_index(direction: Direction, family: Family) -> usize {
    2 * usize::from(direction == Direction::Egress) + usize::from(family == Family::V6)
}

fn family_suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

/// The kinds of policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    NetworkPolicy,
    ClusterNetworkPolicy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }
}

/// A rule of a policy: its kind, namespace ("" for a ClusterNetworkPolicy),
/// name, and its index among the policy's rules of its direction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub index: usize,
}

/// A part of a policy that could not be compiled, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: Kind,
    /// `namespace/name`, or a ClusterNetworkPolicy's name.
    pub policy: String,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}: {}", self.kind, self.policy, self.what)
    }
}

/// The compiler's result.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub ruleset: Ruleset,
    pub problems: Vec<Problem>,
    /// Policies that select at least one pod of this node.
    pub policies_in_effect: usize,
    /// This node's pods that some policy isolates.
    pub selected_pods: usize,
}

/// A policy peer, checked.
#[derive(Debug, Clone)]
enum Peer {
    Pods { namespaces: Namespaces, pods: Selector },
    Block { ranges: Vec<(u128, u128)>, family: Family },
}

#[derive(Debug, Clone)]
enum Namespaces {
    /// The policy's own namespace (no namespaceSelector).
    Own,
    Selected(Selector),
}

/// A named port resolved: the address that has it, protocol, port.
type PortElement = (u128, Protocol, u16);

/// A policy rule's peers and ports, for either direction.
type RuleParts<'a> = (Option<&'a Vec<NetworkPolicyPeer>>, Option<&'a Vec<NetworkPolicyPort>>);

/// Interns sets by content, and names each by a hash of it: a set whose
/// content has not changed keeps its name from one ruleset to the next, so
/// the kernel's copy is kept as it is and an update writes only new sets.
#[derive(Default)]
struct Sets {
    addr: HashMap<(Family, Vec<(u128, u128)>), String>,
    ports: HashMap<(Family, Vec<PortElement>), String>,
    names: HashSet<String>,
    out_addr: Vec<AddrSet>,
    out_ports: Vec<PortSet>,
}

impl Sets {
    /// `<prefix><hash>_<family>`, unique even if two contents' hashes collide.
    fn name(&mut self, prefix: char, family: Family, content: &[u8]) -> String {
        let base = format!("{prefix}{:016x}_{}", proto::hash::fnv1a(content), family_suffix(family));
        let mut name = base.clone();
        let mut n = 1;
        while !self.names.insert(name.clone()) {
            name = format!("{base}_{n}");
            n += 1;
        }
        name
    }

    fn addr(&mut self, family: Family, ranges: Vec<(u128, u128)>) -> String {
        if let Some(name) = self.addr.get(&(family, ranges.clone())) {
            return name.clone();
        }
        let bytes: Vec<u8> =
            ranges.iter().flat_map(|(s, e)| s.to_le_bytes().into_iter().chain(e.to_le_bytes())).collect();
        let name = self.name('a', family, &bytes);
        self.out_addr.push(AddrSet { name: name.clone(), family, ranges: ranges.clone() });
        self.addr.insert((family, ranges), name.clone());
        name
    }

    fn ports(&mut self, family: Family, mut elements: Vec<PortElement>) -> String {
        elements.sort_unstable();
        elements.dedup();
        if let Some(name) = self.ports.get(&(family, elements.clone())) {
            return name.clone();
        }
        let bytes: Vec<u8> = elements
            .iter()
            .flat_map(|(a, p, port)| a.to_le_bytes().into_iter().chain([*p as u8]).chain(port.to_le_bytes()))
            .collect();
        let name = self.name('p', family, &bytes);
        self.out_ports.push(PortSet { name: name.clone(), family, elements: elements.clone() });
        self.ports.insert((family, elements), name.clone());
        name
    }
}

/// Sorts ranges and merges those that overlap or touch (nftables refuses
/// overlapping intervals in one set).
pub fn merge(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn range_of(net: &IpNet) -> (u128, u128) {
    let net = net.trunc();
    (value(net.network()), value(net.broadcast()))
}

/// `cidr` minus each of `except`.
fn subtract(range: (u128, u128), except: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut pieces = vec![range];
    for &(xs, xe) in except {
        pieces = pieces
            .into_iter()
            .flat_map(|(s, e)| {
                if xe < s || xs > e {
                    return vec![(s, e)];
                }
                let mut left = Vec::new();
                if xs > s {
                    left.push((s, xs - 1));
                }
                if xe < e {
                    left.push((xe + 1, e));
                }
                left
            })
            .collect();
    }
    pieces
}

/// Compiles every policy for the node `node`.
pub fn compile(view: &ClusterView, node: &str) -> Compiled {
    let mut c =
        Compiler { view, sets: Sets::default(), problems: Vec::new(), rules: Vec::new(), peers: HashMap::new() };
    let mut isolated: Isolation = BTreeMap::new();
    let mut selected_pods: BTreeSet<&Key> = BTreeSet::new();
    let mut policies_in_effect = 0;
    for ((namespace, name), spec) in &view.policies {
        let id = format!("{namespace}/{name}");
        let selector = match spec.pod_selector.as_ref().map(Selector::parse).unwrap_or_else(|| Ok(Selector::default()))
        {
            Ok(s) => s,
            Err(e) => {
                c.problem(&id, format!("podSelector: {e}; the policy selects no pod"));
                continue;
            }
        };
        let selected: Vec<(&Key, &PodInfo)> = view
            .pods
            .range((namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .filter(|(_, p)| &*p.node == node && !p.ips.is_empty() && selector.matches(&p.labels))
            .collect();
        let directions = c.directions(&id, spec);
        if selected.is_empty() || directions.is_empty() {
            continue;
        }
        policies_in_effect += 1;
        selected_pods.extend(selected.iter().map(|(k, _)| *k));
        for direction in directions {
            for family in Family::ALL {
                let ips: Vec<u128> = selected
                    .iter()
                    .flat_map(|(_, p)| &p.ips)
                    .filter(|ip| Family::of(**ip) == family)
                    .map(|ip| value(*ip))
                    .collect();
                isolated.entry((direction, family)).or_default().extend(&ips);
            }
            c.policy_rules(&id, (namespace, name), spec, direction, &selected);
        }
    }
    let network_policy_rules = group(std::mem::take(&mut c.rules));
    let mut policed = isolated.clone();
    let cluster = c.cluster_policies(node, &mut policed);
    policies_in_effect += cluster.in_effect;
    // The isolation sets always exist: the base chain refers to them.
    let isolated = c.isolation_sets(isolated);
    let policed = c.isolation_sets(policed);
    let selected_pods = selected_pods.len() + cluster.subjects.iter().filter(|k| !selected_pods.contains(**k)).count();
    let mut rules = cluster.admin;
    rules.extend(network_policy_rules);
    rules.extend(cluster.baseline);
    let log_drops = c.logged_pods(node);
    let sets = std::mem::take(&mut c.sets);
    c.problems.sort();
    c.problems.dedup();
    Compiled {
        ruleset: Ruleset { sets: sets.out_addr, port_sets: sets.out_ports, rules, isolated, policed, log_drops },
        problems: c.problems,
        policies_in_effect,
        selected_pods,
    }
}

/// Addresses of this node's pods, by direction and family.
type Isolation = BTreeMap<(Direction, Family), BTreeSet<u128>>;

struct Compiler<'a> {
    view: &'a ClusterView,
    /// Pods matched by a list of peers in a namespace: a thousand policies
    /// with the same selectors match the cluster's pods once.
    peers: HashMap<String, std::rc::Rc<Vec<&'a PodInfo>>>,
    sets: Sets,
    problems: Vec<Problem>,
    rules: Vec<Rule>,
}

impl<'a> Compiler<'a> {
    fn problem(&mut self, policy: &str, what: String) {
        self.problems.push(Problem { kind: Kind::NetworkPolicy, policy: policy.to_string(), what });
    }

    /// The four sets of `addresses`, in [`Ruleset::isolated`]'s order.
    fn isolation_sets(&mut self, mut addresses: Isolation) -> [String; 4] {
        let mut names: [String; 4] = Default::default();
        for direction in Direction::ALL {
            for family in Family::ALL {
                let ranges =
                    addresses.remove(&(direction, family)).unwrap_or_default().into_iter().map(|v| (v, v)).collect();
                names[set_index(direction, family)] = self.sets.addr(family, merge(ranges));
            }
        }
        names
    }

    /// The logging of drops the annotated namespaces ask for on `node`.
    fn logged_pods(&mut self, node: &str) -> DropLogging {
        let view = self.view;
        let mut addresses: [Vec<(u128, u128)>; 2] = Default::default();
        for (ns, _) in view.namespaces.iter().filter(|(_, n)| n.log_drops) {
            let pods = view.pods.range((ns.clone(), String::new())..).take_while(|((n, _), _)| n == ns);
            for ip in pods.filter(|(_, p)| &*p.node == node).flat_map(|(_, p)| &p.ips) {
                let v = value(*ip);
                addresses[usize::from(Family::of(*ip) == Family::V6)].push((v, v));
            }
        }
        if addresses.iter().all(|a| a.is_empty()) {
            return DropLogging::Off;
        }
        let [v4, v6] = addresses;
        DropLogging::Pods([self.sets.addr(Family::V4, merge(v4)), self.sets.addr(Family::V6, merge(v6))])
    }

    /// `policyTypes`, or its default.
    fn directions(&mut self, id: &str, spec: &NetworkPolicySpec) -> Vec<Direction> {
        match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                let mut out = Vec::new();
                for t in types {
                    match t.as_str() {
                        "Ingress" => out.push(Direction::Ingress),
                        "Egress" => out.push(Direction::Egress),
                        other => self.problem(id, format!("unknown policyType {other:?} (Ingress or Egress) ignored")),
                    }
                }
                out.sort();
                out.dedup();
                out
            }
            _ => {
                let mut out = vec![Direction::Ingress];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    out.push(Direction::Egress);
                }
                out
            }
        }
    }

    fn policy_rules(
        &mut self,
        id: &str,
        (namespace, name): (&str, &str),
        spec: &NetworkPolicySpec,
        direction: Direction,
        selected: &[(&Key, &PodInfo)],
    ) {
        let rules: Vec<RuleParts<'_>> = match direction {
            Direction::Ingress => spec.ingress.iter().flatten().map(|r| (r.from.as_ref(), r.ports.as_ref())).collect(),
            Direction::Egress => spec.egress.iter().flatten().map(|r| (r.to.as_ref(), r.ports.as_ref())).collect(),
        };
        for (index, (peers, ports)) in rules.into_iter().enumerate() {
            let origin = Origin { kind: Kind::NetworkPolicy, namespace: namespace.into(), name: name.into(), index };
            let peers: Option<Vec<Peer>> =
                peers.filter(|p| !p.is_empty()).map(|p| p.iter().filter_map(|peer| self.peer(id, peer)).collect());
            let peer_pods = peers.as_ref().map(|peers| {
                let key = format!("{namespace}|{peers:?}");
                if let Some(hit) = self.peers.get(&key) {
                    return hit.clone();
                }
                let pods = std::rc::Rc::new(self.peer_pods(namespace, peers));
                self.peers.insert(key, pods.clone());
                pods
            });
            for family in Family::ALL {
                let pod_ips: Vec<u128> = selected
                    .iter()
                    .flat_map(|(_, p)| &p.ips)
                    .filter(|ip| Family::of(**ip) == family)
                    .map(|ip| value(*ip))
                    .collect();
                if pod_ips.is_empty() {
                    continue;
                }
                let peer_ranges = peers.as_ref().map(|peers| {
                    let mut ranges: Vec<(u128, u128)> = peer_pods
                        .iter()
                        .flat_map(|pods| pods.iter())
                        .flat_map(|p| &p.ips)
                        .filter(|ip| Family::of(**ip) == family)
                        .map(|ip| (value(*ip), value(*ip)))
                        .collect();
                    for peer in peers {
                        if let Peer::Block { ranges: r, family: f } = peer {
                            if *f == family {
                                ranges.extend(r);
                            }
                        }
                    }
                    merge(ranges)
                });
                if peer_ranges.as_ref().is_some_and(|r| r.is_empty()) {
                    continue;
                }
                let pods_set = self.sets.addr(family, merge(pod_ips.iter().map(|v| (*v, *v)).collect()));
                let peers_set = peer_ranges.map(|r| self.sets.addr(family, r));
                let entries: Vec<Option<&NetworkPolicyPort>> = match ports {
                    Some(p) if !p.is_empty() => p.iter().map(Some).collect(),
                    _ => vec![None],
                };
                for entry in entries {
                    let Some(port) = self.port(id, entry) else { continue };
                    let (ports, peers) = match port {
                        PortSpec::Match(m) => (m, peers_set.clone()),
                        PortSpec::Named(name, protocol) => {
                            // Ingress: the selected pod's port. Egress: the
                            // destination pod's, so the set holds the
                            // destinations and stands for the peers too.
                            let owners: Vec<&PodInfo> = match direction {
                                Direction::Ingress => selected.iter().map(|(_, p)| *p).collect(),
                                Direction::Egress => match &peer_pods {
                                    Some(pods) => pods.to_vec(),
                                    None => self.view.pods.values().collect(),
                                },
                            };
                            let mut missing = 0;
                            let mut elements = Vec::new();
                            for pod in owners {
                                match pod.ports.iter().find(|p| *p.name == *name && p.protocol == protocol) {
                                    Some(p) => elements.extend(
                                        pod.ips
                                            .iter()
                                            .filter(|ip| Family::of(**ip) == family)
                                            .map(|ip| (value(*ip), protocol, p.port)),
                                    ),
                                    None => missing += 1,
                                }
                            }
                            if direction == Direction::Ingress && missing > 0 {
                                self.problem(
                                    id,
                                    format!(
                                        "{missing} selected pod(s) on this node declare no {} port named {name:?}; \
                                         that port stays closed on them",
                                        protocol.nft().to_uppercase()
                                    ),
                                );
                            }
                            if elements.is_empty() {
                                continue;
                            }
                            let set = self.sets.ports(family, elements);
                            let peers = match direction {
                                Direction::Ingress => peers_set.clone(),
                                Direction::Egress => None,
                            };
                            (PortMatch::Named(set), peers)
                        }
                    };
                    self.rules.push(Rule {
                        direction,
                        family,
                        tier: Tier::NetworkPolicy,
                        action: Action::Accept,
                        policy: id.to_string(),
                        origin: origin.clone(),
                        pods: pods_set.clone(),
                        peers,
                        ports,
                    });
                }
            }
        }
    }

    /// Pods (anywhere in the cluster) that the pod peers match. Pods are
    /// keyed by namespace first, so a peer limited to some namespaces reads
    /// only their pods; only a namespace selector that an unlabelled
    /// namespace would match (`{}`, `NotIn`, `DoesNotExist`) reads them all.
    fn peer_pods(&self, namespace: &str, peers: &[Peer]) -> Vec<&'a PodInfo> {
        let view = self.view;
        let no_labels = Labels::new();
        let mut out: Vec<&'a PodInfo> = Vec::new();
        let mut seen: BTreeSet<&'a Key> = BTreeSet::new();
        let in_namespace =
            |ns: String| view.pods.range((ns.clone(), String::new())..).take_while(move |((n, _), _)| *n == ns);
        for peer in peers {
            let Peer::Pods { namespaces, pods } = peer else { continue };
            let candidates: Box<dyn Iterator<Item = (&'a Key, &'a PodInfo)>> = match namespaces {
                Namespaces::Own => Box::new(in_namespace(namespace.to_string())),
                Namespaces::Selected(sel) if sel.matches(&no_labels) => {
                    Box::new(view.pods.iter().filter(|((ns, _), _)| {
                        sel.matches(view.namespaces.get(ns).map(|n| &n.labels).unwrap_or(&no_labels))
                    }))
                }
                Namespaces::Selected(sel) => Box::new(
                    view.namespaces
                        .iter()
                        .filter(|(_, n)| sel.matches(&n.labels))
                        .flat_map(move |(ns, _)| in_namespace(ns.clone())),
                ),
            };
            for (key, p) in candidates {
                if pods.matches(&p.labels) && seen.insert(key) {
                    out.push(p);
                }
            }
        }
        out
    }

    fn peer(&mut self, id: &str, peer: &NetworkPolicyPeer) -> Option<Peer> {
        if let Some(block) = &peer.ip_block {
            let cidr: IpNet = match block.cidr.parse() {
                Ok(c) => c,
                Err(_) => {
                    self.problem(id, format!("ipBlock cidr {:?} is not a CIDR; that peer allows nothing", block.cidr));
                    return None;
                }
            };
            let family = Family::of_net(&cidr);
            let mut except = Vec::new();
            for x in block.except.iter().flatten() {
                match x.parse::<IpNet>() {
                    Ok(x) if Family::of_net(&x) == family => except.push(range_of(&x)),
                    _ => {
                        self.problem(
                            id,
                            format!("ipBlock except {x:?} is not a CIDR of {cidr}'s family; that peer allows nothing"),
                        );
                        return None;
                    }
                }
            }
            return Some(Peer::Block { ranges: subtract(range_of(&cidr), &except), family });
        }
        let pods = match peer.pod_selector.as_ref().map(Selector::parse).unwrap_or_else(|| Ok(Selector::default())) {
            Ok(s) => s,
            Err(e) => {
                self.problem(id, format!("peer podSelector: {e}; that peer allows nothing"));
                return None;
            }
        };
        let namespaces = match &peer.namespace_selector {
            None if peer.pod_selector.is_none() => {
                self.problem(id, "a peer with no selector and no ipBlock allows nothing".into());
                return None;
            }
            None => Namespaces::Own,
            Some(s) => match Selector::parse(s) {
                Ok(s) => Namespaces::Selected(s),
                Err(e) => {
                    self.problem(id, format!("peer namespaceSelector: {e}; that peer allows nothing"));
                    return None;
                }
            },
        };
        Some(Peer::Pods { namespaces, pods })
    }

    fn port(&mut self, id: &str, port: Option<&NetworkPolicyPort>) -> Option<PortSpec> {
        let Some(port) = port else { return Some(PortSpec::Match(PortMatch::Any)) };
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                self.problem(id, format!("{e}; that port allows nothing"));
                return None;
            }
        };
        let number = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
        match &port.port {
            None if port.end_port.is_some() => {
                self.problem(id, "endPort without port; that port allows nothing".into());
                None
            }
            None => Some(PortSpec::Match(PortMatch::Ports(vec![(protocol, 0, u16::MAX)]))),
            Some(IntOrString::Int(n)) => {
                let Some(start) = number(*n) else {
                    self.problem(id, format!("port {n} is not in 1-65535; that port allows nothing"));
                    return None;
                };
                let end = match port.end_port {
                    None => start,
                    Some(e) => match number(e).filter(|e| *e >= start) {
                        Some(e) => e,
                        None => {
                            self.problem(id, format!("endPort {e} is not in {start}-65535; that port allows nothing"));
                            return None;
                        }
                    },
                };
                Some(PortSpec::Match(PortMatch::Ports(vec![(protocol, start, end)])))
            }
            Some(IntOrString::String(name)) => {
                if let Ok(n) = name.parse::<i32>() {
                    return self.port(id, Some(&NetworkPolicyPort { port: Some(IntOrString::Int(n)), ..port.clone() }));
                }
                if port.end_port.is_some() {
                    self.problem(id, format!("endPort with the named port {name:?}; that port allows nothing"));
                    return None;
                }
                Some(PortSpec::Named(name.clone(), protocol))
            }
        }
    }
}

enum PortSpec {
    Match(PortMatch),
    Named(String, Protocol),
}

mod cluster;

#[cfg(test)]
pub(crate) mod tests;
