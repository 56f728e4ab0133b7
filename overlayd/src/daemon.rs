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
use crate::lease::etcd::{EtcdLeases, TlsFiles};
use crate::lease::kube::KubeLeases;
use crate::lease::{LeaseStore, OwnLease, PeerEvent, Renewal};
use crate::masq;
use crate::plan::{self, KernelState, Local, Peer};
use crate::subnet_file;

/// Retry delay after a failed lease renewal (the regular period is hours).
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// Retry delay after a failed reconcile, shorter than a resync period.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// A reconcile this large (operations, or peers read back) leaves megabytes of freed buffers behind.
const TRIM_AFTER_OPS: usize = 256;

/// Hands freed heap back to the kernel. A big reconcile or listing peaks at a
/// few MiB of transient buffers that glibc would otherwise keep for good.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory of glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bound on a call that announces readiness: it must not stall the loop.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);

struct Daemon<S> {
    args: RunArgs,
    nl: Netlink,
    store: S,
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
    /// Whether the store has been told this node's network is up.
    announced: bool,
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

    if args.kube_subnet_mgr {
        let store = KubeLeases::connect(&args).await?;
        run_with(store, args, nl, underlay, metrics).await
    } else {
        let tls =
            TlsFiles { ca: args.etcd_cafile.clone(), cert: args.etcd_certfile.clone(), key: args.etcd_keyfile.clone() };
        let ttl = args.subnet_lease_ttl.as_secs().max(5) as i64;
        let store = EtcdLeases::connect(&args.etcd_endpoints, &tls, &args.etcd_prefix, ttl).await?;
        run_with(store, args, nl, underlay, metrics).await
    }
}

async fn run_with<S: LeaseStore + Clone>(
    mut store: S,
    args: RunArgs,
    nl: Netlink,
    underlay: Underlay,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let config = store.network_config().await?;
    info!(network = %config.network, subnet_len = config.subnet_len, vni = config.backend.vni, "network config");
    let public_ip = store.public_ip(args.public_ip.unwrap_or(underlay.addr.addr())).await?;
    info!(iface = %underlay.name, local = %underlay.addr, %public_ip, mtu = underlay.mtu, "underlay");

    let mac = vtep_mac(public_ip, config.backend.vni);
    let attrs = LeaseAttrs::vxlan(public_ip, VxlanBackendData { vni: config.backend.vni, vtep_mac: mac });
    let previous = subnet_file::previous_subnet(&args.subnet_file);
    let own = store.acquire(&config, &attrs, previous).await?;
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
        announced: false,
    };
    daemon.main_loop().await
}

/// A stable VTEP MAC: derived from the machine and its public address, so a
/// restart (or a reboot) keeps the entries peers hold for us valid.
fn vtep_mac(public_ip: std::net::Ipv4Addr, vni: u32) -> MacAddr {
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let seed = format!("overlay|{}|{public_ip}|{vni}", machine.trim());
    MacAddr::from_seed(seed.as_bytes())
}

impl<S: LeaseStore + Clone> Daemon<S> {
    async fn main_loop(&mut self) -> Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        tokio::spawn(self.store.clone().watch(tx));

        // The first reconcile waits for the store's first listing: planning
        // from an empty peer set would delete every peer's entries.
        let first = tokio::select! {
            Some(batch) = rx.recv() => batch,
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        };
        if self.apply_events(first) {
            self.reacquire("our lease is missing from the store's listing").await?;
        }
        release_freed_memory();

        dataplane::enable_ip_forward().context(
            "setting net.ipv4.ip_forward=1 (in an unprivileged container /proc/sys is read-only: set it on the host)",
        )?;
        self.assert_masquerade();
        let mut retry_soon = !self.reconcile(Read::Kernel);
        self.announce(retry_soon).await;

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
                        self.reacquire("our lease was deleted or taken over").await?;
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
                    // Re-assert readiness too: something else may have reset it.
                    self.announced = false;
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
            self.announce(retry_soon).await;
        }
        info!("exiting; the device, the routes and the lease stay in place for the next start");
        Ok(())
    }

    /// Tells the store the network is up, once the dataplane is programmed.
    async fn announce(&mut self, failing: bool) {
        if self.announced || failing {
            return;
        }
        match tokio::time::timeout(ANNOUNCE_TIMEOUT, self.store.announce_ready()).await {
            Ok(Ok(())) => self.announced = true,
            Ok(Err(e)) => warn!(error = format!("{e:#}"), "cannot announce that the network is up; retrying"),
            Err(_) => warn!("announcing that the network is up timed out; retrying"),
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
                    lost |= !all.iter().any(|(k, a)| *k == self.own.key && *a == self.own.attrs);
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

    /// Records a written lease; true when it is our key and no longer says
    /// what we published (another node took it, or someone rewrote our MAC):
    /// peers would send our pods' traffic to the wrong place.
    fn upsert(&mut self, key: LeaseKey, attrs: &LeaseAttrs) -> bool {
        if key == self.own.key {
            return *attrs != self.own.attrs;
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
                // A big apply, or a dump of a big table (every resync), leaves
                // megabytes of freed buffers behind.
                if sent >= TRIM_AFTER_OPS || (full_path && self.peers.len() >= TRIM_AFTER_OPS) {
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

    /// Renews our lease; false when it could not be renewed and should be retried soon.
    async fn renew(&mut self) -> Result<bool> {
        match self.store.renew(&self.own).await {
            Renewal::Held => {
                self.metrics.renewed_now();
                Ok(true)
            }
            Renewal::Lost(why) => self.reacquire(&why).await.map(|_| true),
            Renewal::Failed(e) => {
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
        let own = self.store.acquire(&self.config, &self.own.attrs, Some(self.own.key.v4)).await?;
        if own.key != self.own.key {
            error!(old = %self.own.key, new = %own.key, "SUBNET CHANGED: pods on this node must be restarted to get addresses in the new subnet");
        } else {
            info!(subnet = %own.key, "re-claimed the same subnet");
        }
        self.peers.remove(&own.key);
        self.own = own;
        // The device address may change with the subnet: take the full path.
        self.assumed = None;
        self.announced = false;
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
