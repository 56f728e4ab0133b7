//! The container image, built as `make image` builds it (deploy/build-image:
//! a base root from Debian's packages, the binaries this suite tests) and
//! run with podman the way the DaemonSet of deploy/overlay.yaml runs it: in
//! each node's network namespace, with the manifest's command, environment,
//! mounts, capabilities and memory limit, against the Kubernetes API double
//! served as a cluster serves it (HTTPS, a service-account token, only what
//! the manifest's ClusterRole grants). docs/testing.md, "The image".

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use overlay_tests::cluster::KUBE_API;
use overlay_tests::daemonset::{DaemonSetPod, PodOnNode};
use overlay_tests::manifests::cluster_role_grants;
use overlay_tests::podman::{CniDirs, Podman};
use overlay_tests::probe::http_get;
use overlay_tests::{require_root, wait_until, workspace_bin, Cluster, ClusterOptions};

/// The capabilities a process holds, from `/proc/<pid>/status`: (effective, bounding, no_new_privs).
fn capabilities(pid: &str) -> (u64, u64, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_string();
    let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
    (hex("CapEff:"), hex("CapBnd:"), field("NoNewPrivs:") == "1")
}

const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_NET_RAW: u64 = 1 << 13;

/// A node whose overlay runs from the image: its podman, and its `/`.
struct ImageNode {
    index: usize,
    podman: Podman,
    host: PathBuf,
}

/// A cluster whose API double serves as a cluster does, with the manifest's
/// net-conf and RBAC, and `nodes` nodes, each with a podman whose CNI
/// directories are the node's `/opt/cni/bin` and `/etc/cni/net.d`, as a
/// kubelet's runtime has them; the image is built once and given to each.
fn cluster_for_the_image(nodes: usize) -> (Cluster, DaemonSetPod, Vec<ImageNode>) {
    let pod = DaemonSetPod::from_manifest().unwrap();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).unwrap();
    c.start_kube_api_in_cluster(&pod.config("net-conf.json").unwrap()).unwrap();
    c.api().enforce_rbac(cluster_role_grants().unwrap());
    let mut image_nodes: Vec<ImageNode> = Vec::new();
    for _ in 0..nodes {
        let i = c.add_node(&[]).unwrap();
        let host = c.dir.join(format!("n{}/host", c.nodes[i].index));
        let (name, ip) = (c.nodes[i].name.clone(), c.nodes[i].ip);
        c.api().add_node(&name, ip, true).unwrap();
        let node = &mut c.nodes[i];
        node.subnet_file = host.join("run/overlay/subnet.env");
        for dir in ["run/overlay", "opt/cni/bin", "etc/cni/net.d"] {
            std::fs::create_dir_all(host.join(dir)).unwrap();
        }
        // The host's part, as the manifest says: the container cannot set it.
        node.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
        // The plugin's conflist names /run/overlay/subnet.env: the node's, in podman's namespace.
        let cni = CniDirs {
            plugin_dirs: vec![host.join("opt/cni/bin")],
            conf_dir: Some(host.join("etc/cni/net.d")),
            binds: vec![(host.join("run/overlay"), "/run/overlay")],
        };
        let podman = Podman::with_cni(node, &c.dir, cni).unwrap();
        image_nodes.push(ImageNode { index: i, podman, host });
    }
    let image = pod.image().unwrap();
    let bin_dir = workspace_bin("overlayd").parent().unwrap().to_path_buf();
    image_nodes[0].podman.build_image(&bin_dir, &image).unwrap();
    for other in &image_nodes[1..] {
        image_nodes[0].podman.copy_image_to(&image, &other.podman).unwrap();
    }
    (c, pod, image_nodes)
}

/// What the kubelet knows of the DaemonSet's pod on `node`.
fn pod_on<'a>(c: &'a Cluster, node: &'a ImageNode, service_account: &'a std::path::Path) -> PodOnNode<'a> {
    let n = &c.nodes[node.index];
    PodOnNode {
        node_name: &n.name,
        pod_ip: n.ip.into(),
        pod_name: "overlay-x7k2p",
        api: KUBE_API.parse().unwrap(),
        host_root: &node.host,
        volumes_dir: node.host.parent().unwrap(),
        service_account,
    }
}

