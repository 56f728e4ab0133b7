//! NetworkPolicy and ClusterNetworkPolicy enforcement (Kubernetes mode): the watches fill a
//! [`compile::ClusterView`]; after each burst of changes the pure compiler
//! plans the ruleset, which is compared with what the kernel holds and
//! applied in one nftables transaction when it differs. The same
//! read → diff → apply runs on a timer, so a deleted or flushed table is
//! restored.
//!
//! It runs on a thread of its own, with its own runtime and API client:
//! compiling thousands of policies is CPU work that must never delay the
//! dataplane's reconcile.
//!
//! Nothing is applied until every watch has listed once: a
//! restarted daemon leaves the previous table enforcing until the new one
//! replaces it, never an empty one in between.

pub mod cluster_policy;
pub mod compile;
mod drop_log;
pub mod explain;
pub mod selector;
pub mod table;
mod watch;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::time::sleep_until;
use tracing::{info, warn};

use self::compile::{ClusterView, Direction, NodeInfo, Problem, Ruleset};
use self::selector::Labels;
use self::watch::Change;
use crate::kubernetes::KubeContext;
use crate::node_state::NodeState;
use crate::outage::Outage;
use crate::reflector::{Folded, Store, WatchEvent};

/// How long a change waits for the rest of its burst before the ruleset is
/// compiled: a Deployment's rollout or a relabel of a namespace is one apply.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often the kernel's table is read back (drift, drop counters).
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How soon a failed apply is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Every this many checks (5 min), every set is written anew.
const REWRITE_EVERY: u32 = 60;

/// Starts enforcement on its own thread; it runs for the life of the process.
pub fn start(context: &KubeContext, state: Arc<NodeState>, log_drops: bool) -> anyhow::Result<()> {
    // Before the lease watch starts (the daemon starts it after this), so its first listing is kept.
    context.nodes.keep();
    let context = context.clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("policy".into()).spawn(move || {
        runtime.block_on(async move {
            // A client of its own, on this thread's runtime: the policy's API
            // traffic and compiling never wait on the dataplane's thread, nor it on them.
            let client = match context.client() {
                Ok(c) => c,
                Err(e) => {
                    warn!("NetworkPolicy is not enforced: {e:#}");
                    return;
                }
            };
            run(client, context.node, state, context.outage, context.nodes, log_drops).await
        })
    })?;
    info!("enforcing NetworkPolicy (table inet {})", table::TABLE);
    warn_without_br_netfilter();
    Ok(())
}

/// Traffic between two pods of one node is bridged, and the forward hook
/// sees it only through br_netfilter (docs/architecture.md).
fn warn_without_br_netfilter() {
    if !std::path::Path::new("/proc/sys/net/bridge").exists() {
        warn!(
            "br_netfilter is not loaded: NetworkPolicy is enforced between nodes, but not between two pods \
             of this node (load it with `modprobe br_netfilter`; kube-proxy needs it too)"
        );
    }
}

/// What made a sync run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncCause {
    /// Changes from the API.
    Change,
    /// The periodic check.
    Timer,
    /// An nftables event on our table.
    Kernel,
}

struct Controller {
    node: String,
    view: ClusterView,
    /// When the first change not yet in the kernel arrived.
    pending_since: Option<Instant>,
    /// Label keys and values, node and port names, held once.
    interner: selector::Interner,
    /// Problems already logged: each is said once, when it appears.
    said: BTreeSet<Problem>,
    /// Drop counters as last read from the kernel.
    drops: [u64; 2],
    /// `--log-policy-drops`: every dropped flow is logged (the table logs them to NFLOG).
    log_drops: bool,
    drop_log: drop_log::DropLog,
    /// Pods by address, for naming dropped flows (made when needed, until the view changes).
    pods_by_ip: Option<std::collections::HashMap<std::net::IpAddr, compile::Key>>,
    /// Rulesets compiled for `explain`, by node, for the current view.
    explained: std::collections::HashMap<String, compile::Compiled>,
    /// The rules of the ruleset the kernel was last made to hold, for their counters.
    counted: Option<Counted>,
    /// The last ruleset compiled, for the timer's check when nothing changed.
    compiled: Option<compile::Compiled>,
    /// Timer checks made (for the periodic rewrite of every set).
    checks: u32,
    /// The last apply failed: the next one trusts nothing in the table.
    failed: bool,
    /// How long the last sync took, and when it ended.
    last_sync: Duration,
    last_sync_end: Instant,
    state: Arc<NodeState>,
}

