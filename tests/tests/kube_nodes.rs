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
use std::os::unix::process::CommandExt;
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
use overlay_tests::{tail_of, workspace_bin, Cluster};
use serde_json::{json, Value};

/// The namespace of the scenarios' own pods.
const NS: &str = "net";
/// agnhost's netexec answers HTTP here (`/hostname`, `/clientip`).
const NETEXEC_PORT: u16 = 8080;

struct Nodes {
    // Dropped in this order: the nodes' processes, then the control plane, then the namespaces.
    real: Vec<RealNode>,
    cp: ControlPlane,
    /// The namespaces (underlay, nodes); dropped last.
    c: Cluster,
    /// The Ready condition's message of each node before overlay was installed.
    before_install: Vec<(String, String)>,
    /// How long the install took, from `kubectl apply` to every node Ready.
    install_took: Duration,
    /// The agnhost image's name.
    agnhost: String,
    /// Dual stack (the default), or IPv4 alone (`OVERLAY_FAMILIES=ipv4`).
    dual: bool,
}

impl Nodes {
    fn start() -> Result<Nodes> {
        let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() })?;
        let dual = dual_stack();
        let cluster_cidrs = if dual { "10.244.0.0/16,fd00:10:244::/56" } else { "10.244.0.0/16" };
        let cidrs: Vec<IpNet> = cluster_cidrs.split(',').map(|c| c.parse().unwrap()).collect();
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
            real.push(RealNode::start(&cp, &c.nodes[i], &c.dir, cluster_cidrs, std::slice::from_ref(&image))?);
        }
        // The API server's host is not a node here (a control-plane host usually is, with the pod network on
        // it): it reaches pods (the `pods/proxy` the e2e suite reads results through) by way of the first node.
        let (first, first6) = (c.nodes[0].ip.to_string(), c.nodes[0].ip6.to_string());
        c.underlay.ip(&["route", "add", "10.244.0.0/16", "via", &first])?;
        if dual {
            c.underlay.ip(&["-6", "route", "add", "fd00:10:244::/56", "via", &first6])?;
        }
        let before_install = Vec::new();
        let mut nodes = Nodes { real, cp, c, before_install, install_took: Duration::ZERO, agnhost, dual };
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
        // Then the cluster's DNS, as a cluster gets it: the release's own CoreDNS addon.
        let started = Instant::now();
        let coredns = real_node::release_images_dir()?.join("coredns.yaml");
        nodes.cp.kubectl(&["apply", "-f", &coredns.display().to_string()])?;
        // Its Deployment (one replica, maxUnavailable 1) says Available at once: wait for a ready pod instead.
        let ready = wait_some(Duration::from_secs(90), || {
            let d = nodes.cp.get(&["deployment", "coredns", "-n", "kube-system"]).ok()?;
            let want = d["spec"]["replicas"].as_u64()?;
            (want > 0 && d["status"]["readyReplicas"].as_u64() == Some(want)).then_some(())
        });
        if ready.is_none() {
            bail!(
                "CoreDNS not ready 90 s after kubectl apply:\n{}",
                nodes.cp.kubectl(&["describe", "pods", "-n", "kube-system"]).unwrap_or_default()
            );
        }
        eprintln!("CoreDNS ready {:.1} s after kubectl apply", started.elapsed().as_secs_f64());
        Ok(nodes)
    }

    /// `kubectl apply -f deploy/overlay.yaml`, its net-conf.json made dual stack as a user edits it (or as it
    /// is, IPv4, for a single-stack cluster).
    fn install(&self) -> Result<()> {
        let mut docs = overlay_tests::manifests::load(&overlay_tests::manifests::deploy_dir().join("overlay.yaml"))?;
        let config_map = docs.iter_mut().find(|d| d["kind"] == "ConfigMap").context("no ConfigMap")?;
        if self.dual {
            config_map["data"]["net-conf.json"] = DUAL_STACK_CONFIG.into();
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        self.cp.kubectl_input(&["apply", "--validate=strict", "-f", "-"], &list.to_string())?;
        Ok(())
    }

    /// How many address families the pods have.
    fn families(&self) -> usize {
        if self.dual {
            2
        } else {
            1
        }
    }

    fn clear(&mut self) {
        let _ = self.cp.kubectl(&["delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=60s"]);
    }

    /// A pod of agnhost `args` on node `node`, in [`NS`], labelled `labels`; waits until it runs, gives its IPs.
    fn pod(&self, name: &str, node: &str, args: &[&str]) -> Result<Vec<IpAddr>> {
        self.labelled_pod(name, node, args, json!({"app": "netexec"}))
    }

    fn labelled_pod(&self, name: &str, node: &str, args: &[&str], labels: Value) -> Result<Vec<IpAddr>> {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "agnhost", "image": self.agnhost, "args": args,
                                "ports": [{"containerPort": NETEXEC_PORT}]}],
            },
        });
        self.cp.kubectl_input(&["apply", "-f", "-"], &pod.to_string())?;
        let p = self.wait_phase(name, node, &["Running"], Duration::from_secs(60))?;
        Ok(pod_ips(&p))
    }

    /// Waits until pod `name` (on `node`) is in one of `phases`; gives the pod.
    fn wait_phase(&self, name: &str, node: &str, phases: &[&str], timeout: Duration) -> Result<Value> {
        let found = wait_some(timeout, || {
            let p = self.cp.get(&["pod", name, "-n", NS]).ok()?;
            phases.iter().any(|phase| p["status"]["phase"] == *phase).then_some(p)
        });
        found.with_context(|| {
            format!(
                "pod {name} on {node} not {phases:?} after {timeout:?}: {}\n{}",
                self.cp.kubectl(&["describe", "pod", name, "-n", NS]).unwrap_or_default(),
                self.real.iter().find(|r| r.name == node).map(|r| r.log_tail("kubelet")).unwrap_or_default()
            )
        })
    }

    /// Starts a pod on `node` that pings each of `targets` every 10 ms, `count` times, from a container of
    /// its own per target (busybox's ping); [`ping_losses`](Self::ping_losses) reads what they saw.
    fn start_pinger(&self, name: &str, node: &str, targets: &[IpAddr], count: u32) -> Result<()> {
        let image = self.agnhost.clone();
        let containers: Vec<Value> = targets
            .iter()
            .enumerate()
            .map(|(i, to)| {
                json!({"name": format!("ping{i}"), "image": image, "command": ["ping"],
                       "args": ["-q", "-i", "0.01", "-c", count.to_string(), "-W", "5", to.to_string()]})
            })
            .collect();
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": node, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "containers": containers},
        });
        self.cp.kubectl_input(&["apply", "-f", "-"], &pod.to_string())?;
        self.wait_phase(name, node, &["Running"], Duration::from_secs(60))?;
        Ok(())
    }

    /// Waits for pinger `name` to end; gives (target, sent, lost) for each of its containers.
    fn ping_losses(&self, name: &str, node: &str, timeout: Duration) -> Result<Vec<(String, u32, u32)>> {
        let p = self.wait_phase(name, node, &["Succeeded", "Failed"], timeout)?;
        let mut out = Vec::new();
        for c in p["spec"]["containers"].as_array().into_iter().flatten() {
            let container = c["name"].as_str().unwrap_or_default();
            let target = c["args"].as_array().and_then(|a| a.last()).and_then(Value::as_str).unwrap_or_default();
            let log = self.cp.kubectl(&["logs", "-n", NS, name, "-c", container])?;
            // busybox: "3000 packets transmitted, 3000 packets received, 0% packet loss"
            let counts: Vec<u32> = log
                .lines()
                .find(|l| l.contains("packets transmitted"))
                .map(|l| l.split(',').filter_map(|part| part.split_whitespace().next()?.parse().ok()).collect())
                .unwrap_or_default();
            let [sent, received, ..] = counts[..] else { bail!("{name}/{container} said no summary:\n{log}") };
            out.push((target.to_string(), sent, sent - received));
        }
        Ok(out)
    }

    /// `kubectl exec` in `pod`: fetches `http://<to>:<port><path>` with busybox's wget, within 5 s.
    fn fetch(&self, pod: &str, to: IpAddr, port: u16, path: &str) -> Result<String> {
        self.fetch_within(pod, to, port, path, 5)
    }

    fn fetch_within(&self, pod: &str, to: IpAddr, port: u16, path: &str, seconds: u32) -> Result<String> {
        let host = match to {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let url = format!("http://{host}:{port}{path}");
        // busybox 1.35's wget (Debian's static build) crashes on its own -T: timeout(1) bounds it instead.
        let seconds = seconds.to_string();
        self.cp.kubectl(&["exec", "-n", NS, pod, "--", "timeout", &seconds, "wget", "-q", "-O", "-", &url])
    }
}

