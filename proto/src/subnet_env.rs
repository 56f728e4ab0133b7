//! subnet.env: how the daemon tells the CNI plugin (ours or flannel's) which
//! subnet, MTU and masquerade setting this node has. flannel's variable names.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};

/// The contents of subnet.env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The cluster network (`FLANNEL_NETWORK`).
    pub network: Ipv4Net,
    /// The node's subnet, with the gateway (`.1`) as address (`FLANNEL_SUBNET`).
    pub subnet: Ipv4Net,
    /// The MTU pods must use (`FLANNEL_MTU`).
    pub mtu: u32,
    /// Whether the daemon masquerades pod traffic (`FLANNEL_IPMASQ`).
    pub ipmasq: bool,
    /// The IPv6 cluster network, when dual stack.
    pub ipv6_network: Option<Ipv6Net>,
    /// The node's IPv6 subnet, when dual stack.
    pub ipv6_subnet: Option<Ipv6Net>,
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

impl SubnetEnv {
    /// The subnet.env of a node that leased `subnet` (a network address).
    pub fn for_lease(network: Ipv4Net, subnet: Ipv4Net, mtu: u32, ipmasq: bool) -> Self {
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        SubnetEnv {
            network,
            subnet: Ipv4Net::new(gateway, subnet.prefix_len()).unwrap_or(subnet),
            mtu,
            ipmasq,
            ipv6_network: None,
            ipv6_subnet: None,
        }
    }

    /// The file's text, in flannel's order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "FLANNEL_NETWORK={}", self.network);
        let _ = writeln!(out, "FLANNEL_SUBNET={}", self.subnet);
        if let Some(v6) = self.ipv6_network {
            let _ = writeln!(out, "FLANNEL_IPV6_NETWORK={v6}");
        }
        if let Some(v6) = self.ipv6_subnet {
            let _ = writeln!(out, "FLANNEL_IPV6_SUBNET={v6}");
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
        let network = network.ok_or(SubnetEnvError::Missing("FLANNEL_NETWORK"))?;
        let subnet = subnet.ok_or(SubnetEnvError::Missing("FLANNEL_SUBNET"))?;
        if !network.contains(&subnet.network()) {
            return Err(SubnetEnvError::Invalid {
                name: "FLANNEL_SUBNET".into(),
                value: subnet.to_string(),
                reason: "not inside FLANNEL_NETWORK",
            });
        }
        Ok(SubnetEnv {
            network,
            subnet,
            mtu: mtu.ok_or(SubnetEnvError::Missing("FLANNEL_MTU"))?,
            ipmasq: ipmasq.unwrap_or(false),
            ipv6_network: v6n,
            ipv6_subnet: v6s,
        })
    }

    /// The node's subnet as a network (`10.244.1.0/24`).
    pub fn subnet_network(&self) -> Ipv4Net {
        self.subnet.trunc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FLANNEL: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.33.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn golden_flannel_file() {
        let env = SubnetEnv::parse(FLANNEL).unwrap();
        assert_eq!(env.subnet_network(), "10.244.33.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(env.mtu, 1450);
        assert!(env.ipmasq);
        assert_eq!(env.render(), FLANNEL);
        let ours =
            SubnetEnv::for_lease("10.244.0.0/16".parse().unwrap(), "10.244.33.0/24".parse().unwrap(), 1450, true);
        assert_eq!(ours.render(), FLANNEL);
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(
            SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").unwrap_err(),
            SubnetEnvError::Missing("FLANNEL_SUBNET")
        );
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=big\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("FLANNEL_MTU=\"big\""), "{e}");
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.9.1.1/24\nFLANNEL_MTU=1450\n")
            .unwrap_err();
        assert!(e.to_string().contains("not inside"), "{e}");
    }

    proptest! {
        #[test]
        fn render_parse_roundtrip(third in 1u8..255, mtu in 68u32..9000, masq in any::<bool>()) {
            let env = SubnetEnv::for_lease("10.244.0.0/16".parse().unwrap(), Ipv4Net::new(Ipv4Addr::new(10,244,third,0), 24).unwrap(), mtu, masq);
            prop_assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,200}") {
            let _ = SubnetEnv::parse(&s);
        }
    }
}
