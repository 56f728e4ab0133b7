//! The NetworkPolicy truth table, after upstream's conformance suite: pods
//! `a`, `b`, `c` in namespaces `x`, `y`, `z` over three Kubernetes-mode
//! nodes (dual stack), serving TCP and UDP on ports 80 and 81. Each case
//! puts its policies in the API, waits until every node has applied them,
//! then compares the expected reachability matrix with real connections,
//! over IPv4 and IPv6. The same table runs against the API test double and
//! against a real kube-apiserver (written with kubectl): [`PolicyApi`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::netpol::{
    differences, namespace_object, pod_object, probe, probe_to, Matrix, PodName, Proto, Servers, TablePod,
};
use crate::{wait_until, Node};

/// Where the health endpoints of the table's nodes listen, in their namespaces.
pub const HEALTH: &str = "127.0.0.1:8471";
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NAMES: [&str; 3] = ["a", "b", "c"];

/// How the table writes to the API: namespaces, pods and NetworkPolicies,
/// in the shape the API test double takes them (a pod with its status).
pub trait PolicyApi: Sync {
    /// Creates or replaces `object` of `resource` (`namespaces`, `pods`, `networkpolicies`).
    fn put(&self, resource: &str, object: Value) -> Result<()>;
    /// Makes the API hold exactly `policies` (namespace, name, spec) among
    /// the table's namespaces; whether anything changed.
    fn set_policies(&self, namespaces: &[&str], policies: &[(&str, &str, Value)]) -> Result<bool>;
    /// Makes the API hold exactly `policies` (name, spec) of ClusterNetworkPolicy; whether anything changed.
    fn set_cluster_policies(&self, policies: &[(&str, Value)]) -> Result<bool>;
}

impl PolicyApi for crate::kube_api::KubeApi {
    fn put(&self, resource: &str, object: Value) -> Result<()> {
        crate::kube_api::KubeApi::put(self, resource, object)
    }

    fn set_policies(&self, namespaces: &[&str], policies: &[(&str, &str, Value)]) -> Result<bool> {
        let mut changed = !policies.is_empty();
        for ns in namespaces {
            for name in ["p1", "p2", "p3"] {
                changed |= self.remove("networkpolicies", ns, name).is_ok();
            }
        }
        for (ns, name, spec) in policies {
            self.put("networkpolicies", json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))?;
        }
        Ok(changed)
    }

    fn set_cluster_policies(&self, policies: &[(&str, Value)]) -> Result<bool> {
        let mut changed = !policies.is_empty();
        for name in CLUSTER_POLICY_NAMES {
            changed |= self.remove("clusternetworkpolicies", "", name).is_ok();
        }
        for (name, spec) in policies {
            anyhow::ensure!(
                CLUSTER_POLICY_NAMES.contains(name),
                "the table names its ClusterNetworkPolicies {CLUSTER_POLICY_NAMES:?}"
            );
            self.put("clusternetworkpolicies", json!({"metadata": {"name": name}, "spec": spec}))?;
        }
        Ok(changed)
    }
}

/// The names the table gives its ClusterNetworkPolicies.
pub const CLUSTER_POLICY_NAMES: [&str; 3] = ["cnp-1", "cnp-2", "cnp-3"];

/// The policy syncs of every node, from its metrics.
pub fn syncs(nodes: &[Node]) -> Vec<u64> {
    nodes
        .iter()
        .map(|n| crate::probe::metric(&n.ns, HEALTH.parse().unwrap(), "overlay_policy_syncs_total").unwrap_or(0))
        .collect()
}

/// The table's pods and their servers, on three nodes, written through `api`.
pub struct Table<'a> {
    nodes: &'a [Node],
    api: &'a dyn PolicyApi,
    pods: Vec<TablePod>,
    _servers: Servers,
}

