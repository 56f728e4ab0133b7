//! The watches policy needs: Pods, Namespaces, NetworkPolicies, Nodes (for
//! ClusterNetworkPolicy's `nodes` peer) and ClusterNetworkPolicies (when
//! their CRD is installed), each a list-watch source (`list_watch`, listed in pages
//! of 500, watched from the listing's resourceVersion, listed again on
//! 410) decoding only the fields the compiler reads. A Pod in the API is
//! several kilobytes (managedFields, status conditions, container
//! statuses); what is kept of it is its labels, node, addresses and named
//! ports, so 100,000 pods fit in tens of megabytes.

use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::{Api, Client};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::cluster_policy::{self, ClusterNetworkPolicy};
use super::compile::{ContainerPort, Key, NamespaceInfo, PodInfo, Protocol, LOG_DROPS_ANNOTATION};
use super::selector::{Interner, Labels};
use crate::kubernetes::{core_resource, keep, lean_metadata, Collection, NodeDirectory, NodeFacts};
use crate::list_watch::{self, ListWatch, Sink, Stop, WatchError, CHANNEL};
use crate::outage::Outage;
use crate::reflector::{Store, WatchEvent};

/// A Pod as the watch reads it.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct LeanPod {
    #[serde(deserialize_with = "lean_metadata::<{ keep::LABELS }, _>")]
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

/// A Namespace as the watch reads it: its name, labels and annotations
/// (of which only [`LOG_DROPS_ANNOTATION`] is kept).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct LeanNamespace {
    #[serde(deserialize_with = "lean_metadata::<{ keep::LABELS | keep::ANNOTATIONS }, _>")]
    metadata: ObjectMeta,
}

core_resource!(LeanPod, "Pod", "pods", k8s_openapi::NamespaceResourceScope);
core_resource!(LeanNamespace, "Namespace", "namespaces", k8s_openapi::ClusterResourceScope);

