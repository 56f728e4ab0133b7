//! `overlayd explain`: why a new connection is allowed or denied, read from
//! the same compiled model the kernel holds. The sender's node checks its
//! egress, the receiver's node its ingress; each is the ruleset
//! [`compile`](super::compile::compile) plans for that node, walked as
//! nftables walks it (Admin tier, NetworkPolicy, Baseline tier, the
//! default). Pure: the daemon answers from its cluster view.

use std::collections::HashMap;
use std::net::IpAddr;

use proto::family::value;
use proto::Family;
use serde::{Deserialize, Serialize};

use super::compile::{Action, ClusterView, Compiled, Direction, Key, PortMatch, Protocol, Rule, Ruleset, Tier};

/// A question to the policy thread, and where its answer goes.
#[derive(Debug)]
pub struct Request {
    pub query: Query,
    pub reply: tokio::sync::oneshot::Sender<Result<Explanation, String>>,
}

/// One end of a connection: a pod by `namespace/name`, or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Pod(Key),
    Addr(IpAddr),
}

impl End {
    pub fn parse(s: &str) -> Result<End, String> {
        if let Ok(ip) = s.parse() {
            return Ok(End::Addr(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(End::Pod((ns.to_string(), name.to_string())))
            }
            _ => Err(format!("{s:?} is neither an address nor namespace/name")),
        }
    }
}

/// What to explain: a new connection from `src` to `dst` on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub src: End,
    pub dst: End,
    pub protocol: Protocol,
    pub port: u16,
    /// The family to explain, when both ends have both (default IPv4).
    pub family: Option<Family>,
}

impl Query {
    /// From `SRC`, `DST` and `PORT/PROTO` (`80/tcp`; the protocol defaults to TCP).
    pub fn parse(src: &str, dst: &str, port: &str, family: Option<&str>) -> Result<Query, String> {
        let (number, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
        let port: u16 =
            number.parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("port {number:?} is not in 1-65535"))?;
        let protocol = Protocol::parse(Some(&protocol.to_uppercase()))?;
        let family = match family {
            None | Some("") => None,
            Some("4") => Some(Family::V4),
            Some("6") => Some(Family::V6),
            Some(other) => return Err(format!("family {other:?} (4 or 6)")),
        };
        Ok(Query { src: End::parse(src)?, dst: End::parse(dst)?, protocol, port, family })
    }
}

/// The decision, and how it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub allowed: bool,
    /// One line: the decision and the rule that made it.
    pub summary: String,
    /// Each check on the way: the sender's egress, the receiver's ingress.
    pub steps: Vec<String>,
}

impl Explanation {
    pub fn to_text(&self) -> String {
        let mut out = format!("{}\n", self.summary);
        for step in &self.steps {
            out += &format!("  {step}\n");
        }
        out
    }
}

/// One end, resolved.
struct Resolved {
    name: String,
    addr: IpAddr,
    /// The node a pod runs on (none for an address outside the pods).
    node: Option<String>,
}

fn resolve(
    view: &ClusterView,
    end: &End,
    family: Option<Family>,
) -> Result<(String, Vec<IpAddr>, Option<String>), String> {
    let (name, pod) = match end {
        End::Pod(key) => {
            let pod = view
                .pods
                .get(key)
                .ok_or_else(|| format!("no pod {}/{} (host-network pods are not policed)", key.0, key.1))?;
            (format!("{}/{}", key.0, key.1), Some(pod))
        }
        End::Addr(ip) => match view.pods.iter().find(|(_, p)| p.ips.contains(ip)) {
            Some((key, pod)) => (format!("{}/{} ({ip})", key.0, key.1), Some(pod)),
            None => return Ok((ip.to_string(), vec![*ip], None)),
        },
    };
    let pod = pod.expect("a pod");
    let ips: Vec<IpAddr> = match end {
        End::Addr(ip) => vec![*ip],
        End::Pod(_) => pod.ips.iter().filter(|ip| family.is_none_or(|f| Family::of(**ip) == f)).copied().collect(),
    };
    let node = (!pod.node.is_empty()).then(|| pod.node.to_string());
    Ok((name, ips, node))
}