/// Whether the run is dual stack (the default) or IPv4 alone (`OVERLAY_FAMILIES=ipv4`).
fn dual_stack() -> bool {
    !std::env::var("OVERLAY_FAMILIES").is_ok_and(|v| v == "ipv4")
}

/// A pod's addresses, from its status.
fn pod_ips(p: &Value) -> Vec<IpAddr> {
    p["status"]["podIPs"].as_array().into_iter().flatten().filter_map(|ip| ip["ip"].as_str()?.parse().ok()).collect()
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
        let want = n.families();
        ensure!(node["spec"]["podCIDRs"].as_array().is_some_and(|c| c.len() == want), "{}: {}", r.name, node["spec"]);
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
        let cidrs = pod_cidrs(n, &r.name)?;
        ensure!(ips.len() == n.families(), "{name} has {ips:?}, not one address per family");
        for ip in &ips {
            ensure!(cidrs.iter().any(|c| c.contains(ip)), "{name}'s {ip} is outside {}'s {cidrs:?}", r.name);
        }
        // What runs in a pod sees the pod's files, not the node's: its resolver is the cluster's DNS.
        let resolv = n.cp.kubectl(&["exec", "-n", NS, &name, "--", "cat", "/etc/resolv.conf"])?;
        let want = format!("nameserver {}", real_node::CLUSTER_DNS);
        ensure!(resolv.lines().any(|l| l.trim() == want), "{name}'s /etc/resolv.conf:\n{resolv}");
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
        "spec": {"selector": {"app": "netexec"}, "ipFamilyPolicy": "PreferDualStack",
                 "ports": [{"port": 80, "targetPort": NETEXEC_PORT, "protocol": "TCP"}]},
    });
    n.cp.kubectl_input(&["apply", "-f", "-"], &service.to_string())?;
    let svc = n.cp.get(&["service", "web", "-n", NS])?;
    let cluster_ips: Vec<IpAddr> =
        svc["spec"]["clusterIPs"].as_array().into_iter().flatten().filter_map(|ip| ip.as_str()?.parse().ok()).collect();
    ensure!(cluster_ips.len() == n.families(), "{svc}");
    let from = format!("web-{}", n.real[0].name);
    let all: BTreeSet<String> = n.real.iter().map(|r| format!("web-{}", r.name)).collect();
    for ip in cluster_ips {
        reach_every_backend(n, &from, ip, &all, &n.real[0])?;
    }
    Ok(())
}

/// Pod `from` (on node `on`) fetches `/hostname` through the web Service's ClusterIP `ip` until every pod of
/// `all` has answered, within 60 s.
fn reach_every_backend(n: &Nodes, from: &str, ip: IpAddr, all: &BTreeSet<String>, on: &RealNode) -> Result<()> {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen != *all {
        if Instant::now() > deadline {
            bail!("through {ip} {from} reached only {seen:?}:\n{}", on.log_tail("kube-proxy"));
        }
        if let Ok(name) = n.fetch(from, ip, 80, "/hostname") {
            seen.insert(name.trim().to_string());
        }
    }
    Ok(())
}

/// The web pods of [`pods_made_by_kubelets_reach_each_other_across_nodes_in_both_families`], one per node
/// (made again when that scenario did not run first): (pod, its node, its addresses).
fn web_pods(n: &mut Nodes) -> Result<Vec<(String, String, Vec<IpAddr>)>> {
    if n.cp.get(&["namespace", NS]).is_err() {
        pods_made_by_kubelets_reach_each_other_across_nodes_in_both_families(n)?;
    }
    let mut out = Vec::new();
    for r in &n.real {
        let name = format!("web-{}", r.name);
        out.push((name.clone(), r.name.clone(), pod_ips(&n.cp.get(&["pod", &name, "-n", NS])?)));
    }
    Ok(out)
}

/// The web Service's ClusterIPs (both families), made when missing.
fn web_service(n: &mut Nodes) -> Result<Vec<IpAddr>> {
    if n.cp.get(&["service", "web", "-n", NS]).is_err() {
        a_cluster_ip_service_reaches_pods_on_every_node(n)?;
    }
    let svc = n.cp.get(&["service", "web", "-n", NS])?;
    Ok(svc["spec"]["clusterIPs"].as_array().into_iter().flatten().filter_map(|ip| ip.as_str()?.parse().ok()).collect())
}

