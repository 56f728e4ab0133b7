//! The etcd lease store: flannel's key layout under `--etcd-prefix`,
//! subnets claimed by transaction, renewed by keep-alive, watched by revision.

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions, WatchResponse,
};
use ipnet::IpNet;
use proto::{Family, LeaseAttrs, LeaseKey, NetConfig, SubnetRange};
use tracing::{debug, error, info, warn};

use super::etcd_events::{self, KeyChange};
use super::net_conf;
use super::{Created, EventSender, LeaseLost, LeaseStore, LostKind, OwnLease, Renewal, WatchEvent};
use crate::backoff::{Backoff, Throttle};
use crate::flags::EtcdArgs;
use crate::list_watch::{self, ListWatch, Sink, Stop, WatchError};
use crate::outage::Outage;

/// Keys per page of a listing.
const LIST_PAGE: i64 = 500;

/// The largest gRPC message taken from etcd (tonic's default is 4 MiB): a
/// page of values at etcd's own request limit (1.5 MiB each) still fits
/// after the page shrinks, and a watch response with a few of them too.
const RECEIVE_LIMIT: usize = 64 * 1024 * 1024;

/// The key after every key that starts with `prefix`: the end of its range.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Why the etcd store failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached or refused a call. Shown with every cause
    /// in the chain and, when it can be told, what to check.
    #[error("etcd {what}: {}", explain(.source, *.tls))]
    Etcd {
        /// Which call.
        what: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
        /// Whether the endpoint speaks TLS (https://).
        tls: bool,
    },
    /// A TLS file could not be read.
    #[error("reading {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No subnet is left.
    #[error("network {network} is full: all {count} subnets between {min} and {max} are leased (raise the subnet maximum or use a larger network)")]
    NetworkFull {
        /// The cluster network.
        network: IpNet,
        /// How many subnets it has.
        count: u128,
        /// The first subnet that may be handed out.
        min: IpAddr,
        /// The last subnet that may be handed out.
        max: IpAddr,
    },
    /// etcd cannot hold an IPv6-only lease.
    #[error("EnableIPv4 is false: an IPv6-only network needs Kubernetes mode (--kube-subnet-mgr); flannel's etcd keys always name an IPv4 subnet")]
    Ipv6Only,
    /// The renew margin leaves no time between renewals.
    #[error("--subnet-lease-renew-margin {minutes} (minutes) is not shorter than the lease's lifetime, --subnet-lease-ttl {}", humantime::format_duration(*.ttl))]
    RenewMargin {
        /// The margin, in minutes.
        minutes: u64,
        /// The lease's lifetime.
        ttl: Duration,
    },
    /// No endpoint was given.
    #[error("no etcd endpoint given (--etcd-endpoints)")]
    NoEndpoints,
    /// Claiming kept losing races.
    #[error("could not claim a subnet after {0} attempts: other nodes kept taking the one chosen")]
    Contended(u32),
}

fn etcd(what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> EtcdError {
    let what = what.into();
    move |source| EtcdError::Etcd { what, source, tls: false }
}

impl EtcdError {
    /// Whether etcd answered and said no (credentials, permission, a bad
    /// request): a configuration error, not a connection that failed.
    pub fn is_refusal(&self) -> bool {
        use tonic::Code;
        matches!(self, EtcdError::Etcd { source: etcd_client::Error::GRpcStatus(status), .. }
            if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument | Code::FailedPrecondition))
    }
}

/// One lease as listed.
#[derive(Debug, Clone)]
pub struct ListedLease {
    /// The subnet key.
    pub key: LeaseKey,
    /// The value, or why it did not parse.
    pub attrs: Result<LeaseAttrs, String>,
    /// The attached etcd lease (0 when none).
    pub etcd_lease: i64,
    /// The key's modification revision.
    pub mod_revision: i64,
    /// The revision that created the key: the older of two claims wins.
    pub create_revision: i64,
}

/// A consistent view of all leases at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Leases, whatever their value.
    pub leases: Vec<ListedLease>,
}

/// A subnet key this node holds, and the etcd lease it is attached to.
#[derive(Debug, Clone, Copy)]
pub struct Claimed {
    /// The subnet key.
    pub key: LeaseKey,
    /// The etcd lease.
    pub lease_id: i64,
}

