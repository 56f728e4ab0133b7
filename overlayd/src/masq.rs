//! NAT outgoing (`--ip-masq`): flannel's masquerade and forward rules, in an
//! nftables table of our own, replaced atomically through `nft -j -f -`.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use serde_json::{json, Value};

/// Our table: `table ip overlay`.
pub const TABLE: &str = "overlay";
/// flannel's (and kube-proxy's) "masquerade this" mark bit: such packets are
/// masqueraded by kube-proxy already, so we leave them alone.
const KUBE_MASQ_MARK: u32 = 0x4000;

/// Why nft failed.
#[derive(Debug, thiserror::Error)]
#[error("nft ({what}): {detail}")]
pub struct MasqError {
    what: &'static str,
    detail: String,
}

fn prefix(net: Ipv4Net) -> Value {
    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

fn addr_match(field: &str, op: &str, net: Ipv4Net) -> Value {
    json!({"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}}, "right": prefix(net)}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "ip", "table": TABLE, "chain": chain, "expr": expr}}})
}

/// The nft JSON that replaces our table with the rules for `network`, with
/// this node's pods in `subnet`. One transaction: no moment without rules.
pub fn ruleset(network: Ipv4Net, subnet: Ipv4Net) -> Value {
    let table = json!({"table": {"family": "ip", "name": TABLE}});
    let masq = json!({"masquerade": {"flags": ["fully-random"]}});
    let multicast: Ipv4Net = "224.0.0.0/4".parse().unwrap_or(network);
    let commands = vec![
        json!({"add": table}),
        json!({"delete": table}),
        json!({"add": table}),
        json!({"add": {"chain": {"family": "ip", "table": TABLE, "name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}),
        json!({"add": {"chain": {"family": "ip", "table": TABLE, "name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
        rule(
            "postrouting",
            vec![
                json!({"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, KUBE_MASQ_MARK]}, "right": KUBE_MASQ_MARK}}),
                json!({"return": null}),
            ],
        ),
        // pod → pod: never NAT.
        rule(
            "postrouting",
            vec![addr_match("saddr", "==", network), addr_match("daddr", "==", network), json!({"return": null})],
        ),
        // pod → outside (not multicast): masquerade to the node's address.
        rule(
            "postrouting",
            vec![addr_match("saddr", "==", network), addr_match("daddr", "!=", multicast), masq.clone()],
        ),
        // outside → our own pods: no NAT.
        rule(
            "postrouting",
            vec![addr_match("saddr", "!=", network), addr_match("daddr", "==", subnet), json!({"return": null})],
        ),
        // outside → other nodes' pods: masquerade, so replies come back through us.
        rule("postrouting", vec![addr_match("saddr", "!=", network), addr_match("daddr", "==", network), masq]),
        rule("forward", vec![addr_match("saddr", "==", network), json!({"accept": null})]),
        rule("forward", vec![addr_match("daddr", "==", network), json!({"accept": null})]),
    ];
    json!({"nftables": commands.into_iter().map(|c| if c.get("add").is_some() || c.get("delete").is_some() { c } else { json!({"add": c}) }).collect::<Vec<_>>()})
}

fn nft(what: &'static str, input: &Value) -> Result<(), MasqError> {
    let fail = |detail: String| MasqError { what, detail };
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run nft (is the nftables package installed?): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.to_string().as_bytes()).map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Installs (or re-asserts) the masquerade rules.
pub fn assert_rules(network: Ipv4Net, subnet: Ipv4Net) -> Result<(), MasqError> {
    nft("replace table", &ruleset(network, subnet))
}

/// Removes our table, if present.
pub fn remove() -> Result<(), MasqError> {
    let table = json!({"table": {"family": "ip", "name": TABLE}});
    nft("remove table", &json!({"nftables": [{"add": table}, {"delete": table}]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_mirrors_flannel_rules() {
        let text = ruleset("10.244.0.0/16".parse().unwrap(), "10.244.33.0/24".parse().unwrap()).to_string();
        assert_eq!(text.matches("\"masquerade\"").count(), 2);
        assert_eq!(text.matches("fully-random").count(), 2);
        assert!(text.contains(r#"{"prefix":{"addr":"10.244.33.0","len":24}}"#));
        assert!(text.contains(r#"{"prefix":{"addr":"224.0.0.0","len":4}}"#));
        assert!(text.contains(r#""hook":"postrouting""#));
    }
}
