//! overlay on real nodes: three nodes, dual stack, each with containerd,
//! runc, a kubelet and kube-proxy (nftables mode) of the control plane's
//! release (`tests/src/real_node.rs`), on the real control plane of
//! `kube_real`. overlay is installed as a user installs it, `kubectl apply
//! -f deploy/overlay.yaml` (its net-conf edited for dual stack, as the
//! manifest's comment says), from the image `make image` builds; the
//! DaemonSet's pods run on the real kubelets, and every pod of the
//! scenarios is made by a kubelet through containerd and overlay-cni.
//!
//! The setup (control plane, nodes, install) is made once; the scenarios
//! run on it in order (`overlay_tests::scenarios`).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ipnet::IpNet;
use overlay_tests::cluster::{ClusterOptions, DUAL_STACK_CONFIG, ETCD_IP};
use overlay_tests::control_plane::{self, ControlPlane};
use overlay_tests::podman::Podman;
use overlay_tests::real_node::{self, RealNode};
use overlay_tests::scenarios::{self, Scenario};
use overlay_tests::{workspace_bin, Cluster};
use serde_json::json;

/// The namespace of the scenarios' own pods.
const NS: &str = "net";
/// agnhost's netexec answers HTTP here (`/hostname`, `/clientip`).
const NETEXEC_PORT: u16 = 8080;

struct Nodes {
    // Dropped in this order: the nodes' processes, then the control plane, then the namespaces.
    real: Vec<RealNode>,
    cp: ControlPlane,
    /// Held for its Drop: the namespaces go last.
    _c: Cluster,
    /// The Ready condition's message of each node before overlay was installed.
    before_install: Vec<(String, String)>,
    /// How long the install took, from `kubectl apply` to every node Ready.
    install_took: Duration,
    /// The agnhost image's name.
    agnhost: String,
}

impl Nodes {
    fn start() -> Result<Nodes> {
        let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() })?;
        let cidrs: Vec<IpNet> = ["10.244.0.0/16", "fd00:10:244::/56"].iter().map(|c| c.parse().unwrap()).collect();
        let cp = ControlPlane::start(&c.underlay, ETCD_IP.parse()?, &c.dir.join("k8s"), &cidrs)?;
        let image = overlay_image(&mut c)?;
        let agnhost = real_node::release_images()?
            .into_iter()
            .map(|(_, name)| name)
            .find(|n| n.contains("/agnhost:"))
            .context("no agnhost image")?;
        let mut real = Vec::new();
        for _ in 0..3 {
            let i = c.add_node(&[])?;
            let cluster_cidrs = "10.244.0.0/16,fd00:10:244::/56";
            real.push(RealNode::start(&cp, &c.nodes[i], &c.dir, cluster_cidrs, std::slice::from_ref(&image))?);
        }
        let mut nodes = Nodes { real, cp, _c: c, before_install: Vec::new(), install_took: Duration::ZERO, agnhost };
        // Registered by its kubelet, and NotReady: no CNI config yet.
        for r in &nodes.real {
            let state = wait_some(Duration::from_secs(60), || real_node::node_ready(&nodes.cp, &r.name))
                .with_context(|| format!("{} never registered:\n{}", r.name, r.log_tail("kubelet")))?;
            nodes.before_install.push(state);
        }
        let started = Instant::now();
        nodes.install()?;
        for r in &nodes.real {
            let ready = wait_some(Duration::from_secs(120), || {
                real_node::node_ready(&nodes.cp, &r.name).filter(|(s, _)| s == "True")
            });
            if ready.is_none() {
                bail!(
                    "{} not Ready after the install:\n{}\n{}",
                    r.name,
                    r.log_tail("kubelet"),
                    nodes.cp.kubectl(&["get", "pods", "-A", "-o", "wide"]).unwrap_or_default()
                );
            }
        }
        nodes.install_took = started.elapsed();
        eprintln!("install: every node Ready {:.1} s after kubectl apply", nodes.install_took.as_secs_f64());
        Ok(nodes)
    }

    /// `kubectl apply -f deploy/overlay.yaml`, its net-conf.json made dual stack as a user edits it.
    fn install(&self) -> Result<()> {
        let mut docs = overlay_tests::manifests::load(&overlay_tests::manifests::deploy_dir().join("overlay.yaml"))?;
        let config_map = docs.iter_mut().find(|d| d["kind"] == "ConfigMap").context("no ConfigMap")?;
        config_map["data"]["net-conf.json"] = DUAL_STACK_CONFIG.into();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        self.cp.kubectl_input(&["apply", "--validate=strict", "-f", "-"], &list.to_string())?;
        Ok(())
    }

    fn clear(&mut self) {
        let _ = self.cp.kubectl(&["delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=60s"]);
    }

    /// A pod of agnhost `args` on node `node`, in [`NS`]; waits until it runs, gives its IPs.
    fn pod(&self, name: &str, node: &str, args: &[&str]) -> Result<Vec<IpAddr>> {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": "netexec"}},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "agnhost", "image": self.agnhost, "args": args,
                                "ports": [{"containerPort": NETEXEC_PORT}]}],
            },
        });
        self.cp.kubectl_input(&["apply", "-f", "-"], &pod.to_string())?;
        let running = wait_some(Duration::from_secs(60), || {
            let p = self.cp.get(&["pod", name, "-n", NS]).ok()?;
            (p["status"]["phase"] == "Running").then_some(p)
        });
        let Some(p) = running else {
            bail!(
                "pod {name} on {node} not running: {}\n{}",
                self.cp.kubectl(&["describe", "pod", name, "-n", NS]).unwrap_or_default(),
                self.real.iter().find(|r| r.name == node).map(|r| r.log_tail("kubelet")).unwrap_or_default()
            );
        };
        Ok(p["status"]["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["ip"].as_str()?.parse().ok())
            .collect())
    }

    /// `kubectl exec` in `pod`: fetches `http://<to>:<port><path>` with busybox's wget.
    fn fetch(&self, pod: &str, to: IpAddr, port: u16, path: &str) -> Result<String> {
        let host = match to {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let url = format!("http://{host}:{port}{path}");
        // busybox 1.35's wget (Debian's static build) crashes on its own -T: timeout(1) bounds it instead.
        self.cp.kubectl(&["exec", "-n", NS, pod, "--", "timeout", "5", "wget", "-q", "-O", "-", &url])
    }
}

