//! flannel's lease records: the etcd key naming a node's subnet, and the JSON
//! value that tells peers how to reach it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::family::Family;
use crate::mac::MacAddr;

/// The subnet(s) a lease is for: the last path segment of its etcd key,
/// `10.244.1.0-24` or, dual stack, `10.244.1.0-24&fc00::-64`. In etcd the
/// IPv4 part is always there (flannel's parser requires it); a Kubernetes
/// Node may stand for an IPv6 subnet alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// The node's IPv4 pod subnet.
    pub v4: Option<Ipv4Net>,
    /// The node's IPv6 pod subnet.
    pub v6: Option<Ipv6Net>,
}

/// Why a lease key did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("lease key {key:?} is not of the form 10.244.1.0-24[&fc00::-64]: {reason}")]
pub struct LeaseKeyError {
    /// The offending key segment.
    pub key: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl LeaseKey {
    /// A key for an IPv4-only lease.
    pub fn v4(subnet: Ipv4Net) -> Self {
        LeaseKey { v4: Some(subnet), v6: None }
    }

    /// A key for the subnets of both families.
    pub fn new(v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Self {
        LeaseKey { v4, v6 }
    }

    /// The subnet of `family`, if the lease has one.
    pub fn subnet(&self, family: Family) -> Option<IpNet> {
        match family {
            Family::V4 => self.v4.map(IpNet::V4),
            Family::V6 => self.v6.map(IpNet::V6),
        }
    }
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(v4) = self.v4 {
            write!(f, "{}-{}", v4.addr(), v4.prefix_len())?;
        }
        if let Some(v6) = self.v6 {
            let sep = if self.v4.is_some() { "&" } else { "" };
            // Ipv6Addr's Display is RFC 5952: compressed, lowercase, as flannel writes it.
            write!(f, "{sep}{}-{}", v6.addr(), v6.prefix_len())?;
        }
        Ok(())
    }
}

fn split_prefix(part: &str) -> Option<(&str, u8)> {
    let (addr, len) = part.rsplit_once('-')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((addr, len.parse().ok()?))
}

impl FromStr for LeaseKey {
    type Err = LeaseKeyError;
    fn from_str(key: &str) -> Result<Self, Self::Err> {
        let fail = |reason| LeaseKeyError { key: key.to_string(), reason };
        let (v4_part, v6_part) = match key.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (key, None),
        };
        let (addr, len) = split_prefix(v4_part).ok_or_else(|| fail("no -PREFIX after the address"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| fail("not an IPv4 address"))?;
        let v4 = Ipv4Net::new(addr, len).map_err(|_| fail("IPv4 prefix length above 32"))?;
        if v4.network() != addr {
            return Err(fail("IPv4 address has host bits set"));
        }
        let v6 = match v6_part {
            None => None,
            Some(part) => {
                let (addr, len) = split_prefix(part).ok_or_else(|| fail("no -PREFIX after the IPv6 address"))?;
                let addr: Ipv6Addr = addr.parse().map_err(|_| fail("not an IPv6 address"))?;
                let net = Ipv6Net::new(addr, len).map_err(|_| fail("IPv6 prefix length above 128"))?;
                if net.network() != addr {
                    return Err(fail("IPv6 address has host bits set"));
                }
                Some(net)
            }
        };
        Ok(LeaseKey { v4: Some(v4), v6 })
    }
}

/// The JSON value of a lease, field for field what flanneld writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// The node's underlay address: where VXLAN packets for its pods go.
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// The node's IPv6 underlay address, when dual stack.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// "vxlan" for us and for flannel's vxlan backend.
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    /// Backend specific; for vxlan, [`VxlanBackendData`].
    #[serde(rename = "BackendData", default)]
    pub backend_data: BackendData,
    /// IPv6 backend data, when dual stack; omitted otherwise, as flannel does.
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "BackendData::is_null")]
    pub backend_v6_data: BackendData,
}

