//! The policy ruleset in the kernel: `table inet overlay_policy`, one
//! table for both families, so one transaction changes both. NetworkPolicy
//! and ClusterNetworkPolicy share it, in the order the API evaluates them.
//!
//! ```text
//! chain forward (filter, forward hook, policy accept)
//!     ct state established,related accept   -- replies and existing connections
//!     icmpv6 neighbour discovery accept
//!     ip  saddr @policed_egress_v4  jump egress    -- from a pod of ours some policy applies to
//!     ip6 saddr @policed_egress_v6  jump egress
//!     ip  daddr @policed_ingress_v4 jump ingress   -- to a pod of ours some policy applies to
//!     ip6 daddr @policed_ingress_v6 jump ingress
//! chain input (filter, input hook, policy accept)   -- a pod to its own node
//!     ct state established,related accept
//!     icmpv6 neighbour discovery accept
//!     ip  saddr @policed_egress_v4  jump egress
//!     ip6 saddr @policed_egress_v6  jump egress
//! chain egress:     the Admin tier's rules; then goto egress_np
//! chain egress_np:  NetworkPolicy's rules; count and drop what it isolates; the Baseline tier's rules
//! (ingress, ingress_np: the same)
//! ```
//!
//! Actions: in egress, allowing is `return` (on to the destination's
//! ingress check); in ingress, `accept`. Deny counts and drops. `Pass` in
//! the Admin tier is `goto <direction>_np`; in the Baseline tier it allows
//! (the default). What no rule decides falls through to the chain's end:
//! allowed.
//!
//! A pod's traffic to its own node's addresses (the bridge's gateway
//! address, the node's underlay address, host-network pods) meets the
//! input hook, not forward: the egress chain is shared by both, so a pod's
//! egress policy covers its own node as it covers every other. The host's
//! own traffic to its pods (kubelet probes) goes through output and is
//! never policed; its replies are established connections. Traffic
//! bridged between two pods of one node reaches the forward hook through
//! br_netfilter, which the CNI plugin turns on for its bridge
//! (docs/architecture.md says why).
//!
//! Every change is one `nft -j -f -` transaction: the chains are flushed,
//! the sets replaced and the rules added at once, so a packet meets either
//! the old ruleset or the new one. The drop counters are named objects that
//! the transaction keeps, so they count across updates.

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Range, SetItem, CT};
use nftables::schema::{
    Chain, Counter, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule as NfRule, Set, SetFlag, SetType,
    SetTypeValue, Table,
};
use nftables::stmt::{Counter as CounterStmt, JumpTarget, Limit, Log, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use proto::Family;
use serde_json::Value;

use super::compile::{Action, AddrSet, Direction, DropLogging, PortMatch, PortSet, Rule, Ruleset, Tier};
use crate::nft::{self, NftError, TableId};

/// `table inet overlay_policy`.
pub const TABLE: &str = "overlay_policy";
const FORWARD: &str = "forward";
const INPUT: &str = "input";

/// The chain of a direction's NetworkPolicy and Baseline tiers.
fn np_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress_np",
        Direction::Egress => "egress_np",
    }
}

/// The chain a rule goes in.
fn chain_of(rule: &Rule) -> &'static str {
    match rule.tier {
        Tier::Admin => rule.direction.name(),
        Tier::NetworkPolicy | Tier::Baseline => np_chain(rule.direction),
    }
}

/// The chain every drop of a direction goes to: it logs (when asked) and counts.
fn denied_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress_denied",
        Direction::Egress => "egress_denied",
    }
}

/// The NFLOG group dropped packets are logged to (`--log-policy-drops`).
pub const LOG_GROUP: u16 = 2718;
/// How many dropped packets a second each direction logs at most (a burst of as many).
const LOG_RATE: u32 = 100;

/// The prefix a direction's logged drops carry.
pub fn log_prefix(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "overlay-ingress",
        Direction::Egress => "overlay-egress",
    }
}