/// Runs the pod's init containers to completion, then its container, detached.
fn start_pod(pod: &DaemonSetPod, node: &ImageNode, on: &PodOnNode) {
    for init in pod.init_containers() {
        let args = pod.podman_args(init, on).unwrap();
        let mut run = vec!["run", "--rm"];
        run.extend(args.iter().map(String::as_str));
        let out = node.podman.output(&run).unwrap();
        assert!(out.status.success(), "init container {}: {}", init.name, String::from_utf8_lossy(&out.stderr));
    }
    let args = pod.podman_args(pod.container().unwrap(), on).unwrap();
    let mut run = vec!["run", "-d"];
    run.extend(args.iter().map(String::as_str));
    node.podman.run(&run).unwrap();
}

/// Whether the node carries `NetworkUnavailable=False`, as overlayd sets it.
fn network_available(c: &Cluster, name: &str) -> bool {
    let conditions = c.api().node(name).unwrap().status.unwrap().conditions.unwrap_or_default();
    conditions.iter().any(|k| k.type_ == "NetworkUnavailable" && k.status == "False")
}

/// The daemon container's log.
fn logs(node: &ImageNode, name: &str) -> String {
    let out = node.podman.output(&["logs", name]).unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
#[ignore = "needs root (network namespaces, podman): run by `make test`"]
fn the_daemonset_runs_from_the_image_and_its_pods_reach_across_nodes() {
    require_root();
    let (c, pod, nodes) = cluster_for_the_image(2);
    let service_account = c.dir.join("serviceaccount");
    let daemon = pod.container().unwrap();
    let plugin = std::fs::read(workspace_bin("overlay-cni")).unwrap();
    let conflist = pod.config("cni-conf.json").unwrap();
    for node in &nodes {
        // A plugin from an older release, held open as a running plugin would be.
        let installed = node.host.join("opt/cni/bin/overlay-cni");
        std::fs::write(&installed, b"an older overlay-cni").unwrap();
        let old = std::fs::File::open(&installed).unwrap();
        let on = pod_on(&c, node, &service_account);
        start_pod(&pod, node, &on);

        // The init container installed the image's plugin and the ConfigMap's conflist, each by rename.
        assert_eq!(std::fs::read(&installed).unwrap(), plugin, "the installed plugin is not the image's");
        assert_ne!(std::fs::metadata(&installed).unwrap().ino(), old.metadata().unwrap().ino(), "rewritten in place");
        assert_eq!(std::io::read_to_string(&old).unwrap(), "an older overlay-cni");
        assert_eq!(std::fs::metadata(&installed).unwrap().mode() & 0o777, 0o755);
        let conf_dir = node.host.join("etc/cni/net.d");
        assert_eq!(std::fs::read_to_string(conf_dir.join("10-overlay.conflist")).unwrap(), conflist);
        let temporary: Vec<String> = std::fs::read_dir(node.host.join("opt/cni/bin"))
            .unwrap()
            .chain(std::fs::read_dir(&conf_dir).unwrap())
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with('.'))
            .collect();
        assert!(temporary.is_empty(), "temporary files left behind: {temporary:?}");

        // The kubelet's probes, as the manifest writes them, at the pod's (the node's) address.
        let n = &c.nodes[node.index];
        let (ready_path, ready_port) = DaemonSetPod::http_probe(daemon, daemon.readiness_probe.as_ref()).unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || http_get(&n.ns, (n.ip, ready_port).into(), &ready_path)
                .is_ok_and(|r| r.0 == 200)),
            "never ready:\n{}",
            logs(node, &daemon.name)
        );
        let (live_path, live_port) = DaemonSetPod::http_probe(daemon, daemon.liveness_probe.as_ref()).unwrap();
        assert_eq!(http_get(&n.ns, (n.ip, live_port).into(), &live_path).unwrap().0, 200);
        assert!(n.subnet_env().is_ok(), "no subnet file on the host's /run/overlay");

        // Only the manifest's capabilities, and no way to gain more.
        let pid = node.podman.run(&["inspect", &daemon.name, "--format", "{{.State.Pid}}"]).unwrap();
        assert_eq!(capabilities(&pid), (CAP_NET_ADMIN | CAP_NET_RAW, CAP_NET_ADMIN | CAP_NET_RAW, true));
        // nft, from the image, made the masquerade table.
        let table = n.ns.exec("nft", &["list", "table", "ip", "overlay"]).unwrap_or_default();
        assert!(table.contains("masquerade"), "no masquerade table:\n{table}\n{}", logs(node, &daemon.name));
        // In-cluster configuration: the service address from the environment, over TLS, with the token.
        let log = logs(node, &daemon.name);
        assert!(log.contains(&format!("server=https://{KUBE_API}/")), "{log}");
        // Every permission the daemon needs was granted: its annotations and condition got through.
        let api_node = c.api().node(&n.name).unwrap();
        let annotations = api_node.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.get("flannel.alpha.coreos.com/public-ip"), Some(&n.ip.to_string()), "{log}");
        assert!(
            wait_until(Duration::from_secs(10), || network_available(&c, &n.name)),
            "NetworkUnavailable not cleared:\n{log}"
        );
    }

    // Pods made through the installed plugin, on different nodes, reach each other.
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let ip = n2.podman.serve_web("web").unwrap();
    let subnet = c.nodes[n2.index].subnet().unwrap();
    assert!(subnet.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()), "web got {ip}, not in {subnet}");
    let mut page = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            page = n1.podman.fetch_page(&ip);
            page.contains("hello from overlay")
        }),
        "a pod on node 1 cannot fetch from {ip} on node 2: {page:?}\n{}",
        logs(n1, &daemon.name)
    );
}