/// Folds one watch's events into its store, each value mapped to what the
/// compiler keeps; whether anything changed (a listing counts: it may have).
fn fold<K: Ord + Clone, V, W: PartialEq>(
    store: &mut Store<K, W>,
    events: Vec<WatchEvent<K, V>>,
    mut keep: impl FnMut(&K, V) -> W,
) -> bool {
    let mut changed = false;
    for event in events {
        changed |= !matches!(store.apply(event.map(&mut keep)), Folded::Nothing);
    }
    changed
}

/// The packets the table logs, read over NFLOG; none (said) when the group cannot be bound.
async fn read_drops() -> Option<overlay_netlink::PacketLog> {
    match overlay_netlink::PacketLog::bind(table::LOG_GROUP).await {
        Ok(log) => {
            info!("logging the flows policy drops (NFLOG group {})", table::LOG_GROUP);
            Some(log)
        }
        Err(e) => {
            warn!("cannot read dropped packets: {e}; drops are counted, not logged");
            None
        }
    }
}

async fn run(
    client: kube::Client,
    node: String,
    state: Arc<NodeState>,
    outage: Arc<Outage>,
    nodes: crate::kubernetes::NodeDirectory,
    log_drops: bool,
) {
    let changes = watch::watch_all(client, outage, nodes);
    // Dropped packets, when they are to be logged: from the start with the
    // flag, else from the first ruleset an annotated namespace makes log.
    let mut dropped = match log_drops {
        true => read_drops().await,
        false => None,
    };
    let mut read_tried = log_drops;
    tokio::pin!(changes);
    let (explain_tx, mut questions) = tokio::sync::mpsc::channel(16);
    let _ = state.explainer.set(explain_tx);
    let mut c = Controller {
        node,
        view: ClusterView::default(),
        pending_since: None,
        interner: selector::Interner::default(),
        said: BTreeSet::new(),
        drops: [0; 2],
        log_drops,
        drop_log: drop_log::DropLog::default(),
        pods_by_ip: None,
        explained: std::collections::HashMap::new(),
        counted: None,
        compiled: None,
        checks: 0,
        failed: false,
        last_sync: Duration::ZERO,
        last_sync_end: Instant::now(),
        state,
    };
    let mut next_check = Instant::now() + CHECK_EVERY;
    // nftables events: a change to our table by someone else is repaired
    // within DEBOUNCE, not at the next timer check. Our own transactions
    // show up too; their check finds the table right and does nothing.
    let mut nft_events = match overlay_netlink::KernelEvents::nftables() {
        Ok(events) => Some(events),
        Err(e) => {
            warn!(error = %e, "cannot follow nftables events: the NetworkPolicy table is checked every {}s only", CHECK_EVERY.as_secs());
            None
        }
    };
    loop {
        if !read_tried && c.compiled.as_ref().is_some_and(|c| c.ruleset.log_drops != compile::DropLogging::Off) {
            read_tried = true;
            dropped = read_drops().await;
        }
        tokio::select! {
            batch = async { nft_events.as_mut()?.next().await.ok() }, if nft_events.is_some() => {
                let Some(batch) = batch else {
                    nft_events = None;
                    continue;
                };
                // An overflow may have hidden a change to ours.
                let ours = batch.iter().any(|e| match e {
                    overlay_netlink::KernelEvent::Nft { table, .. } => table == table::TABLE,
                    overlay_netlink::KernelEvent::Overflow => true,
                    _ => false,
                });
                if ours {
                    // The rest of the burst (one transaction is many messages).
                    let until = tokio::time::Instant::now() + DEBOUNCE;
                    while tokio::time::timeout_at(until, async { nft_events.as_mut()?.next().await.ok() }).await.is_ok() {}
                    if c.pending_since.is_none() {
                        next_check = c.sync(SyncCause::Kernel).await;
                    }
                }
            }
            change = changes.next() => {
                let Some(change) = change else { return };
                c.take(change);
                // The rest of the burst; while syncs are slow (thousands of
                // policies), longer bursts, so the work stays bounded.
                // An update that comes alone waits only DEBOUNCE.
                let busy = c.last_sync.saturating_sub(c.last_sync_end.elapsed());
                let until = tokio::time::Instant::now() + DEBOUNCE.max(busy);
                loop {
                    tokio::select! {
                        change = changes.next() => match change {
                            Some(change) => c.take(change),
                            None => return,
                        },
                        _ = sleep_until(until) => break,
                    }
                }
                if c.pending_since.is_some() {
                    next_check = c.sync(SyncCause::Change).await;
                }
            }
            Some(question) = questions.recv() => c.answer(question),
            packets = async { dropped.as_mut()?.next().await.ok() }, if dropped.is_some() => match packets {
                Some(packets) => c.say_drops(packets),
                None => {
                    warn!("reading dropped packets failed; drops are counted, no longer logged");
                    dropped = None;
                }
            },
            _ = sleep_until(next_check.into()) => next_check = c.sync(SyncCause::Timer).await,
        }
    }
}

