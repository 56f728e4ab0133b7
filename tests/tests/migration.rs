//! Replacing a running flanneld with overlayd, one node at a time, while
//! pods on every node ping each other every 10 ms: no packet may be lost.
//!
//! flanneld itself cannot run here (the project ships no Go build), so each
//! node starts in the state flanneld v0.20.2 leaves it in, as captured in
//! shared/compat/flannel/node-state-v0.20.2.txt: `flannel.1` with its MAC,
//! VNI, port and address; permanent neighbour and FDB entries and `proto
//! boot` routes for every peer; flanneld's iptables rules (FLANNEL-POSTRTG,
//! FLANNEL-FWD); its lease in etcd (same key, same JSON, a 24 h etcd lease);
//! its subnet file. Then overlayd starts on that node with flanneld's own
//! command line (README, "Migrating from flannel"). The same in Kubernetes
//! mode, against the API double: flanneld's annotations and condition on
//! each Node, and the Node's podCIDR.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use overlay_tests::cluster::{ClusterOptions, OUTSIDE_IP, PREFIX};
use overlay_tests::probe::{http_get, ping_until, tcp_source_seen, PingRun};
use overlay_tests::{require_root, wait_until, workspace_bin, Cluster, Node};
use serde_json::json;

/// Node 1, 2, 3 of the capture: subnet (third octet; in Kubernetes mode the
/// Node's podCIDR instead) and VTEP MAC; public IPs 192.168.50.11-13.
const FLANNEL_NODES: [(u8, &str); 3] =
    [(33, "b2:5e:e8:32:3a:be"), (92, "52:58:c0:08:52:6d"), (55, "de:88:2d:39:68:fa")];
const HEALTH: &str = "127.0.0.1:8471";
/// kube-flannel-cfg's net-conf.json.
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const ANNOTATION: &str = "flannel.alpha.coreos.com";

/// Where flanneld kept its leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Etcd,
    Kube,
}

/// flanneld's lease value for node `i`.
fn lease_value(i: usize) -> String {
    format!(
        r#"{{"PublicIP":"192.168.50.{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        11 + i,
        FLANNEL_NODES[i].1
    )
}

/// flanneld's VXLAN device: `name`, bound to eth0 at `local`, with its MAC, MTU and address.
fn flannel_device(node: &Node, name: &str, local: &str, mac: &str, mtu: &str, address: &str) {
    let ip = |args: &[&str]| node.ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
    let vxlan = ["type", "vxlan", "id", "1", "local", local, "dev", "eth0", "dstport", "8472", "nolearning"];
    ip(&[&["link", "add", name][..], &vxlan].concat());
    ip(&["link", "set", name, "address", mac, "mtu", mtu, "up"]);
    ip(&["addr", "add", address, "dev", name, "nodad"]);
}

/// flanneld's entries on `device` for one peer: a permanent neighbour and
/// FDB entry, and an onlink `proto boot` route to its subnet (IPv6: metric 1024, as it leaves them).
fn flannel_peer(node: &Node, device: &str, gateway: &str, prefix_len: u8, mac: &str, dst: &str) {
    let ip = |args: &[&str]| node.ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
    let family = if gateway.contains(':') { "-6" } else { "-4" };
    ip(&[family, "neigh", "replace", gateway, "lladdr", mac, "dev", device, "nud", "permanent"]);
    node.ns.exec("bridge", &["fdb", "append", mac, "dev", device, "dst", dst, "self", "permanent"]).unwrap();
    let subnet = format!("{gateway}/{prefix_len}");
    let route = [family, "route", "replace", &subnet, "via", gateway, "dev", device, "onlink", "proto", "boot"];
    let metric: &[&str] = if family == "-6" { &["metric", "1024"] } else { &[] };
    ip(&[&route[..], metric].concat());
}