fn wait_some<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The image `make image` builds (deploy/build-image), from the binaries
/// under test, written as an archive containerd imports.
fn overlay_image(c: &mut Cluster) -> Result<PathBuf> {
    let pod = overlay_tests::daemonset::DaemonSetPod::from_manifest()?;
    let tag = pod.image()?;
    // A podman of its own builds it, on a node that is then taken away again.
    let i = c.add_node(&[])?;
    let bin_dir = workspace_bin("overlayd").parent().context("bin dir")?.to_path_buf();
    let archive = c.dir.join("overlay-image.tar");
    {
        let podman = Podman::for_node(&c.nodes[i], &c.dir, &bin_dir)?;
        podman.build_image(&bin_dir, &tag)?;
        podman.save_image(&tag, &archive)?;
    }
    c.nodes.remove(i);
    Ok(archive)
}

/// Before overlay is installed each kubelet registers its Node NotReady,
/// because the runtime has no network config; `kubectl apply` of the
/// manifest runs the DaemonSet on every node, its init container installs
/// the conflist where containerd reads it, and the Nodes become Ready, with
/// NetworkUnavailable False, which overlayd writes.
fn nodes_are_ready_only_once_overlay_installs_its_cni_config(n: &mut Nodes) -> Result<()> {
    for ((status, message), r) in n.before_install.iter().zip(&n.real) {
        ensure!(status == "False", "{} was {status} before overlay was installed: {message}", r.name);
        ensure!(
            message.to_lowercase().contains("network") || message.to_lowercase().contains("cni"),
            "{} NotReady for another reason than its network: {message}",
            r.name
        );
    }
    for r in &n.real {
        let configs = r.cni_configs()?;
        ensure!(configs.iter().any(|f| f == "10-overlay.conflist"), "{}: /etc/cni/net.d holds {configs:?}", r.name);
        // overlayd writes it once it holds its lease: a moment after the init container installed the conflist.
        let node = wait_some(Duration::from_secs(30), || {
            let node = n.cp.get(&["node", &r.name]).ok()?;
            let conditions = node["status"]["conditions"].as_array()?;
            conditions.iter().any(|c| c["type"] == "NetworkUnavailable" && c["status"] == "False").then_some(node)
        })
        .with_context(|| format!("{}: NetworkUnavailable never False", r.name))?;
        ensure!(node["spec"]["podCIDRs"].as_array().is_some_and(|c| c.len() == 2), "{}: {}", r.name, node["spec"]);
    }
    // Ready once its readiness probe (every 5 s) found /readyz answering.
    let ready = |n: &Nodes| -> Option<usize> {
        let ds = n.cp.get(&["daemonset", "overlay", "-n", "kube-overlay"]).ok()?;
        ds["status"]["numberReady"].as_u64().map(|r| r as usize)
    };
    let on = wait_some(Duration::from_secs(30), || ready(n).filter(|r| *r == n.real.len())).or_else(|| ready(n));
    ensure!(on == Some(n.real.len()), "overlay pods ready on {on:?} of {} nodes", n.real.len());
    eprintln!("install took {:.1} s", n.install_took.as_secs_f64());
    Ok(())
}

