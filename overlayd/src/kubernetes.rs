//! The Kubernetes API as overlayd uses it, shared by the lease store (our
//! Node, every Node as a peer) and NetworkPolicy (Pods, Namespaces,
//! NetworkPolicies): one context (where the server is, who we are, its
//! outages), one lean metadata decoder, and one list-watch source for a
//! collection, read in pages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{ListParams, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tracing::info;

use crate::flags::KubeArgs;
use crate::list_watch::{ListWatch, Sink, Stop, WatchError};
use crate::outage::Outage;
use crate::reflector::{Folded, Store, WatchEvent};

/// Who we are in the API server's audit log and to priority and fairness.
pub const USER_AGENT: &str = concat!("overlayd/", env!("CARGO_PKG_VERSION"));
/// How long one watch request lasts before the server ends it and it is
/// made again from the last resourceVersion seen (below the API server's
/// own limit, as client-go's reflector does).
pub const WATCH_TIMEOUT_S: u32 = 290;
/// Bound on one API call; a blackholed API server must not stall the daemon.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How many objects a page of a listing holds.
const PAGE: u32 = 500;

/// Where the API server is and who this node is: built once at start, shared
/// by the lease store and the policy watches (each makes its client on its
/// own runtime from it), with one place for the server's outages.
#[derive(Clone)]
pub struct KubeContext {
    config: Config,
    /// This node's name.
    pub node: String,
    /// The API server's outages, said once for every call that meets them.
    pub outage: Arc<Outage>,
    /// Every Node's labels and addresses, kept by the lease watch for the policy's `nodes` peers.
    pub nodes: NodeDirectory,
}

/// What policy reads of a Node: its labels (sorted) and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    pub labels: Vec<(String, String)>,
    pub ips: Vec<std::net::IpAddr>,
}

/// Every Node's [`NodeFacts`], by name: written by the lease watch (which
/// lists and watches every Node anyway), read by the policy thread. One
/// watch of Nodes per daemon, not two: at 5,000 nodes every watch counts.
/// The writer never waits for the reader (a lock held for a store update,
/// a version bumped); the reader copies the store when the version moves.
#[derive(Clone)]
pub struct NodeDirectory {
    store: Arc<std::sync::Mutex<Store<String, NodeFacts>>>,
    version: Arc<tokio::sync::watch::Sender<u64>>,
    /// Off until policy runs: without a reader, nothing is kept.
    kept: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for NodeDirectory {
    fn default() -> Self {
        NodeDirectory {
            store: Arc::default(),
            version: Arc::new(tokio::sync::watch::Sender::new(0)),
            kept: Arc::default(),
        }
    }
}

impl NodeDirectory {
    /// Folds `events` in; readers are told when anything changed (or a listing ended).
    pub fn apply(&self, events: impl IntoIterator<Item = WatchEvent<String, NodeFacts>>) {
        if !self.kept.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut changed = false;
        {
            let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            for event in events {
                changed |= !matches!(store.apply(event), Folded::Nothing);
            }
        }
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// A copy of what it holds now.
    pub fn snapshot(&self) -> Store<String, NodeFacts> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts keeping what the lease watch sees: called before that watch
    /// starts, so its first listing is kept.
    pub fn keep(&self) {
        self.kept.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Told of every change; marked changed, so a reader's first wait returns at once.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut rx = self.version.subscribe();
        rx.mark_changed();
        rx
    }
}

impl KubeContext {
    /// From `--kubeconfig`, `--kube-api-url`, or the in-cluster service account.
    pub async fn new(args: &KubeArgs) -> anyhow::Result<Self> {
        let node = node_name(args)?;
        let config = config(args).await?;
        info!(server = %config.cluster_url, %node, "Kubernetes mode");
        let outage = Arc::new(Outage::new("the Kubernetes API server", config.cluster_url.to_string()));
        Ok(KubeContext { config, node, outage, nodes: NodeDirectory::default() })
    }

    /// A client on the current runtime.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::try_from(self.config.clone()).context("building the Kubernetes client")
    }
}

/// This node's name in Kubernetes mode.
pub fn node_name(args: &KubeArgs) -> anyhow::Result<String> {
    args.node_name.clone().filter(|n| !n.trim().is_empty()).context(
        "Kubernetes mode needs this node's name: set --node-name or NODE_NAME (the DaemonSet sets it from spec.nodeName)",
    )
}

async fn config(args: &KubeArgs) -> anyhow::Result<Config> {
    let api_url = match &args.kube_api_url {
        Some(url) => Some(
            url.parse::<hyper::Uri>()
                .ok()
                .filter(|u| u.scheme().is_some() && u.host().is_some())
                .with_context(|| format!("--kube-api-url {url:?} is not a URL such as https://10.96.0.1:443"))?,
        ),
        None => None,
    };
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => match Config::infer().await {
            Ok(config) => config,
            // flanneld's --kube-api-url alone: that server, with no credentials.
            Err(_) if api_url.is_some() => Config::new(api_url.clone().unwrap_or_default()),
            Err(e) => {
                return Err(e).context(
                    "finding the API server: not in a pod and no kubeconfig (use --kubeconfig or --kube-api-url)",
                )
            }
        },
    };
    if let Some(url) = api_url {
        config.cluster_url = url;
    }
    config.connect_timeout = Some(Duration::from_secs(5));
    config.headers.push((hyper::header::USER_AGENT, hyper::header::HeaderValue::from_static(USER_AGENT)));
    Ok(config)
}