/// A connection to etcd under one prefix.
#[derive(Clone)]
pub struct EtcdLeases {
    /// One client per endpoint: a failed call moves to the next endpoint.
    /// (The library's own balancing waits, up to the request timeout, for a
    /// dead endpoint to come back instead of trying another.)
    clients: Arc<std::sync::RwLock<Vec<Client>>>,
    /// How the clients connect, for [`reconnect`](LeaseStore::reconnect).
    options: ConnectOptions,
    /// Bumped by each reconnect: a watch on an old connection ends, and resumes on a new one.
    reconnects: Arc<tokio::sync::watch::Sender<u64>>,
    /// With etcd authentication: the user and password, and whether each
    /// endpoint's client has its token (it gets one on first use, so that an
    /// endpoint that is down at start does not stop the others).
    user: Option<(String, String)>,
    authenticated: Arc<Vec<std::sync::atomic::AtomicBool>>,
    current: Arc<AtomicUsize>,
    endpoints: Arc<Vec<String>>,
    prefix: String,
    ttl: i64,
    /// Renew this many seconds before the lease expires (flanneld's margin), instead of at a third of it.
    renew_margin: Option<u64>,
    /// The etcd lease our key is attached to, once we hold one.
    lease_id: Option<i64>,
    /// The net-conf text the daemon started with.
    config_text: Option<String>,
    /// etcd's outages, said once for every call that meets them.
    outage: Arc<Outage>,
}

