//! Command-line flags, grouped by what they configure: the node, the etcd
//! store, the Kubernetes store. Every flag can also be set through an
//! environment variable.
//!
//! overlayd is a drop-in for flanneld: every flag of flanneld's vxlan, etcd
//! and Kubernetes feature set works under its flannel name (an alias where
//! the name differs), in Go's forms too (`-iface=eth0`, `--ip-masq=false`),
//! and so does flanneld's environment (`FLANNELD_IFACE`). See [`flannel`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

/// overlayd: a VXLAN pod network node daemon, wire-compatible with flannel.
#[derive(Debug, Parser)]
#[command(
    name = "overlayd",
    version = crate::version::LINE,
    about,
    long_about = None,
    // A flag given twice takes its last value, as flanneld's (Go's flag package) do.
    args_override_self = true,
    after_help = "flanneld's command line works as it is: its flags (one dash or two, --flag=false for booleans), \
                  and its FLANNELD_<FLAG> variables; a flag it has that overlayd does not follow is accepted \
                  with a warning that says what overlayd does instead."
)]
pub struct Cli {
    /// What to do; without a command, run the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Daemon settings.
    #[command(flatten)]
    pub run: RunArgs,
    /// How it logs.
    #[command(flatten)]
    pub log: LogArgs,
}

/// How overlayd logs (every command).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log level or filter: error, warn, info, debug, trace, off, or a filter
    /// such as info,overlayd=debug. Default: info (or flanneld's -v).
    #[arg(long, env = "OVERLAYD_LOG", value_name = "FILTER", global = true, value_parser = crate::logging::parse_filter)]
    pub log_level: Option<String>,
    /// Log line format: text, or json (one object per line).
    #[arg(long, env = "OVERLAYD_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: crate::logging::LogFormat,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Remove what the daemon made on this host: the VXLAN devices (and with
    /// them every peer entry), the nftables tables and the subnet file. The
    /// etcd lease is left to expire. Refused while overlayd runs.
    Cleanup(CleanupArgs),
    /// Ask the running daemon of this node how it is: its lease and VTEPs,
    /// its peers and the leases it skipped (and why), each resource's
    /// readiness, the last repair and the last error.
    Status(StatusArgs),
    /// Ask the running daemon whether policy allows a new connection from
    /// SRC to DST, and which rule decides: the Admin tier, NetworkPolicy,
    /// the Baseline tier, or the default, from the model the kernel holds.
    Explain(ExplainArgs),
    /// Install the CNI plugin and the network config list onto the host,
    /// each through a rename, so a container runtime never reads half a
    /// file. The DaemonSet's init container runs this.
    InstallCni(InstallCniArgs),
}

