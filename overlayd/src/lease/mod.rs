//! Where leases come from: etcd (`etcd`, bare hosts) or the Kubernetes API
//! (`kube`, a Node's podCIDR). The daemon sees a store only through
//! [`LeaseStore`]: the network config, our own lease, and batches of peer
//! events; everything after that is the same plan → diff → apply path.

pub mod etcd;
pub mod kube;

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use proto::{LeaseAttrs, LeaseKey, NetConfig};
use tokio::sync::mpsc;

/// A change to the set of peers, as the lease store saw it.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A lease was written (new node, or a node's MAC or address changed).
    Upsert(LeaseKey, LeaseAttrs),
    /// A lease was removed or expired: the node left.
    Remove(LeaseKey),
    /// The full set, after a (re)list: the first thing a watch sends, and
    /// what it sends whenever it lost history (compaction, 410 Gone).
    Snapshot(Vec<(LeaseKey, LeaseAttrs)>),
}

/// The lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    /// The subnet.
    pub key: LeaseKey,
    /// What we published in it.
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to (0 in Kubernetes mode, where
    /// the Node object itself carries the lease).
    pub etcd_lease: i64,
}

/// The outcome of a periodic renewal.
#[derive(Debug)]
pub enum Renewal {
    /// Still ours.
    Held,
    /// Gone or taken: claim a subnet again.
    Lost(String),
    /// Could not tell (store unreachable): try again soon.
    Failed(String),
}

/// Peer events flow from a store's watch task to the daemon through this.
pub type EventSender = mpsc::UnboundedSender<Vec<PeerEvent>>;

/// A source of leases. Used with static dispatch from the daemon's own
/// single-threaded runtime, so `async fn` here needs no `Send` bound; only
/// [`watch`](LeaseStore::watch) runs as a spawned task.
#[allow(async_fn_in_trait)]
pub trait LeaseStore: Send + 'static {
    /// The network config; waits for it where the store may not have it yet.
    async fn network_config(&mut self) -> anyhow::Result<NetConfig>;

    /// The address peers must send to: `detected` unless the store pins another.
    async fn public_ip(&mut self, detected: Ipv4Addr) -> anyhow::Result<Ipv4Addr>;

    /// Takes (or finds) this node's subnet and publishes `attrs` in it.
    /// Retries while the store is unreachable; errors only when retrying
    /// cannot help (network full, a podCIDR outside the network).
    async fn acquire(
        &mut self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
    ) -> anyhow::Result<OwnLease>;

    /// Streams peer events forever, starting with a `Snapshot`.
    fn watch(self, tx: EventSender) -> impl Future<Output = ()> + Send + 'static;

    /// How often [`renew`](LeaseStore::renew) runs.
    fn renew_interval(&self) -> Duration;

    /// Keeps our lease alive and checks it is still ours.
    async fn renew(&mut self, own: &OwnLease) -> Renewal;

    /// Tells the cluster this node's network is up (Kubernetes: the Node
    /// condition `NetworkUnavailable=False`). Called after a successful
    /// reconcile until it succeeds once, and again after every renewal.
    async fn announce_ready(&mut self) -> anyhow::Result<()>;
}
