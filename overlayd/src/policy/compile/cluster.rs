//! ClusterNetworkPolicy, compiled into the same [`Ruleset`] as
//! NetworkPolicy: rules with a tier and an action, in the order the API
//! evaluates them (Admin by priority, NetworkPolicy, Baseline by priority;
//! within a policy, rules as written). The table puts them in their chains.
//!
//! Two policies of one tier at one priority: the API leaves their order
//! undefined. overlay orders them by name, and says so once.
//!
//! Failing closed, as the API asks: a peer or protocol this version cannot
//! read (a field of a newer CRD, `domainNames`, which overlay does not
//! resolve) matches nothing in an `Accept` rule and makes a `Deny` or
//! `Pass` rule deny everything. An unknown action denies what its rule
//! matches. A policy with an unknown tier, or a subject it cannot read,
//! selects no pod. Each is a [`Problem`]; everything else stays enforced.

use std::collections::BTreeSet;
use std::rc::Rc;

use ipnet::IpNet;
use proto::family::value;
use proto::Family;

use super::{
    merge, range_of, Action, Compiler, Direction, Isolation, Key, Kind, Namespaces, Origin, Peer, PodInfo, PortMatch,
    Problem, Protocol, Rule, Tier,
};
use crate::policy::cluster_policy::{self as api, Spec};
use crate::policy::selector::{Labels, Selector};

/// What the ClusterNetworkPolicies add to a ruleset.
pub(super) struct ClusterRules<'a> {
    pub admin: Vec<Rule>,
    pub baseline: Vec<Rule>,
    /// Policies that select at least one pod of this node.
    pub in_effect: usize,
    /// This node's pods some ClusterNetworkPolicy selects.
    pub subjects: BTreeSet<&'a Key>,
}

/// A peer, checked.
#[derive(Debug, Clone)]
enum ClusterPeer {
    Pods(Peer),
    Nodes(Selector),
    Networks(Vec<(Family, (u128, u128))>),
    /// Cannot be read: fails closed.
    Unreadable,
}

/// A protocol match, checked.
#[derive(Debug, Clone)]
enum ProtocolSpec {
    Ports(Protocol, u16, u16),
    Named(String),
    Unreadable,
}

/// One rule of a policy, read from either direction.
struct RuleView<'s> {
    name: &'s str,
    action: &'s str,
    peers: &'s [api::Peer],
    protocols: Option<&'s [api::ProtocolMatch]>,
}

impl<'a> Compiler<'a> {
    fn cluster_problem(&mut self, policy: &str, what: String) {
        self.problems.push(Problem { kind: Kind::ClusterNetworkPolicy, policy: policy.to_string(), what });
    }