/// How far `cleanup` goes.
#[derive(Debug, Clone, Default, Args)]
pub struct CleanupArgs {
    /// Also remove flanneld's devices (`flannel.<VNI>`, `flannel-v6.<VNI>`)
    /// that overlayd did not adopt; without it, only an adopted one goes.
    #[arg(long)]
    pub include_flannel: bool,
    /// Print what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where `status` asks.
#[derive(Debug, Clone, Default, Args)]
pub struct StatusArgs {
    /// The daemon's health address. Default: --health-addr (OVERLAYD_HEALTH_ADDR)
    /// when set, else the local socket beside --subnet-file (overlayd.sock).
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<SocketAddr>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `explain` asks, and where.
#[derive(Debug, Clone, Default, Args)]
pub struct ExplainArgs {
    /// The sender: a pod as namespace/name, or an address.
    pub src: String,
    /// The receiver: a pod as namespace/name, or an address.
    pub dst: String,
    /// The port and protocol: 80/tcp, 53/udp, 9000/sctp (TCP when no protocol is given).
    pub port: String,
    /// The family, when both ends have both (4 or 6; default 4).
    #[arg(long)]
    pub family: Option<u8>,
    /// The daemon's health address (as for `status`).
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<SocketAddr>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where `install-cni` takes the plugin and the conflist from, and where it puts them.
#[derive(Debug, Clone, Args)]
pub struct InstallCniArgs {
    /// The plugin binary to install. Default: `overlay-cni` beside this overlayd.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The host's CNI binary directory (the runtime's `bin_dir`).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The network config list to install, e.g. the ConfigMap's `cni-conf.json`.
    #[arg(long)]
    pub conflist: PathBuf,
    /// The host's CNI config directory (the runtime's `conf_dir`).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// File name of the installed conflist; runtimes take the first in lexical order.
    #[arg(long, default_value = "10-overlay.conflist")]
    pub conflist_name: String,
}

/// Settings of the daemon.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The node: underlay, device, files, timers.
    #[command(flatten)]
    pub node: NodeArgs,
    /// The etcd lease store (the default).
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The Kubernetes lease store (`--kube-subnet-mgr`).
    #[command(flatten)]
    pub kube: KubeArgs,
    /// flanneld's flags that have no overlayd name of their own.
    #[command(flatten)]
    pub flannel: FlannelArgs,
}

/// A boolean flag as Go's flag package takes it: `--ip-masq`, `--ip-masq=true`, `--ip-masq=false`.
macro_rules! go_bool {
    () => {
        clap::builder::BoolishValueParser::new()
    };
}

/// What this node builds and where.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Underlay interface, by name or by one of its addresses; repeat it to
    /// give several in order of preference (the first that exists is used).
    /// Default: the interface of the IPv4 default route (IPv6-only: of the
    /// IPv6 default route).
    #[arg(long, env = "OVERLAYD_IFACE", value_name = "NAME|ADDRESS", action = ArgAction::Append)]
    pub iface: Vec<String>,
    /// Regular expression for the underlay: the first address, else
    /// interface name, it matches; repeat it for several in order of
    /// preference. Used when no --iface is given.
    #[arg(long, env = "OVERLAYD_IFACE_REGEX", value_name = "REGEX", action = ArgAction::Append)]
    pub iface_regex: Vec<String>,
    /// Use the interface of the route to this address as the underlay. Used
    /// when neither --iface nor --iface-regex is given.
    #[arg(long, env = "OVERLAYD_IFACE_CAN_REACH", value_name = "ADDRESS")]
    pub iface_can_reach: Option<IpAddr>,
    /// Address peers send VXLAN packets to, when it differs from the
    /// interface's (behind 1:1 NAT). Default: the interface's address.
    #[arg(long, env = "OVERLAYD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address peers send VXLAN packets to, when it differs from the
    /// interface's. Default: the interface's global IPv6 address.
    #[arg(long, env = "OVERLAYD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where to write the subnet file the CNI plugin reads.
    #[arg(long, env = "OVERLAYD_SUBNET_FILE", default_value = "/run/overlay/subnet.env", global = true)]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network (NAT outgoing).
    #[arg(long, env = "OVERLAYD_IP_MASQ", num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = go_bool!(), action = ArgAction::Set)]
    pub ip_masq: bool,
    /// Name of the VXLAN device.
    /// Default: `overlay.<VNI>` (flannel's is `flannel.<VNI>`).
    #[arg(long, env = "OVERLAYD_DEVICE", global = true)]
    pub device: Option<String>,
    /// Name of the IPv6 VXLAN device (dual stack, IPv6-only). Default: `overlay-v6.<VNI>`.
    #[arg(long, env = "OVERLAYD_DEVICE_V6", global = true)]
    pub device_v6: Option<String>,
    /// How often to re-read the whole node and repair drift (e.g. 30s, 500ms, 1m30s).
    #[arg(long, env = "OVERLAYD_RESYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// TX checksum offload of the VXLAN devices. `auto`: off on kernels up to
    /// 5.7, whose VXLAN checksums break when the outer port is SNATed
    /// (flannel's `ethtool -K flannel.1 tx-checksum-ip-generic off`), on after.
    #[arg(long, env = "OVERLAYD_VXLAN_TX_CHECKSUM_OFFLOAD", value_enum, default_value = "auto")]
    pub vxlan_tx_checksum_offload: crate::dataplane::offload::OffloadSetting,
    /// Carry the packets of established pod connections past the host's
    /// forwarding, bridge and netfilter: a per-flow cache in tc/eBPF that
    /// the ordinary path fills (docs/architecture.md, "The fast path").
    /// NetworkPolicy stays exact. Needs Linux 6.6 or later; sets
    /// net.netfilter.nf_conntrack_tcp_be_liberal=1.
    #[arg(long, env = "OVERLAYD_FAST_PATH", num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = go_bool!(), action = ArgAction::Set)]
    pub fast_path: bool,
    /// Receive buffer of the kernel event socket, in bytes. A burst of
    /// kernel events larger than this (and than what the daemon reads
    /// meanwhile) is lost, and the whole node is read back.
    #[arg(long, env = "OVERLAYD_KERNEL_EVENT_BUFFER", value_name = "BYTES", default_value_t = overlay_netlink::DEFAULT_BUFFER)]
    pub kernel_event_buffer: usize,
    /// Address for /healthz, /readyz and /metrics, e.g. 127.0.0.1:8471. Off when unset.
    #[arg(long, env = "OVERLAYD_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
}

impl NodeArgs {
    /// How the underlay is chosen: --iface, else --iface-regex, else
    /// --iface-can-reach, else the default route (flanneld's order).
    pub fn underlay_selector(&self) -> Result<crate::dataplane::underlay::Selector, String> {
        use crate::dataplane::underlay::Selector;
        if !self.iface.is_empty() {
            return Ok(Selector::Named(self.iface.clone()));
        }
        if !self.iface_regex.is_empty() {
            let patterns = self.iface_regex.iter().map(|p| {
                regex::Regex::new(p).map_err(|e| format!("--iface-regex {p:?} is not a regular expression: {e}"))
            });
            return patterns.collect::<Result<Vec<_>, _>>().map(Selector::Matching);
        }
        Ok(match self.iface_can_reach {
            Some(ip) => Selector::Reaching(ip),
            None => Selector::DefaultRoute,
        })
    }
}

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(secret)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Where leases come from on bare hosts.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "etcd")]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(long, env = "OVERLAYD_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379",
          value_parser = parse_endpoint)]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix holding `config` and `subnets/` (flannel's layout).
    #[arg(long, env = "OVERLAYD_ETCD_PREFIX", default_value = "/coreos.com/network", value_parser = parse_prefix)]
    pub etcd_prefix: String,
    /// CA bundle to verify etcd's certificate.
    #[arg(long, env = "OVERLAYD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, env = "OVERLAYD_ETCD_CERTFILE", requires = "etcd_keyfile")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, env = "OVERLAYD_ETCD_KEYFILE", requires = "etcd_certfile")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user (etcd's authentication); needs --etcd-password.
    #[arg(long, env = "OVERLAYD_ETCD_USERNAME", requires = "etcd_password")]
    pub etcd_username: Option<String>,
    /// Password of --etcd-username. Prefer the environment to the command line, which `ps` shows.
    #[arg(long, env = "OVERLAYD_ETCD_PASSWORD", hide_env_values = true, requires = "etcd_username")]
    pub etcd_password: Option<Secret>,
    /// Lifetime of the etcd lease on our subnet; renewed at a third of it.
    #[arg(long, env = "OVERLAYD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,
    /// Renew the lease this many minutes before it expires (flanneld's
    /// setting), instead of at a third of its lifetime.
    #[arg(long, env = "OVERLAYD_SUBNET_LEASE_RENEW_MARGIN", value_name = "MINUTES")]
    pub subnet_lease_renew_margin: Option<u64>,
}

