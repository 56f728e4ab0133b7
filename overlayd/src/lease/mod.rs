//! Where leases come from: etcd (`etcd`, bare hosts) or the Kubernetes API
//! (`kube`, a Node's podCIDR). The daemon sees a store only through
//! [`LeaseStore`]: the network config, our own lease, and a list-then-watch
//! stream of [`WatchEvent`]s in one shape for both stores; everything after
//! that is the same plan → diff → apply path.

pub mod etcd;
mod etcd_events;
pub mod keeper;
pub mod kube;
mod list_scanner;
pub mod net_conf;

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use proto::{LeaseAttrs, LeaseKey, NetConfig};
use tokio::sync::mpsc;

/// One step of a lease store's list-then-watch (see `reflector`): a lease
/// is its key, what it says, and when it was first written.
pub type WatchEvent = crate::reflector::WatchEvent<LeaseKey, (LeaseAttrs, Created)>;

/// When a lease was first written, in the store's own order: etcd's create
/// revision, or a Node's creation time in seconds. Smaller is older; when two
/// leases claim one subnet, VtepMAC or PublicIP, the older keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Created(pub i64);

/// Watch events flow from a store's watch task to the daemon in batches,
/// over a bounded channel (`list_watch`).
pub type EventSender = mpsc::Sender<Vec<WatchEvent>>;

/// The lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    /// The subnet.
    pub key: LeaseKey,
    /// What we published in it.
    pub attrs: LeaseAttrs,
}

/// What a renewal found at our key.
#[derive(Debug)]
pub enum Renewal {
    /// The store holds this at our key now (none: the key is gone or expired).
    Seen(Option<LeaseAttrs>),
    /// Could not tell (store unreachable, or refusing): try again soon.
    Failed(anyhow::Error),
}

/// The addresses peers send this node's VXLAN packets to, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublicIps {
    /// IPv4, when IPv4 is on.
    pub v4: Option<Ipv4Addr>,
    /// IPv6, when IPv6 is on.
    pub v6: Option<Ipv6Addr>,
}

/// Our lease no longer says what we published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct LeaseLost {
    /// Gone, or rewritten by someone else.
    pub kind: LostKind,
    /// What was seen, in words.
    pub detail: String,
}

/// How a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostKind {
    /// The store no longer has it: an etcd key deleted or expired, a Node deleted.
    Gone,
    /// It says something else than we published.
    Rewritten,
}

/// Judges whether our lease is still ours from what the store holds at our
/// key: the one place where a lost lease is decided, whether the news came
/// from a watch event or a renewal. A record that names another node, a
/// rewritten MAC, a deleted key: peers would send our pods' traffic to the
/// wrong place, so the lease must be claimed again.
pub fn check_own(own: &OwnLease, seen: Option<&LeaseAttrs>) -> Result<(), LeaseLost> {
    match seen {
        None => {
            Err(LeaseLost { kind: LostKind::Gone, detail: format!("our lease {} is gone from the store", own.key) })
        }
        Some(attrs) if *attrs != own.attrs => Err(LeaseLost {
            kind: LostKind::Rewritten,
            detail: format!("our lease {} now says {}, not what we published", own.key, attrs.to_json()),
        }),
        Some(_) => Ok(()),
    }
}

/// Whether `e` is a store's refusal (a 403, an etcd permission error)
/// rather than a call that did not get through: a refusal is said as a
/// configuration problem, not as an outage.
pub fn is_refusal(e: &anyhow::Error) -> bool {
    crate::kubernetes::is_refusal(e)
        || e.chain().any(|c| c.downcast_ref::<etcd::EtcdError>().is_some_and(|e| e.is_refusal()))
}

