//! End-to-end, dual stack on etcd: the real overlayd against a real etcd in
//! network namespaces with a dual-stack underlay (docs/testing.md). Every
//! test asserts what a user sees in both families: pings, the source address
//! a server sees, the entries a node holds.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use overlay_tests::cluster::{ClusterOptions, DUAL_STACK_CONFIG, OUTSIDE_IP, OUTSIDE_IP6, PREFIX};
use overlay_tests::probe::{ping_full_size, ping_until, tcp_source_seen_ip, PingRun};
use overlay_tests::{require_root, wait_until, Cluster};

fn dual(nodes: usize, pods: usize, flags: &[&str]) -> Cluster {
    let options = ClusterOptions { config: Some(DUAL_STACK_CONFIG.into()), ..Default::default() };
    let mut c = Cluster::new(options).expect("cluster");
    for _ in 0..nodes {
        c.add_ready_node(flags, pods).expect("node");
    }
    c
}

/// Waits until every node holds the IPv6 entries of every other node.
fn wait_converged_v6(c: &Cluster) {
    let peers: Vec<_> = c.nodes.iter().map(|n| (n.subnet_v6().unwrap(), n.vtep_mac_v6().unwrap(), n.ip6)).collect();
    for (i, node) in c.nodes.iter().enumerate() {
        for (j, (subnet, mac, dst)) in peers.iter().enumerate() {
            if i != j {
                assert!(
                    wait_until(Duration::from_secs(5), || node.has_peer_v6(*subnet, mac, *dst)),
                    "node {} lacks IPv6 entries for {subnet} ({mac} at {dst}):\n{}\nlog:\n{}",
                    node.index,
                    node.v6_entries(),
                    node.log_text()
                );
            }
        }
    }
}

fn pod_ips(c: &Cluster) -> Vec<(usize, IpAddr, IpAddr)> {
    c.pods().iter().map(|(n, p)| (*n, IpAddr::V4(p.ip), IpAddr::V6(p.ip6.expect("a dual-stack pod")))).collect()
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn every_pod_reaches_every_pod_over_ipv4_and_ipv6() {
    require_root();
    let c = dual(3, 1, &[]);
    wait_converged_v6(&c);
    let pods = c.pods();
    let ips = pod_ips(&c);
    let mut pairs = 0;
    for (from_node, from) in &pods {
        for (to_node, v4, v6) in &ips {
            if to_node == from_node {
                continue;
            }
            for to in [v4, v6] {
                assert!(
                    ping_until(&from.ns, *to, Duration::from_secs(3)),
                    "pod {} (node {}) cannot reach {to} (node {})",
                    from.ip,
                    from_node + 1,
                    to_node + 1
                );
                pairs += 1;
            }
        }
    }
    assert_eq!(pairs, 12);

    // Full-size packets, DF set, in both families: the pod MTU fits IPv6's 70 bytes of VXLAN too.
    let node = &c.nodes[0];
    let env = node.subnet_env().unwrap();
    assert_eq!(env.mtu, 1430, "pods get the MTU of the IPv6 device, which fits both");
    let (from, to) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    ping_full_size(&from.ns, to.ip, env.mtu).expect("a full-size IPv4 packet crosses");
    ping_full_size(&from.ns, to.ip6.unwrap(), env.mtu).expect("a full-size IPv6 packet crosses");

    // The IPv6 device as flannel's flannel-v6.1: same VNI and port, local = IPv6 underlay, /128 address, no RA.
    let link = node.ns.ip(&["-d", "link", "show", "overlay-v6.1"]).unwrap();
    assert!(
        link.contains("mtu 1430")
            && link.contains("vxlan id 1 ")
            && link.contains(&format!("local {} ", node.ip6))
            && link.contains("dstport 8472")
            && link.contains("nolearning"),
        "{link}"
    );
    let v6 = node.subnet_v6().unwrap();
    let addr = node.ns.ip(&["-6", "addr", "show", "overlay-v6.1"]).unwrap();
    assert!(addr.contains(&format!("inet6 {}/128", v6.network())), "{addr}");
    let accept_ra = node.ns.exec("cat", &["/proc/sys/net/ipv6/conf/overlay-v6.1/accept_ra"]).unwrap();
    assert_eq!(accept_ra.trim(), "0");
    assert_ne!(node.vtep_mac_v6().unwrap(), node.vtep_mac().unwrap(), "each device has its own MAC");

    // flannel's key and value: one key for both families, PublicIPv6 and BackendV6Data in the value.
    let v4 = node.subnet().unwrap();
    let key = format!("{PREFIX}/subnets/{}-{}&{}-{}", v4.network(), v4.prefix_len(), v6.network(), v6.prefix_len());
    let value: serde_json::Value = serde_json::from_str(&c.etcd.get(&key).unwrap().expect("the dual key")).unwrap();
    assert_eq!(value["PublicIPv6"], node.ip6.to_string());
    assert_eq!(value["BackendV6Data"]["VtepMAC"], node.vtep_mac_v6().unwrap());
    assert_eq!(value["BackendV6Data"]["VNI"], 1);
    assert_eq!(
        std::fs::read_to_string(&node.subnet_file).unwrap(),
        format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET={}/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n",
            proto::family::nth_addr(&v4.into(), 1),
            proto::family::nth_addr(&v6.into(), 1),
        )
    );
}

