//! NetworkPolicy, end to end, on the API test double: the truth table
//! (`overlay_tests::truth_table`, which also runs on a real kube-apiserver
//! in `kube_real.rs`), and enforcement across updates and restarts.

use std::net::IpAddr;
use std::time::Duration;

use overlay_tests::cluster::{ClusterOptions, DUAL_STACK_CONFIG};
use overlay_tests::netpol::{namespace_object, pod_object, PodName, Servers, TablePod};
use overlay_tests::truth_table::{self, labels, Table, HEALTH};
use overlay_tests::{require_root, wait_until, Cluster};
use serde_json::{json, Value};

/// The truth table's cluster: three dual-stack nodes of three pods on the
/// API double, each daemon with the health address and `flags`.
fn truth_table_cluster(flags: &[&str]) -> Cluster {
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).expect("cluster");
    c.start_kube_api(DUAL_STACK_CONFIG).expect("API test double");
    let flags: Vec<&str> = ["--health-addr", HEALTH].into_iter().chain(flags.iter().copied()).collect();
    for _ in 0..3 {
        c.add_ready_kube_node(&flags, 3).expect("node");
    }
    c
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn network_policy_truth_table_in_both_families() {
    require_root();
    let c = truth_table_cluster(&[]);
    let t = Table::new(&c.nodes, c.api()).expect("the table");
    // No --log-policy-drops: namespace x alone asks for its drops to be logged.
    let mut x = namespace_object("x", &[]);
    x["metadata"]["annotations"] = json!({"overlay-net.io/log-policy-drops": "true"});
    c.api().put("namespaces", x).expect("annotate x");
    truth_table::run(&t);
    let logs: String = c.nodes.iter().map(|n| n.log_text()).collect();
    let drops: Vec<&str> = logs.lines().filter(|l| l.contains("policy dropped")).collect();
    assert!(drops.iter().any(|l| l.contains(": ingress of x/")), "no drop of x's said:\n{}", drops.join("\n"));
    assert!(drops.iter().any(|l| l.contains(": egress of x/")), "no egress drop of x's said:\n{}", drops.join("\n"));
    // y and z isolate their pods in some cases too; nothing asked for their drops.
    let others: Vec<&&str> = drops
        .iter()
        .filter(|l| {
            [": ingress of y/", ": ingress of z/", ": egress of y/", ": egress of z/"].iter().any(|o| l.contains(o))
        })
        .collect();
    assert!(others.is_empty(), "drops of namespaces not annotated were logged:\n{others:#?}");
}

/// The same table with `--fast-path`: the per-flow cache carries the
/// packets of every connection the policy allowed (each probe exchanges a
/// few after the handshake), and never one it denied.
#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn network_policy_truth_table_on_the_fast_path() {
    require_root();
    let c = truth_table_cluster(&["--fast-path"]);
    let t = Table::new(&c.nodes, c.api()).expect("the table");
    truth_table::run(&t);
    // The counters reach the metrics every 5 s.
    let carried = || {
        c.nodes
            .iter()
            .map(|n| overlay_tests::probe::metric(&n.ns, HEALTH.parse().unwrap(), "overlay_fast_path_packets_total"))
            .map(|m| m.unwrap_or(0))
            .sum::<u64>()
    };
    assert!(
        wait_until(Duration::from_secs(12), || carried() > 0),
        "the fast path carried nothing:\n{}",
        c.nodes[0].log_text()
    );
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn cluster_network_policy_truth_table_in_both_families() {
    require_root();
    let c = truth_table_cluster(&["--log-policy-drops"]);
    let absent = "the ClusterNetworkPolicy API (policy.networking.k8s.io/v1alpha2) is not served";
    assert!(c.nodes.iter().all(|n| n.log_text().contains(absent)), "{}", c.nodes[0].log_text());
    // Installed after the daemons started: they begin enforcing it without a restart.
    c.api().install_cluster_policy_crd();
    let t = Table::new(&c.nodes, c.api()).expect("the table");
    let found = wait_until(Duration::from_secs(75), || {
        c.nodes.iter().all(|n| n.log_text().contains("enforcing ClusterNetworkPolicy"))
    });
    assert!(found, "every daemon finds the CRD within its 60 s poll:\n{}", c.nodes[0].log_text());
    truth_table::run_cluster(&t);
    // Each dropped flow was said once, naming its pods and the rule that dropped it.
    let logs: String = c.nodes.iter().map(|n| n.log_text()).collect();
    let drops: Vec<&str> = logs.lines().filter(|l| l.contains("policy dropped")).collect();
    let by_admin = drops.iter().find(|l| {
        l.contains("policy dropped TCP 80 y/")
            && l.contains("-> x/")
            && l.contains("denied by ClusterNetworkPolicy cnp-1 (Admin, priority 10), ingress rule 0")
    });
    assert!(by_admin.is_some(), "no drop by the Admin Deny said:\n{}", drops.join("\n"));
    let by_isolation = drops.iter().find(|l| l.contains("NetworkPolicy: policies select it for ingress"));
    assert!(by_isolation.is_some(), "no drop by NetworkPolicy's isolation said:\n{}", drops.join("\n"));
    let egress = drops.iter().find(|l| l.contains("egress of x/a") && l.contains("(Admin, priority 5), egress rule 0"));
    assert!(egress.is_some(), "no egress drop said:\n{}", drops.join("\n"));
    // The CRD deleted: its policies go with it, and the daemons say so.
    let deny_all = json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                          "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]});
    t.set_all_policies(&[], &[("cnp-1", deny_all)]);
    c.api().delete_cluster_policy_crd().unwrap();
    let said =
        wait_until(Duration::from_secs(10), || c.nodes.iter().all(|n| n.log_text().matches(absent).count() == 2));
    assert!(said, "{}", c.nodes[0].log_text());
    truth_table::check_open(&t);
}