/// flanneld's lease in etcd: `value` at `key`, attached to a 24 h etcd lease.
fn etcd_lease(c: &Cluster, key: &str, value: &str) {
    let lease = c.etcd.ctl(&["lease", "grant", "86400"]).unwrap();
    let id = lease.split_whitespace().nth(1).unwrap().to_string();
    c.etcd.ctl(&["put", &format!("--lease={id}"), key, value]).unwrap();
}

/// flanneld's subnet file.
fn subnet_file(node: &Node, env: &str) {
    std::fs::create_dir_all(node.subnet_file.parent().unwrap()).unwrap();
    std::fs::write(&node.subnet_file, env).unwrap();
}

/// Every pod pings every address in `targets` of the other nodes' pods, every
/// 10 ms, while overlayd starts on one node after the other (each awaited
/// until `took_over` says so); asserts that not one ping was lost.
fn move_while_pinging(c: &mut Cluster, targets: &[Vec<IpAddr>], took_over: impl Fn(&Node) -> bool) {
    let count = 2000;
    let mut runs = Vec::new();
    for i in 0..c.nodes.len() {
        for to in targets.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, addrs)| addrs) {
            runs.push(((i, *to), PingRun::start(&c.nodes[i].pods[0].ns, *to, count, "0.01").unwrap()));
        }
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..c.nodes.len() {
        c.nodes[i].start().unwrap();
        let node = &c.nodes[i];
        assert!(wait_until(Duration::from_secs(10), || took_over(node)), "node {}:\n{}", i + 1, node.log_text());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        started.elapsed() < Duration::from_millis(u64::from(count) * 10),
        "the pings ended before the last node moved"
    );
    for ((i, to), run) in runs {
        let (sent, received) = run.finish().unwrap();
        assert_eq!((sent, received), (count, count), "pod {} -> {to}: packets lost in the migration", i + 1);
    }
}

/// Whether overlayd on `node` is ready and holds every peer with its own routes, in each family of `families`.
fn took_over(node: &Node, families: &[&str]) -> bool {
    http_get(&node.ns, HEALTH.parse().unwrap(), "/readyz").is_ok_and(|(code, _)| code == 200)
        && families
            .iter()
            .all(|f| node.ns.ip(&[f, "route", "show", "proto", "77"]).is_ok_and(|r| r.lines().count() == 2))
}

/// Puts node `i` in the state flanneld leaves it in.
fn as_flanneld_left_it(c: &Cluster, store: Store, i: usize, thirds: &[u8]) {
    let node = &c.nodes[i];
    let (third, mac) = (thirds[i], FLANNEL_NODES[i].1);
    let address = format!("10.244.{third}.0/32");
    flannel_device(node, "flannel.1", &node.ip.to_string(), mac, "1450", &address);
    for (j, (peer_third, (_, peer_mac))) in thirds.iter().zip(FLANNEL_NODES).enumerate().filter(|(j, _)| *j != i) {
        let dst = format!("192.168.50.{}", 11 + j);
        flannel_peer(node, "flannel.1", &format!("10.244.{peer_third}.0"), 24, peer_mac, &dst);
    }
    node.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    // flanneld's rules, as `iptables -S` shows them in the capture.
    let rules = format!(
        r#"set -e
iptables -w -t nat -N FLANNEL-POSTRTG
iptables -w -t nat -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
iptables -w -t nat -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
iptables -w -t nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
iptables -w -t nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
iptables -w -t nat -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.{third}.0/24 -m comment --comment "flanneld masq" -j RETURN
iptables -w -t nat -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
iptables -w -N FLANNEL-FWD
iptables -w -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
iptables -w -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
iptables -w -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
"#
    );
    node.ns.exec("sh", &["-c", &rules]).unwrap_or_else(|e| panic!("{e}"));
    subnet_file(
        node,
        &format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{third}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"),
    );
    match store {
        Store::Etcd => etcd_lease(c, &format!("{PREFIX}/subnets/10.244.{third}.0-24"), &lease_value(i)),
        Store::Kube => c
            .api()
            .edit_node(&node.name, |n| {
                n["metadata"]["annotations"] = json!({
                    format!("{ANNOTATION}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                    format!("{ANNOTATION}/backend-type"): "vxlan",
                    format!("{ANNOTATION}/kube-subnet-manager"): "true",
                    format!("{ANNOTATION}/public-ip"): node.ip.to_string(),
                });
                n["status"]["conditions"] = json!([{
                    "type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
                    "message": "Flannel is running on this node",
                    "lastTransitionTime": "2026-11-01T00:00:00Z", "lastHeartbeatTime": "2026-11-01T00:00:00Z",
                }]);
            })
            .unwrap(),
    }
}

/// The one-line removal of flanneld's iptables chains in README.md's migration section.
fn readme_iptables_cleanup() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = &readme[readme.find("## Migrating from flannel").expect("README: no migration section")..];
    let block = &section[section.find("```sh\n").expect("README: no cleanup line") + 6..];
    block[..block.find("```").unwrap()].trim().to_string()
}

