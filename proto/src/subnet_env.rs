//! subnet.env: how the daemon tells the CNI plugin (ours or flannel's) which
//! subnets, MTU and masquerade setting this node has. flannel's variable
//! names and order: each family's lines only when that family is on.

use std::fmt::Write as _;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::family::{self, Family};

/// The contents of subnet.env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The IPv4 cluster network (`FLANNEL_NETWORK`), when IPv4 is on.
    pub network: Option<Ipv4Net>,
    /// The node's IPv4 subnet, with the gateway (`.1`) as address (`FLANNEL_SUBNET`).
    pub subnet: Option<Ipv4Net>,
    /// The IPv6 cluster network (`FLANNEL_IPV6_NETWORK`), when IPv6 is on.
    pub ipv6_network: Option<Ipv6Net>,
    /// The node's IPv6 subnet, with the gateway (`::1`) as address (`FLANNEL_IPV6_SUBNET`).
    pub ipv6_subnet: Option<Ipv6Net>,
    /// The MTU pods must use (`FLANNEL_MTU`).
    pub mtu: u32,
    /// Whether the daemon masquerades pod traffic (`FLANNEL_IPMASQ`).
    pub ipmasq: bool,
}

/// Why a subnet.env did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubnetEnvError {
    /// A required variable is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A variable has a value that does not parse.
    #[error("{name}={value:?} is not valid: {reason}")]
    Invalid {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A family's half of the file: the cluster network and the node's subnet
/// with its gateway as address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyEnv {
    /// The cluster network.
    pub network: IpNet,
    /// The node's subnet, its gateway as address (`10.244.1.1/24`).
    pub gateway: IpNet,
}

impl FamilyEnv {
    /// The node's subnet as a network (`10.244.1.0/24`).
    pub fn subnet(&self) -> IpNet {
        self.gateway.trunc()
    }
}

impl SubnetEnv {
    /// An empty file (no family yet) with the MTU and masquerade setting.
    pub fn new(mtu: u32, ipmasq: bool) -> Self {
        SubnetEnv { network: None, subnet: None, ipv6_network: None, ipv6_subnet: None, mtu, ipmasq }
    }

    /// Adds a family's network and the node's `subnet` (a network address);
    /// the gateway is the subnet's first address. A family mismatch between
    /// the two is ignored (the caller's plan never makes one).
    pub fn with(mut self, network: IpNet, subnet: IpNet) -> Self {
        let gateway = IpNet::new(family::nth_addr(&subnet, 1), subnet.prefix_len()).unwrap_or(subnet);
        match (network, gateway) {
            (IpNet::V4(n), IpNet::V4(g)) => {
                self.network = Some(n);
                self.subnet = Some(g);
            }
            (IpNet::V6(n), IpNet::V6(g)) => {
                self.ipv6_network = Some(n);
                self.ipv6_subnet = Some(g);
            }
            _ => {}
        }
        self
    }

    /// The subnet.env of an IPv4-only node that leased `subnet` (a network address).
    pub fn for_lease(network: Ipv4Net, subnet: Ipv4Net, mtu: u32, ipmasq: bool) -> Self {
        SubnetEnv::new(mtu, ipmasq).with(IpNet::V4(network), IpNet::V4(subnet))
    }

    /// The half of `family`, when that family is on.
    pub fn family(&self, family: Family) -> Option<FamilyEnv> {
        match family {
            Family::V4 => Some(FamilyEnv { network: self.network?.into(), gateway: self.subnet?.into() }),
            Family::V6 => Some(FamilyEnv { network: self.ipv6_network?.into(), gateway: self.ipv6_subnet?.into() }),
        }
    }

    /// The halves of the families that are on, IPv4 first.
    pub fn families(&self) -> Vec<FamilyEnv> {
        Family::ALL.iter().filter_map(|f| self.family(*f)).collect()
    }

    /// The file's text, in flannel's order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let (Some(n), Some(s)) = (self.network, self.subnet) {
            let _ = writeln!(out, "FLANNEL_NETWORK={n}");
            let _ = writeln!(out, "FLANNEL_SUBNET={s}");
        }
        if let (Some(n), Some(s)) = (self.ipv6_network, self.ipv6_subnet) {
            let _ = writeln!(out, "FLANNEL_IPV6_NETWORK={n}");
            let _ = writeln!(out, "FLANNEL_IPV6_SUBNET={s}");
        }
        let _ = writeln!(out, "FLANNEL_MTU={}", self.mtu);
        let _ = writeln!(out, "FLANNEL_IPMASQ={}", self.ipmasq);
        out
    }

    /// Parses the file's text; unknown variables, comments and blank lines are ignored.
    pub fn parse(text: &str) -> Result<Self, SubnetEnvError> {
        let (mut network, mut subnet, mut mtu, mut ipmasq, mut v6n, mut v6s) = (None, None, None, None, None, None);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            let invalid = |reason| SubnetEnvError::Invalid { name: name.into(), value: value.into(), reason };
            match name.trim() {
                "FLANNEL_NETWORK" => network = Some(value.parse::<Ipv4Net>().map_err(|_| invalid("not an IPv4 CIDR"))?),
                "FLANNEL_SUBNET" => subnet = Some(value.parse::<Ipv4Net>().map_err(|_| invalid("not an IPv4 CIDR"))?),
                "FLANNEL_MTU" => {
                    mtu = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|m| (68..=65535).contains(m))
                            .ok_or_else(|| invalid("not an MTU between 68 and 65535"))?,
                    )
                }
                "FLANNEL_IPMASQ" => ipmasq = Some(value.parse::<bool>().map_err(|_| invalid("not true or false"))?),
                "FLANNEL_IPV6_NETWORK" => {
                    v6n = Some(value.parse::<Ipv6Net>().map_err(|_| invalid("not an IPv6 CIDR"))?)
                }
                "FLANNEL_IPV6_SUBNET" => v6s = Some(value.parse::<Ipv6Net>().map_err(|_| invalid("not an IPv6 CIDR"))?),
                _ => {}
            }
        }
        let (network, subnet) = pair(network, subnet, "FLANNEL_NETWORK", "FLANNEL_SUBNET")?;
        let (ipv6_network, ipv6_subnet) = pair(v6n, v6s, "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET")?;
        if network.is_none() && ipv6_network.is_none() {
            return Err(SubnetEnvError::Missing("FLANNEL_SUBNET"));
        }
        Ok(SubnetEnv {
            network,
            subnet,
            ipv6_network,
            ipv6_subnet,
            mtu: mtu.ok_or(SubnetEnvError::Missing("FLANNEL_MTU"))?,
            ipmasq: ipmasq.unwrap_or(false),
        })
    }

    /// The node's IPv4 subnet as a network (`10.244.1.0/24`).
    pub fn subnet_network(&self) -> Option<Ipv4Net> {
        self.subnet.map(|s| s.trunc())
    }

    /// The node's IPv6 subnet as a network (`fd00:10:244:8::/64`).
    pub fn ipv6_subnet_network(&self) -> Option<Ipv6Net> {
        self.ipv6_subnet.map(|s| s.trunc())
    }
}

