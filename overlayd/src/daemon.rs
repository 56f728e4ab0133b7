//! The daemon: start-up in a safe order (nothing touches the node until the
//! config is valid and a subnet is ours), then one loop over a few streams
//! (the store's watch, the kernel's news, the lease keeper, the resync
//! timer), each of which becomes a trigger for the one reconcile: plan the
//! node purely, then make the kernel hold the plan.

use std::sync::Arc;

use anyhow::{Context, Result};
use overlay_netlink::{KernelEvent, Netlink};
use proto::{Family, NetConfig};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::dataplane::{device, offload, subnet_file};
use crate::drift::{self, Drift};
use crate::flags::{NodeArgs, RunArgs};
use crate::health;
use crate::instance_lock::{self, InstanceLock};
use crate::kubernetes::KubeContext;
use crate::lease::etcd::EtcdLeases;
use crate::lease::keeper::Keeper;
use crate::lease::kube::KubeLeases;
use crate::lease::{LeaseStore, OwnLease, WatchEvent};
use crate::node_plan::{self, NodeFacts};
use crate::node_state::{Cause, NodeState, Resource};
use crate::peers::{PeerView, Update};
use crate::reconcile::{Action, Reconciler, Trigger};
use crate::vtep::{self, UnderlayFinder, Vteps};

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
        let context = KubeContext::new(&args.kube).await?;
        let store = KubeLeases::connect(&context, &args.kube).await?;
        if args.kube.network_policy {
            crate::policy::start(&context, state.clone(), args.kube.log_policy_drops)?;
        }
        start(store, args.node, nl, state).await?.main_loop().await
    } else {
        let store = EtcdLeases::connect(&args.etcd).await?;
        start(store, args.node, nl, state).await?.main_loop().await
    }
}

/// The daemon's loop and what it knows.
struct Daemon<S> {
    node: NodeArgs,
    /// The store: the keeper holds it for our lease; its watch feeds `peers`.
    store: S,
    keeper: Keeper,
    config: NetConfig,
    own: OwnLease,
    vteps: Vteps,
    finder: UnderlayFinder,
    /// The VXLAN device of each family (IPv4, IPv6): ours, or flanneld's adopted.
    device_names: [String; 2],
    /// TX checksum offload of the devices, decided once from the setting and the kernel.
    tx_checksum_offload: bool,
    peers: PeerView,
    reconciler: Reconciler,
    drift: Drift,
    state: Arc<NodeState>,
    /// Whether the node was ready after the last reconcile.
    was_ready: bool,
}

/// Start-up, in a safe order: the config, the underlay, our devices and
/// addresses, our lease. Nothing on the node is changed before the lease is ours.
async fn start<S: LeaseStore + Clone>(
    mut store: S,
    mut node: NodeArgs,
    nl: Netlink,
    state: Arc<NodeState>,
) -> Result<Daemon<S>> {
    let config = store.network_config().await?;
    for family in config.families() {
        if let Some(pool) = config.pool(family) {
            info!(%family, network = %pool.network, subnet_len = pool.subnet_len, vni = config.backend.vni, "network config");
        }
    }
    state.set_families(&config.families().collect::<Vec<Family>>());
    let finder = UnderlayFinder::new(nl.clone(), &node, &config)?;
    let underlay = finder.find().await.context("choosing the underlay interface")?;
    let public = store.public_ips(vtep::detected(&node, &underlay)).await?;
    info!(iface = %underlay.name, v4 = underlay.v4.map(display), v6 = underlay.v6.map(display), public_ip = public.v4.map(display), public_ipv6 = public.v6.map(display), mtu = underlay.mtu, "underlay");
    let vni = config.backend.vni;
    let kept = vtep::existing_devices(&nl, &mut node, vni).await?;
    let device_names = [
        device::name(node.device.as_deref(), Family::V4, vni),
        device::name(node.device_v6.as_deref(), Family::V6, vni),
    ];
    let machine = vtep::machine_id().await;
    let (macs, attrs) = vtep::lease_attrs(&config, public, kept, &machine);
    let previous = subnet_file::previous_subnets(&node.subnet_file);
    let own = store.acquire(&config, &attrs, previous).await?;
    state.set_lease_held(true);
    state.metrics.renewed_now();
    if let Some(previous) = previous.filter(|p| *p != own.key) {
        warn!(%previous, now = %own.key, "this node's subnet changed: pods started before keep addresses outside it until restarted");
    }
    start_fast_path(&node, &nl, &config, &device_names, &state).await?;
    let reconciler = Reconciler::new(nl, node.subnet_file.clone(), node.resync_interval, state.clone())?;
    let release = offload::kernel_release();
    let tx_checksum_offload = node.vxlan_tx_checksum_offload.wanted(&release);
    info!(kernel = %release, setting = node.vxlan_tx_checksum_offload.name(), on = tx_checksum_offload, "VXLAN TX checksum offload");
    state.metrics.tx_checksum_offload.set(i64::from(tx_checksum_offload));
    Ok(Daemon {
        keeper: Keeper::start(store.clone(), config.clone(), own.clone(), state.clone()),
        store,
        peers: PeerView::new(&config, &own),
        node,
        config,
        own,
        vteps: Vteps { underlay, public, macs, machine },
        finder,
        device_names,
        tx_checksum_offload,
        reconciler,
        drift: Drift::new(state.metrics.kernel_event_overflows.clone()),
        state,
        was_ready: false,
    })
}