/// NetworkPolicy holds behind kube-proxy's DNAT, as the upstream suite
/// probes it (through each Service's ClusterIP): with a policy that admits
/// only pods labelled `access=allowed` to the web pods, a pod so labelled
/// reaches every backend through both ClusterIPs, and a pod without the
/// label reaches none, through the Service or directly.
fn network_policy_holds_behind_a_service_cluster_ip(n: &mut Nodes) -> Result<()> {
    let webs = web_pods(n)?;
    let cluster_ips = web_service(n)?;
    let node = n.real[0].name.clone();
    n.labelled_pod("allowed", &node, &["pause"], json!({"access": "allowed"}))?;
    n.labelled_pod("denied", &node, &["pause"], json!({"access": "none"}))?;
    let policy = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-allowed", "namespace": NS},
        "spec": {"podSelector": {"matchLabels": {"app": "netexec"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"access": "allowed"}}}],
                              "ports": [{"port": NETEXEC_PORT, "protocol": "TCP"}]}]},
    });
    n.cp.kubectl_input(&["apply", "-f", "-"], &policy.to_string())?;
    let all: BTreeSet<String> = webs.iter().map(|(name, _, _)| name.clone()).collect();
    // The denied pod loses its way in once every node enforces: until then, wait.
    for (web, _, ips) in &webs {
        for ip in ips {
            let cut = wait_some(Duration::from_secs(30), || {
                n.fetch_within("denied", *ip, NETEXEC_PORT, "/hostname", 2).is_err().then_some(())
            });
            ensure!(cut.is_some(), "denied still reaches {web} at {ip} directly");
        }
    }
    for ip in &cluster_ips {
        let mut seen = BTreeSet::new();
        for _ in 0..60 {
            if let Ok(name) = n.fetch("allowed", *ip, 80, "/hostname") {
                seen.insert(name.trim().to_string());
            }
            if seen == all {
                break;
            }
        }
        ensure!(seen == all, "through {ip} the allowed pod reached only {seen:?}");
        // Each backend was checked directly above; these check the way through the ClusterIP.
        for _ in 0..6 {
            if let Ok(name) = n.fetch_within("denied", *ip, 80, "/hostname", 2) {
                bail!("the denied pod reached {} through the ClusterIP {ip}", name.trim());
            }
        }
    }
    n.cp.kubectl(&["delete", "networkpolicy", "web-from-allowed", "-n", NS])?;
    n.cp.kubectl(&["delete", "pod", "allowed", "denied", "-n", NS, "--wait=false"])?;
    Ok(())
}

/// CoreDNS, run by the release's own addon manifest on overlay, answers a
/// pod (ClusterFirst, through the kube-dns ClusterIP that kube-proxy sends
/// to a CoreDNS pod, maybe on another node) with both ClusterIPs of a
/// dual-stack Service and a pod's name; `dig` is Debian's, in agnhost.
fn dns_names_resolve_for_services_and_pods_in_both_families(n: &mut Nodes) -> Result<()> {
    let webs = web_pods(n)?;
    let cluster_ips = web_service(n)?;
    let from = &webs[0].0;
    let dig = |name: &str, kind: &str| -> Result<BTreeSet<IpAddr>> {
        let out = n
            .cp
            .kubectl(&["exec", "-n", NS, from, "--", "dig", "+short", "+search", "+time=2", "+tries=3", name, kind])?;
        Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
    };
    // CoreDNS is available as soon as its Deployment says so, but kube-proxy on the asking node
    // may program the kube-dns ClusterIP's endpoints a moment later: the answers must come within 30 s.
    let want: BTreeSet<IpAddr> = cluster_ips.iter().copied().collect();
    let services = || -> Result<BTreeSet<IpAddr>> {
        let mut got = dig("web.net.svc.cluster.local", "A")?;
        if n.dual {
            got.extend(dig("web", "AAAA")?);
        }
        Ok(got)
    };
    let got = wait_some(Duration::from_secs(30), || services().ok().filter(|got| *got == want));
    ensure!(
        got.is_some(),
        "the web Service resolved to {:?}, not its ClusterIPs {want:?}\n{}",
        services(),
        dns_diagnosis(n, from)
    );
    let target = webs[1].2.iter().find(|ip| ip.is_ipv4()).context("an IPv4 pod address")?;
    let name = format!("{}.net.pod.cluster.local", target.to_string().replace('.', "-"));
    let want = BTreeSet::from([*target]);
    let got = wait_some(Duration::from_secs(30), || dig(&name, "A").ok().filter(|got| *got == want));
    ensure!(got.is_some(), "{name} resolved to {:?}\n{}", dig(&name, "A"), dns_diagnosis(n, from));
    Ok(())
}

/// What a failed DNS question needs to be understood: dig's whole answer, CoreDNS's pods, endpoints and
/// logs, and what kube-proxy on the asking pod's node programmed for kube-dns.
fn dns_diagnosis(n: &Nodes, from: &str) -> String {
    let run = |args: &[&str]| n.cp.kubectl(args).unwrap_or_else(|e| format!("{e:#}"));
    let node = n.cp.get(&["pod", from, "-n", NS]).ok().and_then(|p| p["spec"]["nodeName"].as_str().map(String::from));
    let proxy = n.real.iter().find(|r| Some(&r.name) == node.as_ref());
    format!(
        "dig:\n{}\nresolv.conf:\n{}\nCoreDNS:\n{}\n{}\nits log:\n{}\nkube-proxy on {node:?}:\n{}\n{}",
        run(&["exec", "-n", NS, from, "--", "dig", "+search", "+time=2", "+tries=1", "web.net.svc.cluster.local", "A"]),
        run(&["exec", "-n", NS, from, "--", "cat", "/etc/resolv.conf"]),
        run(&["get", "pods,endpointslices", "-n", "kube-system", "-o", "wide"]),
        run(&["describe", "pods", "-n", "kube-system", "-l", "k8s-app=kube-dns"]),
        run(&["logs", "-n", "kube-system", "-l", "k8s-app=kube-dns", "--tail=40"]),
        proxy.map(|r| r.log_tail("kube-proxy")).unwrap_or_default(),
        proxy.and_then(|r| r.sh("nft list ruleset | grep -i -e dns -e 10.96.0.10 | head -40").ok()).unwrap_or_default(),
    )
}

/// Runs `action` while a pod on the first node pings a web pod on the second
/// in both families every 10 ms, `count` times; not one ping may be lost.
fn no_ping_lost_while(
    n: &mut Nodes,
    pinger: &str,
    count: u32,
    action: impl FnOnce(&mut Nodes) -> Result<()>,
) -> Result<()> {
    let webs = web_pods(n)?;
    let (from, to) = (n.real[0].name.clone(), &webs[1]);
    n.start_pinger(pinger, &from, &to.2, count)?;
    std::thread::sleep(Duration::from_secs(1));
    action(n)?;
    let still = n.cp.get(&["pod", pinger, "-n", NS])?;
    ensure!(still["status"]["phase"] == "Running", "the pings ended before the action did: make them more");
    let losses = n.ping_losses(pinger, &from, Duration::from_secs(u64::from(count) / 50 + 60))?;
    n.cp.kubectl(&["delete", "pod", pinger, "-n", NS, "--wait=false"])?;
    for (target, sent, lost) in &losses {
        eprintln!("{pinger}: {sent} pings to {target} ({}), {lost} lost", to.0);
        ensure!(*sent == count && *lost == 0, "{pinger}: {lost} of {sent} pings to {target} lost");
    }
    Ok(())
}

