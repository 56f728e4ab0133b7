//! A test double of the Kubernetes API server, for the Node endpoints
//! overlayd uses. No kube-apiserver can be installed on these machines, so
//! the Kubernetes mode is tested against this: real HTTP/1.1 on a socket in
//! the test's underlay namespace, bodies as the API's JSON (checked against
//! `k8s-openapi`'s `Node`), and the semantics a client depends on:
//!
//! - list with `limit`/`continue` pages and a `resourceVersion`; a list at
//!   `resourceVersion=0` is served as from the watch cache: whole, `limit`
//!   ignored;
//! - watch from a resourceVersion, replaying history, with bookmarks and
//!   `timeoutSeconds`; a resourceVersion older than the kept history gets
//!   an `ERROR` event with a 410 `Expired` Status, as the watch cache sends;
//! - get; merge, strategic-merge (merge keys for conditions, addresses,
//!   taints) and JSON patch on `nodes` and `nodes/status`, each changing
//!   only its part (`nodes`: spec and metadata; `nodes/status`: status and
//!   metadata, never the spec, as the node status strategy does); a no-op
//!   patch does not bump the resourceVersion;
//! - strict (`tests/tests/kube_api_double.rs` checks it): an unknown field
//!   (always, as with `fieldValidation=Strict`), an unsupported patch content type, a changed
//!   podCIDR, a stale resourceVersion precondition, a selector it does not
//!   implement: each is refused with the Status a real server would send;
//! - node IPAM as kube-controller-manager's range allocator does it: the
//!   first free `/24` (IPv4) and `/64` (IPv6) of each cluster CIDR, set on
//!   `spec.podCIDR(s)`;
//! - it records every User-Agent and every (verb, resource) it served;
//! - Pods, Namespaces and NetworkPolicies (for NetworkPolicy enforcement):
//!   list (with pages) and watch across all namespaces, with the
//!   same resourceVersions, history, bookmarks and 410s as Nodes; tests
//!   create, replace and delete them with `put` and `remove`.
//!
//! `start_secure` serves it as a cluster does: HTTPS with a certificate from
//! a fresh CA, and only for a bearer token (401 otherwise), so a client can
//! run with a pod's in-cluster configuration; `enforce_rbac` answers 403
//! to anything a given ClusterRole does not grant. It does not implement
//! other resources, server-side apply or label/field selectors; a request
//! for them fails loudly rather than being half-served.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::netns::Netns;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the server has been asked, for tests that assert on client behaviour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// List requests (each page counts).
    pub lists: u64,
    /// Watch requests.
    pub watches: u64,
    /// GETs of one node.
    pub gets: u64,
    /// PATCH requests, successful or not.
    pub patches: u64,
    /// Watches answered with 410 Gone.
    pub expired: u64,
    /// Lists served from the cache (`resourceVersion=0`): whole, `limit` ignored.
    pub cached_lists: u64,
    /// Bytes of list responses.
    pub list_bytes: u64,
    /// Lists of Pods, Namespaces and NetworkPolicies (not counted above,
    /// which are about Nodes).
    pub collection_lists: u64,
}

/// One kind of request, as RBAC sees it: a verb on a resource.
pub type Access = (&'static str, &'static str);

struct State {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    /// Each node as a list item, serialized once when it changes: a real
    /// API server's watch cache keeps objects encoded the same way.
    encoded: BTreeMap<String, Bytes>,
    /// Every change after `oldest`, in order: (resourceVersion, type, object).
    history: VecDeque<(u64, &'static str, &'static str, Value)>,
    /// Pods, Namespaces and NetworkPolicies, by resource, then (namespace, name).
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// A watch may start from this resourceVersion or later; older is 410.
    oldest: u64,
    /// kube-controller-manager's `--cluster-cidr`: one network per family.
    cluster_cidrs: Vec<IpNet>,
    allocated: BTreeSet<IpNet>,
    next_uid: u64,
    stats: Stats,
    /// Every (verb, resource) a client used, for RBAC checks.
    used: BTreeSet<Access>,
    /// Every User-Agent a request carried ("" for none).
    user_agents: BTreeSet<String>,
    /// When set, only these (verb, resource) pairs are allowed (403 otherwise).
    rbac: Option<BTreeSet<(String, String)>>,
    /// Whether ClusterNetworkPolicy's CRD is installed (until it is, its path is a 404).
    cluster_policy_crd: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The current resourceVersion, for watchers to wake on.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch with a 410.
    expire: watch::Sender<u64>,
    /// Bumped by `stop()`: every connection and the listener go away.
    epoch: watch::Sender<u64>,
    bookmark_every: Duration,
    /// Serve HTTPS with this, as a real API server does (in-cluster clients need it).
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Require `Authorization: Bearer <token>` (a service account's token).
    token: Option<String>,
}

/// What an in-cluster client needs: the CA that signed the server's
/// certificate, and a service-account token the server accepts.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// PEM of the CA (the pod's `ca.crt`).
    pub ca_pem: String,
    /// The bearer token (the pod's `token`).
    pub token: String,
}

impl Credentials {
    /// Writes them as the kubelet mounts them into a pod:
    /// `token`, `ca.crt` and `namespace` in `dir`.
    pub fn write_service_account(&self, dir: &std::path::Path, namespace: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), &self.token)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("namespace"), namespace)?;
        Ok(())
    }
}