/// Where leases come from in a Kubernetes cluster.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes")]
pub struct KubeArgs {
    /// Kubernetes mode: the subnet is this Node's spec.podCIDR and peers are
    /// the Nodes carrying our annotations; etcd is not used.
    #[arg(long, env = "OVERLAYD_KUBE_SUBNET_MGR", num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = go_bool!(), action = ArgAction::Set)]
    pub kube_subnet_mgr: bool,
    /// This node's name in Kubernetes (the DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig to reach the API server. Default: the in-cluster service
    /// account, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "OVERLAYD_KUBECONFIG", visible_alias = "kubeconfig-file")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL, over the kubeconfig's or the in-cluster one.
    #[arg(long, env = "OVERLAYD_KUBE_API_URL", value_name = "URL", value_parser = parse_endpoint)]
    pub kube_api_url: Option<String>,
    /// The network config (net-conf.json) in Kubernetes mode, usually mounted from a ConfigMap.
    #[arg(long, env = "OVERLAYD_NET_CONFIG_PATH", default_value = "/etc/overlay/net-conf.json")]
    pub net_config_path: PathBuf,
    /// Prefix of the Node annotations we publish and read (flannel's by default).
    #[arg(long, env = "OVERLAYD_KUBE_ANNOTATION_PREFIX", default_value = proto::node_annotations::DEFAULT_PREFIX)]
    pub kube_annotation_prefix: String,
    /// Set the Node's NetworkUnavailable condition to False once the network is up.
    #[arg(long, env = "OVERLAYD_SET_NODE_NETWORK_UNAVAILABLE", num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true", value_parser = go_bool!(), action = ArgAction::Set)]
    pub set_node_network_unavailable: bool,
    /// Enforce NetworkPolicy (networking.k8s.io/v1) on this node's pods, with
    /// nftables. Turn it off when another agent (Calico's Felix in Canal,
    /// kube-router, kube-network-policies) enforces policy.
    #[arg(long, env = "OVERLAYD_NETWORK_POLICY", num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true", value_parser = go_bool!(), action = ArgAction::Set)]
    pub network_policy: bool,
    /// Log each flow that policy drops (NetworkPolicy and ClusterNetworkPolicy):
    /// one line naming the source and destination pods, the protocol and port,
    /// and the policy and tier that decided. The kernel hands at most 100
    /// dropped packets a second per direction to overlayd (NFLOG group 2718).
    #[arg(long, env = "OVERLAYD_LOG_POLICY_DROPS", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = go_bool!(), action = ArgAction::Set)]
    pub log_policy_drops: bool,
}

