//! Mistaken flags and commands on a node, against a real etcd and the real
//! kernel: a second daemon, cleanup under a running daemon, an underlay that
//! is the overlay's own device or loopback, bad endpoints, a net-conf with a
//! typo or changed under a running daemon, and an API server that goes away.
//! Each is refused or said with one clear line, and the node keeps working.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use overlay_tests::cluster::PREFIX;
use overlay_tests::probe::ping_until;
use overlay_tests::{require_root, wait_until, workspace_bin, Cluster, ClusterOptions, Node};

/// Runs `overlayd args...` in the node's namespace with the node's own flags, and waits for it to exit.
fn overlayd(node: &Node, args: &[&str]) -> Output {
    let bin = workspace_bin("overlayd");
    let mut child = node.command(&bin).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Runs an `overlayd` subcommand in the node's namespace (no daemon flags but the subnet file).
fn subcommand(node: &Node, args: &[&str]) -> Output {
    let bin = workspace_bin("overlayd");
    node.ns
        .command(bin.to_str().unwrap(), &[])
        .env("NO_COLOR", "1")
        .arg("--subnet-file")
        .arg(&node.subnet_file)
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn one_daemon_per_node_and_cleanup_never_pulls_the_node_from_under_it() {
    require_root();
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    for _ in 0..2 {
        c.add_ready_node(&[], 1).unwrap();
    }
    assert!(ping_until(&c.nodes[0].pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(5)));
    let node = &c.nodes[0];
    let pid = node.pid().unwrap();

    // A second daemon on the node exits at once, naming the first.
    let second = overlayd(node, &["--ip-masq"]);
    assert!(!second.status.success(), "{}", text(&second));
    let said = text(&second);
    assert!(said.contains(&format!("another overlayd (pid {pid}) holds")), "{said}");
    assert_eq!(said.lines().filter(|l| l.contains("another overlayd")).count(), 1, "said once:\n{said}");

    // `status` asks the running daemon over its local socket.
    let status = subcommand(node, &["status"]);
    let report = text(&status);
    assert!(status.status.success(), "{report}");
    let subnet = node.subnet().unwrap();
    for part in [
        "ready:      yes".to_string(),
        format!("lease:      {}", subnet.to_string().replace('/', "-")),
        format!("overlay.1 mac {} on {}", node.vtep_mac().unwrap(), node.ip),
        "peers:      1 programmed, 0 skipped".to_string(),
        "resources:  all right (ip_forward, device, entries, masquerade, subnet_file)".to_string(),
    ] {
        assert!(report.contains(&part), "{part}:\n{report}");
    }
    let json: serde_json::Value = serde_json::from_slice(&subcommand(node, &["status", "--json"]).stdout).unwrap();
    assert_eq!(json["peers"], 1);
    assert!(!report.contains("_v6"), "IPv6 is off: none of its resources is shown:\n{report}");

    // cleanup refuses while the daemon runs, and changes nothing.
    let refused = subcommand(node, &["cleanup"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains(&format!("pid {pid}")), "{}", text(&refused));
    assert!(node.ns.ip(&["link", "show", "overlay.1"]).is_ok());
    assert!(node.subnet_file.exists());

    // Stopped: a dry run names what would go, and removes nothing.
    c.nodes[0].stop().unwrap();
    let node = &c.nodes[0];
    // A device of flanneld's that overlayd never adopted (flanneld may run on it).
    node.ns
        .ip(&["link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth0", "dstport", "8473", "nolearning"])
        .unwrap();
    let dry = subcommand(node, &["cleanup", "--dry-run"]);
    let said = text(&dry);
    assert!(dry.status.success(), "{said}");
    for part in ["device overlay.1".to_string(), format!("file {}", node.subnet_file.display())] {
        assert!(said.contains(&part), "{part}:\n{said}");
    }
    assert!(!said.contains("device flannel.1"), "{said}");
    assert!(!said.contains("route:"), "the device's routes go with it, and only with it:\n{said}");
    assert!(node.ns.ip(&["link", "show", "overlay.1"]).is_ok() && node.subnet_file.exists(), "a dry run removed");

    // cleanup: ours goes, flanneld's stays, and says so; --include-flannel takes it too.
    let done = subcommand(node, &["cleanup"]);
    assert!(done.status.success(), "{}", text(&done));
    assert!(text(&done).contains("left flanneld's device") && text(&done).contains("--include-flannel"));
    assert!(node.ns.ip(&["link", "show", "overlay.1"]).is_err());
    assert!(!node.subnet_file.exists());
    assert!(node.ns.ip(&["link", "show", "flannel.1"]).is_ok(), "flanneld's device went");
    assert!(subcommand(node, &["cleanup", "--include-flannel"]).status.success());
    assert!(node.ns.ip(&["link", "show", "flannel.1"]).is_err());
    assert!(text(&subcommand(node, &["cleanup", "--dry-run"])).contains("nothing of overlayd's"));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn the_underlay_is_never_the_overlay_s_own_device_nor_loopback() {
    require_root();
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    for _ in 0..2 {
        c.add_ready_node(&[], 1).unwrap();
    }
    c.nodes[0].stop().unwrap();
    let node = &c.nodes[0];
    let device_before = node.ns.ip(&["-d", "link", "show", "overlay.1"]).unwrap();
    let entries_before = (node.neighbours(), node.fdb(), node.routes());
    for (iface, why) in [
        ("overlay.1", "interface overlay.1 cannot be the underlay: it is a VXLAN device of the overlay itself"),
        ("lo", "interface lo cannot be the underlay: it is the loopback interface"),
        ("127.0.0.1", "interface lo cannot be the underlay"),
    ] {
        let out = overlayd(node, &["--iface", iface]);
        assert!(!out.status.success(), "--iface {iface}:\n{}", text(&out));
        assert!(text(&out).contains(why), "--iface {iface}:\n{}", text(&out));
        assert_eq!(node.ns.ip(&["-d", "link", "show", "overlay.1"]).unwrap(), device_before, "--iface {iface}");
        assert_eq!((node.neighbours(), node.fdb(), node.routes()), entries_before, "--iface {iface}");
    }
    // The pods still talk, with no daemon on the node, and again with one.
    assert!(ping_until(&c.nodes[1].pods[0].ns, c.nodes[0].pods[0].ip, Duration::from_secs(5)));
    c.nodes[0].start().unwrap();
    c.nodes[0].wait_ready(Duration::from_secs(10)).unwrap();
    assert!(ping_until(&c.nodes[0].pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(5)));
}

#[test]
fn bad_endpoints_prefixes_and_log_filters_are_refused_at_start_naming_the_flag() {
    let bin = workspace_bin("overlayd");
    for (args, flag) in [
        (&["--etcd-endpoints", "htp:/x"][..], "--etcd-endpoints"),
        (&["--etcd-endpoints", "http://127.0.0.1:2379,etcd:2379"], "--etcd-endpoints"),
        (&["--etcd-prefix", ""], "--etcd-prefix"),
        (&["--kube-api-url", "10.96.0.1"], "--kube-api-url"),
        (&["--log-level", "info,overlayd=loud"], "--log-level"),
        (&["--log-format", "xml"], "--log-format"),
    ] {
        let started = Instant::now();
        // Nothing is touched: the command line is refused before anything else.
        let out = Command::new(&bin).args(args).args(["--subnet-file", "/nonexistent/subnet.env"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(flag), "{args:?}: {}", text(&out));
        assert!(started.elapsed() < Duration::from_secs(2), "{args:?}: refused only after {:?}", started.elapsed());
    }
    let version = Command::new(&bin).arg("--version").output().unwrap();
    let line = String::from_utf8_lossy(&version.stdout);
    assert!(line.starts_with("overlayd ") && line.contains("(commit "), "{line}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_net_conf_typo_is_said_and_a_change_under_a_running_daemon_is_said() {
    require_root();
    let config = r#"{"Network":"10.244.0.0/16","SubnetLength":24,"Backend":{"Type":"VXLAN","VNi":1}}"#;
    let mut c = Cluster::new(ClusterOptions { config: Some(config.into()), ..ClusterOptions::default() }).unwrap();
    c.add_ready_node(&["--log-format", "json"], 0).unwrap();
    let node = &c.nodes[0];
    let log = node.log_text();
    // JSON lines, each an object with a level and a message.
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    let said = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(said(r#"unknown net-conf key \"SubnetLength\" (ignored; did you mean \"SubnetLen\"?)"#), 1, "{log}");
    assert_eq!(said(r#"unknown net-conf key \"Backend.VNi\""#), 1, "{log}");
    assert!(wait_until(Duration::from_secs(5), || node.log_text().contains("ready: 0 peers")), "{}", node.log_text());

    // Rewritten with the same meaning: said as such. Changed: a restart is needed, and said.
    c.etcd.put(&format!("{PREFIX}/config"), &config.replace("VXLAN", "vxlan")).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || node.log_text().contains("it means the same")),
        "{}",
        node.log_text()
    );
    c.etcd.put(&format!("{PREFIX}/config"), r#"{"Network":"10.250.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || node.log_text().contains("restart it (every node) to apply the new one")),
        "{}",
        node.log_text()
    );
    let env = node.subnet_env().unwrap();
    assert_eq!(env.network.map(|n| n.to_string()).as_deref(), Some("10.244.0.0/16"), "kept the running config");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn an_api_server_outage_is_said_once_and_its_end_once() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).unwrap();
    c.start_kube_api(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    c.add_ready_kube_node(&[], 0).unwrap();
    c.add_ready_kube_node(&[], 0).unwrap();
    let node = &c.nodes[0];
    let peer = c.nodes[1].subnet().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(10), || node.routes().contains(&peer)), "{}", node.log_text());
    let before = node.log_text().lines().count();
    c.api().stop();
    std::thread::sleep(Duration::from_secs(8));
    let during: Vec<String> = node.log_text().lines().skip(before).map(str::to_string).collect();
    let unreachable: Vec<&String> = during.iter().filter(|l| l.contains("unreachable")).collect();
    assert_eq!(unreachable.len(), 1, "said once:\n{}", during.join("\n"));
    assert!(
        unreachable[0].contains("WARN") && unreachable[0].contains("endpoint=http://192.168.50.2:6443"),
        "{}",
        unreachable[0]
    );
    assert!(!during.iter().any(|l| l.contains("ERROR") || l.contains("failed with error")), "{}", during.join("\n"));
    assert!(during.len() <= 3, "{} lines in 8 s:\n{}", during.len(), during.join("\n"));
    c.api().restart().unwrap();
    assert!(wait_until(Duration::from_secs(15), || node.log_text().contains("reachable again")), "{}", node.log_text());
    let after = node.log_text();
    assert_eq!(after.lines().filter(|l| l.contains("reachable again")).count(), 1, "{after}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn a_refused_net_conf_is_said_once_and_nothing_is_made() {
    require_root();
    let config = r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#;
    let mut c = Cluster::new(ClusterOptions { config: Some(config.into()), ..ClusterOptions::default() }).unwrap();
    let i = c.add_node(&[]).unwrap();
    c.nodes[i].start().unwrap();
    let status = c.nodes[i].wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let log = c.nodes[i].log_text();
    let refusal = "SubnetLen: SubnetLen 31 leaves no room for pods";
    assert_eq!(log.lines().filter(|l| l.contains(refusal)).count(), 1, "said once:\n{log}");
    assert!(!log.contains("Some("), "no Rust debug output:\n{log}");
    assert!(c.nodes[i].ns.ip(&["link", "show", "overlay.1"]).is_err(), "a half-made node");
}