/// Waits until the overlay DaemonSet has an up-to-date, ready pod on every node.
fn wait_daemonset_ready(n: &Nodes, timeout: Duration) -> Result<()> {
    let done = wait_some(timeout, || {
        let ds = n.cp.get(&["daemonset", "overlay", "-n", "kube-overlay"]).ok()?;
        let st = &ds["status"];
        let want = n.real.len() as u64;
        (st["observedGeneration"] == ds["metadata"]["generation"]
            && st["updatedNumberScheduled"].as_u64() == Some(want)
            && st["numberReady"].as_u64() == Some(want)
            && st["numberAvailable"].as_u64() == Some(want))
        .then_some(())
    });
    done.with_context(|| format!("the overlay DaemonSet not ready on every node after {timeout:?}"))
}

/// The kubelets of the pinging and the pinged node restart (SIGTERM, start
/// again): pods keep running and overlay's entries stay, so no ping is lost.
fn a_kubelet_restart_loses_no_ping(n: &mut Nodes) -> Result<()> {
    no_ping_lost_while(n, "ping-kubelet", 3000, |n| {
        for i in [1, 0] {
            n.real[i].restart_kubelet()?;
            let name = n.real[i].name.clone();
            std::thread::sleep(Duration::from_secs(2));
            wait_some(Duration::from_secs(30), || real_node::node_ready(&n.cp, &name).filter(|(s, _)| s == "True"))
                .with_context(|| format!("{name} not Ready after its kubelet restarted"))?;
        }
        Ok(())
    })
}

/// The overlay pod of the pinged node is deleted; the DaemonSet makes a new
/// one, which adopts the kernel state the old one left: no ping is lost.
fn deleting_a_nodes_overlay_pod_loses_no_ping(n: &mut Nodes) -> Result<()> {
    no_ping_lost_while(n, "ping-delete", 3000, |n| {
        let node = n.real[1].name.clone();
        let pods = n.cp.get(&[
            "pods",
            "-n",
            "kube-overlay",
            "-l",
            "app=overlay",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ])?;
        let name = pods["items"][0]["metadata"]["name"].as_str().context("no overlay pod on the node")?.to_string();
        n.cp.kubectl(&["delete", "pod", &name, "-n", "kube-overlay", "--wait=false"])?;
        std::thread::sleep(Duration::from_secs(1));
        wait_daemonset_ready(n, Duration::from_secs(25))
    })
}

/// `kubectl rollout restart` of the overlay DaemonSet replaces its pod on
/// every node, one at a time: no ping is lost.
fn a_rollout_restart_of_overlay_loses_no_ping(n: &mut Nodes) -> Result<()> {
    no_ping_lost_while(n, "ping-rollout", 9000, |n| {
        n.cp.kubectl(&["rollout", "restart", "daemonset/overlay", "-n", "kube-overlay"])?;
        n.cp.kubectl(&["rollout", "status", "daemonset/overlay", "-n", "kube-overlay", "--timeout=80s"])?;
        wait_daemonset_ready(n, Duration::from_secs(10))
    })
}

/// A node's podCIDRs, as node IPAM gave them.
fn pod_cidrs(n: &Nodes, node: &str) -> Result<Vec<IpNet>> {
    let node = n.cp.get(&["node", node])?;
    Ok(node["spec"]["podCIDRs"].as_array().into_iter().flatten().filter_map(|c| c.as_str()?.parse().ok()).collect())
}

/// A node leaves and comes back, as an operator replaces one: drained, its
/// Node deleted (node IPAM takes its podCIDRs back), its kubelet started
/// again, so it registers anew and gets podCIDRs again. The overlay pod that
/// ran on through it takes the node's new podCIDRs: a new pod there gets an
/// address in them and reaches the other nodes' pods both ways in both
/// families, and the peers no longer route the old podCIDRs.
fn a_node_removed_and_added_again_gets_podcidrs_its_pods_and_peers_use(n: &mut Nodes) -> Result<()> {
    let webs = web_pods(n)?;
    let i = n.real.len() - 1;
    let node = n.real[i].name.clone();
    let before = pod_cidrs(n, &node)?;
    n.cp.kubectl(&[
        "drain",
        &node,
        "--ignore-daemonsets",
        "--force",
        "--delete-emptydir-data",
        "--grace-period=1",
        "--timeout=60s",
    ])?;
    n.cp.kubectl(&["delete", "node", &node, "--timeout=60s"])?;
    n.real[i].restart_kubelet()?;
    let after = wait_some(Duration::from_secs(90), || {
        let ready = real_node::node_ready(&n.cp, &node).is_some_and(|(s, _)| s == "True");
        pod_cidrs(n, &node).ok().filter(|c| ready && c.len() == n.families())
    })
    .with_context(|| format!("{node} not Ready with podCIDRs again:\n{}", n.real[i].log_tail("kubelet")))?;
    eprintln!("{node}: podCIDRs {before:?} before it left, {after:?} after it came back");
    n.cp.kubectl(&["uncordon", &node])?;
    wait_daemonset_ready(n, Duration::from_secs(60))?;
    let web = format!("web-{node}");
    let ips = n.pod(&web, &node, &["netexec", &format!("--http-port={NETEXEC_PORT}")])?;
    ensure!(ips.len() == n.families(), "{web} has {ips:?}, not one address per family");
    for ip in &ips {
        ensure!(after.iter().any(|c| c.contains(ip)), "{web}'s {ip} is outside {node}'s podCIDRs {after:?}");
    }
    let (peer, _, peer_ips) = &webs[0];
    for (from, to, targets) in [(peer, &web, &ips), (&web, peer, peer_ips)] {
        for ip in targets {
            let answer = wait_some(Duration::from_secs(30), || n.fetch(from, *ip, NETEXEC_PORT, "/hostname").ok())
                .with_context(|| format!("{from} never reached {to} at {ip}"))?;
            ensure!(answer.trim() == to, "{from} fetched {ip} and {answer:?} answered, not {to}");
        }
    }
    // kube-proxy there exited when the Node was deleted, and its supervisor started it again: the Service's
    // rules on the node follow the endpoints that changed meanwhile.
    let all: BTreeSet<String> = n.real.iter().map(|r| format!("web-{}", r.name)).collect();
    for ip in web_service(n)? {
        reach_every_backend(n, &web, ip, &all, &n.real[i])?;
    }
    for old in before.iter().filter(|c| !after.contains(c)) {
        for r in &n.real[..i] {
            let family = if old.addr().is_ipv4() { "-4" } else { "-6" };
            let routes = r.sh(&format!("ip {family} route show {old}"))?;
            ensure!(routes.trim().is_empty(), "{} still routes {node}'s old podCIDR: {routes}", r.name);
        }
    }
    Ok(())
}

