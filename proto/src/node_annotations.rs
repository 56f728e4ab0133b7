//! Kubernetes mode's lease format: a Node's `spec.podCIDR` is its subnet and
//! flannel's annotations (`<prefix>/backend-type`, `backend-data`,
//! `public-ip`, `kube-subnet-manager`) say how to reach it. Same keys and
//! values as flanneld, so a mixed or migrating cluster sees one network.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::lease::{LeaseAttrs, LeaseKey};

/// flannel's annotation prefix, the default of `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// Why a Node is not (yet) a usable peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeLeaseError {
    /// `spec.podCIDR` is not an IPv4 network.
    #[error("spec.podCIDR {0:?} is not an IPv4 CIDR")]
    PodCidr(String),
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

impl NodeAnnotations {
    /// Keys under `prefix` (without the trailing slash).
    pub fn new(prefix: &str) -> Self {
        NodeAnnotations { prefix: prefix.trim_end_matches('/').to_string() }
    }

    /// The full key of annotation `name`, e.g. `flannel.alpha.coreos.com/public-ip`.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// The annotations a node publishes for its lease, as flanneld writes them.
    pub fn publish(&self, attrs: &LeaseAttrs) -> BTreeMap<String, String> {
        BTreeMap::from([
            (self.key("backend-type"), attrs.backend_type.clone()),
            (self.key("backend-data"), attrs.backend_data.to_string()),
            (self.key("public-ip"), attrs.public_ip.to_string()),
            (self.key("kube-subnet-manager"), "true".to_string()),
        ])
    }

    /// Whether `annotations` already carry everything [`publish`](Self::publish) would write.
    pub fn published(&self, annotations: &BTreeMap<String, String>, attrs: &LeaseAttrs) -> bool {
        self.publish(attrs).iter().all(|(k, v)| annotations.get(k) == Some(v))
    }

    /// The address an operator pinned with `<prefix>/public-ip-overwrite`, if any.
    pub fn public_ip_overwrite(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<Ipv4Addr>, NodeLeaseError> {
        let key = self.key("public-ip-overwrite");
        match annotations.get(&key).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| NodeLeaseError::Annotation { key, reason: format!("{v:?} is not an IPv4 address") }),
        }
    }

    /// A Node as a peer lease. `Ok(None)`: the node has no podCIDR yet or has
    /// not published a vxlan backend (not ours, or not started yet).
    pub fn lease(
        &self,
        pod_cidr: Option<&str>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<(LeaseKey, LeaseAttrs)>, NodeLeaseError> {
        let Some(pod_cidr) = pod_cidr.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let (Some(backend_type), Some(data), Some(ip)) = (
            annotations.get(&self.key("backend-type")),
            annotations.get(&self.key("backend-data")),
            annotations.get(&self.key("public-ip")),
        ) else {
            return Ok(None);
        };
        let subnet = parse_pod_cidr(pod_cidr)?;
        let bad = |name: &str, reason: String| NodeLeaseError::Annotation { key: self.key(name), reason };
        let public_ip: Ipv4Addr =
            ip.trim().parse().map_err(|_| bad("public-ip", format!("{ip:?} is not an IPv4 address")))?;
        let backend_data: serde_json::Value =
            serde_json::from_str(data).map_err(|e| bad("backend-data", format!("not JSON: {e}")))?;
        let attrs = LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: backend_type.clone(),
            backend_data,
            backend_v6_data: None,
        };
        if attrs.backend_type == "vxlan" {
            attrs.vxlan_data().map_err(|e| bad("backend-data", e.to_string()))?;
        }
        Ok(Some((LeaseKey::v4(subnet), attrs)))
    }
}

/// A podCIDR as a subnet, normalised to its network address.
pub fn parse_pod_cidr(pod_cidr: &str) -> Result<Ipv4Net, NodeLeaseError> {
    pod_cidr.trim().parse::<Ipv4Net>().map(|n| n.trunc()).map_err(|_| NodeLeaseError::PodCidr(pod_cidr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MacAddr, VxlanBackendData};

    fn attrs() -> LeaseAttrs {
        let mac: MacAddr = "0a:1b:2c:3d:4e:5f".parse().unwrap();
        LeaseAttrs::vxlan("192.168.1.11".parse().unwrap(), VxlanBackendData { vni: 1, vtep_mac: mac })
    }

    #[test]
    fn publishes_flannels_keys_and_values() {
        let a = NodeAnnotations::default().publish(&attrs());
        assert_eq!(a["flannel.alpha.coreos.com/backend-type"], "vxlan");
        assert_eq!(a["flannel.alpha.coreos.com/backend-data"], r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#);
        assert_eq!(a["flannel.alpha.coreos.com/public-ip"], "192.168.1.11");
        assert_eq!(a["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
        assert_eq!(a.len(), 4);
    }

    #[test]
    fn round_trips_through_a_node() {
        let n = NodeAnnotations::new("example.com/");
        let published = n.publish(&attrs());
        assert!(published.keys().all(|k| k.starts_with("example.com/")));
        assert!(n.published(&published, &attrs()));
        let (key, got) = n.lease(Some("10.244.7.0/24"), &published).unwrap().unwrap();
        assert_eq!(key.to_string(), "10.244.7.0-24");
        assert_eq!(got, attrs());
    }

    #[test]
    fn incomplete_nodes_are_not_peers_yet() {
        let n = NodeAnnotations::default();
        let published = n.publish(&attrs());
        assert_eq!(n.lease(None, &published).unwrap(), None);
        assert_eq!(n.lease(Some(""), &published).unwrap(), None);
        let mut partial = published.clone();
        partial.remove("flannel.alpha.coreos.com/backend-data");
        assert_eq!(n.lease(Some("10.244.7.0/24"), &partial).unwrap(), None);
        // Another prefix's annotations do not count.
        assert_eq!(NodeAnnotations::new("other.io").lease(Some("10.244.7.0/24"), &published).unwrap(), None);
    }

    #[test]
    fn bad_values_name_the_annotation() {
        let n = NodeAnnotations::default();
        let mut a = n.publish(&attrs());
        a.insert(n.key("public-ip"), "not-an-ip".into());
        let e = n.lease(Some("10.244.7.0/24"), &a).unwrap_err();
        assert!(e.to_string().contains("flannel.alpha.coreos.com/public-ip"), "{e}");
        let mut a = n.publish(&attrs());
        a.insert(n.key("backend-data"), r#"{"VNI":1}"#.into());
        assert!(n.lease(Some("10.244.7.0/24"), &a).unwrap_err().to_string().contains("backend-data"));
        assert!(matches!(n.lease(Some("fc00::/64"), &n.publish(&attrs())), Err(NodeLeaseError::PodCidr(_))));
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
    }
}