fn to_denied(direction: Direction) -> Statement<'static> {
    Statement::Goto(JumpTarget { target: Cow::Borrowed(denied_chain(direction)) })
}

/// The drop counter of a direction.
pub fn drop_counter(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress_drops",
        Direction::Egress => "egress_drops",
    }
}

/// Our table.
pub const ID: TableId = TableId { family: NfFamily::INet, name: TABLE };

fn proto_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_type(family: Family) -> SetType {
    match family {
        Family::V4 => SetType::Ipv4Addr,
        Family::V6 => SetType::Ipv6Addr,
    }
}

/// The ICMPv6 types of neighbour and router discovery (RFC 4861), never policed.
const NEIGHBOUR_DISCOVERY: [&str; 5] =
    ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert", "nd-redirect"];

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed(protocol),
        field: Cow::Borrowed(field),
    })))
}

fn in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
    Statement::Match(Match { left, right: Expression::String(Cow::Owned(format!("@{set}"))), op: Operator::EQ })
}

fn l4proto() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::L4proto }))
}

fn addr(family: Family, value: u128) -> Expression<'static> {
    Expression::String(Cow::Owned(family.addr(value).to_string()))
}

/// The fields of the pod a rule is about and of its peer.
fn fields(direction: Direction) -> (&'static str, &'static str) {
    match direction {
        Direction::Ingress => ("daddr", "saddr"),
        Direction::Egress => ("saddr", "daddr"),
    }
}

fn port_range(start: u16, end: u16) -> Expression<'static> {
    if start == end {
        Expression::Number(u32::from(start))
    } else {
        Expression::Range(Box::new(Range {
            range: [Expression::Number(u32::from(start)), Expression::Number(u32::from(end))],
        }))
    }
}

fn rule_statements(rule: &Rule) -> Vec<Statement<'static>> {
    let p = proto_name(rule.family);
    let (pod, peer) = fields(rule.direction);
    let mut out = vec![in_set(payload(p, pod), &rule.pods)];
    if let Some(peers) = &rule.peers {
        out.push(in_set(payload(p, peer), peers));
    }
    match &rule.ports {
        PortMatch::Any => {}
        PortMatch::Ports(ports) => match ports.as_slice() {
            [(proto, start, end)] => {
                out.push(Statement::Match(Match {
                    left: l4proto(),
                    right: Expression::String(Cow::Borrowed(proto.nft())),
                    op: Operator::EQ,
                }));
                if (*start, *end) != (0, u16::MAX) {
                    out.push(Statement::Match(Match {
                        left: payload("th", "dport"),
                        right: port_range(*start, *end),
                        op: Operator::EQ,
                    }));
                }
            }
            // `meta l4proto . th dport { tcp . 80, udp . 53-54, ... }`
            _ => out.push(Statement::Match(Match {
                left: Expression::Named(NamedExpression::Concat(vec![l4proto(), payload("th", "dport")])),
                right: Expression::Named(NamedExpression::Set(
                    ports
                        .iter()
                        .map(|(proto, start, end)| {
                            SetItem::Element(Expression::Named(NamedExpression::Concat(vec![
                                Expression::String(Cow::Borrowed(proto.nft())),
                                port_range(*start, *end),
                            ])))
                        })
                        .collect(),
                )),
                op: Operator::EQ,
            })),
        },
        // The destination's address, protocol and port: the selected pod's
        // for ingress, the peer's for egress; both are the destination.
        PortMatch::Named(set) => out.push(in_set(
            Expression::Named(NamedExpression::Concat(vec![payload(p, "daddr"), l4proto(), payload("th", "dport")])),
            set,
        )),
    }
    // Every rule counts what it decides: `overlay_policy_rule_packets_total`.
    out.push(Statement::Counter(CounterStmt::Anonymous(None)));
    let allow = match rule.direction {
        // Allowed out: on to the ingress check of the destination.
        Direction::Egress => Statement::Return(None),
        Direction::Ingress => Statement::Accept(None),
    };
    match (rule.action, rule.tier) {
        (Action::Accept, _) | (Action::Pass, Tier::Baseline | Tier::NetworkPolicy) => out.push(allow),
        (Action::Deny, _) => out.push(to_denied(rule.direction)),
        (Action::Pass, Tier::Admin) => {
            out.push(Statement::Goto(JumpTarget { target: Cow::Borrowed(np_chain(rule.direction)) }))
        }
    }
    out
}

