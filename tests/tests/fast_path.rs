//! The fast path (`--fast-path`), end to end on etcd with a dual-stack
//! underlay: what crosses it arrives byte for byte in both families, across
//! nodes and on one node; what needs netfilter on every packet (a Service's
//! DNAT, the masquerade) still gets it; the node keeps it in place and
//! `overlayd cleanup` leaves nothing. The NetworkPolicy truth table on the
//! fast path is in network_policy.rs.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use overlay_tests::cluster::{ClusterOptions, DUAL_STACK_CONFIG, OUTSIDE_IP, OUTSIDE_IP6};
use overlay_tests::probe::{metric, tcp_echo, tcp_source_seen_ip};
use overlay_tests::{require_root, wait_until, Cluster};

const HEALTH: &str = "127.0.0.1:8471";
/// Enough for many full-size segments each way, well past a TCP window.
const BYTES: usize = 4 << 20;

fn carried(c: &Cluster, node: usize) -> u64 {
    metric(&c.nodes[node].ns, HEALTH.parse().unwrap(), "overlay_fast_path_packets_total").unwrap_or(0)
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn the_fast_path_carries_pod_traffic_intact_and_leaves_nat_to_netfilter() {
    require_root();
    // Resync once an hour: what the fast path does here, it does on the kernel's news (a pod's
    // veth made, its table deleted), not on a timer.
    let options = ClusterOptions { config: Some(DUAL_STACK_CONFIG.into()), resync: "1h".into(), ..Default::default() };
    let mut c = Cluster::new(options).expect("cluster");
    for _ in 0..2 {
        c.add_ready_node(&["--fast-path", "--ip-masq", "--health-addr", HEALTH], 2).expect("node");
    }
    let log = c.nodes[0].log_text();
    assert!(log.contains("fast path on"), "{log}");
    let (a, a2, b) = (&c.nodes[0].pods[0], &c.nodes[0].pods[1], &c.nodes[1].pods[0]);
    let before = (carried(&c, 0), carried(&c, 1));

    // Across nodes in both families, and between two pods of one node.
    for (to, ip) in [(b, IpAddr::V4(b.ip)), (b, IpAddr::V6(b.ip6.unwrap())), (a2, IpAddr::V4(a2.ip))] {
        let at = SocketAddr::new(ip, 9000);
        tcp_echo(&to.ns.path(), at, &a.ns.path(), at, BYTES).unwrap_or_else(|e| panic!("{} -> {ip}: {e:#}", a.ip));
    }
    // The counters reach the metrics every 5 s.
    let moved = wait_until(Duration::from_secs(12), || carried(&c, 0) > before.0 && carried(&c, 1) > before.1);
    assert!(moved, "the fast path carried nothing: {:?} -> {:?}", before, (carried(&c, 0), carried(&c, 1)));

    // A Service's DNAT on the client's node (as kube-proxy makes it): the replies
    // must meet netfilter to get the Service's address back, so the flow stays slow.
    let vip = "10.96.0.10";
    let dnat = format!(
        "table ip svc {{ chain prerouting {{ type nat hook prerouting priority dstnat; \
         ip daddr {vip} tcp dport 80 dnat to {}:9001; }}; }}",
        b.ip
    );
    c.nodes[0].ns.exec("sh", &["-c", &format!("echo '{dnat}' | nft -f -")]).expect("the DNAT rule");
    let listen = SocketAddr::new(IpAddr::V4(b.ip), 9001);
    let service: SocketAddr = format!("{vip}:80").parse().unwrap();
    tcp_echo(&b.ns.path(), listen, &a.ns.path(), service, BYTES).expect("a connection through a Service's DNAT");

    // NAT outgoing: the outside still sees the node's address; another pod, the pod's own.
    let node = &c.nodes[0];
    assert_eq!(tcp_source_seen_ip(&c.outside, OUTSIDE_IP.into(), &a.ns).unwrap(), IpAddr::V4(node.ip));
    assert_eq!(tcp_source_seen_ip(&c.outside, OUTSIDE_IP6.into(), &a.ns).unwrap(), IpAddr::V6(node.ip6));
    assert_eq!(tcp_source_seen_ip(&b.ns, b.ip.into(), &a.ns).unwrap(), IpAddr::V4(a.ip));

    // The marking rule and conntrack's setting are kept in place: the table's deletion is news
    // (nftables events); a sysctl makes none, so it is put back with the table, or at the resync.
    node.ns.exec("sh", &["-c", "echo 0 > /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"]).unwrap();
    node.ns.exec("nft", &["delete", "table", "inet", "overlay_fast_path"]).unwrap();
    let repaired = wait_until(Duration::from_secs(5), || {
        node.ns.exec("nft", &["list", "tables"]).is_ok_and(|t| t.contains("inet overlay_fast_path"))
            && node
                .ns
                .exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"])
                .is_ok_and(|v| v.trim() == "1")
    });
    assert!(repaired, "the fast path's table and setting were not put back:\n{}", node.log_text());

    // The daemon gone, its programs go with it: traffic takes the ordinary path.
    let (a_ns, b_ns, b_ip) = (a.ns.path(), b.ns.path(), b.ip);
    let node = &mut c.nodes[0];
    node.stop().unwrap();
    let at = SocketAddr::new(IpAddr::V4(b_ip), 9002);
    tcp_echo(&b_ns, at, &a_ns, at, BYTES).expect("traffic after the daemon stopped");
    let bin = overlay_tests::workspace_bin("overlayd");
    let mut dry = node.ns.command(bin.to_str().unwrap(), &["cleanup", "--dry-run", "--subnet-file"]);
    let dry = String::from_utf8_lossy(&dry.arg(&node.subnet_file).output().unwrap().stdout).to_string();
    assert!(dry.contains("nftables table inet overlay_fast_path"), "{dry}");
    let out =
        node.ns.command(bin.to_str().unwrap(), &["cleanup", "--subnet-file"]).arg(&node.subnet_file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables = node.ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("overlay_fast_path"), "left after cleanup: {tables}");
}