impl<'a> Table<'a> {
    /// The namespaces and pods of the table on `nodes` (each with 3 pods and
    /// a daemon serving [`HEALTH`]), put in the API through `api`.
    pub fn new(nodes: &'a [Node], api: &'a dyn PolicyApi) -> Result<Table<'a>> {
        for ns in NAMESPACES {
            api.put("namespaces", namespace_object(ns, &[]))?;
        }
        // x/a on node 1, x/b on node 2, ...: every namespace spans the three
        // nodes, and every pair of pods is either bridged or routed.
        let mut next = [0usize; 3];
        let mut pods = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, name) in NAMES.iter().enumerate() {
                let n = (i + j) % 3;
                let pod = &nodes[n].pods[next[n]];
                next[n] += 1;
                let mut ips = vec![IpAddr::V4(pod.ip)];
                ips.extend(pod.ip6.map(IpAddr::V6));
                pods.push(TablePod {
                    name: PodName { ns, name },
                    netns: pod.ns.path(),
                    node: nodes[n].name.clone(),
                    ips,
                });
            }
        }
        for p in &pods {
            api.put("pods", pod_object(p, &labels(&[("pod", p.name.name)])))?;
        }
        let servers = Servers::start(&pods)?;
        let t = Table { nodes, api, pods, _servers: servers };
        anyhow::ensure!(
            wait_until(Duration::from_secs(30), || syncs(t.nodes).iter().all(|s| *s > 0)),
            "every node applies the (empty) policy set once it has listed pods, namespaces and policies"
        );
        Ok(t)
    }

    fn ip(&self, ns: &str, name: &str, family: u8) -> String {
        let p = self.pods.iter().find(|p| p.name.ns == ns && p.name.name == name).unwrap();
        p.ips.iter().find(|ip| if family == 4 { ip.is_ipv4() } else { ip.is_ipv6() }).unwrap().to_string()
    }

    /// Makes the API hold exactly `policies` (namespace, name, spec) and
    /// waits until every node has applied the change.
    pub fn set_policies(&self, policies: &[(&str, &str, Value)]) {
        let before = syncs(self.nodes);
        if self.api.set_policies(&NAMESPACES, policies).expect("policies written") {
            self.settle(&before);
        }
    }

    /// Makes the API hold exactly `policies` and the ClusterNetworkPolicies
    /// `cluster` (name, spec), and waits until every node has applied them.
    pub fn set_all_policies(&self, policies: &[(&str, &str, Value)], cluster: &[(&str, Value)]) {
        let before = syncs(self.nodes);
        let np = self.api.set_policies(&NAMESPACES, policies).expect("policies written");
        let cnp = self.api.set_cluster_policies(cluster).expect("ClusterNetworkPolicies written");
        if np || cnp {
            self.settle(&before);
        }
    }

    fn settle(&self, before: &[u64]) {
        assert!(
            wait_until(Duration::from_secs(10), || syncs(self.nodes).iter().zip(before).all(|(now, was)| now > was)),
            "every node applies a change within 10 s"
        );
    }

    /// Checks the matrix of every probe in both families; a mismatch is
    /// looked at again for up to 3 s (a change that came in two watch bursts).
    /// Asks node 1's daemon to explain every pair (`/explain`, as `overlayd
    /// explain` does) and checks that it agrees with the connections made.
    fn check_explain(&self, case: &str, proto: Proto, port: u16, family: u8, want: &Matrix) {
        let proto_name = match proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let pairs: Vec<(&PodName, &PodName)> = want.keys().map(|(f, t)| (f, t)).collect();
        let paths = pairs
            .iter()
            .map(|(f, t)| format!("/explain?src={f}&dst={t}&port={port}/{proto_name}&family={family}"))
            .collect();
        let answers = crate::probe::http_get_many(&self.nodes[0].ns, HEALTH.parse().unwrap(), paths).expect("explain");
        let mut wrong = Vec::new();
        for ((f, t), (code, body)) in pairs.iter().zip(answers) {
            let answer: Value = serde_json::from_str(&body).unwrap_or_default();
            let allowed = want[&((*f).clone(), (*t).clone())];
            if code != 200 || answer["allowed"].as_bool() != Some(allowed) {
                wrong.push(format!("{f} -> {t}: connected {allowed}, explained {code} {}", answer["summary"]));
            }
        }
        assert!(
            wrong.is_empty(),
            "case {case:?}, {proto:?} {port}, IPv{family}: explain disagrees with {} connections:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    fn check(&self, case: &str, probes: &[(Proto, u16)], expect: &dyn Fn(&PodName, &PodName, Proto, u16) -> bool) {
        for &(proto, port) in probes {
            let mut want = Matrix::new();
            for f in &self.pods {
                for t in &self.pods {
                    if f.name != t.name {
                        want.insert((f.name.clone(), t.name.clone()), expect(&f.name, &t.name, proto, port));
                    }
                }
            }
            // Both families at once; a retry probes one family again.
            let (mut first, mut second) = std::thread::scope(|s| {
                let v6 = s.spawn(|| probe(&self.pods, proto, port, 6).unwrap());
                let v4 = probe(&self.pods, proto, port, 4).unwrap();
                (Some(v4), Some(v6.join().unwrap()))
            });
            for family in [4, 6] {
                let deadline = Instant::now() + Duration::from_secs(3);
                loop {
                    let got = match family {
                        4 => first.take().unwrap_or_else(|| probe(&self.pods, proto, port, 4).unwrap()),
                        _ => second.take().unwrap_or_else(|| probe(&self.pods, proto, port, 6).unwrap()),
                    };
                    let diff = differences(&want, &got);
                    if diff.is_empty() {
                        self.check_explain(case, proto, port, family, &want);
                        break;
                    }
                    if Instant::now() > deadline {
                        let tables: Vec<String> = self
                            .nodes
                            .iter()
                            .map(|n| n.ns.exec("nft", &["list", "table", "inet", "overlay_policy"]).unwrap_or_default())
                            .collect();
                        panic!(
                            "case {case:?}, {proto:?} {port}, IPv{family}: {} wrong:\n{}\n\nnode 1's table:\n{}\n\nnode 1's log:\n{}",
                            diff.len(),
                            diff.join("\n"),
                            tables[0],
                            self.nodes[0].log_text()
                        );
                    }
                }
            }
        }
    }
}