fn key(meta: &ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

impl LeanNamespace {
    pub fn name(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    pub fn info(self, interner: &mut Interner) -> NamespaceInfo {
        let log_drops =
            self.metadata.annotations.as_ref().and_then(|a| a.get(LOG_DROPS_ANNOTATION)).is_some_and(|v| v == "true");
        NamespaceInfo { labels: Labels::from_pairs(self.metadata.labels.unwrap_or_default(), interner), log_drops }
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
        }
    }

    fn host_network(&self) -> bool {
        self.spec.host_network.unwrap_or(false)
    }
}

/// The pods' events without host-network pods. Policy never applies to them
/// (they have their node's address, not one of ours), and a pod cannot
/// become one (`hostNetwork` is immutable): they are not kept at all. Every
/// node runs a few (this DaemonSet's, kube-proxy's), so at 5,000 nodes they
/// are most of a listing. A host-network pod's change is a deletion, which
/// is nothing for a key the store does not hold.
pub fn without_host_network(events: Vec<WatchEvent<Key, LeanPod>>) -> Vec<WatchEvent<Key, LeanPod>> {
    events
        .into_iter()
        .filter_map(|event| match event {
            WatchEvent::InitApply(_, pod) if pod.host_network() => None,
            WatchEvent::Apply(key, pod) if pod.host_network() => Some(WatchEvent::Delete(key)),
            event => Some(event),
        })
        .collect()
}

/// A batch of changes from one of the watches.
#[derive(Debug)]
pub enum Change {
    /// Pods, by namespace and name.
    Pods(Vec<WatchEvent<Key, LeanPod>>),
    /// Namespaces, by name.
    Namespaces(Vec<WatchEvent<String, LeanNamespace>>),
    /// NetworkPolicies, by namespace and name.
    Policies(Vec<WatchEvent<Key, NetworkPolicySpec>>),
    /// Every Node's labels and addresses, as the lease watch holds them now.
    Nodes(Store<String, NodeFacts>),
    /// ClusterNetworkPolicies, by name; an empty listing while their CRD is absent.
    ClusterPolicies(Vec<WatchEvent<String, cluster_policy::Spec>>),
}

/// What to do when the API server refuses a watch.
const HINT: &str = " (the ClusterRole must grant list and watch on pods, namespaces and networkpolicies, \
                    as deploy/overlay.yaml does; or run with --network-policy=false)";

/// What to do when the API server refuses the ClusterNetworkPolicy watch.
const CLUSTER_HINT: &str = " (the ClusterRole must grant list and watch on \
                            clusternetworkpolicies.policy.networking.k8s.io, as deploy/overlay.yaml does)";

/// Every change of the watches, merged. Outages are said through
/// `outage` (the lease watch's too), refusals once each with what to do.
pub fn watch_all(client: Client, outage: Arc<Outage>, nodes: NodeDirectory) -> impl Stream<Item = Change> + Send {
    let pods =
        Collection::new(Api::<LeanPod>::all(client.clone()), "pods", HINT, |p: LeanPod| (p.key(), p), |p| p.key());
    let namespaces = Collection::new(
        Api::<LeanNamespace>::all(client.clone()),
        "namespaces",
        HINT,
        |n: LeanNamespace| (n.name(), n),
        |n| n.name(),
    );
    let policies = Collection::new(
        Api::<NetworkPolicy>::all(client.clone()),
        "networkpolicies",
        HINT,
        |p: NetworkPolicy| (key(&p.metadata), p.spec.unwrap_or_default()),
        |p| key(&p.metadata),
    );
    let api = Api::<ClusterNetworkPolicy>::all(client);
    let cluster_policies = OptionalCollection {
        probe: api.clone(),
        inner: Collection::new(
            api,
            "clusternetworkpolicies",
            CLUSTER_HINT,
            |p: ClusterNetworkPolicy| (p.name(), p.spec),
            |p| p.name(),
        ),
        available: None,
    };
    futures::stream::select_all([
        follow(pods, &outage, Change::Pods).boxed(),
        follow(namespaces, &outage, Change::Namespaces).boxed(),
        follow(policies, &outage, Change::Policies).boxed(),
        follow_nodes(nodes).boxed(),
        follow(cluster_policies, &outage, Change::ClusterPolicies).boxed(),
    ])
}

/// How often an API that is not served (or refused) is asked again: the
/// role grants no watch on CRDs, so this is how a CRD installed later is
/// found. Once a minute keeps an idle node's requests near one a minute.
const ABSENT_POLL: Duration = Duration::from_secs(60);
/// The version an absent API's (empty) listing gives: its watch waits for the API.
const ABSENT: &str = "absent";

/// The ClusterNetworkPolicy collection, whose CRD is optional: while the
/// API server does not serve it (404), or refuses it (403: RBAC not yet
/// updated), it lists as empty, so NetworkPolicy is enforced alone, and is
/// asked again every [`ABSENT_POLL`]; once served, it is listed and watched
/// like any other collection, with no restart. Said once each way.
struct OptionalCollection<L> {
    probe: Api<ClusterNetworkPolicy>,
    inner: L,
    /// Whether it was served at the last listing (none before the first).
    available: Option<bool>,
}

/// The API server's code when it does not serve or refuses a collection.
fn unavailable(stop: &Stop) -> Option<u16> {
    let Stop::Failed(WatchError::Refused(e)) = stop else { return None };
    match e.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => Some(status.code),
        _ => None,
    }
}

impl<L: ListWatch<Version = String>> OptionalCollection<L> {
    fn say_unavailable(&mut self, code: u16) {
        if self.available == Some(false) {
            return;
        }
        let api = format!("{}/{}", cluster_policy::GROUP, cluster_policy::VERSION);
        if code == 404 {
            info!(
                "the ClusterNetworkPolicy API ({api}) is not served: enforcing NetworkPolicy alone, and asking \
                 again every {}s (deploy/cluster-network-policy-crds.yaml installs it)",
                ABSENT_POLL.as_secs()
            );
        } else {
            warn!(
                "listing clusternetworkpolicies ({api}) is refused: ClusterNetworkPolicy is not enforced{CLUSTER_HINT}; \
                 asking again every {}s",
                ABSENT_POLL.as_secs()
            );
        }
        self.available = Some(false);
    }
}

impl<L: ListWatch<Version = String>> ListWatch for OptionalCollection<L> {
    type Key = L::Key;
    type Value = L::Value;
    type Version = String;