/// A CA and a server certificate for `ip` (and the in-cluster DNS name), signed by it.
fn tls_for(ip: std::net::IpAddr) -> Result<(tokio_rustls::TlsAcceptor, String)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "overlay test cluster CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut server_params = CertificateParams::new(vec![ip.to_string(), "kubernetes.default.svc".to_string()])?;
    server_params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca)?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).map_err(|e| anyhow!("{e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![server.der().clone()], key)?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem()))
}

/// The running test double. Dropping it closes every connection.
pub struct KubeApi {
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    /// The namespace to listen in; None: the test process's own (loopback only).
    netns_path: Option<String>,
    addr: SocketAddr,
}

impl KubeApi {
    /// Serves on `addr` inside `ns`, handing out podCIDRs from `cluster_cidr`.
    pub fn start(ns: &Netns, addr: SocketAddr, cluster_cidr: Vec<IpNet>) -> Result<Self> {
        Self::start_in(Some(ns.path()), addr, cluster_cidr, false).map(|(api, _)| api)
    }

    /// Like [`start`](Self::start), but as a real cluster serves it: HTTPS
    /// with a certificate from a fresh CA, and only for a bearer token.
    pub fn start_secure(ns: &Netns, addr: SocketAddr, cluster_cidr: Vec<IpNet>) -> Result<(Self, Credentials)> {
        let (api, credentials) = Self::start_in(Some(ns.path()), addr, cluster_cidr, true)?;
        Ok((api, credentials.ok_or_else(|| anyhow!("no credentials"))?))
    }

    /// Serves on a free port of 127.0.0.1 in the test's own namespace, for
    /// tests of the double itself (no root needed).
    pub fn start_on_loopback(cluster_cidr: Vec<IpNet>) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_in(None, SocketAddr::from(([127, 0, 0, 1], port)), cluster_cidr, false).map(|(api, _)| api)
    }

    fn start_in(
        netns_path: Option<String>,
        addr: SocketAddr,
        cluster_cidr: Vec<IpNet>,
        secure: bool,
    ) -> Result<(Self, Option<Credentials>)> {
        let (tls, credentials) = if secure {
            let (acceptor, ca_pem) = tls_for(addr.ip())?;
            let token = format!("overlay-test-{}", crate::random_suffix());
            (Some(acceptor), Some(Credentials { ca_pem, token }))
        } else {
            (None, None)
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kube-api")
            .enable_all()
            .build()
            .context("starting the test API server's runtime")?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                nodes: BTreeMap::new(),
                encoded: BTreeMap::new(),
                history: VecDeque::new(),
                objects: BTreeMap::new(),
                oldest: 1,
                cluster_cidrs: cluster_cidr,
                allocated: BTreeSet::new(),
                next_uid: 1,
                stats: Stats::default(),
                used: BTreeSet::new(),
                user_agents: BTreeSet::new(),
                rbac: None,
                cluster_policy_crd: false,
            }),
            changed: watch::channel(1).0,
            expire: watch::channel(0).0,
            epoch: watch::channel(0).0,
            bookmark_every: Duration::from_secs(1),
            tls,
            token: credentials.as_ref().map(|c| c.token.clone()),
        });
        let api = KubeApi { shared, rt: Some(rt), netns_path, addr };
        api.listen()?;
        Ok((api, credentials))
    }

    /// The server's URL, as the nodes reach it.
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (anonymous; the double has no auth).
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> Result<()> {
        let config = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url()}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "users": [{"name": "test", "user": {}}],
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config)?).with_context(|| format!("writing {}", path.display()))
    }

    fn listen(&self) -> Result<()> {
        let addr = self.addr;
        let bind = move || -> Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let listener = match &self.netns_path {
            Some(path) => {
                crate::probe::in_netns_path(path, bind).join().map_err(|_| anyhow!("bind thread panicked"))??
            }
            None => bind()?,
        };
        let shared = self.shared.clone();
        let rt = self.rt.as_ref().ok_or_else(|| anyhow!("server dropped"))?;
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        rt.spawn(accept_loop(listener, shared));
        Ok(())
    }

    /// Takes the server down: the listener closes and every connection
    /// (watches included) is cut, as when the API server restarts.
    pub fn stop(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
        // Let the accept loop drop its socket before a restart binds again.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Brings the server back on the same address, with the same state and history.
    pub fn restart(&self) -> Result<()> {
        self.listen()
    }

    /// Ends every open watch with `410 Gone` and forgets the history, so
    /// the clients must relist (what a compacted watch cache does).
    pub fn expire_watches(&self) {
        {
            let mut s = self.lock();
            // A change elsewhere in the cluster moves the resourceVersion on.
            s.rv += 1;
            s.oldest = s.rv;
            s.history.clear();
            let rv = s.rv;
            self.shared.changed.send_replace(rv);
        }
        self.shared.expire.send_modify(|e| *e += 1);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, allows only `grants` ((verb, resource) pairs, e.g. a
    /// ClusterRole's), answering anything else 403 Forbidden.
    pub fn enforce_rbac(&self, grants: BTreeSet<(String, String)>) {
        self.lock().rbac = Some(grants);
    }

    /// Every User-Agent header the server saw ("" for a request without one).
    pub fn user_agents(&self) -> BTreeSet<String> {
        self.lock().user_agents.clone()
    }

    /// Every (verb, resource) clients used so far, as RBAC names them.
    pub fn accesses(&self) -> BTreeSet<Access> {
        self.lock().used.clone()
    }

    /// What clients have asked so far.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// Registers a node as a kubelet would; with `allocate`, then gives it
    /// a podCIDR as the controller-manager would. Returns the podCIDR.
    pub fn add_node(&self, name: &str, internal_ip: Ipv4Addr, allocate: bool) -> Result<Option<Ipv4Net>> {
        let mut s = self.lock();
        if s.nodes.contains_key(name) {
            anyhow::bail!("node {name} exists");
        }
        let node = registered_node(&mut s, name, internal_ip);
        commit(&self.shared, &mut s, name, "ADDED", node);
        drop(s);
        if allocate {
            let cidrs = self.allocate_pod_cidrs(name)?;
            return Ok(cidrs.into_iter().find_map(|c| match c {
                IpNet::V4(v4) => Some(v4),
                IpNet::V6(_) => None,
            }));
        }
        Ok(None)
    }

    /// Adds a node that already has a podCIDR and a peer's annotations, as
    /// a running cluster's nodes do, with `extra` merged in (for benchmarks:
    /// one revision per node).
    pub fn add_peer_node(
        &self,
        name: &str,
        internal_ip: Ipv4Addr,
        pod_cidrs: &[IpNet],
        annotations: &BTreeMap<String, String>,
        extra: &Value,
    ) -> Result<()> {
        let mut s = self.lock();
        if s.nodes.contains_key(name) || pod_cidrs.iter().any(|c| s.allocated.contains(c)) {
            anyhow::bail!("node {name} or podCIDRs {pod_cidrs:?} exist");
        }
        let mut node = registered_node(&mut s, name, internal_ip);
        node["metadata"]["annotations"] = json!(annotations);
        let list: Vec<String> = pod_cidrs.iter().map(|c| c.to_string()).collect();
        node["spec"] = json!({"podCIDR": list.first(), "podCIDRs": list});
        // What a real node carries besides: status, managedFields (merge patch semantics).
        json_patch::merge(&mut node, extra);
        s.allocated.extend(pod_cidrs.iter().copied());
        commit(&self.shared, &mut s, name, "ADDED", node);
        Ok(())
    }

    /// Gives `name` the first free IPv4 subnet of the cluster CIDR (node IPAM).
    pub fn allocate_pod_cidr(&self, name: &str) -> Result<Ipv4Net> {
        self.allocate_pod_cidrs(name)?
            .into_iter()
            .find_map(|c| match c {
                IpNet::V4(v4) => Some(v4),
                IpNet::V6(_) => None,
            })
            .context("no IPv4 cluster CIDR")
    }

    /// Gives `name` the first free subnet of each cluster CIDR, as the node
    /// IPAM does with a dual-stack `--cluster-cidr` (a /24 per IPv4 node,
    /// a /64 per IPv6 node: the controller-manager's default mask sizes).
    pub fn allocate_pod_cidrs(&self, name: &str) -> Result<Vec<IpNet>> {
        let mut s = self.lock();
        let mut cidrs = Vec::new();
        for cluster in s.cluster_cidrs.clone() {
            let len = if cluster.addr().is_ipv4() { 24 } else { 64 };
            let free = cluster
                .subnets(len)
                .context("cluster CIDR smaller than a node's")?
                .find(|n| !s.allocated.contains(n))
                .context("cluster CIDR exhausted")?;
            s.allocated.insert(free);
            cidrs.push(free);
        }
        let mut node = s.nodes.get(name).cloned().with_context(|| format!("no node {name}"))?;
        let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
        node["spec"]["podCIDR"] = json!(list.first());
        node["spec"]["podCIDRs"] = json!(list);
        commit(&self.shared, &mut s, name, "MODIFIED", node);
        Ok(cidrs)
    }

    /// Changes a node as another client (kubectl, the kubelet) would.
    pub fn edit_node(&self, name: &str, edit: impl FnOnce(&mut Value)) -> Result<()> {
        let mut s = self.lock();
        let mut node = s.nodes.get(name).cloned().with_context(|| format!("no node {name}"))?;
        edit(&mut node);
        commit(&self.shared, &mut s, name, "MODIFIED", node);
        Ok(())
    }

    /// Deletes a node (and frees its podCIDR, as the node IPAM does).
    pub fn delete_node(&self, name: &str) -> Result<()> {
        let mut s = self.lock();
        let node = s.nodes.remove(name).with_context(|| format!("no node {name}"))?;
        s.encoded.remove(name);
        for cidr in node["spec"]["podCIDRs"].as_array().into_iter().flatten() {
            if let Some(cidr) = cidr.as_str().and_then(|c| c.parse::<IpNet>().ok()) {
                s.allocated.remove(&cidr);
            }
        }
        s.rv += 1;
        let rv = s.rv;
        let mut last = node;
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push_back((rv, "nodes", "DELETED", last));
        self.shared.changed.send_replace(rv);
        Ok(())
    }

    /// Creates or replaces a Pod, Namespace or NetworkPolicy (`resource`:
    /// `pods`, `namespaces`, `networkpolicies`), as a client's create or
    /// update would: it gets a uid and a resourceVersion, and watches see it.
    pub fn put(&self, resource: &str, mut object: Value) -> Result<()> {
        let resource = served(resource).with_context(|| format!("the double does not serve {resource}"))?;
        let (kind, api_version) = kind_of(resource);
        object["kind"] = json!(kind);
        object["apiVersion"] = json!(api_version);
        match resource {
            "pods" => drop(serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(object.clone())?),
            "namespaces" => drop(serde_json::from_value::<k8s_openapi::api::core::v1::Namespace>(object.clone())?),
            CLUSTER_POLICIES => {
                anyhow::ensure!(self.lock().cluster_policy_crd, "ClusterNetworkPolicy's CRD is not installed");
                anyhow::ensure!(object["spec"].is_object(), "a ClusterNetworkPolicy without a spec: {object}");
            }
            _ => drop(serde_json::from_value::<k8s_openapi::api::networking::v1::NetworkPolicy>(object.clone())?),
        }
        let key = object_key(&object);
        let cluster_scoped = matches!(resource, "namespaces" | CLUSTER_POLICIES);
        if key.1.is_empty() || (!cluster_scoped && key.0.is_empty()) {
            anyhow::bail!("{resource} object without a name or namespace: {object}");
        }
        let mut s = self.lock();
        let existing = s.objects.get(resource).and_then(|o| o.get(&key)).cloned();
        let event = match &existing {
            Some(old) => {
                object["metadata"]["uid"] = old["metadata"]["uid"].clone();
                object["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                "MODIFIED"
            }
            None => {
                s.next_uid += 1;
                object["metadata"]["uid"] = json!(format!("00000000-0000-0000-0001-{:012}", s.next_uid));
                object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                "ADDED"
            }
        };
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.objects.entry(resource).or_default().insert(key, object.clone());
        s.history.push_back((rv, resource, event, object));
        self.shared.changed.send_replace(rv);
        Ok(())
    }

    /// Installs ClusterNetworkPolicy's CRD: from now on its collection is served.
    pub fn install_cluster_policy_crd(&self) {
        self.lock().cluster_policy_crd = true;
    }

    /// Deletes ClusterNetworkPolicy's CRD, and with it every ClusterNetworkPolicy (as the API server does).
    pub fn delete_cluster_policy_crd(&self) -> Result<()> {
        let names: Vec<String> =
            self.lock().objects.get(CLUSTER_POLICIES).into_iter().flatten().map(|((_, n), _)| n.clone()).collect();
        for name in names {
            self.remove(CLUSTER_POLICIES, "", &name)?;
        }
        let mut s = self.lock();
        s.cluster_policy_crd = false;
        // Wakes the open watches, which end.
        self.shared.changed.send_replace(s.rv);
        Ok(())
    }

    /// Deletes a Pod, Namespace, NetworkPolicy or ClusterNetworkPolicy
    /// (`namespace` is "" for the cluster-scoped ones).
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> Result<()> {
        let resource = served(resource).with_context(|| format!("the double does not serve {resource}"))?;
        let mut s = self.lock();
        let mut last = s
            .objects
            .get_mut(resource)
            .and_then(|o| o.remove(&(namespace.to_string(), name.to_string())))
            .with_context(|| format!("no {resource} {namespace}/{name}"))?;
        s.rv += 1;
        let rv = s.rv;
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push_back((rv, resource, "DELETED", last));
        self.shared.changed.send_replace(rv);
        Ok(())
    }

    /// A node as the API holds it.
    pub fn node(&self, name: &str) -> Result<Node> {
        let s = self.lock();
        let v = s.nodes.get(name).cloned().with_context(|| format!("no node {name}"))?;
        Ok(serde_json::from_value(v)?)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.epoch.send_modify(|e| *e += 1);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A Node as a kubelet registers it: no podCIDR yet, Ready.
fn registered_node(s: &mut State, name: &str, internal_ip: Ipv4Addr) -> Value {
    let uid = s.next_uid;
    s.next_uid += 1;
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("00000000-0000-0000-0000-{uid:012}"),
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip.to_string()},
                                 {"type": "Hostname", "address": name}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "message": "kubelet is posting ready status",
                                   "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    })
}

/// Stores `node` under `name` as a new revision and wakes the watchers.
fn commit(shared: &Shared, s: &mut State, name: &str, kind: &'static str, mut node: Value) {
    s.rv += 1;
    let rv = s.rv;
    node["metadata"]["resourceVersion"] = json!(rv.to_string());
    s.encoded.insert(name.to_string(), Bytes::from(list_item(&node).to_string()));
    s.nodes.insert(name.to_string(), node.clone());
    s.history.push_back((rv, "nodes", kind, node));
    shared.changed.send_replace(rv);
}

/// A list item as a real server sends it: without kind and apiVersion.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(o) = item.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    item
}

/// One page of a list: the items after `after`, at most `limit` (0: all),
/// and the key of the last one when more follow.
fn page<'a, K: Ord + Clone + 'a>(
    entries: impl Iterator<Item = (&'a K, &'a Value)>,
    after: Option<&K>,
    limit: usize,
) -> (Vec<Value>, Option<K>) {
    let mut items = Vec::new();
    let mut last = None;
    for (key, object) in entries.filter(|(k, _)| after.is_none_or(|a| *k > a)) {
        if limit > 0 && items.len() == limit {
            return (items, last);
        }
        items.push(list_item(object));
        last = Some(key.clone());
    }
    (items, None)
}

/// The resourceVersion of a continue token, refused with 410 when the
/// history it needs is gone, as a real server refuses it.
fn continued_at(s: &State, rv: u64) -> Result<u64, ApiError> {
    if rv < s.oldest {
        return Err(err(
            StatusCode::GONE,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result.",
        ));
    }
    Ok(rv)
}

const CLUSTER_POLICIES: &str = "clusternetworkpolicies";

/// The resources besides Nodes that the double serves (list and watch).
fn served(resource: &str) -> Option<&'static str> {
    ["pods", "namespaces", "networkpolicies", CLUSTER_POLICIES].into_iter().find(|r| *r == resource)
}

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "pods" => ("Pod", "v1"),
        "namespaces" => ("Namespace", "v1"),
        "networkpolicies" => ("NetworkPolicy", "networking.k8s.io/v1"),
        CLUSTER_POLICIES => ("ClusterNetworkPolicy", "policy.networking.k8s.io/v1alpha2"),
        _ => ("Node", "v1"),
    }
}

