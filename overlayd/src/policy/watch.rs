//! The three watches NetworkPolicy needs: Pods, Namespaces and
//! NetworkPolicies, each a kube-runtime watcher (list, then watch from the
//! list's resourceVersion, relist on 410) decoding only the fields the
//! compiler reads. A Pod in the API is several kilobytes (managedFields,
//! status conditions, container statuses); what is kept of it is its
//! labels, node, addresses and named ports, so 100,000 pods fit in tens of
//! megabytes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use futures::{Stream, StreamExt};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

use super::compile::{ContainerPort, Key, PodInfo, Protocol};
use super::selector::{Interner, Labels};

/// The metadata fields kept: name, namespace, labels, resourceVersion.
fn lean_metadata<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        resource_version: Option<String>,
    }
    let lean = <Lean as serde::Deserialize>::deserialize(d)?;
    Ok(ObjectMeta {
        name: lean.name,
        namespace: lean.namespace,
        labels: lean.labels,
        resource_version: lean.resource_version,
        ..ObjectMeta::default()
    })
}

/// A Pod as the watch reads it.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct LeanPod {
    #[serde(deserialize_with = "lean_metadata")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: LeanPodSpec,
    #[serde(default)]
    status: LeanPodStatus,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodSpec {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<LeanContainer>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct LeanContainer {
    #[serde(default)]
    ports: Vec<LeanPort>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPort {
    #[serde(default)]
    name: Option<String>,
    container_port: i32,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodStatus {
    #[serde(default)]
    phase: Option<String>,
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<LeanPodIp>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct LeanPodIp {
    ip: String,
}

/// A Namespace as the watch reads it: its name and labels.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct LeanNamespace {
    #[serde(deserialize_with = "lean_metadata")]
    metadata: ObjectMeta,
}

macro_rules! resource {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("")
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("v1")
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(LeanPod, "Pod", "pods", k8s_openapi::NamespaceResourceScope);
resource!(LeanNamespace, "Namespace", "namespaces", k8s_openapi::ClusterResourceScope);

fn key(meta: &ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

impl LeanNamespace {
    pub fn name(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    pub fn labels(self, interner: &mut Interner) -> Labels {
        Labels::from_pairs(self.metadata.labels.unwrap_or_default(), interner)
    }
}

impl LeanPod {
    pub fn key(&self) -> Key {
        key(&self.metadata)
    }

    /// What the compiler needs, its strings shared through `interner`. A
    /// pod that has ended holds no address any more (its IP may already be
    /// another pod's).
    pub fn info(self, interner: &mut Interner) -> PodInfo {
        let ended = matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"));
        let ips =
            if ended { Vec::new() } else { self.status.pod_ips.iter().filter_map(|p| p.ip.parse().ok()).collect() };
        let mut ports: Vec<ContainerPort> = self
            .spec
            .containers
            .into_iter()
            .flat_map(|c| c.ports)
            .filter_map(|p| {
                Some(ContainerPort {
                    name: interner.get(p.name.as_deref().filter(|n| !n.is_empty())?),
                    protocol: Protocol::parse(p.protocol.as_deref()).ok()?,
                    port: u16::try_from(p.container_port).ok()?,
                })
            })
            .collect();
        ports.shrink_to_fit();
        PodInfo {
            node: interner.get(self.spec.node_name.as_deref().unwrap_or_default()),
            labels: Labels::from_pairs(self.metadata.labels.unwrap_or_default(), interner),
            ips,
            ports,
            host_network: self.spec.host_network.unwrap_or(false),
        }
    }
}

/// One change from one of the watches.
#[derive(Debug)]
pub enum Change {
    /// A pod, present or deleted.
    Pod(Box<LeanPod>, bool),
    Namespace(Box<LeanNamespace>, bool),
    Policy(Key, Option<Box<k8s_openapi::api::networking::v1::NetworkPolicySpec>>),
    /// A (re)list began: what follows until `Listed` is the whole collection.
    Relisting(Kind),
    /// The (re)list is complete: objects it did not name are gone.
    Listed(Kind),
    /// A watch failed; it is retried with backoff.
    Failed(Kind, watcher::Error),
}

/// Which watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Namespaces,
    Policies,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Policies => "networkpolicies",
        }
    }
}

fn changes<K, F>(
    kind: Kind,
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    f: F,
) -> impl Stream<Item = Change>
where
    F: Fn(K, bool) -> Change + Clone,
{
    stream.map(move |event| match event {
        Ok(Event::Init) => Change::Relisting(kind),
        Ok(Event::InitDone) => Change::Listed(kind),
        Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => f(o, true),
        Ok(Event::Delete(o)) => f(o, false),
        Err(e) => Change::Failed(kind, e),
    })
}

/// Whether a watch failed because the API server said no (401, 403, ...)
/// rather than because it could not be reached.
pub fn is_refusal(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            matches!(e, kube::Error::Api(_))
        }
        watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => true,
    }
}

/// Whether the API server refused for want of a grant (401, 403).
pub fn is_forbidden(e: &watcher::Error) -> bool {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return false,
    };
    matches!(status, 401 | 403)
}