/// What peers know of every node, as text: the etcd keys and values under
/// the subnets prefix, or each Node's podCIDR and flannel annotations.
fn leases(c: &Cluster, store: Store) -> String {
    match store {
        Store::Etcd => c.etcd.ctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")]).unwrap(),
        Store::Kube => c
            .nodes
            .iter()
            .map(|n| {
                let node = c.api().node(&n.name).unwrap();
                let ours: Vec<_> = node
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(k, _)| k.starts_with(ANNOTATION))
                    .collect();
                format!("{} {:?} {ours:?}\n", n.name, node.spec.and_then(|s| s.pod_cidr))
            })
            .collect(),
    }
}

#[test]
#[ignore = "needs root (network namespaces, iptables): run by `make test`"]
fn overlayd_replaces_a_running_flanneld_node_by_node_without_losing_a_packet() {
    require_root();
    migrate(Store::Etcd);
}

#[test]
#[ignore = "needs root (network namespaces, iptables): run by `make test`"]
fn in_kubernetes_mode_overlayd_replaces_a_running_flanneld_without_losing_a_packet() {
    require_root();
    migrate(Store::Kube);
}

fn migrate(store: Store) {
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    // flanneld's own command line (DaemonSet args or a systemd unit), Go's one-dash forms included.
    let flanneld_args = ["-iface=eth0", "--ip-masq", "--healthz-ip=127.0.0.1", "--healthz-port=8471"];
    let mut thirds = Vec::new();
    for (i, (third, _)) in FLANNEL_NODES.iter().enumerate() {
        match store {
            Store::Etcd => {
                c.add_node(&flanneld_args).unwrap();
                thirds.push(*third);
            }
            Store::Kube => {
                if i == 0 {
                    c.start_kube_api(NET_CONF).unwrap();
                }
                let k = c.add_kube_node(true, &flanneld_args).unwrap();
                let cidr = c.api().node(&c.nodes[k].name).unwrap().spec.unwrap().pod_cidr.unwrap();
                thirds.push(cidr.split('.').nth(2).unwrap().parse().unwrap());
            }
        }
    }
    for i in 0..3 {
        as_flanneld_left_it(&c, store, i, &thirds);
    }
    for i in 0..3 {
        c.nodes[i].add_pod().unwrap();
    }
    let before = leases(&c, store);
    // flanneld's dataplane works: pods reach each other, and the outside sees the node.
    for (i, j) in [(0, 1), (1, 2), (2, 0)] {
        assert!(ping_until(&c.nodes[i].pods[0].ns, c.nodes[j].pods[0].ip, Duration::from_secs(5)), "{i} -> {j}");
    }
    assert_eq!(tcp_source_seen(&c.outside, OUTSIDE_IP, &c.nodes[0].pods[0].ns).unwrap(), c.nodes[0].ip);

    // Every pod pings every other, every 10 ms, while the nodes move one by one.
    let targets: Vec<Vec<IpAddr>> = c.nodes.iter().map(|n| vec![n.pods[0].ip.into()]).collect();
    move_while_pinging(&mut c, &targets, |node| took_over(node, &["-4"]));

    // overlayd took flanneld's place as it was: the same leases, the same
    // device and MAC, its own routes, its own masquerade table.
    assert_eq!(leases(&c, store), before, "the leases changed");
    for (i, node) in c.nodes.iter().enumerate() {
        let log = node.log_text();
        assert!(log.contains("adopting flanneld's device"), "{log}");
        if store == Store::Etcd {
            assert!(log.contains("took back our existing lease"), "{log}");
        }
        let link = node.ns.ip(&["link", "show", "flannel.1"]).unwrap();
        assert!(link.contains(FLANNEL_NODES[i].1), "{link}");
        assert!(node.ns.ip(&["link", "show", "overlay.1"]).is_err(), "a second device");
        assert!(node.ns.exec("nft", &["list", "table", "ip", "overlay"]).unwrap().contains("masquerade"));
        // flanneld's chains stay until removed by hand (README gives the line); they do what ours do.
        assert!(node.ns.exec("iptables", &["-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"]).is_ok());
    }
    for (i, j) in [(0, 1), (1, 2), (2, 0)] {
        assert!(ping_until(&c.nodes[i].pods[0].ns, c.nodes[j].pods[0].ip, Duration::from_secs(2)), "{i} -> {j}");
    }
    assert_eq!(tcp_source_seen(&c.outside, OUTSIDE_IP, &c.nodes[1].pods[0].ns).unwrap(), c.nodes[1].ip);
    // The README's cleanup of flanneld's rules, as written there; then masquerade is ours alone.
    let cleanup = readme_iptables_cleanup();
    for node in &c.nodes {
        node.ns.exec("sh", &["-ec", &cleanup]).unwrap_or_else(|e| panic!("{cleanup}: {e}"));
        let left = node.ns.exec("iptables-save", &[]).unwrap();
        assert!(!left.contains("FLANNEL"), "{left}");
    }
    assert_eq!(tcp_source_seen(&c.outside, OUTSIDE_IP, &c.nodes[2].pods[0].ns).unwrap(), c.nodes[2].ip);

    // `overlayd cleanup` on node 1 removes flanneld's device with the rest; a fresh start builds overlay.1.
    c.nodes[0].stop().unwrap();
    let bin = workspace_bin("overlayd");
    let node = &c.nodes[0];
    node.ns.command(bin.to_str().unwrap(), &["cleanup", "--subnet-file"]).arg(&node.subnet_file).output().unwrap();
    assert!(node.ns.ip(&["link", "show", "flannel.1"]).is_err(), "cleanup left flannel.1");
    c.nodes[0].start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || c.nodes[0].ns.ip(&["link", "show", "overlay.1"]).is_ok()));
    for (i, j) in [(0, 1), (1, 0), (2, 0)] {
        assert!(
            ping_until(&c.nodes[i].pods[0].ns, c.nodes[j].pods[0].ip, Duration::from_secs(10)),
            "{i} -> {j} after a fresh start:\n{}",
            c.nodes[0].log_text()
        );
    }
}

