//! End-to-end, Kubernetes mode: the real overlayd in network namespaces,
//! with leases from Node objects served by the in-process API test double
//! (`overlay_tests::kube_api`; no kube-apiserver can run on these machines).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use overlay_tests::cluster::ClusterOptions;
use overlay_tests::probe::{ping_until, PingRun};
use overlay_tests::{require_root, wait_until, Cluster};
use serde_json::json;

const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const PREFIX: &str = "flannel.alpha.coreos.com";

fn kube_cluster() -> Cluster {
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).expect("cluster");
    c.start_kube_api(NET_CONF).expect("API test double");
    c
}

/// Adds a node in Kubernetes mode, starts it and waits until it is ready.
fn ready_node(c: &mut Cluster, pods: usize, extra: &[&str]) -> usize {
    c.add_ready_kube_node(extra, pods).expect("node")
}

fn annotations(c: &Cluster, name: &str) -> std::collections::BTreeMap<String, String> {
    c.api().node(name).unwrap().metadata.annotations.unwrap_or_default()
}

/// The podCIDR the API gave a node.
fn pod_cidr(c: &Cluster, name: &str) -> Ipv4Net {
    c.api().node(name).unwrap().spec.unwrap().pod_cidr.unwrap().parse().unwrap()
}

/// Registers a node with no daemon, carrying a peer's annotations, as a
/// flanneld (or an overlayd elsewhere) would publish them.
fn add_remote_peer(c: &Cluster, name: &str, ip: Ipv4Addr, mac: &str) -> Ipv4Net {
    let cidr = c.api().add_node(name, ip, true).unwrap().unwrap();
    set_peer_annotations(c, name, ip, mac);
    cidr
}