#[test]
#[ignore = "needs root (network namespaces, podman): run by `make test`"]
fn the_daemonset_with_a_token_the_server_refuses_stays_unready_and_says_why() {
    require_root();
    let (c, pod, nodes) = cluster_for_the_image(1);
    let wrong = c.dir.join("wrong-serviceaccount");
    overlay_tests::kube_api::Credentials {
        ca_pem: std::fs::read_to_string(c.dir.join("serviceaccount/ca.crt")).unwrap(),
        token: "not-the-token".into(),
    }
    .write_service_account(&wrong, pod.namespace())
    .unwrap();
    let node = &nodes[0];
    start_pod(&pod, node, &pod_on(&c, node, &wrong));
    let daemon = pod.container().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || logs(node, &daemon.name).contains("Unauthorized")),
        "{}",
        logs(node, &daemon.name)
    );
    let n = &c.nodes[node.index];
    let (path, port) = DaemonSetPod::http_probe(daemon, daemon.readiness_probe.as_ref()).unwrap();
    let (status, _) = http_get(&n.ns, (n.ip, port).into(), &path).unwrap();
    assert_ne!(status, 200, "ready without a lease");
    assert!(n.subnet_env().is_err());
    let annotations = c.api().node(&n.name).unwrap().metadata.annotations.unwrap_or_default();
    assert!(!annotations.contains_key("flannel.alpha.coreos.com/backend-data"), "{annotations:?}");
}

#[test]
#[ignore = "needs root (podman): run by `make test`"]
fn the_image_holds_the_tested_binaries_and_nft_and_no_shell() {
    require_root();
    let (c, pod, nodes) = cluster_for_the_image(1);
    let podman = &nodes[0].podman;
    let image = pod.image().unwrap();
    // Named as the manifest runs it, after the workspace's version.
    assert_eq!(image, format!("ghcr.io/overlay-net/overlay:{}", env!("CARGO_PKG_VERSION")));
    let config =
        podman.run(&["image", "inspect", &image, "--format", "{{.Config.User}} {{json .Config.Entrypoint}}"]).unwrap();
    assert_eq!(config, r#"0:0 ["/usr/local/bin/overlayd"]"#);

    let root = PathBuf::from(podman.run(&["image", "mount", &image]).unwrap());
    for bin in ["overlayd", "overlay-cni"] {
        let inside = std::fs::read(root.join("usr/local/bin").join(bin)).unwrap();
        assert!(inside == std::fs::read(workspace_bin(bin)).unwrap(), "{bin} in the image is not the one tested");
    }
    // Every executable file: the two binaries and nft; the rest are shared libraries.
    let mut programs = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            let relative = entry.path().strip_prefix(&root).unwrap().display().to_string();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && meta.mode() & 0o111 != 0 && !relative.contains(".so") {
                programs.push(relative);
            }
        }
    }
    programs.sort();
    assert_eq!(programs, ["usr/local/bin/overlay-cni", "usr/local/bin/overlayd", "usr/sbin/nft"]);
    assert!(std::fs::metadata(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap().len() > 100_000);
    // What is inside, for image scanners.
    let nftables = std::fs::read_to_string(root.join("var/lib/dpkg/status.d/nftables")).unwrap();
    assert!(nftables.contains("Package: nftables") && nftables.contains("Status: install ok installed"));
    podman.run(&["image", "unmount", &image]).unwrap();
    // No shell: a command that needs one cannot run.
    let out = podman.output(&["run", "--rm", "--network=none", "--entrypoint=/bin/sh", &image, "-c", "true"]).unwrap();
    assert!(!out.status.success());
    drop(c);
}