/// A lease's backend data, held compactly. A daemon holds a whole listing
/// (5,000 leases) at once, and a JSON map per lease and family was most of
/// its memory: the vxlan backend's data is kept typed (10 bytes), any other
/// as its JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackendData {
    /// `null`, or absent.
    #[default]
    Null,
    /// `{"VNI":…,"VtepMAC":"…"}`, exactly.
    Vxlan(VxlanBackendData),
    /// Any other JSON, as text.
    Other(Box<str>),
}

impl BackendData {
    /// Whether there is none.
    pub fn is_null(&self) -> bool {
        *self == BackendData::Null
    }

    /// Parses JSON text.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The JSON text, as flanneld writes it.
    pub fn to_json(&self) -> String {
        match self {
            BackendData::Null => "null".into(),
            // Serializing plain data with string keys cannot fail.
            BackendData::Vxlan(data) => serde_json::to_string(data).unwrap_or_default(),
            BackendData::Other(text) => text.to_string(),
        }
    }

    /// The vxlan backend's data, or why this is not it.
    pub fn vxlan(&self) -> Result<VxlanBackendData, serde_json::Error> {
        match self {
            BackendData::Vxlan(data) => Ok(*data),
            BackendData::Other(text) => serde_json::from_str(text),
            BackendData::Null => serde_json::from_str("null"),
        }
    }
}