fn object_key(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (meta["namespace"].as_str().unwrap_or_default().to_string(), meta["name"].as_str().unwrap_or_default().to_string())
}

/// A list of `resource` (paged as Nodes are), or its watch.
fn serve_collection(
    shared: Arc<Shared>,
    resource: &'static str,
    watching: bool,
    query: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    if watching {
        return watch_resource(shared, resource, query);
    }
    let mut s = lock(&shared);
    s.stats.collection_lists += 1;
    let (kind, api_version) = kind_of(resource);
    // Pages as for Nodes: `limit`, and a continue token
    // "<resourceVersion>|<namespace>|<name>" of the last item served.
    // `resourceVersion=0` is the watch cache: whole, `limit` ignored.
    let cached = query.get("resourceVersion").is_some_and(|rv| rv == "0");
    let limit: usize = match query.get("limit").filter(|_| !cached) {
        Some(l) => l.parse().map_err(|_| err(StatusCode::BAD_REQUEST, "BadRequest", format!("limit {l:?}")))?,
        None => 0,
    };
    let (rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '|');
            let parsed = (|| {
                let rv = parts.next()?.parse::<u64>().ok()?;
                Some((rv, (parts.next()?.to_string(), parts.next()?.to_string())))
            })();
            let (rv, after) = parsed
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "BadRequest", format!("continue token {token:?}")))?;
            (continued_at(&s, rv)?, Some(after))
        }
        None => (s.rv, None),
    };
    let (items, more) = page(s.objects.get(resource).into_iter().flatten(), after.as_ref(), limit);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some((ns, name)) = more {
        metadata["continue"] = json!(format!("{rv}|{ns}|{name}"));
    }
    let list = json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": metadata, "items": items})
        .to_string();
    let mut r = Response::new(Full::new(Bytes::from(list)).boxed());
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(r)
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut epoch = shared.epoch.subscribe();
    epoch.mark_unchanged();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = epoch.changed() => return,
        };
        let shared = shared.clone();
        let mut conn_epoch = epoch.clone();
        tokio::spawn(async move {
            let serve = async {
                match shared.tls.clone() {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            serve_connection(tls, shared.clone()).await;
                        }
                    }
                    None => serve_connection(stream, shared.clone()).await,
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = conn_epoch.changed() => {}
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, shared: Arc<Shared>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let _ =
        hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(io), service).await;
}

