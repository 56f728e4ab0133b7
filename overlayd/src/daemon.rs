//! The daemon: start-up in a safe order (nothing touches the node until the
//! config is valid and a subnet is ours), then one loop in which every
//! trigger (a watch event, a requeue, a renewal that found our lease lost)
//! plans the node and hands the plan to the one reconcile.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use overlay_netlink::{KernelEvent, KernelEvents, Netlink};
use proto::{Family, LeaseAttrs, MacAddr, NetConfig, SubnetEnv, VxlanBackendData};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::backoff::Throttle;
use crate::dataplane::masq::Masquerade;
use crate::dataplane::subnet_file;
use crate::dataplane::{device, offload, underlay, DeviceSpec, Underlay};
use crate::flags::{NodeArgs, RunArgs};
use crate::health;
use crate::instance_lock::{self, InstanceLock};
use crate::lease::etcd::EtcdLeases;
use crate::lease::kube::KubeLeases;
use crate::lease::{check_own, LeaseLost, LeaseStore, LostKind, OwnLease, PublicIps, Renewal, WatchEvent};
use crate::node_state::{Cause, NodeState, Resource};
use crate::peers::{PeerLease, PeerView, Pending, Update};
use crate::plan::{self, Local};
use crate::reconcile::{self, Action, EntriesPlan, FamilyPlan, NodePlan, Reconciler, Slot, Trigger};

/// Whether an event is judged by the latest state of its subject, once a
/// burst is over, rather than at once: a link's, a table's.
fn settles(event: &KernelEvent) -> bool {
    matches!(event, KernelEvent::Link { .. } | KernelEvent::Nft { .. })
}

/// Whether two events are news of the same link, or the same table.
fn same_subject(a: &KernelEvent, b: &KernelEvent) -> bool {
    match (a, b) {
        (KernelEvent::Link { index: x, .. }, KernelEvent::Link { index: y, .. }) => x == y,
        (KernelEvent::Nft { family: f, table: t, .. }, KernelEvent::Nft { family: g, table: u, .. }) => {
            f == g && t == u
        }
        _ => false,
    }
}

/// How often a failure that goes on is said again.
const SAY_FAILURES_EVERY: Duration = Duration::from_secs(60);
/// Retry delay after a failed lease renewal (the regular period is hours).
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// How long a drift waits for the rest of its burst (a deleted device takes
/// its routes, neighbours and FDB entries with it): one repair, not many.
const DRIFT_DEBOUNCE: Duration = Duration::from_millis(20);
/// Bound on a call that announces readiness: it must not stall the loop.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    // Before anything touches the node: one daemon per node.
    let _lock = InstanceLock::take(&instance_lock::path_for(&args.node.subnet_file))?;
    let state = Arc::new(NodeState::new(args.kube.kube_subnet_mgr && args.kube.network_policy));
    let store_name = if args.kube.kube_subnet_mgr { "kubernetes" } else { "etcd" };
    state.status.update(|r| {
        r.version = crate::version::LINE.to_string();
        r.store = store_name.to_string();
    });
    if let Some(addr) = args.node.health_addr {
        health::serve(addr, state.clone()).await.with_context(|| format!("serving health endpoints on {addr}"))?;
    }
    let socket = health::socket_path(&args.node.subnet_file);
    health::serve_unix(&socket, state.clone()).with_context(|| format!("serving status on {}", socket.display()))?;
    let nl = Netlink::connect().context("opening netlink socket")?;
    if args.kube.kube_subnet_mgr {
        let store = KubeLeases::connect(&args.kube).await?;
        if args.kube.network_policy {
            let outage = store.outage().context("the Kubernetes store says its outages")?;
            crate::policy::start(&args.kube, state.clone(), outage)?;
        }
        run_with(store, args.node, nl, state).await
    } else {
        let store = EtcdLeases::connect(&args.etcd).await?;
        run_with(store, args.node, nl, state).await
    }
}