/// The regular expressions of `tests/k8s/e2e/<name>.txt`: one a line, `#` lines and ` # reason`s left out.
fn e2e_list(name: &str) -> Result<Vec<String>> {
    let path = overlay_tests::manifests::deploy_dir().join("../tests/k8s/e2e").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(" # ").next().unwrap_or_default().trim().to_string())
        .collect())
}

/// What one run of the e2e suite said: ran, passed, failed, skipped, and its summary lines.
#[derive(Debug)]
struct E2eOutcome {
    ran: u32,
    passed: u32,
    failed: u32,
    skipped: u32,
    /// How many ginkgo processes ran the specs.
    procs: u32,
    /// The wall time of the run.
    took: Duration,
    summary: String,
    /// Why the run failed, with the end of its log; `None` when it passed.
    failure: Option<String>,
    /// Where ginkgo wrote its reports (`junit_01.xml`).
    report_dir: PathBuf,
}

/// Runs Kubernetes' own e2e suite (`e2e.test` of the release, `--provider=skeleton`) against the real
/// nodes, from the underlay namespace, focused on the selection `selection` (`ci.txt` or `full.txt`)
/// less `skip.txt`; its output goes to `<test dir>/e2e-<selection>.log`.
fn run_e2e(n: &Nodes, selection: &str) -> Result<E2eOutcome> {
    let started = Instant::now();
    let bin = control_plane::bin_dir();
    let e2e = bin.join("e2e.test");
    ensure!(e2e.is_file(), "no {} (run `make k8s`)", e2e.display());
    let focus = e2e_list(selection)?.join("|");
    let mut skip = e2e_list("skip.txt")?;
    if !n.dual {
        skip.extend(e2e_list("skip-ipv4.txt")?);
    }
    let skip = skip.join("|");
    let name = selection.trim_end_matches(".txt");
    let report = n.c.dir.join(format!("e2e-{name}"));
    std::fs::create_dir_all(&report)?;
    let log_path = n.c.dir.join(format!("e2e-{name}.log"));
    let log = std::fs::File::create(&log_path)?;
    // ginkgo interrupts the specs at its timeout and cleans up; the run is killed if that cleaning hangs too.
    // The CI subset takes 4 minutes here: 20 leaves room for a slow machine and keeps CI under its hour.
    let timeout = Duration::from_secs(if selection == "ci.txt" { 20 * 60 } else { 4 * 3600 });
    let suite_flags = [
        format!("--kubeconfig={}", n.cp.admin_kubeconfig().display()),
        "--provider=skeleton".to_string(),
        // As hack/ginkgo-e2e.sh passes it: without it the count is unknown (-1), and the specs that need two
        // nodes (the Granular Checks of Services among them) skip themselves.
        format!("--num-nodes={}", n.real.len()),
        format!("--kubectl-path={}", bin.join("kubectl").display()),
        format!("--report-dir={}", report.display()),
    ];
    let ginkgo_flags = [
        format!("focus={focus}"),
        format!("skip={skip}"),
        format!("timeout={}s", timeout.as_secs()),
        "no-color".to_string(),
        "v".to_string(),
    ];
    // The whole selection runs on parallel processes, as the release's hack/ginkgo-e2e.sh runs it: its specs
    // mostly wait (for pods, for probes' timeouts), and [Serial] ones run alone at the end. The CI subset
    // stays on one process, the form it has passed in the fresh root.
    let procs: u32 = match std::env::var("OVERLAY_E2E_PROCS") {
        Ok(v) => v.parse().with_context(|| format!("OVERLAY_E2E_PROCS={v:?} is not a number"))?,
        Err(_) if selection == "ci.txt" => 1,
        Err(_) => 3,
    };
    let mut command = if procs > 1 {
        let ginkgo = bin.join("ginkgo");
        ensure!(ginkgo.is_file(), "no {} (run `make k8s`)", ginkgo.display());
        let mut c = n.c.underlay.command(&ginkgo.display().to_string(), &[]);
        c.arg(format!("--procs={procs}"));
        c.args(ginkgo_flags.iter().map(|f| format!("--{f}")));
        c.arg(&e2e).arg("--").args(&suite_flags);
        c
    } else {
        let mut c = n.c.underlay.command(&e2e.display().to_string(), &[]);
        c.args(&suite_flags).args(ginkgo_flags.iter().map(|f| format!("--ginkgo.{f}")));
        c
    };
    // Its own process group: a kill at the deadline reaches ginkgo's e2e.test processes too.
    let mut child =
        command.process_group(0).stdout(log.try_clone()?).stderr(log).spawn().context("running e2e.test")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout + Duration::from_secs(300) {
            // SAFETY: kill(2) on the process group of a child this test started, which has not been reaped.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "e2e.test ({selection}) still ran 5 minutes after its timeout of {timeout:?}; killed:\n{}",
                tail_of(&log_path, 80)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let text = std::fs::read_to_string(&log_path)?;
    // "Ran 7 of 7412 Specs in 301.2 seconds" / "SUCCESS! -- 7 Passed | 0 Failed | 0 Pending | 7405 Skipped"
    let number_before = |line: &str, word: &str| -> u32 {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.windows(2).find(|w| w[1] == word).and_then(|w| w[0].parse().ok()).unwrap_or(0)
    };
    let ran_line = text.lines().rev().find(|l| l.starts_with("Ran ")).unwrap_or_default();
    let result_line = text.lines().rev().find(|l| l.contains(" Passed | ")).unwrap_or_default();
    let failures: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with("[FAIL]")).collect();
    let outcome = E2eOutcome {
        ran: ran_line.split_whitespace().nth(1).and_then(|w| w.parse().ok()).unwrap_or(0),
        passed: number_before(result_line, "Passed"),
        failed: number_before(result_line, "Failed"),
        skipped: number_before(result_line, "Skipped"),
        procs,
        took: started.elapsed(),
        summary: format!("{ran_line}\n{result_line}\n{}", failures.join("\n")),
        failure: None,
        report_dir: report.clone(),
    };
    eprintln!("e2e {name}: {}", outcome.summary);
    let failure = (!status.success() || outcome.failed > 0 || outcome.passed == 0).then(|| {
        // The test's directory goes with the cluster: the whole log is kept where cargo keeps test output.
        let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kube_nodes-e2e-{name}.log"));
        let kept = std::fs::copy(&log_path, &kept).map(|_| kept.display().to_string()).unwrap_or_default();
        format!(
            "e2e.test ({selection}) ended {status}: {}\nthe end of its log ({kept}):\n{}",
            outcome.summary,
            tail_of(&log_path, 80)
        )
    });
    Ok(E2eOutcome { failure, ..outcome })
}