fn set_peer_annotations(c: &Cluster, name: &str, ip: Ipv4Addr, mac: &str) {
    c.api()
        .edit_node(name, |n| {
            n["metadata"]["annotations"] = json!({
                format!("{PREFIX}/backend-type"): "vxlan",
                format!("{PREFIX}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                format!("{PREFIX}/public-ip"): ip.to_string(),
                format!("{PREFIX}/kube-subnet-manager"): "true",
            });
        })
        .unwrap();
}

/// Whether the node carries `NetworkUnavailable=False` with our reason.
fn network_available(c: &Cluster, name: &str) -> bool {
    let conditions = c.api().node(name).unwrap().status.unwrap().conditions.unwrap_or_default();
    conditions
        .iter()
        .any(|k| k.type_ == "NetworkUnavailable" && k.status == "False" && k.reason.as_deref() == Some("OverlayIsUp"))
}

fn metric(c: &Cluster, node: usize, name: &str) -> u64 {
    overlay_tests::probe::metric(&c.nodes[node].ns, "127.0.0.1:8471".parse().unwrap(), name).unwrap()
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_nodes_publish_flannel_annotations_and_clear_network_unavailable() {
    require_root();
    let mut c = kube_cluster();
    // Installed, so the daemons list and watch ClusterNetworkPolicies too (the role check below).
    c.api().install_cluster_policy_crd();
    for _ in 0..2 {
        ready_node(&mut c, 0, &[]);
    }
    // Each node's lease is its podCIDR, and it published flannel's annotations.
    for node in &c.nodes {
        let cidr = pod_cidr(&c, &node.name);
        assert_eq!(node.subnet().unwrap(), cidr, "subnet.env of {} is not its podCIDR", node.name);
        let a = annotations(&c, &node.name);
        assert_eq!(a[&format!("{PREFIX}/backend-type")], "vxlan");
        assert_eq!(a[&format!("{PREFIX}/public-ip")], node.ip.to_string());
        assert_eq!(a[&format!("{PREFIX}/kube-subnet-manager")], "true");
        let data: serde_json::Value = serde_json::from_str(&a[&format!("{PREFIX}/backend-data")]).unwrap();
        assert_eq!(data, json!({"VNI": 1, "VtepMAC": node.vtep_mac().unwrap()}));
    }
    // ...and, once its dataplane was up, told the cluster its network is available.
    for node in &c.nodes {
        let name = node.name.clone();
        assert!(
            wait_until(Duration::from_secs(10), || network_available(&c, &name)),
            "{name} has no NetworkUnavailable=False condition:\n{}",
            node.log_text()
        );
        // The kubelet's own condition is left alone (a strategic merge by type).
        let conditions = c.api().node(&name).unwrap().status.unwrap().conditions.unwrap();
        assert!(conditions.iter().any(|k| k.type_ == "Ready"), "{conditions:?}");
    }
    // The ClusterRole grants exactly what the daemons used, no more.
    let used: std::collections::BTreeSet<(String, String)> =
        c.api().accesses().iter().map(|(v, r)| (v.to_string(), r.to_string())).collect();
    assert_eq!(
        used,
        overlay_tests::manifests::cluster_role_grants().unwrap(),
        "daemon requests vs deploy/overlay.yaml"
    );
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_every_pod_reaches_every_pod_across_nodes() {
    require_root();
    let mut c = kube_cluster();
    for _ in 0..3 {
        ready_node(&mut c, 1, &[]);
    }
    let pods = c.pods();
    for (a, from) in &pods {
        for (b, to) in &pods {
            if a != b {
                assert!(
                    ping_until(&from.ns, to.ip, Duration::from_secs(5)),
                    "pod on node {} cannot reach pod {} on node {}:\n{}",
                    a + 1,
                    to.ip,
                    b + 1,
                    c.nodes[*a].log_text()
                );
            }
        }
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_peer_changing_its_mac_leaves_no_stale_entry() {
    require_root();
    let mut c = kube_cluster();
    ready_node(&mut c, 0, &[]);
    // A peer's MAC changes (its VTEP was recreated): old FDB and ARP entries go, new ones come.
    let remote_ip = Ipv4Addr::new(192, 168, 50, 99);
    let remote = add_remote_peer(&c, "remote-1", remote_ip, "0a:00:00:00:00:01");
    let node = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(5), || node.has_peer(remote, "0a:00:00:00:00:01")), "{}", node.log_text());
    set_peer_annotations(&c, "remote-1", remote_ip, "0a:00:00:00:00:02");
    assert!(wait_until(Duration::from_secs(5), || node.has_peer(remote, "0a:00:00:00:00:02")), "{}", node.log_text());
    assert!(!node.fdb().contains("0a:00:00:00:00:01"), "stale FDB entry:\n{}", node.fdb());
    assert!(!node.neighbours().contains("0a:00:00:00:00:01"), "stale neighbour:\n{}", node.neighbours());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_deleted_node_entries_are_removed_from_every_peer() {
    require_root();
    let mut c = kube_cluster();
    for _ in 0..3 {
        ready_node(&mut c, 1, &[]);
    }
    // A node decommissioned: daemon stopped, Node deleted.
    let gone = pod_cidr(&c, "node-3");
    let gone_mac = c.nodes[2].vtep_mac().unwrap();
    c.nodes[2].stop().unwrap();
    c.api().delete_node("node-3").unwrap();
    for node in &c.nodes[..2] {
        assert!(
            wait_until(Duration::from_secs(5), || !node.has_any_entry_for(gone, &gone_mac)),
            "entries for deleted node remain on {}:\n{}\n{}\n{}",
            node.name,
            node.neighbours(),
            node.fdb(),
            node.routes()
        );
    }
    assert!(ping_until(&c.nodes[0].pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(3)));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_our_node_deleted_and_registered_again_is_said_in_kubernetes_words() {
    require_root();
    let mut c = kube_cluster();
    ready_node(&mut c, 0, &[]);
    let ip = c.nodes[0].ip;
    c.api().delete_node("node-1").unwrap();
    let node = &c.nodes[0];
    assert!(
        wait_until(Duration::from_secs(10), || node
            .log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("our Node was deleted"))),
        "{}",
        node.log_text()
    );
    // The kubelet registers it again, the controller-manager gives it a podCIDR: the daemon takes it.
    let cidr = c.api().add_node("node-1", ip, true).unwrap().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || node.subnet().is_ok_and(|s| s == cidr)
            && annotations(&c, "node-1").contains_key(&format!("{PREFIX}/backend-data"))),
        "{}",
        node.log_text()
    );
    let log = node.log_text();
    assert!(!log.contains("LEASE LOST"), "{log}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_our_node_deleted_leaves_the_dataplane_to_the_daemon_until_it_is_back() {
    require_root();
    let mut c = kube_cluster();
    ready_node(&mut c, 0, &["--health-addr", "127.0.0.1:8471"]);
    ready_node(&mut c, 0, &[]);
    let (subnet, mac) = (c.nodes[1].subnet().unwrap(), c.nodes[1].vtep_mac().unwrap());
    c.api().delete_node("node-1").unwrap();
    let node = &c.nodes[0];
    assert!(
        wait_until(Duration::from_secs(10), || node.log_text().contains("our Node was deleted")),
        "{}",
        node.log_text()
    );
    // While it waits for its Node, the daemon keeps the node as it was: resyncs go on...
    let resyncs = metric(&c, 0, "overlay_resyncs_total");
    assert!(
        wait_until(Duration::from_secs(5), || metric(&c, 0, "overlay_resyncs_total") >= resyncs + 2),
        "{}",
        node.log_text()
    );
    // ...its peer's entries stay, and damage to them is repaired.
    assert!(node.has_peer(subnet, &mac));
    node.ns.ip(&["route", "del", &subnet.to_string()]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || node.has_peer(subnet, &mac)), "{}", node.log_text());
    let ip = node.ip;
    c.api().add_node("node-1", ip, true).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || annotations(&c, "node-1")
            .contains_key(&format!("{PREFIX}/backend-data"))),
        "{}",
        c.nodes[0].log_text()
    );
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_overwritten_annotations_are_written_back() {
    require_root();
    let mut c = kube_cluster();
    ready_node(&mut c, 0, &[]);
    // Someone overwrites our published MAC: the daemon writes it back, so
    // peers never keep sending to a wrong VTEP.
    let own_mac = c.nodes[0].vtep_mac().unwrap();
    c.api()
        .edit_node("node-1", |n| {
            n["metadata"]["annotations"][format!("{PREFIX}/backend-data")] =
                json!(r#"{"VNI":1,"VtepMAC":"0a:66:66:66:66:66"}"#)
        })
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || annotations(&c, "node-1")[&format!("{PREFIX}/backend-data")]
            .contains(&own_mac)),
        "node-1 did not restore its annotation:\n{}",
        c.nodes[0].log_text()
    );
    // Said in Kubernetes words, as a warning: nothing was lost that it cannot repair.
    let log = c.nodes[0].log_text();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("annotations were rewritten; restoring them")),
        "{log}"
    );
    assert!(!log.contains("LEASE LOST") && !log.contains("ERROR"), "{log}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_lists_come_from_the_cache_writes_go_through_status_and_every_request_says_who_it_is() {
    require_root();
    let mut c = kube_cluster();
    for _ in 0..3 {
        ready_node(&mut c, 0, &[]);
    }
    for node in &c.nodes {
        let name = node.name.clone();
        assert!(wait_until(Duration::from_secs(10), || network_available(&c, &name)), "{}", node.log_text());
    }
    let stats = c.api().stats();
    // Every list was served from the watch cache, none was a quorum read.
    assert!(stats.lists >= 3 && stats.cached_lists == stats.lists, "{stats:?}");
    // One read of its own Node per daemon at start; annotations and condition through nodes/status only.
    assert_eq!(stats.gets, 3, "{stats:?}");
    let accesses = c.api().accesses();
    assert!(!accesses.contains(&("patch", "nodes")), "{accesses:?}");
    assert!(accesses.contains(&("patch", "nodes/status")), "{accesses:?}");
    let agents = c.api().user_agents();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert!(agents.iter().all(|a| a.starts_with("overlayd/")), "{agents:?}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_taking_over_from_flanneld_keeps_the_condition_s_transition_time() {
    require_root();
    let mut c = kube_cluster();
    let i = c.add_kube_node(true, &[]).unwrap();
    let name = c.nodes[i].name.clone();
    // flanneld ran here: NetworkUnavailable is False since long ago.
    let since = "2026-01-02T03:04:05Z";
    c.api()
        .edit_node(&name, |n| {
            let conditions = n["status"]["conditions"].as_array_mut().unwrap();
            conditions.push(json!({"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
                "message": "Flannel is running on this node", "lastTransitionTime": since, "lastHeartbeatTime": since}));
        })
        .unwrap();
    let node = &mut c.nodes[i];
    node.start().unwrap();
    node.wait_ready(Duration::from_secs(20)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || network_available(&c, &name)), "{}", c.nodes[i].log_text());
    let conditions = c.api().node(&name).unwrap().status.unwrap().conditions.unwrap();
    let ours = conditions.iter().find(|k| k.type_ == "NetworkUnavailable").unwrap();
    let kept = serde_json::to_value(&ours.last_transition_time).unwrap();
    assert_eq!(kept, json!(since), "the status stayed False: its transition time must stay");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_relist_after_410_touches_no_entry() {
    require_root();
    let mut c = kube_cluster();
    ready_node(&mut c, 0, &["--health-addr", "127.0.0.1:8471"]);
    ready_node(&mut c, 0, &[]);
    let remote = add_remote_peer(&c, "remote-1", Ipv4Addr::new(192, 168, 50, 99), "0a:00:00:00:00:01");
    let peer = pod_cidr(&c, "node-2");
    let peer_mac = c.nodes[1].vtep_mac().unwrap();
    assert!(wait_until(Duration::from_secs(5), || c.nodes[0].has_peer(remote, "0a:00:00:00:00:01")));
    assert!(c.nodes[0].has_peer(peer, &peer_mac));
    // Let the resync timer settle, then count.
    std::thread::sleep(Duration::from_millis(1500));
    let ops_before = metric(&c, 0, "overlay_netlink_ops_total");
    let before = c.api().stats();

    c.api().expire_watches();
    assert!(
        wait_until(Duration::from_secs(20), || c.api().stats().lists >= before.lists + 2),
        "the daemons did not relist after 410: {:?} -> {:?}",
        before,
        c.api().stats()
    );
    assert!(c.api().stats().expired >= before.expired + 2);
    // After the relist, and a few resyncs: not one netlink operation, and
    // every entry still in place.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        metric(&c, 0, "overlay_netlink_ops_total"),
        ops_before,
        "the relist removed or re-added entries:\n{}",
        c.nodes[0].log_text()
    );
    assert!(c.nodes[0].has_peer(remote, "0a:00:00:00:00:01"));
    assert!(c.nodes[0].has_peer(peer, &peer_mac));
    // The new watch works: a change after the relist arrives.
    let later = add_remote_peer(&c, "remote-2", Ipv4Addr::new(192, 168, 50, 98), "0a:00:00:00:00:02");
    assert!(wait_until(Duration::from_secs(5), || c.nodes[0].has_peer(later, "0a:00:00:00:00:02")));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_api_outage_loses_no_ping_and_recovers() {
    require_root();
    let mut c = kube_cluster();
    ready_node(&mut c, 1, &[]);
    ready_node(&mut c, 1, &[]);
    let target = c.nodes[1].pods[0].ip;
    assert!(ping_until(&c.nodes[0].pods[0].ns, target, Duration::from_secs(5)));
    // 34 s of pings, 5 per second, across a 30 s outage.
    let run = PingRun::start(&c.nodes[0].pods[0].ns, target, 170, "0.2").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.api().stop();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    c.api().restart().unwrap();
    let outage = down.elapsed();
    let (sent, received) = run.finish().unwrap();
    assert_eq!(sent, received, "pings lost during a {outage:?} API outage");
    for node in &mut c.nodes {
        assert!(node.running(), "{} exited during the outage:\n{}", node.name, node.log_text());
    }
    // Watches resume: a node that joins after the outage is programmed.
    let later = add_remote_peer(&c, "remote-1", Ipv4Addr::new(192, 168, 50, 99), "0a:00:00:00:00:01");
    for node in &c.nodes {
        assert!(
            wait_until(Duration::from_secs(60), || node.has_peer(later, "0a:00:00:00:00:01")),
            "{} did not see a node added after the outage:\n{}",
            node.name,
            node.log_text()
        );
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_waits_for_a_pod_cidr_and_honours_public_ip_overwrite() {
    require_root();
    let mut c = kube_cluster();
    // No podCIDR yet: the daemon waits, says why, and does not exit.
    let i = c.add_kube_node(false, &[]).unwrap();
    c.api()
        .edit_node("node-1", |n| {
            n["metadata"]["annotations"] = json!({ format!("{PREFIX}/public-ip-overwrite"): "192.168.50.77" })
        })
        .unwrap();
    c.nodes[i].start().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || c.nodes[i].log_text().contains(
            "waiting for podCIDR on node node-1 (is kube-controller-manager running with --allocate-node-cidrs?)"
        )),
        "{}",
        c.nodes[i].log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.nodes[i].running(), "crashed while waiting:\n{}", c.nodes[i].log_text());
    assert!(c.nodes[i].subnet_env().is_err(), "wrote a subnet file without a podCIDR");
    // The controller-manager assigns one: the node comes up on it.
    let cidr = c.api().allocate_pod_cidr("node-1").unwrap();
    c.nodes[i].wait_ready(Duration::from_secs(20)).unwrap();
    assert_eq!(c.nodes[i].subnet().unwrap(), cidr);
    // public-ip-overwrite is what peers are told.
    assert_eq!(annotations(&c, "node-1")[&format!("{PREFIX}/public-ip")], "192.168.50.77");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_pod_cidr_outside_the_network_is_refused_and_changes_nothing() {
    require_root();
    let mut c = kube_cluster();
    let j = c.add_kube_node(false, &[]).unwrap();
    let name = c.nodes[j].name.clone();
    c.api().edit_node(&name, |n| n["spec"]["podCIDR"] = json!("10.99.0.0/24")).unwrap();
    c.nodes[j].start().unwrap();
    let status = c.nodes[j].wait_exit(Duration::from_secs(15)).unwrap();
    assert!(!status.success());
    let log = c.nodes[j].log_text();
    assert!(log.contains("podCIDR 10.99.0.0/24 is outside the IPv4 network 10.244.0.0/16"), "{log}");
    assert!(c.nodes[j].ns.ip(&["link", "show", "overlay.1"]).is_err(), "device created despite the error");
    assert!(!annotations(&c, &name).contains_key(&format!("{PREFIX}/backend-data")));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn kube_mode_without_a_node_name_is_a_clear_error() {
    require_root();
    let mut c = kube_cluster();
    let k = c.add_node(&["--kube-subnet-mgr"]).unwrap();
    c.nodes[k].start().unwrap();
    assert!(!c.nodes[k].wait_exit(Duration::from_secs(10)).unwrap().success());
    assert!(c.nodes[k].log_text().contains("--node-name or NODE_NAME"), "{}", c.nodes[k].log_text());
}
