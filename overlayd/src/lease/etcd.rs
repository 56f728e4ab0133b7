//! The etcd lease store: flannel's key layout under `--etcd-prefix`,
//! subnets claimed by transaction, renewed by keep-alive, watched by revision.

use std::collections::HashSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use ipnet::Ipv4Net;
use proto::{LeaseAttrs, LeaseKey, NetConfig, SubnetRange};
use tracing::{debug, info, warn};

use super::{EventSender, LeaseStore, OwnLease, PeerEvent, Renewal};
use crate::backoff::Backoff;

/// Why the etcd store failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached or refused a call.
    #[error("etcd {what}: {source}")]
    Etcd {
        /// Which call.
        what: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
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
    #[error("network {network} is full: all {count} subnets between {min} and {max} are leased (raise SubnetMax or use a larger Network)")]
    NetworkFull {
        /// The cluster network.
        network: Ipv4Net,
        /// How many subnets it has.
        count: u32,
        /// SubnetMin.
        min: Ipv4Addr,
        /// SubnetMax.
        max: Ipv4Addr,
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
    move |source| EtcdError::Etcd { what, source }
}

/// TLS material for etcd, as file paths.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA bundle to verify etcd with.
    pub ca: Option<String>,
    /// Client certificate.
    pub cert: Option<String>,
    /// Client key.
    pub key: Option<String>,
}

/// One lease as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The subnet key.
    pub key: LeaseKey,
    /// The value, or why it did not parse.
    pub attrs: Result<LeaseAttrs, String>,
    /// The attached etcd lease (0 when none).
    pub etcd_lease: i64,
    /// The key's modification revision.
    pub mod_revision: i64,
}

/// A consistent view of all leases at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Leases, whatever their value.
    pub leases: Vec<Listed>,
    /// The store revision the listing is at.
    pub revision: i64,
}

impl Listing {
    /// The leases whose values parse, for the peer map.
    pub fn peers(&self) -> Vec<(LeaseKey, LeaseAttrs)> {
        self.leases.iter().filter_map(|l| l.attrs.clone().ok().map(|a| (l.key, a))).collect()
    }
}

/// A connection to etcd under one prefix.
#[derive(Clone)]
pub struct EtcdLeases {
    /// One client per endpoint: a failed call moves to the next endpoint.
    /// (The library's own balancing waits, up to the request timeout, for a
    /// dead endpoint to come back instead of trying another.)
    clients: Arc<Vec<Client>>,
    current: Arc<AtomicUsize>,
    endpoints: Arc<Vec<String>>,
    prefix: String,
    ttl: i64,
}