/// The suites docs/conformance.md reports, by the start of a spec's name.
const SUITES: [(&str, &str); 5] = [
    ("Networking", "[sig-network] Networking"),
    ("NetworkPolicy", "[sig-network] Netpol"),
    ("Services", "[sig-network] Services"),
    ("DNS", "[sig-network] DNS"),
    ("IPv6DualStack", "[sig-network] [Feature:IPv6DualStack]"),
];

/// Each suite's (passed, failed, skipped) from ginkgo's JUnit report: the specs of the selection,
/// those skip.txt takes out and those that skipped themselves (a provider they are not for) as skipped.
fn suite_counts(cases: &[(String, String)]) -> Result<Vec<(&'static str, [u32; 3])>> {
    let focus = e2e_list("full.txt")?;
    let mut counts: Vec<(&str, [u32; 3])> = SUITES.iter().map(|(name, _)| (*name, [0; 3])).collect();
    for (name, status) in cases {
        // Specs the focus left out are listed as skipped too: only the selection counts.
        let Some(suite) = SUITES.iter().position(|(_, prefix)| name.contains(prefix)) else { continue };
        if !focus.iter().any(|f| name.contains(&f.replace('\\', ""))) {
            continue;
        }
        let slot = match status.as_str() {
            "passed" => 0,
            s if FAILED.contains(&s) => 1,
            _ => 2,
        };
        counts[suite].1[slot] += 1;
    }
    Ok(counts)
}

/// The statuses ginkgo's JUnit report gives a spec that did not pass and was not skipped.
const FAILED: [&str; 4] = ["failed", "panicked", "interrupted", "timedout"];

/// Each spec of ginkgo's JUnit report: its name and status, unescaped.
fn junit_cases(report_dir: &std::path::Path) -> Result<Vec<(String, String)>> {
    let xml = std::fs::read_to_string(report_dir.join("junit_01.xml")).context("ginkgo's JUnit report")?;
    let cases = xml.split("<testcase ").skip(1).map(|case| {
        let head = case.split('>').next().unwrap_or_default();
        let attr = |key: &str| -> String {
            head.split(&format!(" {key}=\""))
                .nth(1)
                .or_else(|| head.strip_prefix(&format!("{key}=\"")))
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .replace("&#39;", "'")
                .replace("&quot;", "\"")
                .replace("&amp;", "&")
        };
        (attr("name"), attr("status"))
    });
    Ok(cases.collect())
}