/// Servers (TCP and UDP, 80 and 81) in the namespaces of nodes 1 and 2,
/// named `node/1` and `node/2`, on their underlay addresses.
fn node_servers(nodes: &[Node]) -> Result<(Vec<TablePod>, Servers)> {
    let servers: Vec<TablePod> = nodes[..2]
        .iter()
        .zip(["1", "2"])
        .map(|(n, name)| TablePod {
            name: PodName { ns: "node", name },
            netns: n.ns.path(),
            node: n.name.clone(),
            ips: vec![IpAddr::V4(n.ip), IpAddr::V6(n.ip6)],
        })
        .collect();
    let running = Servers::start(&servers)?;
    Ok((servers, running))
}

impl Table<'_> {
    /// Checks what every pod reaches of `servers` (nodes' own addresses) over
    /// TCP 80 in `families`, against `expect`; a mismatch is looked at again
    /// for up to 3 s. Node 1's daemon explains the pairs of its pods.
    fn check_nodes(
        &self,
        case: &str,
        servers: &[TablePod],
        families: &[u8],
        expect: &dyn Fn(&PodName, &PodName) -> bool,
    ) {
        for &family in families {
            let mut want = Matrix::new();
            for f in &self.pods {
                for s in servers {
                    want.insert((f.name.clone(), s.name.clone()), expect(&f.name, &s.name));
                }
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let diff = differences(&want, &probe_to(&self.pods, servers, Proto::Tcp, 80, family).unwrap());
                if diff.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "case {case:?}, TCP 80 to the nodes, IPv{family}: {} wrong:\n{}\n\nnode 1's table:\n{}",
                    diff.len(),
                    diff.join("\n"),
                    self.nodes[0].ns.exec("nft", &["list", "table", "inet", "overlay_policy"]).unwrap_or_default()
                );
            }
            // `explain` with an address as the destination: the sender's egress alone.
            let pairs: Vec<(&TablePod, &TablePod)> = self
                .pods
                .iter()
                .filter(|p| p.node == self.nodes[0].name)
                .flat_map(|p| servers.iter().map(move |s| (p, s)))
                .collect();
            let paths = pairs
                .iter()
                .map(|(p, s)| {
                    let addr = s.ips.iter().find(|ip| ip.is_ipv4() == (family == 4)).unwrap();
                    format!("/explain?src={}&dst={addr}&port=80/tcp&family={family}", p.name)
                })
                .collect();
            let answers =
                crate::probe::http_get_many(&self.nodes[0].ns, HEALTH.parse().unwrap(), paths).expect("explain");
            for ((p, s), (code, body)) in pairs.iter().zip(answers) {
                let answer: Value = serde_json::from_str(&body).unwrap_or_default();
                let allowed = want[&(p.name.clone(), s.name.clone())];
                assert!(
                    code == 200 && answer["allowed"].as_bool() == Some(allowed),
                    "case {case:?}, IPv{family}: {} -> {}: connected {allowed}, explained {code} {body}",
                    p.name,
                    s.name
                );
            }
        }
    }
}