impl Serialize for BackendData {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            BackendData::Null => serializer.serialize_unit(),
            BackendData::Vxlan(data) => data.serialize(serializer),
            BackendData::Other(text) => {
                let value: serde_json::Value = serde_json::from_str(text).map_err(serde::ser::Error::custom)?;
                value.serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for BackendData {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        if value.is_null() {
            return Ok(BackendData::Null);
        }
        // Typed only when nothing would be lost: exactly the two fields, both valid.
        if value.as_object().is_some_and(|m| m.len() == 2) {
            if let Ok(data) = VxlanBackendData::deserialize(&value) {
                return Ok(BackendData::Vxlan(data));
            }
        }
        Ok(BackendData::Other(value.to_string().into()))
    }
}

/// The vxlan backend's data: what a peer needs to program FDB and ARP entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    /// VXLAN network identifier.
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// The MAC of the node's VXLAN device.
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

/// Why a lease value cannot be used as a VXLAN peer.
#[derive(Debug, thiserror::Error)]
pub enum LeaseValueError {
    /// Not JSON of the lease shape.
    #[error("lease value is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A lease of another backend.
    #[error("backend type {0:?} is not vxlan")]
    NotVxlan(String),
}

impl LeaseAttrs {
    /// A vxlan lease for a node at `public_ip` with VTEP `data`.
    pub fn vxlan(public_ip: Ipv4Addr, data: VxlanBackendData) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: BackendData::Vxlan(data),
            backend_v6_data: BackendData::Null,
        }
    }

    /// A dual-stack (or, in Kubernetes mode, IPv6-only) vxlan lease: each
    /// family's underlay address and VTEP. A family that is off has no data;
    /// its address is unspecified (`0.0.0.0`, as flannel writes it) or null.
    pub fn vxlan_families(v4: Option<(Ipv4Addr, VxlanBackendData)>, v6: Option<(Ipv6Addr, VxlanBackendData)>) -> Self {
        LeaseAttrs {
            public_ip: v4.map(|(ip, _)| ip).unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: v6.map(|(ip, _)| ip),
            backend_type: "vxlan".into(),
            backend_data: v4.map(|(_, d)| BackendData::Vxlan(d)).unwrap_or_default(),
            backend_v6_data: v6.map(|(_, d)| BackendData::Vxlan(d)).unwrap_or_default(),
        }
    }

    /// Parses a lease value as stored in etcd.
    pub fn from_json(bytes: &[u8]) -> Result<Self, LeaseValueError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The exact bytes flanneld would store.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The VXLAN data, or why this lease is not a usable VXLAN peer.
    pub fn vxlan_data(&self) -> Result<VxlanBackendData, LeaseValueError> {
        if self.backend_type != "vxlan" {
            return Err(LeaseValueError::NotVxlan(self.backend_type.clone()));
        }
        Ok(self.backend_data.vxlan()?)
    }

    /// The peer of one family this lease stands for: its underlay address and
    /// VTEP; none when the lease carries nothing for that family.
    pub fn vxlan_peer(&self, family: Family) -> Result<Option<(IpAddr, VxlanBackendData)>, LeaseValueError> {
        if self.backend_type != "vxlan" {
            return Err(LeaseValueError::NotVxlan(self.backend_type.clone()));
        }
        match family {
            Family::V4 if self.public_ip.is_unspecified() || self.backend_data.is_null() => Ok(None),
            Family::V4 => Ok(Some((IpAddr::V4(self.public_ip), self.vxlan_data()?))),
            Family::V6 => match self.public_ipv6 {
                Some(ip) if !self.backend_v6_data.is_null() => {
                    Ok(Some((IpAddr::V6(ip), self.backend_v6_data.vxlan()?)))
                }
                _ => Ok(None),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_from_flannel_capture() {
        let k: LeaseKey = "10.244.33.0-24".parse().unwrap();
        assert_eq!(k.v4, Some("10.244.33.0/24".parse::<Ipv4Net>().unwrap()));
        assert_eq!(k.to_string(), "10.244.33.0-24");
        let d: LeaseKey = "10.244.1.0-24&fc00::-64".parse().unwrap();
        assert_eq!(d.v6, Some("fc00::/64".parse().unwrap()));
        assert_eq!(d.to_string(), "10.244.1.0-24&fc00::-64");
    }

    #[test]
    fn bad_keys_are_rejected() {
        for bad in [
            "",
            "10.244.1.0",
            "10.244.1.0-",
            "10.244.1.0-33",
            "10.244.1.5-24",
            "x-24",
            "10.244.1.0-24&",
            "10.244.1.0-24&fc00::-129",
            "10.244.1.0-+4",
            "fd00::-64",
            "10.244.1.0-24&10.244.2.0-24",
            "10.244.1.0-24&fd00::1-64",
        ] {
            assert!(bad.parse::<LeaseKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn value_roundtrips_byte_for_byte_with_flannel() {
        let text = r#"{"PublicIP":"192.168.50.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"b2:5e:e8:32:3a:be"}}"#;
        let attrs = LeaseAttrs::from_json(text.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(192, 168, 50, 11));
        let data = attrs.vxlan_data().unwrap();
        assert_eq!(data.vni, 1);
        assert_eq!(data.vtep_mac.to_string(), "b2:5e:e8:32:3a:be");
        assert_eq!(attrs.to_json(), text);
        assert_eq!(LeaseAttrs::vxlan(attrs.public_ip, data).to_json(), text);
    }

    #[test]
    fn unknown_fields_tolerated_and_other_backends_refused() {
        let text = r#"{"PublicIP":"192.168.50.11","BackendType":"host-gw","BackendData":null,"Future":1}"#;
        let attrs = LeaseAttrs::from_json(text.as_bytes()).unwrap();
        assert!(attrs.vxlan_data().unwrap_err().to_string().contains("host-gw"));
        assert!(LeaseAttrs::from_json(b"{\"PublicIP\":\"nope\"}").is_err());
    }

    #[test]
    fn backend_data_is_typed_when_nothing_is_lost_and_kept_as_text_otherwise() {
        let typed = BackendData::parse(r#"{"VNI":1,"VtepMAC":"0a:d8:d2:05:d3:63"}"#).unwrap();
        assert!(matches!(typed, BackendData::Vxlan(_)));
        assert_eq!(typed.to_json(), r#"{"VNI":1,"VtepMAC":"0a:d8:d2:05:d3:63"}"#);
        let extra = BackendData::parse(r#"{"VNI":1,"VtepMAC":"0a:d8:d2:05:d3:63","Future":true}"#).unwrap();
        assert!(matches!(extra, BackendData::Other(_)), "an unknown field is kept, not dropped");
        assert_eq!(extra.vxlan().unwrap().vni, 1);
        let bad_mac = BackendData::parse(r#"{"VNI":1,"VtepMAC":"nope"}"#).unwrap();
        assert!(bad_mac.vxlan().is_err());
        assert_eq!(BackendData::parse("null").unwrap(), BackendData::Null);
        assert!(BackendData::parse("{").is_err());
        let text =
            r#"{"PublicIP":"192.168.50.11","PublicIPv6":null,"BackendType":"host-gw","BackendData":{"Any":[1,2]}}"#;
        assert_eq!(LeaseAttrs::from_json(text.as_bytes()).unwrap().to_json(), text, "other backends round-trip");
    }

    /// Keys and values of the dual-stack flannel capture (shared/compat), byte for byte.
    #[test]
    fn dual_stack_golden_keys_and_values() {
        let key: LeaseKey = "10.244.18.0-24&fd00:10:244:18::-64".parse().unwrap();
        assert_eq!(key.subnet(Family::V6).unwrap().to_string(), "fd00:10:244:18::/64");
        assert_eq!(key.to_string(), "10.244.18.0-24&fd00:10:244:18::-64");
        let ours = LeaseKey::new(Some("10.244.40.0/24".parse().unwrap()), Some("fd00:10:244:8::/64".parse().unwrap()));
        assert_eq!(ours.to_string(), "10.244.40.0-24&fd00:10:244:8::-64");
        // Uppercase or uncompressed input still reads; we write the compressed lowercase form.
        let loose: LeaseKey = "10.244.18.0-24&FD00:10:244:18:0:0:0:0-64".parse().unwrap();
        assert_eq!(loose, key);
        let text = r#"{"PublicIP":"192.168.50.12","PublicIPv6":"fd00:50::12","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:d8:d2:05:d3:63"},"BackendV6Data":{"VNI":1,"VtepMAC":"d2:69:e8:6a:1c:03"}}"#;
        let attrs = LeaseAttrs::from_json(text.as_bytes()).unwrap();
        let (ip6, data6) = attrs.vxlan_peer(Family::V6).unwrap().unwrap();
        assert_eq!((ip6.to_string(), data6.vtep_mac.to_string()), ("fd00:50::12".into(), "d2:69:e8:6a:1c:03".into()));
        let (ip4, data4) = attrs.vxlan_peer(Family::V4).unwrap().unwrap();
        assert_eq!((ip4.to_string(), data4.vtep_mac.to_string()), ("192.168.50.12".into(), "0a:d8:d2:05:d3:63".into()));
        let built = LeaseAttrs::vxlan_families(
            Some(("192.168.50.12".parse().unwrap(), data4)),
            Some(("fd00:50::12".parse().unwrap(), data6)),
        );
        assert_eq!(built.to_json(), text);
        // A v4-only lease says so for IPv6; a malformed PublicIPv6 is not a lease.
        let v4_only = LeaseAttrs::vxlan("192.168.50.11".parse().unwrap(), data4);
        assert_eq!(v4_only.vxlan_peer(Family::V6).unwrap(), None);
        let bad = text.replace("fd00:50::12", "fd00:50::zz");
        assert!(LeaseAttrs::from_json(bad.as_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn key_roundtrip(a in any::<u32>(), len in 0u8..=32, v6 in proptest::option::of((any::<u128>(), 0u8..=128))) {
            let v4 = Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc();
            let v6 = v6.map(|(b, l)| Ipv6Net::new(Ipv6Addr::from(b), l).unwrap().trunc());
            let key = LeaseKey { v4: Some(v4), v6 };
            prop_assert_eq!(key.to_string().parse::<LeaseKey>().unwrap(), key);
        }

        #[test]
        fn key_parser_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<LeaseKey>();
        }

        #[test]
        fn value_roundtrip(ip in any::<u32>(), vni in 1u32..(1<<24), mac in any::<[u8;6]>()) {
            let attrs = LeaseAttrs::vxlan(Ipv4Addr::from(ip), VxlanBackendData { vni, vtep_mac: MacAddr(mac) });
            let back = LeaseAttrs::from_json(attrs.to_json().as_bytes()).unwrap();
            prop_assert_eq!(back.vxlan_data().unwrap().vtep_mac, MacAddr(mac));
            prop_assert_eq!(back, attrs);
        }
    }
}