/// flanneld's flags that overlayd has no name of its own for: each is
/// mapped onto overlayd's way, or accepted with a warning that says what
/// overlayd does instead. See [`FlannelArgs::resolve`].
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "flanneld's flags (accepted as a drop-in)")]
pub struct FlannelArgs {
    /// flanneld's health address; with --healthz-port, sets --health-addr.
    #[arg(long, env = "OVERLAYD_HEALTHZ_IP", value_name = "ADDRESS")]
    pub healthz_ip: Option<IpAddr>,
    /// flanneld's health port (0: off); with --healthz-ip (default 0.0.0.0), sets --health-addr.
    #[arg(long, env = "OVERLAYD_HEALTHZ_PORT", value_name = "PORT")]
    pub healthz_port: Option<u16>,
    /// flanneld's iptables resync period: overlayd uses nftables and repairs
    /// drift on kernel events and every --resync-interval. Accepted, warned.
    #[arg(long, value_name = "SECONDS")]
    pub iptables_resync: Option<String>,
    /// flanneld's FORWARD accept rules: overlayd adds none (README,
    /// "Forwarding"). Accepted, warned.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool!(),
          action = ArgAction::Set)]
    pub iptables_forward_rules: Option<bool>,
    /// flanneld's log verbosity (glog's -v): 0-3 is info, 4 and more is debug, unless --log-level is set.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u32>,
    /// flanneld's directory of per-network subnet files (its multi-network
    /// mode, which overlay does not have). Accepted, warned.
    #[arg(long, value_name = "DIR", hide = true)]
    pub subnet_dir: Option<String>,
    /// glog's output flags, which flanneld's units still carry: overlayd
    /// logs to stderr (journald, `kubectl logs`). Accepted, warned.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub logtostderr: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub alsologtostderr: Option<String>,
    #[arg(long = "log_dir", hide = true)]
    pub log_dir: Option<String>,
    #[arg(long = "log_file", hide = true)]
    pub log_file: Option<String>,
    #[arg(long, hide = true)]
    pub stderrthreshold: Option<String>,
    #[arg(long, hide = true)]
    pub vmodule: Option<String>,
    #[arg(long = "log_backtrace_at", hide = true)]
    pub log_backtrace_at: Option<String>,
    /// flanneld's IPsec backend's strongSwan settings: overlay has the vxlan backend only. Accepted, warned.
    #[arg(long, hide = true)]
    pub charon_executable_path: Option<String>,
    #[arg(long, hide = true)]
    pub charon_viciuri: Option<String>,
}

/// What the flannel flags come to: settings over overlayd's, and warnings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// A health address from --healthz-ip and --healthz-port.
    pub health_addr: Option<SocketAddr>,
    /// The log filter -v asks for, when OVERLAYD_LOG does not say.
    pub log_filter: Option<&'static str>,
    /// One line for each flag accepted but not followed, saying what overlayd does instead.
    pub warnings: Vec<String>,
}

impl FlannelArgs {
    /// Maps flanneld's flags onto overlayd's settings.
    pub fn resolve(&self) -> Resolved {
        let mut resolved = Resolved::default();
        if let Some(port) = self.healthz_port.filter(|p| *p != 0) {
            let ip = self.healthz_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            resolved.health_addr = Some(SocketAddr::new(ip, port));
        }
        resolved.log_filter = self.verbosity.map(|v| if v >= 4 { "debug" } else { "info" });
        if self.iptables_resync.is_some() {
            resolved.warnings.push(
                "--iptables-resync is flanneld's: overlayd keeps its rules in nftables and repairs them on kernel \
                 events within a second, and at every --resync-interval; the flag is ignored"
                    .into(),
            );
        }
        if let Some(forward) = self.iptables_forward_rules {
            resolved.warnings.push(format!(
                "--iptables-forward-rules={forward} is flanneld's: overlayd adds no FORWARD rules (an nftables \
                 accept cannot override another table's drop policy); on a host whose FORWARD policy drops, accept \
                 the cluster network there (README, \"Forwarding\"); the flag is ignored"
            ));
        }
        if self.subnet_dir.is_some() {
            resolved.warnings.push(
                "--subnet-dir is flanneld's multi-network mode, which overlay does not have: the one subnet file is \
                 --subnet-file; the flag is ignored"
                    .into(),
            );
        }
        let glog = [
            ("logtostderr", self.logtostderr.is_some()),
            ("alsologtostderr", self.alsologtostderr.is_some()),
            ("log_dir", self.log_dir.is_some()),
            ("log_file", self.log_file.is_some()),
            ("stderrthreshold", self.stderrthreshold.is_some()),
            ("vmodule", self.vmodule.is_some()),
            ("log_backtrace_at", self.log_backtrace_at.is_some()),
        ];
        if self.charon_executable_path.is_some() || self.charon_viciuri.is_some() {
            resolved.warnings.push(
                "--charon-executable-path and --charon-viciuri are for flanneld's IPsec backend: overlay has the \
                 vxlan backend only; the flags are ignored"
                    .into(),
            );
        }
        for (flag, _) in glog.iter().filter(|(_, given)| *given) {
            resolved.warnings.push(format!(
                "--{flag} is glog's, as flanneld used it: overlayd logs to stderr, filtered by --log-level (or -v); \
                 the flag is ignored"
            ));
        }
        resolved
    }
}