impl EtcdLeases {
    /// Connects to the endpoints of `args` (a connection is made lazily; calls fail while etcd is down).
    pub async fn connect(args: &EtcdArgs) -> Result<Self, EtcdError> {
        let ttl = args.subnet_lease_ttl.as_secs().max(5) as i64;
        let renew_margin = match args.subnet_lease_renew_margin {
            Some(minutes) if minutes.saturating_mul(60) >= ttl as u64 => {
                return Err(EtcdError::RenewMargin { minutes, ttl: args.subnet_lease_ttl })
            }
            Some(minutes) => Some(minutes * 60),
            None => None,
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A token expires (etcd's --auth-token-ttl): get a new one and retry the call.
            .with_auto_token_refresh(true);
        if args.etcd_cafile.is_some() || args.etcd_certfile.is_some() {
            let mut t = TlsOptions::new();
            if let Some(ca) = &args.etcd_cafile {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&args.etcd_certfile, &args.etcd_keyfile) {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        let endpoints: Vec<String> =
            args.etcd_endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
        let clients = connect_each(&endpoints, &options).await?;
        if clients.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let user = match (&args.etcd_username, &args.etcd_password) {
            (Some(name), Some(password)) => Some((name.clone(), password.0.clone())),
            _ => None,
        };
        Ok(EtcdLeases {
            authenticated: Arc::new(clients.iter().map(|_| Default::default()).collect()),
            user,
            renew_margin,
            clients: Arc::new(std::sync::RwLock::new(clients)),
            options,
            reconnects: Arc::new(tokio::sync::watch::Sender::new(0)),
            current: Arc::new(AtomicUsize::new(0)),
            endpoints: Arc::new(endpoints),
            prefix: args.etcd_prefix.trim_end_matches('/').to_string(),
            ttl,
            lease_id: None,
            config_text: None,
            outage: Arc::new(Outage::new("etcd", args.etcd_endpoints.join(","))),
        })
    }

    /// The client of the endpoint in use; with etcd authentication, once it has its token.
    async fn client(&self) -> Result<Client, EtcdError> {
        let at = self.current.load(Relaxed) % self.endpoints.len();
        let mut client = self.clients.read().unwrap_or_else(|e| e.into_inner())[at].clone();
        let Some((name, password)) = &self.user else { return Ok(client) };
        if !self.authenticated[at].load(Relaxed) {
            // The credentials are shared by the client's clones: its later calls
            // refresh an expired token themselves.
            client.update_user(Some((name.clone(), password.clone()))).await.map_err(self.fail(format!(
                "authenticate as user {name:?} at {} (--etcd-username, --etcd-password)",
                self.endpoints[at]
            )))?;
            self.authenticated[at].store(true, Relaxed);
        }
        Ok(client)
    }

    /// Revokes an etcd lease that holds nothing; a failure only leaves it to expire.
    async fn revoke(&self, lease: i64) {
        if let Ok(client) = self.client().await {
            let _ = client.clone().lease_revoke(lease).await;
        }
    }

    /// Maps a failed call to our error, moving to the next endpoint first.
    fn fail(&self, what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> EtcdError + '_ {
        let what = what.into();
        let tls = self.endpoints[self.current.load(Relaxed) % self.endpoints.len()].starts_with("https://");
        move |source| {
            self.next_endpoint();
            EtcdError::Etcd { what, source, tls }
        }
    }

    /// Moves to the next endpoint, after a failure on this one.
    fn next_endpoint(&self) {
        if self.endpoints.len() > 1 {
            self.current.fetch_add(1, Relaxed);
        }
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key_path(&self, key: &LeaseKey) -> String {
        format!("{}/subnets/{}", self.prefix, key)
    }

    /// The net-conf text at `<prefix>/config`, if it exists.
    pub async fn config_text(&mut self) -> Result<Option<String>, EtcdError> {
        let path = format!("{}/config", self.prefix);
        let resp = self.client().await?.get(path.as_str(), None).await.map_err(self.fail(format!("get {path}")))?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Every lease under `<prefix>/subnets/`.
    pub async fn list(&mut self) -> Result<Listing, EtcdError> {
        let prefix = self.subnets_prefix();
        let mut leases = Vec::new();
        self.list_prefix(&prefix, |kv| {
            let Some(key) = etcd_events::lease_key(kv.key(), &prefix) else { return };
            let attrs = if kv.value().len() > etcd_events::MAX_LEASE_VALUE {
                Err(format!("a value of {} bytes, far bigger than any lease", kv.value().len()))
            } else {
                LeaseAttrs::from_json(kv.value()).map_err(|e| e.to_string())
            };
            leases.push(ListedLease {
                key,
                attrs,
                etcd_lease: kv.lease(),
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
            });
        })
        .await?;
        Ok(Listing { leases })
    }

    /// Every key under `prefix`, page by page at one revision (as etcd's own
    /// clients list), so no listing meets the gRPC receive limit however many
    /// leases there are; gives the revision the listing is at. A page too big
    /// even so (values near etcd's request limit) is asked again smaller.
    async fn list_prefix(&mut self, prefix: &str, mut each: impl FnMut(&KeyValue)) -> Result<i64, EtcdError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut page = LIST_PAGE;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut kv = self.client().await?.kv_client().max_decoding_message_size(RECEIVE_LIMIT);
            let resp = match kv.get(from.clone(), Some(options)).await {
                Ok(resp) => resp,
                Err(etcd_client::Error::GRpcStatus(status)) if status.code() == tonic::Code::OutOfRange && page > 1 => {
                    page = (page / 8).max(1);
                    debug!(page, "a page of the listing is too big to receive; asking for fewer keys");
                    continue;
                }
                Err(e) => return Err(self.fail(format!("list {prefix}"))(e)),
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            resp.kvs().iter().for_each(&mut each);
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(revision),
            }
        }
    }

    /// Takes the subnets for a node at `attrs.public_ip`: its existing lease
    /// if it has one, else `previous` if free, else any free subnet, in each
    /// family the network carries (one key for both, `10.244.1.0-24&fd00::-64`,
    /// so one transaction). Never two nodes on one subnet: every claim is a
    /// transaction on the key's version, and a claim that shares a subnet
    /// with an older key of another name (its other family's part differs)
    /// is given up.
    pub async fn claim_subnet(
        &mut self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<LeaseKey>,
    ) -> Result<Claimed, EtcdError> {
        const ATTEMPTS: u32 = 16;
        let pool4 = config.ipv4.ok_or(EtcdError::Ipv6Only)?;
        let range4 = SubnetRange::of(&pool4);
        let pool6 = config.ipv6;
        let range6 = pool6.as_ref().map(SubnetRange::of);
        // A key of the shape this config hands out: IPv4 in range, IPv6 in range exactly when IPv6 is on.
        let fits = |k: &LeaseKey| {
            k.v4.is_some_and(|n| range4.contains(&n.into()))
                && match (range6, k.v6) {
                    (None, None) => true,
                    (Some(r), Some(n)) => r.contains(&n.into()),
                    _ => false,
                }
        };
        let value = attrs.to_json();
        for attempt in 0..ATTEMPTS {
            let listing = self.list().await?;
            let ours = |l: &&ListedLease| l.attrs.as_ref().is_ok_and(|a| a.public_ip == attrs.public_ip);
            // 1. A lease that already names our address: take it back.
            let mut mine: Vec<&ListedLease> = listing.leases.iter().filter(ours).filter(|l| fits(&l.key)).collect();
            mine.sort_by_key(|l| Some(l.key) != previous);
            if let Some(old) = mine.first() {
                if let Some(own) = self.retake(old, &value, attrs).await? {
                    info!(subnet = %own.key, "took back our existing lease");
                    return Ok(own);
                }
                continue;
            }
            // Our lease of another shape (IPv6 turned on or off since): its subnets are reused and it is replaced.
            let reshaped: Option<&ListedLease> =
                listing.leases.iter().filter(ours).find(|l| l.key.v4.is_some_and(|n| range4.contains(&n.into())));
            let taken = |family: Family| -> HashSet<IpNet> {
                listing
                    .leases
                    .iter()
                    .filter(|l| reshaped.is_none_or(|r| r.key != l.key))
                    .filter_map(|l| l.key.subnet(family))
                    .collect()
            };
            // 2. The subnets of our subnet file (or of our reshaped lease), if still free; 3. any free one.
            let pick = |family: Family, range: &SubnetRange| -> Option<IpNet> {
                let taken = taken(family);
                let free = |s: &IpNet| range.contains(s) && !taken.contains(s);
                previous
                    .and_then(|p| p.subnet(family))
                    .filter(free)
                    .or_else(|| reshaped.and_then(|r| r.key.subnet(family)).filter(free))
                    .or_else(|| range.pick_free(&taken, seed(attrs, family, attempt)))
            };
            let full = |pool: &proto::Pool, range: &SubnetRange| EtcdError::NetworkFull {
                network: pool.network,
                count: range.len(),
                min: pool.subnet_min,
                max: pool.subnet_max,
            };
            let v4 = pick(Family::V4, &range4).ok_or_else(|| full(&pool4, &range4))?;
            let v6 = match (pool6.as_ref(), range6.as_ref()) {
                (Some(pool), Some(range)) => Some(pick(Family::V6, range).ok_or_else(|| full(pool, range))?),
                _ => None,
            };
            let key = LeaseKey::new(as_v4(v4), v6.and_then(as_v6));
            if let Some(lease) = self.claim(&key, &value, reshaped).await? {
                let claimed = Claimed { key, lease_id: lease };
                if self.lost_to_older_claim(&claimed).await? {
                    debug!(subnet = %key, attempt, "an older lease holds one of these subnets; choosing again");
                    continue;
                }
                match reshaped {
                    Some(old) => {
                        info!(subnet = %key, old = %old.key, "claimed subnets, replacing our lease of another shape")
                    }
                    None => info!(subnet = %key, "claimed new subnet"),
                }
                return Ok(claimed);
            }
            debug!(subnet = %key, attempt, "lost the race for a subnet; retrying");
        }
        Err(EtcdError::Contended(ATTEMPTS))
    }

    /// Whether another key, created before ours, holds one of our subnets (two
    /// nodes chose the same IPv6 subnet with different IPv4 ones at once).
    /// If so, ours is removed: the older claim keeps it.
    async fn lost_to_older_claim(&mut self, claimed: &Claimed) -> Result<bool, EtcdError> {
        if claimed.key.v6.is_none() {
            // An IPv4-only key is its subnet: the transaction alone made it unique.
            return Ok(false);
        }
        let listing = self.list().await?;
        let Some(ours) = listing.leases.iter().find(|l| l.key == claimed.key) else { return Ok(false) };
        let shares = |l: &ListedLease| {
            Family::ALL.iter().any(|f| l.key.subnet(*f).is_some() && l.key.subnet(*f) == claimed.key.subnet(*f))
        };
        let older = listing
            .leases
            .iter()
            .any(|l| l.key != claimed.key && shares(l) && l.create_revision < ours.create_revision);
        if older {
            let path = self.key_path(&claimed.key);
            let txn = Txn::new()
                .when([Compare::mod_revision(path.as_str(), CompareOp::Equal, ours.mod_revision)])
                .and_then([TxnOp::delete(path.as_str(), None)]);
            self.client().await?.txn(txn).await.map_err(self.fail(format!("transaction on {path}")))?;
            self.revoke(claimed.lease_id).await;
        }
        Ok(older)
    }

    /// Creates `key` if nobody holds it (and removes `replaces`, our lease
    /// of another shape, in the same transaction, if unchanged since it was
    /// listed); returns the etcd lease on success.
    async fn claim(
        &mut self,
        key: &LeaseKey,
        value: &str,
        replaces: Option<&ListedLease>,
    ) -> Result<Option<i64>, EtcdError> {
        let lease = self.client().await?.lease_grant(self.ttl, None).await.map_err(self.fail("grant lease"))?.id();
        let path = self.key_path(key);
        let mut guards = vec![Compare::version(path.as_str(), CompareOp::Equal, 0)];
        let mut ops = vec![TxnOp::put(path.as_str(), value, Some(PutOptions::new().with_lease(lease)))];
        if let Some(old) = replaces {
            let old_path = self.key_path(&old.key);
            guards.push(Compare::mod_revision(old_path.as_str(), CompareOp::Equal, old.mod_revision));
            ops.push(TxnOp::delete(old_path.as_str(), None));
        }
        let txn = Txn::new().when(guards).and_then(ops);
        let claimed =
            self.client().await?.txn(txn).await.map_err(self.fail(format!("transaction on {path}")))?.succeeded();
        if claimed {
            Ok(Some(lease))
        } else {
            self.revoke(lease).await;
            Ok(None)
        }
    }

    /// Re-attaches to our old key, rewriting the value (new MAC) or the etcd
    /// lease (expired, or none) if needed, but only if nobody changed it since
    /// we listed it.
    async fn retake(
        &mut self,
        old: &ListedLease,
        value: &str,
        attrs: &LeaseAttrs,
    ) -> Result<Option<Claimed>, EtcdError> {
        let lease_alive = old.etcd_lease != 0 && self.ttl_left(old.etcd_lease).await? > 0;
        let same_value = old.attrs.as_ref().is_ok_and(|a| a == attrs);
        if lease_alive && same_value {
            return Ok(Some(Claimed { key: old.key, lease_id: old.etcd_lease }));
        }
        let lease = if lease_alive {
            old.etcd_lease
        } else {
            self.client().await?.lease_grant(self.ttl, None).await.map_err(self.fail("grant lease"))?.id()
        };
        let path = self.key_path(&old.key);
        let unchanged = Compare::mod_revision(path.as_str(), CompareOp::Equal, old.mod_revision);
        let updated = self.put_if(unchanged, &path, value, lease).await?;
        if !updated && !lease_alive {
            // The lease we just granted holds nothing: do not leave it for a day.
            self.revoke(lease).await;
        }
        Ok(updated.then_some(Claimed { key: old.key, lease_id: lease }))
    }

    /// Puts `value` at `path`, attached to `lease`, only if `guard` holds.
    async fn put_if(&mut self, guard: Compare, path: &str, value: &str, lease: i64) -> Result<bool, EtcdError> {
        let txn =
            Txn::new().when([guard]).and_then([TxnOp::put(path, value, Some(PutOptions::new().with_lease(lease)))]);
        let resp = self.client().await?.txn(txn).await.map_err(self.fail(format!("transaction on {path}")))?;
        Ok(resp.succeeded())
    }

    /// Seconds left on an etcd lease (0 or less: gone).
    async fn ttl_left(&mut self, lease: i64) -> Result<i64, EtcdError> {
        let resp =
            self.client().await?.lease_time_to_live(lease, None).await.map_err(self.fail("lease time-to-live"))?;
        Ok(resp.ttl())
    }

    /// Renews our etcd lease; returns the TTL the server granted (0: the lease is gone).
    pub async fn keep_alive(&mut self, lease: i64) -> Result<i64, EtcdError> {
        let (mut keeper, mut stream) =
            self.client().await?.lease_keep_alive(lease).await.map_err(self.fail("keep-alive"))?;
        keeper.keep_alive().await.map_err(self.fail("keep-alive"))?;
        match stream.message().await.map_err(self.fail("keep-alive"))? {
            Some(resp) => Ok(resp.ttl()),
            None => Ok(0),
        }
    }

    /// What our key holds now (none: gone, or not a lease that parses).
    async fn read_own(&mut self, key: &LeaseKey) -> Result<Option<LeaseAttrs>, EtcdError> {
        let path = self.key_path(key);
        let resp = self.client().await?.get(path.as_str(), None).await.map_err(self.fail(format!("get {path}")))?;
        Ok(resp.kvs().first().and_then(|kv| LeaseAttrs::from_json(kv.value()).ok()))
    }
}

/// etcd's leases as a list-watch source: the keys under `<prefix>/subnets/`.
/// A listing comes page by page at one revision and gives the revision to
/// watch from; a compaction or a canceled watch relists; a broken stream is
/// resumed from the last revision seen, so no event is lost.
pub struct LeaseWatch {
    store: EtcdLeases,
    prefix: String,
}

impl LeaseWatch {
    fn failed(&self, e: EtcdError) -> WatchError {
        if e.is_refusal() {
            WatchError::Refused(e.into())
        } else {
            self.store.next_endpoint();
            WatchError::Unreachable(e.into())
        }
    }
}

impl ListWatch for LeaseWatch {
    type Key = LeaseKey;
    type Value = (LeaseAttrs, Created);
    type Version = i64;

    fn what(&self) -> &'static str {
        "etcd leases"
    }

    async fn list(&mut self, sink: &mut Sink<LeaseKey, (LeaseAttrs, Created)>) -> Result<i64, Stop> {
        let mut events = Vec::new();
        let prefix = self.prefix.clone();
        let listed = self
            .store
            .list_prefix(&prefix, |kv| {
                etcd_events::listed(&prefix, [(kv.key(), kv.value(), kv.create_revision())], &mut events)
            })
            .await;
        let revision = listed.map_err(|e| self.failed(e))?;
        for event in events {
            sink.push(event).await?;
        }
        Ok(revision)
    }

    async fn watch(
        &mut self,
        mut revision: i64,
        sink: &mut Sink<LeaseKey, (LeaseAttrs, Created)>,
    ) -> Result<i64, (i64, Stop)> {
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1).with_progress_notify();
        let asked = std::time::Instant::now();
        let watched = match self.store.client().await {
            Ok(client) => client
                .watch_client()
                .max_decoding_message_size(RECEIVE_LIMIT)
                .watch(self.prefix.as_str(), Some(options))
                .await
                .map_err(etcd("watch")),
            Err(e) => Err(e),
        };
        let mut stream = watched.map_err(|e| (revision, self.failed(e).into()))?;
        sink.working(asked);
        let mut reconnects = self.store.reconnects.subscribe();
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = reconnects.changed() => {
                    debug!(revision, "resuming the watch on a new connection");
                    return Ok(revision);
                }
            };
            match message {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 || resp.canceled() {
                        warn!(
                            compact_revision = resp.compact_revision(),
                            reason = resp.cancel_reason(),
                            "watch history lost; relisting"
                        );
                        return Err((revision, WatchError::Expired.into()));
                    }
                    let (events, seen) = watch_events(&self.prefix, &resp);
                    revision = revision.max(seen);
                    sink.send_all(events).await.map_err(|c| (revision, c.into()))?;
                }
                Ok(None) => {
                    self.store.next_endpoint();
                    return Err((revision, WatchError::Unreachable(anyhow::anyhow!("etcd closed the watch")).into()));
                }
                Err(e) => return Err((revision, self.failed(etcd("watch")(e)).into())),
            }
        }
    }
}

