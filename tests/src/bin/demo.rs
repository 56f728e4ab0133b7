//! `make demo`: a 3-node overlay in network namespaces with a real etcd and
//! 2 pods per node; prints the leases and a pod-to-pod ping matrix, and
//! leaves everything running (`make demo-down` removes it).

use std::time::Duration;

use anyhow::{bail, Result};
use overlay_tests::cluster::{ClusterOptions, PREFIX};
use overlay_tests::probe::ping_until;
use overlay_tests::Cluster;

/// Where each demo node answers health, metrics and status (in its own namespace).
const HEALTH: &str = "127.0.0.1:8471";

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() != Some("up") {
        bail!("usage: overlay-demo up   (remove it with `make demo-down`)");
    }
    if !overlay_tests::is_root() {
        bail!("the demo builds network namespaces: run it as root");
    }
    if overlay_tests::ip(&["netns", "list"])?.lines().any(|l| l.starts_with("ovdemo")) {
        bail!("a demo is already running: `make demo-down` first");
    }
    let mut c = Cluster::new(ClusterOptions { id: Some("demo".into()), resync: "30s".into(), ..Default::default() })?;
    // Each node serves /healthz, /readyz, /metrics and /status on its own namespace's loopback.
    for _ in 0..3 {
        c.add_ready_node(&["--ip-masq", "--health-addr", HEALTH], 2)?;
    }
    println!("\netcd leases ({PREFIX}/subnets/):");
    print!("{}", c.etcd.ctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")])?);
    let pods = c.pods();
    println!("\nping matrix (row pings column):");
    print!("{:>14}", "");
    for (_, p) in &pods {
        print!("{:>14}", p.ip.to_string());
    }
    println!();
    for (n, from) in &pods {
        print!("{:>14}", format!("n{} {}", n + 1, from.ip));
        for (_, to) in &pods {
            let cell = if from.ip == to.ip {
                "-"
            } else if ping_until(&from.ns, to.ip, Duration::from_secs(3)) {
                "ok"
            } else {
                "FAIL"
            };
            print!("{cell:>14}");
        }
        println!();
    }
    println!("\nnode namespaces: {}", c.nodes.iter().map(|n| n.ns.name.as_str()).collect::<Vec<_>>().join(" "));
    println!("try: ip netns exec {} ping {}", c.nodes[0].pods[0].ns.name, c.nodes[2].pods[1].ip);
    println!("     ip -n {} route; bridge -n {} fdb show dev overlay.1", c.nodes[0].ns.name, c.nodes[0].ns.name);
    let n1 = &c.nodes[0];
    println!("\nnode 1, as `overlayd status` sees it:");
    let status = n1
        .ns
        .command(overlay_tests::workspace_bin("overlayd").to_str().unwrap_or("overlayd"), &["status"])
        .arg("--subnet-file")
        .arg(&n1.subnet_file)
        .output()?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    println!("\nhealth and metrics: ip netns exec {} curl -s http://{HEALTH}/readyz   (/metrics, /status)", n1.ns.name);
    println!(
        "status:             ip netns exec {} overlayd status --subnet-file {}",
        n1.ns.name,
        n1.subnet_file.display()
    );
    println!("logs: {}/n*.log    remove with: make demo-down", c.dir.display());
    // Leave the namespaces, etcd and the daemons running.
    std::mem::forget(c);
    Ok(())
}
