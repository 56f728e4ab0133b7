//! The Kubernetes lease store: this node's subnet is its Node's
//! `spec.podCIDR` (assigned by kube-controller-manager), peers are the Nodes
//! that carry flannel's annotations, and readiness is the Node condition
//! `NetworkUnavailable=False`. The API server is the only source of truth;
//! nothing is claimed, so nothing can be contended.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::ListParams;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::Event;
use kube::{Api, Client};
use proto::node_annotations::pod_cidrs;
use proto::{LeaseAttrs, LeaseKey, NetConfig, NodeAnnotations};
use tracing::{info, warn};

use super::list_scanner::ListScanner;
use super::net_conf;
use super::{Created, EventSender, LeaseLost, LeaseStore, LostKind, OwnLease, PublicIps, Renewal, WatchEvent};
use crate::backoff::{Backoff, Throttle};
use crate::flags::KubeArgs;
use crate::kubernetes::{
    core_resource, is_refusal, keep, lean_metadata, watch_objects, KubeContext, NodeDirectory, NodeFacts, Refused,
    Watched, CALL_TIMEOUT,
};
use crate::list_watch::{self, ListWatch, Sink, Stop, WatchError};
use crate::outage::Outage;
use crate::reflector::WatchEvent as ReflectorEvent;

/// The condition we own on our Node, and what we set it to.
const CONDITION: &str = "NetworkUnavailable";
const CONDITION_REASON: &str = "OverlayIsUp";
/// Who wrote our fields, in the Node's managedFields.
const FIELD_MANAGER: &str = "overlayd";
/// The watch already shows us changes to our own Node; this is a safety net,
/// kept rare so 5,000 nodes do not load the API server.
const RENEW_INTERVAL: Duration = Duration::from_secs(300);
/// How often a lasting condition (no podCIDR yet, API server down) is said again.
const SAY_EVERY: Duration = Duration::from_secs(30);

