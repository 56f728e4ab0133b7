//! Kubernetes mode on a real control plane: kube-apiserver,
//! kube-controller-manager and kube-scheduler built from Kubernetes' own Go
//! modules (`make k8s`), with an etcd of its own, inside the cluster's
//! underlay namespace. One control plane serves every scenario of the run,
//! in order; each scenario makes its own nodes (registered by the test as
//! a kubelet registers itself), and removes them and its objects at its end.
//!
//! It has its own main (`harness = false`, `overlay_tests::scenarios`): the
//! control plane is started once, and stopped (with every namespace and
//! process) when the run ends, also when a scenario fails.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ipnet::IpNet;
use overlay_tests::cluster::{ClusterOptions, DUAL_STACK_CONFIG, ETCD_IP};
use overlay_tests::control_plane::{self, ControlPlane};
use overlay_tests::probe::{http_get, ping_until, PingRun};
use overlay_tests::scenarios::{self, Scenario};
use overlay_tests::{truth_table, wait_until, Cluster};
use serde_json::Value;

const HEALTH: &str = truth_table::HEALTH;
const PREFIX: &str = "flannel.alpha.coreos.com";
const IPV4: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const IPV6_ONLY: &str =
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;

/// The run's cluster: the underlay (with etcd), and the control plane on it.
struct Real {
    c: Cluster,
    cp: ControlPlane,
    /// What `kubectl apply -f deploy/overlay.yaml` said.
    applied: String,
}

impl Real {
    fn start() -> Result<Real> {
        let c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() })?;
        let cidrs = cidrs(IPV4);
        let cp = ControlPlane::start(&c.underlay, ETCD_IP.parse()?, &c.dir.join("k8s"), &cidrs)?;
        for (what, took) in &cp.started_in {
            eprintln!("control plane: {what} ready in {:.1} s", took.as_secs_f64());
        }
        // Installed as a user installs it: every scenario's daemons run with its ServiceAccount.
        let manifest = overlay_tests::manifests::deploy_dir().join("overlay.yaml");
        let applied = cp.kubectl(&["apply", "--validate=strict", "-f", manifest.to_str().unwrap_or_default()])?;
        Ok(Real { c, cp, applied })
    }

    /// Nodes for a scenario: `n` of them with `pods` pods each, on the network `net_conf`.
    fn nodes(&mut self, net_conf: &str, n: usize, pods: usize) -> Result<()> {
        let wanted = cidrs(net_conf);
        if wanted != self.cidrs_now() {
            self.cp.restart_controller_manager(&wanted)?;
        }
        std::fs::write(self.c.dir.join("net-conf.json"), net_conf)?;
        for _ in 0..n {
            self.c.add_ready_real_kube_node(&self.cp, &["--health-addr", HEALTH], pods)?;
        }
        Ok(())
    }

    fn cidrs_now(&self) -> Vec<IpNet> {
        std::fs::read_to_string(self.c.dir.join("net-conf.json")).map(|t| cidrs(&t)).unwrap_or_default()
    }

    /// Ends a scenario: its nodes stopped and gone, from the kernel and from the API.
    fn clear(&mut self) {
        let names: Vec<String> = self.c.nodes.iter().map(|n| n.name.clone()).collect();
        self.c.nodes.clear();
        for name in names {
            let _ = self.cp.kubectl(&["delete", "node", &name, "--ignore-not-found", "--wait=false"]);
        }
    }

    fn node_json(&self, i: usize) -> Result<Value> {
        self.cp.get(&["node", &self.c.nodes[i].name])
    }

    fn readyz(&self, i: usize) -> (u16, String) {
        http_get(&self.c.nodes[i].ns, HEALTH.parse().unwrap(), "/readyz").unwrap_or((0, String::new()))
    }

    /// Every pod of every node pings every pod of the other nodes.
    fn mesh(&self, timeout: Duration) -> Result<()> {
        for (i, a) in self.c.pods() {
            for (j, b) in self.c.pods() {
                if i == j {
                    continue;
                }
                let targets: Vec<IpAddr> = if b.ip.is_unspecified() { vec![] } else { vec![IpAddr::V4(b.ip)] }
                    .into_iter()
                    .chain(b.ip6.map(IpAddr::V6))
                    .collect();
                for to in targets {
                    ensure!(
                        ping_until(&a.ns, to, timeout),
                        "node {} pod cannot reach {to} on node {}:\n{}",
                        i + 1,
                        j + 1,
                        self.c.nodes[i].log_text()
                    );
                }
            }
        }
        Ok(())
    }
}