/// A jumbo-frame underlay (9000) gives pods 8930 in dual stack (IPv6's 70 bytes of VXLAN fit) and 8950 on
/// IPv4 alone, with no setting: the devices follow the underlay, and full-size packets with DF set cross.
#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_jumbo_frame_underlay_gives_pods_jumbo_frames_with_no_setting() {
    require_root();
    for (config, pod_mtu) in
        [(DUAL_STACK_CONFIG, 8930), (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, 8950)]
    {
        let options = ClusterOptions { config: Some(config.into()), underlay_mtu: 9000, ..Default::default() };
        let mut c = Cluster::new(options).expect("cluster");
        for _ in 0..2 {
            c.add_ready_node(&[], 1).expect("node");
        }
        let node = &c.nodes[0];
        assert_eq!(node.subnet_env().unwrap().mtu, pod_mtu, "the pod MTU published in subnet.env");
        let link = node.ns.ip(&["link", "show", "overlay.1"]).unwrap();
        assert!(link.contains("mtu 8950 "), "the IPv4 device follows the underlay: {link}");
        let (from, to) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
        let eth0 = from.ns.ip(&["link", "show", "eth0"]).unwrap();
        assert!(eth0.contains(&format!("mtu {pod_mtu} ")), "the pod's interface: {eth0}");
        ping_full_size(&from.ns, to.ip, pod_mtu).expect("a full-size IPv4 packet crosses");
        if let Some(to6) = to.ip6 {
            let link = node.ns.ip(&["link", "show", "overlay-v6.1"]).unwrap();
            assert!(link.contains("mtu 8930 "), "the IPv6 device follows the underlay: {link}");
            ping_full_size(&from.ns, to6, pod_mtu).expect("a full-size IPv6 packet crosses");
        }
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn ipv6_traffic_leaving_the_cluster_is_masqueraded_and_pod_traffic_is_not() {
    require_root();
    let c = dual(2, 1, &["--ip-masq"]);
    wait_converged_v6(&c);
    let (node, pod) = (&c.nodes[0], &c.nodes[0].pods[0]);
    // Pod → outside: the server sees the node's IPv6 underlay address (and IPv4's, as before).
    assert_eq!(tcp_source_seen_ip(&c.outside, OUTSIDE_IP6.into(), &pod.ns).unwrap(), IpAddr::V6(node.ip6));
    assert_eq!(tcp_source_seen_ip(&c.outside, OUTSIDE_IP.into(), &pod.ns).unwrap(), IpAddr::V4(node.ip));
    // Pod → pod across nodes: the pod's own IPv6 address.
    let other = &c.nodes[1].pods[0];
    let seen = tcp_source_seen_ip(&other.ns, other.ip6.unwrap().into(), &pod.ns).unwrap();
    assert_eq!(seen, IpAddr::V6(pod.ip6.unwrap()));
    let tables = node.ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(tables.contains("table ip overlay") && tables.contains("table ip6 overlay"), "{tables}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn ipv6_peer_changes_are_followed_and_a_leaving_node_is_removed() {
    require_root();
    let mut c = dual(3, 0, &[]);
    wait_converged_v6(&c);
    let (v4, v6) = (c.nodes[1].subnet().unwrap(), c.nodes[1].subnet_v6().unwrap());
    let key = format!("{PREFIX}/subnets/{}-{}&{}-{}", v4.network(), v4.prefix_len(), v6.network(), v6.prefix_len());
    let value = c.etcd.get(&key).unwrap().unwrap();
    // A new IPv6 MAC and a new public IPv6 address, written as flanneld would.
    let old_mac = c.nodes[1].vtep_mac_v6().unwrap();
    let moved = value.replace(&old_mac, "02:66:00:00:00:01").replace(&c.nodes[1].ip6.to_string(), "fd00:50::99");
    // The peer's own daemon would take its lease back: it is gone first, as a node being reconfigured.
    c.nodes[1].stop().unwrap();
    c.etcd.put(&key, &moved).unwrap();
    let watcher = &c.nodes[0];
    let dst: Ipv6Addr = "fd00:50::99".parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || watcher.has_peer_v6(v6, "02:66:00:00:00:01", dst)
            && !watcher.v6_entries().contains(&old_mac)),
        "the IPv6 change is not reflected:\n{}",
        watcher.v6_entries()
    );
    // The node leaves: its IPv6 entries go with its lease.
    c.etcd.delete(&key).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let e = watcher.v6_entries();
            !e.contains("02:66:00:00:00:01") && !e.contains(&v6.network().to_string())
        }),
        "IPv6 entries of a node that left remain:\n{}",
        watcher.v6_entries()
    );
    assert!(!watcher.routes().contains(&v4.to_string()), "its IPv4 route remains");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_restart_keeps_both_subnets_and_drops_no_packet_in_either_family() {
    require_root();
    let mut c = dual(2, 1, &[]);
    wait_converged_v6(&c);
    let (v4_before, v6_before) = (c.nodes[1].subnet().unwrap(), c.nodes[1].subnet_v6().unwrap());
    let macs_before = (c.nodes[1].vtep_mac().unwrap(), c.nodes[1].vtep_mac_v6().unwrap());
    let to = &c.nodes[1].pods[0];
    let from = &c.nodes[0].pods[0];
    let ping4 = PingRun::start(&from.ns, to.ip, 300, "0.01").unwrap();
    let ping6 = PingRun::start(&from.ns, to.ip6.unwrap(), 300, "0.01").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for i in [0, 1] {
        c.nodes[i].stop().unwrap();
        c.nodes[i].start().unwrap();
        c.nodes[i].wait_ready(Duration::from_secs(20)).unwrap();
    }
    let (sent4, got4) = ping4.finish().unwrap();
    let (sent6, got6) = ping6.finish().unwrap();
    assert_eq!((sent4, got4), (300, 300), "IPv4 packets lost across restarts");
    assert_eq!(
        (sent6, got6),
        (300, 300),
        "IPv6 packets lost across restarts:\n{}\n{}",
        c.nodes[0].log_text(),
        c.nodes[1].log_text()
    );
    assert_eq!(c.nodes[1].subnet().unwrap(), v4_before);
    assert_eq!(c.nodes[1].subnet_v6().unwrap(), v6_before);
    let macs_after = (c.nodes[1].vtep_mac().unwrap(), c.nodes[1].vtep_mac_v6().unwrap());
    assert_eq!(macs_after, macs_before, "the VTEP MACs of both families are stable across restarts");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn ipv6_drift_is_repaired() {
    require_root();
    let c = dual(2, 1, &[]);
    wait_converged_v6(&c);
    let (node, peer) = (&c.nodes[0], &c.nodes[1]);
    let (subnet, mac) = (peer.subnet_v6().unwrap(), peer.vtep_mac_v6().unwrap());
    node.ns.ip(&["-6", "route", "del", &subnet.to_string()]).unwrap();
    node.ns.ip(&["-6", "neigh", "del", &subnet.network().to_string(), "dev", "overlay-v6.1"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || node.has_peer_v6(subnet, &mac, peer.ip6)),
        "deleted IPv6 entries not restored:\n{}",
        node.v6_entries()
    );
    node.ns.ip(&["link", "del", "overlay-v6.1"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || node.has_peer_v6(subnet, &mac, peer.ip6)),
        "a deleted IPv6 device is not rebuilt:\n{}",
        node.log_text()
    );
    assert!(ping_until(&node.pods[0].ns, peer.pods[0].ip6.unwrap(), Duration::from_secs(3)));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn bad_ipv6_input_is_refused_clearly_and_garbage_peers_are_skipped() {
    require_root();
    let mut c = dual(1, 0, &[]);
    // A node whose underlay has no IPv6 address: one clear error naming the interface, nothing half-made.
    let i = c.add_node(&[]).unwrap();
    let node = &mut c.nodes[i];
    node.ns.ip(&["-6", "addr", "flush", "dev", "eth0", "scope", "global"]).unwrap();
    node.start().unwrap();
    let status = node.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let log = node.log_text();
    assert!(log.contains("interface eth0 has no IPv6 address"), "{log}");
    let links = node.ns.ip(&["link"]).unwrap();
    assert!(!links.contains("overlay"), "a half-configured dataplane: {links}");

    // Garbage dual-stack keys and values in etcd are skipped with a warning; the good peer stays.
    let (good_v6, good_mac, good_ip6) =
        (c.nodes[0].subnet_v6().unwrap(), c.nodes[0].vtep_mac_v6().unwrap(), c.nodes[0].ip6);
    for (key, value) in [
        (
            "10.244.200.0-24&fd00:10:244:c8::1-64",
            r#"{"PublicIP":"192.168.50.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#,
        ),
        (
            "10.244.201.0-24&fd00:10:244:c9::-64",
            r#"{"PublicIP":"192.168.50.98","PublicIPv6":"fd00:50::zz","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:98"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:98"}}"#,
        ),
    ] {
        c.etcd.put(&format!("{PREFIX}/subnets/{key}"), value).unwrap();
    }
    let j = c.add_ready_node(&[], 0).unwrap();
    let joined = &mut c.nodes[j];
    assert!(
        wait_until(Duration::from_secs(5), || joined.has_peer_v6(good_v6, &good_mac, good_ip6)),
        "{}",
        joined.v6_entries()
    );
    let said = |what: &str| joined.log_text().lines().any(|l| l.contains("WARN") && l.contains(what));
    assert!(
        wait_until(Duration::from_secs(5), || said("fd00:10:244:c8::1-64") && said("fd00:10:244:c9::-64")),
        "{}",
        joined.log_text()
    );
    let entries = format!("{}{}", joined.v6_entries(), joined.routes());
    assert!(
        !entries.contains("10.244.200.") && !entries.contains("10.244.201.") && !entries.contains(":c9::"),
        "{entries}"
    );
    assert!(joined.running(), "garbage peers must not stop the daemon");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn ipv6_only_on_etcd_is_refused_with_a_pointer_to_kubernetes_mode() {
    require_root();
    let options = ClusterOptions {
        config: Some(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#.into()),
        ..Default::default()
    };
    let mut c = Cluster::new(options).unwrap();
    let i = c.add_node(&[]).unwrap();
    c.nodes[i].start().unwrap();
    let status = c.nodes[i].wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let log = c.nodes[i].log_text();
    assert!(log.contains("IPv6-only network needs Kubernetes mode"), "{log}");
    assert!(!c.nodes[i].ns.ip(&["link"]).unwrap().contains("overlay"));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn turning_ipv6_on_keeps_the_ipv4_subnet_and_turning_it_off_removes_the_ipv6_half() {
    require_root();
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    c.add_ready_node(&[], 0).unwrap();
    let v4 = c.nodes[0].subnet().unwrap();
    let v4_key = format!("{PREFIX}/subnets/{}-{}", v4.network(), v4.prefix_len());
    assert!(c.etcd.get(&v4_key).unwrap().is_some());

    // IPv6 on: the same IPv4 subnet, now in a dual key that replaced the old one.
    c.nodes[0].stop().unwrap();
    c.etcd.put(&format!("{PREFIX}/config"), DUAL_STACK_CONFIG).unwrap();
    c.nodes[0].start().unwrap();
    let node = &c.nodes[0];
    assert!(wait_until(Duration::from_secs(20), || node.subnet_v6().is_ok()), "{}", node.log_text());
    assert_eq!(node.subnet().unwrap(), v4, "turning IPv6 on moved the IPv4 subnet");
    let v6 = node.subnet_v6().unwrap();
    let keys = c.etcd.keys(&format!("{PREFIX}/subnets/")).unwrap();
    assert_eq!(keys, [format!("{v4_key}&{}-{}", v6.network(), v6.prefix_len())], "the old key must be replaced");
    assert!(node.ns.ip(&["link", "show", "overlay-v6.1"]).is_ok());

    // IPv6 off again: its device goes, the IPv4 subnet stays.
    c.nodes[0].stop().unwrap();
    c.etcd.put(&format!("{PREFIX}/config"), r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    c.nodes[0].start().unwrap();
    let node = &c.nodes[0];
    assert!(
        wait_until(Duration::from_secs(20), || node.subnet_v6().is_err()
            && node.ns.ip(&["link", "show", "overlay-v6.1"]).is_err()),
        "{}",
        node.log_text()
    );
    assert_eq!(node.subnet().unwrap(), v4);
    assert_eq!(c.etcd.keys(&format!("{PREFIX}/subnets/")).unwrap(), [v4_key]);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn direct_routing_covers_ipv6_peers_on_the_same_link() {
    require_root();
    let config = DUAL_STACK_CONFIG.replace(r#""Type":"vxlan""#, r#""Type":"vxlan","DirectRouting":true"#);
    let mut c = Cluster::new(ClusterOptions { config: Some(config), ..Default::default() }).unwrap();
    c.add_ready_node(&[], 1).unwrap();
    c.add_ready_node(&[], 1).unwrap();
    let (node, peer) = (&c.nodes[0], &c.nodes[1]);
    let want = format!("{} via {} dev eth0 proto 77", peer.subnet_v6().unwrap(), peer.ip6);
    assert!(
        wait_until(Duration::from_secs(5), || node.ns.ip(&["-6", "route"]).unwrap_or_default().contains(&want)),
        "no direct IPv6 route {want}:\n{}",
        node.ns.ip(&["-6", "route"]).unwrap_or_default()
    );
    assert!(ping_until(&node.pods[0].ns, peer.pods[0].ip6.unwrap(), Duration::from_secs(3)));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_fresh_node_forwards_ipv6_to_its_pods_at_once_and_resyncs_change_nothing() {
    require_root();
    let c = dual(2, 1, &[]);
    // The bridge's link-local address is usable at once: the node can resolve its pods for forwarded traffic.
    let cni0 = c.nodes[1].ns.ip(&["-6", "addr", "show", "cni0"]).unwrap();
    assert!(!cni0.contains("tentative"), "{cni0}");
    wait_converged_v6(&c);
    let (from, to) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let run = PingRun::start(&from.ns, to.ip6.unwrap(), 200, "0.01").unwrap();
    assert_eq!(run.finish().unwrap(), (200, 200), "the first IPv6 packets to a fresh node's pod were lost");
    // Resyncs (every second here) find the IPv6 half as planned: the kernel's own entries
    // (multicast and link-local neighbours) are not ours, and are left alone.
    let updates = |n: &overlay_tests::Node| n.log_text().matches("dataplane updated family=IPv6").count();
    let before: Vec<usize> = c.nodes.iter().map(updates).collect();
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<usize> = c.nodes.iter().map(updates).collect();
    assert_eq!(before, after, "resyncs changed the IPv6 entries:\n{}", c.nodes[0].log_text());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn devices_are_named_after_the_vni_and_cleanup_removes_both_families() {
    require_root();
    let config = DUAL_STACK_CONFIG.replace(r#""Type":"vxlan""#, r#""Type":"vxlan","VNI":7"#);
    let mut c = Cluster::new(ClusterOptions { config: Some(config), ..Default::default() }).unwrap();
    c.add_ready_node(&["--ip-masq"], 0).unwrap();
    let node = &mut c.nodes[0];
    let links = node.ns.ip(&["-d", "link"]).unwrap();
    assert!(
        links.contains("overlay.7:") && links.contains("overlay-v6.7:") && links.contains("vxlan id 7 "),
        "{links}"
    );
    node.stop().unwrap();
    let bin = overlay_tests::workspace_bin("overlayd");
    let out =
        node.ns.command(bin.to_str().unwrap(), &["cleanup", "--subnet-file"]).arg(&node.subnet_file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let links = node.ns.ip(&["link"]).unwrap();
    assert!(!links.contains("overlay"), "devices left after cleanup: {links}");
    let tables = node.ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("overlay"), "tables left after cleanup: {tables}");
    assert!(!node.subnet_file.exists());
}
