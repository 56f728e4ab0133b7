//! `OVERLAY_BENCH_ONLY=dataplane` (and part of `make bench`): what the pod
//! network's packet path costs against the node's own, measured side by side
//! in one run, IPv4 and IPv6, on two Kubernetes-mode nodes (the API double):
//!
//! - throughput: iperf3, 1 and 4 TCP streams;
//! - request/response: one TCP connection, 1 byte each way, one transaction
//!   in flight (netperf's TCP_RR), as transactions a second;
//! - connection rate: connect, 1 byte each way, close (netperf's TCP_CRR).
//!
//! Paths: node to node over the underlay; pod to pod across the two nodes,
//! on flannel's path (today's default: bridge, forwarding, netfilter, VXLAN)
//! and on the fast path (`--fast-path`, the daemons restarted with it), each
//! with no policy and with a NetworkPolicy that selects the destination pod;
//! and for request/response, pod to pod on one node against the node's
//! loopback. Each figure also carries what the whole machine spent on it
//! (from `/proc/stat`): CPU per transaction, or per gigabyte, and its softirq
//! share, which is where the forwarding path's work lands.
//!
//! netperf is not in Debian's main archive, so request/response and connection
//! rate are measured by a small client and server here (blocking sockets,
//! TCP_NODELAY), the same for every path.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use overlay_tests::cluster::{ClusterOptions, DUAL_STACK_CONFIG};
use overlay_tests::{Cluster, Netns};

/// The port of the request/response server.
const RR_PORT: u16 = 7100;
/// How long each measurement runs.
const WINDOW: Duration = Duration::from_secs(3);
/// Rounds of the whole set, alternating the paths; the table gives each figure's median.
const ROUNDS: usize = 3;
/// The byte a client sends to stop the server.
const QUIT: u8 = b'q';

/// Busy and softirq jiffies of the whole machine, from `/proc/stat`'s `cpu` line.
#[derive(Clone, Copy)]
struct CpuTime {
    busy: u64,
    softirq: u64,
}

fn cpu_time() -> Result<CpuTime> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    if v.len() < 7 {
        bail!("cannot read /proc/stat's cpu line: {line}");
    }
    let total: u64 = v.iter().take(8).sum();
    Ok(CpuTime { busy: total - v[3] - v[4], softirq: v[6] })
}

/// What one measurement gives: its rate (bits, or transactions, a second)
/// and the machine's CPU seconds over it (all, and softirq).
#[derive(Clone, Copy, Default)]
struct Sample {
    rate: f64,
    cpu_s: f64,
    softirq_s: f64,
    seconds: f64,
}

/// Runs `f` (which returns its rate) and reads the machine's CPU time around it.
fn measured(f: impl FnOnce() -> Result<f64>) -> Result<Sample> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (before, start) = (cpu_time()?, Instant::now());
    let rate = f()?;
    let (after, seconds) = (cpu_time()?, start.elapsed().as_secs_f64());
    Ok(Sample {
        rate,
        cpu_s: (after.busy - before.busy) as f64 / hz,
        softirq_s: (after.softirq - before.softirq) as f64 / hz,
        seconds,
    })
}

/// A request/response server on `RR_PORT` of `ns`, both families: for each
/// connection in turn, answers every byte with one byte until the client
/// closes; a [`QUIT`] byte ends it.
fn rr_server(ns: &Netns) -> Result<std::thread::JoinHandle<Result<()>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = overlay_tests::probe::in_netns(ns, move || {
        // An IPv6 socket that also takes IPv4 (v4-mapped), as Linux makes one by default.
        let listener = TcpListener::bind(("::", RR_PORT))?;
        let _ = ready_tx.send(());
        loop {
            let (mut conn, _) = listener.accept()?;
            conn.set_nodelay(true)?;
            let mut byte = [0u8; 1];
            loop {
                match conn.read(&mut byte) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if conn.write_all(&byte).is_err() {
                            break;
                        }
                        if byte[0] == QUIT {
                            return Ok(());
                        }
                    }
                }
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).context("the request/response server did not start")?;
    Ok(server)
}

