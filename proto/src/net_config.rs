//! flannel's net-conf.json: the cluster network and the backend settings.
//!
//! Parsing is strict about values (every error names the field and says what
//! is wrong) and lenient about unknown keys, as flannel is.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::family::{self, Family};

/// The UDP port flannel and the Linux kernel use for VXLAN by default.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// The VNI flannel uses by default.
pub const DEFAULT_VNI: u32 = 1;
/// VXLAN over IPv4 adds 50 bytes: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD_V4: u32 = 50;

/// A validated network configuration, with flannel's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The IPv4 pool (`Network`, `SubnetLen`, ...); none with `EnableIPv4: false`.
    pub ipv4: Option<Pool>,
    /// The IPv6 pool (`IPv6Network`, `IPv6SubnetLen`, ...); none unless `EnableIPv6`.
    pub ipv6: Option<Pool>,
    /// Backend settings.
    pub backend: Backend,
}

/// One family's cluster network and how it is cut into node subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// The cluster network, e.g. 10.244.0.0/16 or fd00:10:244::/56.
    pub network: IpNet,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// First subnet that may be handed out (network address of that subnet).
    pub subnet_min: IpAddr,
    /// Last subnet that may be handed out (network address of that subnet).
    pub subnet_max: IpAddr,
}

impl Pool {
    /// The pool's family.
    pub fn family(&self) -> Family {
        Family::of_net(&self.network)
    }
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
    /// Explicit MTU of the VXLAN devices; by default underlay MTU minus overhead.
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
    #[serde(rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<i64>,
    #[serde(rename = "IPv6SubnetMin")]
    ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax")]
    ipv6_subnet_max: Option<String>,
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

/// The field names of one family's pool, as net-conf.json spells them.
struct Fields {
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
}

const V4_FIELDS: Fields =
    Fields { network: "Network", subnet_len: "SubnetLen", subnet_min: "SubnetMin", subnet_max: "SubnetMax" };
const V6_FIELDS: Fields = Fields {
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    subnet_min: "IPv6SubnetMin",
    subnet_max: "IPv6SubnetMax",
};

impl NetConfig {
    /// Parses and validates net-conf.json text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let enable_ipv4 = raw.enable_ipv4.unwrap_or(true);
        let enable_ipv6 = raw.enable_ipv6.unwrap_or(false);
        if !enable_ipv4 && !enable_ipv6 {
            return Err(field_err("EnableIPv4", "both EnableIPv4 and EnableIPv6 are false: no family is left"));
        }
        let ipv4 = match enable_ipv4 {
            false => None,
            true => {
                let network = parse_network(&V4_FIELDS, Family::V4, raw.network.as_deref())?;
                Some(pool(&V4_FIELDS, network, raw.subnet_len, raw.subnet_min, raw.subnet_max)?)
            }
        };
        let ipv6 = match enable_ipv6 {
            false => None,
            true => {
                let network = parse_network(&V6_FIELDS, Family::V6, raw.ipv6_network.as_deref())?;
                if let IpNet::V6(v6) = network {
                    if v6.addr().to_ipv4_mapped().is_some() {
                        return Err(field_err(
                            "IPv6Network",
                            format!("{v6} is IPv4-mapped space, which overlaps IPv4"),
                        ));
                    }
                }
                Some(pool(&V6_FIELDS, network, raw.ipv6_subnet_len, raw.ipv6_subnet_min, raw.ipv6_subnet_max)?)
            }
        };
        Ok(NetConfig { ipv4, ipv6, backend: parse_backend(raw.backend)? })
    }

    /// The pool of `family`, when that family is on.
    pub fn pool(&self, family: Family) -> Option<&Pool> {
        match family {
            Family::V4 => self.ipv4.as_ref(),
            Family::V6 => self.ipv6.as_ref(),
        }
    }

