//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, from
//! sig-network's network-policy-api v0.2.0): the cluster operator's
//! policies, in two tiers around NetworkPolicy. Only what the compiler reads
//! is decoded; the API server's CRD validation makes most malformed objects
//! impossible, and the compiler checks the rest (a CRD of another version
//! may carry fields this one does not know: such a peer fails closed).
//!
//! Values the compiler must check (tier, action) stay strings here, so an
//! unknown one is a [`Problem`](super::compile::Problem) for that policy, not a
//! decode error that would hide the whole listing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;

/// The API group, version and resource.
pub const GROUP: &str = "policy.networking.k8s.io";
pub const VERSION: &str = "v1alpha2";
pub const PLURAL: &str = "clusternetworkpolicies";

/// A ClusterNetworkPolicy as the watch reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClusterNetworkPolicy {
    #[serde(deserialize_with = "crate::kubernetes::lean_metadata::<0, _>")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Spec {
    #[serde(default)]
    pub tier: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub subject: Subject,
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
    #[serde(default)]
    pub egress: Vec<EgressRule>,
}

/// Exactly one of the two is set (the CRD says so).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Subject {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    #[serde(default)]
    pub pod_selector: LabelSelector,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct IngressRule {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub from: Vec<Peer>,
    #[serde(default)]
    pub protocols: Option<Vec<ProtocolMatch>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EgressRule {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub to: Vec<Peer>,
    #[serde(default)]
    pub protocols: Option<Vec<ProtocolMatch>>,
}

/// A peer of either direction; `nodes`, `networks` and `domainNames` are
/// egress only (the CRD has them only there). Exactly one field is set.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    pub nodes: Option<LabelSelector>,
    pub networks: Option<Vec<String>>,
    pub domain_names: Option<Vec<String>>,
}

/// One protocol match; exactly one field is set.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolMatch {
    pub tcp: Option<PortMatchSpec>,
    pub udp: Option<PortMatchSpec>,
    pub sctp: Option<PortMatchSpec>,
    pub destination_named_port: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMatchSpec {
    pub destination_port: Option<PortSpec>,
}

/// A number or a range; one of the two.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PortSpec {
    #[serde(default)]
    pub number: i32,
    pub range: Option<PortRange>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PortRange {
    pub start: i32,
    pub end: i32,
}

impl ClusterNetworkPolicy {
    pub fn name(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
}

impl kube::Resource for ClusterNetworkPolicy {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "ClusterNetworkPolicy".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conformance_suites_policies_decode() {
        let p: ClusterNetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "node-and-cidr-as-peers-example", "managedFields": [{"manager": "x"}]},
            "spec": {"tier": "Admin", "priority": 75,
                "subject": {"pods": {"namespaceSelector": {"matchLabels": {"conformance-house": "gryffindor"}},
                                     "podSelector": {"matchLabels": {"conformance-house": "gryffindor"}}}},
                "egress": [
                    {"name": "allow", "action": "Accept", "to": [{"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}}],
                     "protocols": [{"tcp": {"destinationPort": {"number": 34346}}}]},
                    {"name": "deny", "action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}],
                     "protocols": [{"udp": {"destinationPort": {"range": {"start": 5353, "end": 5355}}}},
                                   {"destinationNamedPort": "web"}]}
                ]}
        }))
        .unwrap();
        assert_eq!(p.name(), "node-and-cidr-as-peers-example");
        assert_eq!(p.spec.tier, "Admin");
        assert_eq!(p.spec.priority, 75);
        assert!(p.spec.subject.pods.is_some() && p.spec.subject.namespaces.is_none());
        assert_eq!(p.spec.egress.len(), 2);
        let deny = &p.spec.egress[1];
        assert_eq!(deny.to[0].networks.as_deref(), Some(&["0.0.0.0/0".to_string(), "::/0".to_string()][..]));
        let protocols = deny.protocols.as_ref().unwrap();
        assert_eq!(
            protocols[0].udp.as_ref().unwrap().destination_port.as_ref().unwrap().range.as_ref().unwrap().end,
            5355
        );
        assert_eq!(protocols[1].destination_named_port.as_deref(), Some("web"));
    }
}