/// A Node as the watch reads it: name, resourceVersion, annotations and
/// podCIDR. A real Node carries kilobytes that overlayd never reads (the
/// images list, capacity, conditions, managedFields); decoding into this
/// skips them without allocating, which at 5,000 Nodes is most of the work
/// and memory of a listing.
#[derive(Clone, Debug, Default, serde::Deserialize)]
struct PeerNode {
    #[serde(deserialize_with = "lean_metadata::<{ keep::ANNOTATIONS | keep::CREATED | keep::LABELS }, _>")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PeerNodeSpec>,
    /// Its addresses, for the policy's `nodes` peers ([`NodeDirectory`]).
    #[serde(default)]
    status: Option<PeerNodeStatus>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct PeerNodeStatus {
    #[serde(default)]
    addresses: Vec<PeerNodeAddress>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct PeerNodeAddress {
    #[serde(default)]
    address: String,
}

impl PeerNode {
    fn name(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    /// Its labels and the addresses among `status.addresses` (a Hostname is not one).
    fn facts(&self) -> NodeFacts {
        let labels = self.metadata.labels.iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut ips: Vec<std::net::IpAddr> =
            self.status.iter().flat_map(|s| &s.addresses).filter_map(|a| a.address.parse().ok()).collect();
        ips.sort();
        ips.dedup();
        NodeFacts { labels, ips }
    }
}

core_resource!(PeerNode, "Node", "nodes", k8s_openapi::ClusterResourceScope);

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct PeerNodeSpec {
    #[serde(rename = "podCIDR", default)]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs", default)]
    pod_cidrs: Option<Vec<String>>,
}

/// A connection to the API server, for one node.
#[derive(Clone)]
pub struct KubeLeases {
    /// Our own Node, in full (its annotations and conditions are patched).
    nodes: Api<Node>,
    /// Every Node, as peers.
    peers: Api<PeerNode>,
    /// For the list, which is read as a stream (`list_nodes`).
    client: Client,
    node_name: String,
    annotations: NodeAnnotations,
    net_config_path: PathBuf,
    /// Our Node as `renew` just read it, for `announce_ready` to use once
    /// instead of reading it again (at 5,000 nodes every read counts).
    last_read: Option<Node>,
    /// Whether to set `NetworkUnavailable=False` (`--set-node-network-unavailable`).
    set_condition: bool,
    /// The net-conf text the daemon started with.
    config_text: Option<String>,
    /// The API server's outages, said once for every call that meets them.
    outage: Arc<Outage>,
    /// Every Node's labels and addresses, for policy (filled by the watch).
    directory: NodeDirectory,
}

/// How often the net-conf file is read again to see whether it changed.
const CONFIG_POLL: Duration = Duration::from_secs(30);

impl KubeLeases {
    /// A store on the API server of `context`.
    pub async fn connect(context: &KubeContext, args: &KubeArgs) -> anyhow::Result<Self> {
        let client = context.client()?;
        Ok(KubeLeases {
            nodes: Api::all(client.clone()),
            peers: Api::all(client.clone()),
            client,
            node_name: context.node.clone(),
            annotations: NodeAnnotations::new(&args.kube_annotation_prefix),
            net_config_path: args.net_config_path.clone(),
            set_condition: args.set_node_network_unavailable,
            last_read: None,
            config_text: None,
            outage: context.outage.clone(),
            directory: context.nodes.clone(),
        })
    }

    /// Our Node, or None when it does not exist (yet).
    async fn own_node(&self) -> anyhow::Result<Option<Node>> {
        bounded(format!("getting node {}", self.node_name), self.nodes.get_opt(&self.node_name)).await
    }

    /// Our Node, waiting (and saying why) while the API server is down or
    /// the kubelet has not registered it yet.
    async fn wait_for_own_node(&self) -> Node {
        let mut backoff = Backoff::new();
        let mut say = Throttle::new(SAY_EVERY);
        loop {
            match self.own_node().await {
                Ok(Some(node)) => {
                    self.outage.recovered();
                    return node;
                }
                Ok(None) if say.ready() => {
                    info!(node = %self.node_name, "waiting for node {} to be registered", self.node_name)
                }
                Err(e) if is_refusal(&e) && say.ready() => {
                    warn!(node = %self.node_name, error = format!("{e:#}"), "the API server refuses to give our node; retrying")
                }
                Err(e) if is_refusal(&e) => {}
                Err(e) => self.outage.failed(&format!("{e:#}")),
                _ => {}
            }
            backoff.wait().await;
        }
    }

    /// Writes our annotations onto our Node, through `nodes/status` as
    /// flanneld does, so the ClusterRole needs no `patch` on Nodes themselves
    /// (which could change any Node's spec: taints, unschedulable). A
    /// strategic merge: other annotations stay; the keys of a family that is
    /// off are removed. Returns the Node as the API server now holds it.
    async fn publish(&self, attrs: &LeaseAttrs) -> anyhow::Result<Node> {
        let patch = serde_json::json!({ "metadata": { "annotations": self.annotations.publish(attrs) } });
        self.patch_status(&patch, format!("annotating node {}", self.node_name)).await
    }

    /// One strategic-merge patch of our Node through `nodes/status`.
    async fn patch_status(&self, patch: &serde_json::Value, what: String) -> anyhow::Result<Node> {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        bounded(what, self.nodes.patch_status(&self.node_name, &params, &Patch::Strategic(patch))).await
    }
}

/// The API server's Nodes as a list-watch source of peer leases: each Node
/// that carries our annotations and a podCIDR stands for a lease (see
/// [`NodeEvents`]). A (re)list comes from the watch cache
/// (`resourceVersion=0`) and is decoded one Node at a time, as it arrives.
pub struct NodeWatch {
    client: Client,
    peers: Api<PeerNode>,
    nodes: NodeEvents,
    /// Where every Node's labels and addresses go, for policy.
    directory: NodeDirectory,
}

impl ListWatch for NodeWatch {
    type Key = LeaseKey;
    type Value = (LeaseAttrs, Created);
    type Version = String;

    fn what(&self) -> &'static str {
        "nodes"
    }

    /// Every Node, from the API server's watch cache (`resourceVersion=0`):
    /// a cached list may be a little behind, but the watch that follows
    /// starts at its resourceVersion and brings every later change, so the
    /// peers converge all the same, and no list is a quorum read of etcd.
    /// The cache answers with the whole list at once (5,000 real Nodes are
    /// ~45 MB of JSON): it is taken apart as it arrives, one Node at a time.
    async fn list(&mut self, sink: &mut Sink<LeaseKey, (LeaseAttrs, Created)>) -> Result<String, Stop> {
        use http_body_util::BodyExt;
        let unreachable = |e: anyhow::Error| Stop::Failed(WatchError::Unreachable(e));
        let request = kube::core::Request::new("/api/v1/nodes")
            .list(&ListParams::default().match_any())
            .map_err(|e| unreachable(anyhow::Error::new(e).context("building the list request")))?;
        let response = tokio::time::timeout(CALL_TIMEOUT, self.client.send(request.map(kube::client::Body::from)))
            .await
            .map_err(|_| unreachable(anyhow::anyhow!("listing nodes: no answer in {CALL_TIMEOUT:?}")))?
            .map_err(|e| unreachable(anyhow::Error::new(e).context("listing nodes")))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body = String::from_utf8_lossy(&text[..text.len().min(512)]).into_owned();
            let refused = anyhow::Error::new(Refused { status, body }).context("listing nodes");
            return Err(WatchError::Refused(refused).into());
        }
        let mut scanner = ListScanner::default();
        self.directory.apply([ReflectorEvent::Init]);
        loop {
            let frame = tokio::time::timeout(CALL_TIMEOUT, body.frame())
                .await
                .map_err(|_| unreachable(anyhow::anyhow!("listing nodes: the answer stalled for {CALL_TIMEOUT:?}")))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| unreachable(anyhow::Error::new(e).context("reading the node list")))?;
            let Ok(data) = frame.into_data() else { continue };
            let mut events = Vec::new();
            let mut facts = Vec::new();
            let nodes = &mut self.nodes;
            scanner
                .feed(&data, |item| match serde_json::from_slice::<PeerNode>(item) {
                    Ok(node) => {
                        facts.push(ReflectorEvent::InitApply(node.name(), node.facts()));
                        events.extend(nodes.on_event(Event::InitApply(node)))
                    }
                    Err(e) => warn!(error = %e, "skipping a listed node that does not decode"),
                })
                .map_err(|e| unreachable(anyhow::Error::new(e).context("reading the node list")))?;
            self.directory.apply(facts);
            for event in events {
                sink.push(event).await?;
            }
        }
        let version =
            scanner.finish().map_err(|e| unreachable(anyhow::Error::new(e).context("reading the node list")))?;
        self.directory.apply([ReflectorEvent::InitDone]);
        Ok(version)
    }

