//! NAT outgoing (`--ip-masq`) as a resource: flannel's masquerade rules in an
//! nftables table of our own per family, `table ip overlay` and `table ip6
//! overlay` (the same five rules; flannel has them in iptables and
//! ip6tables). The ruleset is built with
//! the typed schema of the `nftables` crate, applied in one transaction
//! (`nft -j -f -`, run as a child the runtime awaits, never blocking it), and
//! read back to tell whether someone deleted or flushed it.
//!
//! No forward rules: an nftables `accept` ends only its own base chain, so an
//! accept in our table cannot override another table's `drop` policy (such as
//! Docker's iptables FORWARD chain). Hosts that drop forwarded traffic by
//! policy must accept the cluster network themselves (README, "Forwarding").

use std::borrow::Cow;
use std::collections::HashSet;

use ipnet::IpNet;
use nftables::expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use proto::Family;
use serde_json::Value;

use crate::nft::{self, NftError, TableId};

/// Our table's name, in both families: `table ip overlay`, `table ip6 overlay`.
pub const TABLE: &str = "overlay";
const CHAIN: &str = "postrouting";
/// flannel's (and kube-proxy's) "masquerade this" mark bit: such packets are
/// masqueraded by kube-proxy already, so we leave them alone.
const KUBE_MASQ_MARK: u32 = 0x4000;

/// What a family's table must hold: masquerade for pods of `network`, of which this node's are `subnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masquerade {
    /// The cluster network.
    pub network: IpNet,
    /// This node's pod subnet.
    pub subnet: IpNet,
}

/// The nftables family of an IP family, and its name in nft's syntax and payload expressions.
/// The nftables family name of our table of `family` (`ip`, `ip6`).
pub fn nft_family_name(family: Family) -> &'static str {
    nf_family(family).1
}

fn nf_family(family: Family) -> (NfFamily, &'static str) {
    match family {
        Family::V4 => (NfFamily::IP, "ip"),
        Family::V6 => (NfFamily::IP6, "ip6"),
    }
}

fn addr(field: &'static str, family: Family) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed(nf_family(family).1),
        field: Cow::Borrowed(field),
    })))
}

fn prefix(net: IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn addr_match(field: &'static str, op: Operator, net: IpNet) -> Statement<'static> {
    Statement::Match(Match { left: addr(field, Family::of_net(&net)), right: prefix(net), op })
}

fn ret() -> Statement<'static> {
    Statement::Return(None)
}

fn masquerade() -> Statement<'static> {
    Statement::Masquerade(Some(NAT {
        addr: None,
        family: None,
        port: None,
        flags: Some(HashSet::from([NATFlag::FullyRandom])),
    }))
}

impl Masquerade {
    /// The family of the table.
    pub fn family(&self) -> Family {
        Family::of_net(&self.network)
    }