/// docs/conformance.md: the release, and for each run (dual stack, IPv4) its date, wall time, each suite's
/// counts and the specs that failed; then the skip lists. A run replaces its own section and keeps the other's.
fn write_conformance(path: &std::path::Path, run: &E2eOutcome, dual: bool) -> Result<()> {
    let cases = junit_cases(&run.report_dir)?;
    let counts = suite_counts(&cases)?;
    let date = String::from_utf8_lossy(&std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d").output()?.stdout)
        .trim()
        .to_string();
    let e2e_dir = overlay_tests::manifests::deploy_dir().join("../tests/k8s/e2e");
    let (key, title) = if dual { ("dual", "Dual stack (IPv4 and IPv6)") } else { ("ipv4", "IPv4") };
    let mut section = format!(
        "<!-- run:{key} -->\n## {title}\n\nRun on {date}; wall time {:.0} minutes, on {} ginkgo processes.\n\n\
         | suite | passed | failed | skipped |\n|---|---|---|---|\n",
        run.took.as_secs_f64() / 60.0,
        run.procs,
    );
    for (suite, [passed, failed, skipped]) in &counts {
        section.push_str(&format!("| {suite} | {passed} | {failed} | {skipped} |\n"));
    }
    let failed: Vec<String> = cases.into_iter().filter(|(_, s)| FAILED.contains(&s.as_str())).map(|(n, _)| n).collect();
    if !failed.is_empty() {
        section.push_str("\nFailed:\n\n");
        for spec in failed {
            section.push_str(&format!("- {spec}\n"));
        }
    }
    section.push_str(&format!("<!-- /run:{key} -->\n"));
    // The other run's section, as the last `make e2e` left it.
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let kept = |key: &str| -> String {
        let (open, close) = (format!("<!-- run:{key} -->"), format!("<!-- /run:{key} -->\n"));
        match (old.find(&open), old.find(&close)) {
            (Some(a), Some(b)) if a < b => old[a..b + close.len()].to_string(),
            _ => String::new(),
        }
    };
    let (dual_section, ipv4_section) = if dual { (section, kept("ipv4")) } else { (kept("dual"), section) };
    let mut md = format!(
        "# Conformance: Kubernetes' own e2e suites on overlay\n\n\
         Written by `make e2e`: `e2e.test` of Kubernetes **{}** (built from its module, `--provider=skeleton`) \
         against three real nodes (containerd, runc, the release's kubelet and kube-proxy in nftables mode; \
         CoreDNS from the release's addon), overlay installed with `kubectl apply -f deploy/overlay.yaml` \
         (docs/testing.md, \"Real nodes\"), once dual stack and once IPv4 alone. The selection is \
         `tests/k8s/e2e/full.txt`, less `tests/k8s/e2e/skip.txt` (and, IPv4 alone, `skip-ipv4.txt`). Skipped counts \
         the specs the skip lists take out and those that skip themselves here (a test for one cloud provider).\n\n",
        control_plane::RELEASE,
    );
    md.push_str(&dual_section);
    md.push('\n');
    md.push_str(&ipv4_section);
    for list in ["skip.txt", "skip-ipv4.txt"] {
        let text = std::fs::read_to_string(e2e_dir.join(list))?;
        md.push_str(&format!("\n## {list}\n\n```text\n{text}```\n"));
    }
    // network-policy-api's runs, as `make npa-conformance` left them.
    let (npa_dual, npa_ipv4) = (kept("npa-dual"), kept("npa-ipv4"));
    if !npa_dual.is_empty() || !npa_ipv4.is_empty() {
        md.push_str(NPA_INTRO);
        for section in [npa_dual, npa_ipv4].iter().filter(|s| !s.is_empty()) {
            md.push('\n');
            md.push_str(section);
        }
    }
    std::fs::write(path, md)?;
    Ok(())
}

/// sig-network's own e2e tests pass on overlay: the selection `make test`
/// runs (`tests/k8s/e2e/ci.txt`: the Networking conformance tests, a dozen
/// of the NetworkPolicy suite, one Services and one DNS test), or with
/// `OVERLAY_E2E=full` the whole selection (`full.txt`), as `make e2e` runs it.
fn the_upstream_sig_network_e2e_tests_pass(n: &mut Nodes) -> Result<()> {
    n.clear();
    let selection = if std::env::var("OVERLAY_E2E").is_ok_and(|v| v == "full") { "full.txt" } else { "ci.txt" };
    let outcome = run_e2e(n, selection)?;
    if let Ok(path) = std::env::var("OVERLAY_E2E_REPORT") {
        // Written also when specs failed: the report says which suites they were in.
        write_conformance(std::path::Path::new(&path), &outcome, n.dual)?;
    }
    if let Some(failure) = &outcome.failure {
        bail!("{failure}");
    }
    ensure!(outcome.ran == outcome.passed, "{outcome:?}");
    ensure!(outcome.skipped > 0, "{outcome:?}");
    Ok(())
}

/// The namespaces of the suite's base manifests.
const NPA_NAMESPACES: [&str; 5] = [
    "network-policy-conformance-gryffindor",
    "network-policy-conformance-slytherin",
    "network-policy-conformance-hufflepuff",
    "network-policy-conformance-ravenclaw",
    "network-policy-conformance-forbidden-forrest",
];

/// The features of network-policy-api's suite overlay claims.
const NPA_FEATURES: &str = "ClusterNetworkPolicy,ClusterNetworkPolicyNamedPorts,ClusterNetworkPolicyEgressNodePeers";
/// Its tests of SCTP alone: this kernel has no SCTP (the runner's build says how the others do without it).
const NPA_SCTP_TESTS: &str =
    "CNPAdminTierEgressSCTP,CNPAdminTierIngressSCTP,CNPBaselineTierEgressSCTP,CNPBaselineTierIngressSCTP";
/// The tests `make test` runs: the nodes peer (to a host-network pod, on the client's own node or another),
/// named ports, a network peer beside pods, and the Baseline tier.
const NPA_CI_TESTS: &str =
    "CNPAdminTierEgressNodePeers|CNPAdminTierIngressNamedPort|CNPAdminTierEgressInlineCIDRPeers|CNPBaselineTierIngressTCP";

/// The head of docs/conformance.md's network-policy-api part.
const NPA_INTRO: &str = "\n## ClusterNetworkPolicy: network-policy-api's conformance suite\n\n\
Written by `make npa-conformance`: `TestConformance` of `sigs.k8s.io/network-policy-api` **v0.2.0** (its \
`conformance/` package, built from the module by `tests/k8s/npa-conformance/build`) on the same three real nodes, \
the CRD applied from `deploy/cluster-network-policy-crds.yaml` under the running DaemonSet, with \
`-supported-features=ClusterNetworkPolicy,ClusterNetworkPolicyNamedPorts,ClusterNetworkPolicyEgressNodePeers`: \
overlay claims the core and both optional features. The suite probes each pod's first address (`status.podIP`), so \
a dual-stack run checks IPv4 on a dual-stack cluster; IPv6 is checked by overlay's own ClusterNetworkPolicy truth \
table (`tests/tests/network_policy.rs`, `kube_real.rs`). This kernel has no SCTP (`CONFIG_IP_SCTP` is not set), so \
the runner differs from the module's own in three ways, all in `tests/k8s/npa-conformance/`: the base manifests \
lose their SCTP servers (agnhost `porter` exits when it cannot listen on SCTP, and no pod would become Ready), \
the four SCTP-only tests are skipped (`-skip-tests`), and an SCTP probe inside a mixed-protocol test is logged \
as not run instead of made (its TCP and UDP probes run as written). overlay compiles SCTP ports like TCP and UDP \
(the unit tests and the NetworkPolicy truth table check the rules); that they hold on the wire is untested here. \
`make test` runs four of the tests on every change (`NPA_CI_TESTS` in `tests/tests/kube_nodes.rs`).\n";

/// One test's (or subtest's) result, from `go test -v`'s `--- PASS: TestConformance/...` lines.
fn npa_results(log: &str) -> Vec<(String, bool)> {
    log.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let (passed, rest) = if let Some(r) = l.strip_prefix("--- PASS: ") {
                (true, r)
            } else {
                (false, l.strip_prefix("--- FAIL: ")?)
            };
            let name = rest.split_whitespace().next()?.strip_prefix("TestConformance/")?;
            Some((name.to_string(), passed))
        })
        .collect()
}