    /// The families that are on, IPv4 first.
    pub fn families(&self) -> impl Iterator<Item = Family> + '_ {
        Family::ALL.into_iter().filter(|f| self.pool(*f).is_some())
    }

    /// The IPv4 cluster network, when IPv4 is on.
    pub fn network_v4(&self) -> Option<Ipv4Net> {
        match self.ipv4?.network {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }

    /// The IPv6 cluster network, when IPv6 is on.
    pub fn network_v6(&self) -> Option<Ipv6Net> {
        match self.ipv6?.network {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }
    }

    /// The MTU of the VXLAN device of `family`, for an underlay of
    /// `underlay_mtu`: that family's encapsulation is what it costs.
    pub fn vxlan_mtu(&self, family: Family, underlay_mtu: u32) -> u32 {
        self.backend.mtu.unwrap_or_else(|| underlay_mtu.saturating_sub(family.vxlan_overhead()))
    }

    /// The MTU pods get: one that fits every family that is on. (flannel
    /// gives pods the IPv4 device's MTU, so IPv6 packets of the last 20
    /// bytes cannot leave a dual-stack pod.)
    pub fn pod_mtu(&self, underlay_mtu: u32) -> u32 {
        self.families().map(|f| self.vxlan_mtu(f, underlay_mtu)).min().unwrap_or(underlay_mtu)
    }
}

/// The keys net-conf.json may have at the top level. flanneld's own that
/// overlay does not use are known too, so a flanneld config is not warned about.
const KNOWN_KEYS: [&str; 14] = [
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "Backend",
    // flanneld's: its nftables switch (overlay always uses nftables), and a legacy backend field.
    "EnableNFTables",
    "BackendType",
    "Name",
];

/// The keys `Backend` may have: the vxlan backend's (flanneld's `Learning`
/// and `MacPrefix` included, which overlay does not use).
const KNOWN_BACKEND_KEYS: [&str; 8] = ["Type", "VNI", "Port", "GBP", "DirectRouting", "MTU", "Learning", "MacPrefix"];

/// One key of a net-conf.json that no version of the format knows, and the
/// key it was likely meant to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// The key as written, `Backend.` in front for a backend key.
    pub key: String,
    /// A known key it is likely a typo of.
    pub did_you_mean: Option<&'static str>,
}

impl std::fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown net-conf key {:?} (ignored", self.key)?;
        match self.did_you_mean {
            Some(known) => write!(f, "; did you mean {known:?}?)"),
            None => write!(f, ")"),
        }
    }
}

/// The keys of `text` (net-conf JSON) that the format does not have: a typo
/// such as `SubnetLength` is still accepted, as flannel accepts it, but is
/// said. Empty when the text is not a JSON object.
pub fn unknown_keys(text: &str) -> Vec<UnknownKey> {
    let Ok(serde_json::Value::Object(top)) = serde_json::from_str(text) else { return Vec::new() };
    let mut unknown = Vec::new();
    for (key, value) in &top {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            unknown.push(UnknownKey { key: key.clone(), did_you_mean: closest(key, &KNOWN_KEYS) });
        }
        if key == "Backend" {
            for backend_key in value.as_object().into_iter().flat_map(|b| b.keys()) {
                if !KNOWN_BACKEND_KEYS.contains(&backend_key.as_str()) {
                    unknown.push(UnknownKey {
                        key: format!("Backend.{backend_key}"),
                        did_you_mean: closest(backend_key, &KNOWN_BACKEND_KEYS),
                    });
                }
            }
        }
    }
    unknown
}

/// The known key `key` most likely stands for: the same but for case, one
/// that starts or ends it, or one a couple of edits away.
fn closest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    let lower = key.to_ascii_lowercase();
    known.iter().copied().find(|k| k.eq_ignore_ascii_case(key)).or_else(|| {
        known
            .iter()
            .copied()
            .map(|k| (edit_distance(&lower, &k.to_ascii_lowercase()), k))
            .filter(|(d, k)| *d <= 2 || lower.starts_with(&k.to_ascii_lowercase()))
            .min_by_key(|(d, _)| *d)
            .map(|(_, k)| k)
    })
}

/// Levenshtein distance, for short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

fn parse_network(fields: &Fields, family: Family, text: Option<&str>) -> Result<IpNet, ConfigError> {
    let field = fields.network;
    let example = match family {
        Family::V4 => "10.244.0.0/16",
        Family::V6 => "fd00:10:244::/56",
    };
    let text = text.ok_or_else(|| field_err(field, format!("missing; e.g. \"{example}\"")))?;
    let network: IpNet = text
        .trim()
        .parse()
        .map_err(|_| field_err(field, format!("{text:?} is not an {family} CIDR like {example}")))?;
    if Family::of_net(&network) != family {
        return Err(field_err(field, format!("{text} is not an {family} network; e.g. {example}")));
    }
    if network.addr() != network.network() {
        return Err(field_err(field, format!("{text} has host bits set; did you mean {}?", network.trunc())));
    }
    Ok(network)
}

