//! Command-line flags, grouped by what they configure: the node, the etcd
//! store, the Kubernetes store. Every flag can also be set through an
//! environment variable.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// overlayd: a VXLAN pod network node daemon, wire-compatible with flannel.
#[derive(Debug, Parser)]
#[command(
    name = "overlayd",
    version,
    about,
    long_about = None,
    // A flag given twice takes its last value, as flanneld's (Go's flag package) do.
    args_override_self = true,
    after_help = "Logging: set OVERLAYD_LOG to a filter such as info, or info,overlayd=debug."
)]
pub struct Cli {
    /// What to do; without a command, run the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Daemon settings.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Remove what the daemon made on this host: the VXLAN device (and with it
    /// every peer entry), the nftables table and the subnet file. The etcd
    /// lease is left to expire.
    Cleanup,
    /// Install the CNI plugin and the network config list onto the host,
    /// each through a rename, so a container runtime never reads half a
    /// file. The DaemonSet's init container runs this.
    InstallCni(InstallCniArgs),
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
}

/// What this node builds and where.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Underlay interface, by name or by one of its addresses. Default: the
    /// interface of the IPv4 default route (IPv6-only: of the IPv6 default route).
    #[arg(long, env = "OVERLAYD_IFACE")]
    pub iface: Option<String>,
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
    #[arg(long, env = "OVERLAYD_IP_MASQ")]
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
    /// Address for /healthz, /readyz and /metrics, e.g. 127.0.0.1:8471. Off when unset.
    #[arg(long, env = "OVERLAYD_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
}

/// Where leases come from on bare hosts.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "etcd")]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(long, env = "OVERLAYD_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix holding `config` and `subnets/` (flannel's layout).
    #[arg(long, env = "OVERLAYD_ETCD_PREFIX", default_value = "/coreos.com/network")]
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
    /// Lifetime of the etcd lease on our subnet; renewed at a third of it.
    #[arg(long, env = "OVERLAYD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,
}

/// Where leases come from in a Kubernetes cluster.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes")]
pub struct KubeArgs {
    /// Kubernetes mode: the subnet is this Node's spec.podCIDR and peers are
    /// the Nodes carrying our annotations; etcd is not used.
    #[arg(long, env = "OVERLAYD_KUBE_SUBNET_MGR")]
    pub kube_subnet_mgr: bool,
    /// This node's name in Kubernetes (the DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig to reach the API server. Default: the in-cluster service
    /// account, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "OVERLAYD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The network config (net-conf.json) in Kubernetes mode, usually mounted from a ConfigMap.
    #[arg(long, env = "OVERLAYD_NET_CONFIG_PATH", default_value = "/etc/overlay/net-conf.json")]
    pub net_config_path: PathBuf,
    /// Prefix of the Node annotations we publish and read (flannel's by default).
    #[arg(long, env = "OVERLAYD_KUBE_ANNOTATION_PREFIX", default_value = proto::node_annotations::DEFAULT_PREFIX)]
    pub kube_annotation_prefix: String,
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

    #[test]
    fn cli_is_consistent_and_defaults_match_flannel() {
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
        assert!(matches!(cleanup.command, Some(Command::Cleanup)));
        assert_eq!(cleanup.run.node.device.as_deref(), Some("x.1"));
        let install =
            Cli::try_parse_from(["overlayd", "install-cni", "--conflist", "/etc/overlay/cni-conf.json"]).unwrap();
        let Some(Command::InstallCni(args)) = install.command else { panic!("{install:?}") };
        assert_eq!((args.bin_dir.to_str(), args.conf_dir.to_str()), (Some("/opt/cni/bin"), Some("/etc/cni/net.d")));
        assert!(Cli::try_parse_from(["overlayd", "install-cni"]).is_err(), "--conflist is required");
    }
}