impl Controller {
    /// Folds a batch of one watch into the view; a change (or a listing)
    /// makes a sync due.
    fn take(&mut self, change: Change) {
        let interner = &mut self.interner;
        let changed = match change {
            Change::Pods(events) => {
                fold(&mut self.view.pods, watch::without_host_network(events), |_, pod| pod.info(interner))
            }
            Change::Namespaces(events) => fold(&mut self.view.namespaces, events, |_, ns| ns.info(interner)),
            Change::Policies(events) => fold(&mut self.view.policies, events, |_, spec| spec),
            Change::Nodes(nodes) => {
                let mut events = vec![WatchEvent::Init];
                events.extend(nodes.iter().map(|(name, facts)| {
                    let labels = Labels::from_pairs(facts.labels.iter().map(|(k, v)| (k, v)), interner);
                    WatchEvent::InitApply(name.clone(), NodeInfo { labels, ips: facts.ips.clone() })
                }));
                if nodes.listed() {
                    events.push(WatchEvent::InitDone);
                }
                let before = self.view.nodes.clone();
                for event in events {
                    self.view.nodes.apply(event);
                }
                *before != *self.view.nodes || before.listed() != self.view.nodes.listed()
            }
            Change::ClusterPolicies(events) => fold(&mut self.view.cluster_policies, events, |_, spec| spec),
        };
        if changed {
            self.pending_since.get_or_insert_with(Instant::now);
            self.explained.clear();
            self.pods_by_ip = None;
        }
    }

    /// Answers `overlayd explain` from the view, with each node's ruleset
    /// compiled as that node compiles it (kept until the view changes).
    fn answer(&mut self, question: explain::Request) {
        let answer = if !self.listed() {
            Err("the policy watches have not listed yet".to_string())
        } else {
            // At most a few nodes' rulesets are kept: explaining pods all over a big cluster must not hold one per node.
            if self.explained.len() > 16 {
                self.explained.clear();
            }
            let (view, cache) = (&self.view, &mut self.explained);
            explain::nodes(view, &question.query).and_then(|nodes| {
                for node in nodes {
                    cache.entry(node.clone()).or_insert_with(|| compile::compile(view, &node));
                }
                explain::explain(view, &question.query, |node| cache.get(node))
            })
        };
        let _ = question.reply.send(answer);
    }

    /// Says each flow of `packets` (dropped and logged by the kernel) once a minute.
    fn say_drops(&mut self, packets: Vec<overlay_netlink::LoggedPacket>) {
        let Some(compiled) = &self.compiled else { return };
        let view = &self.view;
        let pods = self.pods_by_ip.get_or_insert_with(|| {
            view.pods.iter().flat_map(|(key, pod)| pod.ips.iter().map(move |ip| (*ip, key.clone()))).collect()
        });
        let now = Instant::now();
        for packet in packets {
            let (Some(direction), Some(flow)) =
                (drop_log::direction(&packet.prefix), drop_log::Flow::parse(&packet.payload))
            else {
                continue;
            };
            if let Some(line) = self.drop_log.line(flow, direction, &compiled.ruleset, |ip| pods.get(&ip).cloned(), now)
            {
                info!(target: "overlayd::policy_drop", "{line}");
            }
        }
    }