    /// flannel's rules, in order.
    fn rules(&self) -> Vec<Vec<Statement<'static>>> {
        let (network, subnet) = (self.network, self.subnet);
        let multicast = self.family().multicast();
        let marked = Statement::Match(Match {
            left: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark })),
                Expression::Number(KUBE_MASQ_MARK),
            ))),
            right: Expression::Number(KUBE_MASQ_MARK),
            op: Operator::EQ,
        });
        vec![
            // Marked by kube-proxy: it masquerades these itself.
            vec![marked, ret()],
            // pod → pod: never NAT.
            vec![addr_match("saddr", Operator::EQ, network), addr_match("daddr", Operator::EQ, network), ret()],
            // pod → outside (not multicast): masquerade to the node's address.
            vec![
                addr_match("saddr", Operator::EQ, network),
                addr_match("daddr", Operator::NEQ, multicast),
                masquerade(),
            ],
            // outside → our own pods: no NAT.
            vec![addr_match("saddr", Operator::NEQ, network), addr_match("daddr", Operator::EQ, subnet), ret()],
            // outside → other nodes' pods: masquerade, so replies come back through us.
            vec![addr_match("saddr", Operator::NEQ, network), addr_match("daddr", Operator::EQ, network), masquerade()],
        ]
    }

    /// The comment every rule carries: a fingerprint of the whole ruleset, so
    /// reading the table back tells whether it still holds exactly this.
    fn mark(&self) -> String {
        let rules = serde_json::to_string(&self.rules()).unwrap_or_default();
        format!("overlay {:016x}", proto::hash::fnv1a(rules.as_bytes()))
    }

    /// The commands that replace our table with this ruleset, in one
    /// transaction: there is no moment without rules.
    pub fn ruleset(&self) -> Nftables<'static> {
        let mark = self.mark();
        let family = nf_family(self.family()).0;
        let mut objects = replace_table(self.family());
        objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
            family,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(CHAIN),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Postrouting),
            prio: Some(100),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }))));
        for expr in self.rules() {
            objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
                family,
                table: Cow::Borrowed(TABLE),
                chain: Cow::Borrowed(CHAIN),
                expr: Cow::Owned(expr),
                comment: Some(Cow::Owned(mark.clone())),
                ..Rule::default()
            }))));
        }
        Nftables { objects: Cow::Owned(objects) }
    }

    /// Whether `nft -j list table ip overlay` output shows exactly this ruleset.
    fn is_listed_in(&self, listing: &Value) -> bool {
        let objects = listing.get("nftables").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let chain_ok = objects
            .iter()
            .filter_map(|o| o.get("chain"))
            .any(|c| c["name"] == CHAIN && c["type"] == "nat" && c["hook"] == "postrouting" && c["prio"] == 100);
        let rules: Vec<&Value> = objects.iter().filter_map(|o| o.get("rule")).collect();
        let mark = self.mark();
        chain_ok
            && rules.len() == self.rules().len()
            && rules.iter().all(|r| r["chain"] == CHAIN && r["comment"].as_str() == Some(&mark))
    }
}

/// Our table of `family`.
pub fn table_id(family: Family) -> TableId {
    TableId { family: nf_family(family).0, name: TABLE }
}

/// Add, delete, add: the table exists afterwards, empty, whatever it held.
fn replace_table(family: Family) -> Vec<NfObject<'static>> {
    let mut commands = nft::delete_commands(table_id(family));
    commands.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table_id(family).table()))));
    commands
}

/// Makes the node hold `desired` in the table of `family` (none: no table
/// at all). With `read`, the table is read and changed only if it differs;
/// without, it is written. Returns whether anything was changed.
pub async fn reconcile(family: Family, desired: Option<&Masquerade>, read: bool) -> Result<bool, NftError> {
    if read {
        let listed = match nft::list(table_id(family), false).await {
            Ok(listed) => listed,
            // Without nft there can be no table of ours to remove.
            Err(e) if desired.is_none() && e.nft_missing => return Ok(false),
            Err(e) => return Err(e),
        };
        let right = match (desired, &listed) {
            (None, None) => true,
            (Some(m), Some(listing)) => m.is_listed_in(listing),
            _ => false,
        };
        if right {
            return Ok(false);
        }
    }
    match desired {
        Some(m) => nft::apply(table_id(family), "replacing it", &m.ruleset()).await?,
        None => remove(family).await?,
    }
    Ok(true)
}

