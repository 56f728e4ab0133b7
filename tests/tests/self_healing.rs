//! Drift repaired by kernel events, not by the resync timer: every cluster
//! here resyncs once an hour, so whatever comes back within the deadline
//! was repaired because the kernel (rtnetlink or nftables) said it changed.
//! How fast is measured in `make bench`, not here.

use std::net::SocketAddr;
use std::time::Duration;

use overlay_tests::cluster::OUTSIDE_IP;
use overlay_tests::probe::{metric, ping_until, tcp_source_seen};
use overlay_tests::{require_root, wait_until, Cluster, ClusterOptions};

const HEALTH: &str = "127.0.0.1:8471";

/// Two ready nodes with a pod each, masquerading, resyncing only hourly; pods reach each other.
fn cluster() -> Cluster {
    let mut c = Cluster::new(ClusterOptions { resync: "1h".into(), ..ClusterOptions::default() }).unwrap();
    for _ in 0..2 {
        c.add_ready_node(&["--ip-masq", "--health-addr", HEALTH], 1).unwrap();
    }
    assert!(
        ping_until(&c.nodes[0].pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(5)),
        "{}",
        c.nodes[0].log_text()
    );
    // Starting, and meeting each other, the nodes saw only their own writes
    // (a new device reports itself down, then up; a table rewritten reports
    // its deletion, then its additions): none of that is a repair.
    for node in &c.nodes {
        assert!(!node.log_text().contains("drifted"), "a repair at start:\n{}", node.log_text());
    }
    c
}

fn metric_of(c: &Cluster, node: usize, name: &str) -> u64 {
    let health: SocketAddr = HEALTH.parse().unwrap();
    metric(&c.nodes[node].ns, health, name).unwrap_or(0)
}

