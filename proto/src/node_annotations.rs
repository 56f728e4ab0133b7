//! Kubernetes mode's lease format: a Node's `spec.podCIDR` is its subnet and
//! flannel's annotations (`<prefix>/backend-type`, `backend-data`,
//! `public-ip`, `kube-subnet-manager`) say how to reach it. Same keys and
//! values as flanneld, so a mixed or migrating cluster sees one network.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::lease::{BackendData, LeaseAttrs, LeaseKey};

/// flannel's annotation prefix, the default of `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// Why a Node is not (yet) a usable peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeLeaseError {
    /// `spec.podCIDR` or an entry of `spec.podCIDRs` is not a CIDR.
    #[error("spec.podCIDRs: {0:?} is not a CIDR")]
    PodCidr(String),
    /// `spec.podCIDRs` is not one or two networks of different families.
    #[error("spec.podCIDRs {0:?}: expected one network per family (IPv4, IPv6 or one of each)")]
    PodCidrs(Vec<String>),
    /// An annotation is there but unreadable.
    #[error("annotation {key}: {reason}")]
    Annotation {
        /// The full annotation key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
}

/// The annotation keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAnnotations {
    prefix: String,
}

impl Default for NodeAnnotations {
    fn default() -> Self {
        NodeAnnotations::new(DEFAULT_PREFIX)
    }
}

/// A Node's pod subnets, from `spec.podCIDRs` (classified by family) or,
/// when that list is empty, `spec.podCIDR`. None: not assigned yet.
pub fn pod_cidrs(pod_cidr: Option<&str>, pod_cidrs: &[String]) -> Result<Option<LeaseKey>, NodeLeaseError> {
    let list: Vec<&str> = if pod_cidrs.is_empty() {
        pod_cidr.into_iter().filter(|c| !c.trim().is_empty()).collect()
    } else {
        pod_cidrs.iter().map(String::as_str).collect()
    };
    if list.is_empty() {
        return Ok(None);
    }
    let wrong = || NodeLeaseError::PodCidrs(list.iter().map(|s| s.to_string()).collect());
    if list.len() > 2 {
        return Err(wrong());
    }
    let mut key = LeaseKey::new(None, None);
    for text in &list {
        let net: IpNet = text.trim().parse().map_err(|_| NodeLeaseError::PodCidr(text.to_string()))?;
        match net.trunc() {
            IpNet::V4(v4) if key.v4.is_none() => key.v4 = Some(v4),
            IpNet::V6(v6) if key.v6.is_none() => key.v6 = Some(v6),
            _ => return Err(wrong()),
        }
    }
    Ok(Some(key))
}

impl NodeAnnotations {
    /// Keys under `prefix` (without the trailing slash).
    pub fn new(prefix: &str) -> Self {
        NodeAnnotations { prefix: prefix.trim_end_matches('/').to_string() }
    }

    /// The full key of annotation `name`, e.g. `flannel.alpha.coreos.com/public-ip`.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// The annotations a node publishes for its lease, as flanneld writes
    /// them: each family's keys when that family is on; `None` (remove) for
    /// the keys of a family that is off, so a node that drops a family does
    /// not leave it advertised.
    pub fn publish(&self, attrs: &LeaseAttrs) -> BTreeMap<String, Option<String>> {
        let v4 = !attrs.public_ip.is_unspecified() && !attrs.backend_data.is_null();
        let v6 = attrs.public_ipv6.filter(|_| !attrs.backend_v6_data.is_null()).map(|ip| (ip, &attrs.backend_v6_data));
        BTreeMap::from([
            (self.key("backend-type"), Some(attrs.backend_type.clone())),
            (self.key("backend-data"), v4.then(|| attrs.backend_data.to_json())),
            (self.key("public-ip"), v4.then(|| attrs.public_ip.to_string())),
            (self.key("backend-v6-data"), v6.map(|(_, d)| d.to_json())),
            (self.key("public-ipv6"), v6.map(|(ip, _)| ip.to_string())),
            (self.key("kube-subnet-manager"), Some("true".to_string())),
        ])
    }