/// With `--fast-path`: loads its programs (an error here stops the daemon:
/// the operator asked for it) and keeps them in place on a task of their
/// own. Without: removes the marking table a run with it left.
async fn start_fast_path(
    node: &NodeArgs,
    nl: &Netlink,
    config: &NetConfig,
    device_names: &[String; 2],
    state: &Arc<NodeState>,
) -> Result<()> {
    use crate::dataplane::fast_path::{self, FastPath};
    if !node.fast_path {
        if fast_path::table_exists().await.unwrap_or(false) {
            fast_path::remove_table().await?;
            info!("fast path off: removed its marking table");
        }
        return Ok(());
    }
    let programs = FastPath::load().context("--fast-path")?;
    // The cluster network, not our subnet: a new lease moves the gateway within it.
    let networks: Vec<ipnet::IpNet> = config.families().filter_map(|f| config.pool(f)).map(|p| p.network).collect();
    info!(networks = ?networks, "fast path on");
    tokio::spawn(fast_path::keep(
        programs,
        nl.clone(),
        networks,
        device_names.to_vec(),
        node.resync_interval,
        node.kernel_event_buffer,
        state.clone(),
    ));
    Ok(())
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
        let mut shutdown = Shutdown::install()?;
        let (tx, mut leases) = mpsc::channel(crate::list_watch::CHANNEL);
        tokio::spawn(self.store.clone().watch(tx));
        tokio::spawn(self.store.clone().watch_config());
        let mut kernel = drift::watch_kernel(self.node.kernel_event_buffer);
        // The first reconcile waits for the store's first listing: planning
        // from an empty peer set would delete every peer's entries.
        while !self.peers.listed() {
            tokio::select! {
                Some(batch) = leases.recv() => { self.on_leases(batch, &mut leases).await; }
                // Nothing is applied yet, so nothing can have drifted.
                Some(_) = kernel.recv() => {}
                own = self.keeper.next() => { self.on_own(own?); }
                _ = shutdown.requested() => return self.exit(),
            }
        }
        crate::memory::release_freed_memory();
        let (mut trigger, mut requeue_at) = (Trigger::Start, Instant::now());
        loop {
            if let Some(at) = self.reconcile(&mut trigger).await {
                requeue_at = at;
            }
            self.drift.reset();
            trigger = loop {
                tokio::select! {
                    Some(batch) = leases.recv() => if let Some(t) = self.on_leases(batch, &mut leases).await { break t },
                    Some(event) = kernel.recv() => self.on_kernel(event, kernel.is_empty()),
                    _ = self.drift.due() => if let Some(t) = self.on_drift().await { break t },
                    own = self.keeper.next() => break self.on_own(own?),
                    _ = tokio::time::sleep_until(requeue_at) => break Trigger::Requeue,
                    _ = shutdown.requested() => return self.exit(),
                }
            };
        }
    }

    /// Plans the node, makes the kernel hold the plan, and says how that
    /// went; gives when to reconcile again (none: when something changes).
    /// A plan of changes the reconcile cannot apply one by one is made again, whole.
    async fn reconcile(&mut self, trigger: &mut Trigger) -> Option<Instant> {
        loop {
            // Every plan takes the peers' changes, so the next one starts from it.
            let changes = self.peers.take_changes();
            let peers_only = (*trigger == Trigger::Peers).then_some(&changes);
            let plan = node_plan::plan(&self.facts(), &self.peers, peers_only);
            let action = self.reconciler.reconcile(plan, *trigger).await;
            self.say_readiness().await;
            match action {
                Action::Requeue(after) => return Some(Instant::now() + after),
                Action::AwaitChange => return None,
                Action::Replan => *trigger = Trigger::Replan,
            }
        }
    }

    /// What the node knows of itself, for the planner.
    fn facts(&self) -> NodeFacts<'_> {
        NodeFacts {
            config: &self.config,
            underlay: &self.vteps.underlay,
            own: &self.own,
            vtep_macs: self.vteps.macs,
            device_names: &self.device_names,
            ip_masq: self.node.ip_masq,
            tx_checksum_offload: self.tx_checksum_offload,
        }
    }

    /// Folds a batch of watch events, and everything already queued behind
    /// it, into the peer view; the reconcile that calls for, if any.
    async fn on_leases(&mut self, batch: Vec<WatchEvent>, rx: &mut mpsc::Receiver<Vec<WatchEvent>>) -> Option<Trigger> {
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
            Update::Unchanged => None,
            Update::Changed => Some(Trigger::Peers),
            Update::Lost(lost) => {
                self.keeper.lost(lost).await;
                None
            }
        }
    }

    /// Our lease changed: claimed again, or published with new addresses.
    fn on_own(&mut self, own: OwnLease) -> Trigger {
        self.own = own;
        self.peers.set_own(&self.own);
        self.publish_status();
        Trigger::Lease
    }

    /// Takes one kernel event: held against what was applied, and against the underlay.
    fn on_kernel(&mut self, event: KernelEvent, idle: bool) {
        let underlay = vtep::touches(&self.vteps.underlay, &event);
        self.drift.take(event, |e| self.reconciler.drift(e), underlay, idle);
    }

    /// A burst of kernel events is over: what it calls for, if anything.
    async fn on_drift(&mut self) -> Option<Trigger> {
        let settled = self.drift.settle(|e| self.reconciler.drift(e));
        if let Some((resource, event)) = &settled.drifted {
            self.drifted(*resource, event);
        }
        let moved = settled.underlay && self.underlay_changed().await;
        match settled {
            _ if settled.overflow => Some(Trigger::Resync),
            _ if settled.drifted.is_some() || moved => Some(Trigger::Kernel),
            // A read that finds drift here says so: in a flood of route events via the
            // underlay, the event of a peer's deleted route may be the one lost.
            _ if settled.underlay => Some(Trigger::Recheck),
            _ => None,
        }
    }

    /// Finds the underlay again after news of it. A new address means new
    /// public addresses (unless pinned by a flag or the store) and VTEP
    /// MACs: the keeper publishes them, and the next reconcile rebuilds the
    /// devices on the new addresses. Whether the underlay changed at all.
    async fn underlay_changed(&mut self) -> bool {
        let Some(found) = self.finder.again(&self.vteps.underlay).await else { return false };
        let moved = self.vteps.follow(found, &self.node, &self.config);
        if moved.reconnect {
            // Connections from the old address are dead: new ones now, not after a timeout.
            self.keeper.reconnect().await;
        }
        if let Some(attrs) = moved.publish {
            self.own.attrs = attrs.clone();
            self.peers.set_own(&self.own);
            self.publish_status();
            self.keeper.publish(attrs).await;
        }
        true
    }

    /// Says when the node becomes ready (with what it holds) and when it
    /// stops being ready (with why): a restart with nothing to change still
    /// says it is up. A ready node is announced to the store.
    async fn say_readiness(&mut self) {
        let ready = self.state.dataplane_ready();
        if ready {
            self.keeper.ready().await;
        }
        if ready == self.was_ready {
            return;
        }
        self.was_ready = ready;
        if ready {
            let entries = self.reconciler.entry_count();
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
        let vteps = self
            .config
            .families()
            .filter_map(|family| {
                let public = match family {
                    Family::V4 => self.vteps.public.v4.map(std::net::IpAddr::V4),
                    Family::V6 => self.vteps.public.v6.map(std::net::IpAddr::V6),
                };
                Some(crate::status::Vtep {
                    family: family.to_string(),
                    device: self.device_names[family as usize].clone(),
                    mac: self.vteps.macs[family as usize].to_string(),
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

    fn exit(&self) -> Result<()> {
        info!("exiting; the device, the routes and the lease stay in place for the next start");
        Ok(())
    }
}