/// An API error, rendered as a `Status` object.
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

fn err(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { code, reason, message: message.into() }
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    match route(shared, req).await {
        Ok(r) => r,
        Err(e) => respond(e.code, status_json(e.code.as_u16(), e.reason, &e.message)),
    }
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if let Some(token) = &shared.token {
        let given = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        if given != format!("Bearer {token}") {
            return Err(err(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized"));
        }
    }
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let agent = req.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    lock(&shared).user_agents.insert(agent);
    let collection = match path.as_str() {
        "/api/v1/pods" => Some("pods"),
        "/api/v1/namespaces" => Some("namespaces"),
        "/apis/networking.k8s.io/v1/networkpolicies" => Some("networkpolicies"),
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies" => Some(CLUSTER_POLICIES),
        _ => None,
    };
    if let Some(resource) = collection {
        let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        if req.method() != Method::GET {
            return Err(err(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("test double: {} {path}", req.method()),
            ));
        }
        if ["labelSelector", "fieldSelector"].iter().any(|k| query.get(*k).is_some_and(|v| !v.is_empty())) {
            return Err(err(StatusCode::BAD_REQUEST, "BadRequest", "test double: selectors are not implemented"));
        }
        let verb = if watching { "watch" } else { "list" };
        let mut s = lock(&shared);
        if s.rbac.as_ref().is_some_and(|g| !g.contains(&(verb.to_string(), resource.to_string()))) {
            return Err(err(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("{resource} is forbidden: User \"system:serviceaccount:kube-overlay:overlay\" cannot {verb} resource \"{resource}\" at the cluster scope"),
            ));
        }
        s.used.insert((verb, resource));
        // As a real API server: authorized first, then found or not.
        if resource == CLUSTER_POLICIES && !s.cluster_policy_crd {
            return Err(err(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
        drop(s);
        return serve_collection(shared, resource, watching, &query);
    }
    let rest = path.strip_prefix("/api/v1/nodes").ok_or_else(|| {
        err(StatusCode::NOT_FOUND, "NotFound", format!("the test API server serves only /api/v1/nodes, not {path}"))
    })?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let access: Option<Access> = match (req.method().clone(), parts.as_slice()) {
        (Method::GET, []) if watching => Some(("watch", "nodes")),
        (Method::GET, []) => Some(("list", "nodes")),
        (Method::GET, [_]) => Some(("get", "nodes")),
        (Method::GET, [_, "status"]) => Some(("get", "nodes/status")),
        (Method::PATCH, [_]) => Some(("patch", "nodes")),
        (Method::PATCH, [_, "status"]) => Some(("patch", "nodes/status")),
        _ => None,
    };
    if let Some((verb, resource)) = access {
        let mut s = lock(&shared);
        if s.rbac.as_ref().is_some_and(|g| !g.contains(&(verb.to_string(), resource.to_string()))) {
            let object = match parts.first() {
                Some(name) => format!("nodes \"{name}\""),
                None => "nodes".to_string(),
            };
            return Err(err(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("{object} is forbidden: User \"system:serviceaccount:kube-overlay:overlay\" cannot {verb} resource \"{resource}\" in API group \"\" at the cluster scope"),
            ));
        }
        s.used.insert((verb, resource));
    }
    for unsupported in ["labelSelector", "fieldSelector"] {
        if query.get(unsupported).is_some_and(|v| !v.is_empty()) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("test double: {unsupported} is not implemented"),
            ));
        }
    }
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, []) if watching => watch_resource(shared, "nodes", &query),
        (Method::GET, []) => list_nodes(shared.clone(), &query),
        (Method::GET, [name]) | (Method::GET, [name, "status"]) => {
            let mut s = lock(&shared);
            s.stats.gets += 1;
            let node = s.nodes.get(*name).cloned().ok_or_else(|| not_found(name))?;
            Ok(respond(StatusCode::OK, node))
        }
        (Method::PATCH, [name]) | (Method::PATCH, [name, "status"]) => {
            let status = parts.len() == 2;
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let name = name.to_string();
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(|e| err(StatusCode::BAD_REQUEST, "BadRequest", format!("reading body: {e}")))?
                .to_bytes();
            let mut s = lock(&shared);
            s.stats.patches += 1;
            let node = patch_node(&shared, &mut s, &name, status, &content_type, &body)?;
            Ok(respond(StatusCode::OK, node))
        }
        (_, [] | [_] | [_, "status"]) => Err(err(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("test double: {} {path} is not implemented", req.method()),
        )),
        _ => Err(err(StatusCode::NOT_FOUND, "NotFound", format!("no such path {path}"))),
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_found(name: &str) -> ApiError {
    err(StatusCode::NOT_FOUND, "NotFound", format!("nodes \"{name}\" not found"))
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
                continue;
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn list_nodes(shared: Arc<Shared>, query: &BTreeMap<String, String>) -> Result<Response<Body>, ApiError> {
    let mut s = lock(&shared);
    s.stats.lists += 1;
    // resourceVersion=0: served from the watch cache, which (like a real API
    // server's) ignores `limit` and answers with the whole list at once.
    let cached = query.get("resourceVersion").is_some_and(|rv| rv == "0");
    if cached {
        s.stats.cached_lists += 1;
        let (rv, items) = (s.rv, s.encoded.values().cloned().collect());
        drop(s);
        return Ok(stream_list(shared, rv, items));
    }
    let limit: usize = match query.get("limit") {
        Some(l) => l.parse().map_err(|_| err(StatusCode::BAD_REQUEST, "BadRequest", format!("limit {l:?}")))?,
        None => 0,
    };
    // A continue token is "<resourceVersion>/<last name served>".
    let (rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, after) = token
                .split_once('/')
                .and_then(|(rv, name)| Some((rv.parse::<u64>().ok()?, name.to_string())))
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "BadRequest", format!("continue token {token:?}")))?;
            (continued_at(&s, rv)?, Some(after))
        }
        None => (s.rv, None),
    };
    let (items, more) = page(s.nodes.iter(), after.as_ref(), limit);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(last) = more {
        metadata["continue"] = json!(format!("{rv}/{last}"));
    }
    let list = json!({"kind": "NodeList", "apiVersion": "v1", "metadata": metadata, "items": items}).to_string();
    s.stats.list_bytes += list.len() as u64;
    let mut r = Response::new(Full::new(Bytes::from(list)).boxed());
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(r)
}