    fn what(&self) -> &'static str {
        self.inner.what()
    }

    fn refusal_hint(&self) -> &'static str {
        self.inner.refusal_hint()
    }

    async fn list(&mut self, sink: &mut Sink<L::Key, L::Value>) -> Result<String, Stop> {
        match self.inner.list(sink).await {
            Ok(version) => {
                if self.available != Some(true) {
                    info!("enforcing ClusterNetworkPolicy ({}/{})", cluster_policy::GROUP, cluster_policy::VERSION);
                }
                self.available = Some(true);
                Ok(version)
            }
            Err(stop) => match unavailable(&stop) {
                Some(code) => {
                    self.say_unavailable(code);
                    Ok(ABSENT.to_string())
                }
                None => Err(stop),
            },
        }
    }

    async fn watch(&mut self, version: String, sink: &mut Sink<L::Key, L::Value>) -> Result<String, (String, Stop)> {
        if version != ABSENT {
            return match self.inner.watch(version, sink).await {
                // No longer served (the CRD was deleted): list again, which says so.
                Err((v, stop)) if unavailable(&stop).is_some() => Err((v, Stop::Failed(WatchError::Expired))),
                other => other,
            };
        }
        loop {
            tokio::time::sleep(ABSENT_POLL).await;
            if let Err(kube::Error::Api(status)) = self.probe.list(&ListParams::default().limit(1)).await {
                if matches!(status.code, 403 | 404) {
                    continue;
                }
            }
            // Served now (or the server is away, which the listing will say): list it.
            let listed = async {
                sink.push(WatchEvent::Init).await?;
                let version = self.list(sink).await?;
                sink.push(WatchEvent::InitDone).await?;
                sink.flush().await?;
                Ok::<_, Stop>(version)
            };
            return listed.await.map_err(|stop| (ABSENT.to_string(), stop));
        }
    }
}

/// The Nodes the lease watch holds, each time they change: no watch of
/// Nodes of its own.
fn follow_nodes(directory: NodeDirectory) -> impl Stream<Item = Change> + Send {
    let rx = directory.subscribe();
    futures::stream::unfold((rx, directory), |(mut rx, directory)| async move {
        rx.changed().await.ok()?;
        Some((Change::Nodes(directory.snapshot()), (rx, directory)))
    })
}

/// Runs the list-watch of `source` and streams its batches as changes.
fn follow<L: list_watch::ListWatch>(
    source: L,
    outage: &Arc<Outage>,
    change: fn(list_watch::Batch<L>) -> Change,
) -> impl Stream<Item = Change> + Send {
    let (tx, rx) = mpsc::channel(CHANNEL);
    tokio::spawn(list_watch::run(source, tx, outage.clone()));
    futures::stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|batch| (change(batch), rx)) })
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
    fn host_network_pods_are_not_kept() {
        let pod = |name: &str, host_network: bool| -> LeanPod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "kube-overlay", "labels": {"app": "overlay"}},
                "spec": {"nodeName": "node-1", "hostNetwork": host_network, "containers": []},
                "status": {"phase": "Running", "podIPs": [{"ip": "192.168.50.11"}]}
            }))
            .unwrap()
        };
        let key = |name: &str| ("kube-overlay".to_string(), name.to_string());
        let listed = without_host_network(vec![
            WatchEvent::Init,
            WatchEvent::InitApply(key("overlay-x2k"), pod("overlay-x2k", true)),
            WatchEvent::InitApply(key("web"), pod("web", false)),
            WatchEvent::InitDone,
        ]);
        assert_eq!(listed.len(), 3);
        assert!(matches!(&listed[1], WatchEvent::InitApply(k, _) if k.1 == "web"));
        let changed = without_host_network(vec![
            WatchEvent::Apply(key("overlay-x2k"), pod("overlay-x2k", true)),
            WatchEvent::Apply(key("web"), pod("web", false)),
            WatchEvent::Delete(key("overlay-x2k")),
        ]);
        assert!(matches!(&changed[0], WatchEvent::Delete(k) if k.1 == "overlay-x2k"));
        assert!(matches!(&changed[1], WatchEvent::Apply(k, _) if k.1 == "web"));
        assert!(matches!(&changed[2], WatchEvent::Delete(_)));
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
