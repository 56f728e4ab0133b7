//! overlay-cni in network namespaces: ADD/CHECK/DEL, parallel ADDs, GC,
//! STATUS, and bad input that must leave nothing behind.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use overlay_tests::cni::{call, result_ip};
use std::time::Duration;

use overlay_tests::probe::{ping, ping_until};
use overlay_tests::{random_suffix, require_root, Netns};
use serde_json::{json, Value};

struct Host {
    ns: Netns,
    dir: PathBuf,
    id: String,
}

impl Host {
    fn new(write_subnet_file: bool) -> Host {
        let id = random_suffix();
        let dir = std::env::temp_dir().join(format!("overlay-cni-test-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let host = Host { ns: Netns::new(&format!("ovc{id}h")).unwrap(), dir, id };
        if write_subnet_file {
            host.write_subnet_file();
        }
        host
    }

    fn write_subnet_file(&self) {
        let env =
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        std::fs::write(self.dir.join("subnet.env"), env).unwrap();
    }

    fn conf(&self, version: &str) -> Value {
        json!({"cniVersion": version, "name": "overlay", "type": "overlay-cni",
               "subnetFile": self.dir.join("subnet.env"), "dataDir": self.dir.join("ipam")})
    }

    fn pod(&self, k: usize) -> Netns {
        Netns::new(&format!("ovc{}p{k}", self.id)).unwrap()
    }

    fn allocations(&self) -> usize {
        std::fs::read_dir(self.dir.join("ipam/overlay"))
            .map(|d| {
                d.flatten().filter(|e| e.file_name().to_string_lossy().parse::<std::net::IpAddr>().is_ok()).count()
            })
            .unwrap_or(0)
    }

    fn host_links(&self) -> String {
        self.ns.ip(&["-o", "link"]).unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        overlay_tests::remove_tree(&self.dir);
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn add_check_del_across_versions() {
    require_root();
    let host = Host::new(true);
    for (k, version) in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let pod = host.pod(k);
        let conf = host.conf(version);
        let id = format!("ctr{k}");
        let add = call(&host.ns, "ADD", &id, &pod.path(), "eth0", &conf).unwrap();
        assert!(add.ok, "{version}: {:?} {}", add.json, add.stderr);
        assert_eq!(add.json["cniVersion"], *version);
        assert_eq!(add.json["ips"][0].get("version").is_some(), version.starts_with("0."), "{}", add.json);
        assert_eq!(add.json["ips"][0]["gateway"], "10.244.7.1");
        assert_eq!(add.json["interfaces"][2]["sandbox"], pod.path());
        let ip = result_ip(&add.json).unwrap();
        assert!(ping(&pod, Ipv4Addr::new(10, 244, 7, 1)), "{version}: pod {ip} cannot reach its gateway");
        let link = pod.ip(&["link", "show", "eth0"]).unwrap();
        assert!(link.contains("mtu 1450"), "{link}");
        let routes = pod.ip(&["route"]).unwrap();
        assert!(
            routes.contains("default via 10.244.7.1") && routes.contains("10.244.0.0/16 via 10.244.7.1"),
            "{routes}"
        );

        // CHECK passes, then fails with a reason once a route is gone.
        let mut checked = conf.clone();
        checked["prevResult"] = add.json.clone();
        let ok = call(&host.ns, "CHECK", &id, &pod.path(), "eth0", &checked).unwrap();
        assert!(ok.ok, "{:?}", ok.json);
        pod.ip(&["route", "del", "default"]).unwrap();
        let bad = call(&host.ns, "CHECK", &id, &pod.path(), "eth0", &checked).unwrap();
        assert!(
            !bad.ok && bad.json["msg"].as_str().unwrap().contains("route 0.0.0.0/0 via 10.244.7.1 is missing"),
            "{:?}",
            bad.json
        );

        // DEL removes the interface and the allocation; a second DEL succeeds too.
        let before = host.allocations();
        let del = call(&host.ns, "DEL", &id, &pod.path(), "eth0", &checked).unwrap();
        assert!(del.ok, "{:?}", del.json);
        assert!(pod.ip(&["link", "show", "eth0"]).is_err());
        assert_eq!(host.allocations(), before - 1);
        assert!(call(&host.ns, "DEL", &id, &pod.path(), "eth0", &conf).unwrap().ok);
        // containerd's DEL has an empty CNI_NETNS; an unknown container is fine too.
        assert!(call(&host.ns, "DEL", &id, "", "eth0", &conf).unwrap().ok);
        assert!(call(&host.ns, "DEL", "never-seen", "", "eth0", &conf).unwrap().ok);
    }
    let bridge = host.ns.ip(&["-4", "addr", "show", "cni0"]).unwrap();
    assert!(bridge.contains("10.244.7.1/24"), "{bridge}");
    assert!(!host.host_links().contains("veth"), "host veths left: {}", host.host_links());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn two_hundred_parallel_adds_get_distinct_addresses() {
    require_root();
    let host = Host::new(true);
    let pods: Vec<Netns> = (0..200).map(|k| host.pod(k)).collect();
    let conf = host.conf("1.0.0");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(k, pod)| {
                let (host, conf) = (&host, &conf);
                s.spawn(move || call(&host.ns, "ADD", &format!("c{k}"), &pod.path(), "eth0", conf).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = std::collections::HashSet::new();
    for r in &results {
        assert!(r.ok, "{:?} {}", r.json, r.stderr);
        assert!(ips.insert(result_ip(&r.json).unwrap()), "address handed out twice");
    }
    assert_eq!(ips.len(), 200);
    assert!(
        !ips.contains(&Ipv4Addr::new(10, 244, 7, 0))
            && !ips.contains(&Ipv4Addr::new(10, 244, 7, 1))
            && !ips.contains(&Ipv4Addr::new(10, 244, 7, 255))
    );
    // Reachability, not latency: a first ping may wait out one ARP retransmit on a busy machine.
    for pod in &pods {
        assert!(
            ping_until(pod, Ipv4Addr::new(10, 244, 7, 1), Duration::from_secs(5)),
            "{} cannot reach its gateway",
            pod.name
        );
    }
    // The bridge keeps one MAC whatever ports come and go.
    let mac_before = host.ns.ip(&["link", "show", "cni0"]).unwrap();
    for (k, pod) in pods.iter().enumerate() {
        assert!(call(&host.ns, "DEL", &format!("c{k}"), &pod.path(), "eth0", &conf).unwrap().ok);
    }
    assert_eq!(host.allocations(), 0, "allocations left after DEL of all");
    assert_eq!(
        host.ns.ip(&["link", "show", "cni0"]).unwrap().split("link/ether").nth(1),
        mac_before.split("link/ether").nth(1)
    );
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn before_the_daemon_is_ready_status_is_50_and_add_is_try_again() {
    require_root();
    let host = Host::new(false);
    let conf = host.conf("1.1.0");
    // STATUS before the daemon wrote its subnet file: 50; ADD: 11, "try again later".
    let status = call(&host.ns, "STATUS", "", "", "", &conf).unwrap();
    assert_eq!((status.ok, status.code()), (false, Some(50)));
    let pod = host.pod(0);
    let early = call(&host.ns, "ADD", "c0", &pod.path(), "eth0", &conf).unwrap();
    assert_eq!(early.code(), Some(11), "{:?}", early.json);
    assert!(early.json["msg"].as_str().unwrap().contains("overlay daemon is not ready"));
    assert_eq!(host.allocations(), 0);
    host.write_subnet_file();
    assert!(call(&host.ns, "STATUS", "", "", "", &conf).unwrap().ok);
}

/// The DaemonSet's init container installs the conflist a moment before the daemon writes its subnet file; a pod
/// the runtime sends in between is wired once the file comes, not failed (and backed off by the kubelet).
#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn an_add_just_before_the_daemon_is_ready_waits_for_it() {
    require_root();
    let host = Host::new(false);
    let conf = host.conf("1.1.0");
    let pod = host.pod(0);
    let add = std::thread::scope(|s| {
        let add = s.spawn(|| call(&host.ns, "ADD", "c0", &pod.path(), "eth0", &conf).unwrap());
        std::thread::sleep(std::time::Duration::from_secs(1));
        host.write_subnet_file();
        add.join().unwrap()
    });
    assert!(add.ok, "{:?}", add.json);
    assert_eq!(host.allocations(), 1);
    assert!(call(&host.ns, "DEL", "c0", &pod.path(), "eth0", &conf).unwrap().ok);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn bad_input_gets_its_cni_error_code_and_leaves_nothing() {
    require_root();
    let host = Host::new(true);
    let conf = host.conf("1.1.0");
    let pod = host.pod(0);
    // Bad netns path: error 4, nothing left behind.
    let bad = call(&host.ns, "ADD", "c1", "/etc/hostname", "eth0", &conf).unwrap();
    assert_eq!(bad.code(), Some(4), "{:?}", bad.json);
    let missing = call(&host.ns, "ADD", "c1", "/run/netns/does-not-exist", "eth0", &conf).unwrap();
    assert_eq!(missing.code(), Some(4));
    assert_eq!(host.allocations(), 0);
    assert!(!host.host_links().contains("veth"));
    // Bad names and malformed JSON.
    assert_eq!(call(&host.ns, "ADD", "c1", &pod.path(), "this-name-is-too-long", &conf).unwrap().code(), Some(4));
    assert_eq!(call(&host.ns, "ADD", "c1", &pod.path(), "..", &conf).unwrap().code(), Some(4));
    assert_eq!(call(&host.ns, "ADD", "", &pod.path(), "eth0", &conf).unwrap().code(), Some(4));
    assert_eq!(call(&host.ns, "ADD", "c/1", &pod.path(), "eth0", &conf).unwrap().code(), Some(4));
    let mut bad_conf = conf.clone();
    bad_conf["mtu"] = json!("big");
    let r = call(&host.ns, "ADD", "c1", &pod.path(), "eth0", &bad_conf).unwrap();
    assert_eq!(r.code(), Some(7));
    assert!(r.json["msg"].as_str().unwrap().contains("\"mtu\""));
    let r = call(&host.ns, "ADD", "c1", &pod.path(), "eth0", &json!("not an object")).unwrap();
    assert_eq!(r.code(), Some(6));
    assert_eq!(host.allocations(), 0);
    assert!(pod.ip(&["link", "show", "eth0"]).is_err());
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn gc_releases_every_attachment_not_listed_as_valid() {
    require_root();
    let host = Host::new(true);
    let conf = host.conf("1.1.0");
    // Three attachments, one still valid: the other two are released.
    let pods: Vec<Netns> = (1..=3).map(|k| host.pod(k)).collect();
    for (k, p) in pods.iter().enumerate() {
        assert!(call(&host.ns, "ADD", &format!("g{k}"), &p.path(), "eth0", &conf).unwrap().ok);
    }
    assert_eq!(host.allocations(), 3);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    assert!(call(&host.ns, "GC", "", "", "", &gc).unwrap().ok);
    assert_eq!(host.allocations(), 1);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn version_lists_the_supported_versions() {
    require_root();
    let host = Host::new(true);
    let v = call(&host.ns, "VERSION", "", "", "", &json!({})).unwrap();
    assert!(v.json["supportedVersions"].as_array().unwrap().iter().any(|s| s == "1.1.0"));
}

/// The dual-stack subnet file of the flannel capture (shared/compat), our MTU.
const DUAL_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.40.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:8::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n";

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn dual_stack_add_check_del_gc_cover_both_families() {
    require_root();
    let host = Host::new(false);
    std::fs::write(host.dir.join("subnet.env"), DUAL_ENV).unwrap();
    let conf = host.conf("0.3.1");
    let pod = host.pod(0);
    let add = call(&host.ns, "ADD", "d0", &pod.path(), "eth0", &conf).unwrap();
    assert!(add.ok, "{:?} {}", add.json, add.stderr);
    // The reference plugins' shape: one IP per family with its gateway, both networks, both defaults.
    let ips = &add.json["ips"];
    assert_eq!((ips[0]["version"].as_str(), ips[0]["address"].as_str()), (Some("4"), Some("10.244.40.2/24")));
    assert_eq!((ips[1]["version"].as_str(), ips[1]["address"].as_str()), (Some("6"), Some("fd00:10:244:8::2/64")));
    assert_eq!(ips[1]["gateway"], "fd00:10:244:8::1");
    let dsts: Vec<&str> = add.json["routes"].as_array().unwrap().iter().map(|r| r["dst"].as_str().unwrap()).collect();
    assert_eq!(dsts, ["10.244.0.0/16", "fd00:10:244::/56", "0.0.0.0/0", "::/0"]);
    assert!(ping(&pod, "fd00:10:244:8::1".parse::<std::net::Ipv6Addr>().unwrap()), "no IPv6 to the gateway");
    assert!(ping(&pod, Ipv4Addr::new(10, 244, 40, 1)), "no IPv4 to the gateway");
    let routes = pod.ip(&["-6", "route"]).unwrap();
    assert!(
        routes.contains("default via fd00:10:244:8::1") && routes.contains("fd00:10:244::/56 via fd00:10:244:8::1"),
        "{routes}"
    );
    assert!(pod.ip(&["link", "show", "eth0"]).unwrap().contains("mtu 1430"));
    let bridge = host.ns.ip(&["-6", "addr", "show", "cni0"]).unwrap();
    assert!(bridge.contains("fd00:10:244:8::1/64"), "{bridge}");
    assert_eq!(host.allocations(), 2);

    let mut checked = conf.clone();
    checked["prevResult"] = add.json.clone();
    assert!(call(&host.ns, "CHECK", "d0", &pod.path(), "eth0", &checked).unwrap().ok);
    pod.ip(&["-6", "route", "del", "default"]).unwrap();
    let bad = call(&host.ns, "CHECK", "d0", &pod.path(), "eth0", &checked).unwrap();
    assert!(
        !bad.ok && bad.json["msg"].as_str().unwrap().contains("route ::/0 via fd00:10:244:8::1 is missing"),
        "{:?}",
        bad.json
    );

    // DEL frees both addresses; GC covers both families too.
    assert!(call(&host.ns, "DEL", "d0", &pod.path(), "eth0", &checked).unwrap().ok);
    assert_eq!(host.allocations(), 0);
    let pods: Vec<Netns> = (1..=2).map(|k| host.pod(k)).collect();
    for (k, p) in pods.iter().enumerate() {
        assert!(call(&host.ns, "ADD", &format!("g{k}"), &p.path(), "eth0", &conf).unwrap().ok);
    }
    assert_eq!(host.allocations(), 4);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    assert!(call(&host.ns, "GC", "", "", "", &gc).unwrap().ok);
    assert_eq!(host.allocations(), 2);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn ipv6_only_add_gives_one_ipv6_address() {
    require_root();
    let host = Host::new(false);
    let env = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:8::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n";
    std::fs::write(host.dir.join("subnet.env"), env).unwrap();
    let pod = host.pod(0);
    let add = call(&host.ns, "ADD", "v6", &pod.path(), "eth0", &host.conf("1.0.0")).unwrap();
    assert!(add.ok, "{:?} {}", add.json, add.stderr);
    assert_eq!(add.json["ips"].as_array().unwrap().len(), 1);
    assert_eq!(add.json["ips"][0]["address"], "fd00:10:244:8::2/64");
    assert!(pod.ip(&["-4", "addr", "show", "eth0"]).unwrap().trim().is_empty(), "an IPv4 address on an IPv6-only pod");
    assert!(ping(&pod, "fd00:10:244:8::1".parse::<std::net::Ipv6Addr>().unwrap()));
}

#[test]
fn shipped_conflist_parses_and_names_our_plugin_first() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/10-overlay.conflist")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["plugins"][0]["type"], "overlay-cni");
    assert_eq!(v["plugins"][1]["type"], "portmap");
    assert_eq!(v["plugins"][0]["subnetFile"], "/run/overlay/subnet.env");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_failed_add_rolls_back_everything() {
    require_root();
    let host = Host::new(true);
    let pod = host.pod(0);
    // The pod already has an eth0: the veth cannot be created with that name.
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "other0"]).unwrap();
    let r = call(&host.ns, "ADD", "c0", &pod.path(), "eth0", &host.conf("1.0.0")).unwrap();
    assert!(!r.ok, "{:?}", r.json);
    assert_eq!(host.allocations(), 0, "the address was not released");
    assert!(!host.host_links().contains("veth"), "a host veth was left: {}", host.host_links());
}

/// The pod's IPv4 address on eth0, if it has one.
fn pod_address(pod: &Netns) -> Option<Ipv4Addr> {
    let out = pod.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]).ok()?;
    out.split_whitespace().skip_while(|w| *w != "inet").nth(1)?.split('/').next()?.parse().ok()
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn add_racing_del_of_the_same_container_leaves_no_orphan_and_no_duplicate() {
    require_root();
    let host = Host::new(true);
    let conf = host.conf("1.0.0");
    let rounds = 200;
    let pods: Vec<Netns> = (0..rounds).map(|k| host.pod(k)).collect();
    // Twenty containers at a time, each one's ADD and DEL started together, as a
    // runtime that gives up on a slow ADD sends its DEL.
    for batch in pods.chunks(20).enumerate().map(|(b, chunk)| (b * 20, chunk)).collect::<Vec<_>>() {
        let (first, chunk) = batch;
        std::thread::scope(|s| {
            for (k, pod) in chunk.iter().enumerate() {
                let (host, conf, id) = (&host, &conf, format!("race{}", first + k));
                let path = pod.path();
                let add = s.spawn({
                    let (id, path) = (id.clone(), path.clone());
                    move || call(&host.ns, "ADD", &id, &path, "eth0", conf).unwrap()
                });
                let del = s.spawn(move || call(&host.ns, "DEL", &id, &path, "eth0", conf).unwrap());
                // Either may win; neither may fail for the race's sake.
                let del = del.join().unwrap();
                assert!(del.ok, "DEL: {:?} {}", del.json, del.stderr);
                let _ = add.join().unwrap();
            }
        });
    }
    // Every pod that holds an address holds an allocation of it, and no two pods share one.
    let held: Vec<Ipv4Addr> = pods.iter().filter_map(pod_address).collect();
    let allocated: std::collections::HashSet<Ipv4Addr> = std::fs::read_dir(host.dir.join("ipam/overlay"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    let orphans: Vec<&Ipv4Addr> = held.iter().filter(|ip| !allocated.contains(ip)).collect();
    assert!(orphans.is_empty(), "{} pods hold addresses nobody allocated: {orphans:?}", orphans.len());
    let distinct: std::collections::HashSet<&Ipv4Addr> = held.iter().collect();
    assert_eq!(distinct.len(), held.len(), "an address is held twice: {held:?}");
    assert_eq!(allocated.len(), held.len(), "allocations without a pod: {allocated:?} against {held:?}");
    // And the addresses handed out next are none of those held.
    let more: Vec<Netns> = (rounds..rounds + 20).map(|k| host.pod(k)).collect();
    for (k, pod) in more.iter().enumerate() {
        let add = call(&host.ns, "ADD", &format!("after{k}"), &pod.path(), "eth0", &conf).unwrap();
        assert!(add.ok, "{:?} {}", add.json, add.stderr);
        let ip = result_ip(&add.json).unwrap();
        assert!(!distinct.contains(&ip), "{ip} handed out again while a pod holds it");
    }
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_netns_that_is_the_plugin_s_own_is_refused_and_nothing_changes() {
    require_root();
    let host = Host::new(true);
    let routes_before = host.ns.ip(&["route", "show"]).unwrap();
    let links_before = host.host_links();
    // The host's own namespace, under its /run/netns name and as /proc/self/ns/net.
    for netns in [host.ns.path(), "/proc/self/ns/net".to_string()] {
        let add = call(&host.ns, "ADD", "ctr-host", &netns, "eth0", &host.conf("1.0.0")).unwrap();
        assert!(!add.ok, "{netns}: {:?}", add.json);
        assert_eq!(add.code(), Some(4), "{netns}: {:?}", add.json);
        assert!(add.json["msg"].as_str().unwrap_or_default().contains("own network namespace"), "{:?}", add.json);
    }
    assert_eq!(host.ns.ip(&["route", "show"]).unwrap(), routes_before);
    assert_eq!(host.host_links(), links_before);
    assert_eq!(host.allocations(), 0);
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn after_the_node_is_renumbered_add_leaves_the_bridge_with_the_new_gateway_only() {
    require_root();
    let host = Host::new(true);
    let conf = host.conf("1.0.0");
    let (a, b) = (host.pod(0), host.pod(1));
    assert!(call(&host.ns, "ADD", "before", &a.path(), "eth0", &conf).unwrap().ok);
    let bridge = || host.ns.ip(&["-4", "-o", "addr", "show", "dev", "cni0"]).unwrap();
    assert!(bridge().contains("10.244.7.1/24"), "{}", bridge());
    std::fs::write(
        host.dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let add = call(&host.ns, "ADD", "after", &b.path(), "eth0", &conf).unwrap();
    assert!(add.ok, "{:?} {}", add.json, add.stderr);
    assert_eq!(result_ip(&add.json).map(|ip| ip.octets()[2]), Some(9));
    assert!(bridge().contains("10.244.9.1/24") && !bridge().contains("10.244.7.1"), "{}", bridge());
    let routes = host.ns.ip(&["route", "show"]).unwrap();
    assert!(!routes.contains("10.244.7.0/24"), "the old subnet's route stays:\n{routes}");
    assert!(ping_until(&b, Ipv4Addr::new(10, 244, 9, 1), Duration::from_secs(5)));
}

#[test]
fn run_by_hand_without_cni_command_it_says_what_it_is() {
    use std::process::Stdio;
    let bin = overlay_tests::workspace_bin("overlay-cni");
    // stdin stays open and empty, as at a terminal: the plugin must not wait on it.
    let mut child = std::process::Command::new(&bin)
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = overlay_tests::wait_until(Duration::from_secs(5), || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "it waited on stdin");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.starts_with("CNI overlay plugin v"), "{said}");
    assert!(said.contains("CNI protocol versions supported: ") && said.contains("1.1.0"), "{said}");
}