impl EtcdLeases {
    /// Watches `<prefix>/config` from the revision after start, and says
    /// each change. Quiet about outages: the lease watch says those.
    async fn watch_config_key(self) {
        let path = format!("{}/config", self.prefix);
        let mut running = self.config_text.clone().unwrap_or_default();
        let mut backoff = Backoff::with_max(Duration::from_secs(30));
        let mut revision = None;
        loop {
            let mut options = WatchOptions::new();
            if let Some(r) = revision {
                options = options.with_start_revision(r + 1);
            }
            let stream = match self.client().await {
                Ok(client) => client.watch_client().watch(path.as_str(), Some(options)).await.ok(),
                Err(_) => None,
            };
            let Some(mut stream) = stream else {
                backoff.wait().await;
                continue;
            };
            while let Ok(Some(resp)) = stream.message().await {
                backoff.reset();
                if resp.compact_revision() > 0 {
                    revision = None;
                    break;
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = Some(kv.mod_revision());
                    let now = match event.event_type() {
                        EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
                        EventType::Delete => None,
                    };
                    if now.as_deref() != Some(running.as_str()) {
                        net_conf::say_changed(&path, &running, now.as_deref());
                        running = now.unwrap_or_default();
                    }
                }
                if revision.is_none() {
                    revision = resp.header().map(|h| h.revision());
                }
            }
            backoff.wait().await;
        }
    }
}

