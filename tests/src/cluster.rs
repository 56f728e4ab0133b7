//! A cluster of namespaces: an underlay bridge, nodes running `overlayd`,
//! pods behind each node's `cni0` bridge, and an `outside` host.
//!
//! ```text
//!  [pod]─veth─[cni0 node-N eth0]─veth─[br0 underlay 192.168.50.2 (etcd)]─veth─[outside .254, 203.0.113.1]
//! ```
//!
//! The underlay is dual stack: node N is also `fd00:50::1N` (as in the
//! flannel capture), the outside host `fd00:50::fe` and `2001:db8::1`.
//! IPv6 addresses are added without duplicate address detection, so they
//! are usable at once.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::Ipv4Net;
use proto::SubnetEnv;

use crate::etcd::Etcd;
use crate::netns::Netns;

/// The etcd key prefix the tests use (flannel's default).
pub const PREFIX: &str = "/coreos.com/network";
/// The outside host's "internet" address (TEST-NET-3), inside the test only.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The outside host's underlay address: the nodes' default gateway.
pub const OUTSIDE_UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 254);
/// The outside host's IPv6 "internet" address (documentation prefix), inside the test only.
pub const OUTSIDE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The outside host's IPv6 underlay address: the nodes' IPv6 default gateway.
pub const OUTSIDE_UNDERLAY_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0xfe);
/// A dual-stack net-conf: flannel's capture (shared/compat).
pub const DUAL_STACK_CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
/// Where etcd listens, on the underlay bridge.
pub const ETCD_IP: &str = "192.168.50.2";
/// Where the Kubernetes API test double listens, on the underlay bridge.
pub const KUBE_API: &str = "192.168.50.2:6443";

/// How the cluster is set up.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The net-conf JSON stored at `<prefix>/config`; `None` stores nothing.
    pub config: Option<String>,
    /// `--resync-interval` for every daemon.
    pub resync: String,
    /// A fixed id (names are `ov<id>...`) instead of a random one.
    pub id: Option<String>,
    /// etcd members (on 192.168.50.2, .3, ...); nodes get all their endpoints.
    pub etcd_members: usize,
    /// The MTU of the nodes' underlay links (both ends of each veth to the underlay bridge).
    pub underlay_mtu: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            config: Some(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#.into()),
            resync: "1s".into(),
            id: None,
            etcd_members: 1,
            underlay_mtu: 1500,
        }
    }
}

/// A pod: a namespace with one address on its node's subnet.
#[derive(Debug)]
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// Its IPv4 address (unspecified when the network is IPv6-only).
    pub ip: Ipv4Addr,
    /// Its IPv6 address, when the network carries IPv6.
    pub ip6: Option<Ipv6Addr>,
}

/// A node: a namespace on the underlay, maybe running `overlayd`.
pub struct Node {
    /// Kills the daemon before anything else is dropped.
    daemon: Option<Child>,
    /// Pods behind this node.
    pub pods: Vec<Pod>,
    /// Its namespace.
    pub ns: Netns,
    /// 1-based index.
    pub index: u8,
    /// Underlay address.
    pub ip: Ipv4Addr,
    /// IPv6 underlay address.
    pub ip6: Ipv6Addr,
    /// Where its daemon writes subnet.env.
    pub subnet_file: PathBuf,
    /// Its daemon's log.
    pub log: PathBuf,
    /// Its name in the Kubernetes API (Kubernetes mode).
    pub name: String,
    /// Extra daemon flags.
    pub flags: Vec<String>,
    etcd_endpoint: String,
    resync: String,
    name_prefix: String,
}

/// The whole test cluster; dropping it removes everything.
pub struct Cluster {
    /// Nodes, in order of creation.
    pub nodes: Vec<Node>,
    /// The etcd server (the first member, when there are several).
    pub etcd: Etcd,
    /// The other etcd members.
    pub etcd_others: Vec<Etcd>,
    /// The outside host.
    pub outside: Netns,
    /// The underlay namespace (bridge and etcd).
    pub underlay: Netns,
    /// The Kubernetes API test double, in Kubernetes mode.
    pub kube: Option<crate::kube_api::KubeApi>,
    /// A scratch directory for logs, subnet files and etcd data.
    pub dir: PathBuf,
    /// Unique id of this cluster.
    pub id: String,
    options: ClusterOptions,
    /// The index of the next node: never reused, so names and addresses of
    /// nodes removed earlier in a run are not taken again.
    next_index: u8,
}