/// Kernel events (rtnetlink and nftables), for drift repair without a timer.
/// Without them, the periodic resync still repairs drift, only later.
fn watch_kernel() -> mpsc::UnboundedReceiver<KernelEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (what, events) in [("rtnetlink", KernelEvents::route()), ("nftables", KernelEvents::nftables())] {
        let mut events = match events {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "cannot follow {what} events: drift is repaired at the next resync only");
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.next().await {
                    Ok(batch) => {
                        for event in batch {
                            if tx.send(event).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "reading {what} events failed: drift is repaired at the next resync only");
                        return;
                    }
                }
            }
        });
    }
    rx
}

struct Daemon<S> {
    node: NodeArgs,
    store: S,
    config: NetConfig,
    underlay: Underlay,
    own: OwnLease,
    /// The VTEP MAC of each family's device (IPv4, IPv6).
    vtep_macs: [MacAddr; 2],
    peers: PeerView,
    reconciler: Reconciler,
    state: Arc<NodeState>,
    /// Whether the store has been told, since the last renewal, that this node's network is up.
    announced: bool,
    /// TX checksum offload of the devices, decided once from the setting and the kernel.
    tx_checksum_offload: bool,
    /// A claim of our lease under way, after it was lost.
    reacquiring: Option<Reacquiring<S>>,
    /// The addresses we publish (the underlay's, or pinned by a flag or the store).
    public: PublicIps,
    /// For finding the underlay again when it changes.
    nl: Netlink,
    /// How the underlay is chosen.
    selector: underlay::Selector,
    /// What the underlay must never be.
    not_underlay: underlay::NotUnderlay,
    /// Paces the lines about failed renewals the store's outage does not say.
    renew_failures: Throttle,
    /// Whether the node was ready after the last reconcile.
    was_ready: bool,
}

async fn run_with<S: LeaseStore + Clone>(
    mut store: S,
    mut node: NodeArgs,
    nl: Netlink,
    state: Arc<NodeState>,
) -> Result<()> {
    let config = store.network_config().await?;
    for family in config.families() {
        if let Some(pool) = config.pool(family) {
            info!(%family, network = %pool.network, subnet_len = pool.subnet_len, vni = config.backend.vni, "network config");
        }
    }
    let families: Vec<Family> = config.families().collect();
    state.set_families(&families);
    let selector = node.underlay_selector().map_err(anyhow::Error::msg)?;
    let not_underlay = not_underlay(&node, &config);
    let underlay =
        underlay::find(&nl, &selector, &families, &not_underlay).await.context("choosing the underlay interface")?;
    let public = store.public_ips(detected(&node, &underlay)).await?;
    info!(iface = %underlay.name, v4 = underlay.v4.map(display), v6 = underlay.v6.map(display), public_ip = public.v4.map(display), public_ipv6 = public.v6.map(display), mtu = underlay.mtu, "underlay");
    let kept = existing_devices(&nl, &mut node, config.backend.vni).await?;
    let (vtep_macs, attrs) = lease_attrs(&config, public, kept);
    let previous = subnet_file::previous_subnets(&node.subnet_file);
    let own = store.acquire(&config, &attrs, previous).await?;
    state.set_lease_held(true);
    state.metrics.renewed_now();
    if let Some(previous) = previous.filter(|p| *p != own.key) {
        warn!(%previous, now = %own.key, "this node's subnet changed: pods started before keep addresses outside it until restarted");
    }
    let reconciler = Reconciler::new(nl.clone(), node.subnet_file.clone(), node.resync_interval, state.clone())?;
    let release = offload::kernel_release();
    let tx_checksum_offload = node.vxlan_tx_checksum_offload.wanted(&release);
    info!(kernel = %release, setting = node.vxlan_tx_checksum_offload.name(), on = tx_checksum_offload, "VXLAN TX checksum offload");
    state.metrics.tx_checksum_offload.set(i64::from(tx_checksum_offload));
    let peers = PeerView::new(&config, &own);
    let mut daemon = Daemon {
        node,
        store,
        config,
        underlay,
        own,
        vtep_macs,
        peers,
        reconciler,
        state,
        announced: false,
        tx_checksum_offload,
        reacquiring: None,
        public,
        nl,
        selector,
        not_underlay,
        renew_failures: Throttle::new(SAY_FAILURES_EVERY),
        was_ready: false,
    };
    daemon.main_loop().await
}