    async fn watch(
        &mut self,
        resource_version: String,
        sink: &mut Sink<LeaseKey, (LeaseAttrs, Created)>,
    ) -> Result<String, (String, Stop)> {
        let (nodes, directory) = (&mut self.nodes, &self.directory);
        watch_objects(&self.peers, resource_version, sink, |change| match change {
            Watched::Applied(node) => {
                directory.apply([ReflectorEvent::Apply(node.name(), node.facts())]);
                nodes.on_event(Event::Apply(node))
            }
            Watched::Deleted(node) => {
                directory.apply([ReflectorEvent::Delete(node.name())]);
                nodes.on_event(Event::Delete(node))
            }
        })
        .await
    }
}

/// Turns the watcher's Node events into lease watch events. Pure, so the
/// translation is unit-tested without an API server.
///
/// It keeps no map of node names: a Node's `spec.podCIDR` cannot change once
/// set (the API server refuses it), so every event already carries the key
/// its node stands for. A node that is deleted, or stops being a usable
/// peer, is a `Delete` of the key its podCIDR names; a node deleted and
/// recreated with another podCIDR arrives as a delete and an add, or, if the
/// watch missed both, in the next listing.
struct NodeEvents {
    annotations: NodeAnnotations,
}

impl NodeEvents {
    fn new(annotations: NodeAnnotations) -> Self {
        NodeEvents { annotations }
    }