fn table() -> Table<'static> {
    ID.table()
}

fn add(object: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(object))
}

fn chain(name: &'static str) -> Chain<'static> {
    Chain { family: NfFamily::INet, table: Cow::Borrowed(TABLE), name: Cow::Borrowed(name), ..Chain::default() }
}

fn addr_set(set: &AddrSet) -> Set<'static> {
    let elem: Vec<Expression<'static>> = set
        .ranges
        .iter()
        .map(|&(s, e)| {
            if s == e {
                addr(set.family, s)
            } else {
                Expression::Range(Box::new(Range { range: [addr(set.family, s), addr(set.family, e)] }))
            }
        })
        .collect();
    Set {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Owned(set.name.clone()),
        set_type: SetTypeValue::Single(addr_type(set.family)),
        flags: Some(HashSet::from([SetFlag::Interval])),
        elem: (!elem.is_empty()).then_some(Cow::Owned(elem)),
        ..Set::default()
    }
}

fn port_set(set: &PortSet) -> Set<'static> {
    let elem: Vec<Expression<'static>> = set
        .elements
        .iter()
        .map(|&(a, proto, port)| {
            Expression::Named(NamedExpression::Concat(vec![
                addr(set.family, a),
                Expression::String(Cow::Borrowed(proto.nft())),
                Expression::Number(u32::from(port)),
            ]))
        })
        .collect();
    Set {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Owned(set.name.clone()),
        set_type: SetTypeValue::Concatenated(Cow::Owned(vec![
            addr_type(set.family),
            SetType::InetProto,
            SetType::InetService,
        ])),
        elem: (!elem.is_empty()).then_some(Cow::Owned(elem)),
        ..Set::default()
    }
}

/// A fingerprint of a ruleset, carried in the comment of the forward
/// chain's first rule, so a listing without set contents tells whether
/// the kernel holds this ruleset.
pub fn fingerprint(ruleset: &Ruleset) -> String {
    // Set names are hashes of their contents: the names and the rules say it all.
    let names: Vec<&str> =
        ruleset.sets.iter().map(|s| s.name.as_str()).chain(ruleset.port_sets.iter().map(|s| s.name.as_str())).collect();
    let text =
        format!("{names:?}{:?}{:?}{:?}{:?}", ruleset.rules, ruleset.isolated, ruleset.policed, ruleset.log_drops);
    format!("overlay-policy {:016x}", proto::hash::fnv1a(text.as_bytes()))
}