/// A pod's egress policy covers its own node's addresses (the input hook)
/// as it covers every other node's (forward): x/a is on node 1.
fn check_own_node(t: &Table) {
    let (servers, _running) = node_servers(t.nodes).expect("servers on the nodes");
    t.check_nodes("no policy: every pod reaches nodes 1 and 2", &servers, &[4, 6], &|_, _| true);
    let egress =
        |to: Value| json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": to});
    t.set_policies(&[("x", "p1", egress(json!([])))]);
    t.check_nodes("x/a isolated for egress reaches no node, its own neither", &servers, &[4, 6], &|f, _| {
        !is(f, "x", "a")
    });
    let node_1 = json!([{"to": [{"ipBlock": {"cidr": format!("{}/32", t.nodes[0].ip)}},
                                {"ipBlock": {"cidr": format!("{}/128", t.nodes[0].ip6)}}]}]);
    t.set_policies(&[("x", "p1", egress(node_1))]);
    t.check_nodes("x/a may reach its own node's address only", &servers, &[4, 6], &|f, s| {
        !is(f, "x", "a") || s.name == "1"
    });
    t.set_policies(&[]);
}

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn is(p: &PodName, ns: &str, name: &str) -> bool {
    p.ns == ns && p.name == name
}

const TCP80: &[(Proto, u16)] = &[(Proto::Tcp, 80)];
const TCP80_81: &[(Proto, u16)] = &[(Proto::Tcp, 80), (Proto::Tcp, 81)];
const ALL: &[(Proto, u16)] = &[(Proto::Tcp, 80), (Proto::Tcp, 81), (Proto::Udp, 80), (Proto::Udp, 81)];

type Expect = Box<dyn Fn(&PodName, &PodName, Proto, u16) -> bool>;
type Policies = Box<dyn Fn(&Table) -> Vec<(&'static str, &'static str, Value)>>;

struct Case {
    name: &'static str,
    policies: Policies,
    probes: &'static [(Proto, u16)],
    expect: Expect,
}

fn case(
    name: &'static str,
    probes: &'static [(Proto, u16)],
    policies: impl Fn(&Table) -> Vec<(&'static str, &'static str, Value)> + 'static,
    expect: impl Fn(&PodName, &PodName, Proto, u16) -> bool + 'static,
) -> Case {
    Case { name, policies: Box::new(policies), probes, expect: Box::new(expect) }
}

/// An ipBlock peer of each family: `cidr` is given per family.
fn blocks(t: &Table, except: &[(&str, &str)]) -> Vec<Value> {
    vec![
        json!({"ipBlock": {"cidr": "10.244.0.0/16", "except": except.iter().map(|(ns, n)| format!("{}/32", t.ip(ns, n, 4))).collect::<Vec<_>>()}}),
        json!({"ipBlock": {"cidr": "fd00:10:244::/56", "except": except.iter().map(|(ns, n)| format!("{}/128", t.ip(ns, n, 6))).collect::<Vec<_>>()}}),
    ]
}