    /// The lease a Node stands for, if it is a usable peer.
    fn lease(&self, node: &PeerNode) -> Option<(LeaseKey, LeaseAttrs)> {
        match self.annotations.lease(pod_cidr_of(node), pod_cidrs_of(node), annotations_of(&node.metadata)) {
            Ok(lease) => lease,
            Err(e) => {
                warn!(node = node.metadata.name.as_deref().unwrap_or("?"), error = %e, "skipping node: its lease does not parse");
                None
            }
        }
    }

    /// The key a Node's podCIDRs name, usable peer or not.
    fn key(node: &PeerNode) -> Option<LeaseKey> {
        pod_cidrs(pod_cidr_of(node), pod_cidrs_of(node)).ok().flatten()
    }

    /// The lease events one watcher event stands for (often none).
    fn on_event(&mut self, event: Event<PeerNode>) -> Vec<WatchEvent> {
        match event {
            Event::Init => vec![WatchEvent::Init],
            Event::InitApply(node) => match self.lease(&node) {
                Some((key, attrs)) => vec![WatchEvent::InitApply(key, (attrs, created(&node)))],
                None => Vec::new(),
            },
            Event::InitDone => vec![WatchEvent::InitDone],
            Event::Apply(node) => match (self.lease(&node), Self::key(&node)) {
                (Some((key, attrs)), _) => vec![WatchEvent::Apply(key, (attrs, created(&node)))],
                // No longer (or not yet) a peer: whatever its podCIDR stood for goes.
                (None, Some(key)) => vec![WatchEvent::Delete(key)],
                (None, None) => Vec::new(),
            },
            Event::Delete(node) => Self::key(&node).map(WatchEvent::Delete).into_iter().collect(),
        }
    }
}

/// When a Node was created, to the second: the older of two Nodes that claim
/// one VtepMAC or PublicIP keeps it.
fn created(node: &PeerNode) -> Created {
    Created(node.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()))
}

fn pod_cidr_of(node: &PeerNode) -> Option<&str> {
    node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).filter(|c| !c.is_empty())
}

fn pod_cidrs_of(node: &PeerNode) -> &[String] {
    node.spec.as_ref().and_then(|s| s.pod_cidrs.as_deref()).unwrap_or_default()
}

/// Our own Node's podCIDRs, as a lease key.
fn own_pod_cidrs(node: &Node) -> Result<Option<LeaseKey>, proto::NodeLeaseError> {
    let spec = node.spec.as_ref();
    let list = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or_default();
    pod_cidrs(spec.and_then(|s| s.pod_cidr.as_deref()), list)
}

/// A Node's annotations; none is the same as an empty map.
fn annotations_of(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    meta.annotations.as_ref().unwrap_or(&NONE)
}

/// One API call, bounded in time, its error saying `what` was being done.
async fn bounded<T>(what: String, call: impl Future<Output = Result<T, kube::Error>>) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.context(what),
        Err(_) => bail!("{what}: no answer in {CALL_TIMEOUT:?}"),
    }
}

impl KubeLeases {
    /// Our podCIDRs must give each family that is on a subnet inside its network.
    fn check_pod_cidrs(&self, config: &NetConfig, key: &LeaseKey) -> anyhow::Result<()> {
        for family in config.families() {
            let Some(pool) = config.pool(family) else { continue };
            let Some(subnet) = key.subnet(family) else {
                bail!(
                    "node {} has no {family} podCIDR (it has {key}), but {} turns {family} on: a dual-stack network needs kube-controller-manager's --cluster-cidr with one network per family, e.g. 10.244.0.0/16,fd00:10:244::/56",
                    self.node_name,
                    self.net_config_path.display()
                );
            };
            if !pool.network.contains(&subnet) {
                bail!(
                    "node {}'s podCIDR {subnet} is outside the {family} network {} of {}: the controller-manager's --cluster-cidr and the net-conf must agree",
                    self.node_name,
                    pool.network,
                    self.net_config_path.display()
                );
            }
        }
        Ok(())
    }
}

impl LeaseStore for KubeLeases {
    fn outage(&self) -> Option<Arc<Outage>> {
        Some(self.outage.clone())
    }