/// A list as a real API server's watch cache sends it (with streaming
/// collection encoding, Kubernetes 1.33): the envelope, then one item at a
/// time, so the client can decode while the server still encodes.
fn stream_list(shared: Arc<Shared>, rv: u64, items: Vec<Bytes>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let head =
            format!(r#"{{"kind":"NodeList","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}"}},"items":["#);
        let mut sent = head.len() as u64;
        if tx.send(Bytes::from(head)).await.is_err() {
            return;
        }
        for (i, item) in items.into_iter().enumerate() {
            sent += item.len() as u64 + u64::from(i > 0);
            if i > 0 && tx.send(Bytes::from_static(b",")).await.is_err() {
                return;
            }
            if tx.send(item).await.is_err() {
                return;
            }
        }
        sent += 2;
        let _ = tx.send(Bytes::from_static(b"]}")).await;
        lock(&shared).stats.list_bytes += sent;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_resource(
    shared: Arc<Shared>,
    resource: &'static str,
    query: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    if query.get("sendInitialEvents").is_some_and(|v| v == "true") {
        return Err(err(StatusCode::BAD_REQUEST, "BadRequest", "test double: sendInitialEvents is not implemented"));
    }
    let from: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse().map_err(|_| err(StatusCode::BAD_REQUEST, "BadRequest", format!("resourceVersion {rv:?}")))?,
        ),
    };
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(Duration::from_secs);
    if resource == "nodes" {
        lock(&shared).stats.watches += 1;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(stream_events(shared, resource, from, bookmarks, timeout, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(r)
}

async fn stream_events(
    shared: Arc<Shared>,
    resource: &'static str,
    from: Option<u64>,
    bookmarks: bool,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut changed = shared.changed.subscribe();
    let mut expire = shared.expire.subscribe();
    expire.mark_unchanged();
    let mut epoch = shared.epoch.subscribe();
    epoch.mark_unchanged();
    let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(1800)));
    tokio::pin!(deadline);
    let gone = |rv: u64, oldest: u64| {
        let status = status_json(410, "Expired", &format!("too old resource version: {rv} ({oldest})"));
        event_line("ERROR", &status)
    };
    // What to send first: a 410, or the current objects (no version given), or nothing.
    let (first, start): (Vec<Bytes>, Option<u64>) = {
        let mut s = lock(&shared);
        match from {
            Some(rv) if rv < s.oldest => {
                s.stats.expired += 1;
                (vec![gone(rv, s.oldest)], None)
            }
            Some(rv) => (Vec::new(), Some(rv)),
            None if resource == "nodes" => (s.nodes.values().map(|n| event_line("ADDED", n)).collect(), Some(s.rv)),
            None => (
                s.objects.get(resource).into_iter().flat_map(|o| o.values()).map(|n| event_line("ADDED", n)).collect(),
                Some(s.rv),
            ),
        }
    };
    for line in first {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    let Some(mut cursor) = start else { return };
    loop {
        let pending: Vec<Bytes> = {
            let s = lock(&shared);
            let lines = s
                .history
                .iter()
                .filter(|(rv, r, _, _)| *rv > cursor && *r == resource)
                .map(|(_, _, k, o)| event_line(k, o))
                .collect();
            cursor = cursor.max(s.history.back().map(|(rv, _, _, _)| *rv).unwrap_or(cursor));
            lines
        };
        for line in pending {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        // A CRD deleted ends the watches of its resource, as a real API server does.
        if resource == CLUSTER_POLICIES && !lock(&shared).cluster_policy_crd {
            return;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = expire.changed() => {
                let line = {
                    let mut s = lock(&shared);
                    s.stats.expired += 1;
                    gone(cursor, s.oldest)
                };
                let _ = tx.send(line).await;
                return;
            }
            _ = tokio::time::sleep(shared.bookmark_every), if bookmarks => {
                // Everything up to the current version has been sent (or
                // concerned other resources): say so, as the watch cache does.
                let rv = {
                    let s = lock(&shared);
                    if s.history.back().is_some_and(|(rv, _, _, _)| *rv > cursor) {
                        continue;
                    }
                    s.rv
                };
                cursor = cursor.max(rv);
                let (kind, api_version) = kind_of(resource);
                let mark = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                if tx.send(event_line("BOOKMARK", &mark)).await.is_err() {
                    return;
                }
            }
            _ = &mut deadline => return,
            _ = epoch.changed() => return,
        }
    }
}

fn patch_node(
    shared: &Shared,
    s: &mut State,
    name: &str,
    status: bool,
    content_type: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let current = s.nodes.get(name).cloned().ok_or_else(|| not_found(name))?;
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| err(StatusCode::BAD_REQUEST, "BadRequest", format!("patch body is not JSON: {e}")))?;
    let mut new = current.clone();
    match content_type {
        "application/merge-patch+json" => json_patch::merge(&mut new, &patch),
        "application/strategic-merge-patch+json" => {
            strategic_merge(&mut new, &patch, "").map_err(|m| err(StatusCode::BAD_REQUEST, "BadRequest", m))?
        }
        "application/json-patch+json" => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| err(StatusCode::BAD_REQUEST, "BadRequest", format!("not a JSON patch: {e}")))?;
            json_patch::patch(&mut new, &ops)
                .map_err(|e| err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("JSON patch failed: {e}")))?
        }
        other => {
            return Err(err(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"),
            ))
        }
    }
    // A resourceVersion in the patch is a precondition.
    if let Some(rv) = patch.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
        if Some(rv) != current.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
            return Err(err(
                StatusCode::CONFLICT,
                "Conflict",
                format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
            ));
        }
    }
    // Each endpoint changes only its part of the object. As with a real
    // API server's node status strategy, `nodes/status` resets the spec but
    // takes metadata (flanneld writes its annotations there).
    if status {
        new["spec"] = current["spec"].clone();
    } else {
        new["status"] = current["status"].clone();
    }
    for field in ["name", "uid", "creationTimestamp", "resourceVersion"] {
        if new["metadata"][field] != current["metadata"][field] {
            if field == "resourceVersion" {
                new["metadata"][field] = current["metadata"][field].clone();
            } else {
                return Err(err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!("metadata.{field}: field is immutable"),
                ));
            }
        }
    }
    let old_cidr = current.pointer("/spec/podCIDR").and_then(Value::as_str).unwrap_or("");
    let new_cidr = new.pointer("/spec/podCIDR").and_then(Value::as_str).unwrap_or("");
    if !old_cidr.is_empty() && old_cidr != new_cidr {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("Node \"{name}\" is invalid: spec.podCIDRs: Forbidden: node updates may not change podCIDR except from \"\" to valid"),
        ));
    }
    strict_check(&new).map_err(|m| err(StatusCode::BAD_REQUEST, "BadRequest", m))?;
    if new == current {
        return Ok(current);
    }
    commit(shared, s, name, "MODIFIED", new.clone());
    Ok(s.nodes.get(name).cloned().unwrap_or(new))
}