/// A family's network and subnet: both or neither, the subnet inside the network.
fn pair<N: Copy + std::fmt::Display + Into<IpNet>>(
    network: Option<N>,
    subnet: Option<N>,
    network_name: &'static str,
    subnet_name: &'static str,
) -> Result<(Option<N>, Option<N>), SubnetEnvError> {
    match (network, subnet) {
        (None, None) => Ok((None, None)),
        (Some(_), None) => Err(SubnetEnvError::Missing(subnet_name)),
        (None, Some(_)) => Err(SubnetEnvError::Missing(network_name)),
        (Some(n), Some(s)) => {
            let (net, sub): (IpNet, IpNet) = (n.into(), s.into());
            if !net.contains(&sub.network()) || sub.prefix_len() < net.prefix_len() {
                return Err(SubnetEnvError::Invalid {
                    name: subnet_name.into(),
                    value: s.to_string(),
                    reason: "not inside its cluster network",
                });
            }
            Ok((Some(n), Some(s)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const FLANNEL: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.33.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    /// The dual-stack subnet file of the flannel capture (shared/compat), byte for byte.
    const FLANNEL_DUAL: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.40.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:8::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn golden_flannel_file() {
        let env = SubnetEnv::parse(FLANNEL).unwrap();
        assert_eq!(env.subnet_network(), Some("10.244.33.0/24".parse::<Ipv4Net>().unwrap()));
        assert_eq!(env.mtu, 1450);
        assert!(env.ipmasq);
        assert_eq!(env.render(), FLANNEL);
        let ours =
            SubnetEnv::for_lease("10.244.0.0/16".parse().unwrap(), "10.244.33.0/24".parse().unwrap(), 1450, true);
        assert_eq!(ours.render(), FLANNEL);
    }

    #[test]
    fn golden_dual_stack_file() {
        let env = SubnetEnv::parse(FLANNEL_DUAL).unwrap();
        assert_eq!(env.render(), FLANNEL_DUAL);
        let ours = SubnetEnv::new(1450, true)
            .with("10.244.0.0/16".parse().unwrap(), "10.244.40.0/24".parse().unwrap())
            .with("fd00:10:244::/56".parse().unwrap(), "fd00:10:244:8::/64".parse().unwrap());
        assert_eq!(ours.render(), FLANNEL_DUAL);
        let v6 = env.family(Family::V6).unwrap();
        assert_eq!(v6.subnet().to_string(), "fd00:10:244:8::/64");
        assert_eq!(v6.gateway.addr().to_string(), "fd00:10:244:8::1");
        assert_eq!(env.families().len(), 2);
        // IPv6-only: no IPv4 lines at all.
        let only = SubnetEnv::new(1430, false).with("fd00::/56".parse().unwrap(), "fd00:0:0:3::/64".parse().unwrap());
        assert_eq!(
            only.render(),
            "FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:3::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
        );
        assert_eq!(SubnetEnv::parse(&only.render()).unwrap(), only);
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(
            SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").unwrap_err(),
            SubnetEnvError::Missing("FLANNEL_SUBNET")
        );
        assert_eq!(SubnetEnv::parse("FLANNEL_MTU=1450\n").unwrap_err(), SubnetEnvError::Missing("FLANNEL_SUBNET"));
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=big\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("FLANNEL_MTU=\"big\""), "{e}");
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.9.1.1/24\nFLANNEL_MTU=1450\n")
            .unwrap_err();
        assert!(e.to_string().contains("not inside"), "{e}");
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_MTU=1450\n",
        )
        .unwrap_err();
        assert_eq!(e, SubnetEnvError::Missing("FLANNEL_IPV6_SUBNET"));
    }

    proptest! {
        #[test]
        fn render_parse_roundtrip(third in 1u8..255, v6 in proptest::option::of(1u16..255), mtu in 68u32..9000, masq in any::<bool>()) {
            let mut env = SubnetEnv::for_lease("10.244.0.0/16".parse().unwrap(), Ipv4Net::new(Ipv4Addr::new(10,244,third,0), 24).unwrap(), mtu, masq);
            if let Some(s) = v6 {
                env = env.with("fd00:10:244::/48".parse().unwrap(), format!("fd00:10:244:{s:x}::/64").parse().unwrap());
            }
            prop_assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,200}") {
            let _ = SubnetEnv::parse(&s);
        }
    }
}