/// Every change of the three watches, merged.
pub fn watch_all(client: Client) -> impl Stream<Item = Change> + Send {
    // Lists in pages of 500. The watch cache (resourceVersion=0) would
    // answer whole, and kube's watcher decodes a response at once: at
    // 100,000 Pods, hundreds of megabytes. (The Node watch reads the cache's
    // answer as a stream instead; Nodes are few and it needs only one list.)
    let config = || watcher::Config::default().page_size(500);
    let pods = changes(
        Kind::Pods,
        watcher(Api::<LeanPod>::all(client.clone()), config()).default_backoff(),
        |p: LeanPod, present| Change::Pod(Box::new(p), present),
    );
    let namespaces = changes(
        Kind::Namespaces,
        watcher(Api::<LeanNamespace>::all(client.clone()), config()).default_backoff(),
        |n: LeanNamespace, present| Change::Namespace(Box::new(n), present),
    );
    let policies = changes(
        Kind::Policies,
        watcher(Api::<NetworkPolicy>::all(client), config()).default_backoff(),
        |p: NetworkPolicy, present| {
            let k = key(&p.metadata);
            Change::Policy(k, if present { Some(Box::new(p.spec.unwrap_or_default())) } else { None })
        },
    );
    futures::stream::select(futures::stream::select(pods.boxed(), namespaces.boxed()), policies.boxed())
}

fn watcher<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(api, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_only_what_policy_reads() {
        let pod: LeanPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}, "resourceVersion": "7",
                         "managedFields": [{"manager": "kubelet"}], "annotations": {"big": "x"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80},
                {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
                {"containerPort": 82}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.2",
                       "podIPs": [{"ip": "10.244.1.2"}, {"ip": "fd00:10:244:1::2"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert_eq!(pod.key(), ("x".to_string(), "a".to_string()));
        let info = pod.info(&mut Interner::default());
        assert_eq!(&*info.node, "node-1");
        assert_eq!(info.ips.len(), 2);
        assert_eq!(info.ports.len(), 2, "unnamed ports cannot be named in a policy");
        assert_eq!(info.ports[1], ContainerPort { name: "serve-81-udp".into(), protocol: Protocol::Udp, port: 81 });
        assert_eq!(info.labels.get("pod"), Some("a"));
    }

    #[test]
    fn an_ended_pod_holds_no_address() {
        let pod: LeanPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x"},
            "spec": {"nodeName": "node-1", "containers": []},
            "status": {"phase": "Succeeded", "podIPs": [{"ip": "10.244.1.2"}]}
        }))
        .unwrap();
        assert!(pod.info(&mut Interner::default()).ips.is_empty());
    }
}