/// The transaction that makes the table hold `ruleset`, whatever it held:
/// `existing_sets` are the sets the table has now. A set is named by its
/// content, so one that exists already is kept as it is and only new sets
/// are written; with `rewrite_all`, every set is replaced (the timer's
/// safety net against hand-edited elements, which a terse listing cannot see).
pub fn transaction(ruleset: &Ruleset, existing_sets: &[String], rewrite_all: bool) -> Nftables<'static> {
    let desired: HashSet<&str> =
        ruleset.sets.iter().map(|s| s.name.as_str()).chain(ruleset.port_sets.iter().map(|s| s.name.as_str())).collect();
    let existing: HashSet<&str> = existing_sets.iter().map(String::as_str).collect();
    let keep = |name: &str| !rewrite_all && existing.contains(name) && desired.contains(name);
    let mut objects = vec![add(NfListObject::Table(table()))];
    for direction in Direction::ALL {
        objects.push(add(NfListObject::Counter(Counter {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(drop_counter(direction)),
            handle: None,
            packets: None,
            bytes: None,
        })));
    }
    objects.push(add(NfListObject::Chain(Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Forward),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..chain(FORWARD)
    })));
    objects.push(add(NfListObject::Chain(Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Input),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..chain(INPUT)
    })));
    for direction in Direction::ALL {
        objects.push(add(NfListObject::Chain(chain(direction.name()))));
        objects.push(add(NfListObject::Chain(chain(np_chain(direction)))));
        objects.push(add(NfListObject::Chain(chain(denied_chain(direction)))));
    }
    // Rules first, then the sets they referred to: one transaction.
    objects.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Table(table()))));
    for name in existing_sets.iter().filter(|n| !keep(n)) {
        objects.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            name: Cow::Owned(name.clone()),
            ..Set::default()
        })))));
    }
    for set in ruleset.sets.iter().filter(|s| !keep(&s.name)) {
        objects.push(add(NfListObject::Set(Box::new(addr_set(set)))));
    }
    for set in ruleset.port_sets.iter().filter(|s| !keep(&s.name)) {
        objects.push(add(NfListObject::Set(Box::new(port_set(set)))));
    }
    for planned in planned_rules(ruleset) {
        objects.push(add(NfListObject::Rule(NfRule {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Borrowed(planned.chain),
            expr: Cow::Owned(planned.expr),
            comment: planned.comment.map(Cow::Owned),
            ..NfRule::default()
        })));
    }
    Nftables { objects: Cow::Owned(objects) }
}

/// A rule of the table, as the transaction adds it.
struct PlannedRule {
    chain: &'static str,
    expr: Vec<Statement<'static>>,
    comment: Option<String>,
    /// Its index in [`Ruleset::rules`], if it is one of them.
    index: Option<usize>,
}