fn pool(
    fields: &Fields,
    network: IpNet,
    subnet_len: Option<i64>,
    min: Option<String>,
    max: Option<String>,
) -> Result<Pool, ConfigError> {
    let family = Family::of_net(&network);
    let subnet_len = subnet_len_for(fields, network, subnet_len)?;
    let size = 1u128 << (family.bits() - subnet_len);
    let first = family::value(network.network());
    let last = family::value(network.broadcast()) - size + 1;
    let subnet_min = match min {
        None => first + size,
        Some(s) => bound(fields.subnet_min, &s, network, subnet_len)?,
    };
    let subnet_max = match max {
        // IPv4 skips the last subnet too (its broadcast address is the network's); IPv6 has no broadcast.
        None if family == Family::V4 => last - size,
        None => last,
        Some(s) => bound(fields.subnet_max, &s, network, subnet_len)?,
    };
    if subnet_min > subnet_max {
        return Err(field_err(
            fields.subnet_min,
            format!(
                "{} {} is above {} {}",
                fields.subnet_min,
                family.addr(subnet_min),
                fields.subnet_max,
                family.addr(subnet_max)
            ),
        ));
    }
    Ok(Pool { network, subnet_len, subnet_min: family.addr(subnet_min), subnet_max: family.addr(subnet_max) })
}

fn subnet_len_for(fields: &Fields, network: IpNet, given: Option<i64>) -> Result<u8, ConfigError> {
    let prefix = network.prefix_len();
    let field = fields.subnet_len;
    match Family::of_net(&network) {
        Family::V4 => match given {
            None | Some(0) => {
                if prefix > 28 {
                    Err(field_err(
                        fields.network,
                        format!("{network} is too small; the smallest useful network is a /28"),
                    ))
                } else if prefix <= 22 {
                    Ok(24)
                } else {
                    Ok(prefix + 2)
                }
            }
            Some(len) if !(1..=32).contains(&len) => {
                Err(field_err(field, format!("{len} is not a prefix length between 1 and 30")))
            }
            Some(len) if len > 30 => {
                Err(field_err(field, format!("{field} {len} leaves no room for pods (at most 30)")))
            }
            Some(len) if len < i64::from(prefix) + 2 => Err(field_err(
                field,
                format!(
                    "{field} {len} is too large a subnet for {} {network}: \
                     it must fit at least four times ({field} >= {})",
                    fields.network,
                    prefix + 2
                ),
            )),
            Some(len) => Ok(len as u8),
        },
        Family::V6 => {
            if prefix > 124 {
                return Err(field_err(
                    fields.network,
                    format!("{network} is too small; the smallest useful IPv6 network is a /124"),
                ));
            }
            match given {
                None | Some(0) if prefix <= 62 => Ok(64),
                None | Some(0) => Ok(prefix + 2),
                Some(len) if !(1..=128).contains(&len) => {
                    Err(field_err(field, format!("{len} is not a prefix length between 1 and 126")))
                }
                Some(len) if len > 126 => {
                    Err(field_err(field, format!("{field} {len} leaves no room for pods (at most 126)")))
                }
                Some(len) if len <= i64::from(prefix) => Err(field_err(
                    field,
                    format!(
                        "{field} {len} is not smaller than {} {network}: it must be above {prefix}",
                        fields.network
                    ),
                )),
                Some(len) => Ok(len as u8),
            }
        }
    }
}

fn bound(field: &'static str, text: &str, network: IpNet, subnet_len: u8) -> Result<u128, ConfigError> {
    let family = Family::of_net(&network);
    let addr: IpAddr = text
        .trim()
        .parse()
        .ok()
        .filter(|a| Family::of(*a) == family)
        .ok_or_else(|| field_err(field, format!("{text:?} is not an {family} address")))?;
    if !network.contains(&addr) {
        return Err(field_err(field, format!("{field} {addr} is outside {network}")));
    }
    let host_bits = family.bits() - subnet_len;
    let value = family::value(addr);
    if value & ((1u128 << host_bits) - 1) != 0 {
        return Err(field_err(field, format!("{field} {addr} is not on a /{subnet_len} boundary")));
    }
    Ok(value)
}