/// flanneld's command line and environment, as overlayd's.
pub mod flannel {
    use std::collections::HashSet;
    use std::ffi::OsString;

    use clap::CommandFactory;

    /// The command line clap is to read, and a warning for each flanneld
    /// variable that overlayd does not know. Go's single-dash long flags
    /// (`-iface=eth0`) get their second dash, and each `FLANNELD_<FLAG>`
    /// variable becomes `--<flag>=<value>` ahead of the command line, so that
    /// a flag given there wins (flanneld's order; a flag given twice takes
    /// its last value).
    pub fn command_line(
        args: impl IntoIterator<Item = OsString>,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> (Vec<OsString>, Vec<String>) {
        let known = long_names();
        let mut args = args.into_iter();
        let mut line: Vec<OsString> = args.next().into_iter().collect();
        let args: Vec<OsString> = args.collect();
        // A flag on the command line wins over its variable, as in flanneld.
        let given: HashSet<String> = args
            .iter()
            .filter_map(|a| a.to_str()?.strip_prefix('-'))
            .map(|a| a.trim_start_matches('-').split('=').next().unwrap_or_default().to_string())
            .collect();
        let mut warnings = Vec::new();
        let mut from_env: Vec<(String, OsString)> = Vec::new();
        for (name, value) in env {
            let Some(flag) = name.to_str().and_then(|n| n.strip_prefix("FLANNELD_")) else { continue };
            let flag = flag.to_ascii_lowercase().replace('_', "-");
            if given.contains(&flag) {
                continue;
            }
            if known.contains(flag.as_str()) {
                from_env.push((flag, value));
            } else {
                warnings.push(format!(
                    "{}: overlayd has no flag --{flag}; the variable is ignored",
                    name.to_string_lossy()
                ));
            }
        }
        // The environment's order is no order: by name, so a run is repeatable.
        from_env.sort();
        for (flag, value) in from_env {
            let mut arg = OsString::from(format!("--{flag}="));
            arg.push(value);
            line.push(arg);
        }
        let mut rest = false;
        for arg in args {
            let go_style = match arg.to_str() {
                Some(text) if !rest && text.starts_with('-') && !text.starts_with("--") => {
                    let name = text[1..].split('=').next().unwrap_or_default();
                    name.len() > 1 && known.contains(name)
                }
                _ => false,
            };
            rest |= arg == "--";
            if go_style {
                let mut long = OsString::from("-");
                long.push(&arg);
                line.push(long);
            } else {
                line.push(arg);
            }
        }
        (line, warnings)
    }

    /// Every long flag name and alias overlayd takes.
    fn long_names() -> HashSet<String> {
        let command = super::Cli::command();
        let mut names = HashSet::new();
        let mut add = |c: &clap::Command| {
            for arg in c.get_arguments() {
                names.extend(arg.get_long().map(str::to_string));
                names.extend(arg.get_all_aliases().unwrap_or_default().into_iter().map(str::to_string));
            }
        };
        add(&command);
        for sub in command.get_subcommands() {
            add(sub);
        }
        names
    }
}

/// An endpoint URL: `http://` or `https://`, a host, and at most a port
/// and a path. (A typo such as `htp:/x` would otherwise be taken for a
/// host name, and say nothing until its first request timed out.)
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let text = text.trim();
    let bad = |why: &str| Err(format!("{text:?} is not an endpoint URL like http://10.0.0.1:2379: {why}"));
    let Some((scheme, rest)) = text.split_once("://") else { return bad("no scheme:// in front") };
    if !["http", "https"].contains(&scheme) {
        return bad(&format!("the scheme {scheme:?} is not http or https"));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 address: [fd00::1]:2379.
        Some(v6) => match v6.split_once(']') {
            Some((addr, after)) if addr.parse::<Ipv6Addr>().is_ok() => (addr, after.strip_prefix(':')),
            _ => return bad("the [IPv6 address] is not one"),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return bad("no host");
    }
    let host_ok = host.parse::<Ipv6Addr>().is_ok()
        || host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !host_ok {
        return bad(&format!("{host:?} is not a host name or address"));
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return bad(&format!("{port:?} is not a port"));
        }
    }
    Ok(text.to_string())
}