/// The events of one watch response, and the highest revision it shows.
fn watch_events(prefix: &str, resp: &WatchResponse) -> (Vec<WatchEvent>, i64) {
    let mut revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut events = Vec::with_capacity(resp.events().len());
    for event in resp.events() {
        let Some(kv) = event.kv() else { continue };
        revision = revision.max(kv.mod_revision());
        let kind = match event.event_type() {
            EventType::Put => KeyChange::Put,
            EventType::Delete => KeyChange::Delete,
        };
        events.extend(etcd_events::change(prefix, kind, (kv.key(), kv.value(), kv.create_revision())));
    }
    (events, revision)
}

impl LeaseStore for EtcdLeases {
    async fn reconnect(&mut self) {
        match connect_each(&self.endpoints, &self.options).await {
            Ok(clients) => {
                *self.clients.write().unwrap_or_else(|e| e.into_inner()) = clients;
                for token in self.authenticated.iter() {
                    token.store(false, Relaxed);
                }
                self.reconnects.send_modify(|n| *n += 1);
                info!(endpoints = %self.endpoints.join(","), "the underlay changed: connecting to etcd anew");
            }
            // The old clients stay: their requests time out and reconnect, only later.
            Err(e) => warn!(error = %e, "cannot connect to etcd anew after the underlay changed"),
        }
    }

