//! Hostile and mistaken leases, against a real etcd and the real kernel:
//! whatever anyone writes under the lease prefix, a node keeps its own routes,
//! its pods and its good peers, and stays ready. Each bad lease is skipped
//! with one line naming its key and why.

use std::net::SocketAddr;
use std::time::Duration;

use overlay_tests::bulk;
use overlay_tests::cluster::PREFIX;
use overlay_tests::probe::{http_get, metric, ping_until};
use overlay_tests::{require_root, wait_until, Cluster, ClusterOptions};

const HEALTH: &str = "127.0.0.1:8471";

fn health() -> SocketAddr {
    HEALTH.parse().unwrap()
}

fn lease_value(public_ip: &str, mac: &str, vni: u32) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}"#
    )
}

/// Two ready nodes with a pod each, serving health and metrics.
fn cluster() -> Cluster {
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    for _ in 0..2 {
        c.add_ready_node(&["--health-addr", HEALTH], 1).unwrap();
    }
    assert!(ping_until(&c.nodes[0].pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(5)));
    c
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn hostile_leases_never_touch_a_nodes_routes_nor_stop_its_good_peers() {
    require_root();
    let c = cluster();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let (a_subnet, b_subnet) = (a.subnet().unwrap(), b.subnet().unwrap());
    let b_mac = b.vtep_mac().unwrap();
    // A route an operator made, in the cluster network, where a lease will point.
    let free: Vec<u8> =
        (200..=254).filter(|n| ![a_subnet, b_subnet].iter().any(|s| s.network().octets()[2] == *n)).collect();
    let static_subnet = format!("10.244.{}.0/24", free[0]);
    a.ns.ip(&["route", "add", &static_subnet, "via", "192.168.50.254", "proto", "static"]).unwrap();
    let connected = || a.ns.ip(&["route", "show", "192.168.50.0/24"]).unwrap_or_default();
    assert!(connected().contains("proto kernel"), "{}", connected());

    let subnet = |i: usize| format!("10.244.{}.0-24", free[i]);
    let a_half = format!("{}-25", std::net::Ipv4Addr::from(u32::from(a_subnet.network()) + 128));
    let pod_ip = a.pods[0].ip.to_string();
    let a_ip = a.ip.to_string();
    let mac = |i: u8| format!("02:aa:00:00:00:{i:02x}");
    // Each bad lease, and the reason it is skipped for.
    let bad: Vec<(String, String, &str)> = vec![
        ("192.168.50.0-24".into(), lease_value("192.168.50.99", &mac(1), 1), "outside the cluster network"),
        (a_half, lease_value("192.168.50.98", &mac(2), 1), "overlaps this node's own subnet"),
        ("10.245.0.0-24".into(), lease_value("192.168.50.97", &mac(3), 1), "outside the cluster network"),
        (subnet(1), lease_value("192.168.50.96", &b_mac, 1), "is claimed by the older lease"),
        (subnet(2), lease_value("127.0.0.1", &mac(5), 1), "not a unicast address"),
        (subnet(3), lease_value("224.0.0.1", &mac(6), 1), "not a unicast address"),
        (subnet(4), lease_value("255.255.255.255", &mac(7), 1), "not a unicast address"),
        (subnet(5), lease_value(&a_ip, &mac(8), 1), "this node's own"),
        (subnet(6), lease_value(&pod_ip, &mac(9), 1), "inside the cluster network"),
        (subnet(7), lease_value("192.168.50.90", "00:00:00:00:00:00", 1), "not a unicast MAC"),
        (subnet(8), lease_value("192.168.50.89", "ff:ff:ff:ff:ff:ff", 1), "not a unicast MAC"),
        (subnet(9), lease_value("192.168.50.88", "01:00:5e:00:00:01", 1), "not a unicast MAC"),
        (subnet(10), lease_value("192.168.50.87", &mac(13), 7), "VNI 7 is not this network's"),
        (subnet(11), lease_value("0.0.0.0", &mac(14), 1), "names no VTEP"),
        (subnet(12), r#"{"PublicIP":"192.168.50.86","BackendType":"vxlan"}"#.into(), "names no VTEP"),
    ];
    // A lease that is good by itself, at the operator's route.
    let at_static = format!("10.244.{}.0-24", free[0]);
    c.etcd.put(&format!("{PREFIX}/subnets/{at_static}"), &lease_value("192.168.50.85", &mac(15), 1)).unwrap();
    for (key, value, _) in &bad {
        c.etcd.put(&format!("{PREFIX}/subnets/{key}"), value).unwrap();
    }
    let skipped = || metric(&a.ns, health(), "overlay_peers_skipped").unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(10), || skipped() == bad.len() as u64),
        "{} of {} skipped:\n{}",
        skipped(),
        bad.len(),
        a.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || metric(&a.ns, health(), "overlay_entries_refused").unwrap_or(0) == 1),
        "{}",
        a.log_text()
    );
    let log = a.log_text();
    for (key, _, why) in &bad {
        let said: Vec<&str> =
            log.lines().filter(|l| l.contains("skipping peer lease") && l.contains(key.as_str())).collect();
        assert_eq!(said.len(), 1, "{key}: said once, why: {why}:\n{log}");
        assert!(said[0].contains(why), "{key}: {why}:\n{}", said[0]);
    }
    assert!(log.contains(&format!("a route to {static_subnet} that overlayd did not make")), "{log}");

    // The node's own routes are as they were, its peer is where it is, and it is ready.
    assert!(connected().contains("proto kernel"), "the underlay's connected route:\n{}", a.routes());
    let static_route = a.ns.ip(&["route", "show", &static_subnet]).unwrap();
    assert!(static_route.contains("proto static") && !static_route.contains("overlay.1"), "{static_route}");
    let fdb = a.fdb();
    let b_fdb: Vec<&str> = fdb.lines().filter(|l| l.starts_with(&b_mac)).collect();
    assert_eq!(b_fdb.len(), 1, "{fdb}");
    assert!(b_fdb[0].contains(&format!("dst {} ", b.ip)), "the real node keeps its VtepMAC:\n{fdb}");
    for dst in ["127.0.0.1", "224.0.0.1", "255.255.255.255", &a_ip, &pod_ip] {
        assert!(!fdb.contains(&format!("dst {dst} ")), "{dst}:\n{fdb}");
    }
    assert!(!a.routes().contains("10.245.0.0"), "{}", a.routes());
    for node in &c.nodes {
        let (status, body) = http_get(&node.ns, health(), "/readyz").unwrap();
        assert_eq!(status, 200, "node {}: {body}\n{}", node.index, node.log_text());
    }
    assert!(ping_until(&a.pods[0].ns, b.pods[0].ip, Duration::from_secs(5)), "{}", a.log_text());
    assert!(ping_until(&b.pods[0].ns, a.pods[0].ip, Duration::from_secs(5)), "{}", b.log_text());

    // Gone again: nothing of theirs is left, and nothing of the node's went with them.
    for (key, _, _) in &bad {
        c.etcd.delete(&format!("{PREFIX}/subnets/{key}")).unwrap();
    }
    c.etcd.delete(&format!("{PREFIX}/subnets/{at_static}")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || skipped() == 0), "{}", a.log_text());
    assert!(connected().contains("proto kernel"), "{}", a.routes());
    let static_route = a.ns.ip(&["route", "show", &static_subnet]).unwrap();
    assert!(static_route.contains("proto static"), "the operator's route outlives the lease: {static_route}");
    assert!(wait_until(Duration::from_secs(5), || !a.fdb().contains(&mac(15))), "{}", a.fdb());
    assert!(ping_until(&a.pods[0].ns, b.pods[0].ip, Duration::from_secs(5)));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_lease_that_steals_a_vtep_mac_is_skipped_and_stays_skipped_after_a_restart() {
    require_root();
    let mut c = cluster();
    let b = &c.nodes[1];
    let (b_mac, b_subnet, b_ip) = (b.vtep_mac().unwrap(), b.subnet().unwrap(), b.ip);
    // An impostor with b's MAC at another address, written after b: b keeps it.
    let thief = "10.244.254.0-24";
    c.etcd.put(&format!("{PREFIX}/subnets/{thief}"), &lease_value("192.168.50.66", &b_mac, 1)).unwrap();
    let b_where = format!("{b_mac} dst {b_ip} ");
    let a = &mut c.nodes[0];
    assert!(
        wait_until(Duration::from_secs(10), || a.log_text().contains(&format!("lease={thief}"))),
        "{}",
        a.log_text()
    );
    assert!(a.has_peer(b_subnet, &b_mac) && a.fdb().contains(&b_where), "{}", a.fdb());
    assert!(!a.fdb().contains("192.168.50.66"), "{}", a.fdb());
    // A relist (a restart) sees the same: the age is the store's, not the order events came in.
    a.stop().unwrap();
    a.start().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || a.has_peer(b_subnet, &b_mac) && a.fdb().contains(&b_where)),
        "{}",
        a.log_text()
    );
    assert!(!a.fdb().contains("192.168.50.66"), "{}", a.fdb());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_restart_lists_thousands_of_leases_and_megabyte_values_in_pages() {
    require_root();
    let config = r#"{"Network":"10.0.0.0/8","SubnetMin":"10.128.0.0","Backend":{"Type":"vxlan"}}"#;
    let mut c = Cluster::new(ClusterOptions { config: Some(config.into()), ..ClusterOptions::default() }).unwrap();
    let i = c.add_ready_node(&["--health-addr", HEALTH], 0).unwrap();
    c.nodes[i].stop().unwrap();
    let endpoint = c.etcd.endpoint();
    // More leases than one page, and seven values of 1 MB: 7 MB is past gRPC's default 4 MiB.
    bulk::leases(&c.underlay, &endpoint, PREFIX, 1_100, bulk::Bulk::Put).unwrap();
    let huge: Vec<(String, Vec<u8>)> = (0..7)
        .map(|n| {
            let mut value =
                lease_value(&format!("172.31.0.{}", n + 1), &format!("02:bb:00:00:00:{n:02x}"), 1).into_bytes();
            value.splice(1..1, std::iter::repeat_n(b' ', 1 << 20));
            (format!("{PREFIX}/subnets/10.100.{n}.0-24"), value)
        })
        .collect();
    bulk::put_values(&c.underlay, &endpoint, huge).unwrap();
    let node = &mut c.nodes[i];
    node.start().unwrap();
    let peers = || metric(&node.ns, health(), "overlay_peers").unwrap_or(0);
    assert!(wait_until(Duration::from_secs(30), || peers() == 1_100), "{} peers:\n{}", peers(), node.log_text());
    let (status, body) = http_get(&node.ns, health(), "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    let log = node.log_text();
    let said = log.lines().filter(|l| l.contains("far bigger than any real one")).count();
    assert_eq!(said, 7, "{log}");
    assert!(!log.contains("too large"), "{log}");
}