impl Cluster {
    /// Builds the underlay, etcd and the outside host, with no nodes yet.
    pub fn new(options: ClusterOptions) -> Result<Self> {
        let id = options.id.clone().unwrap_or_else(crate::random_suffix);
        let dir = std::env::temp_dir().join(format!("overlay-test-{id}"));
        std::fs::create_dir_all(&dir)?;
        let underlay = Netns::new(&format!("ov{id}u"))?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"])?;
        underlay.ip(&["addr", "add", "fd00:50::2/64", "dev", "br0", "nodad"])?;
        let etcd_ips: Vec<String> = (0..options.etcd_members.max(1)).map(|i| format!("192.168.50.{}", 2 + i)).collect();
        for extra in &etcd_ips[1..] {
            underlay.ip(&["addr", "add", &format!("{extra}/24"), "dev", "br0"])?;
        }
        underlay.ip(&["link", "set", "br0", "up"])?;
        let outside = Netns::new(&format!("ov{id}x"))?;
        underlay.ip(&["link", "add", "x", "type", "veth", "peer", "name", "eth0", "netns", &outside.name])?;
        underlay.ip(&["link", "set", "x", "master", "br0", "up"])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE_UNDERLAY_IP}/24"), "dev", "eth0"])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/32"), "dev", "lo"])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE_UNDERLAY_IP6}/64"), "dev", "eth0", "nodad"])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP6}/128"), "dev", "lo"])?;
        outside.ip(&["link", "set", "eth0", "up"])?;
        let ips: Vec<&str> = etcd_ips.iter().map(String::as_str).collect();
        let mut members = Etcd::start_cluster(&underlay, &ips, dir.join("etcd"))?;
        let etcd = members.remove(0);
        if let Some(config) = &options.config {
            etcd.put(&format!("{PREFIX}/config"), config)?;
        }
        Ok(Cluster {
            nodes: Vec::new(),
            etcd,
            etcd_others: members,
            outside,
            underlay,
            kube: None,
            dir,
            id,
            options,
            next_index: 1,
        })
    }

    /// The Kubernetes name the next node added gets.
    pub fn next_node_name(&self) -> String {
        format!("node-{}", self.next_index)
    }

    /// Adds node N+1 to the underlay (no daemon yet) and returns its index in `nodes`.
    pub fn add_node(&mut self, flags: &[&str]) -> Result<usize> {
        let index = self.next_index;
        self.next_index += 1;
        let ns = Netns::new(&format!("ov{}n{index}", self.id))?;
        let leg = format!("n{index}");
        let mtu = self.options.underlay_mtu.to_string();
        self.underlay.ip(&[
            "link", "add", &leg, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu, "netns", &ns.name,
        ])?;
        self.underlay.ip(&["link", "set", &leg, "master", "br0", "up"])?;
        let ip = Ipv4Addr::new(192, 168, 50, 10 + index);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        let ip6 = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x10 + u16::from(index));
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &OUTSIDE_UNDERLAY_IP.to_string()])?;
        ns.ip(&["-6", "route", "add", "default", "via", &OUTSIDE_UNDERLAY_IP6.to_string()])?;
        self.nodes.push(Node {
            daemon: None,
            pods: Vec::new(),
            ns,
            index,
            ip,
            ip6,
            subnet_file: self.dir.join(format!("n{index}/subnet.env")),
            log: self.dir.join(format!("n{index}.log")),
            name: format!("node-{index}"),
            flags: flags.iter().map(|s| s.to_string()).collect(),
            etcd_endpoint: std::iter::once(&self.etcd)
                .chain(&self.etcd_others)
                .map(Etcd::endpoint)
                .collect::<Vec<_>>()
                .join(","),
            resync: self.options.resync.clone(),
            name_prefix: format!("ov{}", self.id),
        });
        Ok(self.nodes.len() - 1)
    }

    /// Adds a node, starts its daemon, waits until it is ready, adds `pods` pods.
    pub fn add_ready_node(&mut self, flags: &[&str], pods: usize) -> Result<usize> {
        let i = self.add_node(flags)?;
        let node = &mut self.nodes[i];
        node.start()?;
        node.wait_ready(Duration::from_secs(20))?;
        for _ in 0..pods {
            node.add_pod()?;
        }
        Ok(i)
    }

    /// Starts the Kubernetes API test double on the underlay (`KUBE_API`)
    /// and writes the kubeconfig and net-conf.json the nodes will use. The
    /// node IPAM's cluster CIDR is the net-conf's Network, as it must be.
    pub fn start_kube_api(&mut self, net_conf: &str) -> Result<()> {
        let api = crate::kube_api::KubeApi::start(&self.underlay, KUBE_API.parse()?, cluster_cidrs(net_conf)?)?;
        api.write_kubeconfig(&self.dir.join("kubeconfig"))?;
        std::fs::write(self.dir.join("net-conf.json"), net_conf)?;
        self.kube = Some(api);
        Ok(())
    }

    /// Starts the API test double as a cluster serves it (HTTPS, bearer
    /// token), writes a pod's service-account files to `dir/serviceaccount`
    /// and the net-conf.json; returns the credentials.
    pub fn start_kube_api_in_cluster(&mut self, net_conf: &str) -> Result<crate::kube_api::Credentials> {
        let (api, credentials) =
            crate::kube_api::KubeApi::start_secure(&self.underlay, KUBE_API.parse()?, cluster_cidrs(net_conf)?)?;
        credentials.write_service_account(&self.dir.join("serviceaccount"), "kube-overlay")?;
        std::fs::write(self.dir.join("net-conf.json"), net_conf)?;
        self.kube = Some(api);
        Ok(credentials)
    }

    /// The API test double; panics outside Kubernetes mode.
    pub fn api(&self) -> &crate::kube_api::KubeApi {
        self.kube.as_ref().expect("start_kube_api first")
    }

    /// Adds node N+1 in Kubernetes mode: registered in the API (with a
    /// podCIDR when `allocate`), its daemon configured but not started.
    pub fn add_kube_node(&mut self, allocate: bool, extra: &[&str]) -> Result<usize> {
        let name = self.next_node_name();
        let kubeconfig = self.dir.join("kubeconfig");
        let net_conf = self.dir.join("net-conf.json");
        let mut flags = vec![
            "--kube-subnet-mgr",
            "--node-name",
            &name,
            "--kubeconfig",
            kubeconfig.to_str().unwrap_or_default(),
            "--net-config-path",
            net_conf.to_str().unwrap_or_default(),
        ];
        flags.extend_from_slice(extra);
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let i = self.add_node(&flags)?;
        self.api().add_node(&name, self.nodes[i].ip, allocate)?;
        Ok(i)
    }

    /// Adds a node in Kubernetes mode (a podCIDR allocated), starts its
    /// daemon, waits until it is ready, adds `pods` pods.
    pub fn add_ready_kube_node(&mut self, extra: &[&str], pods: usize) -> Result<usize> {
        let i = self.add_kube_node(true, extra)?;
        let node = &mut self.nodes[i];
        node.start()?;
        node.wait_ready(Duration::from_secs(20))?;
        for _ in 0..pods {
            node.add_pod()?;
        }
        Ok(i)
    }

    /// Every pod of every node, with its node index.
    pub fn pods(&self) -> Vec<(usize, &Pod)> {
        self.nodes.iter().enumerate().flat_map(|(i, n)| n.pods.iter().map(move |p| (i, p))).collect()
    }
}