    async fn network_config(&mut self) -> anyhow::Result<NetConfig> {
        let path = format!("{}/config", self.prefix);
        let mut backoff = Backoff::new();
        let mut say = Throttle::new(Duration::from_secs(30));
        loop {
            match self.config_text().await {
                Ok(Some(text)) => {
                    self.outage.recovered();
                    let config = net_conf::parse(&text, &path)
                        .with_context(|| format!("invalid network config at etcd key {path}"))?;
                    self.config_text = Some(text);
                    if config.ipv4.is_none() {
                        return Err(EtcdError::Ipv6Only).with_context(|| format!("network config at etcd key {path}"));
                    }
                    return Ok(config);
                }
                Ok(None) if say.ready() => {
                    info!(key = %path, "waiting for the network config: no such key in etcd yet")
                }
                // etcd answered, and said no (credentials, permission): a
                // configuration error, retried all the same (etcd may be
                // in the middle of a change), and said as such.
                Err(e) if e.is_refusal() && say.ready() => {
                    let endpoints = self.endpoints.join(",");
                    warn!(%endpoints, key = %path, error = %e, "etcd refuses to give the network config; retrying")
                }
                Err(e) if !e.is_refusal() => self.outage.failed(&format!("reading the network config: {e}")),
                _ => {}
            }
            backoff.wait().await;
        }
    }