/// Whether our table of `family` exists (no nft: it cannot).
pub async fn exists(family: Family) -> Result<bool, NftError> {
    match nft::list(table_id(family), true).await {
        Ok(listed) => Ok(listed.is_some()),
        Err(e) if e.nft_missing => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes our table of `family`, if present.
pub async fn remove(family: Family) -> Result<(), NftError> {
    nft::delete(table_id(family)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masq() -> Masquerade {
        Masquerade { network: "10.244.0.0/16".parse().unwrap(), subnet: "10.244.33.0/24".parse().unwrap() }
    }

    fn commands<'a>(n: &'a Nftables<'static>) -> Vec<&'a NfCmd<'static>> {
        n.objects
            .iter()
            .map(|o| match o {
                NfObject::CmdObject(c) => c,
                other => panic!("not a command: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_ruleset_replaces_our_table_in_one_transaction() {
        let ruleset = masq().ruleset();
        let cmds = commands(&ruleset);
        assert!(matches!(cmds[0], NfCmd::Add(NfListObject::Table(t)) if t.name == TABLE && t.family == NfFamily::IP));
        assert!(matches!(cmds[1], NfCmd::Delete(NfListObject::Table(t)) if t.name == TABLE));
        assert!(matches!(cmds[2], NfCmd::Add(NfListObject::Table(_))));
        let NfCmd::Add(NfListObject::Chain(chain)) = cmds[3] else { panic!("{:?}", cmds[3]) };
        assert_eq!(
            (chain._type, chain.hook, chain.prio, chain.policy),
            (Some(NfChainType::NAT), Some(NfHook::Postrouting), Some(100), Some(NfChainPolicy::Accept))
        );
        let rules: Vec<&Rule> = cmds[4..]
            .iter()
            .map(|c| match c {
                NfCmd::Add(NfListObject::Rule(r)) => r,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(rules.len(), 5, "flannel's five masquerade rules, and no forward rules");
        let mark = masq().mark();
        assert!(rules.iter().all(|r| r.chain == CHAIN && r.comment.as_deref() == Some(mark.as_str())));
    }

    #[test]
    fn pods_going_outside_are_masqueraded_fully_random_but_not_to_multicast() {
        let m = masq();
        let rules = m.rules();
        let outgoing = &rules[2];
        assert_eq!(outgoing[0], addr_match("saddr", Operator::EQ, m.network));
        assert_eq!(outgoing[1], addr_match("daddr", Operator::NEQ, "224.0.0.0/4".parse().unwrap()));
        let Statement::Match(saddr) = &outgoing[0] else { panic!() };
        assert_eq!(serde_json::to_value(&saddr.left).unwrap()["payload"]["protocol"], "ip");
        let Statement::Masquerade(Some(nat)) = &outgoing[2] else { panic!("{:?}", outgoing[2]) };
        assert_eq!(nat.flags, Some(HashSet::from([NATFlag::FullyRandom])));
        // pod → pod returns before any masquerade; traffic to our own pods is never NATed.
        assert!(matches!(rules[1].last(), Some(Statement::Return(None))));
        assert_eq!(rules[3][1], addr_match("daddr", Operator::EQ, m.subnet));
        assert!(matches!(rules[3].last(), Some(Statement::Return(None))));
    }

    /// flannel's ip6tables rules of the dual-stack capture (shared/compat), as an ip6 table.
    #[test]
    fn ipv6_gets_the_same_rules_in_an_ip6_table() {
        let m =
            Masquerade { network: "fd00:10:244::/56".parse().unwrap(), subnet: "fd00:10:244:8::/64".parse().unwrap() };
        let ruleset = m.ruleset();
        let cmds = commands(&ruleset);
        assert!(matches!(cmds[0], NfCmd::Add(NfListObject::Table(t)) if t.family == NfFamily::IP6));
        let rules = m.rules();
        assert_eq!(rules.len(), 5);
        assert_eq!(rules[2][1], addr_match("daddr", Operator::NEQ, "ff00::/8".parse().unwrap()));
        assert_eq!(rules[3][1], addr_match("daddr", Operator::EQ, m.subnet));
        let Statement::Match(first) = &rules[1][0] else { panic!() };
        assert_eq!(serde_json::to_value(&first.left).unwrap()["payload"]["protocol"], "ip6");
        assert_eq!(serde_json::to_value(&first.right).unwrap()["prefix"]["addr"], "fd00:10:244::");
        assert_ne!(m.mark(), masq().mark());
    }

    #[test]
    fn a_listing_matches_only_when_every_rule_is_there() {
        let m = masq();
        let mark = m.mark();
        let rule = serde_json::json!({"rule": {"family": "ip", "table": TABLE, "chain": CHAIN, "comment": mark}});
        let chain = serde_json::json!({"chain": {"family": "ip", "table": TABLE, "name": CHAIN, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}});
        let listing = |n: usize| {
            let mut objects = vec![serde_json::json!({"metainfo": {}}), chain.clone()];
            objects.extend(std::iter::repeat_n(rule.clone(), n));
            serde_json::json!({ "nftables": objects })
        };
        assert!(m.is_listed_in(&listing(5)));
        assert!(!m.is_listed_in(&listing(0)), "a flushed chain");
        assert!(!m.is_listed_in(&listing(4)), "a deleted rule");
        let other = Masquerade { subnet: "10.244.34.0/24".parse().unwrap(), ..m };
        assert!(!other.is_listed_in(&listing(5)), "rules for another subnet");
    }
}
