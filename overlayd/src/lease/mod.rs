//! Where leases come from. Today: etcd (`etcd`). The daemon sees a lease store
//! only through these types: its own lease, and batches of peer events.

pub mod etcd;

use proto::{LeaseAttrs, LeaseKey};

/// A change to the set of peers, as the lease store saw it.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A lease was written (new node, or a node's MAC or address changed).
    Upsert(LeaseKey, LeaseAttrs),
    /// A lease was removed or expired: the node left.
    Remove(LeaseKey),
    /// The full set, after a relist (compaction, reconnect with a lost history).
    Snapshot(Vec<(LeaseKey, LeaseAttrs)>),
}

/// The lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    /// The subnet.
    pub key: LeaseKey,
    /// What we published in it.
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to.
    pub etcd_lease: i64,
}