/// The dual-stack capture (node-state-dualstack-v0.20.2.txt): node 1, 2, 3's
/// subnets (IPv4 third octet, IPv6 fourth group) and VTEP MACs (IPv4, IPv6).
const DUAL_NODES: [(u8, u16, &str, &str); 3] = [
    (40, 0x8, "b6:ba:d2:9b:35:ab", "fe:e4:ca:57:1c:83"),
    (18, 0x18, "0a:d8:d2:05:d3:63", "d2:69:e8:6a:1c:03"),
    (73, 0x29, "5e:4b:fd:e1:94:02", "96:83:fb:1c:fc:87"),
];
const DUAL_CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;

/// Puts node `i` of a dual-stack cluster in the state flanneld leaves it in: both devices, both families' entries and rules.
fn as_dual_stack_flanneld_left_it(c: &Cluster, i: usize) {
    let node = &c.nodes[i];
    let (third, v6, mac, mac6) = DUAL_NODES[i];
    let (local, local6) = (node.ip.to_string(), node.ip6.to_string());
    flannel_device(node, "flannel.1", &local, mac, "1450", &format!("10.244.{third}.0/32"));
    flannel_device(node, "flannel-v6.1", &local6, mac6, "1430", &format!("fd00:10:244:{v6:x}::/128"));
    for (j, (peer_third, peer_v6, peer_mac, peer_mac6)) in DUAL_NODES.iter().enumerate().filter(|(j, _)| *j != i) {
        let dst = format!("192.168.50.{}", 11 + j);
        flannel_peer(node, "flannel.1", &format!("10.244.{peer_third}.0"), 24, peer_mac, &dst);
        let dst6 = format!("fd00:50::{:x}", 0x11 + j);
        flannel_peer(node, "flannel-v6.1", &format!("fd00:10:244:{peer_v6:x}::"), 64, peer_mac6, &dst6);
    }
    node.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]).unwrap();
    let rules = format!(
        r#"set -e
iptables -w -t nat -N FLANNEL-POSTRTG
iptables -w -t nat -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
iptables -w -t nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
iptables -w -t nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
ip6tables -w -t nat -N FLANNEL-POSTRTG
ip6tables -w -t nat -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
ip6tables -w -t nat -A FLANNEL-POSTRTG -s fd00:10:244::/56 -d fd00:10:244::/56 -m comment --comment "flanneld masq" -j RETURN
ip6tables -w -t nat -A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
ip6tables -w -t nat -A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244:{v6:x}::/64 -m comment --comment "flanneld masq" -j RETURN
"#
    );
    node.ns.exec("sh", &["-c", &rules]).unwrap_or_else(|e| panic!("{e}"));
    subnet_file(
        node,
        &format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{third}.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:{v6:x}::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        ),
    );
    let key = format!("{PREFIX}/subnets/10.244.{third}.0-24&fd00:10:244:{v6:x}::-64");
    let value = format!(
        r#"{{"PublicIP":"{local}","PublicIPv6":"{local6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#
    );
    etcd_lease(c, &key, &value);
}