/// The nodes whose rulesets [`explain`] reads for `query`.
pub fn nodes(view: &ClusterView, query: &Query) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for end in [&query.src, &query.dst] {
        out.extend(resolve(view, end, query.family)?.2);
    }
    Ok(out)
}

/// Explains `query` on `view`; `compiled` gives the ruleset a node holds.
pub fn explain<'c>(
    view: &ClusterView,
    query: &Query,
    compiled: impl Fn(&str) -> Option<&'c Compiled>,
) -> Result<Explanation, String> {
    let (src_name, src_ips, src_node) = resolve(view, &query.src, query.family)?;
    let (dst_name, dst_ips, dst_node) = resolve(view, &query.dst, query.family)?;
    // The first family both ends have (IPv4 first).
    let (src, dst) = Family::ALL
        .into_iter()
        .filter(|f| query.family.is_none_or(|q| q == *f))
        .find_map(|f| {
            let s = src_ips.iter().find(|ip| Family::of(**ip) == f)?;
            let d = dst_ips.iter().find(|ip| Family::of(**ip) == f)?;
            Some((*s, *d))
        })
        .ok_or_else(|| format!("{src_name} and {dst_name} have no address of one family"))?;
    let src = Resolved { name: src_name, addr: src, node: src_node };
    let dst = Resolved { name: dst_name, addr: dst, node: dst_node };
    let mut steps = Vec::new();
    let mut denied: Option<String> = None;
    for (direction, pod, peer) in [(Direction::Egress, &src, &dst), (Direction::Ingress, &dst, &src)] {
        let Some(node) = &pod.node else { continue };
        let ruleset = &compiled(node).ok_or_else(|| format!("no ruleset of node {node}"))?.ruleset;
        let port = Some((query.protocol, query.port));
        let (allowed, why) = decide(ruleset, direction, pod.addr, peer.addr, dst.addr, port);
        let step = format!(
            "{} of {} (node {node}): {} by {why}",
            direction.name(),
            pod.name,
            if allowed { "allowed" } else { "denied" }
        );
        if !allowed && denied.is_none() {
            denied = Some(format!("{} of {}: {why}", direction.name(), pod.name));
        }
        steps.push(step);
    }
    let what = format!("{} {} {} -> {}", query.protocol.nft().to_uppercase(), query.port, src.name, dst.name);
    let summary = match &denied {
        Some(why) => format!("denied: {what}: {why}"),
        None => format!("allowed: {what}"),
    };
    Ok(Explanation { allowed: denied.is_none(), summary, steps })
}

/// Sets by name.
struct Sets<'a> {
    addr: HashMap<&'a str, &'a [(u128, u128)]>,
    ports: HashMap<&'a str, &'a [(u128, Protocol, u16)]>,
}

impl<'a> Sets<'a> {
    fn of(ruleset: &'a Ruleset) -> Self {
        Sets {
            addr: ruleset.sets.iter().map(|s| (s.name.as_str(), s.ranges.as_slice())).collect(),
            ports: ruleset.port_sets.iter().map(|s| (s.name.as_str(), s.elements.as_slice())).collect(),
        }
    }

    fn contains(&self, set: &str, addr: IpAddr) -> bool {
        let v = value(addr);
        self.addr.get(set).is_some_and(|ranges| ranges.iter().any(|(s, e)| *s <= v && v <= *e))
    }
}

fn matches(sets: &Sets, rule: &Rule, pod: IpAddr, peer: IpAddr, dst: IpAddr, port: Option<(Protocol, u16)>) -> bool {
    if rule.family != Family::of(pod) || !sets.contains(&rule.pods, pod) {
        return false;
    }
    if rule.peers.as_ref().is_some_and(|set| !sets.contains(set, peer)) {
        return false;
    }
    match (&rule.ports, port) {
        (PortMatch::Any, _) => true,
        // A packet without ports (ICMP) matches only rules without ports.
        (_, None) => false,
        (PortMatch::Ports(ports), Some((protocol, port))) => {
            ports.iter().any(|(p, s, e)| *p == protocol && *s <= port && port <= *e)
        }
        (PortMatch::Named(set), Some((protocol, port))) => sets
            .ports
            .get(set.as_str())
            .is_some_and(|elements| elements.iter().any(|(a, p, n)| *a == value(dst) && *p == protocol && *n == port)),
    }
}