/// The node IPAM networks a net-conf calls for.
fn cidrs(net_conf: &str) -> Vec<IpNet> {
    let config = proto::NetConfig::parse(net_conf).expect("a valid net-conf");
    config.families().filter_map(|f| Some(config.pool(f)?.network)).collect()
}

/// `kubectl apply -f deploy/overlay.yaml` is accepted whole by the real API
/// server (server-side field validation of every document), and three nodes
/// whose daemons run with the manifest's ServiceAccount, under its
/// ClusterRole as the real authorizer enforces it, mesh with the podCIDRs
/// node IPAM gave them, and publish what flannel publishes.
fn the_manifest_applies_and_its_service_account_runs_an_ipv4_mesh(r: &mut Real) -> Result<()> {
    let out = &r.applied;
    for object in [
        "namespace/kube-overlay",
        "serviceaccount/overlay",
        "clusterrole.rbac.authorization.k8s.io/overlay",
        "daemonset.apps/overlay",
    ] {
        ensure!(out.contains(object), "{object} not applied:\n{out}");
    }
    r.nodes(IPV4, 3, 1)?;
    r.mesh(Duration::from_secs(10))?;
    for (i, node) in r.c.nodes.iter().enumerate() {
        let json = r.node_json(i)?;
        let cidr = json["spec"]["podCIDR"].as_str().context("podCIDR")?;
        let env = node.subnet_env()?;
        ensure!(
            env.subnet.map(|s| s.trunc().to_string()).as_deref() == Some(cidr),
            "subnet.env {env:?} against the podCIDR {cidr}"
        );
        let annotations = &json["metadata"]["annotations"];
        let a = |k: &str| annotations[format!("{PREFIX}/{k}")].as_str().unwrap_or_default().to_string();
        ensure!(a("backend-type") == "vxlan", "{annotations}");
        ensure!(a("public-ip") == node.ip.to_string(), "{annotations}");
        ensure!(a("kube-subnet-manager") == "true", "{annotations}");
        let data: Value = serde_json::from_str(&a("backend-data"))?;
        ensure!(data["VNI"] == 1 && data["VtepMAC"].as_str() == Some(node.vtep_mac()?.as_str()), "{annotations}");
        let conditions = json["status"]["conditions"].as_array().context("conditions")?;
        let unavailable =
            conditions.iter().find(|c| c["type"] == "NetworkUnavailable").context("NetworkUnavailable")?;
        ensure!(unavailable["status"] == "False", "{unavailable}");
        // Written by overlayd's field manager, through nodes/status only.
        let managers: Vec<&str> = json["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["manager"] == "overlayd")
            .filter_map(|m| m["subresource"].as_str())
            .collect();
        ensure!(
            !managers.is_empty() && managers.iter().all(|s| *s == "status"),
            "{managers:?}: {}",
            json["metadata"]["managedFields"]
        );
    }
    r.clear();
    Ok(())
}

/// The least privilege works: a ClusterRole without one of its rules (list
/// and watch on pods) is refused by the real authorizer in a way `/readyz`
/// names, and the full role makes the node ready again without a restart.
fn a_role_missing_a_rule_is_refused_and_readyz_names_it(r: &mut Real) -> Result<()> {
    let role: Value = r.cp.get(&["clusterrole", "overlay"])?;
    let mut narrowed = role.clone();
    let rules = narrowed["rules"].as_array_mut().context("rules")?;
    for rule in rules.iter_mut() {
        if let Some(resources) = rule["resources"].as_array_mut() {
            resources.retain(|res| res != "pods");
        }
    }
    rules.retain(|rule| rule["resources"].as_array().is_some_and(|r| !r.is_empty()));
    strip(&mut narrowed);
    r.cp.kubectl_input(&["replace", "-f", "-"], &narrowed.to_string())?;
    r.nodes(IPV4, 1, 0).or_else(|e| if e.to_string().contains("not ready") { Ok(()) } else { Err(e) })?;
    ensure!(
        wait_until(Duration::from_secs(20), || {
            let (code, body) = r.readyz(0);
            code == 503 && body.contains("network_policy=false")
        }),
        "readyz: {:?}\n{}",
        r.readyz(0),
        r.c.nodes[0].log_text()
    );
    let log = r.c.nodes[0].log_text();
    ensure!(log.contains("watching pods is refused") && log.contains("ClusterRole must grant"), "{log}");
    let mut full = role;
    strip(&mut full);
    r.cp.kubectl_input(&["replace", "-f", "-"], &full.to_string())?;
    ensure!(
        wait_until(Duration::from_secs(30), || r.readyz(0).0 == 200),
        "readyz after the role is whole again: {:?}\n{}",
        r.readyz(0),
        r.c.nodes[0].log_text()
    );
    r.clear();
    Ok(())
}

/// An object as it can be sent back: without its server-set metadata.
fn strip(object: &mut Value) {
    if let Some(meta) = object["metadata"].as_object_mut() {
        for field in ["resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"] {
            meta.remove(field);
        }
    }
}

/// Dual stack: node IPAM gives each node a podCIDR per family, and pods reach each other in both.
fn a_dual_stack_mesh_with_podcidrs_from_node_ipam(r: &mut Real) -> Result<()> {
    r.nodes(DUAL_STACK_CONFIG, 3, 1)?;
    r.mesh(Duration::from_secs(10))?;
    for i in 0..r.c.nodes.len() {
        let json = r.node_json(i)?;
        let cidrs = json["spec"]["podCIDRs"].as_array().context("podCIDRs")?;
        ensure!(cidrs.len() == 2, "{cidrs:?}");
        let annotations = &json["metadata"]["annotations"];
        ensure!(
            annotations[format!("{PREFIX}/public-ipv6")].as_str() == Some(&r.c.nodes[i].ip6.to_string()),
            "{annotations}"
        );
    }
    r.clear();
    Ok(())
}

/// IPv6-only: node IPAM hands out IPv6 podCIDRs only.
fn an_ipv6_only_mesh_with_podcidrs_from_node_ipam(r: &mut Real) -> Result<()> {
    r.nodes(IPV6_ONLY, 3, 1)?;
    r.mesh(Duration::from_secs(10))?;
    let env = std::fs::read_to_string(&r.c.nodes[0].subnet_file)?;
    ensure!(!env.contains("FLANNEL_NETWORK=") && env.contains("FLANNEL_IPV6_SUBNET="), "{env}");
    r.clear();
    Ok(())
}

/// The API server restarted, then etcd restarted, while every pod pings
/// every other every 10 ms: not one ping is lost, and the watches resume
/// (a Node added afterwards is programmed on every node).
fn apiserver_and_etcd_restarts_lose_no_packet_and_watches_resume(r: &mut Real) -> Result<()> {
    r.nodes(IPV4, 2, 1)?;
    r.mesh(Duration::from_secs(10))?;
    let count = 1500;
    let runs: Vec<(usize, PingRun)> =
        r.c.pods()
            .iter()
            .map(|(i, p)| {
                let to = r.c.pods().into_iter().find(|(j, _)| j != i).map(|(_, q)| q.ip).unwrap();
                Ok((*i, PingRun::start(&p.ns, to, count, "0.01")?))
            })
            .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(500));
    r.cp.restart_apiserver()?;
    r.cp.restart_etcd()?;
    for (i, run) in runs {
        let (sent, received) = run.finish()?;
        ensure!(sent == received, "node {} lost {} of {sent} pings", i + 1, sent - received);
    }
    // The watches are back: a third node is a peer of the first two.
    r.cp.wait_ready_after_restart()?;
    let i = r.c.add_ready_real_kube_node(&r.cp, &["--health-addr", HEALTH], 1)?;
    let subnet = r.c.nodes[i].subnet()?;
    for node in &r.c.nodes[..2] {
        ensure!(
            wait_until(Duration::from_secs(30), || node.routes().contains(&subnet.to_string())),
            "{} never saw the new node:\n{}",
            node.name,
            node.log_text()
        );
    }
    r.clear();
    Ok(())
}