#[test]
#[ignore = "needs root (network namespaces, iptables): run by `make test`"]
fn dual_stack_overlayd_replaces_a_running_flanneld_without_losing_a_packet_in_either_family() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: Some(DUAL_CONFIG.into()), ..ClusterOptions::default() }).unwrap();
    let flanneld_args = ["-iface=eth0", "--ip-masq", "--healthz-ip=127.0.0.1", "--healthz-port=8471"];
    for i in 0..3 {
        c.add_node(&flanneld_args).unwrap();
        as_dual_stack_flanneld_left_it(&c, i);
    }
    for i in 0..3 {
        c.nodes[i].add_pod().unwrap();
    }
    let before = leases(&c, Store::Etcd);
    let targets: Vec<Vec<IpAddr>> =
        c.nodes.iter().map(|n| vec![n.pods[0].ip.into(), n.pods[0].ip6.expect("a dual-stack pod").into()]).collect();
    for (i, j) in [(0, 1), (1, 2), (2, 0)] {
        for to in &targets[j] {
            assert!(ping_until(&c.nodes[i].pods[0].ns, *to, Duration::from_secs(5)), "{i} -> {to} under flanneld");
        }
    }
    move_while_pinging(&mut c, &targets, |node| took_over(node, &["-4", "-6"]));
    assert_eq!(leases(&c, Store::Etcd), before, "the leases changed");
    for (i, node) in c.nodes.iter().enumerate() {
        for (device, mac) in [("flannel.1", DUAL_NODES[i].2), ("flannel-v6.1", DUAL_NODES[i].3)] {
            let link = node.ns.ip(&["link", "show", device]).unwrap();
            assert!(link.contains(mac), "{link}");
        }
        assert!(node.ns.ip(&["link", "show", "overlay-v6.1"]).is_err(), "a second IPv6 device");
    }
}