/// Refuses a Node with a field `k8s-openapi` does not know (strict field validation).
fn strict_check(node: &Value) -> Result<(), String> {
    crate::strict::decode::<Node>(node).map(|_| ())
}

/// The merge key of a list in a Node, from its patchStrategy tags.
fn merge_key(path: &str) -> Option<&'static str> {
    match path {
        "/status/conditions" | "/status/addresses" => Some("type"),
        "/spec/taints" => Some("key"),
        "/status/volumesAttached" => Some("name"),
        _ => None,
    }
}

/// A strategic merge patch on a Node: maps merge, `null` deletes, lists
/// with a merge key merge by it (`$patch: delete` removes an element),
/// `podCIDRs` merges as a set, other lists are replaced.
fn strategic_merge(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if let Some(directive) = p.get("$patch") {
        match directive.as_str() {
            Some("replace") => {
                let mut replaced = patch.clone();
                if let Some(o) = replaced.as_object_mut() {
                    o.remove("$patch");
                }
                *target = replaced;
                return Ok(());
            }
            Some("delete") => {
                *target = Value::Null;
                return Ok(());
            }
            other => return Err(format!("unknown patch directive {other:?} at {path}")),
        }
    }
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in p {
        if key.starts_with("$setElementOrder/") {
            continue;
        }
        if key.starts_with('$') {
            return Err(format!("test double: patch directive {key} at {path} is not implemented"));
        }
        let child = format!("{path}/{key}");
        let Some(t) = target.as_object_mut() else { unreachable!("made an object above") };
        if value.is_null() {
            t.remove(key);
            continue;
        }
        let slot = t.entry(key.clone()).or_insert(Value::Null);
        match (value, merge_key(&child)) {
            (Value::Array(items), Some(mk)) => {
                let mut list = slot.as_array().cloned().unwrap_or_default();
                for item in items {
                    let k = item.get(mk).cloned().ok_or_else(|| format!("{child}: element without merge key {mk}"))?;
                    let at = list.iter().position(|e| e.get(mk) == Some(&k));
                    if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                        if let Some(at) = at {
                            list.remove(at);
                        }
                        continue;
                    }
                    match at {
                        Some(at) => strategic_merge(&mut list[at], item, &child)?,
                        None => list.push(item.clone()),
                    }
                }
                *slot = Value::Array(list);
            }
            (Value::Array(items), None) if child == "/spec/podCIDRs" => {
                let mut list = slot.as_array().cloned().unwrap_or_default();
                for item in items {
                    if !list.contains(item) {
                        list.push(item.clone());
                    }
                }
                *slot = Value::Array(list);
            }
            (Value::Object(_), _) => strategic_merge(slot, value, &child)?,
            _ => *slot = value.clone(),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_by_key() {
        let mut node = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"}, {"type": "NetworkUnavailable", "status": "True", "reason": "NoRoute"}]}});
        let patch =
            json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "X"}]}});
        strategic_merge(&mut node, &patch, "").unwrap();
        let c = node["status"]["conditions"].as_array().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1], json!({"type": "NetworkUnavailable", "status": "False", "reason": "X"}));
        let delete = json!({"status": {"conditions": [{"type": "Ready", "$patch": "delete"}]}});
        strategic_merge(&mut node, &delete, "").unwrap();
        assert_eq!(node["status"]["conditions"].as_array().unwrap().len(), 1);
        assert!(strategic_merge(&mut node, &json!({"$retainKeys": []}), "").is_err());
        assert!(strategic_merge(&mut node, &json!({"status": {"conditions": [{"status": "x"}]}}), "").is_err());
    }

    #[test]
    fn queries_decode() {
        let q = parse_query("watch=true&resourceVersion=12&continue=5%2Fnode-1&x");
        assert_eq!(q["continue"], "5/node-1");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "");
    }
}