/// etcd compacted and the API server's watch cache restarted: the daemon's
/// watch from an old resourceVersion is answered 410, and it lists again (its real relist path).
fn after_compaction_and_a_watch_cache_restart_the_daemon_lists_again(r: &mut Real) -> Result<()> {
    r.nodes(IPV4, 2, 0)?;
    let listed = |r: &Real| r.c.nodes[0].log_text().matches("the watch's history is gone; listing again").count();
    let before = listed(r);
    r.cp.stop_apiserver();
    // Write and compact past the daemon's resourceVersion while the server is down.
    for k in 0..20 {
        r.cp.etcd_ctl(&["put", &format!("/overlay-test/churn/{k}"), "x"])?;
    }
    let status = r.cp.etcd_ctl(&["endpoint", "status", "--write-out=json"])?;
    let revision =
        serde_json::from_str::<Value>(&status)?[0]["Status"]["header"]["revision"].as_i64().context("revision")?;
    r.cp.etcd_ctl(&["compact", &revision.to_string()])?;
    r.cp.start_apiserver_again()?;
    ensure!(wait_until(Duration::from_secs(60), || listed(r) > before), "no relist:\n{}", r.c.nodes[0].log_text());
    r.clear();
    Ok(())
}

/// A good API citizen, counted from the audit log while three nodes start
/// and then idle for a minute: every list is served from the watch cache
/// (resourceVersion=0) or paged, writes go through nodes/status only, and
/// every request says who it is.
fn api_citizenship_counted_from_the_audit_log(r: &mut Real) -> Result<()> {
    let skip = r.cp.audit_events()?.len();
    // Lists the API server sends on to etcd (quorum reads), of what overlayd lists.
    let etcd_lists = |r: &Real| -> Result<f64> {
        let metrics = r.cp.kubectl(&["get", "--raw", "/metrics"])?;
        Ok(["nodes", "pods", "namespaces", "networkpolicies"]
            .iter()
            .map(|res| {
                let resource = format!("resource=\"{res}\"");
                // listWithCount (a list read from etcd) or listStream (the watch cache filling itself).
                control_plane::metric_sum(&metrics, "etcd_requests_total", &["operation=\"list", &resource])
            })
            .sum())
    };
    let etcd_lists_before = etcd_lists(r)?;
    // The watch caches filled themselves from etcd once each when the server started: the count is real.
    ensure!(
        etcd_lists_before >= 4.0,
        "no etcd list counted at all ({etcd_lists_before}): the metric is not what it was"
    );
    let started = Instant::now();
    r.nodes(IPV4, 3, 0)?;
    let start_took = started.elapsed();
    let at_start = r.cp.audit_events()?.len();
    std::thread::sleep(Duration::from_secs(60));
    let events = r.cp.audit_events()?;
    let ours = |e: &&Value| e["user"]["username"] == "system:serviceaccount:kube-overlay:overlay";
    let start: Vec<&Value> = events[skip..at_start].iter().filter(ours).collect();
    let idle: Vec<&Value> = events[at_start..].iter().filter(ours).collect();
    let mut report = String::new();
    for e in start.iter().chain(&idle) {
        let verb = e["verb"].as_str().unwrap_or_default();
        let uri = e["requestURI"].as_str().unwrap_or_default();
        let agent = e["userAgent"].as_str().unwrap_or_default();
        ensure!(agent.starts_with("overlayd/"), "no User-Agent of ours: {e}");
        if verb == "list" {
            // From the watch cache (resourceVersion=0), or in pages (limit) where it answers whole.
            ensure!(
                uri.contains("resourceVersion=0") || uri.contains("limit="),
                "a list that may be a quorum read: {uri}"
            );
        }
        if matches!(verb, "create" | "update" | "patch" | "delete") {
            ensure!(uri.contains("/status"), "a write outside nodes/status: {verb} {uri}");
        }
        report += &format!("{verb} {uri}\n");
    }
    let per_node_start = start.len() as f64 / 3.0;
    let per_node_minute = idle.len() as f64 / 3.0 / (started.elapsed() - start_took).as_secs_f64() * 60.0;
    eprintln!(
        "citizenship: {per_node_start:.1} requests per node at start ({:.1} s), {per_node_minute:.1} per node per idle minute (watches included)",
        start_took.as_secs_f64()
    );
    ensure!(per_node_minute < 10.0, "{per_node_minute:.1} requests a minute per idle node:\n{report}");
    let quorum_lists = etcd_lists(r)? - etcd_lists_before;
    eprintln!("citizenship: {quorum_lists} lists of nodes, pods, namespaces or networkpolicies went on to etcd");
    ensure!(quorum_lists == 0.0, "{quorum_lists} lists were quorum reads of etcd:\n{report}");
    r.clear();
    Ok(())
}