    async fn acquire(
        &mut self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<LeaseKey>,
    ) -> anyhow::Result<OwnLease> {
        let mut backoff = Backoff::new();
        let mut say = Throttle::new(Duration::from_secs(30));
        loop {
            match self.claim_subnet(config, attrs, previous).await {
                Ok(claimed) => {
                    self.outage.recovered();
                    self.lease_id = Some(claimed.lease_id);
                    return Ok(OwnLease { key: claimed.key, attrs: attrs.clone() });
                }
                Err(e @ (EtcdError::NetworkFull { .. } | EtcdError::Contended(_) | EtcdError::Ipv6Only)) => {
                    return Err(e.into())
                }
                Err(e) if e.is_refusal() && say.ready() => warn!(error = %e, "cannot lease a subnet yet; retrying"),
                Err(e) if !e.is_refusal() => self.outage.failed(&format!("leasing a subnet: {e}")),
                Err(_) => {}
            }
            backoff.wait().await;
        }
    }

    fn watch(self, tx: EventSender) -> impl Future<Output = ()> + Send + 'static {
        let outage = self.outage.clone();
        let prefix = self.subnets_prefix();
        list_watch::run(LeaseWatch { store: self, prefix }, tx, outage)
    }

    fn outage(&self) -> Option<Arc<Outage>> {
        Some(self.outage.clone())
    }

    fn watch_config(self) -> impl Future<Output = ()> + Send + 'static {
        self.watch_config_key()
    }

    fn say_lost(&self, lost: &LeaseLost, own: &OwnLease) {
        match lost.kind {
            LostKind::Rewritten => {
                warn!(subnet = %own.key, why = %lost.detail, "our lease was rewritten; writing it back")
            }
            LostKind::Gone => error!(subnet = %own.key, why = %lost.detail, "LEASE LOST: re-claiming a subnet"),
        }
    }

    async fn restore(&mut self, own: &OwnLease) -> anyhow::Result<bool> {
        let path = self.key_path(&own.key);
        let resp = self.client().await?.get(path.as_str(), None).await.map_err(self.fail(format!("get {path}")))?;
        let Some(kv) = resp.kvs().first() else { return Ok(false) };
        // The key was ours until rewritten in place: a claim never overwrites a key, so
        // this is not another node's subnet. A rewrite without a lease detached it from
        // ours; the truth goes back on ours (a new one if ours expired meanwhile).
        let current = self.lease_id;
        let alive = match current {
            Some(id) if self.ttl_left(id).await? > 0 => Some(id),
            _ => None,
        };
        let lease = match alive {
            Some(id) => id,
            None => self.client().await?.lease_grant(self.ttl, None).await.map_err(self.fail("grant lease"))?.id(),
        };
        let unchanged = Compare::mod_revision(path.as_str(), CompareOp::Equal, kv.mod_revision());
        if !self.put_if(unchanged, &path, &own.attrs.to_json(), lease).await? {
            if alive.is_none() {
                // The lease we just granted holds nothing: do not leave it for a day.
                self.revoke(lease).await;
            }
            return Ok(false);
        }
        self.lease_id = Some(lease);
        Ok(true)
    }

    fn renew_interval(&self) -> Duration {
        match self.renew_margin {
            Some(margin) => Duration::from_secs((self.ttl as u64).saturating_sub(margin).max(1)),
            None => Duration::from_secs((self.ttl / 3).clamp(1, 3600) as u64),
        }
    }

    async fn renew(&mut self, own: &OwnLease) -> Renewal {
        let Some(lease_id) = self.lease_id else { return Renewal::Seen(None) };
        match self.keep_alive(lease_id).await {
            // The key went with its etcd lease.
            Ok(ttl) if ttl <= 0 => Renewal::Seen(None),
            Ok(_) => match self.read_own(&own.key).await {
                Ok(seen) => Renewal::Seen(seen),
                Err(e) => {
                    // The keep-alive worked: the lease is alive, whatever this says.
                    warn!(error = %e, "cannot read our lease key back");
                    Renewal::Seen(Some(own.attrs.clone()))
                }
            },
            Err(e) => Renewal::Failed(e.into()),
        }
    }
}