/// The node IPAM's cluster CIDRs for a net-conf: its networks, IPv4 first,
/// as they must be (`--cluster-cidr` and the net-conf agree).
fn cluster_cidrs(net_conf: &str) -> Result<Vec<ipnet::IpNet>> {
    let config = proto::NetConfig::parse(net_conf)?;
    Ok(config.families().filter_map(|f| config.pool(f).map(|p| p.network)).collect())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        self.kube = None;
        self.etcd.stop();
        self.etcd_others.clear();
        crate::remove_tree(&self.dir);
    }
}

impl Node {
    /// Starts `overlayd` in this node's namespace.
    pub fn start(&mut self) -> Result<()> {
        if self.daemon.is_some() {
            bail!("node {} already runs a daemon", self.index);
        }
        std::fs::create_dir_all(self.subnet_file.parent().unwrap_or(&self.subnet_file))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let bin = crate::workspace_bin("overlayd");
        let child = self
            .command(&bin)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.daemon = Some(child);
        Ok(())
    }

    /// The daemon's command line.
    pub fn command(&self, bin: &std::path::Path) -> Command {
        let mut c = self.ns.command(bin.to_str().unwrap_or("overlayd"), &[]);
        c.env("OVERLAYD_LOG", "info,overlayd=debug").env("NO_COLOR", "1");
        // A node's own --etcd-endpoints replaces the cluster's (clap would append it).
        if !self.flags.iter().any(|f| f == "--etcd-endpoints") {
            c.args(["--etcd-endpoints", &self.etcd_endpoint]);
        }
        c.arg("--subnet-file").arg(&self.subnet_file).args(["--resync-interval", &self.resync]).args(&self.flags);
        // `make test-fast-path`: every daemon of the suites it runs carries pods' traffic on the fast path.
        if std::env::var("OVERLAY_TEST_FAST_PATH").is_ok_and(|v| v == "1")
            && !self.flags.iter().any(|f| f == "--fast-path")
        {
            c.arg("--fast-path");
        }
        c
    }