/// A source of leases. Used with static dispatch from the daemon's own
/// single-threaded runtime, so `async fn` here needs no `Send` bound; only
/// [`watch`](LeaseStore::watch) runs as a spawned task.
#[allow(async_fn_in_trait)]
pub trait LeaseStore: Send + 'static {
    /// The network config; waits for it where the store may not have it yet.
    async fn network_config(&mut self) -> anyhow::Result<NetConfig>;

    /// The addresses peers must send to: `detected` unless the store pins others.
    async fn public_ips(&mut self, detected: PublicIps) -> anyhow::Result<PublicIps> {
        Ok(detected)
    }

    /// Takes (or finds) this node's subnets and publishes `attrs` in them;
    /// `previous` is the subnets this node had, where the store lets a node
    /// choose. Retries while the store is unreachable; errors only when
    /// retrying cannot help (network full, a podCIDR outside the network).
    async fn acquire(
        &mut self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<LeaseKey>,
    ) -> anyhow::Result<OwnLease>;

    /// Lists, then watches, forever: a stream of [`WatchEvent`] batches that
    /// starts with a listing and relists whenever history was lost.
    fn watch(self, tx: EventSender) -> impl Future<Output = ()> + Send + 'static;

    /// Watches the network config after start, forever, and says when it
    /// changes (it is applied at start only). Where the store cannot watch
    /// it, never returns.
    fn watch_config(self) -> impl Future<Output = ()> + Send + 'static
    where
        Self: Sized,
    {
        std::future::pending()
    }

    /// The store's endpoint as the place outages are said, where the store
    /// shares one between its calls.
    fn outage(&self) -> Option<std::sync::Arc<crate::outage::Outage>> {
        None
    }

    /// How often [`renew`](LeaseStore::renew) runs.
    fn renew_interval(&self) -> Duration;

    /// Keeps our lease alive and reads back what the store holds at our key.
    async fn renew(&mut self, own: &OwnLease) -> Renewal;

    /// Says, in the store's words, that our lease was lost and is being
    /// claimed again. etcd: an error (a subnet may change under running pods).
    fn say_lost(&self, lost: &LeaseLost, own: &OwnLease) {
        tracing::error!(subnet = %own.key, why = %lost.detail, "LEASE LOST: re-claiming a subnet");
    }

    /// Writes `own` over our existing key, keeping the subnet: after someone
    /// rewrote it in place ([`LostKind::Rewritten`]), or to publish new
    /// addresses. True when it did. False where the store has no such write,
    /// or the key went or changed again meanwhile: then the lease is claimed
    /// again with [`acquire`](LeaseStore::acquire).
    async fn restore(&mut self, _own: &OwnLease) -> anyhow::Result<bool> {
        Ok(false)
    }

    /// The underlay's address changed: connections made from the old one are
    /// dead, though nothing says so until a request times out. Where the
    /// store holds such connections, it makes new ones now.
    async fn reconnect(&mut self) {}

    /// Tells the cluster this node's network is up, where the store has a
    /// place for it (Kubernetes: the Node condition `NetworkUnavailable=False`).
    async fn announce_ready(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::VxlanBackendData;

    fn attrs(ip: &str, mac: &str) -> LeaseAttrs {
        LeaseAttrs::vxlan(ip.parse().unwrap(), VxlanBackendData { vni: 1, vtep_mac: mac.parse().unwrap() })
    }

    #[test]
    fn own_lease_is_lost_when_gone_or_rewritten() {
        let own = OwnLease {
            key: LeaseKey::v4("10.244.1.0/24".parse().unwrap()),
            attrs: attrs("192.168.1.1", "02:00:00:00:00:01"),
        };
        assert_eq!(check_own(&own, Some(&own.attrs)), Ok(()));
        let gone = check_own(&own, None).unwrap_err();
        assert!(gone.detail.contains("10.244.1.0-24 is gone") && gone.kind == LostKind::Gone, "{gone}");
        let taken = check_own(&own, Some(&attrs("192.168.1.9", "02:00:00:00:00:09"))).unwrap_err();
        assert!(taken.detail.contains("192.168.1.9") && taken.detail.contains("02:00:00:00:00:09"), "{taken}");
        assert_eq!(taken.kind, LostKind::Rewritten);
    }
}