/// The API server answered, and said no (a status such as 403): a
/// configuration problem to say as such, not an outage.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {body}")]
pub struct Refused {
    /// The HTTP status.
    pub status: hyper::StatusCode,
    /// The start of the answer.
    pub body: String,
}

/// Whether `e` is the API server's refusal rather than a call that did not get through.
pub fn is_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<Refused>().is_some()
            || matches!(cause.downcast_ref::<kube::Error>(), Some(kube::Error::Api(_)))
    })
}

/// A kube client error as a watch error: 410 is lost history, the API
/// server's other answers are refusals, anything else an outage.
pub fn watch_error(e: kube::Error, what: &'static str) -> WatchError {
    match e {
        kube::Error::Api(status) if status.code == 410 => WatchError::Expired,
        kube::Error::Api(_) => WatchError::Refused(anyhow::Error::new(e).context(what)),
        e => WatchError::Unreachable(anyhow::Error::new(e).context(what)),
    }
}

/// Which metadata fields a lean object keeps (bits of [`lean_metadata`]'s parameter).
pub mod keep {
    /// `metadata.labels`.
    pub const LABELS: u8 = 1;
    /// `metadata.annotations`.
    pub const ANNOTATIONS: u8 = 2;
    /// `metadata.creationTimestamp`.
    pub const CREATED: u8 = 4;
}

/// Decodes `metadata` keeping name, namespace and resourceVersion, and the
/// fields `KEEP` names ([`keep`]); everything else (managedFields above all,
/// kilobytes an object) is skipped without being allocated, which for
/// thousands of Nodes or 100,000 Pods is most of the work and memory of a listing.
pub fn lean_metadata<'de, const KEEP: u8, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    struct Visitor<const KEEP: u8>;
    impl<'de, const KEEP: u8> serde::de::Visitor<'de> for Visitor<KEEP> {
        type Value = ObjectMeta;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("object metadata")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<ObjectMeta, M::Error> {
            use serde::de::IgnoredAny;
            let mut meta = ObjectMeta::default();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                match &*key {
                    "name" => meta.name = map.next_value()?,
                    "namespace" => meta.namespace = map.next_value()?,
                    "resourceVersion" => meta.resource_version = map.next_value()?,
                    "labels" if KEEP & keep::LABELS != 0 => {
                        meta.labels = map.next_value::<Option<BTreeMap<String, String>>>()?
                    }
                    "annotations" if KEEP & keep::ANNOTATIONS != 0 => {
                        meta.annotations = map.next_value::<Option<BTreeMap<String, String>>>()?
                    }
                    "creationTimestamp" if KEEP & keep::CREATED != 0 => {
                        meta.creation_timestamp = map.next_value::<Option<Time>>()?
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(meta)
        }
    }
    d.deserialize_map(Visitor::<KEEP>)
}

/// `kube::Resource` for a lean type of a core (v1) kind, whose `metadata` is an `ObjectMeta`.
macro_rules! core_resource {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed($kind)
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed("")
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed("v1")
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed($plural)
            }
            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use core_resource;

/// A collection of the API (Pods, Namespaces, NetworkPolicies) as a
/// list-watch source of what is kept of each object: listed in pages of 500
/// (a listing of 100,000 Pods never sits whole in memory), watched with
/// bookmarks from the listing's resourceVersion.
pub struct Collection<T, K, V> {
    api: Api<T>,
    what: &'static str,
    hint: &'static str,
    /// An object's key and what is kept of it.
    entry: fn(T) -> (K, V),
    /// The key of a deleted object.
    key: fn(&T) -> K,
}

impl<T, K, V> Collection<T, K, V> {
    /// The collection `api`, named `what` in logs, with `hint` added to a refusal.
    pub fn new(api: Api<T>, what: &'static str, hint: &'static str, entry: fn(T) -> (K, V), key: fn(&T) -> K) -> Self {
        Collection { api, what, hint, entry, key }
    }
}

impl<T, K, V> ListWatch for Collection<T, K, V>
where
    T: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K: Send + 'static,
    V: Send + 'static,
{
    type Key = K;
    type Value = V;
    type Version = String;

    fn what(&self) -> &'static str {
        self.what
    }

    fn refusal_hint(&self) -> &'static str {
        self.hint
    }

    async fn list(&mut self, sink: &mut Sink<K, V>) -> Result<String, Stop> {
        let mut token: Option<String> = None;
        loop {
            let mut params = ListParams::default().limit(PAGE);
            if let Some(token) = &token {
                params = params.continue_token(token);
            }
            let page = self.api.list(&params).await.map_err(|e| watch_error(e, "listing"))?;
            for object in page.items {
                let (key, value) = (self.entry)(object);
                sink.push(WatchEvent::InitApply(key, value)).await?;
            }
            match page.metadata.continue_.filter(|t| !t.is_empty()) {
                Some(next) => token = Some(next),
                None => return Ok(page.metadata.resource_version.unwrap_or_default()),
            }
        }
    }

    async fn watch(&mut self, version: String, sink: &mut Sink<K, V>) -> Result<String, (String, Stop)> {
        let (entry, key) = (self.entry, self.key);
        watch_objects(&self.api, version, sink, |change| match change {
            Watched::Applied(o) => {
                let (k, v) = entry(o);
                vec![WatchEvent::Apply(k, v)]
            }
            Watched::Deleted(o) => vec![WatchEvent::Delete(key(&o))],
        })
        .await
    }
}