/// An etcd client's error with every cause in its chain (tonic's "transport
/// error" alone says nothing), and what to check when the cause is a
/// certificate, a handshake or the credentials.
fn explain(error: &etcd_client::Error, tls: bool) -> String {
    let mut chain = vec![error.to_string()];
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if !chain.iter().any(|c| c.contains(&text)) {
            chain.push(text);
        }
        cause = e.source();
    }
    let text = chain.join(": ");
    match hint(&text.to_ascii_lowercase(), tls) {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

/// What to check for an etcd error, from its text (rustls', tonic's and etcd's wording).
fn hint(text: &str, tls: bool) -> Option<&'static str> {
    let hints: [(&[&str], &str); 8] = [
        (
            &["unknownissuer", "unknown issuer", "unknownca", "unknown_ca"],
            "TLS: etcd's certificate is not signed by a CA we trust: check --etcd-cafile",
        ),
        (
            &["notvalidforname", "not valid for name", "certificate is not valid for"],
            "TLS: etcd's certificate does not name the host of the endpoint: check --etcd-endpoints against the certificate's names",
        ),
        (
            &["certificaterequired", "certificate required", "certificate_required"],
            "TLS: etcd asks for a client certificate and got none: set --etcd-certfile and --etcd-keyfile",
        ),
        (
            &["badcertificate", "bad certificate", "bad_certificate", "unsupportedcertificate", "certificateunknown"],
            "TLS: etcd refused our client certificate: check --etcd-certfile and --etcd-keyfile, and that etcd's --trusted-ca-file signed it",
        ),
        (
            &["expired"],
            "TLS: a certificate has expired (ours or etcd's): renew it, and check this host's clock",
        ),
        (
            &["authentication failed", "invalid auth management"],
            "etcd refused the user name or password: check --etcd-username and --etcd-password",
        ),
        (
            &["permission denied"],
            "etcd's user has no role that grants this on the prefix: grant it read and write on --etcd-prefix",
        ),
        (
            &["user name is empty", "user name not found"],
            "etcd has authentication on: set --etcd-username and --etcd-password",
        ),
    ];
    if let Some((_, hint)) = hints.iter().find(|(needles, _)| needles.iter().any(|n| text.contains(n))) {
        return Some(hint);
    }
    // A server that requires client certificates closes a TLS 1.3 connection
    // without one right after the handshake: all the client sees is the close.
    let closed = ["broken pipe", "connection reset", "connection closed", "unexpected eof", "operation was canceled"];
    if tls && closed.iter().any(|c| text.contains(c)) {
        return Some("TLS: etcd closed the connection after the handshake, as it does when it requires a client certificate and got none or one it does not trust: check --etcd-certfile and --etcd-keyfile");
    }
    None
}

/// A client for each endpoint; each connects when first used.
async fn connect_each(endpoints: &[String], options: &ConnectOptions) -> Result<Vec<Client>, EtcdError> {
    let mut clients = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let client = Client::connect([endpoint.as_str()], Some(options.clone()))
            .await
            .map_err(etcd(format!("connect to {endpoint}")))?;
        clients.push(client);
    }
    Ok(clients)
}

fn read(path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile { path: path.display().to_string(), source })
}

/// Where in a family's range a node starts looking, so simultaneous joiners spread out.
fn seed(attrs: &LeaseAttrs, family: Family, attempt: u32) -> u64 {
    let ip = match (family, attrs.public_ipv6) {
        (Family::V6, Some(v6)) => proto::hash::fnv1a(&v6.octets()),
        _ => u64::from(u32::from(attrs.public_ip)),
    };
    ip.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(attempt).wrapping_mul(7919)
}

fn as_v4(net: IpNet) -> Option<ipnet::Ipv4Net> {
    match net {
        IpNet::V4(n) => Some(n),
        IpNet::V6(_) => None,
    }
}

fn as_v6(net: IpNet) -> Option<ipnet::Ipv6Net> {
    match net {
        IpNet::V6(n) => Some(n),
        IpNet::V4(_) => None,
    }
}
