//! NetworkPolicy, bad and big input: a policy with an invalid CIDR or a
//! port name no pod declares is logged and allows nothing, while every
//! other policy keeps being enforced; 10,000 policies and a peer selector
//! that matches every pod of a 5,000-pod cluster are applied, with the
//! daemon's memory bounded. One Kubernetes-mode node, pods `x/a` and `x/b`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use overlay_tests::cluster::ClusterOptions;
use overlay_tests::netpol::{namespace_object, pod_object, probe, PodName, Proto, Servers, TablePod};
use overlay_tests::{require_root, wait_until, Cluster};
use serde_json::json;

const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HEALTH: &str = "127.0.0.1:8471";

fn metric(c: &Cluster, name: &str) -> u64 {
    overlay_tests::probe::metric(&c.nodes[0].ns, HEALTH.parse().unwrap(), name).unwrap_or(0)
}

/// Whether `from` reaches `to` on TCP 80.
fn reaches(pods: &[TablePod], from: &'static str, to: &'static str) -> bool {
    let m = probe(pods, Proto::Tcp, 80, 4).unwrap();
    m[&(PodName { ns: "x", name: from }, PodName { ns: "x", name: to })]
}

fn rss_kib(c: &Cluster) -> u64 {
    let pid = c.nodes[0].pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn bad_policies_are_logged_and_the_rest_enforced_at_scale() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).expect("cluster");
    c.start_kube_api(NET_CONF).expect("API test double");
    c.add_ready_kube_node(&["--health-addr", HEALTH], 2).expect("node");
    let api = c.api();
    api.put("namespaces", namespace_object("x", &[])).unwrap();
    let pods: Vec<TablePod> = ["a", "b"]
        .iter()
        .zip(&c.nodes[0].pods)
        .map(|(name, p)| TablePod {
            name: PodName { ns: "x", name },
            netns: p.ns.path(),
            node: c.nodes[0].name.clone(),
            ips: vec![IpAddr::V4(p.ip)],
        })
        .collect();
    for p in &pods {
        let labels: BTreeMap<String, String> = [("pod".to_string(), p.name.name.to_string())].into();
        api.put("pods", pod_object(p, &labels)).unwrap();
    }
    let _servers = Servers::start(&pods).unwrap();
    assert!(wait_until(Duration::from_secs(20), || metric(&c, "overlay_policy_syncs_total") > 0));
    assert!(reaches(&pods, "b", "a") && reaches(&pods, "a", "b"));

    // A policy with an invalid CIDR and one with a port name no pod has,
    // next to a sound one.
    let policy =
        |name: &str, spec: serde_json::Value| json!({"metadata": {"name": name, "namespace": "x"}, "spec": spec});
    api.put("networkpolicies", policy("bad-cidr", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/33"}}]}]}))).unwrap();
    api.put(
        "networkpolicies",
        policy(
            "bad-port",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": "no-such-port"}]}]}),
        ),
    )
    .unwrap();
    api.put("networkpolicies", policy("good", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}))).unwrap();
    let log_says = |text: &str| wait_until(Duration::from_secs(10), || c.nodes[0].log_text().contains(text));
    assert!(
        log_says(r#"NetworkPolicy x/bad-cidr: ipBlock cidr "10.244.0.0/33" is not a CIDR; that peer allows nothing"#),
        "{}",
        c.nodes[0].log_text()
    );
    assert!(log_says(
        r#"NetworkPolicy x/bad-port: 1 selected pod(s) on this node declare no TCP port named "no-such-port""#
    ));
    assert!(wait_until(Duration::from_secs(5), || metric(&c, "overlay_policy_problems") == 2));
    assert!(!reaches(&pods, "b", "a"), "the broken policy still isolates x/a and allows nothing");
    assert!(reaches(&pods, "a", "b"), "the sound policy lets x/a reach x/b");

    // 10,000 policies, each opening one more port of x/a: one rule of
    // 10,000 ports (they differ only in ports), next to the sound policy's.
    let started = Instant::now();
    for i in 0..10_000u32 {
        api.put(
            "networkpolicies",
            policy(
                &format!("port-{i}"),
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 10_000 + i}]}]}),
            ),
        )
        .unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(120), || metric(&c, "overlay_network_policies_in_effect") == 10_003
            && metric(&c, "overlay_policy_rules") == 2),
        "10,000 policies applied: {} in effect, {} rules",
        metric(&c, "overlay_network_policies_in_effect"),
        metric(&c, "overlay_policy_rules")
    );
    eprintln!("10,000 policies in the kernel {:?} after the first was put", started.elapsed());
    assert!(!reaches(&pods, "b", "a"), "port 80 of x/a is still closed");
    let rss = rss_kib(&c);
    eprintln!("daemon RSS with 10,003 policies: {rss} KiB");
    assert!(rss < 200 * 1024, "RSS {rss} KiB");

    // A peer selector that matches every pod, among 5,000 pods of other nodes.
    for i in 0..5_000u32 {
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 244, 100, 0)) + i).to_string();
        api.put(
            "pods",
            json!({"metadata": {"name": format!("p{i}"), "namespace": "x", "labels": {"pod": "other"}},
                   "spec": {"nodeName": "node-elsewhere", "containers": [{"name": "c", "image": "i"}]},
                   "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
        )
        .unwrap();
    }
    api.put(
        "networkpolicies",
        policy(
            "bad-cidr",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        ),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(60), || reaches(&pods, "b", "a")), "every pod may reach x/a now");
    assert!(
        wait_until(Duration::from_secs(10), || metric(&c, "overlay_policy_problems") == 1),
        "only the bad port is left"
    );
    let table = || c.nodes[0].ns.exec("nft", &["list", "table", "inet", "overlay_policy"]).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || table().contains("10.244.100.0-10.244.119.135")),
        "5,000 peers of consecutive addresses are one range: {}",
        table().lines().filter(|l| l.contains("10.244.1")).collect::<Vec<_>>().join("\n")
    );
    let rss = rss_kib(&c);
    eprintln!("daemon RSS with 10,003 policies and 5,002 pods: {rss} KiB");
    assert!(rss < 200 * 1024, "RSS {rss} KiB");
    assert!(c.nodes[0].running(), "the daemon kept running");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn without_rbac_for_policy_the_node_says_why_and_stays_unready_unless_policy_is_off() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).expect("cluster");
    c.start_kube_api(NET_CONF).expect("API test double");
    // The ClusterRole of an older release: Nodes only.
    let old_role = [("get", "nodes"), ("list", "nodes"), ("watch", "nodes"), ("patch", "nodes/status")];
    c.api().enforce_rbac(old_role.iter().map(|(v, r)| (v.to_string(), r.to_string())).collect());
    c.add_ready_kube_node(&["--health-addr", HEALTH], 0).expect("node 1");
    let readyz = |c: &Cluster, n: usize| {
        overlay_tests::probe::http_get(&c.nodes[n].ns, HEALTH.parse().unwrap(), "/readyz").unwrap_or((0, String::new()))
    };
    assert!(
        wait_until(Duration::from_secs(10), || c.nodes[0].log_text().contains("or run with --network-policy=false")),
        "{}",
        c.nodes[0].log_text()
    );
    let (code, body) = readyz(&c, 0);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("network_policy=false"), "{body}");

    // With enforcement off, the same role is enough.
    c.add_ready_kube_node(&["--health-addr", HEALTH, "--network-policy=false"], 0).expect("node 2");
    assert!(wait_until(Duration::from_secs(10), || readyz(&c, 1).0 == 200), "{:?}", readyz(&c, 1));
    assert!(!c.nodes[1].log_text().contains("NetworkPolicy"), "{}", c.nodes[1].log_text());
}
