//! The daemon: start-up in a safe order (nothing touches the kernel until the
//! config is valid and a subnet is ours), then one loop where every trigger
//! ends in the same reconcile.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use proto::{LeaseAttrs, LeaseKey, MacAddr, NetConfig, SubnetEnv, VxlanBackendData};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::dataplane::{self, underlay, vxlan, DeviceSpec, Netlink, Underlay};
use crate::flags::RunArgs;
use crate::health::{self, Metrics};
use crate::lease::etcd::{EtcdError, EtcdLeases, TlsFiles};
use crate::lease::{OwnLease, PeerEvent};
use crate::masq;
use crate::plan::{self, KernelState, Local, Peer};
use crate::subnet_file;

/// Retry pacing while etcd is unreachable or the config absent: the first
/// retry is quick because, with several endpoints, the client may simply have
/// picked a dead one; then it backs off to a few seconds.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Backoff(Self::FIRST)
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::MAX);
    }
}
/// Retry delay after a failed lease renewal (the regular period is hours).
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// Retry delay after a failed reconcile, shorter than a resync period.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// A reconcile this large leaves megabytes of freed buffers behind.
const TRIM_AFTER_OPS: usize = 256;

/// Hands freed heap back to the kernel. A big reconcile or listing peaks at a
/// few MiB of transient buffers that glibc would otherwise keep for good.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory of glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

struct Daemon {
    args: RunArgs,
    nl: Netlink,
    store: EtcdLeases,
    config: NetConfig,
    underlay: Underlay,
    own: OwnLease,
    vtep_mac: MacAddr,
    peers: BTreeMap<LeaseKey, Peer>,
    metrics: Arc<Metrics>,
    /// What the kernel holds after the last fully successful apply: lets a
    /// watch event cost O(change) instead of a dump of every entry. The
    /// resync timer always reads the kernel, so drift is still found.
    assumed: Option<(u32, KernelState)>,
}

/// Where a reconcile takes the kernel's current state from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Dump it from the kernel.
    Kernel,
    /// Trust the last successful apply, if there is one.
    Assume,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = args.health_addr {
        health::serve(addr, metrics.clone()).await.with_context(|| format!("serving health endpoints on {addr}"))?;
    }
    let mut nl = Netlink::open().context("opening netlink socket")?;
    let underlay = underlay::find(&mut nl, args.iface.as_deref()).context("choosing the underlay interface")?;
    let public_ip = args.public_ip.unwrap_or(underlay.addr.addr());
    info!(iface = %underlay.name, local = %underlay.addr, %public_ip, mtu = underlay.mtu, "underlay");

    let tls =
        TlsFiles { ca: args.etcd_cafile.clone(), cert: args.etcd_certfile.clone(), key: args.etcd_keyfile.clone() };
    let ttl = args.subnet_lease_ttl.as_secs().max(5) as i64;
    let mut store = EtcdLeases::connect(&args.etcd_endpoints, &tls, &args.etcd_prefix, ttl).await?;
    let config = wait_for_config(&mut store, &args).await?;
    info!(network = %config.network, subnet_len = config.subnet_len, vni = config.backend.vni, "network config");

    let mac = vtep_mac(public_ip, config.backend.vni);
    let attrs = LeaseAttrs::vxlan(public_ip, VxlanBackendData { vni: config.backend.vni, vtep_mac: mac });
    let previous = subnet_file::previous_subnet(&args.subnet_file);
    let own = acquire(&mut store, &config, &attrs, previous).await?;
    metrics.lease_held.store(true, Relaxed);
    metrics.renewed_now();
    if previous.is_some_and(|p| p != own.key.v4) {
        warn!(previous = ?previous, now = %own.key, "this node's subnet changed: pods started before keep addresses outside it until restarted");
    }

    let mut daemon = Daemon {
        args,
        nl,
        store,
        config,
        underlay,
        own,
        vtep_mac: mac,
        peers: BTreeMap::new(),
        metrics,
        assumed: None,
    };
    daemon.main_loop().await
}