/// Pods a kubelet made, one per node, reach each other across nodes in both
/// families: each fetches every other's `/hostname` and gets that pod's name,
/// and each pod's addresses lie in its node's podCIDRs.
fn pods_made_by_kubelets_reach_each_other_across_nodes_in_both_families(n: &mut Nodes) -> Result<()> {
    n.cp.kubectl(&["create", "namespace", NS])?;
    let port = NETEXEC_PORT.to_string();
    let mut pods = Vec::new();
    for r in &n.real {
        let name = format!("web-{}", r.name);
        let ips = n.pod(&name, &r.name, &["netexec", &format!("--http-port={port}")])?;
        let node = n.cp.get(&["node", &r.name])?;
        let cidrs: Vec<IpNet> = node["spec"]["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str()?.parse().ok())
            .collect();
        ensure!(ips.len() == 2, "{name} has {ips:?}, not one address per family");
        for ip in &ips {
            ensure!(cidrs.iter().any(|c| c.contains(ip)), "{name}'s {ip} is outside {}'s {cidrs:?}", r.name);
        }
        pods.push((name, ips));
    }
    for (from, _) in &pods {
        for (to, ips) in &pods {
            if from == to {
                continue;
            }
            for ip in ips {
                let answer =
                    n.fetch(from, *ip, NETEXEC_PORT, "/hostname").with_context(|| format!("{from} → {to} at {ip}"))?;
                ensure!(answer.trim() == to, "{from} fetched {ip} and {answer:?} answered, not {to}");
            }
        }
    }
    Ok(())
}

/// A ClusterIP Service (both families) in front of those pods: kube-proxy's
/// DNAT sends a pod's connections to pods on every node, over overlay.
fn a_cluster_ip_service_reaches_pods_on_every_node(n: &mut Nodes) -> Result<()> {
    if n.cp.get(&["namespace", NS]).is_err() {
        pods_made_by_kubelets_reach_each_other_across_nodes_in_both_families(n)?;
    }
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "netexec"}, "ipFamilyPolicy": "RequireDualStack",
                 "ports": [{"port": 80, "targetPort": NETEXEC_PORT, "protocol": "TCP"}]},
    });
    n.cp.kubectl_input(&["apply", "-f", "-"], &service.to_string())?;
    let svc = n.cp.get(&["service", "web", "-n", NS])?;
    let cluster_ips: Vec<IpAddr> =
        svc["spec"]["clusterIPs"].as_array().into_iter().flatten().filter_map(|ip| ip.as_str()?.parse().ok()).collect();
    ensure!(cluster_ips.len() == 2, "{svc}");
    let from = format!("web-{}", n.real[0].name);
    let all: BTreeSet<String> = n.real.iter().map(|r| format!("web-{}", r.name)).collect();
    for ip in cluster_ips {
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen != all {
            if Instant::now() > deadline {
                bail!("through {ip} {from} reached only {seen:?}:\n{}", n.real[0].log_tail("kube-proxy"));
            }
            if let Ok(name) = n.fetch(&from, ip, 80, "/hostname") {
                seen.insert(name.trim().to_string());
            }
        }
    }
    Ok(())
}

const SCENARIOS: &[(&str, Scenario<Nodes>)] = &[
    (
        "nodes_are_ready_only_once_overlay_installs_its_cni_config",
        nodes_are_ready_only_once_overlay_installs_its_cni_config,
    ),
    (
        "pods_made_by_kubelets_reach_each_other_across_nodes_in_both_families",
        pods_made_by_kubelets_reach_each_other_across_nodes_in_both_families,
    ),
    ("a_cluster_ip_service_reaches_pods_on_every_node", a_cluster_ip_service_reaches_pods_on_every_node),
];

fn main() -> ExitCode {
    let missing = if !overlay_tests::is_root() {
        Some("needs root (network namespaces, cgroups, containerd): run by `make test`".to_string())
    } else if !control_plane::built() || real_node::release_images().is_err() {
        Some(format!("needs the Kubernetes {} binaries and images: `make k8s`", control_plane::RELEASE))
    } else {
        None
    };
    let run = scenarios::Run { name: "kube_nodes", missing, start: Nodes::start, clear: Nodes::clear };
    scenarios::main(run, SCENARIOS)
}