fn cases() -> Vec<Case> {
    let to_xa = |t: &PodName| is(t, "x", "a");
    let from_xa = |f: &PodName| is(f, "x", "a");
    vec![
        case("no policy: everything is open", TCP80, |_| vec![], |_, _, _, _| true),
        case(
            "default-deny ingress in x",
            ALL,
            |_| vec![("x", "p1", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))],
            |_, t, _, _| t.ns != "x",
        ),
        case(
            "default-deny egress in x",
            TCP80,
            |_| vec![("x", "p1", json!({"podSelector": {}, "policyTypes": ["Egress"]}))],
            |f, _, _, _| f.ns != "x",
        ),
        case(
            "default-deny all in x",
            TCP80,
            |_| vec![("x", "p1", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))],
            |f, t, _, _| f.ns != "x" && t.ns != "x",
        ),
        case(
            "allow-all ingress in x",
            TCP80,
            |_| vec![("x", "p1", json!({"podSelector": {}, "ingress": [{}]}))],
            |_, _, _, _| true,
        ),
        case(
            "allow-all egress in x",
            TCP80,
            |_| vec![("x", "p1", json!({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}))],
            |_, _, _, _| true,
        ),
        case(
            "deny ingress to x/a only (podSelector)",
            TCP80,
            |_| vec![("x", "p1", json!({"podSelector": {"matchLabels": {"pod": "a"}}}))],
            move |_, t, _, _| !to_xa(t),
        ),
        case(
            "allow x/a from its own namespace",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || f.ns == "x",
        ),
        case(
            "allow x/a from pod b of its namespace",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || is(f, "x", "b"),
        ),
        case(
            "allow x/a from namespace y (namespaceSelector)",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || f.ns == "y",
        ),
        case(
            "allow x/a from namespaces In [y, z] (matchExpressions)",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || f.ns != "x",
        ),
        case(
            "allow x/a from namespaces NotIn [x]",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || f.ns != "x",
        ),
        case(
            "allow x/a from pod b in namespace y (both selectors in one peer)",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || is(f, "y", "b"),
        ),
        case(
            "allow x/a from pod b of x or any pod of y (two peers)",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}, {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || is(f, "x", "b") || f.ns == "y",
        ),
        case(
            "allow x/a from pods b of every namespace",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || f.name == "b",
        ),
        case(
            "allow x/a from the pod network except y/a (ipBlock with except)",
            TCP80,
            |t| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": blocks(t, &[("y", "a")])}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || !is(f, "y", "a"),
        ),
        case(
            "allow x/a only from x/b's address (ipBlock /32 and /128)",
            TCP80,
            |t| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"ipBlock": {"cidr": format!("{}/32", t.ip("x", "b", 4))}},
                {"ipBlock": {"cidr": format!("{}/128", t.ip("x", "b", 6))}}]}]}),
                )]
            },
            move |f, t, _, _| !to_xa(t) || is(f, "x", "b"),
        ),
        case(
            "egress from x/a to the pod network except y/b (ipBlock with except)",
            TCP80,
            |t| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": blocks(t, &[("y", "b")])}]}),
                )]
            },
            move |f, t, _, _| !from_xa(f) || !is(t, "y", "b"),
        ),
        case(
            "egress from x/a to everything but namespace z (ipBlock except z's pods)",
            TCP80,
            |t| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": blocks(t, &[("z", "a"), ("z", "b"), ("z", "c")])}]}),
                )]
            },
            move |f, t, _, _| !from_xa(f) || t.ns != "z",
        ),
        case(
            "egress from x/a to 0.0.0.0/0 and ::/0",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]}]}),
                )]
            },
            |_, _, _, _| true,
        ),
        case(
            "ingress to x/a on TCP 80 only",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}),
                )]
            },
            move |_, t, p, port| !to_xa(t) || (p == Proto::Tcp && port == 80),
        ),
        case(
            "ingress to x/a on port 81 (protocol defaults to TCP)",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 81}]}]}),
                )]
            },
            move |_, t, p, port| !to_xa(t) || (p == Proto::Tcp && port == 81),
        ),
        case(
            "ingress to x/a on the named port serve-80-tcp",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
                )]
            },
            move |_, t, p, port| !to_xa(t) || (p == Proto::Tcp && port == 80),
        ),
        case(
            "ingress to x/a on the named port serve-81-udp",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
                )]
            },
            move |_, t, p, port| !to_xa(t) || (p == Proto::Udp && port == 81),
        ),
        case(
            "ingress to x/a on TCP 80-81 (endPort)",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}]}),
                )]
            },
            move |_, t, p, _| !to_xa(t) || p == Proto::Tcp,
        ),
        case(
            "ingress to x/a on TCP 81-90 (endPort)",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]}),
                )]
            },
            move |_, t, p, port| !to_xa(t) || (p == Proto::Tcp && port == 81),
        ),
        case(
            "ingress to x/a on every UDP port (protocol, no port)",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
                )]
            },
            move |_, t, p, _| !to_xa(t) || p == Proto::Udp,
        ),
        case(
            "ingress to x/a on SCTP 80 only: TCP and UDP closed",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
                )]
            },
            move |_, t, _, _| !to_xa(t),
        ),
        case(
            "ingress to x/a on TCP 80 and UDP 81 (two ports in one rule)",
            ALL,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80}, {"port": 81, "protocol": "UDP"}]}]}),
                )]
            },
            move |_, t, p, port| !to_xa(t) || (p == Proto::Tcp && port == 80) || (p == Proto::Udp && port == 81),
        ),
        case(
            "ingress to x/a from pod b on port 80 only (peer and port together)",
            TCP80_81,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
                )]
            },
            move |f, t, _, port| !to_xa(t) || (is(f, "x", "b") && port == 80),
        ),
        case(
            "egress from x/a on TCP 80 only",
            TCP80_81,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 80}]}]}),
                )]
            },
            move |f, _, _, port| !from_xa(f) || port == 80,
        ),
        case(
            "egress from x/a to the named port serve-81-tcp of its peers",
            TCP80_81,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
                )]
            },
            move |f, _, _, port| !from_xa(f) || port == 81,
        ),
        case(
            "egress from x/a to DNS (UDP 53) and to pods b anywhere",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [
                {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                )]
            },
            move |f, t, _, _| !from_xa(f) || t.name == "b",
        ),
        case(
            "egress from namespace x to namespace y only",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
                )]
            },
            |f, t, _, _| f.ns != "x" || t.ns == "y",
        ),
        case(
            "deny-all plus allow-all in x: policies add up to open",
            TCP80,
            |_| {
                vec![
                    ("x", "p1", json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
                    ("x", "p2", json!({"podSelector": {}, "ingress": [{}]})),
                ]
            },
            |_, _, _, _| true,
        ),
        case(
            "two policies add up: x/a from pod b, and from pod c",
            TCP80,
            |_| {
                vec![
                    (
                        "x",
                        "p1",
                        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                    ),
                    (
                        "x",
                        "p2",
                        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
                    ),
                ]
            },
            move |f, t, _, _| !to_xa(t) || is(f, "x", "b") || is(f, "x", "c"),
        ),
        case(
            "ingress isolated with no rules, egress open (explicit policyTypes)",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress", "Egress"], "egress": [{}]}),
                )]
            },
            move |_, t, _, _| !to_xa(t),
        ),
        case(
            "egress denied, ingress allowed: x/a reaches nobody, everybody reaches x/a",
            TCP80,
            |_| {
                vec![
                    ("x", "p1", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]})),
                    ("x", "p2", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]})),
                ]
            },
            move |f, _, _, _| !from_xa(f),
        ),
        case(
            "sender's egress and receiver's ingress both count",
            TCP80,
            |_| {
                vec![
                    (
                        "x",
                        "p1",
                        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                    ),
                    (
                        "x",
                        "p2",
                        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
                    ),
                ]
            },
            move |f, t, _, _| {
                let egress_ok = !from_xa(f) || is(t, "x", "b");
                let ingress_ok = !is(t, "x", "b") || is(f, "x", "c");
                egress_ok && ingress_ok
            },
        ),
        case(
            "podSelector with matchExpressions In [a, b]",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}}),
                )]
            },
            |_, t, _, _| !(t.ns == "x" && t.name != "c"),
        ),
        case(
            "podSelector with DoesNotExist matches every pod",
            TCP80,
            |_| {
                vec![(
                    "y",
                    "p1",
                    json!({"podSelector": {"matchExpressions": [{"key": "absent", "operator": "DoesNotExist"}]}}),
                )]
            },
            |_, t, _, _| t.ns != "y",
        ),
        case(
            "a peer selector that matches nothing allows nothing",
            TCP80,
            |_| {
                vec![(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "nobody"}}}]}]}),
                )]
            },
            move |_, t, _, _| !to_xa(t),
        ),
        case(
            "default-deny in every namespace",
            TCP80,
            |_| {
                vec![
                    ("x", "p1", json!({"podSelector": {}})),
                    ("y", "p1", json!({"podSelector": {}})),
                    ("z", "p1", json!({"podSelector": {}})),
                ]
            },
            |_, _, _, _| false,
        ),
        case(
            "deny in every namespace, each allowing its own namespace",
            TCP80,
            |_| {
                NAMESPACES
                    .iter()
                    .map(|ns| (*ns, "p1", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})))
                    .collect()
            },
            |f, t, _, _| f.ns == t.ns,
        ),
        case(
            "a policy in y does not touch x",
            TCP80,
            |_| vec![("y", "p1", json!({"podSelector": {"matchLabels": {"pod": "a"}}}))],
            |_, t, _, _| !is(t, "y", "a"),
        ),
    ]
}