/// The overlay's own devices (ours and flanneld's, of either family) and
/// the cluster networks: the underlay is never one of them.
fn not_underlay(node: &NodeArgs, config: &NetConfig) -> underlay::NotUnderlay {
    let vni = config.backend.vni;
    let mut devices = vec![
        device::name(node.device.as_deref(), Family::V4, vni),
        device::name(node.device_v6.as_deref(), Family::V6, vni),
    ];
    devices.extend(Family::ALL.map(|family| device::flannel_name(family, vni)));
    let networks = config.families().filter_map(|f| Some(config.pool(f)?.network)).collect();
    underlay::NotUnderlay { devices, vni, networks }
}

/// An address that followed the underlay (`published == was`) follows it to
/// `is`; one pinned by the store (public-ip-overwrite) stays.
fn follow<T: PartialEq>(published: Option<T>, was: Option<T>, is: Option<T>) -> Option<T> {
    if published == was {
        is
    } else {
        published
    }
}

/// The addresses peers should send to, as this node sees them: the flags, else the underlay's.
fn detected(node: &NodeArgs, underlay: &Underlay) -> PublicIps {
    PublicIps {
        v4: node.public_ip.or(underlay.v4.and_then(|a| v4(a.addr()))),
        v6: node.public_ipv6.or(underlay.v6.and_then(|a| v6(a.addr()))),
    }
}

/// The MAC of each family's device, where it exists already: ours from
/// before a restart, or flanneld's. Without `--device`, when our default
/// device does not exist but flanneld's `flannel.<VNI>` (`flannel-v6.<VNI>`)
/// does, with our VNI, that one is adopted as it is, name and MAC: peers'
/// entries for this node stay right, so flanneld is replaced without a
/// packet lost (README, "Migrating from flannel").
async fn existing_devices(nl: &Netlink, node: &mut NodeArgs, vni: u32) -> Result<[Option<MacAddr>; 2]> {
    let mut kept = [None, None];
    for family in Family::ALL {
        let flag = match family {
            Family::V4 => &mut node.device,
            Family::V6 => &mut node.device_v6,
        };
        let ours = nl.link(&device::name(flag.as_deref(), family, vni)).await?;
        let link = match (ours, flag.is_none()) {
            (Some(link), _) => Some(link),
            (None, true) => {
                let flannels = device::flannel_name(family, vni);
                let theirs = nl.link(&flannels).await?.filter(|l| l.vxlan.as_ref().is_some_and(|v| v.vni == Some(vni)));
                if let Some(link) = &theirs {
                    info!(device = %link.name, mac = link.mac.map(display), %family, "adopting flanneld's device as it is");
                    // Marked, so `overlayd cleanup` knows it is ours to remove now.
                    nl.set_alias(link.index, device::ADOPTED_ALIAS).await?;
                    *flag = Some(link.name.clone());
                }
                theirs
            }
            (None, false) => None,
        };
        kept[family as usize] = link.filter(|l| l.vxlan.is_some()).and_then(|l| l.mac);
    }
    Ok(kept)
}

/// What this node publishes for `public`: each family's VTEP MAC (the one
/// `kept` by its device, else one derived from the machine) and the lease attributes.
fn lease_attrs(config: &NetConfig, public: PublicIps, kept: [Option<MacAddr>; 2]) -> ([MacAddr; 2], LeaseAttrs) {
    let vni = config.backend.vni;
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let vtep_macs = [
        kept[0].unwrap_or_else(|| vtep_mac(&machine, public.v4.map(IpAddr::V4), vni, Family::V4)),
        kept[1].unwrap_or_else(|| vtep_mac(&machine, public.v6.map(IpAddr::V6), vni, Family::V6)),
    ];
    let data = |family| VxlanBackendData { vni, vtep_mac: vtep_macs[family as usize] };
    let attrs = LeaseAttrs::vxlan_families(
        public.v4.filter(|_| config.ipv4.is_some()).map(|ip| (ip, data(Family::V4))),
        public.v6.filter(|_| config.ipv6.is_some()).map(|ip| (ip, data(Family::V6))),
    );
    (vtep_macs, attrs)
}