/// Stops the server of [`rr_server`] at `to`, from `from`.
fn stop_rr_server(from: &Netns, to: IpAddr, server: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    overlay_tests::probe::in_netns(from, move || {
        let mut conn = TcpStream::connect_timeout(&SocketAddr::new(to, RR_PORT), Duration::from_secs(3))?;
        conn.write_all(&[QUIT])?;
        let mut byte = [0u8; 1];
        let _ = conn.read(&mut byte);
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the stopping client panicked"))??;
    server.join().map_err(|_| anyhow::anyhow!("the request/response server panicked"))?
}

/// One connection, 1 byte each way, one transaction in flight, for [`WINDOW`]: transactions a second.
fn request_response(from: &Netns, to: IpAddr) -> Result<f64> {
    overlay_tests::probe::in_netns(from, move || {
        let mut conn = TcpStream::connect_timeout(&SocketAddr::new(to, RR_PORT), Duration::from_secs(3))?;
        conn.set_nodelay(true)?;
        let mut byte = [1u8; 1];
        let (start, mut done) = (Instant::now(), 0u64);
        while start.elapsed() < WINDOW {
            conn.write_all(&byte)?;
            conn.read_exact(&mut byte)?;
            done += 1;
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the request/response client panicked"))?
}

/// Connect, 1 byte each way, close, one after another for [`WINDOW`]: connections a second.
fn connect_request_response(from: &Netns, to: IpAddr) -> Result<f64> {
    overlay_tests::probe::in_netns(from, move || {
        let addr = SocketAddr::new(to, RR_PORT);
        let (start, mut done) = (Instant::now(), 0u64);
        let mut byte = [1u8; 1];
        while start.elapsed() < WINDOW {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            conn.set_nodelay(true)?;
            conn.write_all(&byte)?;
            conn.read_exact(&mut byte)?;
            done += 1;
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connecting client panicked"))?
}

/// iperf3 from `client` to a server in `server` on `server_ip`, `streams` TCP streams for [`WINDOW`]: bits a second.
fn iperf(server: &Netns, server_ip: IpAddr, client: &Netns, streams: u32) -> Result<f64> {
    let mut daemon = server
        .command("iperf3", &["-s", "-1", "-B", &server_ip.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running iperf3 (make deps installs it)")?;
    let (seconds, streams) = (WINDOW.as_secs().to_string(), streams.to_string());
    let mut out = Err(anyhow::anyhow!("iperf3 never ran"));
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        out = client.exec("iperf3", &["-c", &server_ip.to_string(), "-t", &seconds, "-P", &streams, "-J"]);
        if out.is_ok() {
            break;
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let v: serde_json::Value = serde_json::from_str(&out?)?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().context("no throughput in iperf3's report")
}

/// One path of the table: who sends, to whom.
struct Path<'a> {
    client: &'a Netns,
    server: &'a Netns,
    to: IpAddr,
}

/// What is measured on a path.
#[derive(Clone, Copy, PartialEq)]
enum Measure {
    Stream1,
    Stream4,
    RequestResponse,
    ConnectRate,
}

impl Measure {
    const ALL: [Measure; 4] = [Measure::Stream1, Measure::Stream4, Measure::RequestResponse, Measure::ConnectRate];

    fn label(self) -> &'static str {
        match self {
            Measure::Stream1 => "TCP throughput, 1 stream",
            Measure::Stream4 => "TCP throughput, 4 streams",
            Measure::RequestResponse => "request/response (1 byte each way), mean latency",
            Measure::ConnectRate => "connect, 1 byte each way, close: a second",
        }
    }

    fn run(self, path: &Path) -> Result<Sample> {
        match self {
            Measure::Stream1 => measured(|| iperf(path.server, path.to, path.client, 1)),
            Measure::Stream4 => measured(|| iperf(path.server, path.to, path.client, 4)),
            Measure::RequestResponse => measured(|| request_response(path.client, path.to)),
            Measure::ConnectRate => measured(|| connect_request_response(path.client, path.to)),
        }
    }

    /// The figure as the table shows it, with the machine's CPU for it.
    fn show(self, s: &Sample) -> String {
        let softirq = 100.0 * s.softirq_s / s.cpu_s.max(1e-9);
        match self {
            Measure::Stream1 | Measure::Stream4 => {
                let gigabytes = s.rate * s.seconds / 8e9;
                format!("{:.2} Gbit/s ({:.2} CPU s/GB, {softirq:.0} % softirq)", s.rate / 1e9, s.cpu_s / gigabytes)
            }
            Measure::RequestResponse => format!(
                "{:.1} µs ({:.0}/s; {:.1} CPU µs each, {softirq:.0} % softirq)",
                1e6 / s.rate,
                s.rate,
                s.cpu_s * 1e6 / (s.rate * s.seconds)
            ),
            Measure::ConnectRate => format!(
                "{:.0} ({:.1} CPU µs each, {softirq:.0} % softirq)",
                s.rate,
                s.cpu_s * 1e6 / (s.rate * s.seconds)
            ),
        }
    }

    /// The ratio of `pod` to `node` the goal is stated in: throughput and
    /// rate as a share of the node's, latency as a multiple of it.
    fn ratio(self, pod: &Sample, node: &Sample) -> String {
        match self {
            Measure::RequestResponse => format!("{:.2}×", node.rate / pod.rate),
            _ => format!("{:.2}", pod.rate / node.rate),
        }
    }
}

/// Restarts both daemons with `--fast-path` or without (which also takes its
/// table away), when they do not run that way already; waits until the
/// nodes are ready again.
fn set_fast_path(c: &mut Cluster, on: bool, health: &str) -> Result<()> {
    for node in &mut c.nodes {
        let has = node.flags.iter().any(|f| f == "--fast-path");
        if has == on {
            continue;
        }
        node.stop()?;
        node.flags.retain(|f| f != "--fast-path");
        if on {
            node.flags.push("--fast-path".into());
        }
        node.start()?;
    }
    for node in &c.nodes {
        let ready = overlay_tests::wait_until(Duration::from_secs(30), || {
            overlay_tests::probe::metric(&node.ns, health.parse().unwrap(), "overlay_ready").unwrap_or(0) == 1
                && (!on || node.log_text().matches("fast path in place").count() > 0)
        });
        if !ready {
            bail!("node {} not ready after a restart:\n{}", node.index, node.log_text());
        }
    }
    // The pods' veths are reached by the first reconcile after start; flows learn at once.
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// The median sample of `runs` by rate.
fn median(runs: &mut [Sample]) -> Sample {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs[runs.len() / 2]
}

pub fn dataplane_bench() -> Result<()> {
    use overlay_tests::netpol::{namespace_object, pod_object, PodName, TablePod};
    use serde_json::json;
    let health = "127.0.0.1:8471";
    let mut c = Cluster::new(ClusterOptions { config: None, resync: "30s".into(), ..Default::default() })?;
    c.start_kube_api(DUAL_STACK_CONFIG)?;
    for pods in [2, 1] {
        let i = c.add_kube_node(true, &["--health-addr", health])?;
        c.nodes[i].start()?;
        c.nodes[i].wait_ready(Duration::from_secs(20))?;
        for _ in 0..pods {
            c.nodes[i].add_pod()?;
        }
    }
    // x/a and x/c on node 1, x/b on node 2: a -> b crosses nodes, c -> a stays on node 1.
    c.api().put("namespaces", namespace_object("x", &[]))?;
    for (name, node, pod) in [("a", 0, 0), ("c", 0, 1), ("b", 1, 0)] {
        let p = &c.nodes[node].pods[pod];
        let table_pod = TablePod {
            name: PodName { ns: "x", name },
            netns: p.ns.path(),
            node: c.nodes[node].name.clone(),
            ips: vec![p.ip.into(), p.ip6.context("no IPv6 pod")?.into()],
        };
        c.api().put("pods", pod_object(&table_pod, &[("pod".to_string(), name.to_string())].into()))?;
    }
    let in_effect = |c: &Cluster, node: usize| {
        overlay_tests::probe::metric(&c.nodes[node].ns, health.parse().unwrap(), "overlay_network_policies_in_effect")
            .unwrap_or(u64::MAX)
    };
    {
        let (n1, a, cc) = (&c.nodes[0], &c.nodes[0].pods[0], &c.nodes[0].pods[1]);
        // Thousands of connections a second from one client: its ports are reused from TIME_WAIT,
        // and the whole range is open, so the connection rate measures the path, not the port search.
        for ns in [&n1.ns, &a.ns, &cc.ns] {
            ns.exec("sysctl", &["-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535"])?;
        }
    }
    // Each server: where it runs, who stops it (node, pod or the node itself), and at which address.
    let servers = {
        let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
        let (a, b) = (&n1.pods[0], &n2.pods[0]);
        vec![
            (rr_server(&n2.ns)?, (0, None), IpAddr::V4(n2.ip)),
            (rr_server(&b.ns)?, (0, Some(0)), IpAddr::V4(b.ip)),
            (rr_server(&a.ns)?, (0, Some(1)), IpAddr::V4(a.ip)),
            (rr_server(&n1.ns)?, (0, None), IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        ]
    };

    // Per family, per measure: node->node, pod->pod (flannel's path, and the fast path), each
    // also with the policy; and node loopback, pod->pod on one node.
    #[derive(Default)]
    struct Runs {
        node: Vec<Sample>,
        pod: Vec<Sample>,
        pod_policy: Vec<Sample>,
        pod_fast: Vec<Sample>,
        pod_policy_fast: Vec<Sample>,
        loopback: Vec<Sample>,
        same_node: Vec<Sample>,
        same_node_fast: Vec<Sample>,
    }
    let families = ["IPv4", "IPv6"];
    let mut runs: Vec<Vec<Runs>> =
        families.iter().map(|_| Measure::ALL.iter().map(|_| Runs::default()).collect()).collect();
    let policy = json!({"metadata": {"name": "to-b", "namespace": "x"},
                        "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}});
    for round in 0..ROUNDS {
        eprintln!("bench: dataplane, round {} of {ROUNDS} ...", round + 1);
        for fast in [false, true] {
            set_fast_path(&mut c, fast, health)?;
            for with_policy in [false, true] {
                if with_policy {
                    c.api().put("networkpolicies", policy.clone())?;
                } else {
                    let _ = c.api().remove("networkpolicies", "x", "to-b");
                }
                let want = u64::from(with_policy);
                if !overlay_tests::wait_until(Duration::from_secs(30), || in_effect(&c, 1) == want) {
                    bail!("the policy on x/b not {} within 30 s", if with_policy { "in effect" } else { "gone" });
                }
                // The gauge is set as the ruleset is compiled: let its apply end.
                std::thread::sleep(Duration::from_secs(1));
                let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
                let (a, cc, b) = (&n1.pods[0], &n1.pods[1], &n2.pods[0]);
                for (f, family) in families.iter().enumerate() {
                    let v6 = f == 1;
                    let addr = |v4: std::net::Ipv4Addr, v6_addr: Option<std::net::Ipv6Addr>| -> Result<IpAddr> {
                        Ok(if v6 { IpAddr::V6(v6_addr.context("no IPv6 address")?) } else { IpAddr::V4(v4) })
                    };
                    let node = Path { client: &n1.ns, server: &n2.ns, to: addr(n2.ip, Some(n2.ip6))? };
                    let pod = Path { client: &a.ns, server: &b.ns, to: addr(b.ip, b.ip6)? };
                    let loopback = Path {
                        client: &n1.ns,
                        server: &n1.ns,
                        to: if v6 {
                            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                        } else {
                            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                        },
                    };
                    let same_node = Path { client: &cc.ns, server: &a.ns, to: addr(a.ip, a.ip6)? };
                    for (m, measure) in Measure::ALL.iter().enumerate() {
                        eprintln!(
                            "bench: {family}, {}{}{}",
                            measure.label(),
                            if fast { ", fast path" } else { "" },
                            if with_policy { ", with the policy" } else { "" }
                        );
                        let r = &mut runs[f][m];
                        match (fast, with_policy) {
                            (false, true) => r.pod_policy.push(measure.run(&pod)?),
                            (true, true) => r.pod_policy_fast.push(measure.run(&pod)?),
                            (true, false) => {
                                r.pod_fast.push(measure.run(&pod)?);
                                if *measure == Measure::RequestResponse {
                                    r.same_node_fast.push(measure.run(&same_node)?);
                                }
                            }
                            (false, false) => {
                                r.node.push(measure.run(&node)?);
                                r.pod.push(measure.run(&pod)?);
                                if *measure == Measure::RequestResponse {
                                    r.loopback.push(measure.run(&loopback)?);
                                    r.same_node.push(measure.run(&same_node)?);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    for (server, (node, pod), to) in servers {
        let n = &c.nodes[node];
        let from = pod.map_or(&n.ns, |p| &n.pods[p].ns);
        stop_rr_server(from, to, server)?;
    }
    let carried: u64 = c
        .nodes
        .iter()
        .map(|n| overlay_tests::probe::metric(&n.ns, health.parse().unwrap(), "overlay_fast_path_packets_total"))
        .map(|m| m.unwrap_or(0))
        .sum();
    if carried == 0 {
        bail!("the fast path carried nothing in its rounds: its figures would be the ordinary path's");
    }

    println!();
    println!(
        "Dataplane, two nodes (dual-stack underlay veths on one bridge), {} s per figure, median of {ROUNDS} rounds; \
         in brackets what the whole machine's CPUs spent on it (2 cores) and its softirq share:",
        WINDOW.as_secs()
    );
    for (f, family) in families.iter().enumerate() {
        println!();
        println!(
            "| {family} | node → node | pod → pod, flannel's path | ratio | the same, NetworkPolicy on the destination | ratio \
             | pod → pod, `--fast-path` | ratio | the same, NetworkPolicy on the destination | ratio |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for (m, measure) in Measure::ALL.iter().enumerate() {
            let r = &mut runs[f][m];
            let node = median(&mut r.node);
            let cells: Vec<String> = [&mut r.pod, &mut r.pod_policy, &mut r.pod_fast, &mut r.pod_policy_fast]
                .into_iter()
                .map(|runs| {
                    let s = median(runs);
                    format!("{} | {}", measure.show(&s), measure.ratio(&s, &node))
                })
                .collect();
            println!("| {} | {} | {} |", measure.label(), measure.show(&node), cells.join(" | "));
        }
        let rr = Measure::ALL.iter().position(|m| *m == Measure::RequestResponse).unwrap_or_default();
        let r = &mut runs[f][rr];
        let (loopback, same_node, same_node_fast) =
            (median(&mut r.loopback), median(&mut r.same_node), median(&mut r.same_node_fast));
        println!(
            "| request/response on one node: loopback → pod → pod | {} | {} | {} | | | {} | {} | | |",
            Measure::RequestResponse.show(&loopback),
            Measure::RequestResponse.show(&same_node),
            Measure::RequestResponse.ratio(&same_node, &loopback),
            Measure::RequestResponse.show(&same_node_fast),
            Measure::RequestResponse.ratio(&same_node_fast, &loopback)
        );
    }
    Ok(())
}