/// Runs every case of the table, then the dynamic ones (a policy updated in
/// place, a pod and a namespace relabelled, the policy deleted).
pub fn run(t: &Table) {
    let cases = cases();
    assert!(cases.len() >= 40, "at least 40 upstream cases, got {}", cases.len());
    for c in &cases {
        t.set_policies(&(c.policies)(t));
        t.check(c.name, c.probes, &*c.expect);
    }

    // SCTP is compiled into the table even though this kernel cannot carry it.
    t.set_policies(&[("x", "p1", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}))]);
    let table = t.nodes[0].ns.exec("nft", &["list", "table", "inet", "overlay_policy"]).unwrap();
    assert!(table.contains("sctp dport 80 counter packets 0 bytes 0 accept"), "{table}");

    // Dynamic cases: updates, relabels and deletions, each applied in place.
    let allow_from =
        |selector: Value| json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [selector]}]});
    t.set_policies(&[("x", "p1", allow_from(json!({"podSelector": {"matchLabels": {"pod": "b"}}})))]);
    t.check("allow from pod b", TCP80, &|f, to, _, _| !is(to, "x", "a") || is(f, "x", "b"));
    // The policy updated: now pod c.
    let before = syncs(t.nodes);
    t.api
        .put("networkpolicies", json!({"metadata": {"name": "p1", "namespace": "x"}, "spec": allow_from(json!({"podSelector": {"matchLabels": {"pod": "c"}}}))}))
        .unwrap();
    t.settle(&before);
    t.check("policy updated to pod c", TCP80, &|f, to, _, _| !is(to, "x", "a") || is(f, "x", "c"));
    // A pod relabelled: x/b becomes pod=c.
    let before = syncs(t.nodes);
    let xb = t.pods.iter().find(|p| is(&p.name, "x", "b")).unwrap();
    t.api.put("pods", pod_object(xb, &labels(&[("pod", "c")]))).unwrap();
    t.settle(&before);
    t.check("x/b relabelled pod=c", TCP80, &|f, to, _, _| !is(to, "x", "a") || f.ns == "x");
    let before = syncs(t.nodes);
    t.api.put("pods", pod_object(xb, &labels(&[("pod", "b")]))).unwrap();
    t.settle(&before);
    // A namespace relabelled: z gets ns=y.
    t.set_policies(&[("x", "p1", allow_from(json!({"namespaceSelector": {"matchLabels": {"ns": "y"}}})))]);
    t.check("allow from ns=y", TCP80, &|f, to, _, _| !is(to, "x", "a") || f.ns == "y");
    let before = syncs(t.nodes);
    t.api.put("namespaces", json!({"metadata": {"name": "z", "labels": {"ns": "y"}}})).unwrap();
    t.settle(&before);
    t.check("namespace z relabelled ns=y", TCP80, &|f, to, _, _| !is(to, "x", "a") || f.ns != "x");
    let before = syncs(t.nodes);
    t.api.put("namespaces", namespace_object("z", &[])).unwrap();
    t.settle(&before);
    t.check("namespace z labelled back", TCP80, &|f, to, _, _| !is(to, "x", "a") || f.ns == "y");
    // The policy deleted: open again.
    t.set_policies(&[]);
    t.check("policy deleted", TCP80, &|_, _, _, _| true);

    check_own_node(t);
}

