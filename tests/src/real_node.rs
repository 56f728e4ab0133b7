//! A real Kubernetes node in a test node's network namespace: containerd
//! (Debian's) with runc, and a kubelet and kube-proxy of the control
//! plane's release (`make k8s`), the kubelet under Node authorization with
//! its own client certificate, kube-proxy in nftables mode.
//!
//! Several kubelets on one host collide in fixed places: `/var/lib/kubelet`,
//! `/var/log/pods`, `/run/containerd`, runc's `/run/runc`, the pods'
//! `/run/netns`, the CNI directories `/etc/cni/net.d` and `/opt/cni/bin`
//! (the DaemonSet's hostPaths), and the global kernel tunables a kubelet
//! sets (`vm.overcommit_memory`, `kernel.panic`, ...). So every process of
//! a node runs in one private mount namespace, held open by a process of
//! the test's, where those places are the node's own: fresh tmpfs over
//! `/run`, `/var/lib`, `/var/log` and `/opt`; `/etc` a tmpfs with the host's
//! entries bound back in, except `/etc/cni`; the kubelet's tunables plain
//! files bound over their `/proc/sys` entries. Nothing lands on the host,
//! and nothing of the host's changes.
//!
//! cgroups (v1 here, a hybrid hierarchy): the kubelet uses the cgroupfs
//! driver under a cgroup root of the node's own (`/<node's netns name>`),
//! made in every v1 hierarchy before it starts and removed, with every
//! process in it, when the node goes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cluster::Node;
use crate::control_plane::{self, ControlPlane};

