//! flannel's net-conf.json: the cluster network and the backend settings.
//!
//! Parsing is strict about values (every error names the field and says what
//! is wrong) and lenient about unknown keys, as flannel is.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;

/// The UDP port flannel and the Linux kernel use for VXLAN by default.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// The VNI flannel uses by default.
pub const DEFAULT_VNI: u32 = 1;
/// VXLAN over IPv4 adds 50 bytes: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD_V4: u32 = 50;

/// A validated network configuration, with flannel's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The cluster network, e.g. 10.244.0.0/16.
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// First subnet that may be handed out (network address of that subnet).
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be handed out (network address of that subnet).
    pub subnet_max: Ipv4Addr,
    /// Backend settings.
    pub backend: Backend,
}

/// The VXLAN backend settings (`Backend` in net-conf.json).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Group-based policy extension.
    pub gbp: bool,
    /// Route directly (no encapsulation) to peers on the same L2 segment.
    pub direct_routing: bool,
    /// Explicit MTU of the VXLAN device; by default underlay MTU minus overhead.
    pub mtu: Option<u32>,
}

/// Why a net-conf.json was rejected; each message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The text is not JSON of the expected shape.
    #[error("net-conf is not valid JSON: {0}")]
    Json(String),
    /// A field has a value we cannot use.
    #[error("{field}: {reason}")]
    Field {
        /// The net-conf.json field name, as the user wrote it.
        field: &'static str,
        /// What is wrong, in words.
        reason: String,
    },
}

fn field_err(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field { field, reason: reason.into() }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    network: Option<String>,
    #[serde(default)]
    subnet_len: Option<i64>,
    subnet_min: Option<String>,
    subnet_max: Option<String>,
    #[serde(rename = "EnableIPv4")]
    enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(rename = "IPv6Network")]
    ipv6_network: Option<String>,
    backend: Option<RawBackend>,
}

#[derive(Deserialize)]
struct RawBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<i64>,
    #[serde(rename = "Port")]
    port: Option<i64>,
    #[serde(rename = "GBP", default)]
    gbp: bool,
    #[serde(rename = "DirectRouting", default)]
    direct_routing: bool,
    #[serde(rename = "MTU")]
    mtu: Option<i64>,
}

impl NetConfig {
    /// Parses and validates net-conf.json text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.enable_ipv4 == Some(false) {
            return Err(field_err("EnableIPv4", "an IPv6-only network is not supported by this version"));
        }
        if raw.enable_ipv6 == Some(true) || raw.ipv6_network.is_some() {
            return Err(field_err(
                if raw.enable_ipv6 == Some(true) { "EnableIPv6" } else { "IPv6Network" },
                "IPv6 is not supported by this version; remove it or set EnableIPv6 to false",
            ));
        }
        let network = parse_network(raw.network.as_deref())?;
        let subnet_len = subnet_len_for(network, raw.subnet_len)?;
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast()) - size + 1;
        let subnet_min = match raw.subnet_min {
            None => first + size,
            Some(s) => bound("SubnetMin", &s, network, subnet_len)?,
        };
        let subnet_max = match raw.subnet_max {
            None => last - size,
            Some(s) => bound("SubnetMax", &s, network, subnet_len)?,
        };
        if subnet_min > subnet_max {
            return Err(field_err(
                "SubnetMin",
                format!("SubnetMin {} is above SubnetMax {}", Ipv4Addr::from(subnet_min), Ipv4Addr::from(subnet_max)),
            ));
        }
        Ok(NetConfig {
            network,
            subnet_len,
            subnet_min: subnet_min.into(),
            subnet_max: subnet_max.into(),
            backend: parse_backend(raw.backend)?,
        })
    }

    /// The MTU of the VXLAN device for an underlay of `underlay_mtu`.
    pub fn vxlan_mtu(&self, underlay_mtu: u32) -> u32 {
        self.backend.mtu.unwrap_or_else(|| underlay_mtu.saturating_sub(VXLAN_OVERHEAD_V4))
    }
}

fn parse_network(text: Option<&str>) -> Result<Ipv4Net, ConfigError> {
    let text = text.ok_or_else(|| field_err("Network", "missing; e.g. \"10.244.0.0/16\""))?;
    let network: Ipv4Net =
        text.parse().map_err(|_| field_err("Network", format!("{text:?} is not an IPv4 CIDR like 10.244.0.0/16")))?;
    if network.addr() != network.network() {
        return Err(field_err("Network", format!("{text} has host bits set; did you mean {}?", network.trunc())));
    }
    Ok(network)
}