/// Every rule of the table, in the order the transaction adds them.
fn planned_rules(ruleset: &Ruleset) -> Vec<PlannedRule> {
    let mut out = Vec::new();
    let rule = |chain: &'static str, expr: Vec<Statement<'static>>, comment: Option<String>| PlannedRule {
        chain,
        expr,
        comment,
        index: None,
    };
    for base in [FORWARD, INPUT] {
        out.push(rule(
            base,
            vec![
                Statement::Match(Match {
                    left: Expression::Named(NamedExpression::CT(CT {
                        key: Cow::Borrowed("state"),
                        family: None,
                        dir: None,
                    })),
                    right: Expression::List(vec![
                        Expression::String(Cow::Borrowed("established")),
                        Expression::String(Cow::Borrowed("related")),
                    ]),
                    op: Operator::IN,
                }),
                Statement::Accept(None),
            ],
            (base == FORWARD).then(|| fingerprint(ruleset)),
        ));
        // IPv6 neighbour and router discovery is the link's own plumbing, which NetworkPolicy
        // does not speak of. Policed, an isolated pod's neighbour advertisements to a pod
        // of its node (bridged, so they meet the forward hook) are dropped, and that pod can
        // no longer answer anyone it has not heard from first (IPv4's ARP never comes here);
        // in input, an egress-isolated pod could no longer find its gateway.
        out.push(rule(
            base,
            vec![
                Statement::Match(Match {
                    left: payload("icmpv6", "type"),
                    right: Expression::Named(NamedExpression::Set(
                        NEIGHBOUR_DISCOVERY
                            .iter()
                            .map(|t| SetItem::Element(Expression::String(Cow::Borrowed(*t))))
                            .collect(),
                    )),
                    op: Operator::EQ,
                }),
                Statement::Accept(None),
            ],
            None,
        ));
        // Into input come only packets for the node itself: no pod of ours is the
        // destination, so only the sender's egress is checked there.
        let directions: &[Direction] =
            if base == FORWARD { &[Direction::Egress, Direction::Ingress] } else { &[Direction::Egress] };
        for &direction in directions {
            for family in Family::ALL {
                let (pod, _) = fields(direction);
                out.push(rule(
                    base,
                    vec![
                        in_set(payload(proto_name(family), pod), ruleset.policed_set(direction, family)),
                        Statement::Jump(JumpTarget { target: Cow::Borrowed(direction.name()) }),
                    ],
                    None,
                ));
            }
        }
    }
    let comment = |r: &Rule| Some(r.policy.chars().take(120).collect());
    let of = |(i, r): (usize, &Rule)| PlannedRule {
        chain: chain_of(r),
        expr: rule_statements(r),
        comment: comment(r),
        index: Some(i),
    };
    for direction in [Direction::Egress, Direction::Ingress] {
        out.extend(
            ruleset.rules.iter().enumerate().filter(|(_, r)| r.direction == direction && r.tier == Tier::Admin).map(of),
        );
        out.push(rule(
            direction.name(),
            vec![Statement::Goto(JumpTarget { target: Cow::Borrowed(np_chain(direction)) })],
            None,
        ));
        out.extend(
            ruleset
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.direction == direction && r.tier == Tier::NetworkPolicy)
                .map(of),
        );
        // What NetworkPolicy isolates and did not allow is dropped here: the
        // Baseline tier is only for the pods no NetworkPolicy selects.
        for family in Family::ALL {
            let (pod, _) = fields(direction);
            let expr = vec![
                in_set(payload(proto_name(family), pod), ruleset.isolated_set(direction, family)),
                to_denied(direction),
            ];
            out.push(rule(np_chain(direction), expr, None));
        }
        out.extend(
            ruleset
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.direction == direction && r.tier == Tier::Baseline)
                .map(of),
        );
        for only in logged(ruleset) {
            let mut expr: Vec<Statement> = only
                .map(|(family, set)| in_set(payload(proto_name(family), fields(direction).0), set))
                .into_iter()
                .collect();
            expr.push(Statement::Limit(Limit {
                rate: LOG_RATE,
                rate_unit: None,
                per: Some(Cow::Borrowed("second")),
                burst: Some(LOG_RATE),
                burst_unit: None,
                inv: None,
            }));
            expr.push(Statement::Log(Some(Log {
                prefix: Some(Cow::Borrowed(log_prefix(direction))),
                group: Some(u32::from(LOG_GROUP)),
                snaplen: None,
                queue_threshold: None,
                level: None,
                flags: None,
            })));
            out.push(rule(denied_chain(direction), expr, None));
        }
        out.push(rule(
            denied_chain(direction),
            vec![Statement::Counter(CounterStmt::Named(Cow::Borrowed(drop_counter(direction)))), Statement::Drop(None)],
            None,
        ));
    }
    out
}

/// The log rules of each denied chain: one for every drop, or one per
/// family for the pods of annotated namespaces (the set of their addresses).
fn logged(ruleset: &Ruleset) -> Vec<Option<(Family, &str)>> {
    match &ruleset.log_drops {
        DropLogging::Off => Vec::new(),
        DropLogging::All => vec![None],
        DropLogging::Pods(sets) => {
            Family::ALL.into_iter().map(|f| Some((f, sets[usize::from(f == Family::V6)].as_str()))).collect()
        }
    }
}

/// Where each of `ruleset`'s rules stands in the table: its chain, and its
/// position among that chain's rules; by index in [`Ruleset::rules`].
pub fn layout(ruleset: &Ruleset) -> Vec<(&'static str, usize)> {
    let mut out = vec![("", 0); ruleset.rules.len()];
    let mut positions: std::collections::HashMap<&'static str, usize> = std::collections::HashMap::new();
    for planned in planned_rules(ruleset) {
        let position = positions.entry(planned.chain).or_default();
        if let Some(i) = planned.index {
            out[i] = (planned.chain, *position);
        }
        *position += 1;
    }
    out
}