/// The ClusterNetworkPolicy conformance suite of sig-network's network-policy-api (v0.2.0, built from its module
/// by `tests/k8s/npa-conformance/build`) passes: the CRD applied from `deploy/` under the running DaemonSet, the
/// release's agnhost tagged as the suite's 2.45, every feature overlay claims asked for. `make test` runs four of
/// its tests; `OVERLAY_NPA=full` (`make npa-conformance`) all of them, and `OVERLAY_NPA_REPORT` writes the report.
fn the_network_policy_api_conformance_tests_pass(n: &mut Nodes) -> Result<()> {
    n.clear();
    let out =
        std::process::Command::new(overlay_tests::manifests::deploy_dir().join("../tests/k8s/npa-conformance/build"))
            .arg("--bin")
            .output()?;
    let bin = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    ensure!(bin.is_file(), "no {} (run `make k8s`)", bin.display());
    n.cp.apply_cluster_policy_crd()?;
    // Each daemon finds the CRD within its minute's poll.
    let enforcing = wait_some(Duration::from_secs(90), || {
        let logs = n.cp.kubectl(&["logs", "-n", "kube-overlay", "-l", "app=overlay", "--tail=-1", "--prefix"]).ok()?;
        let pods = n.real.len();
        (logs.lines().filter(|l| l.contains("enforcing ClusterNetworkPolicy")).count() >= pods).then_some(())
    });
    ensure!(enforcing.is_some(), "the overlay pods did not say they enforce ClusterNetworkPolicy within 90 s");
    for r in &n.real {
        r.ctr(&["images", "tag", "--force", &n.agnhost, "registry.k8s.io/e2e-test-images/agnhost:2.45"])?;
    }
    let full = std::env::var("OVERLAY_NPA").is_ok_and(|v| v == "full");
    let run = if full { "TestConformance".to_string() } else { format!("TestConformance/^({NPA_CI_TESTS})$") };
    let log_path = n.c.dir.join("npa-conformance.log");
    let log = std::fs::File::create(&log_path)?;
    let started = Instant::now();
    let mut command = n.c.underlay.command(&bin.display().to_string(), &[]);
    command
        .env("KUBECONFIG", n.cp.admin_kubeconfig())
        .args(["-test.v", "-test.timeout", if full { "60m" } else { "15m" }, "-test.run", &run])
        .arg(format!("-supported-features={NPA_FEATURES}"))
        .arg(format!("-skip-tests={NPA_SCTP_TESTS}"))
        // Below the ephemeral range: see the runner.
        .arg("-host-network-ports-from=24345")
        // Kept for a failure's diagnosis below; removed here after.
        .arg("-cleanup-base-resources=false");
    let status = command.stdout(log.try_clone()?).stderr(log).status().context("running the npa conformance suite")?;
    let took = started.elapsed();
    let diagnosis = if status.success() {
        String::new()
    } else {
        let pods = n.cp.kubectl(&["get", "pods", "-A", "-o", "wide"]).unwrap_or_else(|e| e.to_string());
        let events =
            n.cp.kubectl(&["get", "events", "-A", "--field-selector", "type=Warning"])
                .unwrap_or_else(|e| e.to_string());
        format!("\npods:\n{pods}\nwarnings:\n{events}")
    };
    let mut houses = vec!["delete", "namespace", "--ignore-not-found", "--wait=true", "--timeout=120s"];
    houses.extend(NPA_NAMESPACES);
    // Its error waits until the suite's own verdict is given: a failed run's diagnosis comes first.
    let removed = n.cp.kubectl(&houses);
    let text = std::fs::read_to_string(&log_path)?;
    let results = npa_results(&text);
    let failed: Vec<&str> = results.iter().filter(|(_, ok)| !ok).map(|(name, _)| name.as_str()).collect();
    eprintln!(
        "npa conformance: {status} in {:.0} s, {} passed, {} failed",
        took.as_secs_f64(),
        results.len() - failed.len(),
        failed.len()
    );
    if let Ok(path) = std::env::var("OVERLAY_NPA_REPORT") {
        write_npa_conformance(std::path::Path::new(&path), &results, &text, took, n.dual)?;
    }
    if !status.success() || !failed.is_empty() || results.is_empty() {
        let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kube_nodes-npa-conformance.log");
        let kept = std::fs::copy(&log_path, &kept).map(|_| kept.display().to_string()).unwrap_or_default();
        let removal = removed.err().map(|e| format!("\ndeleting its namespaces failed too: {e:#}")).unwrap_or_default();
        bail!(
            "the npa conformance suite ended {status}; failed: {failed:#?}\nthe end of its log ({kept}):\n{}{diagnosis}{removal}",
            tail_of(&log_path, 40)
        );
    }
    removed.context("deleting the suite's namespaces")?;
    // The tests asked for ran: no name in the pattern matched nothing.
    let ran: BTreeSet<&str> = results.iter().filter_map(|(name, _)| name.split('/').next()).collect();
    if !full {
        for t in NPA_CI_TESTS.split('|') {
            ensure!(ran.contains(t), "{t} did not run:\n{}", tail_of(&log_path, 40));
        }
    }
    // The SCTP probes the runner leaves out are said in its log, never passed silently.
    ensure!(text.contains("not run: this kernel has no SCTP"), "no SCTP probe said as not run");
    Ok(())
}

/// The network-policy-api section of docs/conformance.md (one per family setting), replacing its own and
/// keeping everything else.
fn write_npa_conformance(
    path: &std::path::Path,
    results: &[(String, bool)],
    log: &str,
    took: Duration,
    dual: bool,
) -> Result<()> {
    let date = String::from_utf8_lossy(&std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d").output()?.stdout)
        .trim()
        .to_string();
    let (key, title) = if dual { ("npa-dual", "Dual stack (IPv4 and IPv6)") } else { ("npa-ipv4", "IPv4") };
    let tests: Vec<&(String, bool)> = results.iter().filter(|(name, _)| !name.contains('/')).collect();
    let subtests = results.len() - tests.len();
    let passed_subtests = results.iter().filter(|(name, ok)| name.contains('/') && *ok).count();
    let sctp_not_run = log.matches("not run: this kernel has no SCTP").count();
    let is_sctp_test = |name: &str| NPA_SCTP_TESTS.split(',').any(|t| t == name);
    let skipped = tests.iter().filter(|(name, _)| is_sctp_test(name)).count();
    let mut section = format!(
        "<!-- run:{key} -->\n### network-policy-api: {title}\n\nRun on {date}; wall time {:.0} minutes. \
         {} of {} tests run passed ({skipped} skipped: SCTP alone), and {passed_subtests} of {subtests} subtests; \
         SCTP probes not run: {sctp_not_run}.\n\n| test | result |\n|---|---|\n",
        took.as_secs_f64() / 60.0,
        tests.iter().filter(|(name, ok)| *ok && !is_sctp_test(name)).count(),
        tests.len() - skipped,
    );
    for (name, ok) in &tests {
        let result = if is_sctp_test(name) {
            "skipped (SCTP)"
        } else if *ok {
            "passed"
        } else {
            "FAILED"
        };
        section.push_str(&format!("| {name} | {result} |\n"));
    }
    let failed: Vec<&str> =
        results.iter().filter(|(name, ok)| name.contains('/') && !ok).map(|(name, _)| name.as_str()).collect();
    if !failed.is_empty() {
        section.push_str("\nFailed subtests:\n\n");
        for name in failed {
            section.push_str(&format!("- {name}\n"));
        }
    }
    section.push_str(&format!("<!-- /run:{key} -->\n"));
    let mut old = std::fs::read_to_string(path).unwrap_or_default();
    if !old.contains(NPA_INTRO) {
        old.push_str(NPA_INTRO);
    }
    let (open, close) = (format!("<!-- run:{key} -->"), format!("<!-- /run:{key} -->\n"));
    let md = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if a < b => format!("{}{section}{}", &old[..a], &old[b + close.len()..]),
        _ => format!("{old}\n{section}"),
    };
    std::fs::write(path, md)?;
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
    ("network_policy_holds_behind_a_service_cluster_ip", network_policy_holds_behind_a_service_cluster_ip),
    (
        "dns_names_resolve_for_services_and_pods_in_both_families",
        dns_names_resolve_for_services_and_pods_in_both_families,
    ),
    ("a_kubelet_restart_loses_no_ping", a_kubelet_restart_loses_no_ping),
    ("deleting_a_nodes_overlay_pod_loses_no_ping", deleting_a_nodes_overlay_pod_loses_no_ping),
    ("a_rollout_restart_of_overlay_loses_no_ping", a_rollout_restart_of_overlay_loses_no_ping),
    (
        "a_node_removed_and_added_again_gets_podcidrs_its_pods_and_peers_use",
        a_node_removed_and_added_again_gets_podcidrs_its_pods_and_peers_use,
    ),
    ("the_upstream_sig_network_e2e_tests_pass", the_upstream_sig_network_e2e_tests_pass),
    ("the_network_policy_api_conformance_tests_pass", the_network_policy_api_conformance_tests_pass),
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