async fn wait_for_config(store: &mut EtcdLeases, args: &RunArgs) -> Result<NetConfig> {
    let path = format!("{}/config", args.etcd_prefix.trim_end_matches('/'));
    let mut backoff = Backoff::new();
    loop {
        match store.config_text().await {
            Ok(Some(text)) => {
                return NetConfig::parse(&text).with_context(|| format!("invalid network config at etcd key {path}"));
            }
            Ok(None) => {
                info!(key = %path, "waiting for the network config: no such key in etcd yet")
            }
            Err(e) => {
                warn!(endpoints = %args.etcd_endpoints.join(","), error = %e, "etcd unreachable; retrying")
            }
        }
        backoff.wait().await;
    }
}

async fn acquire(
    store: &mut EtcdLeases,
    config: &NetConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Net>,
) -> Result<OwnLease> {
    let mut backoff = Backoff::new();
    loop {
        match store.acquire(config, attrs, previous).await {
            Ok(own) => return Ok(own),
            Err(e @ (EtcdError::NetworkFull { .. } | EtcdError::Contended(_))) => bail!(e),
            Err(e) => warn!(error = %e, "cannot lease a subnet yet; retrying"),
        }
        backoff.wait().await;
    }
}

/// A stable VTEP MAC: derived from the machine and its public address, so a
/// restart (or a reboot) keeps the entries peers hold for us valid.
fn vtep_mac(public_ip: std::net::Ipv4Addr, vni: u32) -> MacAddr {
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let seed = format!("overlay|{}|{public_ip}|{vni}", machine.trim());
    MacAddr::from_seed(seed.as_bytes())
}

impl Daemon {
    async fn main_loop(&mut self) -> Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let listing = self.list_peers().await?;
        tokio::spawn(self.store.clone().watch(listing, tx));