/// The containerd socket, inside a node's mount namespace.
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The ClusterIP the kubelets give pods as their DNS server (CoreDNS's `kube-dns` Service).
pub const CLUSTER_DNS: &str = "10.96.0.10";

/// Sets up a node's private mount namespace (see the module's comment), then holds it.
const MOUNT_NAMESPACE: &str = r#"set -e
mount -n -t tmpfs -o mode=0755 node-run /run
mount -n -t tmpfs -o mode=0755 node-varlib /var/lib
mount -n -t tmpfs -o mode=0755 node-varlog /var/log
mount -n -t tmpfs -o mode=0755 node-opt /opt
mkdir -p /run/host-etc
mount -n --rbind /etc /run/host-etc
mount -n -t tmpfs -o mode=0755 node-etc /etc
for entry in /run/host-etc/* /run/host-etc/.[!.]*; do
  [ -e "$entry" ] || [ -L "$entry" ] || continue
  at=/etc/${entry#/run/host-etc/}
  case "$at" in /etc/cni | /etc/containerd | /etc/kubernetes) continue ;; esac
  if [ -L "$entry" ]; then cp -P "$entry" "$at"
  elif [ -d "$entry" ]; then mkdir "$at"; mount -n --rbind "$entry" "$at"
  else : >"$at"; mount -n --bind "$entry" "$at"
  fi
done
mkdir -p /etc/cni/net.d /opt/cni/bin /run/netns /var/lib/kubelet /var/log/pods
for tunable in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
               kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  mkdir -p "/run/node-sysctl/${tunable%/*}"
  cat "/proc/sys/$tunable" >"/run/node-sysctl/$tunable"
  mount -n --bind "/run/node-sysctl/$tunable" "/proc/sys/$tunable"
done
echo ready
exec sleep infinity"#;

/// Runs its arguments again a second after they exit, as systemd's `Restart=always` does; SIGTERM stops both.
const SUPERVISE: &str = r#"trap 'kill "$child" 2>/dev/null; wait "$child"; exit 0' TERM
while :; do
  "$@" &
  child=$!
  wait "$child" || true
  echo "supervise: $1 exited; starting it again in 1 s" >&2
  sleep 1
done"#;

/// containerd's configuration: state and socket in the namespace's `/run`,
/// images in `root` with the `native` snapshotter (overlayfs cannot stack
/// on the overlayfs a fresh root may run on).
fn containerd_config(root: &Path, sandbox_image: &str) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "/run/containerd"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # This machine's root may not raise oom_score_adj (no CAP_SYS_RESOURCE outside);
  # without this runc fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#,
        root = root.display()
    )
}

/// A running real node.
pub struct RealNode {
    /// Its Node name.
    pub name: String,
    /// Its scratch directory (configs, logs).
    pub dir: PathBuf,
    /// containerd's root, its images and containers (see [`image_store`]).
    image_store: PathBuf,
    netns: String,
    cgroup_root: String,
    kubelet_config: PathBuf,
    kubelet_args: Vec<String>,
    kubelet: Option<Child>,
    kube_proxy: Option<Child>,
    containerd: Option<Child>,
    /// Holds the node's mount namespace; goes last.
    holder: Child,
}

impl RealNode {
    /// Makes `node` a real node of `cp`: containerd with every image of the
    /// release's cache and `extra_images` (docker or OCI archives) imported,
    /// the kubelet (which registers the Node; it stays NotReady until a CNI
    /// config appears) and kube-proxy. `cluster_cidrs` is what kube-proxy
    /// calls local traffic.
    pub fn start(
        cp: &ControlPlane,
        node: &Node,
        dir: &Path,
        cluster_cidrs: &str,
        extra_images: &[PathBuf],
    ) -> Result<Self> {
        let bin = control_plane::bin_dir();
        for b in ["kubelet", "kube-proxy"] {
            if !bin.join(b).is_file() {
                bail!("no {} (run `make k8s`)", bin.join(b).display());
            }
        }
        let dir = dir.join(format!("{}-real", node.name));
        std::fs::create_dir_all(&dir)?;
        // What a host does for its pod network; the DaemonSet leaves ip_forward to the host.
        node.ns.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        let cgroup_root = node.ns.name.clone();
        make_cgroup_root(&cgroup_root)?;
        let holder = crate::hold_mount_namespace("a node's mount namespace", MOUNT_NAMESPACE, &[])?;
        let mut real = RealNode {
            name: node.name.clone(),
            dir: dir.clone(),
            image_store: image_store(&node.ns.name),
            netns: node.ns.name.clone(),
            cgroup_root,
            kubelet_config: dir.join("kubelet.json"),
            kubelet_args: Vec::new(),
            kubelet: None,
            kube_proxy: None,
            containerd: None,
            holder,
        };
        // A node's image brings the reference plugins a runtime calls besides the network's own (loopback).
        let cni_bin = dir.join("cni-bin");
        std::fs::create_dir_all(&cni_bin)?;
        for plugin in ["loopback", "portmap"] {
            std::fs::copy(Path::new("/usr/lib/cni").join(plugin), cni_bin.join(plugin))
                .with_context(|| format!("/usr/lib/cni/{plugin} (make deps installs containernetworking-plugins)"))?;
        }
        real.sh(&format!("cp -a {}/. /opt/cni/bin/", cni_bin.display()))?;

        let images = release_images()?;
        let sandbox_image = images
            .iter()
            .find(|(_, name)| name.contains("/pause:"))
            .map(|(_, name)| name.clone())
            .context("no pause image in `tests/k8s/images --names`")?;
        std::fs::write(dir.join("containerd.toml"), containerd_config(&real.image_store, &sandbox_image))?;
        real.containerd = Some(real.spawn(
            Path::new("containerd"),
            &["--config".into(), dir.join("containerd.toml").display().to_string()],
            "containerd",
        )?);
        real.wait_for("containerd", Duration::from_secs(30), |r| r.ctr(&["version"]).is_ok())?;
        let started = Instant::now();
        for archive in images.iter().map(|(a, _)| a).chain(extra_images) {
            real.ctr(&["images", "import", "--snapshotter", "native", &archive.display().to_string()])
                .with_context(|| format!("importing {}", archive.display()))?;
        }
        eprintln!("{}: images imported in {:.1} s", real.name, started.elapsed().as_secs_f64());

        // The node's upstream resolver, for pods with dnsPolicy Default (CoreDNS forwards to it): the test's
        // outside host, inside the test, where nothing answers DNS; names outside the cluster do not resolve.
        let upstream = format!("nameserver {}\n", crate::cluster::OUTSIDE_UNDERLAY_IP);
        std::fs::write(dir.join("resolv.conf"), upstream)?;
        let kubelet_config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // This host's hierarchy is cgroup v1 (hybrid), which the release refuses unless told.
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", real.cgroup_root),
            "containerRuntimeEndpoint": format!("unix://{CONTAINERD_SOCKET}"),
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": cp.ca()},
            },
            "authorization": {"mode": "Webhook"},
            "readOnlyPort": 0,
            "failSwapOn": false,
            "clusterDomain": "cluster.local",
            "clusterDNS": [CLUSTER_DNS],
            "resolvConf": dir.join("resolv.conf"),
            "healthzBindAddress": "127.0.0.1",
            // The host's disk is shared by every test: no eviction, no image collection
            // (there is no registry to pull an image back from).
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "fileCheckFrequency": "5s",
        });
        std::fs::write(&real.kubelet_config, serde_json::to_string_pretty(&kubelet_config)?)?;
        let kubeconfig = cp.node_kubeconfig(&node.name)?;
        real.kubelet_args = vec![
            format!("--config={}", real.kubelet_config.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--cert-dir={}", dir.join("kubelet-pki").display()),
            format!("--hostname-override={}", node.name),
            // A node has an address of each family the cluster's pods have, as kubeadm's docs ask.
            if cluster_cidrs.contains(':') {
                format!("--node-ip={},{}", node.ip, node.ip6)
            } else {
                format!("--node-ip={}", node.ip)
            },
            "--v=1".into(),
        ];
        real.start_kubelet()?;

        let proxy_kubeconfig = cp.client_kubeconfig(&format!("kube-proxy-{}", node.name), "system:kube-proxy", None)?;
        let proxy_config = json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": proxy_kubeconfig},
            "hostnameOverride": node.name,
            "clusterCIDR": cluster_cidrs,
            // The conntrack table's size and timeouts are the host's (global): left alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                          "udpTimeout": "0s", "udpStreamTimeout": "0s"},
            "metricsBindAddress": "127.0.0.1:10249",
        });
        std::fs::write(dir.join("kube-proxy.json"), serde_json::to_string_pretty(&proxy_config)?)?;
        // kube-proxy exits when its Node is deleted or changes its addresses, for its supervisor (a DaemonSet,
        // or systemd) to start it again: here a shell loop is that supervisor.
        let proxy = bin.join("kube-proxy").display().to_string();
        let config = format!("--config={}", dir.join("kube-proxy.json").display());
        let args = ["-c".into(), SUPERVISE.into(), "supervise".into(), proxy, config, "--v=1".into()];
        real.kube_proxy = Some(real.spawn(Path::new("sh"), &args, "kube-proxy")?);
        Ok(real)
    }

    fn start_kubelet(&mut self) -> Result<()> {
        let kubelet = self.spawn(&control_plane::bin_dir().join("kubelet"), &self.kubelet_args, "kubelet")?;
        self.kubelet = Some(kubelet);
        Ok(())
    }

    /// Stops the kubelet (SIGTERM, as systemd would) and starts it again; its pods keep running.
    pub fn restart_kubelet(&mut self) -> Result<()> {
        stop(&mut self.kubelet);
        self.start_kubelet()
    }

    /// `program` in the node: its network namespace and its mount namespace.
    pub fn command(&self, program: &Path) -> Command {
        // nsenter, not `ip netns exec` (which remounts /sys, hiding the v1 cgroup
        // hierarchies). The node's /run/netns path is opened before the mount
        // namespace is entered; `--root`/`--wd` take the holder's (a chroot's, under fresh-machine).
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={}", self.holder.id()))
            .args(["--mount", "--root", "--wd"])
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(program);
        c
    }

    fn spawn(&self, program: &Path, args: &[String], log: &str) -> Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{log}.log")))?;
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} in {}", program.display(), self.name))
    }

    /// A shell command in the node; its stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.command(Path::new("sh")).args(["-c", script]).output()?;
        if !out.status.success() {
            bail!("{script} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr -n k8s.io` against the node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(Path::new("ctr"))
            .args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("ctr {} in {}: {}", args.join(" "), self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The files of the node's CNI config directory (`/etc/cni/net.d`, where the DaemonSet installs).
    pub fn cni_configs(&self) -> Result<Vec<String>> {
        Ok(self.sh("ls /etc/cni/net.d")?.lines().map(str::to_string).collect())
    }

    /// The last lines of one of the node's logs (`kubelet`, `containerd`, `kube-proxy`).
    pub fn log_tail(&self, name: &str) -> String {
        crate::tail_of(&self.dir.join(format!("{name}.log")), 40)
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut ready: impl FnMut(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ready(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{what} in {} not up after {timeout:?}:\n{}", self.name, self.log_tail(what))
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // The kubelet first, so nothing restarts what goes next; then every
        // container (the processes in the node's cgroups), then the shims and
        // containerd (the processes in its mount namespace), then the holder,
        // and with it the namespace and its mounts.
        stop(&mut self.kube_proxy);
        stop(&mut self.kubelet);
        kill_cgroup_root(&self.cgroup_root);
        let holder = self.holder.id();
        for pid in crate::processes_in_mount_namespace_of(holder) {
            if pid != holder as i32 {
                // SAFETY: kill(2) with a pid read from /proc.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        crate::wait_until(Duration::from_secs(10), || crate::processes_in_mount_namespace_of(holder).len() <= 1);
        if let Some(mut c) = self.containerd.take() {
            let _ = c.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        remove_cgroup_root(&self.cgroup_root);
        crate::remove_tree(&self.image_store);
    }
}

/// Where the node of namespace `netns` keeps containerd's root: on disk under
/// `/var/tmp`, not in the test's directory, because `/tmp` may be a tmpfs (a
/// fresh root's is) and the `native` snapshotter makes every container a full
/// copy of its image: the network-policy-api suite's 50 agnhost containers
/// take about 4 GB. `tests/leftovers` checks for it and sweeps what a killed run left.
fn image_store(netns: &str) -> PathBuf {
    PathBuf::from(format!("/var/tmp/overlay-test-{netns}-containerd"))
}

/// Sends SIGTERM, waits up to 10 s, then SIGKILL.
fn stop(child: &mut Option<Child>) {
    let Some(mut c) = child.take() else { return };
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    if !crate::wait_until(Duration::from_secs(10), || c.try_wait().is_ok_and(|s| s.is_some())) {
        let _ = c.kill();
    }
    let _ = c.wait();
}

/// `tests/k8s/images <flag> RELEASE`: what it prints.
fn images_script(flag: &str) -> Result<String> {
    let script = crate::manifests::deploy_dir().join("../tests/k8s/images");
    let out = Command::new(&script).args([flag, control_plane::RELEASE]).output()?;
    if !out.status.success() {
        bail!("{}: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the release's images and the CoreDNS addon (`coredns.yaml`) are.
pub fn release_images_dir() -> Result<PathBuf> {
    Ok(PathBuf::from(images_script("--dir")?.trim()))
}

/// The images of the release's cache (`tests/k8s/images --names`): (archive, name).
pub fn release_images() -> Result<Vec<(PathBuf, String)>> {
    let images: Vec<(PathBuf, String)> = images_script("--names")?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, n)| (PathBuf::from(a), n.to_string()))
        .collect();
    let addon = release_images_dir()?.join("coredns.yaml");
    if let Some(missing) = images.iter().map(|(a, _)| a).chain([&addon]).find(|a| !a.is_file()) {
        bail!("no {} (run `make k8s`)", missing.display());
    }
    Ok(images)
}

/// The cgroup hierarchies of this host (`/sys/fs/cgroup/<name>`): the v1
/// ones, and with `unified` the cgroup2 one a hybrid host also mounts
/// (runc makes a container's cgroup there too).
fn hierarchies(unified: bool) -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    mounts
        .lines()
        .filter(|l| {
            l.split(" - ").nth(1).is_some_and(|fs| fs.starts_with("cgroup ") || (unified && fs.starts_with("cgroup2 ")))
        })
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .collect()
}

fn make_cgroup_root(root: &str) -> Result<()> {
    for h in hierarchies(false) {
        let dir = h.join(root);
        std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
        // A new cpuset starts with no CPUs and no memory nodes: it takes its parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(parent) = std::fs::read_to_string(h.join(file)) {
                std::fs::write(dir.join(file), parent.trim())?;
            }
        }
    }
    Ok(())
}

/// Every cgroup under `dir`, deepest first.
fn cgroups_under(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroups_under(&e.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

fn kill_cgroup_root(root: &str) {
    for _ in 0..50 {
        let mut alive = false;
        for h in hierarchies(true) {
            let mut groups = Vec::new();
            cgroups_under(&h.join(root), &mut groups);
            for g in groups {
                for pid in std::fs::read_to_string(g.join("cgroup.procs")).unwrap_or_default().lines() {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        alive = true;
                        // SAFETY: kill(2) with a pid read from the node's own cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_cgroup_root(root: &str) {
    for h in hierarchies(true) {
        let mut groups = Vec::new();
        cgroups_under(&h.join(root), &mut groups);
        for g in groups {
            if g.exists() {
                if let Err(e) = std::fs::remove_dir(&g) {
                    eprintln!("cannot remove the cgroup {}: {e}", g.display());
                }
            }
        }
    }
}

/// The Node's `Ready` condition status (`True`, `False`, `Unknown`) and its message.
pub fn node_ready(cp: &ControlPlane, name: &str) -> Option<(String, String)> {
    let node: Value = cp.get(&["node", name]).ok()?;
    let ready = node["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?.clone();
    Some((ready["status"].as_str()?.to_string(), ready["message"].as_str().unwrap_or_default().to_string()))
}