/// ClusterNetworkPolicy with NetworkPolicy, on the same pods: each tier's
/// place in the order, Pass, priorities and their reordering, egress to
/// networks and pods, named ports. Needs the ClusterNetworkPolicy CRD.
pub fn run_cluster(t: &Table) {
    let ns = |name: &str| json!({"namespaces": {"matchLabels": {"ns": name}}});
    let all_ns = json!({"namespaces": {}});
    let admin_on_x = |priority: i32, ingress: Value| json!({"tier": "Admin", "priority": priority, "subject": {"namespaces": {"matchLabels": {"ns": "x"}}}, "ingress": ingress});
    let rule = |action: &str, from: Value| json!({"action": action, "from": [from]});
    let allow_all_into_x = ("x", "p1", json!({"podSelector": {}, "ingress": [{}]}));

    t.set_all_policies(
        std::slice::from_ref(&allow_all_into_x),
        &[("cnp-1", admin_on_x(10, json!([rule("Deny", ns("y"))])))],
    );
    t.check("Admin Deny from y beats x's NetworkPolicy allowing all", TCP80, &|f, to, _, _| {
        !(to.ns == "x" && f.ns == "y")
    });

    let pass_then_deny = [
        ("cnp-1", admin_on_x(10, json!([rule("Pass", ns("y"))]))),
        ("cnp-2", admin_on_x(20, json!([rule("Deny", all_ns.clone())]))),
    ];
    t.set_all_policies(&[], &pass_then_deny);
    t.check("Admin Pass from y, then Deny all: y reaches x by the default", TCP80, &|f, to, _, _| {
        to.ns != "x" || f.ns == "y"
    });
    let from_z_only = (
        "x",
        "p1",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
    );
    t.set_all_policies(&[from_z_only], &pass_then_deny);
    t.check("Admin Pass from y hands y to x's NetworkPolicy, which allows z only", TCP80, &|_, to, _, _| to.ns != "x");

    let baseline_deny_all = json!({"tier": "Baseline", "priority": 1, "subject": {"namespaces": {}},
                                   "ingress": [rule("Deny", all_ns.clone())]});
    let x_a_open = ("x", "p1", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}));
    t.set_all_policies(&[x_a_open], &[("cnp-1", baseline_deny_all)]);
    t.check("Baseline Deny only where no NetworkPolicy selects the pod", TCP80, &|_, to, _, _| is(to, "x", "a"));

    t.set_all_policies(
        &[],
        &[
            ("cnp-1", admin_on_x(10, json!([rule("Accept", ns("y"))]))),
            ("cnp-2", admin_on_x(20, json!([rule("Deny", all_ns.clone())]))),
        ],
    );
    t.check("Admin Accept from y at 10 before Deny all at 20", TCP80, &|f, to, _, _| to.ns != "x" || f.ns == "y");
    t.set_all_policies(
        &[],
        &[
            ("cnp-1", admin_on_x(30, json!([rule("Accept", ns("y"))]))),
            ("cnp-2", admin_on_x(20, json!([rule("Deny", all_ns.clone())]))),
        ],
    );
    t.check("reordered: Deny all at 20 before Accept from y at 30", TCP80, &|_, to, _, _| to.ns != "x");

    // Egress from x/a: to z/a by its addresses, and to y's pods, on TCP 80 only.
    let networks = json!([format!("{}/32", t.ip("z", "a", 4)), format!("{}/128", t.ip("z", "a", 6))]);
    let egress = json!({"tier": "Admin", "priority": 5,
        "subject": {"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}},
        "egress": [{"action": "Deny", "to": [{"networks": networks}, {"pods": {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {}}}],
                    "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]});
    t.set_all_policies(std::slice::from_ref(&allow_all_into_x), &[("cnp-1", egress)]);
    t.check("Admin Deny of x/a's egress to a network and to y's pods, TCP 80 only", TCP80_81, &|f, to, _, port| {
        !(is(f, "x", "a") && port == 80 && (is(to, "z", "a") || to.ns == "y"))
    });

    // A named port: the destination's own.
    let named = json!({"tier": "Baseline", "priority": 1, "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
        "ingress": [{"action": "Deny", "from": [all_ns.clone()], "protocols": [{"destinationNamedPort": "serve-81-tcp"}]}]});
    t.set_all_policies(&[], &[("cnp-1", named)]);
    t.check("Baseline Deny into x's port named serve-81-tcp", TCP80_81, &|_, to, _, port| {
        !(to.ns == "x" && port == 81)
    });

    // A nodes peer: node 1 by its hostname label. x's pods on node 1 meet
    // it in the input hook, the others in forward on their own nodes.
    let (servers, _running) = node_servers(t.nodes).expect("servers on the nodes");
    let node_1 = json!({"tier": "Admin", "priority": 5, "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
        "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"kubernetes.io/hostname": t.nodes[0].name}}}]}]});
    t.set_all_policies(&[], &[("cnp-1", node_1)]);
    // IPv4: the Nodes of the API test double have no IPv6 address.
    t.check_nodes("Admin Deny of x's egress to node 1 (a nodes peer)", &servers, &[4], &|f, s| {
        f.ns != "x" || s.name != "1"
    });

    t.set_all_policies(&[], &[]);
    check_open(t);
}

/// Checks that every pod reaches every other (TCP 80).
pub fn check_open(t: &Table) {
    t.check("no policy", TCP80, &|_, _, _, _| true);
}