impl EtcdLeases {
    /// Connects to `endpoints` (a connection is made lazily; calls fail while etcd is down).
    pub async fn connect(endpoints: &[String], tls: &TlsFiles, prefix: &str, ttl: i64) -> Result<Self, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if tls.ca.is_some() || tls.cert.is_some() {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            let client = Client::connect([endpoint.as_str()], Some(options.clone()))
                .await
                .map_err(etcd(format!("connect to {endpoint}")))?;
            clients.push(client);
        }
        if clients.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        Ok(EtcdLeases {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            endpoints: Arc::new(endpoints),
            prefix: prefix.trim_end_matches('/').to_string(),
            ttl,
        })
    }

    /// The client of the endpoint in use.
    fn client(&self) -> Client {
        self.clients[self.current.load(Relaxed) % self.clients.len()].clone()
    }

    /// Maps a failed call to our error, moving to the next endpoint first.
    fn fail(&self, what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> EtcdError + '_ {
        let what = what.into();
        move |source| {
            self.next_endpoint();
            EtcdError::Etcd { what, source }
        }
    }

    /// Moves to the next endpoint, after a failure on this one.
    fn next_endpoint(&self) {
        if self.clients.len() > 1 {
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
        let resp = self.client().get(path.as_str(), None).await.map_err(self.fail(format!("get {path}")))?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Every lease under `<prefix>/subnets/`.
    pub async fn list(&mut self) -> Result<Listing, EtcdError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.fail(format!("list {prefix}")))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut leases = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let path = String::from_utf8_lossy(kv.key());
            let Some(key) = parse_key(&path, &prefix) else {
                continue;
            };
            let attrs = LeaseAttrs::from_json(kv.value()).map_err(|e| e.to_string());
            leases.push(Listed { key, attrs, etcd_lease: kv.lease(), mod_revision: kv.mod_revision() });
        }
        Ok(Listing { leases, revision })
    }

    /// Takes a subnet for a node at `attrs.public_ip`: its existing lease if it
    /// has one, else `previous` if free, else any free subnet. Never two nodes
    /// on one subnet: every claim is a transaction on the key's version.
    pub async fn claim_subnet(
        &mut self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
    ) -> Result<OwnLease, EtcdError> {
        const ATTEMPTS: u32 = 16;
        let range = SubnetRange::of(config);
        let value = attrs.to_json();
        for attempt in 0..ATTEMPTS {
            let listing = self.list().await?;
            // 1. A lease that already names our address: take it back.
            let mut mine: Vec<&Listed> = listing
                .leases
                .iter()
                .filter(|l| l.attrs.as_ref().is_ok_and(|a| a.public_ip == attrs.public_ip) && range.contains(&l.key.v4))
                .collect();
            mine.sort_by_key(|l| Some(l.key.v4) != previous);
            if let Some(old) = mine.first() {
                if let Some(own) = self.retake(old, &value, attrs).await? {
                    info!(subnet = %own.key, "took back our existing lease");
                    return Ok(own);
                }
                continue;
            }
            let taken: HashSet<Ipv4Net> = listing.leases.iter().map(|l| l.key.v4).collect();
            // 2. The subnet of our subnet file, if still free; 3. any free one.
            let candidate = previous
                .filter(|p| range.contains(p) && !taken.contains(p))
                .or_else(|| range.pick_free(&taken, seed(attrs.public_ip, attempt)));
            let Some(subnet) = candidate else {
                return Err(EtcdError::NetworkFull {
                    network: config.network,
                    count: range.len(),
                    min: config.subnet_min,
                    max: config.subnet_max,
                });
            };
            let key = LeaseKey::v4(subnet);
            if let Some(lease) = self.claim(&key, &value).await? {
                info!(subnet = %key, "claimed new subnet");
                return Ok(OwnLease { key, attrs: attrs.clone(), etcd_lease: lease });
            }
            debug!(subnet = %key, attempt, "lost the race for a subnet; retrying");
        }
        Err(EtcdError::Contended(ATTEMPTS))
    }

    /// Creates `key` if nobody holds it; returns the etcd lease on success.
    async fn claim(&mut self, key: &LeaseKey, value: &str) -> Result<Option<i64>, EtcdError> {
        let lease = self.client().lease_grant(self.ttl, None).await.map_err(self.fail("grant lease"))?.id();
        let path = self.key_path(key);
        let claimed = self.put_if(Compare::version(path.as_str(), CompareOp::Equal, 0), &path, value, lease).await?;
        if claimed {
            Ok(Some(lease))
        } else {
            let _ = self.client().lease_revoke(lease).await;
            Ok(None)
        }
    }

    /// Re-attaches to our old key, rewriting the value (new MAC) or the etcd
    /// lease (expired, or none) if needed, but only if nobody changed it since
    /// we listed it.
    async fn retake(&mut self, old: &Listed, value: &str, attrs: &LeaseAttrs) -> Result<Option<OwnLease>, EtcdError> {
        let lease_alive = old.etcd_lease != 0 && self.ttl_left(old.etcd_lease).await? > 0;
        let same_value = old.attrs.as_ref().is_ok_and(|a| a == attrs);
        if lease_alive && same_value {
            return Ok(Some(OwnLease { key: old.key, attrs: attrs.clone(), etcd_lease: old.etcd_lease }));
        }
        let lease = if lease_alive {
            old.etcd_lease
        } else {
            self.client().lease_grant(self.ttl, None).await.map_err(self.fail("grant lease"))?.id()
        };
        let path = self.key_path(&old.key);
        let unchanged = Compare::mod_revision(path.as_str(), CompareOp::Equal, old.mod_revision);
        let updated = self.put_if(unchanged, &path, value, lease).await?;
        if !updated && !lease_alive {
            // The lease we just granted holds nothing: do not leave it for a day.
            let _ = self.client().lease_revoke(lease).await;
        }
        Ok(updated.then(|| OwnLease { key: old.key, attrs: attrs.clone(), etcd_lease: lease }))
    }

    /// Puts `value` at `path`, attached to `lease`, only if `guard` holds.
    async fn put_if(&mut self, guard: Compare, path: &str, value: &str, lease: i64) -> Result<bool, EtcdError> {
        let txn =
            Txn::new().when([guard]).and_then([TxnOp::put(path, value, Some(PutOptions::new().with_lease(lease)))]);
        let resp = self.client().txn(txn).await.map_err(self.fail(format!("transaction on {path}")))?;
        Ok(resp.succeeded())
    }

    /// Seconds left on an etcd lease (0 or less: gone).
    async fn ttl_left(&mut self, lease: i64) -> Result<i64, EtcdError> {
        let resp = self.client().lease_time_to_live(lease, None).await.map_err(self.fail("lease time-to-live"))?;
        Ok(resp.ttl())
    }

    /// Renews our etcd lease; returns the TTL the server granted (0: the lease is gone).
    pub async fn keep_alive(&mut self, lease: i64) -> Result<i64, EtcdError> {
        let (mut keeper, mut stream) = self.client().lease_keep_alive(lease).await.map_err(self.fail("keep-alive"))?;
        keeper.keep_alive().await.map_err(self.fail("keep-alive"))?;
        match stream.message().await.map_err(self.fail("keep-alive"))? {
            Some(resp) => Ok(resp.ttl()),
            None => Ok(0),
        }
    }

    /// Whether our key still exists and still says exactly what we published.
    pub async fn still_ours(&mut self, own: &OwnLease) -> Result<bool, EtcdError> {
        let path = self.key_path(&own.key);
        let resp = self.client().get(path.as_str(), None).await.map_err(self.fail(format!("get {path}")))?;
        Ok(resp.kvs().first().is_some_and(|kv| LeaseAttrs::from_json(kv.value()).is_ok_and(|a| a == own.attrs)))
    }

    /// Lists until it succeeds and sends the listing as a `Snapshot`;
    /// returns the revision to watch from, or None when the daemon is gone.
    async fn relist(&mut self, tx: &EventSender) -> Option<i64> {
        let mut backoff = Backoff::new();
        loop {
            match self.list().await {
                Ok(listing) => {
                    for l in &listing.leases {
                        if let Err(e) = &l.attrs {
                            warn!(lease = %l.key, error = %e, "skipping a peer lease that does not parse");
                        }
                    }
                    tx.send(vec![PeerEvent::Snapshot(listing.peers())]).ok()?;
                    return Some(listing.revision);
                }
                Err(e) => warn!(error = %e, "cannot list leases; retrying"),
            }
            backoff.wait().await;
        }
    }

    /// Lists, then streams peer events from the listing's revision on,
    /// forever: every event of every response; a relist (as a `Snapshot`)
    /// after compaction; reconnects after an outage from the last revision
    /// seen, so no event is lost.
    async fn list_and_watch(mut self, tx: EventSender) {
        let prefix = self.subnets_prefix();
        let Some(mut revision) = self.relist(&tx).await else { return };
        let mut backoff = Duration::from_millis(50);
        loop {
            let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1).with_progress_notify();
            match self.client().watch(prefix.as_str(), Some(options)).await {
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            backoff = Duration::from_millis(50);
                            if resp.compact_revision() > 0 || resp.canceled() {
                                warn!(
                                    compact_revision = resp.compact_revision(),
                                    reason = resp.cancel_reason(),
                                    "watch history lost; relisting"
                                );
                                let Some(listed_at) = self.relist(&tx).await else { return };
                                revision = listed_at;
                                break;
                            }
                            let mut batch = Vec::with_capacity(resp.events().len());
                            for event in resp.events() {
                                let Some(kv) = event.kv() else { continue };
                                revision = revision.max(kv.mod_revision());
                                let path = String::from_utf8_lossy(kv.key());
                                let Some(key) = parse_key(&path, &prefix) else {
                                    warn!(key = %path, "skipping a key under subnets/ that is not a lease key");
                                    continue;
                                };
                                match event.event_type() {
                                    EventType::Put => match LeaseAttrs::from_json(kv.value()) {
                                        Ok(attrs) => batch.push(PeerEvent::Upsert(key, attrs)),
                                        Err(e) => {
                                            warn!(lease = %key, error = %e, "skipping a peer lease that does not parse");
                                            batch.push(PeerEvent::Remove(key));
                                        }
                                    },
                                    EventType::Delete => batch.push(PeerEvent::Remove(key)),
                                }
                            }
                            if resp.events().is_empty() {
                                if let Some(h) = resp.header() {
                                    revision = revision.max(h.revision());
                                }
                            }
                            if !batch.is_empty() && tx.send(batch).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            warn!("etcd closed the watch; resuming");
                            self.next_endpoint();
                            break;
                        }
                        Err(e) => {
                            warn!(error = %e, revision, "etcd watch broke; resuming from the last revision seen");
                            self.next_endpoint();
                            break;
                        }
                    }
                },
                Err(e) => {
                    warn!(error = %e, "cannot watch etcd; retrying");
                    self.next_endpoint();
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

impl LeaseStore for EtcdLeases {
    async fn network_config(&mut self) -> anyhow::Result<NetConfig> {
        let path = format!("{}/config", self.prefix);
        let mut backoff = Backoff::new();
        loop {
            match self.config_text().await {
                Ok(Some(text)) => {
                    return NetConfig::parse(&text)
                        .with_context(|| format!("invalid network config at etcd key {path}"));
                }
                Ok(None) => info!(key = %path, "waiting for the network config: no such key in etcd yet"),
                Err(e) => warn!(endpoints = %self.endpoints.join(","), error = %e, "etcd unreachable; retrying"),
            }
            backoff.wait().await;
        }
    }

    async fn public_ip(&mut self, detected: Ipv4Addr) -> anyhow::Result<Ipv4Addr> {
        Ok(detected)
    }

    async fn acquire(
        &mut self,
        config: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
    ) -> anyhow::Result<OwnLease> {
        let mut backoff = Backoff::new();
        loop {
            match self.claim_subnet(config, attrs, previous).await {
                Ok(own) => return Ok(own),
                Err(e @ (EtcdError::NetworkFull { .. } | EtcdError::Contended(_))) => return Err(e.into()),
                Err(e) => warn!(error = %e, "cannot lease a subnet yet; retrying"),
            }
            backoff.wait().await;
        }
    }

    fn watch(self, tx: EventSender) -> impl Future<Output = ()> + Send + 'static {
        self.list_and_watch(tx)
    }

    fn renew_interval(&self) -> Duration {
        Duration::from_secs((self.ttl / 3).clamp(1, 3600) as u64)
    }

    async fn renew(&mut self, own: &OwnLease) -> Renewal {
        match self.keep_alive(own.etcd_lease).await {
            Ok(ttl) if ttl > 0 => match self.still_ours(own).await {
                Ok(true) => Renewal::Held,
                Ok(false) => Renewal::Lost("our lease key is gone or names another node".into()),
                Err(e) => {
                    // The keep-alive worked: the lease is alive, whatever this says.
                    warn!(error = %e, "cannot check our lease key");
                    Renewal::Held
                }
            },
            Ok(_) => Renewal::Lost("our etcd lease expired".into()),
            Err(e) => Renewal::Failed(e.to_string()),
        }
    }

    async fn announce_ready(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

fn read(path: &str) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile { path: path.into(), source })
}

fn parse_key(path: &str, prefix: &str) -> Option<LeaseKey> {
    path.strip_prefix(prefix)?.parse().ok()
}

/// Where in the range a node starts looking, so simultaneous joiners spread out.
fn seed(ip: Ipv4Addr, attempt: u32) -> u64 {
    u64::from(u32::from(ip)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(attempt).wrapping_mul(7919)
}