/// Node 1's pod reaches node 2's again within the deadline, with node 1 holding every entry for node 2.
fn assert_repaired(c: &Cluster, what: &str) {
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let (subnet, mac) = (b.subnet().unwrap(), b.vtep_mac().unwrap());
    assert!(
        wait_until(Duration::from_secs(5), || a.has_peer(subnet, &mac)),
        "{what}: not repaired:\n{}\n{}\n{}\n{}",
        a.neighbours(),
        a.fdb(),
        a.routes(),
        a.log_text()
    );
    assert!(ping_until(&a.pods[0].ns, b.pods[0].ip, Duration::from_secs(5)), "{what}: pods apart:\n{}", a.log_text());
    assert!(a.log_text().contains("drifted from what was applied"), "{}", a.log_text());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_peer_s_entries_deleted_by_hand_come_back_at_once() {
    require_root();
    let c = cluster();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let subnet = b.subnet().unwrap();
    let (gateway, mac) = (subnet.network().to_string(), b.vtep_mac().unwrap());
    a.ns.ip(&["route", "del", &subnet.to_string()]).unwrap();
    a.ns.ip(&["neigh", "del", &gateway, "dev", "overlay.1"]).unwrap();
    a.ns.exec("bridge", &["fdb", "del", &mac, "dev", "overlay.1"]).unwrap();
    assert_repaired(&c, "route, neighbour and FDB entry deleted");
    assert!(metric_of(&c, 0, r#"overlay_repairs_total{cause="kernel",resource="entries"}"#) >= 1);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_deleted_device_comes_back_with_every_peer() {
    require_root();
    let c = cluster();
    c.nodes[0].ns.ip(&["link", "del", "overlay.1"]).unwrap();
    assert_repaired(&c, "device deleted");
    assert!(metric_of(&c, 0, r#"overlay_repairs_total{cause="kernel",resource="device"}"#) >= 1);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_device_set_down_is_set_up_again() {
    require_root();
    let c = cluster();
    c.nodes[0].ns.ip(&["link", "set", "overlay.1", "down"]).unwrap();
    assert_repaired(&c, "device set down");
    assert!(c.nodes[0].ns.ip(&["link", "show", "overlay.1"]).unwrap().contains(",UP"));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_changed_mtu_is_set_back() {
    require_root();
    let c = cluster();
    let a = &c.nodes[0];
    a.ns.ip(&["link", "set", "overlay.1", "mtu", "1300"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || a.ns.ip(&["link", "show", "overlay.1"]).unwrap().contains("mtu 1450 ")),
        "{}",
        a.log_text()
    );
    assert_repaired(&c, "MTU changed");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_flushed_ruleset_gets_the_masquerade_table_back() {
    require_root();
    let c = cluster();
    let a = &c.nodes[0];
    a.ns.exec("nft", &["flush", "ruleset"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || a
            .ns
            .exec("nft", &["list", "table", "ip", "overlay"])
            .is_ok_and(|t| t.contains("masquerade"))),
        "{}",
        a.log_text()
    );
    assert!(metric_of(&c, 0, r#"overlay_repairs_total{cause="nftables",resource="masquerade"}"#) >= 1);
    // A pod's traffic to the outside is masqueraded again: the outside sees the node's address.
    let seen = tcp_source_seen(&c.outside, OUTSIDE_IP, &a.pods[0].ns).unwrap();
    assert_eq!(seen, a.ip);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_flood_of_unrelated_route_changes_causes_no_reconcile_storm() {
    require_root();
    let c = cluster();
    let a = &c.nodes[0];
    let before = metric_of(&c, 0, "overlay_resyncs_total");
    // 10,000 routes that are not ours, added and removed.
    let batch = c.dir.join("routes.batch");
    let lines: String = (0..10_000u32)
        .map(|i| format!("route add 172.16.{}.{}/32 via 192.168.50.254\n", i / 250, i % 250 + 1))
        .chain((0..10_000u32).map(|i| format!("route del 172.16.{}.{}/32\n", i / 250, i % 250 + 1)))
        .collect();
    std::fs::write(&batch, lines).unwrap();
    a.ns.ip(&["-batch", batch.to_str().unwrap()]).unwrap();
    // The daemon has seen them all once it answers after the last one; give its queue a moment to drain.
    assert!(ping_until(&a.pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(5)));
    let after = metric_of(&c, 0, "overlay_resyncs_total");
    // None is ours, so none is drift. One reconcile is allowed: if the kernel had to drop events
    // (a full socket buffer), the daemon cannot know what changed and checks everything once.
    assert!(after - before <= 1, "{} reconciles for 20,000 unrelated route changes:\n{}", after - before, a.log_text());
}

/// A field of /proc/<pid>/status, in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_flood_of_kernel_events_is_absorbed_in_bounded_memory_and_the_node_converges() {
    require_root();
    // Node 1's event socket holds 64 KiB of events, so the flood overflows it for certain.
    let mut c = Cluster::new(ClusterOptions { resync: "1h".into(), ..ClusterOptions::default() }).unwrap();
    c.add_ready_node(&["--health-addr", HEALTH, "--kernel-event-buffer", "65536"], 1).unwrap();
    c.add_ready_node(&["--health-addr", HEALTH], 1).unwrap();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    assert!(ping_until(&a.pods[0].ns, b.pods[0].ip, Duration::from_secs(5)), "{}", a.log_text());
    let pid = a.pid().unwrap();
    let peak_before = status_kib(pid, "VmHWM");
    // 50,000 routes that are not ours added and removed in one burst by another process, with
    // a peer's route deleted in the middle of it: drift the daemon must find in the flood.
    let route = |i: u32| format!("172.{}.{}.{}/32", 16 + i / 62_500, (i / 250) % 250, i % 250 + 1);
    let mut lines: String = (0..50_000u32).map(|i| format!("route add {} via 192.168.50.254\n", route(i))).collect();
    lines += &format!("route del {}\n", b.subnet().unwrap());
    lines += &(0..50_000u32).map(|i| format!("route del {}\n", route(i))).collect::<String>();
    let batch = c.dir.join("flood.batch");
    std::fs::write(&batch, lines).unwrap();
    a.ns.ip(&["-batch", batch.to_str().unwrap()]).unwrap();
    // The node converges: the peer's route is back (found by reading the node
    // back after the lost events, or by its own event), and the pods talk.
    assert_repaired(&c, "a peer's route deleted in a flood of 100,000 route events");
    assert!(ping_until(&a.pods[0].ns, b.pods[0].ip, Duration::from_secs(5)), "{}", a.log_text());
    let grew_mib = status_kib(pid, "VmHWM").saturating_sub(peak_before) / 1024;
    let overflows = metric_of(&c, 0, "overlay_kernel_event_overflows_total");
    let said = a.log_text().lines().filter(|l| l.contains("the kernel dropped events")).count();
    // Lost events are counted, and said once (a minute), not once per loss.
    assert!(overflows > 0, "a 64 KiB socket buffer cannot hold 100,000 events:\n{}", a.log_text());
    assert_eq!(said, 1, "{}", a.log_text());
    // Events wait in a bounded queue, and what overflows is the kernel's buffer, never
    // the daemon's heap (an unbounded queue held the whole burst: tens of MiB).
    assert!(grew_mib < 32, "peak RSS grew {grew_mib} MiB in the flood");
}

/// TX checksum offload of `device` in `node`'s namespace, read with the ethtool ioctl.
fn tx_checksum(node: &overlay_tests::Node, device: &str) -> bool {
    let device = device.to_string();
    overlay_tests::probe::in_netns(&node.ns, move || Ok(overlay_netlink::tx_checksum(&device)?))
        .join()
        .unwrap()
        .unwrap()
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn tx_checksum_offload_is_set_as_asked_and_again_on_a_recreated_device() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { resync: "1h".into(), ..ClusterOptions::default() }).unwrap();
    let off = c.add_ready_node(&["--vxlan-tx-checksum-offload", "off", "--health-addr", HEALTH], 0).unwrap();
    let on = c.add_ready_node(&["--vxlan-tx-checksum-offload", "on"], 0).unwrap();
    assert!(!tx_checksum(&c.nodes[off], "overlay.1"), "{}", c.nodes[off].log_text());
    assert!(tx_checksum(&c.nodes[on], "overlay.1"), "{}", c.nodes[on].log_text());
    assert_eq!(metric_of(&c, off, "overlay_vxlan_tx_checksum_offload"), 0);
    // The device deleted by hand comes back with the setting, not the kernel's default (on).
    let node = &c.nodes[off];
    node.ns.ip(&["link", "del", "overlay.1"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || node
            .ns
            .ip(&["link", "show", "overlay.1"])
            .is_ok_and(|l| l.contains(",UP"))),
        "{}",
        node.log_text()
    );
    assert!(wait_until(Duration::from_secs(5), || !tx_checksum(node, "overlay.1")), "{}", node.log_text());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn our_lease_rewritten_in_etcd_is_written_back_and_kept() {
    require_root();
    let c = cluster();
    let a = &c.nodes[0];
    let subnet = a.subnet().unwrap();
    let key = format!("{}/subnets/{}-{}", overlay_tests::cluster::PREFIX, subnet.network(), subnet.prefix_len());
    let truth = c.etcd.get(&key).unwrap().unwrap();
    let attrs = proto::LeaseAttrs::from_json(truth.as_bytes()).unwrap();
    let mut wrong_mac = attrs.clone();
    wrong_mac.backend_data = proto::BackendData::parse(r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}"#).unwrap();
    let mut wrong_ip = attrs.clone();
    wrong_ip.public_ip = "192.168.50.99".parse().unwrap();
    for (what, wrong) in [("another MAC", wrong_mac), ("another public IP", wrong_ip)] {
        c.etcd.put(&key, &wrong.to_json()).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || c.etcd.get(&key).unwrap().as_deref() == Some(truth.as_str())),
            "{what}: not written back: {:?}\n{}",
            c.etcd.get(&key),
            a.log_text()
        );
        assert_eq!(a.subnet().unwrap(), subnet, "{what}: the node moved to another subnet");
        // The truth is bound to an etcd lease again: it expires if the node goes away.
        let lease = c.etcd.ctl(&["get", &key, "-w", "json"]).unwrap();
        assert!(lease.contains("\"lease\":"), "{what}: written back without a lease: {lease}");
    }
    // The peer sees the truth: its entries for this node carry our MAC.
    let b = &c.nodes[1];
    let mac = a.vtep_mac().unwrap();
    assert!(wait_until(Duration::from_secs(5), || b.has_peer(subnet, &mac)), "{}", b.log_text());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn one_repair_writes_only_what_drifted_whatever_the_number_of_peers() {
    require_root();
    let c = cluster();
    let taken: Vec<_> = c.nodes.iter().map(|n| n.subnet().unwrap()).collect();
    // 50 more peers (leases as flanneld writes them, at made-up addresses).
    let mut added = 0;
    for i in 1..=60u32 {
        let subnet: ipnet::Ipv4Net = format!("10.244.{}.0/24", 190 + i).parse().unwrap();
        if added == 50 || taken.contains(&subnet) {
            continue;
        }
        let value = format!(
            r#"{{"PublicIP":"172.16.0.{i}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:01:{i:02x}"}}}}"#
        );
        c.etcd.put(&format!("{}/subnets/10.244.{}.0-24", overlay_tests::cluster::PREFIX, 190 + i), &value).unwrap();
        added += 1;
    }
    let a = &c.nodes[0];
    let peers = |n: &overlay_tests::Node| n.routes().lines().filter(|l| l.contains("dev overlay.1")).count();
    assert!(wait_until(Duration::from_secs(10), || peers(a) == 51), "{} peers:\n{}", peers(a), a.routes());
    let ops = metric_of(&c, 0, "overlay_netlink_ops_total");
    let b = &c.nodes[1];
    let subnet = b.subnet().unwrap();
    let (gateway, mac) = (subnet.network().to_string(), b.vtep_mac().unwrap());
    a.ns.ip(&["route", "del", &subnet.to_string()]).unwrap();
    a.ns.ip(&["neigh", "del", &gateway, "dev", "overlay.1"]).unwrap();
    a.ns.exec("bridge", &["fdb", "del", &mac, "dev", "overlay.1"]).unwrap();
    assert_repaired(&c, "one peer's entries deleted among 51");
    // The repair read the node back and wrote the three missing entries: not 153.
    assert_eq!(metric_of(&c, 0, "overlay_netlink_ops_total") - ops, 3);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_new_underlay_address_is_published_and_used_without_a_restart() {
    require_root();
    let c = cluster();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let subnet = a.subnet().unwrap();
    let key = format!("{}/subnets/{}-{}", overlay_tests::cluster::PREFIX, subnet.network(), subnet.prefix_len());
    // The node's address changes (a new DHCP lease, say): old one out, new one in, the default route back.
    let batch = c.dir.join("renumber.batch");
    std::fs::write(
        &batch,
        "addr del 192.168.50.11/24 dev eth0\naddr add 192.168.50.111/24 dev eth0\nroute add default via 192.168.50.254\n",
    )
    .unwrap();
    a.ns.ip(&["-batch", batch.to_str().unwrap()]).unwrap();
    // The etcd connection made from the old address is dead: the first request after the
    // change waits for its timeout (10 s), then the client connects again, from the new one.
    let published = || {
        c.etcd
            .get(&key)
            .ok()
            .flatten()
            .and_then(|v| proto::LeaseAttrs::from_json(v.as_bytes()).ok())
            .map(|l| l.public_ip)
    };
    assert!(
        wait_until(Duration::from_secs(30), || published() == Some("192.168.50.111".parse().unwrap())),
        "published {:?}:\n{}",
        published(),
        a.log_text()
    );
    // Its etcd connections came from the old address: made anew, not left to time out.
    assert!(a.log_text().contains("connecting to etcd anew"), "{}", a.log_text());
    assert!(
        wait_until(Duration::from_secs(5), || a
            .ns
            .ip(&["-d", "link", "show", "overlay.1"])
            .is_ok_and(|l| l.contains("local 192.168.50.111"))),
        "{}",
        a.log_text()
    );
    // The peer follows: its entries for this node point at the new address, and pods reach each other again.
    let mac = a.vtep_mac().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || b
            .fdb()
            .lines()
            .any(|l| l.starts_with(&mac) && l.contains("dst 192.168.50.111"))),
        "{}\n{}",
        b.fdb(),
        b.log_text()
    );
    assert!(ping_until(&a.pods[0].ns, b.pods[0].ip, Duration::from_secs(5)), "{}", a.log_text());
    assert_eq!(a.subnet().unwrap(), subnet, "the node kept its subnet");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn drift_no_event_reports_is_repaired_by_the_resync_and_counted_so() {
    require_root();
    // Forwarding turned off makes no netlink event: the resync (1 s here) is what finds it.
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    c.add_ready_node(&["--health-addr", HEALTH], 0).unwrap();
    let a = &c.nodes[0];
    // Settled first: the reconciles of the start (and of its own device's late events) are done.
    let settled = metric_of(&c, 0, "overlay_resyncs_total") + 2;
    assert!(wait_until(Duration::from_secs(5), || metric_of(&c, 0, "overlay_resyncs_total") >= settled));
    a.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || a
            .ns
            .exec("sysctl", &["-n", "net.ipv4.ip_forward"])
            .is_ok_and(|v| v.trim() == "1")),
        "{}",
        a.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || metric_of(
            &c,
            0,
            r#"overlay_repairs_total{cause="resync",resource="ip_forward"}"#
        ) == 1),
        "{}",
        a.log_text()
    );
}
