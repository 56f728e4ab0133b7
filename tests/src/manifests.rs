//! The deploy manifests, read as the API server would: every document of
//! `deploy/overlay.yaml`, and what its ClusterRole grants.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde_json::Value;

/// The workspace's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a multi-document YAML file, as JSON values.
pub fn load(path: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The one document of `kind`.
pub fn one<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!("expected one {kind}, found {}", found.len()),
    }
}

/// Every (verb, resource) the ClusterRole of `deploy/overlay.yaml` grants,
/// expanded rule by rule; wildcards and other groups than the core one
/// (and networking.k8s.io for networkpolicies, policy.networking.k8s.io for
/// clusternetworkpolicies) are refused.
pub fn cluster_role_grants() -> Result<BTreeSet<(String, String)>> {
    let docs = load(&deploy_dir().join("overlay.yaml"))?;
    let role: ClusterRole = crate::strict::decode(one(&docs, "ClusterRole")?).map_err(anyhow::Error::msg)?;
    let mut grants = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        // The core group, networking.k8s.io for NetworkPolicies alone, and
        // policy.networking.k8s.io for ClusterNetworkPolicies alone.
        let group = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        let networking = (group == ["networking.k8s.io"] && resources == ["networkpolicies"])
            || (group == ["policy.networking.k8s.io"] && resources == ["clusternetworkpolicies"]);
        if group != [String::new()] && !networking {
            bail!("rule outside the core API group: {rule:?}");
        }
        if rule.resource_names.is_some() || rule.non_resource_urls.is_some() {
            bail!("unexpected rule shape: {rule:?}");
        }
        for resource in rule.resources.unwrap_or_default() {
            for verb in &rule.verbs {
                if verb == "*" || resource == "*" {
                    bail!("wildcard in the ClusterRole: {verb} {resource}");
                }
                grants.insert((verb.clone(), resource.clone()));
            }
        }
    }
    Ok(grants)
}