    async fn network_config(&mut self) -> anyhow::Result<NetConfig> {
        let path = &self.net_config_path;
        let text = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("reading the network config {} (mounted from the ConfigMap)", path.display()))?;
        let config = net_conf::parse(&text, &path.display().to_string())
            .with_context(|| format!("invalid network config in {}", path.display()))?;
        self.config_text = Some(text);
        Ok(config)
    }

    fn watch_config(self) -> impl Future<Output = ()> + Send + 'static {
        // A ConfigMap volume is updated by the kubelet within about a minute: polling is as quick as it gets.
        let (path, mut running) = (self.net_config_path, self.config_text.unwrap_or_default());
        async move {
            let mut every = tokio::time::interval(CONFIG_POLL);
            every.tick().await;
            loop {
                every.tick().await;
                let now = tokio::fs::read_to_string(&path).await.ok();
                if now.as_deref() != Some(running.as_str()) {
                    net_conf::say_changed(&path.display().to_string(), &running, now.as_deref());
                    running = now.unwrap_or_default();
                }
            }
        }
    }

    async fn public_ips(&mut self, detected: PublicIps) -> anyhow::Result<PublicIps> {
        // The one read of our Node at start: `acquire` and readiness reuse it.
        let node = self.wait_for_own_node().await;
        let node = self.last_read.insert(node);
        let annotations = annotations_of(&node.metadata);
        let mut public = detected;
        if let Some(ip) = self.annotations.public_ip_overwrite(annotations).context("on our own node")? {
            info!(public_ip = %ip, detected = detected.v4.map(display), "using the address pinned by {}", self.annotations.key("public-ip-overwrite"));
            public.v4 = detected.v4.map(|_| ip);
        }
        if let Some(ip) = self.annotations.public_ipv6_overwrite(annotations).context("on our own node")? {
            info!(public_ipv6 = %ip, detected = detected.v6.map(display), "using the address pinned by {}", self.annotations.key("public-ipv6-overwrite"));
            public.v6 = detected.v6.map(|_| ip);
        }
        Ok(public)
    }

    async fn acquire(
        &mut self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        _previous: Option<LeaseKey>,
    ) -> anyhow::Result<OwnLease> {
        let mut backoff = Backoff::new();
        let mut say = Throttle::new(SAY_EVERY);
        loop {
            let node = match self.last_read.take() {
                Some(node) => node,
                None => self.wait_for_own_node().await,
            };
            match own_pod_cidrs(&node).with_context(|| format!("node {}", self.node_name))? {
                None => {
                    if say.ready() {
                        info!(
                            node = %self.node_name,
                            "waiting for podCIDR on node {} (is kube-controller-manager running with --allocate-node-cidrs?)",
                            self.node_name
                        );
                    }
                }
                Some(key) => {
                    self.check_pod_cidrs(config, &key)?;
                    if self.annotations.published(annotations_of(&node.metadata), attrs) {
                        self.last_read = Some(node);
                        return Ok(OwnLease { key, attrs: attrs.clone() });
                    }
                    match self.publish(attrs).await {
                        Ok(updated) => {
                            info!(node = %self.node_name, subnet = %key, public_ip = %attrs.public_ip, public_ipv6 = attrs.public_ipv6.map(display), "published our lease on the node");
                            // The patch answers with the Node: readiness needs no other read.
                            self.last_read = Some(updated);
                            return Ok(OwnLease { key, attrs: attrs.clone() });
                        }
                        Err(e) => warn!(error = format!("{e:#}"), "cannot annotate our node; retrying"),
                    }
                }
            }
            backoff.wait().await;
        }
    }

    fn watch(self, tx: EventSender) -> impl Future<Output = ()> + Send + 'static {
        let source = NodeWatch {
            client: self.client,
            peers: self.peers,
            nodes: NodeEvents::new(self.annotations),
            directory: self.directory,
        };
        list_watch::run(source, tx, self.outage)
    }

    fn renew_interval(&self) -> Duration {
        RENEW_INTERVAL
    }

    async fn renew(&mut self, own: &OwnLease) -> Renewal {
        let node = match self.own_node().await {
            Ok(Some(node)) => node,
            Ok(None) => return Renewal::Seen(None),
            Err(e) => return Renewal::Failed(e),
        };
        let spec = node.spec.as_ref();
        let pod_cidr = spec.and_then(|s| s.pod_cidr.as_deref());
        let pod_cidr_list = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or_default();
        // What our Node stands for now; another podCIDR means our key is gone.
        let seen = match self.annotations.lease(pod_cidr, pod_cidr_list, annotations_of(&node.metadata)) {
            Ok(Some((key, attrs))) if key == own.key => Some(attrs),
            _ => None,
        };
        // The daemon announces readiness right after a renewal: this read serves both.
        self.last_read = Some(node);
        Renewal::Seen(seen)
    }

    async fn announce_ready(&mut self) -> anyhow::Result<()> {
        if !self.set_condition {
            return Ok(());
        }
        let node = match self.last_read.take() {
            Some(node) => node,
            None => self.own_node().await?.with_context(|| format!("node {} not found", self.node_name))?,
        };
        let current = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|conditions| conditions.iter().find(|c| c.type_ == CONDITION));
        if current.is_some_and(|c| c.status == "False" && c.reason.as_deref() == Some(CONDITION_REASON)) {
            return Ok(());
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(now).context("the clock is out of range")?);
        // The status does not change when we take over from flanneld (False,
        // FlannelIsUp): the transition time stays the one it had.
        let transitioned = match current {
            Some(c) if c.status == "False" => c.last_transition_time.clone().unwrap_or_else(|| now.clone()),
            _ => now.clone(),
        };
        // Strategic merge: conditions merge by `type`, so other conditions stay.
        let patch = serde_json::json!({
            "status": { "conditions": [{
                "type": CONDITION,
                "status": "False",
                "reason": CONDITION_REASON,
                "message": "overlayd is running on this node",
                "lastTransitionTime": transitioned,
                "lastHeartbeatTime": now,
            }]}
        });
        self.patch_status(&patch, format!("setting {CONDITION}=False on node {}", self.node_name)).await?;
        info!(node = %self.node_name, "node condition {CONDITION}=False ({CONDITION_REASON})");
        Ok(())
    }

    fn say_lost(&self, lost: &LeaseLost, own: &OwnLease) {
        match lost.kind {
            LostKind::Rewritten => {
                warn!(node = %self.node_name, subnet = %own.key, seen = %lost.detail, "our Node's annotations were rewritten; restoring them")
            }
            LostKind::Gone => warn!(
                node = %self.node_name,
                "our Node was deleted (or lost its podCIDR); waiting for it to be registered again"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{MacAddr, VxlanBackendData};

    fn attrs(ip: &str, mac: &str) -> LeaseAttrs {
        let vtep_mac: MacAddr = mac.parse().unwrap();
        LeaseAttrs::vxlan(ip.parse().unwrap(), VxlanBackendData { vni: 1, vtep_mac })
    }

    fn node(name: &str, cidr: Option<&str>, lease: Option<&LeaseAttrs>) -> PeerNode {
        let mut n = PeerNode::default();
        n.metadata.name = Some(name.into());
        n.metadata.annotations = lease
            .map(|a| NodeAnnotations::default().publish(a).into_iter().filter_map(|(k, v)| Some((k, v?))).collect());
        n.spec = Some(PeerNodeSpec { pod_cidr: cidr.map(String::from), pod_cidrs: None });
        n
    }

    #[test]
    fn peer_nodes_decode_only_what_the_watch_needs() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "a", "resourceVersion": "7", "annotations": {"x": "y"},
                         "labels": {"kubernetes.io/os": "linux"},
                         "creationTimestamp": "2026-12-06T10:00:00Z",
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"], "taints": []},
            "status": {"images": [{"names": ["registry/x:1"], "sizeBytes": 1}],
                       "addresses": [{"type": "InternalIP", "address": "192.168.50.11"}, {"type": "Hostname", "address": "a"},
                                     {"type": "InternalIP", "address": "fd00:50::11"}]},
        });
        let n: PeerNode = serde_json::from_value(json).unwrap();
        let facts = n.facts();
        assert_eq!(facts.labels, vec![("kubernetes.io/os".to_string(), "linux".to_string())]);
        assert_eq!(
            facts.ips,
            vec!["192.168.50.11".parse::<std::net::IpAddr>().unwrap(), "fd00:50::11".parse().unwrap()]
        );
        assert_eq!(n.metadata.name.as_deref(), Some("a"));
        assert_eq!(n.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(n.metadata.annotations.as_ref().unwrap()["x"], "y");
        assert!(n.metadata.managed_fields.is_none());
        assert_eq!(created(&n), Created(1_796_551_200), "the age that decides a contested VtepMAC");
        assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.1.0/24"));
        use kube::Resource;
        assert_eq!(PeerNode::url_path(&(), None), "/api/v1/nodes");
    }

    fn summary(events: &[WatchEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WatchEvent::Init => "init".to_string(),
                WatchEvent::InitApply(k, (a, _)) => format!("listed {k} {}", a.public_ip),
                WatchEvent::InitDone => "listed".to_string(),
                WatchEvent::Apply(k, (a, _)) => format!("apply {k} {}", a.public_ip),
                WatchEvent::Delete(k) => format!("delete {k}"),
            })
            .collect()
    }

    #[test]
    fn list_then_changes_become_watch_events() {
        let mut n = NodeEvents::new(NodeAnnotations::default());
        let a = attrs("192.168.1.1", "02:00:00:00:00:01");
        assert_eq!(summary(&n.on_event(Event::Init)), ["init"]);
        assert_eq!(
            summary(&n.on_event(Event::InitApply(node("a", Some("10.244.1.0/24"), Some(&a))))),
            ["listed 10.244.1.0-24 192.168.1.1"]
        );
        // Not yet a peer: no podCIDR, or no annotations.
        assert!(n.on_event(Event::InitApply(node("b", None, Some(&a)))).is_empty());
        assert!(n.on_event(Event::InitApply(node("c", Some("10.244.3.0/24"), None))).is_empty());
        assert_eq!(summary(&n.on_event(Event::InitDone)), ["listed"]);

        // c publishes: a new peer.
        let c = attrs("192.168.1.3", "02:00:00:00:00:03");
        assert_eq!(
            summary(&n.on_event(Event::Apply(node("c", Some("10.244.3.0/24"), Some(&c))))),
            ["apply 10.244.3.0-24 192.168.1.3"]
        );
        // c's annotations are removed: it is no longer a peer.
        assert_eq!(
            summary(&n.on_event(Event::Apply(node("c", Some("10.244.3.0/24"), None)))),
            ["delete 10.244.3.0-24"]
        );
        // A node without a podCIDR stands for nothing.
        assert!(n.on_event(Event::Apply(node("d", None, Some(&c)))).is_empty());
        // a is deleted and recreated with another podCIDR: the old lease goes, the new comes.
        assert_eq!(
            summary(&n.on_event(Event::Delete(node("a", Some("10.244.1.0/24"), Some(&a))))),
            ["delete 10.244.1.0-24"]
        );
        assert_eq!(
            summary(&n.on_event(Event::Apply(node("a", Some("10.244.9.0/24"), Some(&a))))),
            ["apply 10.244.9.0-24 192.168.1.1"]
        );
        assert!(n.on_event(Event::Delete(node("zz", None, None))).is_empty());
    }

    #[test]
    fn a_malformed_node_is_skipped_not_fatal() {
        let mut n = NodeEvents::new(NodeAnnotations::default());
        let mut bad = node("a", Some("10.244.1.0/24"), Some(&attrs("192.168.1.1", "02:00:00:00:00:01")));
        bad.metadata.annotations.as_mut().unwrap().insert("flannel.alpha.coreos.com/public-ip".into(), "nope".into());
        // Not fatal: it is simply no longer a usable peer.
        assert_eq!(summary(&n.on_event(Event::Apply(bad))), ["delete 10.244.1.0-24"]);
    }
}