        dataplane::enable_ip_forward().context("setting net.ipv4.ip_forward=1")?;
        self.assert_masquerade();
        let mut retry_soon = !self.reconcile(Read::Kernel);

        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut resync = tokio::time::interval(self.args.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut renew = tokio::time::interval(self.store.renew_interval());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            let retry = async {
                if retry_soon {
                    tokio::time::sleep(RETRY_AFTER_ERROR).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                Some(batch) = rx.recv() => {
                    let mut lost = self.apply_events(batch);
                    // Take everything already queued: one reconcile for the lot.
                    while let Ok(more) = rx.try_recv() {
                        lost |= self.apply_events(more);
                    }
                    if lost {
                        self.reacquire("our lease key was deleted or taken over").await?;
                    }
                    retry_soon = !self.reconcile(Read::Assume);
                }
                _ = resync.tick() => {
                    self.assert_masquerade();
                    retry_soon = !self.reconcile(Read::Kernel);
                }
                _ = retry => retry_soon = !self.reconcile(Read::Kernel),
                _ = renew.tick() => {
                    if !self.renew().await? {
                        renew.reset_after(RENEW_RETRY);
                    }
                    retry_soon = !self.reconcile(Read::Assume);
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        info!("exiting; the device, the routes and the lease stay in place for the next start");
        Ok(())
    }

    /// Lists the leases and fills the peer map; returns the revision to watch from.
    async fn list_peers(&mut self) -> Result<i64> {
        let mut backoff = Backoff::new();
        loop {
            match self.store.list().await {
                Ok(listing) => {
                    for l in &listing.leases {
                        if let Err(e) = &l.attrs {
                            warn!(lease = %l.key, error = %e, "skipping a peer lease that does not parse");
                        }
                    }
                    self.apply_events(vec![PeerEvent::Snapshot(listing.peers())]);
                    let revision = listing.revision;
                    drop(listing);
                    release_freed_memory();
                    return Ok(revision);
                }
                Err(e) => warn!(error = %e, "cannot list leases; retrying"),
            }
            backoff.wait().await;
        }
    }

    /// Applies events to the peer map; true when one of them says we lost our own lease.
    fn apply_events(&mut self, events: Vec<PeerEvent>) -> bool {
        let mut lost = false;
        for event in events {
            self.metrics.watch_events.fetch_add(1, Relaxed);
            match event {
                PeerEvent::Upsert(key, attrs) => lost |= self.upsert(key, &attrs),
                PeerEvent::Remove(key) if key == self.own.key => lost = true,
                PeerEvent::Remove(key) => {
                    self.peers.remove(&key);
                }
                PeerEvent::Snapshot(all) => {
                    self.peers.clear();
                    lost |= !all.iter().any(|(k, a)| *k == self.own.key && a.public_ip == self.own.attrs.public_ip);
                    for (key, attrs) in &all {
                        if *key != self.own.key {
                            self.upsert(*key, attrs);
                        }
                    }
                }
            }
        }
        self.metrics.leases.store(self.peers.len() as u64 + 1, Relaxed);
        lost
    }

    /// Records a written lease; true when it is our key, now naming another node.
    fn upsert(&mut self, key: LeaseKey, attrs: &LeaseAttrs) -> bool {
        if key == self.own.key {
            return attrs.public_ip != self.own.attrs.public_ip;
        }
        match attrs.vxlan_data() {
            Ok(data) => {
                self.peers.insert(key, Peer { subnet: key.v4, public_ip: attrs.public_ip, vtep_mac: data.vtep_mac });
            }
            Err(e) => {
                warn!(lease = %key, error = %e, "skipping peer lease");
                self.peers.remove(&key);
            }
        }
        false
    }

    fn local(&self) -> Local {
        Local {
            subnet: self.own.key.v4,
            underlay: self.underlay.addr,
            direct_routing: self.config.backend.direct_routing,
        }
    }

    fn device_spec(&self) -> DeviceSpec {
        DeviceSpec {
            name: self.args.device.clone(),
            vni: self.config.backend.vni,
            port: self.config.backend.port,
            gbp: self.config.backend.gbp,
            local: self.underlay.addr.addr(),
            underlay_index: self.underlay.index,
            mtu: self.config.vxlan_mtu(self.underlay.mtu),
            mac: self.vtep_mac,
            address: Ipv4Net::new(self.own.key.v4.network(), 32).unwrap_or(self.own.key.v4),
        }
    }

    /// plan → read → diff → apply; then the subnet file. Returns success.
    fn reconcile(&mut self, read: Read) -> bool {
        let started = Instant::now();
        let spec = self.device_spec();
        let assumed = if read == Read::Assume { self.assumed.take() } else { None };
        self.assumed = None;
        let full_path = assumed.is_none();
        let result = (|| -> Result<(usize, usize, u32, KernelState)> {
            let desired = plan::plan(&self.local(), self.peers.values());
            let (index, actual) = match assumed {
                // The last apply succeeded in full: the kernel holds what it planned.
                Some((index, state)) => (index, state),
                None => {
                    let (index, created) = vxlan::ensure(&mut self.nl, &spec)?;
                    if created {
                        info!(device = %spec.name, peers = self.peers.len(), "device (re)created; programming every peer");
                    }
                    (index, dataplane::read(&mut self.nl, index).context("reading overlay entries")?)
                }
            };
            let ops = plan::diff(&desired, &actual);
            let report = dataplane::apply(&mut self.nl, index, &ops).context("applying overlay entries")?;
            Ok((report.sent, report.failed.len(), index, desired))
        })();
        self.metrics.resyncs.fetch_add(1, Relaxed);
        self.metrics.last_resync_micros.store(started.elapsed().as_micros() as u64, Relaxed);
        let ok = match result {
            Ok((sent, failed, index, desired)) => {
                if failed == 0 {
                    self.assumed = Some((index, desired));
                }
                self.metrics.netlink_ops.fetch_add(sent as u64, Relaxed);
                self.metrics.netlink_errors.fetch_add(failed as u64, Relaxed);
                if sent >= TRIM_AFTER_OPS {
                    release_freed_memory();
                }
                if sent > 0 {
                    info!(
                        ops = sent,
                        failed,
                        peers = self.peers.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "dataplane updated"
                    );
                }
                self.metrics.peers.store(self.peers.len() as u64, Relaxed);
                self.metrics.dataplane_ready.store(true, Relaxed);
                failed == 0
            }
            Err(e) => {
                self.metrics.netlink_errors.fetch_add(1, Relaxed);
                self.metrics.dataplane_ready.store(false, Relaxed);
                error!(error = format!("{e:#}"), "reconcile failed; retrying");
                return false;
            }
        };
        // The subnet file changes only with the lease or the MTU, both of
        // which force the full path; an event batch need not re-read it.
        if full_path {
            return self.write_subnet_file(spec.mtu) && ok;
        }
        ok
    }

    fn write_subnet_file(&self, mtu: u32) -> bool {
        let env = SubnetEnv::for_lease(self.config.network, self.own.key.v4, mtu, self.args.ip_masq);
        match subnet_file::write(&self.args.subnet_file, &env) {
            Ok(changed) => {
                if changed {
                    info!(path = %self.args.subnet_file.display(), subnet = %env.subnet, mtu, "wrote subnet file");
                }
                self.metrics.subnet_file_written.store(true, Relaxed);
                true
            }
            Err(e) => {
                error!(path = %self.args.subnet_file.display(), error = %e, "cannot write subnet file");
                false
            }
        }
    }

    fn assert_masquerade(&self) {
        let result =
            if self.args.ip_masq { masq::assert_rules(self.config.network, self.own.key.v4) } else { masq::remove() };
        if let Err(e) = result {
            error!(error = %e, "cannot set masquerade rules");
        }
    }

    /// Renews our etcd lease; false when it could not be renewed and should be retried soon.
    async fn renew(&mut self) -> Result<bool> {
        match self.store.renew(self.own.etcd_lease).await {
            Ok(ttl) if ttl > 0 => {
                self.metrics.renewed_now();
                match self.store.still_ours(&self.own).await {
                    Ok(true) => Ok(true),
                    Ok(false) => self.reacquire("our lease key is gone or names another node").await.map(|_| true),
                    Err(e) => {
                        warn!(error = %e, "cannot check our lease key");
                        Ok(true)
                    }
                }
            }
            Ok(_) => self.reacquire("our etcd lease expired").await.map(|_| true),
            Err(e) => {
                self.metrics.renewal_errors.fetch_add(1, Relaxed);
                warn!(error = %e, retry_in_s = RENEW_RETRY.as_secs(), "lease renewal failed");
                Ok(false)
            }
        }
    }

    /// Takes a subnet again after losing ours: the same one if still free.
    async fn reacquire(&mut self, why: &str) -> Result<()> {
        error!(subnet = %self.own.key, why, "LEASE LOST: re-claiming a subnet");
        self.metrics.lease_held.store(false, Relaxed);
        let own = acquire(&mut self.store, &self.config, &self.own.attrs, Some(self.own.key.v4)).await?;
        if own.key != self.own.key {
            error!(old = %self.own.key, new = %own.key, "SUBNET CHANGED: pods on this node must be restarted to get addresses in the new subnet");
        } else {
            info!(subnet = %own.key, "re-claimed the same subnet");
        }
        self.peers.remove(&own.key);
        self.own = own;
        // The device address may change with the subnet: take the full path.
        self.assumed = None;
        self.metrics.lease_held.store(true, Relaxed);
        self.metrics.renewed_now();
        self.assert_masquerade();
        Ok(())
    }
}

/// `overlayd cleanup`: removes the device, our nftables table and the subnet file.
pub fn cleanup(args: &RunArgs) -> Result<()> {
    let mut nl = Netlink::open().context("opening netlink socket")?;
    if vxlan::remove(&mut nl, &args.device)? {
        info!(device = %args.device, "removed VXLAN device and with it every peer entry");
    }
    let mut routes_left = 0;
    // Direct routes live on the underlay, not on the device: remove them too.
    let state = dataplane::read(&mut nl, u32::MAX).context("reading overlay routes")?;
    let ops: Vec<_> = state.routes.iter().map(|(n, v)| plan::Op::DelRoute(*n, *v)).collect();
    if !ops.is_empty() {
        routes_left = dataplane::apply(&mut nl, 0, &ops)?.failed.len();
    }
    masq::remove().context("removing masquerade rules")?;
    match std::fs::remove_file(&args.subnet_file) {
        Ok(()) => info!(path = %args.subnet_file.display(), "removed subnet file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", args.subnet_file.display())),
    }
    if routes_left > 0 {
        bail!("{routes_left} overlay routes could not be removed");
    }
    Ok(())
}