    /// Whether every watch has listed once: until then nothing is applied.
    fn listed(&self) -> bool {
        let v = &self.view;
        v.pods.listed()
            && v.namespaces.listed()
            && v.policies.listed()
            && v.nodes.listed()
            && v.cluster_policies.listed()
    }

    /// Compiles, reads the kernel's table, applies when they differ.
    /// Returns when to check again.
    async fn sync(&mut self, trigger: SyncCause) -> Instant {
        if !self.listed() {
            return Instant::now() + CHECK_EVERY;
        }
        let started = Instant::now();
        let compiled = match self.compiled.take() {
            Some(c) if self.pending_since.is_none() => c,
            _ => {
                self.interner.sweep();
                let mut compiled = compile::compile(&self.view, &self.node);
                if self.log_drops {
                    compiled.ruleset.log_drops = compile::DropLogging::All;
                }
                compiled
            }
        };
        let compile_time = started.elapsed();
        for p in &compiled.problems {
            if !self.said.contains(p) {
                warn!("{p}");
            }
        }
        self.said = compiled.problems.iter().cloned().collect();
        let state = self.state.clone();
        let m = &state.metrics.policy;
        m.policies.set(self.view.policies.len() as i64);
        m.policies_in_effect.set(compiled.policies_in_effect as i64);
        m.selected_pods.set(compiled.selected_pods as i64);
        m.problems.set(compiled.problems.len() as i64);
        m.rules.set(compiled.ruleset.rules.len() as i64);
        match self.reconcile(&compiled.ruleset, trigger).await {
            Ok(applied) => {
                if let Some(since) = self.pending_since.take() {
                    m.sync_seconds.observe(since.elapsed().as_secs_f64());
                    m.syncs.inc();
                }
                state.set_policy_synced(true);
                if applied {
                    info!(
                        rules = compiled.ruleset.rules.len(),
                        policies = compiled.policies_in_effect,
                        pods = compiled.selected_pods,
                        compile_ms = compile_time.as_millis() as u64,
                        apply_ms = (started.elapsed() - compile_time).as_millis() as u64,
                        "NetworkPolicy ruleset applied"
                    );
                }
                self.compiled = Some(compiled);
                self.last_sync = started.elapsed();
                self.last_sync_end = Instant::now();
                if applied {
                    // The transaction's JSON is megabytes at thousands of
                    // rules; give it back rather than keep it for the next.
                    // SAFETY: malloc_trim only returns free heap pages to the kernel.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
                Instant::now() + CHECK_EVERY
            }
            Err(e) => {
                m.errors.inc();
                state.set_policy_synced(false);
                warn!("{e}; retrying in {}s", RETRY_AFTER.as_secs());
                Instant::now() + RETRY_AFTER
            }
        }
    }

    /// Makes the table hold `ruleset`; returns whether it was written.
    async fn reconcile(&mut self, ruleset: &Ruleset, trigger: SyncCause) -> Result<bool, crate::nft::NftError> {
        let listed = table::list().await?;
        // Every REWRITE_EVERY-th timer check rewrites every set: a terse
        // listing shows set names, not their elements, so an element deleted
        // by hand would otherwise stay deleted until that set's content changed.
        if trigger == SyncCause::Timer {
            self.checks = self.checks.wrapping_add(1);
        }
        let safety_net = trigger == SyncCause::Timer && self.checks.is_multiple_of(REWRITE_EVERY);
        let timer = trigger != SyncCause::Change;
        // Hashes the whole ruleset: once a check.
        let fingerprint = table::fingerprint(ruleset);
        let holds = listed.as_ref().is_some_and(|l| l.holds(ruleset, &fingerprint));
        if let Some(l) = &listed {
            self.count_drops(l.drops);
            self.count_rules(l);
            // Found holding it (a restarted daemon): its counters are counted from here on.
            if holds && self.counted.as_ref().is_none_or(|c| c.fingerprint != fingerprint) {
                let mut counted =
                    Counted::new(ruleset, fingerprint.clone(), self.counted.take(), &self.state.metrics.policy);
                counted.last = l.rule_packets(&counted.layout);
                self.counted = Some(counted);
            }
        }
        if holds && !safety_net {
            return Ok(false);
        }
        if timer && !holds {
            self.state.metrics.policy.repairs.inc();
            let found_by = if trigger == SyncCause::Kernel { "an nftables event" } else { "the periodic check" };
            warn!("the NetworkPolicy table was changed or removed by someone else ({found_by}); restoring it");
        }
        // After a failure, or when someone else changed the table, nothing in it is trusted.
        let rewrite_all = timer || self.failed;
        let existing = listed.as_ref().map(|l| l.sets.as_slice()).unwrap_or_default();
        self.failed = true;
        let previous = self.counted.take();
        table::apply(ruleset, existing, rewrite_all).await?;
        self.failed = false;
        self.counted = Some(Counted::new(ruleset, fingerprint, previous, &self.state.metrics.policy));
        self.state.metrics.policy.applies.inc();
        Ok(true)
    }

    /// Adds what each rule's kernel counter grew by since the last read to its metric.
    fn count_rules(&mut self, listed: &table::TableState) {
        let Some(counted) = &mut self.counted else { return };
        if listed.fingerprint.as_deref() != Some(counted.fingerprint.as_str()) {
            return;
        }
        let now = listed.rule_packets(&counted.layout);
        for ((labels, last), now) in counted.labels.iter().zip(&mut counted.last).zip(now) {
            let delta = now.checked_sub(*last).unwrap_or(now);
            if delta > 0 {
                self.state.metrics.policy.rule_packets(labels).inc_by(delta);
            }
            *last = now;
        }
    }

    /// Adds what the kernel's counters grew by since the last read (a
    /// table made anew starts again from 0).
    fn count_drops(&mut self, now: [u64; 2]) {
        for (i, direction) in [Direction::Ingress, Direction::Egress].into_iter().enumerate() {
            let delta = now[i].checked_sub(self.drops[i]).unwrap_or(now[i]);
            self.state.metrics.policy.drops(direction.name()).inc_by(delta);
        }
        self.drops = now;
    }
}

/// The rules of a ruleset in the kernel, for their counters: every
/// transaction adds its rules anew, so each starts from 0.
struct Counted {
    fingerprint: String,
    layout: Vec<(&'static str, usize)>,
    labels: Vec<crate::metrics::RuleLabels>,
    /// Each rule's counter as last read.
    last: Vec<u64>,
}

impl Counted {
    /// The rules of `ruleset` (of `fingerprint`), just applied; the counters of rules gone with `previous` are forgotten.
    fn new(
        ruleset: &Ruleset,
        fingerprint: String,
        previous: Option<Counted>,
        metrics: &crate::metrics::PolicyMetrics,
    ) -> Counted {
        let labels: Vec<crate::metrics::RuleLabels> = ruleset
            .rules
            .iter()
            .map(|r| crate::metrics::RuleLabels {
                kind: r.origin.kind.name(),
                namespace: r.origin.namespace.clone(),
                name: r.origin.name.clone(),
                direction: r.direction.name(),
                rule: r.origin.index.to_string(),
                action: match r.action {
                    compile::Action::Accept => "accept",
                    compile::Action::Deny => "deny",
                    compile::Action::Pass => "pass",
                },
            })
            .collect();
        if let Some(previous) = previous {
            let kept: std::collections::HashSet<&crate::metrics::RuleLabels> = labels.iter().collect();
            for gone in previous.labels.iter().filter(|l| !kept.contains(l)) {
                metrics.forget_rule(gone);
            }
        }
        Counted { fingerprint, layout: table::layout(ruleset), last: vec![0; labels.len()], labels }
    }
}

/// `overlayd cleanup`: removes the table.
pub async fn cleanup() -> Result<(), crate::nft::NftError> {
    table::remove().await
}
