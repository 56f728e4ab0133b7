//! End-to-end, Kubernetes mode, dual stack and IPv6-only: the real overlayd
//! in network namespaces, with Nodes served by the in-process API test double
//! (`overlay_tests::kube_api`, which hands out `spec.podCIDRs` of both
//! families as a controller-manager with a dual `--cluster-cidr` does).

use std::net::IpAddr;
use std::time::Duration;

use overlay_tests::cluster::{ClusterOptions, DUAL_STACK_CONFIG};
use overlay_tests::probe::{ping_full_size, ping_until};
use overlay_tests::{require_root, wait_until, Cluster};
use serde_json::json;

const PREFIX: &str = "flannel.alpha.coreos.com";
const IPV6_ONLY: &str =
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;

fn kube_cluster(net_conf: &str, nodes: usize, pods: usize) -> Cluster {
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).expect("cluster");
    c.start_kube_api(net_conf).expect("API test double");
    for _ in 0..nodes {
        c.add_ready_kube_node(&[], pods).expect("node");
    }
    c
}

fn annotations(c: &Cluster, name: &str) -> std::collections::BTreeMap<String, String> {
    c.api().node(name).unwrap().metadata.annotations.unwrap_or_default()
}

fn pod_cidrs(c: &Cluster, name: &str) -> Vec<String> {
    c.api().node(name).unwrap().spec.unwrap().pod_cidrs.unwrap_or_default()
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_dual_stack_pod_cidrs_reach_every_pod_in_both_families() {
    require_root();
    let c = kube_cluster(DUAL_STACK_CONFIG, 2, 1);
    for node in &c.nodes {
        // The lease is the Node's podCIDRs, one per family; flannel's v6 annotations are published.
        let cidrs = pod_cidrs(&c, &node.name);
        assert_eq!(cidrs, [node.subnet().unwrap().to_string(), node.subnet_v6().unwrap().to_string()]);
        let a = annotations(&c, &node.name);
        assert_eq!(a[&format!("{PREFIX}/public-ip")], node.ip.to_string());
        assert_eq!(a[&format!("{PREFIX}/public-ipv6")], node.ip6.to_string());
        let data: serde_json::Value = serde_json::from_str(&a[&format!("{PREFIX}/backend-v6-data")]).unwrap();
        assert_eq!(data, json!({"VNI": 1, "VtepMAC": node.vtep_mac_v6().unwrap()}));
    }
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    for (from, to) in [(a, b), (b, a)] {
        for ip in [IpAddr::V4(to.ip), IpAddr::V6(to.ip6.unwrap())] {
            assert!(ping_until(&from.ns, ip, Duration::from_secs(5)), "{} cannot reach {ip}", from.ip);
        }
    }
    ping_full_size(&a.ns, b.ip6.unwrap(), 1430).expect("a full-size IPv6 packet crosses");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_ipv6_only_works_with_no_ipv4_at_all() {
    require_root();
    let c = kube_cluster(IPV6_ONLY, 2, 1);
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    assert!(a.ip.is_unspecified() && a.ip6.is_some(), "an IPv6-only pod has no IPv4 address");
    assert!(ping_until(&a.ns, b.ip6.unwrap(), Duration::from_secs(5)), "IPv6-only pods cannot reach each other");
    assert!(ping_until(&b.ns, a.ip6.unwrap(), Duration::from_secs(5)));
    let node = &c.nodes[0];
    let env = std::fs::read_to_string(&node.subnet_file).unwrap();
    assert!(!env.contains("FLANNEL_NETWORK=") && env.contains("FLANNEL_IPV6_SUBNET="), "{env}");
    // No IPv4 device, no IPv4 annotations: flannel's IPv6-only node.
    assert!(node.ns.ip(&["link", "show", "overlay.1"]).is_err(), "an IPv4 device on an IPv6-only node");
    let ann = annotations(&c, &node.name);
    assert!(!ann.contains_key(&format!("{PREFIX}/public-ip")), "{ann:?}");
    assert!(!ann.contains_key(&format!("{PREFIX}/backend-data")), "{ann:?}");
    assert_eq!(ann[&format!("{PREFIX}/public-ipv6")], node.ip6.to_string());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_a_node_with_three_pod_cidrs_is_skipped_and_one_without_ipv6_is_refused() {
    require_root();
    let mut c = kube_cluster(DUAL_STACK_CONFIG, 1, 0);
    // A peer with three podCIDRs: said, and not programmed; the daemon goes on.
    c.api().add_node("weird", "192.168.50.77".parse().unwrap(), false).unwrap();
    c.api()
        .edit_node("weird", |n| {
            n["spec"] = json!({"podCIDR": "10.244.77.0/24", "podCIDRs": ["10.244.77.0/24", "fd00:10:244:77::/64", "fd00:10:244:78::/64"]});
            n["metadata"]["annotations"] = json!({
                format!("{PREFIX}/backend-type"): "vxlan",
                format!("{PREFIX}/backend-data"): r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:77"}"#,
                format!("{PREFIX}/public-ip"): "192.168.50.77",
                format!("{PREFIX}/kube-subnet-manager"): "true",
            });
        })
        .unwrap();
    let node = &mut c.nodes[0];
    assert!(
        wait_until(Duration::from_secs(5), || node.log_text().contains("one network per family")),
        "{}",
        node.log_text()
    );
    assert!(!node.routes().contains("10.244.77."), "{}", node.routes());
    assert!(node.running());

    // Our own Node has only an IPv4 podCIDR while the net-conf turns IPv6 on: one clear error, nothing made.
    let i = c.add_kube_node(false, &[]).unwrap();
    let name = c.nodes[i].name.clone();
    c.api()
        .edit_node(&name, |n| n["spec"] = json!({"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}))
        .unwrap();
    let node = &mut c.nodes[i];
    node.start().unwrap();
    assert!(!node.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(node.log_text().contains("has no IPv6 podCIDR"), "{}", node.log_text());
    assert!(!node.ns.ip(&["link"]).unwrap().contains("overlay"));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_public_ipv6_overwrite_is_what_peers_send_to() {
    require_root();
    let mut c = kube_cluster(DUAL_STACK_CONFIG, 1, 0);
    let i = c.add_kube_node(true, &[]).unwrap();
    let name = c.nodes[i].name.clone();
    c.api()
        .edit_node(&name, |n| {
            n["metadata"]["annotations"] = json!({format!("{PREFIX}/public-ipv6-overwrite"): "fd00:50::99"});
        })
        .unwrap();
    let node = &mut c.nodes[i];
    node.start().unwrap();
    node.wait_ready(Duration::from_secs(20)).unwrap();
    let (v6, mac) = (node.subnet_v6().unwrap(), node.vtep_mac_v6().unwrap());
    assert_eq!(annotations(&c, &name)[&format!("{PREFIX}/public-ipv6")], "fd00:50::99");
    let peer = &c.nodes[0];
    let dst: std::net::Ipv6Addr = "fd00:50::99".parse().unwrap();
    assert!(wait_until(Duration::from_secs(5), || peer.has_peer_v6(v6, &mac, dst)), "{}", peer.v6_entries());
}