    /// Waits until the daemon wrote its subnet file (it does so once ready).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.subnet_env().is_ok() {
                return Ok(());
            }
            if let Some(child) = self.daemon.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.daemon = None;
                    bail!("overlayd on node {} exited with {status}:\n{}", self.index, self.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("node {} not ready after {timeout:?}:\n{}", self.index, self.log_text())
    }

    /// Sends SIGTERM and waits; returns the exit status and how long it took.
    pub fn stop(&mut self) -> Result<(ExitStatus, Duration)> {
        let mut child = self.daemon.take().ok_or_else(|| anyhow!("node {} runs no daemon", self.index))?;
        let started = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        Ok((status, started.elapsed()))
    }

    /// Waits for the daemon to exit by itself (bad input) within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.daemon.as_mut().ok_or_else(|| anyhow!("no daemon"))?;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.daemon = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("overlayd on node {} still running after {timeout:?}", self.index)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// Whether the daemon process is still running.
    pub fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The subnet file the daemon wrote.
    pub fn subnet_env(&self) -> Result<SubnetEnv> {
        let text = std::fs::read_to_string(&self.subnet_file)?;
        Ok(SubnetEnv::parse(&text)?)
    }

    /// This node's IPv4 pod subnet, from its subnet file.
    pub fn subnet(&self) -> Result<Ipv4Net> {
        self.subnet_env()?.subnet_network().ok_or_else(|| anyhow!("node {} has no IPv4 subnet", self.index))
    }

    /// This node's IPv6 pod subnet, from its subnet file.
    pub fn subnet_v6(&self) -> Result<ipnet::Ipv6Net> {
        self.subnet_env()?.ipv6_subnet_network().ok_or_else(|| anyhow!("node {} has no IPv6 subnet", self.index))
    }

    /// The conflist entry the harness's pods are made with.
    pub fn cni_conf(&self) -> serde_json::Value {
        let dir = self.subnet_file.parent().unwrap_or(&self.subnet_file);
        serde_json::json!({"cniVersion": "1.0.0", "name": "overlay", "type": "overlay-cni",
                           "subnetFile": self.subnet_file, "dataDir": dir.join("ipam")})
    }

    /// Adds a pod through `overlay-cni` ADD, as a container runtime would.
    pub fn add_pod(&mut self) -> Result<Ipv4Addr> {
        let k = self.pods.len() + 1;
        let ns = Netns::new(&format!("{}p{}{}", self.name_prefix, self.index, k))?;
        let id = format!("pod-{}-{k}", self.index);
        let reply = crate::cni::call(&self.ns, "ADD", &id, &ns.path(), "eth0", &self.cni_conf())?;
        if !reply.ok {
            bail!("overlay-cni ADD failed on node {}: {} {}", self.index, reply.json, reply.stderr);
        }
        let ips = crate::cni::result_ips(&reply.json);
        if ips.is_empty() {
            bail!("no address in {}", reply.json);
        }
        let ip = ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(*v4),
            std::net::IpAddr::V6(_) => None,
        });
        let ip6 = ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V6(v6) => Some(*v6),
            std::net::IpAddr::V4(_) => None,
        });
        let ip = ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        self.pods.push(Pod { ns, ip, ip6 });
        Ok(ip)
    }

    /// `ip -6 neigh`, `bridge fdb` and `ip -6 route` of `overlay-v6.1`, in one text.
    pub fn v6_entries(&self) -> String {
        let neigh = self.ns.ip(&["-6", "neigh", "show", "dev", "overlay-v6.1"]).unwrap_or_default();
        let fdb = crate::netns::run("bridge", &["-n", &self.ns.name, "fdb", "show", "dev", "overlay-v6.1"])
            .unwrap_or_default();
        let routes = self.ns.ip(&["-6", "route", "show", "dev", "overlay-v6.1"]).unwrap_or_default();
        format!("{neigh}{fdb}{routes}")
    }

    /// Whether this node holds all three IPv6 entries for a peer with `subnet`, `mac` and underlay `dst`.
    pub fn has_peer_v6(&self, subnet: ipnet::Ipv6Net, mac: &str, dst: Ipv6Addr) -> bool {
        let gw = subnet.network().to_string();
        let text = self.v6_entries();
        text.lines().any(|l| l.starts_with(&format!("{gw} ")) && l.contains(mac) && l.contains("PERMANENT"))
            && text.lines().any(|l| l.starts_with(mac) && l.contains(&format!("dst {dst} ")))
            && text.lines().any(|l| l.starts_with(&format!("{subnet} via {gw} ")) && l.contains("onlink"))
    }

    /// This node's IPv6 VTEP MAC, from its device.
    pub fn vtep_mac_v6(&self) -> Result<String> {
        let text = self.ns.ip(&["-j", "link", "show", "overlay-v6.1"])?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        v[0]["address"].as_str().map(String::from).ok_or_else(|| anyhow!("no address on overlay-v6.1"))
    }

    /// `ip neigh show dev overlay.1` on this node.
    pub fn neighbours(&self) -> String {
        self.ns.ip(&["neigh", "show", "dev", "overlay.1"]).unwrap_or_default()
    }

    /// `bridge fdb show dev overlay.1` on this node.
    pub fn fdb(&self) -> String {
        crate::netns::run("bridge", &["-n", &self.ns.name, "fdb", "show", "dev", "overlay.1"]).unwrap_or_default()
    }

    /// `ip route` on this node.
    pub fn routes(&self) -> String {
        self.ns.ip(&["route"]).unwrap_or_default()
    }

    /// Whether this node holds all three entries for a peer with `subnet` and `mac`.
    pub fn has_peer(&self, subnet: Ipv4Net, mac: &str) -> bool {
        let gw = subnet.network().to_string();
        self.neighbours().lines().any(|l| l.starts_with(&format!("{gw} ")) && l.contains(mac))
            && self.fdb().lines().any(|l| l.starts_with(mac))
            && self.routes().contains(&format!("{subnet} via {gw} dev overlay.1"))
    }

    /// Whether any of the three entries for `subnet` or `mac` remains.
    pub fn has_any_entry_for(&self, subnet: Ipv4Net, mac: &str) -> bool {
        let gw = format!("{} ", subnet.network());
        self.neighbours().lines().any(|l| l.starts_with(&gw) || l.contains(mac))
            || self.fdb().contains(mac)
            || self.routes().contains(&subnet.to_string())
    }

    /// This node's VTEP MAC, from its device.
    pub fn vtep_mac(&self) -> Result<String> {
        let text = self.ns.ip(&["-j", "link", "show", "overlay.1"])?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        v[0]["address"].as_str().map(String::from).ok_or_else(|| anyhow!("no address on overlay.1"))
    }

    /// Bytes sent through this node's VXLAN device.
    pub fn vxlan_tx_bytes(&self) -> Result<u64> {
        let text = self.ns.ip(&["-j", "-s", "link", "show", "overlay.1"])?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        v[0]["stats64"]["tx"]["bytes"].as_u64().ok_or_else(|| anyhow!("no stats on overlay.1"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