/// An etcd key prefix: not empty, and without a trailing `/` (the keys are
/// `<prefix>/config` and `<prefix>/subnets/...`).
pub fn parse_prefix(text: &str) -> Result<String, String> {
    let trimmed = text.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(format!(
            "{text:?} is no prefix: the network would live at the root of etcd's key space; e.g. /coreos.com/network"
        ));
    }
    Ok(trimmed.to_string())
}

/// Parses a duration such as `30s`, `500ms`, `1m30s` or `24h`; plain numbers are seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let parsed = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().map(Duration::from_secs).map_err(|e| e.to_string())
    } else {
        humantime::parse_duration(text).map_err(|e| e.to_string())
    };
    match parsed {
        Ok(d) if d.is_zero() => Err(format!("{text:?}: must be more than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{text:?} is not a duration like 30s, 500ms or 1m30s: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn endpoints_and_prefixes_are_checked_at_start() {
        for good in
            ["http://127.0.0.1:2379", "https://etcd-0.example:2379", "http://[fd00::1]:2379", "https://10.96.0.1"]
        {
            assert_eq!(parse_endpoint(good).as_deref(), Ok(good));
        }
        for (bad, why) in [
            ("htp:/x", "no scheme"),
            ("ftp://x:21", "is not http or https"),
            ("127.0.0.1:2379", "no scheme"),
            ("http://", "no host"),
            ("http://:2379", "no host"),
            ("http://etcd:port", "not a port"),
            ("http://etcd:0", "not a port"),
            ("http://et cd:2379", "not a host name"),
            ("http://[zz::1]:2379", "IPv6"),
        ] {
            let err = parse_endpoint(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(parse_prefix("/kube-centos/network/").as_deref(), Ok("/kube-centos/network"));
        assert!(parse_prefix("").is_err() && parse_prefix("/").is_err() && parse_prefix("  ").is_err());
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for bad in [&["--etcd-endpoints", "htp:/x"][..], &["--etcd-prefix="], &["--kube-api-url", "10.96.0.1:443"]] {
            let err = Cli::try_parse_from(std::iter::once("overlayd").chain(bad.iter().copied())).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
            assert!(err.to_string().contains(bad[0].trim_end_matches('=')), "names the flag: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    /// The tests that parse read the process environment (clap's `env`): one at a time.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Parses as `main` does: `args` after the binary's name, `env` as flanneld's variables.
    fn parse(args: &[&str], env: &[(&str, &str)]) -> (Cli, Vec<String>) {
        let args = std::iter::once("overlayd").chain(args.iter().copied()).map(std::ffi::OsString::from);
        let env = env.iter().map(|(k, v)| (k.into(), v.into()));
        let (line, warnings) = flannel::command_line(args, env);
        let cli = Cli::try_parse_from(line).unwrap_or_else(|e| panic!("{e}"));
        let resolved = cli.run.flannel.resolve();
        (cli, warnings.into_iter().chain(resolved.warnings).collect())
    }

    /// What a parse comes to, flanneld's own settings resolved: two command
    /// lines that give the same are the same to the daemon.
    fn effect(cli: &Cli) -> String {
        let mut run = cli.run.clone();
        let resolved = run.flannel.resolve();
        run.node.health_addr = run.node.health_addr.or(resolved.health_addr);
        let password = run.etcd.etcd_password.clone().map(|p| p.0);
        run.flannel = FlannelArgs::default();
        format!("{run:?} password={password:?} log={:?}", resolved.log_filter)
    }

    #[test]
    fn every_flanneld_flag_does_what_overlayd_s_own_does() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // flanneld's form (Go's flag package: one dash or two, `=` or a space,
        // `--bool` or `--bool=false`), and overlayd's.
        let table: &[(&[&str], &[&str])] = &[
            (&["-etcd-endpoints=http://a:2379,http://b:2379"], &["--etcd-endpoints", "http://a:2379,http://b:2379"]),
            (&["-etcd-prefix", "/kube-centos/network"], &["--etcd-prefix", "/kube-centos/network"]),
            (
                &["--etcd-keyfile=/k.pem", "--etcd-certfile=/c.pem"],
                &["--etcd-keyfile", "/k.pem", "--etcd-certfile", "/c.pem"],
            ),
            (&["--etcd-cafile=/ca.pem"], &["--etcd-cafile", "/ca.pem"]),
            (
                &["--etcd-username=flannel", "--etcd-password=s3cret"],
                &["--etcd-username", "flannel", "--etcd-password", "s3cret"],
            ),
            (&["--iface=eth1", "--iface=10.0.0.5"], &["--iface", "eth1", "--iface", "10.0.0.5"]),
            (&["-iface-regex=^ens", "-iface-regex=^eth"], &["--iface-regex", "^ens", "--iface-regex", "^eth"]),
            (&["--iface-can-reach=10.1.2.3"], &["--iface-can-reach", "10.1.2.3"]),
            (&["--public-ip=203.0.113.7"], &["--public-ip", "203.0.113.7"]),
            (&["--public-ipv6=2001:db8::7"], &["--public-ipv6", "2001:db8::7"]),
            (&["--subnet-file=/run/flannel/subnet.env"], &["--subnet-file", "/run/flannel/subnet.env"]),
            (&["--ip-masq"], &["--ip-masq=true"]),
            (&["--ip-masq=false"], &[]),
            (&["-ip-masq=1"], &["--ip-masq"]),
            (&["--subnet-lease-renew-margin=30"], &["--subnet-lease-renew-margin", "30"]),
            (&["--kube-subnet-mgr"], &["--kube-subnet-mgr=true"]),
            (&["--kube-api-url=https://10.96.0.1:443"], &["--kube-api-url", "https://10.96.0.1:443"]),
            (&["--kubeconfig-file=/etc/kube/flannel.conf"], &["--kubeconfig", "/etc/kube/flannel.conf"]),
            (&["--kube-annotation-prefix=example.io"], &["--kube-annotation-prefix", "example.io"]),
            (
                &["--net-config-path=/etc/kube-flannel/net-conf.json"],
                &["--net-config-path", "/etc/kube-flannel/net-conf.json"],
            ),
            (&["--healthz-ip=127.0.0.1", "--healthz-port=8471"], &["--health-addr", "127.0.0.1:8471"]),
            (&["--healthz-port=8471"], &["--health-addr", "0.0.0.0:8471"]),
            (&["--healthz-ip=127.0.0.1", "--healthz-port=0"], &[]),
            (&["--set-node-network-unavailable=false"], &["--set-node-network-unavailable=0"]),
            (&["--set-node-network-unavailable"], &[]),
            // Accepted, warned, and nothing else.
            (&["--iptables-resync=5"], &[]),
            (&["--iptables-forward-rules=false"], &[]),
            (&["--iptables-forward-rules"], &[]),
            (&["--subnet-dir=/run/flannel/networks"], &[]),
            (&["--logtostderr", "--log_dir=/var/log", "-vmodule=main=2"], &[]),
            (&["--charon-viciuri=unix:///var/run/charon.vici"], &[]),
        ];
        for (flannel, ours) in table {
            let (a, warnings) = parse(flannel, &[]);
            let (b, _) = parse(ours, &[]);
            assert_eq!(effect(&a), effect(&b), "{flannel:?} against {ours:?}");
            let warned = flannel
                .iter()
                .any(|f| ["--iptables", "--subnet-dir", "--log", "--charon"].iter().any(|w| f.starts_with(w)));
            assert_eq!(!warnings.is_empty(), warned, "{flannel:?}: {warnings:?}");
        }
        // flanneld's glog verbosity: debug from 4 on.
        assert_eq!(parse(&["-v=10"], &[]).0.run.flannel.resolve().log_filter, Some("debug"));
        assert_eq!(parse(&["-v", "2"], &[]).0.run.flannel.resolve().log_filter, Some("info"));
        // A Go bool flag never takes the next word as its value.
        let (cli, _) = parse(&["--ip-masq", "cleanup"], &[]);
        assert!(cli.run.node.ip_masq && matches!(cli.command, Some(Command::Cleanup(_))));
        // The password is never printed.
        let (cli, _) = parse(&["--etcd-username=u", "--etcd-password=s3cret"], &[]);
        assert!(!format!("{cli:?}").contains("s3cret"));
        // Something flanneld would also refuse is refused.
        for bad in
            [&["--iface-can-reach=eth0"][..], &["--healthz-port=http"], &["--ip-masq=maybe"], &["--no-such-flag"]]
        {
            let line = flannel::command_line(
                std::iter::once("overlayd").chain(bad.iter().copied()).map(Into::into),
                std::iter::empty(),
            );
            assert!(Cli::try_parse_from(line.0).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flanneld_s_environment_works_and_a_flag_wins_over_it() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let env = [
            ("FLANNELD_IFACE", "eth1"),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_ETCD_ENDPOINTS", "https://e1:2379,https://e2:2379"),
            ("FLANNELD_KUBE_SUBNET_MGR", "true"),
            ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "30"),
            ("FLANNELD_HEALTHZ_PORT", "8471"),
            ("FLANNELD_V", "5"),
            ("PATH", "/usr/bin"),
        ];
        let (from_env, warnings) = parse(&[], &env);
        let (from_flags, _) = parse(
            &[
                "--iface=eth1",
                "--ip-masq",
                "--etcd-endpoints=https://e1:2379,https://e2:2379",
                "--kube-subnet-mgr",
                "--subnet-lease-renew-margin=30",
                "--healthz-port=8471",
                "-v=5",
            ],
            &[],
        );
        assert_eq!(effect(&from_env), effect(&from_flags));
        assert!(warnings.is_empty(), "{warnings:?}");
        // The command line wins, whole: not eth1 and eth2.
        let (both, _) = parse(&["--iface", "eth2"], &env);
        assert_eq!(both.run.node.iface, ["eth2"]);
        // A variable no flag of ours answers to is said, and changes nothing.
        let (cli, warnings) = parse(&[], &[("FLANNELD_NO_SUCH_FLAG", "1")]);
        assert_eq!(effect(&cli), effect(&parse(&[], &[]).0));
        assert!(warnings.iter().any(|w| w.contains("FLANNELD_NO_SUCH_FLAG")), "{warnings:?}");
        // One overlayd does not follow is warned about as a flag is.
        let (_, warnings) = parse(&[], &[("FLANNELD_SUBNET_DIR", "/run/flannel/networks")]);
        assert!(warnings.iter().any(|w| w.contains("--subnet-dir")), "{warnings:?}");
    }

    #[test]
    fn the_underlay_is_chosen_by_iface_then_regex_then_route() {
        use crate::dataplane::underlay::Selector;
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let selector = |args: &[&str]| parse(args, &[]).0.run.node.underlay_selector();
        assert!(matches!(selector(&[]), Ok(Selector::DefaultRoute)));
        assert!(matches!(selector(&["--iface-can-reach=10.0.0.1"]), Ok(Selector::Reaching(_))));
        assert!(
            matches!(selector(&["--iface-regex=^e", "--iface-can-reach=10.0.0.1"]), Ok(Selector::Matching(p)) if p.len() == 1)
        );
        assert!(matches!(selector(&["--iface=eth0", "--iface-regex=^e"]), Ok(Selector::Named(n)) if n == ["eth0"]));
        let bad = selector(&["--iface-regex=eth[0"]).unwrap_err();
        assert!(bad.contains("--iface-regex") && bad.contains("eth[0"), "{bad}");
    }

    #[test]
    fn cli_is_consistent_and_defaults_match_flannel() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["overlayd", "--etcd-endpoints", "http://a:2379,http://b:2379"]).unwrap();
        assert_eq!(cli.run.etcd.etcd_endpoints.len(), 2);
        assert_eq!(cli.run.etcd.etcd_prefix, "/coreos.com/network");
        assert_eq!(cli.run.node.device, None);
        // SAFETY: this test alone reads these variables.
        unsafe {
            std::env::set_var("OVERLAYD_IP_MASQ", "true");
            std::env::set_var("OVERLAYD_RESYNC_INTERVAL", "5s");
        }
        let from_env = Cli::try_parse_from(["overlayd"]).unwrap();
        assert!(from_env.run.node.ip_masq);
        assert_eq!(from_env.run.node.resync_interval, Duration::from_secs(5));
        unsafe {
            std::env::set_var("OVERLAYD_IP_MASQ", "false");
        }
        assert!(!Cli::try_parse_from(["overlayd"]).unwrap().run.node.ip_masq);
        unsafe {
            std::env::remove_var("OVERLAYD_IP_MASQ");
            std::env::remove_var("OVERLAYD_RESYNC_INTERVAL");
        }
        let cleanup = Cli::try_parse_from(["overlayd", "cleanup", "--device", "x.1"]).unwrap();
        assert!(matches!(cleanup.command, Some(Command::Cleanup(CleanupArgs { dry_run: false, .. }))));
        assert_eq!(cleanup.run.node.device.as_deref(), Some("x.1"));
        let install =
            Cli::try_parse_from(["overlayd", "install-cni", "--conflist", "/etc/overlay/cni-conf.json"]).unwrap();
        let Some(Command::InstallCni(args)) = install.command else { panic!("{install:?}") };
        assert_eq!((args.bin_dir.to_str(), args.conf_dir.to_str()), (Some("/opt/cni/bin"), Some("/etc/cni/net.d")));
        assert!(Cli::try_parse_from(["overlayd", "install-cni"]).is_err(), "--conflist is required");
    }
}