/// One object of a watch, as it changed.
pub enum Watched<T> {
    /// Created or changed.
    Applied(T),
    /// Deleted (as it was last).
    Deleted(T),
}

/// Watches `api` from `version` until the server ends the watch (its
/// timeout), turning each change into events with `translate` (none, one,
/// or more) and sending them; bookmarks move the version on. Gives the
/// version reached, or where it stopped and why.
pub async fn watch_objects<T, K, V>(
    api: &Api<T>,
    mut version: String,
    sink: &mut Sink<K, V>,
    mut translate: impl FnMut(Watched<T>) -> Vec<WatchEvent<K, V>>,
) -> Result<String, (String, Stop)>
where
    T: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let params = WatchParams::default().timeout(WATCH_TIMEOUT_S);
    let asked = std::time::Instant::now();
    let stream = match api.watch(&params, &version).await {
        Ok(stream) => stream,
        Err(e) => return Err((version, watch_error(e, "watching").into())),
    };
    let mut stream = std::pin::pin!(stream);
    sink.working(asked);
    while let Some(item) = stream.next().await {
        let change = match item {
            Ok(kube::core::WatchEvent::Added(o) | kube::core::WatchEvent::Modified(o)) => {
                version = o.meta().resource_version.clone().unwrap_or(version);
                Watched::Applied(o)
            }
            Ok(kube::core::WatchEvent::Deleted(o)) => {
                version = o.meta().resource_version.clone().unwrap_or(version);
                Watched::Deleted(o)
            }
            Ok(kube::core::WatchEvent::Bookmark(bookmark)) => {
                version = bookmark.metadata.resource_version;
                continue;
            }
            Ok(kube::core::WatchEvent::Error(status)) => {
                return Err((version, watch_error(kube::Error::Api(status), "watching").into()))
            }
            Err(e) => return Err((version, watch_error(e, "watching").into())),
        };
        if let Err(closed) = sink.send_all(translate(change)).await {
            return Err((version, closed.into()));
        }
    }
    // The server ended the watch (its timeout): go on from where it stood.
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Lean<const KEEP: u8> {
        #[serde(deserialize_with = "lean_metadata::<KEEP, _>")]
        metadata: ObjectMeta,
    }

    #[test]
    fn lean_metadata_keeps_what_it_is_told_and_skips_the_rest() {
        let json = serde_json::json!({"metadata": {
            "name": "a", "namespace": "x", "resourceVersion": "7", "labels": {"app": "a"},
            "annotations": {"big": "x"}, "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}], "uid": "u"}});
        let bare: Lean<0> = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(bare.metadata.name.as_deref(), Some("a"));
        assert_eq!(bare.metadata.namespace.as_deref(), Some("x"));
        assert_eq!(bare.metadata.resource_version.as_deref(), Some("7"));
        assert!(bare.metadata.labels.is_none() && bare.metadata.annotations.is_none());
        assert!(bare.metadata.managed_fields.is_none() && bare.metadata.uid.is_none());
        let all: Lean<{ keep::LABELS | keep::ANNOTATIONS | keep::CREATED }> = serde_json::from_value(json).unwrap();
        assert_eq!(all.metadata.labels.unwrap()["app"], "a");
        assert_eq!(all.metadata.annotations.unwrap()["big"], "x");
        assert!(all.metadata.creation_timestamp.is_some());
    }

    #[test]
    fn an_expired_watch_lists_again_and_an_answer_is_a_refusal() {
        let status = |code| kube::Error::Api(kube::core::Status { code, ..Default::default() }.boxed());
        assert!(matches!(watch_error(status(410), "x"), WatchError::Expired));
        assert!(matches!(watch_error(status(403), "x"), WatchError::Refused(_)));
        let refused = anyhow::Error::new(Refused { status: hyper::StatusCode::FORBIDDEN, body: "no".into() });
        assert!(is_refusal(&refused.context("listing nodes")));
        assert!(!is_refusal(&anyhow::anyhow!("connection refused")));
    }
}