fn subnet_len_for(network: Ipv4Net, given: Option<i64>) -> Result<u8, ConfigError> {
    let prefix = network.prefix_len();
    match given {
        None | Some(0) => {
            if prefix > 28 {
                Err(field_err("Network", format!("{network} is too small; the smallest useful network is a /28")))
            } else if prefix <= 22 {
                Ok(24)
            } else {
                Ok(prefix + 2)
            }
        }
        Some(len) if !(1..=32).contains(&len) => {
            Err(field_err("SubnetLen", format!("{len} is not a prefix length between 1 and 30")))
        }
        Some(len) if len > 30 => {
            Err(field_err("SubnetLen", format!("SubnetLen {len} leaves no room for pods (at most 30)")))
        }
        Some(len) if len < i64::from(prefix) + 2 => Err(field_err(
            "SubnetLen",
            format!(
                "SubnetLen {len} is too large a subnet for Network {network}: \
                 it must fit at least four times (SubnetLen >= {})",
                prefix + 2
            ),
        )),
        Some(len) => Ok(len as u8),
    }
}

fn bound(field: &'static str, text: &str, network: Ipv4Net, subnet_len: u8) -> Result<u32, ConfigError> {
    let addr: Ipv4Addr = text.parse().map_err(|_| field_err(field, format!("{text:?} is not an IPv4 address")))?;
    if !network.contains(&addr) {
        return Err(field_err(field, format!("{field} {addr} is outside Network {network}")));
    }
    let mask = u32::MAX << (32 - subnet_len);
    if u32::from(addr) & mask != u32::from(addr) {
        return Err(field_err(field, format!("{field} {addr} is not on a /{subnet_len} boundary")));
    }
    Ok(addr.into())
}

fn parse_backend(raw: Option<RawBackend>) -> Result<Backend, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Backend::default());
    };
    match raw.kind.as_deref() {
        None | Some("vxlan") => {}
        Some(other) => {
            return Err(field_err("Backend.Type", format!("backend {other:?} is not supported; use \"vxlan\"")))
        }
    }
    let vni = match raw.vni {
        None | Some(0) => DEFAULT_VNI,
        Some(v) if (1..(1 << 24)).contains(&v) => v as u32,
        Some(v) => return Err(field_err("Backend.VNI", format!("{v} is not a VNI (1 to 16777215)"))),
    };
    let port = match raw.port {
        None | Some(0) => DEFAULT_VXLAN_PORT,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => return Err(field_err("Backend.Port", format!("{p} is not a UDP port"))),
    };
    let mtu = match raw.mtu {
        None | Some(0) => None,
        Some(m) if (68..=65535).contains(&m) => Some(m as u32),
        Some(m) => return Err(field_err("Backend.MTU", format!("{m} is not a usable MTU (68 to 65535)"))),
    };
    Ok(Backend { vni, port, gbp: raw.gbp, direct_routing: raw.direct_routing, mtu })
}

impl Default for Backend {
    fn default() -> Self {
        Backend { vni: DEFAULT_VNI, port: DEFAULT_VXLAN_PORT, gbp: false, direct_routing: false, mtu: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        NetConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn flannel_captured_config_gets_defaults() {
        let c = NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.network, "10.244.0.0/16".parse::<Ipv4Net>().unwrap());
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 254, 0));
        assert_eq!(c.backend, Backend::default());
        assert_eq!(c.vxlan_mtu(1500), 1450);
    }

    #[test]
    fn full_config_and_unknown_keys() {
        let c = NetConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetLen":26,"SubnetMin":"10.244.8.0","SubnetMax":"10.244.9.192",
                "Backend":{"Type":"vxlan","VNI":7,"Port":4789,"GBP":true,"DirectRouting":true,"MTU":1400,"Extra":1},
                "SomethingNew":true}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 9, 192));
        assert_eq!(c.backend, Backend { vni: 7, port: 4789, gbp: true, direct_routing: true, mtu: Some(1400) });
        assert_eq!(c.vxlan_mtu(9000), 1400);
    }

    #[test]
    fn small_networks_split_in_four() {
        let c = NetConfig::parse(r#"{"Network":"10.0.0.0/24"}"#).unwrap();
        assert_eq!(c.subnet_len, 26);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#),
            "SubnetLen: SubnetLen 31 leaves no room for pods (at most 30)"
        );
        assert_eq!(
            err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#),
            "SubnetMin: SubnetMin 10.245.0.0 is outside Network 10.244.0.0/16"
        );
        assert!(err(r#"{"Network":"10.244.1.0/16"}"#).contains("did you mean 10.244.0.0/16"));
        assert!(err(r#"{"SubnetLen":24}"#).starts_with("Network: missing"));
        assert!(err(r#"{"Network":"banana"}"#).starts_with("Network:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#).starts_with("SubnetLen:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.0.7"}"#).contains("boundary"));
        assert!(
            err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.2.0"}"#).contains("above")
        );
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#).starts_with("Backend.Type:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"VNI":16777216}}"#).starts_with("Backend.VNI:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Port":70000}}"#).starts_with("Backend.Port:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#).starts_with("EnableIPv6:"));
        assert!(err(r#"{"Network":"10.0.0.0/29"}"#).contains("too small"));
        assert!(err("{not json").starts_with("net-conf is not valid JSON"));
        assert!(err(r#"{"Network":5}"#).starts_with("net-conf is not valid JSON"));
    }
}