/// What a terse listing (no set contents) says of the table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableState {
    pub sets: Vec<String>,
    /// The fingerprint in the forward chain's first rule.
    pub fingerprint: Option<String>,
    pub rules: usize,
    /// Packets dropped, by direction (ingress, egress).
    pub drops: [u64; 2],
    /// The packet counter of each rule that has one, by chain and position in it.
    pub rule_packets: std::collections::HashMap<(String, usize), u64>,
}

impl TableState {
    fn parse(listing: &Value) -> TableState {
        let objects = listing.get("nftables").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let mut out = TableState::default();
        let mut positions: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for o in objects {
            if let Some(set) = o.get("set") {
                out.sets.extend(set["name"].as_str().map(str::to_string));
            } else if let Some(rule) = o.get("rule") {
                out.rules += 1;
                let chain = rule["chain"].as_str().unwrap_or_default().to_string();
                let position = positions.entry(chain.clone()).or_default();
                let counted =
                    rule["expr"].as_array().into_iter().flatten().find_map(|e| e["counter"]["packets"].as_u64());
                if let Some(packets) = counted {
                    out.rule_packets.insert((chain, *position), packets);
                }
                *position += 1;
                if rule["chain"] == FORWARD && out.fingerprint.is_none() {
                    out.fingerprint = rule["comment"].as_str().map(str::to_string);
                }
            } else if let Some(counter) = o.get("counter") {
                let packets = counter["packets"].as_u64().unwrap_or(0);
                match counter["name"].as_str() {
                    Some(n) if n == drop_counter(Direction::Ingress) => out.drops[0] = packets,
                    Some(n) if n == drop_counter(Direction::Egress) => out.drops[1] = packets,
                    _ => {}
                }
            }
        }
        out
    }