fn echo_server(netns: String) -> std::thread::JoinHandle<anyhow::Result<()>> {
    overlay_tests::probe::in_netns_path(&netns, || {
        let l = std::net::TcpListener::bind(("0.0.0.0", 8080))?;
        let (mut c, _) = l.accept()?;
        let mut buf = [0u8; 64];
        loop {
            let n = std::io::Read::read(&mut c, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            std::io::Write::write_all(&mut c, &buf[..n])?;
        }
    })
}

/// Connects every 20 ms from `netns` to `to`:80 until stopped; returns
/// (attempts, connections made).
fn keep_probing(
    netns: String,
    to: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<(u32, u32)>> {
    overlay_tests::probe::in_netns_path(&netns, move || {
        let (mut tries, mut made) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tries += 1;
            if std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok() {
                made += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((tries, made))
    })
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn enforcement_holds_across_updates_and_daemon_restarts() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).expect("cluster");
    c.start_kube_api(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).expect("API test double");
    c.add_ready_kube_node(&["--health-addr", HEALTH], 2).expect("node 1");
    c.add_ready_kube_node(&["--health-addr", HEALTH], 1).expect("node 2");
    // x/a and x/c on node 1, x/b on node 2.
    let place = [("a", 0, 0), ("c", 0, 1), ("b", 1, 0)];
    let pods: Vec<TablePod> = place
        .iter()
        .map(|(name, n, k)| TablePod {
            name: PodName { ns: "x", name },
            netns: c.nodes[*n].pods[*k].ns.path(),
            node: c.nodes[*n].name.clone(),
            ips: vec![IpAddr::V4(c.nodes[*n].pods[*k].ip)],
        })
        .collect();
    c.api().put("namespaces", namespace_object("x", &[])).unwrap();
    for p in &pods {
        c.api().put("pods", pod_object(p, &labels(&[("pod", p.name.name)]))).unwrap();
    }
    let _servers = Servers::start(&pods).unwrap();
    let xa = std::net::SocketAddr::new(pods[0].ips[0], 80);
    let before = truth_table::syncs(&c.nodes);
    let allow_b = |ports: Value| {
        json!({"metadata": {"name": "p1", "namespace": "x"},
               "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": ports}]}})
    };
    c.api().put("networkpolicies", allow_b(json!([{"port": 80}, {"port": 8080}]))).unwrap();
    assert!(wait_until(Duration::from_secs(10), || truth_table::syncs(&c.nodes)
        .iter()
        .zip(&before)
        .all(|(n, b)| n > b)));

    // A connection from x/b to x/a, open across unrelated updates and an
    // update of the very policy that allows it.
    let echo = echo_server(pods[0].netns.clone());
    std::thread::sleep(Duration::from_millis(100));
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let to = std::net::SocketAddr::new(pods[0].ips[0], 8080);
    let client = overlay_tests::probe::in_netns_path(&pods[2].netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        for word in rx {
            std::io::Write::write_all(&mut s, word.as_bytes())?;
            let mut buf = vec![0u8; word.len()];
            std::io::Read::read_exact(&mut s, &mut buf)?;
            done_tx.send(if buf == word.as_bytes() { Ok(()) } else { Err(anyhow::anyhow!("echo garbled")) })?;
        }
        Ok(())
    });
    let exchange = |word: &'static str| {
        tx.send(word).unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).expect("an answer on the open connection").unwrap();
    };
    exchange("before");
    // The host reaches its own pods whatever the policy (kubelet probes):
    // x/a admits only x/b, yet node 1 itself connects.
    let host = overlay_tests::probe::in_netns_path(&c.nodes[0].ns.path(), move || {
        Ok(std::net::TcpStream::connect_timeout(&xa, Duration::from_millis(500)).is_ok())
    });
    assert!(host.join().unwrap().unwrap(), "node 1 reaches its pod x/a");
    let other_pod = overlay_tests::probe::in_netns_path(&pods[1].netns, move || {
        Ok(std::net::TcpStream::connect_timeout(&xa, Duration::from_millis(500)).is_ok())
    });
    assert!(!other_pod.join().unwrap().unwrap(), "x/c does not");
    let before = truth_table::syncs(&c.nodes);
    c.api().put("namespaces", namespace_object("y", &[])).unwrap();
    c.api()
        .put("networkpolicies", json!({"metadata": {"name": "other", "namespace": "y"}, "spec": {"podSelector": {}}}))
        .unwrap();
    c.api().put("pods", pod_object(&pods[1], &labels(&[("pod", "c"), ("tier", "x")]))).unwrap();
    c.api().put("networkpolicies", allow_b(json!([{"port": 80}, {"port": 8080}, {"port": 9000}]))).unwrap();
    assert!(wait_until(Duration::from_secs(10), || truth_table::syncs(&c.nodes)
        .iter()
        .zip(&before)
        .all(|(n, b)| n > b)));
    exchange("after unrelated updates");
    drop(tx);
    client.join().unwrap().unwrap();
    echo.join().unwrap().unwrap();

    // A restart of node 1's daemon: x/c stays blocked and x/b allowed at
    // every moment, and the new daemon finds the table right and writes nothing.
    let applied_before = c.nodes[0].log_text().matches("NetworkPolicy ruleset applied").count();
    let stop = Arc::new(AtomicBool::new(false));
    let denied = keep_probing(pods[1].netns.clone(), xa, stop.clone());
    let allowed = keep_probing(pods[2].netns.clone(), xa, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    c.nodes[0].stop().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let table = c.nodes[0].ns.exec("nft", &["list", "table", "inet", "overlay_policy"]).unwrap();
    assert!(table.contains("x/p1"), "the table stays while the daemon is down: {table}");
    let before = truth_table::syncs(&c.nodes)[1];
    c.nodes[0].start().unwrap();
    c.nodes[0].wait_ready(Duration::from_secs(20)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        overlay_tests::probe::http_get(&c.nodes[0].ns, HEALTH.parse().unwrap(), "/readyz")
            .is_ok_and(|(code, _)| code == 200)
    }));
    assert!(truth_table::syncs(&c.nodes)[1] >= before);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (tries, made) = denied.join().unwrap().unwrap();
    assert_eq!(made, 0, "x/c reached x/a during the restart ({made} of {tries})");
    let (tries, made) = allowed.join().unwrap().unwrap();
    assert_eq!(made, tries, "x/b was refused during the restart ({} of {tries})", tries - made);
    let log = c.nodes[0].log_text();
    assert_eq!(
        log.matches("NetworkPolicy ruleset applied").count(),
        applied_before,
        "the restarted daemon found its table holding the ruleset and left it:\n{log}"
    );

    // Someone deletes the table, then flushes the ingress chain: each is
    // found through nftables events (not the 5 s check) and put back.
    let blocked = |c: &Cluster| {
        overlay_tests::probe::in_netns_path(&pods[1].netns, move || {
            Ok(std::net::TcpStream::connect_timeout(&xa, Duration::from_millis(200)).is_err())
        })
        .join()
        .unwrap()
        .unwrap()
            && c.nodes[0].ns.exec("nft", &["list", "table", "inet", "overlay_policy"]).is_ok_and(|t| t.contains("x/p1"))
    };
    let repairs = |c: &Cluster| {
        overlay_tests::probe::metric(&c.nodes[0].ns, HEALTH.parse().unwrap(), "overlay_policy_repairs_total").unwrap()
    };
    for (i, vandal) in
        [["delete", "table", "inet", "overlay_policy"], ["flush", "chain", "inet", "overlay_policy"]].iter().enumerate()
    {
        let mut args: Vec<&str> = vandal.to_vec();
        if args[0] == "flush" {
            args.push("ingress");
        }
        c.nodes[0].ns.exec("nft", &args).unwrap();
        assert!(wait_until(Duration::from_secs(10), || blocked(&c)), "{args:?} is repaired");
        assert!(wait_until(Duration::from_secs(2), || repairs(&c) == i as u64 + 1), "repairs counted");
        let log = c.nodes[0].log_text();
        assert_eq!(
            log.matches("changed or removed by someone else (an nftables event); restoring it").count(),
            i + 1,
            "found by the event, not the timer:\n{log}"
        );
    }
}
