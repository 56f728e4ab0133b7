//! NAT outgoing (`--ip-masq`) as a resource: flannel's masquerade rules in an
//! nftables table of our own, `table ip overlay`. The ruleset is built with
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
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nftables::expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::helper::NftablesError;
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;

/// Our table: `table ip overlay`.
pub const TABLE: &str = "overlay";
const CHAIN: &str = "postrouting";
/// flannel's (and kube-proxy's) "masquerade this" mark bit: such packets are
/// masqueraded by kube-proxy already, so we leave them alone.
const KUBE_MASQ_MARK: u32 = 0x4000;
/// Multicast is never masqueraded.
const MULTICAST: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4);

/// What the table must hold: masquerade for pods of `network`, of which this node's are `subnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masquerade {
    /// The cluster network.
    pub network: Ipv4Net,
    /// This node's pod subnet.
    pub subnet: Ipv4Net,
}

/// Why nft failed.
#[derive(Debug, thiserror::Error)]
#[error("nftables table ip {TABLE}: {what}: {detail}")]
pub struct MasqError {
    what: &'static str,
    detail: String,
    /// The nft binary could not be run at all.
    nft_missing: bool,
}

impl MasqError {
    fn from_nft(what: &'static str) -> impl FnOnce(NftablesError) -> MasqError {
        move |e| {
            let nft_missing = matches!(e, NftablesError::NftExecution { .. });
            let detail = match e {
                NftablesError::NftExecution { inner, .. } => {
                    format!("cannot run nft (is the nftables package installed?): {inner}")
                }
                NftablesError::NftFailed { stderr, .. } => stderr.trim().to_string(),
                other => other.to_string(),
            };
            MasqError { what, detail, nft_missing }
        }
    }
}

fn addr(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed("ip"),
        field: Cow::Borrowed(field),
    })))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn addr_match(field: &'static str, op: Operator, net: Ipv4Net) -> Statement<'static> {
    Statement::Match(Match { left: addr(field), right: prefix(net), op })
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
    /// flannel's rules, in order.
    fn rules(&self) -> Vec<Vec<Statement<'static>>> {
        let (network, subnet) = (self.network, self.subnet);
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
                addr_match("daddr", Operator::NEQ, MULTICAST),
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
        let mut objects = replace_table();
        objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
            family: NfFamily::IP,
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
                family: NfFamily::IP,
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

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table { family: NfFamily::IP, name: Cow::Borrowed(TABLE), handle: None })
}

/// Add, delete, add: the table exists afterwards, empty, whatever it held.
fn replace_table() -> Vec<NfObject<'static>> {
    vec![
        NfObject::CmdObject(NfCmd::Add(table())),
        NfObject::CmdObject(NfCmd::Delete(table())),
        NfObject::CmdObject(NfCmd::Add(table())),
    ]
}

fn delete_table() -> Nftables<'static> {
    Nftables {
        objects: Cow::Owned(vec![
            NfObject::CmdObject(NfCmd::Add(table())),
            NfObject::CmdObject(NfCmd::Delete(table())),
        ]),
    }
}

/// Our table as `nft -j` lists it; none when there is no such table.
async fn list() -> Result<Option<Value>, MasqError> {
    match nftables::helper::get_current_ruleset_raw_async(nftables::helper::DEFAULT_NFT, ["list", "table", "ip", TABLE])
        .await
    {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| MasqError {
            what: "reading the table",
            detail: e.to_string(),
            nft_missing: false,
        }),
        Err(NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file or directory") => Ok(None),
        Err(e) => Err(MasqError::from_nft("reading the table")(e)),
    }
}

/// Makes the node hold `desired` (none: no table at all). With `read`, the
/// table is read and changed only if it differs; without, it is written.
/// Returns whether anything was changed.
pub async fn reconcile(desired: Option<&Masquerade>, read: bool) -> Result<bool, MasqError> {
    if read {
        let listed = match list().await {
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
        Some(m) => {
            nftables::helper::apply_ruleset_async(&m.ruleset()).await.map_err(MasqError::from_nft("replacing it"))?
        }
        None => remove().await?,
    }
    Ok(true)
}

/// Removes our table, if present.
pub async fn remove() -> Result<(), MasqError> {
    nftables::helper::apply_ruleset_async(&delete_table()).await.map_err(MasqError::from_nft("removing it"))
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
        let Statement::Masquerade(Some(nat)) = &outgoing[2] else { panic!("{:?}", outgoing[2]) };
        assert_eq!(nat.flags, Some(HashSet::from([NATFlag::FullyRandom])));
        // pod → pod returns before any masquerade; traffic to our own pods is never NATed.
        assert!(matches!(rules[1].last(), Some(Statement::Return(None))));
        assert_eq!(rules[3][1], addr_match("daddr", Operator::EQ, m.subnet));
        assert!(matches!(rules[3].last(), Some(Statement::Return(None))));
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