    /// The packets each rule of the ruleset laid out as `layout` has counted, by index.
    pub fn rule_packets(&self, layout: &[(&'static str, usize)]) -> Vec<u64> {
        layout
            .iter()
            .map(|(chain, pos)| self.rule_packets.get(&(chain.to_string(), *pos)).copied().unwrap_or(0))
            .collect()
    }

    /// Whether the kernel holds exactly `ruleset`, whose [`fingerprint`] is
    /// `fingerprint` (as far as a terse listing tells).
    pub fn holds(&self, ruleset: &Ruleset, fingerprint: &str) -> bool {
        self.fingerprint.as_deref() == Some(fingerprint) && self.rules == rule_count(ruleset)
    }
}

/// Rules the table holds for `ruleset`.
pub fn rule_count(ruleset: &Ruleset) -> usize {
    // forward: established + neighbour discovery + 4 jumps; input: the same but
    // 2 jumps (egress only); 2 gotos + 4 isolation drops; 2 drops (+ their logs)
    // in the denied chains.
    18 + 2 * logged(ruleset).len() + ruleset.rules.len()
}

/// The table as `nft -j -t list table` shows it; none when there is none.
pub async fn list() -> Result<Option<TableState>, NftError> {
    Ok(nft::list(ID, true).await?.map(|v| TableState::parse(&v)))
}

/// Replaces what the table holds with `ruleset`, in one transaction.
pub async fn apply(ruleset: &Ruleset, existing_sets: &[String], rewrite_all: bool) -> Result<(), NftError> {
    nft::apply(ID, "replacing its ruleset", &transaction(ruleset, existing_sets, rewrite_all)).await
}

/// Removes the table (`overlayd cleanup`), if present.
pub async fn remove() -> Result<(), NftError> {
    nft::delete(ID).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_discovery_is_accepted_before_any_pod_is_policed() {
        let ruleset = Ruleset {
            isolated: ["i4".into(), "i6".into(), "e4".into(), "e6".into()],
            policed: ["i4".into(), "i6".into(), "e4".into(), "e6".into()],
            ..Ruleset::default()
        };
        let text = chain_rules(&ruleset, FORWARD);
        let nd =
            text.iter().position(|t| t.contains("nd-neighbor-advert") && t.contains("icmpv6")).expect("an ND rule");
        let first_jump = text.iter().position(|t| t.contains("jump")).expect("jumps");
        assert!(nd < first_jump, "{text:#?}");
        assert!(text[nd].contains("nd-neighbor-solicit") && text[nd].contains("accept"), "{}", text[nd]);
    }

    #[test]
    fn a_pod_to_its_own_node_meets_its_egress_rules_and_nothing_else() {
        let ruleset = Ruleset {
            isolated: ["i4".into(), "i6".into(), "e4".into(), "e6".into()],
            policed: ["pi4".into(), "pi6".into(), "pe4".into(), "pe6".into()],
            ..Ruleset::default()
        };
        let text = chain_rules(&ruleset, INPUT);
        assert_eq!(text.len(), 4, "{text:#?}");
        assert!(text[0].contains("established") && text[0].contains("accept"), "{}", text[0]);
        assert!(text[1].contains("nd-neighbor-solicit") && text[1].contains("accept"), "{}", text[1]);
        for (t, set) in text[2..].iter().zip(["@pe4", "@pe6"]) {
            assert!(t.contains(set) && t.contains("saddr") && t.contains("\"jump\":{\"target\":\"egress\"}"), "{t}");
        }
        let json = serde_json::to_value(transaction(&ruleset, &[], true)).unwrap();
        let input = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["add"]["chain"]["name"] == INPUT)
            .expect("the input chain");
        assert_eq!(input["add"]["chain"]["hook"], "input");
        assert_eq!(input["add"]["chain"]["policy"], "accept");
    }

    /// The rules of `chain`, as `nft -j` receives them, as text.
    fn chain_rules(ruleset: &Ruleset, chain: &str) -> Vec<String> {
        let json = serde_json::to_value(transaction(ruleset, &[], true)).unwrap();
        json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o["add"]["rule"].as_object())
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].to_string())
            .collect()
    }

    #[test]
    fn the_rule_count_is_what_the_transaction_adds() {
        let pods = DropLogging::Pods(["l4".into(), "l6".into()]);
        for log_drops in [DropLogging::Off, DropLogging::All, pods] {
            let ruleset = Ruleset { log_drops, ..Ruleset::default() };
            let json = serde_json::to_value(transaction(&ruleset, &[], true)).unwrap();
            let added = json["nftables"].as_array().unwrap().iter().filter(|o| o["add"]["rule"].is_object()).count();
            assert_eq!(added, rule_count(&ruleset), "{:?}", ruleset.log_drops);
        }
    }

    #[test]
    fn drops_are_logged_for_every_pod_or_for_the_annotated_ones_by_their_own_direction() {
        let off = chain_rules(&Ruleset::default(), denied_chain(Direction::Ingress));
        assert!(off.len() == 1 && !off[0].contains("log"), "{off:#?}");
        let all = chain_rules(&Ruleset { log_drops: DropLogging::All, ..Ruleset::default() }, "ingress_denied");
        assert!(all[0].contains("\"group\":2718") && all[0].contains("\"limit\"") && !all[0].contains('@'), "{all:#?}");
        assert!(all[1].contains("drop") && !all[1].contains("log"), "{all:#?}");
        let pods = Ruleset { log_drops: DropLogging::Pods(["l4".into(), "l6".into()]), ..Ruleset::default() };
        // Ingress: the receiver is the policed pod; egress: the sender.
        let ingress = chain_rules(&pods, "ingress_denied");
        assert_eq!(ingress.len(), 3, "{ingress:#?}");
        assert!(ingress[0].contains("\"daddr\"") && ingress[0].contains("@l4") && ingress[0].contains("log"));
        assert!(ingress[1].contains("\"ip6\"") && ingress[1].contains("@l6") && ingress[1].contains("log"));
        let egress = chain_rules(&pods, "egress_denied");
        assert!(egress[0].contains("\"saddr\"") && egress[0].contains("@l4"), "{egress:#?}");
        assert!(
            egress[0].find("@l4") < egress[0].find("limit"),
            "the limit is spent on logged pods only: {}",
            egress[0]
        );
    }
}
