//! End-to-end: the real overlayd against a real etcd in network namespaces.
//! Each test asserts what a user would see; see docs/testing.md for the setup.

use std::net::Ipv4Addr;
use std::time::Duration;

use overlay_tests::cluster::{ClusterOptions, OUTSIDE_IP, PREFIX};
use overlay_tests::probe::{http_get, ping, ping_until, tcp_source_seen, PingRun};
use overlay_tests::{require_root, wait_until, Cluster};

fn cluster(nodes: usize, pods: usize, flags: &[&str]) -> Cluster {
    let mut c = Cluster::new(ClusterOptions::default()).expect("cluster");
    for _ in 0..nodes {
        c.add_ready_node(flags, pods).expect("node");
    }
    c
}

/// Waits until every node holds entries for every other node.
fn wait_converged(c: &Cluster) {
    let peers: Vec<_> = c.nodes.iter().map(|n| (n.subnet().unwrap(), n.vtep_mac().unwrap())).collect();
    for (i, node) in c.nodes.iter().enumerate() {
        for (j, (subnet, mac)) in peers.iter().enumerate() {
            if i != j {
                assert!(
                    wait_until(Duration::from_secs(5), || node.has_peer(*subnet, mac)),
                    "node {} lacks entries for {subnet} ({mac}):\n{}\n{}\n{}\nlog:\n{}",
                    node.index,
                    node.neighbours(),
                    node.fdb(),
                    node.routes(),
                    node.log_text()
                );
            }
        }
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn every_pod_pings_every_pod_across_vxlan() {
    require_root();
    let c = cluster(3, 2, &[]);
    wait_converged(&c);
    let tx_before: Vec<u64> = c.nodes.iter().map(|n| n.vxlan_tx_bytes().unwrap()).collect();
    let pods = c.pods();
    let mut pairs = 0;
    for (from_node, from) in &pods {
        for (to_node, to) in &pods {
            if from.ip == to.ip {
                continue;
            }
            assert!(
                ping_until(&from.ns, to.ip, Duration::from_secs(3)),
                "pod {} (node {}) cannot reach pod {} (node {})",
                from.ip,
                from_node + 1,
                to.ip,
                to_node + 1
            );
            pairs += 1;
        }
    }
    assert_eq!(pairs, 30);
    for (i, node) in c.nodes.iter().enumerate() {
        let sent = node.vxlan_tx_bytes().unwrap() - tx_before[i];
        // 8 cross-node pings leave each node, at least 84 bytes each.
        assert!(sent >= 8 * 84, "node {} sent only {sent} bytes through overlay.1", node.index);
    }
    // The device matches docs/architecture.md: VNI 1, port 8472, nolearning, MTU 1450, <subnet>.0/32.
    let node = &c.nodes[0];
    let link = node.ns.ip(&["-d", "link", "show", "overlay.1"]).unwrap();
    assert!(
        link.contains("mtu 1450")
            && link.contains("vxlan id 1 ")
            && link.contains("dstport 8472")
            && link.contains("nolearning"),
        "{link}"
    );
    let addr = node.ns.ip(&["-4", "addr", "show", "overlay.1"]).unwrap();
    assert!(addr.contains(&format!("inet {}/32", node.subnet().unwrap().network())), "{addr}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn pod_to_pod_keeps_the_pod_source_address() {
    require_root();
    let c = cluster(2, 1, &["--ip-masq"]);
    wait_converged(&c);
    let (p1, p2) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    // Pod → pod across nodes: the server sees the client pod's own address, masquerade or not.
    assert_eq!(tcp_source_seen(&p2.ns, p2.ip, &p1.ns).unwrap(), p1.ip);
    assert_eq!(tcp_source_seen(&p1.ns, p1.ip, &p2.ns).unwrap(), p2.ip);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn outgoing_traffic_is_masqueraded_with_ip_masq() {
    require_root();
    let c = cluster(1, 1, &["--ip-masq"]);
    let (node, pod) = (&c.nodes[0], &c.nodes[0].pods[0]);
    // Pod → outside: the outside server sees the node's underlay address.
    assert_eq!(tcp_source_seen(&c.outside, OUTSIDE_IP, &pod.ns).unwrap(), node.ip);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn without_ip_masq_outgoing_keeps_the_pod_address_and_there_is_no_table() {
    require_root();
    let c = cluster(1, 1, &[]);
    let (node, pod) = (&c.nodes[0], &c.nodes[0].pods[0]);
    // Given a route back to the pod subnet, the outside server sees the pod address.
    c.outside.ip(&["route", "add", &node.subnet().unwrap().to_string(), "via", &node.ip.to_string()]).unwrap();
    assert_eq!(tcp_source_seen(&c.outside, OUTSIDE_IP, &pod.ns).unwrap(), pod.ip);
    let tables = node.ns.exec("nft", &["list", "tables"]).unwrap();
    let nat = tables.lines().any(|l| l.trim() == "table ip overlay" || l.trim() == "table ip6 overlay");
    assert!(!nat, "node without --ip-masq has a NAT table: {tables}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_joining_node_is_reached_by_every_pod() {
    require_root();
    let mut c = cluster(3, 1, &[]);
    wait_converged(&c);
    let i = c.add_ready_node(&[], 1).unwrap();
    let new_pod = c.nodes[i].pods[0].ip;
    for n in 0..3 {
        let from = &c.nodes[n].pods[0];
        assert!(
            ping_until(&from.ns, new_pod, Duration::from_secs(2)),
            "pod {} cannot reach new node's pod {new_pod}",
            from.ip
        );
        assert!(ping(&c.nodes[i].pods[0].ns, from.ip), "new node's pod cannot reach {}", from.ip);
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_leaving_node_s_entries_are_removed_from_every_peer() {
    require_root();
    let mut c = cluster(3, 0, &[]);
    wait_converged(&c);
    // Node 3 leaves: its key is deleted; every peer loses all three entries.
    let leaving = &c.nodes[2];
    let (subnet, mac) = (leaving.subnet().unwrap(), leaving.vtep_mac().unwrap());
    let key = format!("{PREFIX}/subnets/{}-{}", subnet.network(), subnet.prefix_len());
    c.nodes[2].stop().unwrap();
    c.etcd.ctl(&["del", &key]).unwrap();
    for node in &c.nodes[..2] {
        assert!(
            wait_until(Duration::from_secs(3), || !node.has_any_entry_for(subnet, &mac)),
            "node {} still has entries for departed {subnet}:\n{}\n{}\n{}",
            node.index,
            node.neighbours(),
            node.fdb(),
            node.routes()
        );
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn restart_loses_no_packet_and_keeps_subnet() {
    require_root();
    let mut c = cluster(2, 1, &[]);
    wait_converged(&c);
    let subnet_before = c.nodes[1].subnet().unwrap();
    let mac_before = c.nodes[1].vtep_mac().unwrap();
    let target = c.nodes[1].pods[0].ip;
    assert!(ping_until(&c.nodes[0].pods[0].ns, target, Duration::from_secs(3)));
    let run = PingRun::start(&c.nodes[0].pods[0].ns, target, 400, "0.01").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (status, took) = c.nodes[1].stop().unwrap();
    assert!(status.success(), "overlayd exited with {status} on SIGTERM:\n{}", c.nodes[1].log_text());
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    std::thread::sleep(Duration::from_millis(300));
    c.nodes[1].start().unwrap();
    let (sent, received) = run.finish().unwrap();
    assert_eq!((sent, received), (400, 400), "pings lost across a restart");
    assert!(wait_until(Duration::from_secs(5), || c.nodes[1]
        .log_text()
        .matches("took back our existing lease")
        .count()
        >= 1));
    assert_eq!(c.nodes[1].subnet().unwrap(), subnet_before);
    assert_eq!(c.nodes[1].vtep_mac().unwrap(), mac_before, "VTEP MAC must survive a restart");
    assert_eq!(c.etcd.keys(&format!("{PREFIX}/subnets/")).unwrap().len(), 2, "a restart must not leave a second lease");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn hand_deleted_entries_come_back() {
    require_root();
    let c = cluster(2, 0, &[]);
    wait_converged(&c);
    let (node, peer) = (&c.nodes[0], &c.nodes[1]);
    let (subnet, mac) = (peer.subnet().unwrap(), peer.vtep_mac().unwrap());
    let gw = subnet.network().to_string();
    node.ns.ip(&["route", "del", &subnet.to_string()]).unwrap();
    overlay_tests::netns::run(
        "bridge",
        &["-n", &node.ns.name, "fdb", "del", &mac, "dev", "overlay.1", "dst", &peer.ip.to_string(), "self"],
    )
    .unwrap();
    node.ns.ip(&["neigh", "del", &gw, "dev", "overlay.1"]).unwrap();
    assert!(!node.has_peer(subnet, &mac));
    // Resync interval is 1 s in tests.
    assert!(wait_until(Duration::from_secs(3), || node.has_peer(subnet, &mac)), "entries not repaired");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_deleted_device_comes_back_with_every_peer() {
    require_root();
    let c = cluster(3, 1, &[]);
    wait_converged(&c);
    let node = &c.nodes[0];
    node.ns.ip(&["link", "del", "overlay.1"]).unwrap();
    for peer in &c.nodes[1..] {
        let (subnet, mac) = (peer.subnet().unwrap(), peer.vtep_mac().unwrap());
        assert!(
            wait_until(Duration::from_secs(3), || node.has_peer(subnet, &mac)),
            "device and peers not restored:\n{}",
            node.log_text()
        );
    }
    assert!(ping_until(&node.pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(3)));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_flushed_masquerade_table_comes_back() {
    require_root();
    let c = cluster(1, 1, &["--ip-masq"]);
    let (node, pod) = (&c.nodes[0], &c.nodes[0].pods[0]);
    let rules = || node.ns.exec("nft", &["list", "table", "ip", "overlay"]).unwrap_or_default();
    assert_eq!(rules().matches("masquerade").count(), 2, "{}", rules());
    // What an admin's `nft flush ruleset` does to it.
    node.ns.exec("nft", &["flush", "ruleset"]).unwrap();
    assert!(wait_until(Duration::from_secs(3), || rules().matches("masquerade").count() == 2), "table not restored");
    assert_eq!(tcp_source_seen(&c.outside, OUTSIDE_IP, &pod.ns).unwrap(), node.ip);
    // A deleted table comes back too.
    node.ns.exec("nft", &["delete", "table", "ip", "overlay"]).unwrap();
    assert!(wait_until(Duration::from_secs(3), || rules().matches("masquerade").count() == 2), "table not restored");
}

fn no_kernel_change(node: &overlay_tests::Node) {
    assert!(node.ns.ip(&["link", "show", "overlay.1"]).is_err(), "a VXLAN device was created");
    assert!(!node.ns.exec("nft", &["list", "tables"]).unwrap().contains("overlay"), "nft rules were added");
    assert!(!node.subnet_file.exists(), "a subnet file was written");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_malformed_config_is_refused_and_changes_nothing() {
    require_root();
    let mut c = Cluster::new(ClusterOptions {
        config: Some(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#.into()),
        ..Default::default()
    })
    .unwrap();
    let i = c.add_node(&["--ip-masq"]).unwrap();
    c.nodes[i].start().unwrap();
    let status = c.nodes[i].wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!status.success());
    let log = c.nodes[i].log_text();
    assert!(log.contains("SubnetLen 31 leaves no room for pods"), "{log}");
    no_kernel_change(&c.nodes[i]);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_full_network_is_refused_and_changes_nothing() {
    require_root();
    // One subnet, already held by someone else.
    let config = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.5.0","SubnetMax":"10.244.5.0"}"#;
    let mut c = Cluster::new(ClusterOptions { config: Some(config.into()), ..Default::default() }).unwrap();
    c.etcd.put(&format!("{PREFIX}/subnets/10.244.5.0-24"), &lease_json("192.168.50.99", "02:00:00:00:00:99")).unwrap();
    let i = c.add_node(&["--ip-masq"]).unwrap();
    c.nodes[i].start().unwrap();
    let status = c.nodes[i].wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!status.success());
    let log = c.nodes[i].log_text();
    assert!(log.contains("network 10.244.0.0/16 is full"), "{log}");
    no_kernel_change(&c.nodes[i]);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn unreachable_etcd_is_said_and_changes_nothing() {
    require_root();
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    let j = c.add_node(&["--ip-masq", "--etcd-endpoints", "http://192.168.50.2:2399"]).unwrap();
    c.nodes[j].start().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || c.nodes[j].log_text().contains("etcd unreachable")),
        "{}",
        c.nodes[j].log_text()
    );
    assert!(c.nodes[j].running());
    no_kernel_change(&c.nodes[j]);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn two_nodes_racing_for_the_last_subnet() {
    require_root();
    let options = ClusterOptions {
        config: Some(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.5.0","SubnetMax":"10.244.5.0"}"#.into()),
        ..Default::default()
    };
    let mut c = Cluster::new(options).unwrap();
    let a = c.add_node(&[]).unwrap();
    let b = c.add_node(&[]).unwrap();
    c.nodes[a].start().unwrap();
    c.nodes[b].start().unwrap();
    assert!(wait_until(Duration::from_secs(15), || {
        let done = |n: &overlay_tests::Node| n.subnet_file.exists() || n.log_text().contains("is full");
        done(&c.nodes[a]) && done(&c.nodes[b])
    }));
    let winners: Vec<_> = c.nodes.iter().filter(|n| n.subnet_file.exists()).collect();
    assert_eq!(winners.len(), 1, "exactly one node gets the last subnet");
    assert_eq!(winners[0].subnet().unwrap().to_string(), "10.244.5.0/24");
    let loser = c.nodes.iter_mut().find(|n| !n.subnet_file.exists()).unwrap();
    let status = loser.wait_exit(Duration::from_secs(5)).unwrap();
    assert!(!status.success());
    assert!(loser.log_text().contains("network 10.244.0.0/16 is full"));
    assert_eq!(c.etcd.keys(&format!("{PREFIX}/subnets/")).unwrap(), vec![format!("{PREFIX}/subnets/10.244.5.0-24")]);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn etcd_restart_does_not_disturb_pods_and_later_joins_are_seen() {
    require_root();
    let mut c = cluster(2, 1, &[]);
    wait_converged(&c);
    let target = c.nodes[1].pods[0].ip;
    assert!(ping_until(&c.nodes[0].pods[0].ns, target, Duration::from_secs(3)));
    let run = PingRun::start(&c.nodes[0].pods[0].ns, target, 120, "0.05").unwrap();
    c.etcd.stop();
    std::thread::sleep(Duration::from_secs(3));
    c.etcd.restart().unwrap();
    let (sent, received) = run.finish().unwrap();
    assert_eq!(sent, received, "pod traffic disturbed by an etcd outage");
    assert!(c.nodes[0].running() && c.nodes[1].running());

    let i = c.add_ready_node(&[], 1).unwrap();
    wait_converged(&c);
    let new_pod: Ipv4Addr = c.nodes[i].pods[0].ip;
    for n in 0..2 {
        assert!(ping_until(&c.nodes[n].pods[0].ns, new_pod, Duration::from_secs(3)));
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn health_readiness_and_metrics_answer() {
    require_root();
    let health: std::net::SocketAddr = "127.0.0.1:8471".parse().unwrap();
    let c = cluster(2, 0, &["--ip-masq", "--health-addr", "127.0.0.1:8471"]);
    wait_converged(&c);
    let node = &c.nodes[0];
    assert_eq!(http_get(&node.ns, health, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(&node.ns, health, "/readyz").unwrap().0, 200);
    let (status, metrics) = http_get(&node.ns, health, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("\noverlay_peers 1\n"), "{metrics}");
    assert!(metrics.contains("overlay_lease_last_renewal_timestamp_seconds"), "{metrics}");
    for resource in ["ip_forward", "device", "entries", "masquerade", "subnet_file"] {
        let line = format!("overlay_resource_ready{{resource=\"{resource}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert_eq!(http_get(&node.ns, health, "/nope").unwrap().0, 404);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_resource_that_cannot_be_made_right_is_not_ready_and_says_why() {
    require_root();
    let health: std::net::SocketAddr = "127.0.0.1:8471".parse().unwrap();
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    // A directory where the subnet file goes: the file cannot be written (renamed into place).
    let blocker = c.dir.join("blocked/subnet.env");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let subnet_file = blocker.display().to_string();
    let i = c.add_node(&["--health-addr", "127.0.0.1:8471", "--subnet-file", &subnet_file]).unwrap();
    c.nodes[i].start().unwrap();
    let node = &c.nodes[i];
    assert!(
        wait_until(Duration::from_secs(10), || http_get(&node.ns, health, "/readyz")
            .is_ok_and(|(code, body)| code == 503
                && body.contains("subnet_file=false")
                && body.contains("device=true"))),
        "{:?}\n{}",
        http_get(&node.ns, health, "/readyz"),
        node.log_text()
    );
    assert!(node.log_text().contains("resource=\"subnet_file\""), "{}", node.log_text());
    // Once the way is clear, the next retry writes it and the node is ready.
    std::fs::remove_dir_all(&blocker).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || http_get(&node.ns, health, "/readyz")
            .is_ok_and(|(code, _)| code == 200)),
        "{}",
        node.log_text()
    );
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_normal_exit_keeps_the_dataplane_and_cleanup_removes_it() {
    require_root();
    let mut c = cluster(2, 0, &["--ip-masq"]);
    wait_converged(&c);
    let (subnet, mac) = (c.nodes[1].subnet().unwrap(), c.nodes[1].vtep_mac().unwrap());
    c.nodes[0].stop().unwrap();
    let node = &c.nodes[0];
    assert!(node.has_peer(subnet, &mac), "a normal exit must leave the dataplane in place");
    assert!(node.ns.exec("nft", &["list", "tables"]).unwrap().contains("overlay"));
    let bin = overlay_tests::workspace_bin("overlayd");
    let out =
        node.ns.command(bin.to_str().unwrap(), &["cleanup", "--subnet-file"]).arg(&node.subnet_file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(node.ns.ip(&["link", "show", "overlay.1"]).is_err(), "device still present after cleanup");
    assert!(!node.routes().contains(&subnet.to_string()), "{}", node.routes());
    assert!(!node.ns.exec("nft", &["list", "tables"]).unwrap().contains("overlay"));
    assert!(!node.subnet_file.exists());
}

fn lease_json(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn leases_that_do_not_parse_are_skipped() {
    require_root();
    let mut c = cluster(2, 0, &[]);
    wait_converged(&c);
    let subnets = format!("{PREFIX}/subnets");
    c.etcd.put(&format!("{subnets}/10.244.199.0-24"), "{not json").unwrap();
    c.etcd.put(&format!("{subnets}/garbage"), "x").unwrap();
    let node = &c.nodes[0];
    assert!(
        wait_until(Duration::from_secs(3), || node.log_text().contains("skipping a peer lease that does not parse")),
        "{}",
        node.log_text()
    );
    assert!(node.log_text().contains("not a lease key"), "{}", node.log_text());
    assert!(!node.routes().contains("10.244.199.0"), "{}", node.routes());
    assert!(c.nodes[0].running() && c.nodes[1].running());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_peer_changing_mac_and_address_leaves_no_stale_entry() {
    require_root();
    let c = cluster(1, 0, &[]);
    let subnets = format!("{PREFIX}/subnets");
    let fake: ipnet::Ipv4Net = "10.244.200.0/24".parse().unwrap();
    c.etcd.put(&format!("{subnets}/10.244.200.0-24"), &lease_json("192.168.50.200", "02:00:00:00:02:00")).unwrap();
    let node = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(3), || node.has_peer(fake, "02:00:00:00:02:00")));
    c.etcd.put(&format!("{subnets}/10.244.200.0-24"), &lease_json("192.168.50.201", "02:00:00:00:02:01")).unwrap();
    assert!(wait_until(Duration::from_secs(3), || node.has_peer(fake, "02:00:00:00:02:01")
        && !node.fdb().contains("02:00:00:00:02:00")
        && !node.neighbours().contains("02:00:00:00:02:00")));
    assert!(node.fdb().contains("02:00:00:00:02:01 dst 192.168.50.201"), "{}", node.fdb());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn our_deleted_key_is_claimed_again() {
    require_root();
    let c = cluster(1, 0, &[]);
    let own = c.nodes[0].subnet().unwrap();
    let own_key = format!("{PREFIX}/subnets/{}-{}", own.network(), own.prefix_len());
    c.etcd.ctl(&["del", &own_key]).unwrap();
    // Re-claimed: the same subnet (it is free), loudly.
    assert!(
        wait_until(Duration::from_secs(5), || c.etcd.keys(&own_key).is_ok_and(|k| k.len() == 1)),
        "own key not re-claimed"
    );
    assert!(c.nodes[0].log_text().contains("LEASE LOST"));
    assert_eq!(c.nodes[0].subnet().unwrap(), own);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn lost_watch_history_is_relisted() {
    require_root();
    let mut c = cluster(1, 0, &[]);
    let subnets = format!("{PREFIX}/subnets");
    let gone: ipnet::Ipv4Net = "10.244.200.0/24".parse().unwrap();
    c.etcd.put(&format!("{subnets}/10.244.200.0-24"), &lease_json("192.168.50.201", "02:00:00:00:02:01")).unwrap();
    let node = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(3), || node.has_peer(gone, "02:00:00:00:02:01")));
    // The node is frozen through an etcd restart, misses a removal and an
    // addition that are then compacted away; on waking it must relist.
    let pid = node.pid().unwrap() as i32;
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    c.etcd.restart().unwrap();
    c.etcd.ctl(&["del", &format!("{subnets}/10.244.200.0-24")]).unwrap();
    c.etcd.put(&format!("{subnets}/10.244.201.0-24"), &lease_json("192.168.50.202", "02:00:00:00:02:02")).unwrap();
    let status = c.etcd.ctl(&["endpoint", "status", "-w", "json"]).unwrap();
    let revision = serde_json::from_str::<serde_json::Value>(&status).unwrap()[0]["Status"]["header"]["revision"]
        .as_i64()
        .unwrap();
    c.etcd.ctl(&["compact", &revision.to_string()]).unwrap();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        wait_until(Duration::from_secs(10), || node.has_peer("10.244.201.0/24".parse().unwrap(), "02:00:00:00:02:02")
            && !node.has_any_entry_for(gone, "02:00:00:00:02:01")),
        "after compaction the node did not converge:\n{}\n{}",
        node.routes(),
        node.log_text()
    );
    assert!(node.log_text().contains("relisting"), "{}", node.log_text());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn direct_routing_skips_encapsulation_on_the_same_segment() {
    require_root();
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
    let mut c = Cluster::new(ClusterOptions { config: Some(config.into()), ..Default::default() }).unwrap();
    c.add_ready_node(&["--iface", "eth0"], 1).unwrap();
    c.add_ready_node(&["--iface", "192.168.50.12"], 1).unwrap();
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let want = format!("{} via {} dev eth0 proto 77", n2.subnet().unwrap(), n2.ip);
    assert!(wait_until(Duration::from_secs(3), || n1.routes().contains(&want)), "{}", n1.routes());
    assert!(n1.fdb().trim().is_empty(), "no FDB entries for a directly routed peer: {}", n1.fdb());
    let tx_before = n1.vxlan_tx_bytes().unwrap();
    assert!(ping_until(&n1.pods[0].ns, n2.pods[0].ip, Duration::from_secs(3)));
    assert_eq!(tcp_source_seen(&n2.pods[0].ns, n2.pods[0].ip, &n1.pods[0].ns).unwrap(), n1.pods[0].ip);
    assert_eq!(n1.vxlan_tx_bytes().unwrap(), tx_before, "directly routed traffic went through the VXLAN device");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn losing_one_of_three_etcd_members_goes_unnoticed() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { etcd_members: 3, ..Default::default() }).unwrap();
    for _ in 0..2 {
        c.add_ready_node(&[], 1).unwrap();
    }
    wait_converged(&c);
    let target = c.nodes[1].pods[0].ip;
    let run = PingRun::start(&c.nodes[0].pods[0].ns, target, 100, "0.05").unwrap();
    // The first endpoint every node lists goes away for good.
    c.etcd.stop();
    let i = c.add_ready_node(&[], 1).unwrap();
    let (sent, received) = run.finish().unwrap();
    assert_eq!(sent, received, "pod traffic disturbed by losing an etcd member");
    wait_converged(&c);
    for n in 0..2 {
        assert!(ping_until(&c.nodes[n].pods[0].ns, c.nodes[i].pods[0].ip, Duration::from_secs(3)));
    }
    assert_eq!(c.etcd_others[0].keys(&format!("{PREFIX}/subnets/")).unwrap().len(), 3);
}