/// The NetworkPolicy truth table (44 cases and the dynamic ones, both
/// families), its policies written with kubectl to the real API server.
/// A policy the server's validation refuses never reaches the daemons.
fn the_network_policy_truth_table_on_the_real_api_server(r: &mut Real) -> Result<()> {
    r.nodes(DUAL_STACK_CONFIG, 3, 3)?;
    let api = control_plane::KubectlApi(&r.cp);
    let t = truth_table::Table::new(&r.c.nodes, &api)?;
    truth_table::run(&t);
    // Refused at admission, before overlayd could see it: a CIDR that is not one, a port out of range.
    for (spec, says) in [
        (
            r#"{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/33"}}]}]}"#,
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (r#"{"podSelector":{},"ingress":[{"ports":[{"port":70000}]}]}"#, "spec.ingress[0].ports[0].port"),
        (r#"{"podSelector":{"matchLabels":{"pod":"a b"}}}"#, "spec.podSelector"),
    ] {
        let object = format!(
            r#"{{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{{"name":"bad","namespace":"x"}},"spec":{spec}}}"#
        );
        let out = r.cp.kubectl_output(&r.cp.admin_kubeconfig(), &["apply", "-f", "-"], Some(&object))?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && said.contains("Invalid value") && said.contains(says), "{spec}: {said}");
    }

    // ClusterNetworkPolicy: its CRD applied from deploy/ while the daemons run; they find it within their
    // minute's poll and enforce it with no restart.
    r.cp.apply_cluster_policy_crd()?;
    let crds = overlay_tests::manifests::deploy_dir().join("cluster-network-policy-crds.yaml");
    let found = wait_until(Duration::from_secs(75), || {
        r.c.nodes.iter().all(|n| n.log_text().contains("enforcing ClusterNetworkPolicy"))
    });
    ensure!(found, "the daemons did not find the CRD:\n{}", r.c.nodes[0].log_text());
    truth_table::run_cluster(&t);
    // Refused at admission by the CRD's validation: a priority out of range, an unknown action.
    for (spec, says) in [
        (r#"{"tier":"Admin","priority":1001,"subject":{"namespaces":{}}}"#, "spec.priority"),
        (
            r#"{"tier":"Admin","priority":1,"subject":{"namespaces":{}},"ingress":[{"action":"Log","from":[{"namespaces":{}}]}]}"#,
            "spec.ingress[0].action",
        ),
    ] {
        let object = format!(
            r#"{{"apiVersion":"policy.networking.k8s.io/v1alpha2","kind":"ClusterNetworkPolicy","metadata":{{"name":"bad"}},"spec":{spec}}}"#
        );
        let out = r.cp.kubectl_output(&r.cp.admin_kubeconfig(), &["apply", "-f", "-"], Some(&object))?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && said.contains(says), "{spec}: {said}");
    }
    r.cp.kubectl(&["delete", "-f", &crds.display().to_string(), "--wait=true"])?;
    drop(t);
    for ns in ["x", "y", "z"] {
        r.cp.kubectl(&["delete", "namespace", ns, "--wait=false"])?;
    }
    r.clear();
    Ok(())
}

const SCENARIOS: &[(&str, Scenario<Real>)] = &[
    (
        "the_manifest_applies_and_its_service_account_runs_an_ipv4_mesh",
        the_manifest_applies_and_its_service_account_runs_an_ipv4_mesh,
    ),
    ("a_role_missing_a_rule_is_refused_and_readyz_names_it", a_role_missing_a_rule_is_refused_and_readyz_names_it),
    ("a_dual_stack_mesh_with_podcidrs_from_node_ipam", a_dual_stack_mesh_with_podcidrs_from_node_ipam),
    ("an_ipv6_only_mesh_with_podcidrs_from_node_ipam", an_ipv6_only_mesh_with_podcidrs_from_node_ipam),
    (
        "apiserver_and_etcd_restarts_lose_no_packet_and_watches_resume",
        apiserver_and_etcd_restarts_lose_no_packet_and_watches_resume,
    ),
    (
        "after_compaction_and_a_watch_cache_restart_the_daemon_lists_again",
        after_compaction_and_a_watch_cache_restart_the_daemon_lists_again,
    ),
    ("api_citizenship_counted_from_the_audit_log", api_citizenship_counted_from_the_audit_log),
    ("the_network_policy_truth_table_on_the_real_api_server", the_network_policy_truth_table_on_the_real_api_server),
];

fn main() -> ExitCode {
    let missing = if !overlay_tests::is_root() {
        Some("needs root (network namespaces): run by `make test`".to_string())
    } else if !control_plane::built() {
        Some(format!("needs the Kubernetes {} binaries: `make k8s`", control_plane::RELEASE))
    } else {
        None
    };
    let run = scenarios::Run { name: "kube_real", missing, start: Real::start, clear: Real::clear };
    scenarios::main(run, SCENARIOS)
}