fn parse_backend(raw: Option<RawBackend>) -> Result<Backend, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Backend::default());
    };
    // flanneld lowercases the type: "VXLAN" and "vxlan" are one backend.
    match raw.kind.as_deref() {
        None => {}
        Some(kind) if kind.eq_ignore_ascii_case("vxlan") => {}
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

    fn v4(c: &NetConfig) -> Pool {
        c.ipv4.unwrap()
    }

    #[test]
    fn the_backend_type_is_read_in_any_case_as_flanneld_does() {
        for kind in ["vxlan", "VXLAN", "VxLan"] {
            let text = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{kind}"}}}}"#);
            assert!(NetConfig::parse(&text).is_ok(), "{kind}");
        }
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).starts_with("Backend.Type:"));
    }

    #[test]
    fn unknown_keys_are_named_with_the_key_they_were_likely_meant_to_be() {
        let text = r#"{"Network":"10.244.0.0/16","SubnetLength":24,"subnetlen":24,"Colour":"blue",
                      "EnableNFTables":true,"Backend":{"Type":"vxlan","VNi":1,"Learning":false,"Flavour":1}}"#;
        assert!(NetConfig::parse(text).is_ok(), "still accepted, as flannel accepts it");
        let unknown = unknown_keys(text);
        let said: Vec<String> = unknown.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            unknown.iter().map(|u| (u.key.as_str(), u.did_you_mean)).collect::<Vec<_>>(),
            [
                ("Backend.Flavour", None),
                ("Backend.VNi", Some("VNI")),
                ("Colour", None),
                ("SubnetLength", Some("SubnetLen")),
                ("subnetlen", Some("SubnetLen")),
            ],
            "{said:?}"
        );
        assert!(said[3].contains(r#"did you mean "SubnetLen"?"#), "{said:?}");
        assert!(unknown_keys(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#).is_empty());
        assert!(unknown_keys("not json").is_empty());
    }

    #[test]
    fn flannel_captured_config_gets_defaults() {
        let c = NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.network_v4(), Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(v4(&c).subnet_len, 24);
        assert_eq!(v4(&c).subnet_min.to_string(), "10.244.1.0");
        assert_eq!(v4(&c).subnet_max.to_string(), "10.244.254.0");
        assert_eq!(c.ipv6, None);
        assert_eq!(c.backend, Backend::default());
        assert_eq!(c.vxlan_mtu(Family::V4, 1500), 1450);
        assert_eq!(c.pod_mtu(1500), 1450);
    }

    /// The dual-stack net-conf of the flannel capture (shared/compat).
    #[test]
    fn flannel_dual_stack_config() {
        let c = NetConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.network.to_string(), "fd00:10:244::/56");
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min.to_string(), "fd00:10:244:1::", "the first subnet is not handed out");
        assert_eq!(v6.subnet_max.to_string(), "fd00:10:244:ff::");
        assert_eq!(c.families().collect::<Vec<_>>(), [Family::V4, Family::V6]);
        assert_eq!(c.vxlan_mtu(Family::V6, 1500), 1430);
        assert_eq!(c.pod_mtu(1500), 1430, "pods fit both families");
    }

    #[test]
    fn ipv6_only_and_small_ipv6_networks() {
        let c = NetConfig::parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120"}"#).unwrap();
        assert_eq!(c.ipv4, None);
        assert_eq!(c.ipv6.unwrap().subnet_len, 122);
        assert_eq!(c.families().collect::<Vec<_>>(), [Family::V6]);
        let c = NetConfig::parse(
            r#"{"Network":"10.0.0.0/8","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetLen":80,
                "IPv6SubnetMin":"fd00:0:0:5::","IPv6SubnetMax":"fd00:0:0:9::"}"#,
        )
        .unwrap();
        let v6 = c.ipv6.unwrap();
        assert_eq!(
            (v6.subnet_len, v6.subnet_min.to_string(), v6.subnet_max.to_string()),
            (80, "fd00:0:0:5::".into(), "fd00:0:0:9::".into())
        );
    }

    #[test]
    fn full_config_and_unknown_keys() {
        let c = NetConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetLen":26,"SubnetMin":"10.244.8.0","SubnetMax":"10.244.9.192",
                "Backend":{"Type":"vxlan","VNI":7,"Port":4789,"GBP":true,"DirectRouting":true,"MTU":1400,"Extra":1},
                "SomethingNew":true}"#,
        )
        .unwrap();
        assert_eq!(v4(&c).subnet_len, 26);
        assert_eq!(v4(&c).subnet_max.to_string(), "10.244.9.192");
        assert_eq!(c.backend, Backend { vni: 7, port: 4789, gbp: true, direct_routing: true, mtu: Some(1400) });
        assert_eq!(c.vxlan_mtu(Family::V4, 9000), 1400);
    }

    #[test]
    fn small_networks_split_in_four() {
        let c = NetConfig::parse(r#"{"Network":"10.0.0.0/24"}"#).unwrap();
        assert_eq!(v4(&c).subnet_len, 26);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#),
            "SubnetLen: SubnetLen 31 leaves no room for pods (at most 30)"
        );
        assert_eq!(
            err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#),
            "SubnetMin: SubnetMin 10.245.0.0 is outside 10.244.0.0/16"
        );
        assert!(err(r#"{"Network":"10.244.1.0/16"}"#).contains("did you mean 10.244.0.0/16"));
        assert!(err(r#"{"SubnetLen":24}"#).starts_with("Network: missing"));
        assert!(err(r#"{"Network":"banana"}"#).starts_with("Network:"));
        assert!(err(r#"{"Network":"fd00::/48"}"#).starts_with("Network:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#).starts_with("SubnetLen:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.0.7"}"#).contains("boundary"));
        assert!(
            err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.2.0"}"#).contains("above")
        );
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#).starts_with("Backend.Type:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"VNI":16777216}}"#).starts_with("Backend.VNI:"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Port":70000}}"#).starts_with("Backend.Port:"));
        assert!(err(r#"{"Network":"10.0.0.0/29"}"#).contains("too small"));
        assert!(err("{not json").starts_with("net-conf is not valid JSON"));
        assert!(err(r#"{"Network":5}"#).starts_with("net-conf is not valid JSON"));
        assert!(err(r#"{"EnableIPv4":false}"#).starts_with("EnableIPv4:"));
    }

    #[test]
    fn ipv6_errors_name_the_field() {
        let dual = |extra: &str| err(&format!(r#"{{"Network":"10.244.0.0/16","EnableIPv6":true{extra}}}"#));
        assert!(dual("").starts_with("IPv6Network: missing"), "{}", dual(""));
        // Not IPv6, or overlapping the IPv4 network.
        assert!(dual(r#","IPv6Network":"10.244.0.0/16""#).starts_with("IPv6Network:"));
        assert!(dual(r#","IPv6Network":"10.244.0.0/16""#).contains("not an IPv6 network"));
        assert!(dual(r#","IPv6Network":"::ffff:10.244.0.0/112""#).contains("overlaps IPv4"));
        assert!(dual(r#","IPv6Network":"fd00::1/48""#).contains("did you mean fd00::/48"));
        assert!(dual(r#","IPv6Network":"fd00::/125""#).contains("too small"));
        assert!(dual(r#","IPv6Network":"fd00::/48","IPv6SubnetLen":127"#).starts_with("IPv6SubnetLen:"));
        assert!(dual(r#","IPv6Network":"fd00::/48","IPv6SubnetLen":48"#).starts_with("IPv6SubnetLen:"));
        assert!(dual(r#","IPv6Network":"fd00::/48","IPv6SubnetLen":-1"#).starts_with("IPv6SubnetLen:"));
        assert!(dual(r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:1::5""#).contains("boundary"));
        assert!(dual(r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::""#).contains("outside"));
        assert!(dual(r#","IPv6Network":"fd00::/48","IPv6SubnetMax":"10.0.0.0""#).starts_with("IPv6SubnetMax:"));
        assert!(dual(r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:2::""#)
            .contains("above"));
    }
}