/// A stable VTEP MAC per family: derived from the machine and its public
/// address of that family, so a restart (or a reboot) keeps the entries
/// peers hold for us valid. (The IPv4 seed is that of the IPv4-only releases.)
fn vtep_mac(machine: &str, public_ip: Option<IpAddr>, vni: u32, family: Family) -> MacAddr {
    let ip = public_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let seed = match family {
        Family::V4 => format!("overlay|{}|{ip}|{vni}", machine.trim()),
        Family::V6 => format!("overlay-v6|{}|{ip}|{vni}", machine.trim()),
    };
    MacAddr::from_seed(seed.as_bytes())
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

fn v6(ip: IpAddr) -> Option<Ipv6Addr> {
    match ip {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    }
}

/// SIGTERM and SIGINT, either of which ends the daemon.
struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    fn install() -> Result<Self> {
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

impl<S: LeaseStore + Clone> Daemon<S> {
    async fn main_loop(&mut self) -> Result<()> {
        self.publish_status();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut shutdown = Shutdown::install()?;
        tokio::spawn(self.store.clone().watch(tx));
        tokio::spawn(self.store.clone().watch_config());
        let mut kernel = watch_kernel();

        // The first reconcile waits for the store's first listing: planning
        // from an empty peer set would delete every peer's entries.
        while !self.peers.listed() {
            tokio::select! {
                Some(batch) = rx.recv() => { self.on_events(batch, &mut rx).await?; }
                // Nothing is applied yet, so nothing can have drifted.
                Some(_) = kernel.recv() => {}
                (store, result) = reacquiring(&mut self.reacquiring) => { self.reacquired(store, result)?; }
                _ = shutdown.requested() => {
                    self.exit();
                    return Ok(());
                }
            }
        }
        reconcile::release_freed_memory();

        let mut renew = tokio::time::interval(self.store.renew_interval());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        let mut trigger = Trigger::Start;
        let mut requeue_at = Instant::now();
        loop {
            let plan = self.plan(trigger);
            if let Action::Requeue(after) = self.reconciler.reconcile(plan, trigger).await {
                requeue_at = Instant::now() + after;
            }
            self.say_readiness();
            self.announce().await;
            // Events that arrived during the reconcile are held against what it applied: its own writes match.
            let mut repair_at: Option<Instant> = None;
            // The first event that showed drift.
            let mut drift: Option<(Resource, KernelEvent)> = None;
            let mut underlay_changed = false;
            // A device's events, and a table's, are judged by the latest
            // state once the burst is over: a device we just made reports
            // itself down, then up; our rewrite of a table reports its
            // deletion, then its additions.
            let mut settling: Vec<KernelEvent> = Vec::new();
            let mut events_checked = 0usize;
            trigger = loop {
                tokio::select! {
                    Some(batch) = rx.recv() => {
                        if let Some(t) = self.on_events(batch, &mut rx).await? { break t }
                    }
                    Some(event) = kernel.recv() => {
                        if self.touches_underlay(&event) {
                            underlay_changed = true;
                            repair_at.get_or_insert(Instant::now() + DRIFT_DEBOUNCE);
                        }
                        let resource = self.reconciler.drift(&event);
                        if settles(&event) {
                            match (settling.iter().position(|e| same_subject(e, &event)), resource) {
                                (Some(at), _) => settling[at] = event,
                                (None, Some(_)) => {
                                    settling.push(event);
                                    repair_at.get_or_insert(Instant::now() + DRIFT_DEBOUNCE);
                                }
                                (None, None) => {}
                            }
                        } else if let Some(resource) = resource {
                            if drift.is_none() {
                                drift = Some((resource, event));
                                repair_at.get_or_insert(Instant::now() + DRIFT_DEBOUNCE);
                            }
                        }
                        // A big apply queues as many events as it wrote entries, all its own:
                        // once they are checked, their buffers go back to the kernel.
                        events_checked += 1;
                        if events_checked >= reconcile::TRIM_AFTER && kernel.is_empty() {
                            reconcile::release_freed_memory();
                            events_checked = 0;
                        }
                    }
                    _ = tokio::time::sleep_until(repair_at.unwrap_or(requeue_at)), if repair_at.is_some() => {
                        // A device or table that drifted is the cause of the
                        // entries' drift that came with it (a deleted device takes its entries).
                        let settled = settling.drain(..).find_map(|e| Some((self.reconciler.drift(&e)?, e)));
                        let drifted = settled.or(drift.take());
                        if let Some((resource, event)) = &drifted {
                            self.drifted(*resource, event);
                        }
                        if underlay_changed {
                            self.check_underlay().await;
                        }
                        if drifted.is_some() || underlay_changed {
                            break Trigger::Kernel;
                        }
                        repair_at = None;
                    }
                    (store, result) = reacquiring(&mut self.reacquiring) => break self.reacquired(store, result)?,
                    _ = tokio::time::sleep_until(requeue_at) => break Trigger::Requeue,
                    _ = renew.tick() => {
                        if let Some(t) = self.renew(&mut renew).await? { break t }
                    }
                    _ = shutdown.requested() => {
                    self.exit();
                    return Ok(());
                }
                }
            };
        }
    }

    /// Says when the node becomes ready (with what it holds) and when it
    /// stops being ready (with why): a restart with nothing to change still
    /// says it is up.
    fn say_readiness(&mut self) {
        let ready = self.state.dataplane_ready();
        if ready == self.was_ready {
            return;
        }
        self.was_ready = ready;
        if ready {
            let entries = self.reconciler.planned::<Ipv4Addr>().map_or(0, |p| p.state.entry_count())
                + self.reconciler.planned::<Ipv6Addr>().map_or(0, |p| p.state.entry_count());
            let skipped = self.peers.skipped().count();
            let peers = self.peers.count() - skipped;
            info!(subnet = %self.own.key, peers, entries, skipped, "ready: {peers} peers, {entries} entries");
        } else {
            warn!("{}", self.state.readiness_detail().trim_end());
        }
    }

    /// Says that the node drifted, and counts the repair by its cause.
    fn drifted(&self, resource: Resource, event: &KernelEvent) {
        info!(resource = resource.name(), ?event, "the node drifted from what was applied; repairing");
        let cause = match resource {
            Resource::Masquerade(_) => Cause::Nftables,
            _ => Cause::Kernel,
        };
        self.state.repaired(cause, resource);
    }

    /// Puts what the daemon holds into the status report: our lease, our
    /// VTEPs, the peers and the leases skipped, and why.
    fn publish_status(&self) {
        let vni = self.config.backend.vni;
        let vteps = self
            .config
            .families()
            .filter_map(|family| {
                let (flag, public) = match family {
                    Family::V4 => (self.node.device.as_deref(), self.public.v4.map(IpAddr::V4)),
                    Family::V6 => (self.node.device_v6.as_deref(), self.public.v6.map(IpAddr::V6)),
                };
                Some(crate::status::Vtep {
                    family: family.to_string(),
                    device: device::name(flag, family, vni),
                    mac: self.vtep_macs[family as usize].to_string(),
                    public_ip: public?.to_string(),
                })
            })
            .collect();
        let skipped: Vec<crate::status::Skipped> = self
            .peers
            .skipped()
            .map(|(key, why)| crate::status::Skipped { lease: key.to_string(), reason: why.to_string() })
            .collect();
        let peers = self.peers.count() - skipped.len();
        let lease = self.state.lease_held().then(|| self.own.key.to_string());
        self.state.status.update(|r| {
            r.lease = lease;
            r.vteps = vteps;
            r.peers = peers;
            r.skipped = skipped;
        });
    }

    fn exit(&self) {
        info!("exiting; the device, the routes and the lease stay in place for the next start");
    }

    /// Folds a batch of watch events, and everything already queued behind
    /// it, into the peer view; says which reconcile that calls for, if any.
    async fn on_events(
        &mut self,
        batch: Vec<WatchEvent>,
        rx: &mut mpsc::UnboundedReceiver<Vec<WatchEvent>>,
    ) -> Result<Option<Trigger>> {
        let mut events = batch;
        while let Ok(more) = rx.try_recv() {
            events.extend(more);
        }
        self.state.metrics.watch_events.inc_by(events.len() as u64);
        self.state.metrics.lease_watch_event_now();
        let update = self.peers.apply(&self.own, events);
        self.state.metrics.leases.set(self.peers.count() as i64 + 1);
        self.state.metrics.peers_skipped.set(self.peers.skipped().count() as i64);
        self.publish_status();
        match update {
            Update::Unchanged => Ok(None),
            Update::Changed => Ok(Some(Trigger::Peers)),
            Update::Lost(lost) => {
                self.reacquire(&lost).await;
                Ok(None)
            }
        }
    }

    /// What the node must hold now: each family planned by the same code.
    /// A watch event's trigger plans the peer entries from the peers that
    /// changed since the last plan; every other trigger plans them whole.
    fn plan(&mut self, trigger: Trigger) -> NodePlan {
        let pending = self.peers.take_changes();
        let changed = match (&pending, trigger) {
            (Pending::Peers(changed), Trigger::Peers) => Some(changed),
            _ => None,
        };
        let subnet_env =
            Family::ALL.iter().filter_map(|f| Some((self.config.pool(*f)?.network, self.own.key.subnet(*f)?))).fold(
                SubnetEnv::new(self.config.pod_mtu(self.underlay.mtu), self.node.ip_masq),
                |env, (network, subnet)| env.with(network, subnet),
            );
        NodePlan {
            v4: self.family_plan::<Ipv4Addr>(
                &device::name(self.node.device.as_deref(), Family::V4, self.config.backend.vni),
                changed,
            ),
            v6: self.family_plan::<Ipv6Addr>(
                &device::name(self.node.device_v6.as_deref(), Family::V6, self.config.backend.vni),
                changed,
            ),
            subnet_env,
        }
    }

    /// What the family of `A` needs: the same plan for both families.
    fn family_plan<A: Slot>(
        &self,
        name: &str,
        changed: Option<&std::collections::BTreeMap<proto::LeaseKey, Option<PeerLease>>>,
    ) -> FamilyPlan<A> {
        let family = A::FAMILY;
        let (Some(pool), Some(subnet), Some(underlay)) =
            (self.config.pool(family), self.own.key.subnet(family), self.underlay.addr(family))
        else {
            return FamilyPlan::off(name.to_string());
        };
        let (Some(own), Some(underlay_net)) = (A::net_from(subnet), A::net_from(underlay)) else {
            return FamilyPlan::off(name.to_string());
        };
        let local = Local { subnet: own, underlay: underlay_net, direct_routing: self.config.backend.direct_routing };
        FamilyPlan {
            device: Some(DeviceSpec {
                family,
                name: name.to_string(),
                vni: self.config.backend.vni,
                port: self.config.backend.port,
                gbp: self.config.backend.gbp,
                local: underlay.addr(),
                underlay_index: self.underlay.index,
                mtu: self.config.vxlan_mtu(family, self.underlay.mtu),
                mac: self.vtep_macs[family as usize],
                tx_checksum_offload: self.tx_checksum_offload,
                address: reconcile::device_address(subnet),
            }),
            device_name: name.to_string(),
            entries: self.entries_plan(&local, changed),
            masquerade: self.node.ip_masq.then_some(Masquerade { network: pool.network, subnet }),
            forwarding: Some(self.underlay.name.clone()),
        }
    }

    /// The peer entries: the delta of the peers that `changed`, when the
    /// node holds the plan it is made against; else every peer's.
    fn entries_plan<A: Slot>(
        &self,
        local: &Local<A>,
        changed: Option<&std::collections::BTreeMap<proto::LeaseKey, Option<PeerLease>>>,
    ) -> EntriesPlan<A> {
        let delta = changed
            .zip(self.reconciler.planned::<A>())
            .and_then(|(changed, planned)| plan::delta(local, planned, self.peers.changes::<A>(changed)));
        match delta {
            Some(delta) => EntriesPlan::Delta(delta),
            None => EntriesPlan::Whole(plan::plan(local, self.peers.peers::<A>())),
        }
    }

    /// Tells the store the network is up, once per renewal period, when the node is right.
    async fn announce(&mut self) {
        if self.announced || !self.state.dataplane_ready() {
            return;
        }
        match tokio::time::timeout(ANNOUNCE_TIMEOUT, self.store.announce_ready()).await {
            Ok(Ok(())) => self.announced = true,
            Ok(Err(e)) => warn!(error = format!("{e:#}"), "cannot announce that the network is up; retrying"),
            Err(_) => warn!("announcing that the network is up timed out; retrying"),
        }
    }

    /// Renews our lease; a reconcile trigger when it had to be claimed again.
    async fn renew(&mut self, timer: &mut tokio::time::Interval) -> Result<Option<Trigger>> {
        if self.reacquiring.is_some() {
            return Ok(None);
        }
        match self.store.renew(&self.own).await {
            Renewal::Seen(seen) => match check_own(&self.own, seen.as_ref()) {
                Ok(()) => {
                    if let Some(outage) = self.store.outage() {
                        outage.recovered();
                    }
                    self.renew_failures = Throttle::new(SAY_FAILURES_EVERY);
                    self.state.metrics.renewed_now();
                    // Re-assert readiness too: something else may have reset it.
                    self.announced = false;
                    self.announce().await;
                    Ok(None)
                }
                Err(lost) => {
                    self.reacquire(&lost).await;
                    Ok(None)
                }
            },
            Renewal::Failed(e) => {
                self.state.metrics.renewal_errors.inc();
                match self.store.outage() {
                    // An outage the store's other calls meet too: said once for all of them.
                    Some(outage) if !crate::lease::kube::is_refusal(&e) => {
                        outage.failed(&format!("renewing our lease: {e:#}"))
                    }
                    _ if self.renew_failures.ready() => {
                        warn!(error = format!("{e:#}"), retry_in_s = RENEW_RETRY.as_secs(), "lease renewal failed")
                    }
                    _ => {}
                }
                timer.reset_after(RENEW_RETRY);
                Ok(None)
            }
        }
    }

    /// Whether `event` is about the underlay: the interface's addresses, MTU
    /// or existence, or a default route (which picks the interface without `--iface`).
    fn touches_underlay(&self, event: &KernelEvent) -> bool {
        match event {
            KernelEvent::Address { index, .. } => *index == self.underlay.index,
            KernelEvent::Route { route, .. } => route.destination.prefix_len() == 0,
            KernelEvent::Link { index, mtu, gone, .. } => {
                *index == self.underlay.index && (*gone || mtu.is_some_and(|m| m != self.underlay.mtu))
            }
            _ => false,
        }
    }

    /// Finds the underlay again after a change of its addresses or MTU. A
    /// new address means new public addresses (unless pinned by a flag or
    /// the store) and VTEP MACs: the lease is published again, and the next
    /// reconcile rebuilds the devices on the new addresses.
    async fn check_underlay(&mut self) {
        let families: Vec<Family> = self.config.families().collect();
        let found = match underlay::find(&self.nl, &self.selector, &families, &self.not_underlay).await {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "the underlay changed and cannot be used as it is; keeping the last one until it can");
                return;
            }
        };
        if found == self.underlay {
            return;
        }
        let (before, now) = (detected(&self.node, &self.underlay), detected(&self.node, &found));
        let public =
            PublicIps { v4: follow(self.public.v4, before.v4, now.v4), v6: follow(self.public.v6, before.v6, now.v6) };
        info!(iface = %found.name, v4 = found.v4.map(display), v6 = found.v6.map(display), mtu = found.mtu, public_ip = public.v4.map(display), public_ipv6 = public.v6.map(display), "the underlay changed");
        let moved = (found.index, found.v4, found.v6) != (self.underlay.index, self.underlay.v4, self.underlay.v6);
        self.underlay = found;
        if moved {
            // Connections from the old address are dead: new ones now, not after a timeout.
            self.store.reconnect().await;
        }
        if public == self.public {
            return;
        }
        let (vtep_macs, attrs) = lease_attrs(&self.config, public, self.vtep_macs.map(Some));
        self.public = public;
        self.vtep_macs = vtep_macs;
        self.own.attrs = attrs;
        self.peers.set_own(&self.own);
        self.announced = false;
        self.publish_status();
        // Written over our key, retried while the store cannot be reached: a new
        // address is no reason to give up the subnet.
        self.claim_in_background(true);
    }

    /// Takes our lease again after losing it: a rewrite is written back where
    /// the store can, else the lease is claimed again. Either runs beside the
    /// loop, so resyncs, drift repairs and peer changes go on, on the old
    /// plan, until it is done ([`reacquired`](Self::reacquired)).
    async fn reacquire(&mut self, lost: &LeaseLost) {
        if self.reacquiring.is_some() {
            return;
        }
        self.store.say_lost(lost, &self.own);
        self.claim_in_background(lost.kind == LostKind::Rewritten);
    }

    /// Publishes `own` again beside the loop: first by writing it over our key
    /// (`restore_first`; retried while the store is unreachable), and where
    /// the store cannot do that, or the key went, by claiming the lease.
    fn claim_in_background(&mut self, restore_first: bool) {
        if self.reacquiring.is_some() {
            return;
        }
        if !restore_first {
            self.state.set_lease_held(false);
        }
        let (mut store, config, own) = (self.store.clone(), self.config.clone(), self.own.clone());
        self.reacquiring = Some(Box::pin(async move {
            if restore_first {
                let mut backoff = crate::backoff::Backoff::new();
                loop {
                    match store.restore(&own).await {
                        Ok(true) => {
                            info!(subnet = %own.key, "wrote our lease back");
                            return (store, Ok(own));
                        }
                        Ok(false) => break,
                        Err(e) => warn!(error = format!("{e:#}"), "cannot write our lease yet; retrying"),
                    }
                    backoff.wait().await;
                }
            }
            let result = store.acquire(&config, &own.attrs, Some(own.key)).await;
            (store, result)
        }));
    }

    /// Installs the lease a reacquire claimed (and the store that claimed it).
    fn reacquired(&mut self, store: S, result: Result<OwnLease>) -> Result<Trigger> {
        self.reacquiring = None;
        self.store = store;
        let own = result?;
        // What we publish may have changed while the claim ran (the underlay
        // moved): the claim published the old attributes, so publish the new ones.
        let republish = (own.attrs != self.own.attrs).then(|| self.own.attrs.clone());
        if own.key != self.own.key {
            error!(old = %self.own.key, new = %own.key, "SUBNET CHANGED: pods on this node must be restarted to get addresses in the new subnet");
        } else {
            info!(subnet = %own.key, "our lease is ours again");
        }
        self.own = own;
        self.announced = false;
        self.state.set_lease_held(true);
        self.state.metrics.renewed_now();
        if let Some(attrs) = republish {
            self.own.attrs = attrs;
            self.claim_in_background(true);
        }
        self.peers.set_own(&self.own);
        self.publish_status();
        Ok(Trigger::Lease)
    }
}

/// The outcome of a reacquire under way; never, when none is.
async fn reacquiring<S>(pending: &mut Option<Reacquiring<S>>) -> (S, Result<OwnLease>) {
    match pending {
        Some(claim) => claim.await,
        None => std::future::pending().await,
    }
}

/// A claim of our lease, running beside the daemon's loop; it gives the store back.
type Reacquiring<S> = std::pin::Pin<Box<dyn std::future::Future<Output = (S, Result<OwnLease>)>>>;