    /// Compiles every ClusterNetworkPolicy for the node `node`, adding the
    /// addresses of the pods each selects to `policed`.
    pub(super) fn cluster_policies(&mut self, node: &str, policed: &mut Isolation) -> ClusterRules<'a> {
        let view = self.view;
        let mut out = ClusterRules { admin: Vec::new(), baseline: Vec::new(), in_effect: 0, subjects: BTreeSet::new() };
        let mut ordered: Vec<(Tier, i32, &'a str, &'a Spec)> = Vec::new();
        for (name, spec) in &view.cluster_policies {
            let tier = match spec.tier.as_str() {
                "Admin" => Tier::Admin,
                "Baseline" => Tier::Baseline,
                other => {
                    self.cluster_problem(
                        name,
                        format!("unknown tier {other:?} (Admin or Baseline); the policy selects no pod"),
                    );
                    continue;
                }
            };
            ordered.push((tier, spec.priority, name, spec));
        }
        // By tier, priority, then name: the Store is sorted by name, and the sort is stable.
        ordered.sort_by_key(|(tier, priority, _, _)| (*tier, *priority));
        for pair in ordered.windows(2) {
            let ((t0, p0, n0, _), (t1, p1, n1, _)) = (pair[0], pair[1]);
            if (t0, p0) == (t1, p1) {
                self.cluster_problem(
                    n1,
                    format!(
                        "has the priority of {n0} ({}, {p0}); the API leaves their order undefined: \
                         overlay evaluates them by name, {n0} first",
                        t0.name()
                    ),
                );
            }
        }
        for (tier, priority, name, spec) in ordered {
            let Some(subjects) = self.subjects(name, spec, node) else { continue };
            if subjects.is_empty() {
                continue;
            }
            let directions: Vec<Direction> = [
                (!spec.ingress.is_empty()).then_some(Direction::Ingress),
                (!spec.egress.is_empty()).then_some(Direction::Egress),
            ]
            .into_iter()
            .flatten()
            .collect();
            if directions.is_empty() {
                continue;
            }
            out.in_effect += 1;
            out.subjects.extend(subjects.iter().map(|(k, _)| *k));
            let pods: Vec<&'a PodInfo> = subjects.iter().map(|(_, p)| *p).collect();
            for direction in directions {
                for family in Family::ALL {
                    policed.entry((direction, family)).or_default().extend(
                        pods.iter().flat_map(|p| &p.ips).filter(|ip| Family::of(**ip) == family).map(|ip| value(*ip)),
                    );
                }
                let rules: Vec<RuleView<'a>> = match direction {
                    Direction::Ingress => spec
                        .ingress
                        .iter()
                        .map(|r| RuleView {
                            name: &r.name,
                            action: &r.action,
                            peers: &r.from,
                            protocols: r.protocols.as_deref(),
                        })
                        .collect(),
                    Direction::Egress => spec
                        .egress
                        .iter()
                        .map(|r| RuleView {
                            name: &r.name,
                            action: &r.action,
                            peers: &r.to,
                            protocols: r.protocols.as_deref(),
                        })
                        .collect(),
                };
                for (index, rule) in rules.iter().enumerate() {
                    let label = format!(
                        "ClusterNetworkPolicy {name} ({}, priority {priority}), {} rule {index}{}",
                        tier.name(),
                        direction.name(),
                        if rule.name.is_empty() { String::new() } else { format!(" {}", rule.name) }
                    );
                    let origin = Origin {
                        kind: Kind::ClusterNetworkPolicy,
                        namespace: String::new(),
                        name: name.to_string(),
                        index,
                    };
                    let compiled = self.cluster_rule(name, (&label, &origin), tier, direction, rule, &pods);
                    match tier {
                        Tier::Admin => out.admin.extend(compiled),
                        _ => out.baseline.extend(compiled),
                    }
                }
            }
        }
        out.admin = merge_runs(std::mem::take(&mut out.admin));
        out.baseline = merge_runs(std::mem::take(&mut out.baseline));
        out
    }

    /// The pods of this node a policy's subject selects; none when the
    /// subject cannot be read (said as a problem).
    fn subjects(&mut self, name: &str, spec: &Spec, node: &str) -> Option<Vec<(&'a Key, &'a PodInfo)>> {
        let (namespaces, pods) = match (&spec.subject.namespaces, &spec.subject.pods) {
            (Some(ns), None) => (Selector::parse(ns), Ok(Selector::default())),
            (None, Some(p)) => (Selector::parse(&p.namespace_selector), Selector::parse(&p.pod_selector)),
            _ => {
                self.cluster_problem(
                    name,
                    "the subject must set exactly one of namespaces and pods; the policy selects no pod".into(),
                );
                return None;
            }
        };
        let (namespaces, pods) = match (namespaces, pods) {
            (Ok(n), Ok(p)) => (n, p),
            (Err(e), _) | (_, Err(e)) => {
                self.cluster_problem(name, format!("subject: {e}; the policy selects no pod"));
                return None;
            }
        };
        let view = self.view;
        let no_labels = Labels::new();
        Some(
            view.pods
                .iter()
                .filter(|(_, p)| &*p.node == node && !p.ips.is_empty() && pods.matches(&p.labels))
                .filter(|((ns, _), _)| {
                    namespaces.matches(view.namespaces.get(ns).map(|n| &n.labels).unwrap_or(&no_labels))
                })
                .collect(),
        )
    }

    fn cluster_peer(&mut self, name: &str, label: &str, peer: &api::Peer, direction: Direction) -> ClusterPeer {
        let set = [
            peer.namespaces.is_some(),
            peer.pods.is_some(),
            peer.nodes.is_some(),
            peer.networks.is_some(),
            peer.domain_names.is_some(),
        ]
        .into_iter()
        .filter(|s| *s)
        .count();
        let unreadable = |c: &mut Self, why: String| {
            c.cluster_problem(name, format!("{label}: {why}"));
            ClusterPeer::Unreadable
        };
        if set != 1 {
            return unreadable(self, "a peer must set exactly one field (a CRD of another version?)".into());
        }
        let selector = |s| Selector::parse(s).map_err(|e| e.to_string());
        if let Some(ns) = &peer.namespaces {
            return match selector(ns) {
                Ok(ns) => {
                    ClusterPeer::Pods(Peer::Pods { namespaces: Namespaces::Selected(ns), pods: Selector::default() })
                }
                Err(e) => unreadable(self, format!("namespaces: {e}")),
            };
        }
        if let Some(p) = &peer.pods {
            return match (selector(&p.namespace_selector), selector(&p.pod_selector)) {
                (Ok(ns), Ok(pods)) => ClusterPeer::Pods(Peer::Pods { namespaces: Namespaces::Selected(ns), pods }),
                (Err(e), _) | (_, Err(e)) => unreadable(self, format!("pods: {e}")),
            };
        }
        if direction == Direction::Ingress {
            return unreadable(self, "nodes, networks and domainNames are egress peers".into());
        }
        if let Some(nodes) = &peer.nodes {
            return match selector(nodes) {
                Ok(s) => ClusterPeer::Nodes(s),
                Err(e) => unreadable(self, format!("nodes: {e}")),
            };
        }
        if let Some(networks) = &peer.networks {
            let mut ranges = Vec::new();
            for n in networks {
                match n.parse::<IpNet>() {
                    Ok(net) => ranges.push((Family::of_net(&net), range_of(&net))),
                    Err(_) => return unreadable(self, format!("network {n:?} is not a CIDR")),
                }
            }
            return ClusterPeer::Networks(ranges);
        }
        unreadable(self, "domainNames are not supported by overlay".into())
    }

    fn protocol(&mut self, name: &str, label: &str, p: &api::ProtocolMatch) -> ProtocolSpec {
        let given = [p.tcp.is_some(), p.udp.is_some(), p.sctp.is_some(), p.destination_named_port.is_some()];
        if given.into_iter().filter(|g| *g).count() != 1 {
            self.cluster_problem(name, format!("{label}: a protocol must set exactly one field"));
            return ProtocolSpec::Unreadable;
        }
        if let Some(port) = &p.destination_named_port {
            return ProtocolSpec::Named(port.clone());
        }
        let (protocol, spec) = match (&p.tcp, &p.udp, &p.sctp) {
            (Some(s), _, _) => (Protocol::Tcp, s),
            (_, Some(s), _) => (Protocol::Udp, s),
            (_, _, Some(s)) => (Protocol::Sctp, s),
            _ => unreachable!("one field is set"),
        };
        let number = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
        let ports = match &spec.destination_port {
            None => Some((0, u16::MAX)),
            Some(api::PortSpec { range: Some(r), .. }) => number(r.start).zip(number(r.end)).filter(|(s, e)| s <= e),
            Some(api::PortSpec { number: n, .. }) => number(*n).map(|n| (n, n)),
        };
        match ports {
            Some((start, end)) => ProtocolSpec::Ports(protocol, start, end),
            None => {
                self.cluster_problem(name, format!("{label}: a port is not in 1-65535"));
                ProtocolSpec::Unreadable
            }
        }
    }

    /// One rule of a policy, as rules of the ruleset (per family; one per
    /// named port besides the numbered ports).
    fn cluster_rule(
        &mut self,
        name: &str,
        (label, origin): (&str, &Origin),
        tier: Tier,
        direction: Direction,
        rule: &RuleView<'_>,
        subjects: &[&'a PodInfo],
    ) -> Vec<Rule> {
        let mut action = match rule.action {
            "Accept" => Action::Accept,
            "Deny" => Action::Deny,
            "Pass" => Action::Pass,
            other => {
                self.cluster_problem(
                    name,
                    format!("{label}: unknown action {other:?} (Accept, Deny or Pass); it denies what it matches"),
                );
                Action::Deny
            }
        };
        let peers: Vec<ClusterPeer> = rule.peers.iter().map(|p| self.cluster_peer(name, label, p, direction)).collect();
        let protocols: Option<Vec<ProtocolSpec>> =
            rule.protocols.filter(|p| !p.is_empty()).map(|p| p.iter().map(|p| self.protocol(name, label, p)).collect());
        let unreadable = peers.iter().any(|p| matches!(p, ClusterPeer::Unreadable))
            || protocols.iter().flatten().any(|p| matches!(p, ProtocolSpec::Unreadable));
        if peers.is_empty() {
            self.cluster_problem(name, format!("{label}: a rule without peers matches nothing"));
            return Vec::new();
        }
        // Fail closed: what cannot be read matches nothing in an Accept
        // rule, and makes any other rule deny everything.
        let deny_all = unreadable && action != Action::Accept;
        if deny_all {
            action = Action::Deny;
        }
        let pod_peers: Vec<Peer> = peers
            .iter()
            .filter_map(|p| match p {
                ClusterPeer::Pods(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        let peer_pods: Rc<Vec<&'a PodInfo>> = if pod_peers.is_empty() {
            Rc::new(Vec::new())
        } else {
            let key = format!("|{pod_peers:?}");
            match self.peers.get(&key) {
                Some(hit) => hit.clone(),
                None => {
                    let pods = Rc::new(self.peer_pods("", &pod_peers));
                    self.peers.insert(key, pods.clone());
                    pods
                }
            }
        };
        let mut out = Vec::new();
        for family in Family::ALL {
            let subject_ips: Vec<u128> = subjects
                .iter()
                .flat_map(|p| &p.ips)
                .filter(|ip| Family::of(**ip) == family)
                .map(|ip| value(*ip))
                .collect();
            if subject_ips.is_empty() {
                continue;
            }
            let pods_set = self.sets.addr(family, merge(subject_ips.iter().map(|v| (*v, *v)).collect()));
            let new_rule = |peers: Option<String>, ports: PortMatch| Rule {
                direction,
                family,
                tier,
                action,
                policy: label.to_string(),
                origin: origin.clone(),
                pods: pods_set.clone(),
                peers,
                ports,
            };
            if deny_all {
                out.push(new_rule(None, PortMatch::Any));
                continue;
            }
            if unreadable {
                // An Accept rule with a part it cannot read matches nothing.
                continue;
            }
            let mut ranges: Vec<(u128, u128)> = peer_pods
                .iter()
                .flat_map(|p| &p.ips)
                .filter(|ip| Family::of(**ip) == family)
                .map(|ip| (value(*ip), value(*ip)))
                .collect();
            for peer in &peers {
                match peer {
                    ClusterPeer::Nodes(selector) => ranges.extend(
                        self.view
                            .nodes
                            .values()
                            .filter(|n| selector.matches(&n.labels))
                            .flat_map(|n| &n.ips)
                            .filter(|ip| Family::of(**ip) == family)
                            .map(|ip| (value(*ip), value(*ip))),
                    ),
                    ClusterPeer::Networks(nets) => {
                        ranges.extend(nets.iter().filter(|(f, _)| *f == family).map(|(_, r)| *r))
                    }
                    _ => {}
                }
            }
            let ranges = merge(ranges);
            if ranges.is_empty() {
                continue;
            }
            let peers_set = self.sets.addr(family, ranges);
            let Some(protocols) = &protocols else {
                out.push(new_rule(Some(peers_set), PortMatch::Any));
                continue;
            };
            let numbered: Vec<(Protocol, u16, u16)> = protocols
                .iter()
                .filter_map(|p| match p {
                    ProtocolSpec::Ports(proto, s, e) => Some((*proto, *s, *e)),
                    _ => None,
                })
                .collect();
            if !numbered.is_empty() {
                out.push(new_rule(Some(peers_set.clone()), PortMatch::Ports(super::merge_ports(numbered))));
            }
            for port in protocols.iter().filter_map(|p| match p {
                ProtocolSpec::Named(n) => Some(n),
                _ => None,
            }) {
                // The destination's port: the subject's for ingress, the peer pod's for egress.
                let owners: &[&PodInfo] = match direction {
                    Direction::Ingress => subjects,
                    Direction::Egress => &peer_pods,
                };
                let mut elements: Vec<(u128, Protocol, u16)> = Vec::new();
                for pod in owners {
                    for p in pod.ports.iter().filter(|p| *p.name == **port) {
                        elements.extend(
                            pod.ips
                                .iter()
                                .filter(|ip| Family::of(**ip) == family)
                                .map(|ip| (value(*ip), p.protocol, p.port)),
                        );
                    }
                }
                if elements.is_empty() {
                    continue;
                }
                let set = self.sets.ports(family, elements);
                let peers = match direction {
                    Direction::Ingress => Some(peers_set.clone()),
                    Direction::Egress => None,
                };
                out.push(new_rule(peers, PortMatch::Named(set)));
            }
        }
        out
    }
}

/// Merges each rule into the one before it in its chain (same direction and
/// family: rules of other families never see its packets) when both do the
/// same to the same pods and peers and differ only in ports: a packet that
/// either matches gets the same verdict, so the order is kept. A hundred
/// policies that deny a port each to the same peers are one rule, and a new
/// flow walks one rule, not a hundred. Counters and comments name the first.
fn merge_runs(rules: Vec<Rule>) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::with_capacity(rules.len());
    let mut merged: Vec<usize> = Vec::with_capacity(rules.len());
    let mut last: std::collections::HashMap<(Direction, Family), usize> = std::collections::HashMap::new();
    for rule in rules {
        let chain = (rule.direction, rule.family);
        if let Some(&i) = last.get(&chain) {
            let before = &mut out[i];
            let same = before.action == rule.action && before.pods == rule.pods && before.peers == rule.peers;
            let ports = match (&before.ports, &rule.ports) {
                (PortMatch::Any, PortMatch::Any | PortMatch::Ports(_)) | (PortMatch::Ports(_), PortMatch::Any) => {
                    Some(PortMatch::Any)
                }
                (PortMatch::Ports(a), PortMatch::Ports(b)) => {
                    Some(PortMatch::Ports(super::merge_ports(a.iter().chain(b).copied().collect())))
                }
                _ => None,
            };
            if let (true, Some(ports)) = (same, ports) {
                before.ports = ports;
                merged[i] += 1;
                continue;
            }
        }
        last.insert(chain, out.len());
        merged.push(0);
        out.push(rule);
    }
    for (rule, more) in out.iter_mut().zip(merged) {
        if more > 0 {
            rule.policy = format!("{} and {more} more", rule.policy);
        }
    }
    out
}

#[cfg(test)]
mod tests;