    /// Whether `annotations` already say everything [`publish`](Self::publish) would.
    pub fn published(&self, annotations: &BTreeMap<String, String>, attrs: &LeaseAttrs) -> bool {
        self.publish(attrs).iter().all(|(k, v)| annotations.get(k) == v.as_ref())
    }

    fn overwrite<T: std::str::FromStr>(
        &self,
        annotations: &BTreeMap<String, String>,
        name: &str,
        what: &str,
    ) -> Result<Option<T>, NodeLeaseError> {
        let key = self.key(name);
        match annotations.get(&key).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| NodeLeaseError::Annotation { key, reason: format!("{v:?} is not an {what} address") }),
        }
    }

    /// The address an operator pinned with `<prefix>/public-ip-overwrite`, if any.
    pub fn public_ip_overwrite(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<Ipv4Addr>, NodeLeaseError> {
        self.overwrite(annotations, "public-ip-overwrite", "IPv4")
    }

    /// The address an operator pinned with `<prefix>/public-ipv6-overwrite`, if any.
    pub fn public_ipv6_overwrite(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<Ipv6Addr>, NodeLeaseError> {
        self.overwrite(annotations, "public-ipv6-overwrite", "IPv6")
    }

    /// A Node as a peer lease. `Ok(None)`: the node has no podCIDR yet or has
    /// published neither family (not ours, or not started yet). The key is
    /// the node's podCIDRs, whichever families it publishes.
    pub fn lease(
        &self,
        pod_cidr: Option<&str>,
        pod_cidr_list: &[String],
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<(LeaseKey, LeaseAttrs)>, NodeLeaseError> {
        let Some(key) = pod_cidrs(pod_cidr, pod_cidr_list)? else {
            return Ok(None);
        };
        let Some(backend_type) = annotations.get(&self.key("backend-type")) else {
            return Ok(None);
        };
        let get = |name: &str| annotations.get(&self.key(name));
        let bad = |name: &str, reason: String| NodeLeaseError::Annotation { key: self.key(name), reason };
        let json = |name: &str, text: &str| BackendData::parse(text).map_err(|e| bad(name, format!("not JSON: {e}")));
        let mut attrs = LeaseAttrs {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: None,
            backend_type: backend_type.clone(),
            backend_data: BackendData::Null,
            backend_v6_data: BackendData::Null,
        };
        let v4 = key.v4.is_some() && get("backend-data").is_some() && get("public-ip").is_some();
        let v6 = key.v6.is_some() && get("backend-v6-data").is_some() && get("public-ipv6").is_some();
        if !v4 && !v6 {
            return Ok(None);
        }
        if let (true, Some(data), Some(ip)) = (v4, get("backend-data"), get("public-ip")) {
            attrs.public_ip =
                ip.trim().parse().map_err(|_| bad("public-ip", format!("{ip:?} is not an IPv4 address")))?;
            attrs.backend_data = json("backend-data", data)?;
        }
        if let (true, Some(data), Some(ip)) = (v6, get("backend-v6-data"), get("public-ipv6")) {
            attrs.public_ipv6 =
                Some(ip.trim().parse().map_err(|_| bad("public-ipv6", format!("{ip:?} is not an IPv6 address")))?);
            attrs.backend_v6_data = json("backend-v6-data", data)?;
        }
        if attrs.backend_type == "vxlan" {
            if v4 {
                attrs.vxlan_data().map_err(|e| bad("backend-data", e.to_string()))?;
            }
            if v6 {
                attrs.vxlan_peer(crate::Family::V6).map_err(|e| bad("backend-v6-data", e.to_string()))?;
            }
        }
        Ok(Some((key, attrs)))
    }
}

/// A podCIDR as an IPv4 subnet, normalised to its network address.
pub fn parse_pod_cidr(pod_cidr: &str) -> Result<Ipv4Net, NodeLeaseError> {
    pod_cidr.trim().parse::<Ipv4Net>().map(|n| n.trunc()).map_err(|_| NodeLeaseError::PodCidr(pod_cidr.to_string()))
}

/// A podCIDR as an IPv6 subnet, normalised to its network address.
pub fn parse_pod_cidr_v6(pod_cidr: &str) -> Result<Ipv6Net, NodeLeaseError> {
    pod_cidr.trim().parse::<Ipv6Net>().map(|n| n.trunc()).map_err(|_| NodeLeaseError::PodCidr(pod_cidr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MacAddr, VxlanBackendData};

    fn attrs() -> LeaseAttrs {
        let mac: MacAddr = "0a:1b:2c:3d:4e:5f".parse().unwrap();
        LeaseAttrs::vxlan("192.168.1.11".parse().unwrap(), VxlanBackendData { vni: 1, vtep_mac: mac })
    }

    fn dual() -> LeaseAttrs {
        let data = |m: &str| VxlanBackendData { vni: 1, vtep_mac: m.parse().unwrap() };
        LeaseAttrs::vxlan_families(
            Some(("192.168.50.12".parse().unwrap(), data("0a:d8:d2:05:d3:63"))),
            Some(("fd00:50::12".parse().unwrap(), data("d2:69:e8:6a:1c:03"))),
        )
    }

    fn set(published: BTreeMap<String, Option<String>>) -> BTreeMap<String, String> {
        published.into_iter().filter_map(|(k, v)| Some((k, v?))).collect()
    }

    fn cidrs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn publishes_flannels_keys_and_values() {
        let a = NodeAnnotations::default().publish(&attrs());
        let s = set(a.clone());
        assert_eq!(s["flannel.alpha.coreos.com/backend-type"], "vxlan");
        assert_eq!(s["flannel.alpha.coreos.com/backend-data"], r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#);
        assert_eq!(s["flannel.alpha.coreos.com/public-ip"], "192.168.1.11");
        assert_eq!(s["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
        assert_eq!(s.len(), 4);
        // The IPv6 keys of an IPv4-only node are removed, not left behind.
        assert_eq!(a["flannel.alpha.coreos.com/public-ipv6"], None);
    }

    #[test]
    fn publishes_flannels_dual_stack_keys() {
        let s = set(NodeAnnotations::default().publish(&dual()));
        assert_eq!(s["flannel.alpha.coreos.com/backend-v6-data"], r#"{"VNI":1,"VtepMAC":"d2:69:e8:6a:1c:03"}"#);
        assert_eq!(s["flannel.alpha.coreos.com/public-ipv6"], "fd00:50::12");
        assert_eq!(s.len(), 6);
        let n = NodeAnnotations::default();
        let (key, got) = n.lease(None, &cidrs(&["10.244.18.0/24", "fd00:10:244:18::/64"]), &s).unwrap().unwrap();
        assert_eq!(key.to_string(), "10.244.18.0-24&fd00:10:244:18::-64");
        assert_eq!(got, dual());
        assert!(n.published(&s, &dual()));
        assert!(!n.published(&s, &attrs()), "stale IPv6 keys must go");
    }

    #[test]
    fn ipv6_only_nodes() {
        let data = VxlanBackendData { vni: 1, vtep_mac: "d2:69:e8:6a:1c:03".parse().unwrap() };
        let v6 = LeaseAttrs::vxlan_families(None, Some(("fd00:50::12".parse().unwrap(), data)));
        let n = NodeAnnotations::default();
        let s = set(n.publish(&v6));
        assert!(!s.contains_key("flannel.alpha.coreos.com/public-ip"));
        assert!(!s.contains_key("flannel.alpha.coreos.com/backend-data"));
        let (key, got) = n.lease(Some("fd00:10:244:3::/64"), &[], &s).unwrap().unwrap();
        assert_eq!((key.v4, key.v6.unwrap().to_string()), (None, "fd00:10:244:3::/64".to_string()));
        assert_eq!(got, v6);
    }

    #[test]
    fn pod_cidrs_are_classified_by_family() {
        let key = pod_cidrs(Some("10.244.1.0/24"), &cidrs(&["fd00::/64", "10.244.1.0/24"])).unwrap().unwrap();
        assert_eq!(key.to_string(), "10.244.1.0-24&fd00::-64");
        assert_eq!(pod_cidrs(Some("10.244.1.0/24"), &[]).unwrap().unwrap().to_string(), "10.244.1.0-24");
        assert_eq!(pod_cidrs(None, &[]).unwrap(), None);
        assert_eq!(pod_cidrs(Some(""), &[]).unwrap(), None);
        let three = pod_cidrs(None, &cidrs(&["10.244.1.0/24", "fd00::/64", "fd01::/64"])).unwrap_err();
        assert!(three.to_string().contains("one network per family"), "{three}");
        assert!(pod_cidrs(None, &cidrs(&["10.244.1.0/24", "10.244.2.0/24"])).is_err());
        assert!(matches!(pod_cidrs(None, &cidrs(&["banana"])), Err(NodeLeaseError::PodCidr(_))));
    }

    #[test]
    fn round_trips_through_a_node() {
        let n = NodeAnnotations::new("example.com/");
        let published = set(n.publish(&attrs()));
        assert!(published.keys().all(|k| k.starts_with("example.com/")));
        assert!(n.published(&published, &attrs()));
        let (key, got) = n.lease(Some("10.244.7.0/24"), &[], &published).unwrap().unwrap();
        assert_eq!(key.to_string(), "10.244.7.0-24");
        assert_eq!(got, attrs());
    }

    #[test]
    fn incomplete_nodes_are_not_peers_yet() {
        let n = NodeAnnotations::default();
        let published = set(n.publish(&attrs()));
        assert_eq!(n.lease(None, &[], &published).unwrap(), None);
        assert_eq!(n.lease(Some(""), &[], &published).unwrap(), None);
        let mut partial = published.clone();
        partial.remove("flannel.alpha.coreos.com/backend-data");
        assert_eq!(n.lease(Some("10.244.7.0/24"), &[], &partial).unwrap(), None);
        // Another prefix's annotations do not count.
        assert_eq!(NodeAnnotations::new("other.io").lease(Some("10.244.7.0/24"), &[], &published).unwrap(), None);
        // An IPv4 publisher with only an IPv6 podCIDR stands for nothing.
        assert_eq!(n.lease(Some("fc00::/64"), &[], &published).unwrap(), None);
    }

    #[test]
    fn bad_values_name_the_annotation() {
        let n = NodeAnnotations::default();
        let mut a = set(n.publish(&attrs()));
        a.insert(n.key("public-ip"), "not-an-ip".into());
        let e = n.lease(Some("10.244.7.0/24"), &[], &a).unwrap_err();
        assert!(e.to_string().contains("flannel.alpha.coreos.com/public-ip"), "{e}");
        let mut a = set(n.publish(&attrs()));
        a.insert(n.key("backend-data"), r#"{"VNI":1}"#.into());
        assert!(n.lease(Some("10.244.7.0/24"), &[], &a).unwrap_err().to_string().contains("backend-data"));
        let mut a = set(n.publish(&dual()));
        a.insert(n.key("public-ipv6"), "192.168.1.1".into());
        let e = n.lease(None, &cidrs(&["10.244.7.0/24", "fd00::/64"]), &a).unwrap_err();
        assert!(e.to_string().contains("public-ipv6"), "{e}");
    }

    #[test]
    fn public_ip_overwrite() {
        let n = NodeAnnotations::default();
        let mut a = BTreeMap::new();
        assert_eq!(n.public_ip_overwrite(&a).unwrap(), None);
        a.insert(n.key("public-ip-overwrite"), "203.0.113.9".into());
        assert_eq!(n.public_ip_overwrite(&a).unwrap(), Some("203.0.113.9".parse().unwrap()));
        a.insert(n.key("public-ip-overwrite"), "x".into());
        assert!(n.public_ip_overwrite(&a).is_err());
        a.insert(n.key("public-ipv6-overwrite"), "2001:db8::9".into());
        assert_eq!(n.public_ipv6_overwrite(&a).unwrap(), Some("2001:db8::9".parse().unwrap()));
        a.insert(n.key("public-ipv6-overwrite"), "10.0.0.1".into());
        assert!(n.public_ipv6_overwrite(&a).is_err());
    }
}