/// The verdict of one node's ruleset for one direction, and the rule (or
/// default) that gave it: the chains of `table.rs`, walked in their order.
/// `port`: the transport protocol and destination port, none for ICMP.
pub fn decide(
    ruleset: &Ruleset,
    direction: Direction,
    pod: IpAddr,
    peer: IpAddr,
    dst: IpAddr,
    port: Option<(Protocol, u16)>,
) -> (bool, String) {
    let sets = Sets::of(ruleset);
    let family = Family::of(pod);
    if !sets.contains(ruleset.policed_set(direction, family), pod) {
        return (true, "default: no policy applies to it".into());
    }
    let first = |tier: Tier| {
        ruleset
            .rules
            .iter()
            .filter(move |r| r.direction == direction && r.tier == tier)
            .find(|r| matches(&sets, r, pod, peer, dst, port))
    };
    if let Some(rule) = first(Tier::Admin) {
        match rule.action {
            Action::Accept => return (true, rule.policy.clone()),
            Action::Deny => return (false, rule.policy.clone()),
            Action::Pass => {}
        }
    }
    if let Some(rule) = first(Tier::NetworkPolicy) {
        return (true, format!("NetworkPolicy {}", rule.policy));
    }
    if sets.contains(ruleset.isolated_set(direction, family), pod) {
        return (
            false,
            format!("NetworkPolicy: policies select it for {}, and none of their rules allows this", direction.name()),
        );
    }
    match first(Tier::Baseline) {
        Some(rule) if rule.action == Action::Deny => (false, rule.policy.clone()),
        Some(rule) => (true, rule.policy.clone()),
        None => (true, "default: no rule matches".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::compile::{compile, tests::view};
    use super::*;
    use serde_json::json;

    #[test]
    fn it_names_the_rule_that_decides() {
        let mut v = view(&[(
            "x",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )]);
        v.cluster_policies.insert(
            "deny-metadata".into(),
            serde_json::from_value(json!({"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                "egress": [{"name": "metadata", "action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}]}))
            .unwrap(),
        );
        let compiled: HashMap<String, Compiled> = ["n1", "n2"].map(|n| (n.to_string(), compile(&v, n))).into();
        let ask = |src: &str, dst: &str| {
            let q = Query::parse(src, dst, "80/tcp", None).unwrap();
            assert!(nodes(&v, &q).unwrap().iter().all(|n| compiled.contains_key(n)));
            explain(&v, &q, |node| compiled.get(node)).unwrap()
        };
        let e = ask("x/a", "169.254.169.254");
        assert!(!e.allowed);
        assert_eq!(
            e.summary,
            "denied: TCP 80 x/a -> 169.254.169.254: egress of x/a: ClusterNetworkPolicy deny-metadata (Admin, priority 10), egress rule 0 metadata"
        );
        let e = ask("x/b", "x/a");
        assert!(e.allowed, "{e:?}");
        assert!(e.steps[1].contains("NetworkPolicy x/p0"), "{e:?}");
        let e = ask("y/a", "x/a");
        assert!(!e.allowed);
        assert!(e.summary.contains("ingress of x/a: NetworkPolicy: policies select it for ingress"), "{e:?}");
        let e = ask("x/a", "y/a");
        assert!(e.allowed && e.steps.iter().all(|s| s.contains("default")), "{e:?}");
        assert!(Query::parse("x", "x/a", "80", None).is_err());
        assert!(Query::parse("x/a", "x/a", "0/tcp", None).is_err());
        assert!(Query::parse("x/a", "x/a", "80/icmp", None).is_err());
    }
}
