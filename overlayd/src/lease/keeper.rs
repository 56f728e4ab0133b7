//! Our own lease, kept: renewed on the store's timer, read back at each
//! renewal, claimed again when it is lost, published again when our
//! addresses change, and announced (Kubernetes: `NetworkUnavailable=False`)
//! once the node is ready. It runs as a task of its own, so a slow store
//! never holds up the daemon's loop; the daemon tells it what it saw (the
//! watch showed our lease lost, the underlay moved, the node is ready) and
//! hears back only one thing: "our lease is now this".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use proto::{LeaseAttrs, NetConfig};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{check_own, LeaseLost, LeaseStore, LostKind, OwnLease, Renewal};
use crate::backoff::{Backoff, Throttle};
use crate::node_state::NodeState;

/// Retry delay after a failed lease renewal (the regular period is minutes to hours).
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// Bound on a call that announces readiness: it must not stall the keeper.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a failure that goes on is said again.
const SAY_FAILURES_EVERY: Duration = Duration::from_secs(60);

/// What the daemon tells the keeper.
#[derive(Debug)]
enum Command {
    /// The watch showed our lease gone or rewritten.
    Lost(LeaseLost),
    /// Our addresses changed: publish these attributes in our lease.
    Publish(LeaseAttrs),
    /// The node is ready (if it was not announced yet, announce it).
    Ready,
    /// The underlay moved: connections made from the old address are dead.
    Reconnect,
}

/// The daemon's handle on the keeper task.
pub struct Keeper {
    commands: mpsc::Sender<Command>,
    news: mpsc::Receiver<Result<OwnLease>>,
}

impl Keeper {
    /// Starts keeping `own`, just claimed from `store`.
    pub fn start<S: LeaseStore + Clone>(store: S, config: NetConfig, own: OwnLease, state: Arc<NodeState>) -> Self {
        let (commands, commands_rx) = mpsc::channel(16);
        let (news_tx, news) = mpsc::channel(4);
        let task = Task {
            store: Some(store),
            config,
            own,
            state,
            commands: commands_rx,
            news: news_tx,
            announced: false,
            claim: None,
            republish: None,
            failures: Throttle::new(SAY_FAILURES_EVERY),
        };
        // The store's calls need not be Send (they run on the daemon's one
        // thread): the task is local to it, beside the daemon's loop.
        tokio::task::spawn_local(task.run());
        Keeper { commands, news }
    }

    /// The watch showed our lease lost: it is claimed again (or written back).
    pub async fn lost(&self, lost: LeaseLost) {
        self.send(Command::Lost(lost)).await;
    }

    /// Our addresses changed: `attrs` are published in our lease, under the same subnet.
    pub async fn publish(&self, attrs: LeaseAttrs) {
        self.send(Command::Publish(attrs)).await;
    }

    /// The node is ready: announced to the store, once per renewal.
    pub async fn ready(&self) {
        self.send(Command::Ready).await;
    }

    /// The underlay moved: the store connects anew.
    pub async fn reconnect(&self) {
        self.send(Command::Reconnect).await;
    }

    async fn send(&self, command: Command) {
        // The task ends only with the process (or a fatal claim, which `next` reports).
        let _ = self.commands.send(command).await;
    }

    /// The lease we hold now, each time it changes: claimed again, or
    /// published with new attributes; an error when it cannot be claimed at
    /// all (the network is full). Cancel-safe.
    pub async fn next(&mut self) -> Result<OwnLease> {
        match self.news.recv().await {
            Some(news) => news,
            None => std::future::pending().await,
        }
    }
}

/// A claim of our lease under way; it gives the store back.
type Claim<S> = Pin<Box<dyn Future<Output = (S, Result<OwnLease>)>>>;

struct Task<S> {
    /// The store; lent to a claim while one runs.
    store: Option<S>,
    config: NetConfig,
    own: OwnLease,
    state: Arc<NodeState>,
    commands: mpsc::Receiver<Command>,
    news: mpsc::Sender<Result<OwnLease>>,
    /// Whether the store has been told, since the last renewal, that this node's network is up.
    announced: bool,
    claim: Option<Claim<S>>,
    /// Attributes to publish once the claim under way is done (the underlay moved meanwhile).
    republish: Option<LeaseAttrs>,
    /// Paces the lines about failed renewals that the store's outage does not say.
    failures: Throttle,
}

impl<S: LeaseStore + Clone> Task<S> {
    async fn run(mut self) {
        let Some(store) = self.store.as_ref() else { return };
        let mut renew = tokio::time::interval(store.renew_interval());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.on(command).await,
                    None => return,
                },
                (store, result) = claiming(&mut self.claim) => {
                    if !self.claimed(store, result).await {
                        return;
                    }
                }
                _ = renew.tick(), if self.claim.is_none() => self.renew(&mut renew).await,
            }
        }
    }

    async fn on(&mut self, command: Command) {
        match command {
            Command::Lost(lost) => {
                if self.claim.is_some() {
                    return;
                }
                if let Some(store) = &self.store {
                    store.say_lost(&lost, &self.own);
                }
                self.start_claim(lost.kind == LostKind::Rewritten);
            }
            Command::Publish(attrs) => {
                self.announced = false;
                if self.claim.is_some() {
                    self.republish = Some(attrs);
                } else {
                    self.own.attrs = attrs;
                    // Written over our key, retried while the store cannot be reached: a new
                    // address is no reason to give up the subnet.
                    self.start_claim(true);
                }
            }
            Command::Ready => self.announce().await,
            Command::Reconnect => {
                if let Some(store) = &mut self.store {
                    store.reconnect().await;
                }
            }
        }
    }

    /// Publishes our lease again beside the daemon's loop: first by writing it
    /// over our key (`restore_first`; retried while the store is unreachable),
    /// and where the store cannot do that, or the key went, by claiming it.
    fn start_claim(&mut self, restore_first: bool) {
        let Some(mut store) = self.store.take() else { return };
        if !restore_first {
            self.state.set_lease_held(false);
        }
        let (config, own) = (self.config.clone(), self.own.clone());
        self.claim = Some(Box::pin(async move {
            if restore_first {
                let mut backoff = Backoff::new();
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

    /// A claim ended: the lease it took is ours (and the daemon hears it).
    /// False when it could not be claimed at all: the daemon exits.
    async fn claimed(&mut self, store: S, result: Result<OwnLease>) -> bool {
        self.claim = None;
        self.store = Some(store);
        let own = match result {
            Ok(own) => own,
            Err(e) => {
                let _ = self.news.send(Err(e)).await;
                return false;
            }
        };
        if own.key != self.own.key {
            error!(old = %self.own.key, new = %own.key, "SUBNET CHANGED: pods on this node must be restarted to get addresses in the new subnet");
        } else {
            info!(subnet = %own.key, "our lease is ours again");
        }
        self.own = own;
        self.announced = false;
        self.state.set_lease_held(true);
        self.state.metrics.renewed_now();
        // What we publish changed while the claim ran: publish the new attributes too.
        if let Some(attrs) = self.republish.take() {
            self.own.attrs = attrs;
            self.start_claim(true);
        }
        self.news.send(Ok(self.own.clone())).await.is_ok()
    }

    /// Renews our lease and reads it back: lost, it is claimed again.
    async fn renew(&mut self, timer: &mut tokio::time::Interval) {
        let Some(store) = self.store.as_mut() else { return };
        match store.renew(&self.own).await {
            Renewal::Seen(seen) => match check_own(&self.own, seen.as_ref()) {
                Ok(()) => {
                    if let Some(outage) = store.outage() {
                        outage.recovered();
                    }
                    self.failures = Throttle::new(SAY_FAILURES_EVERY);
                    self.state.metrics.renewed_now();
                    // Re-assert readiness too: something else may have reset it.
                    self.announced = false;
                    self.announce().await;
                }
                Err(lost) => {
                    store.say_lost(&lost, &self.own);
                    self.start_claim(lost.kind == LostKind::Rewritten);
                }
            },
            Renewal::Failed(e) => {
                self.state.metrics.renewal_errors.inc();
                match store.outage() {
                    // An outage the store's other calls meet too: said once for all of them.
                    Some(outage) if !super::is_refusal(&e) => outage.failed(&format!("renewing our lease: {e:#}")),
                    _ if self.failures.ready() => {
                        warn!(error = format!("{e:#}"), retry_in_s = RENEW_RETRY.as_secs(), "lease renewal failed")
                    }
                    _ => {}
                }
                timer.reset_after(RENEW_RETRY);
            }
        }
    }

    /// Tells the store the network is up, once per renewal period, when the node is ready.
    async fn announce(&mut self) {
        if self.announced || !self.state.dataplane_ready() {
            return;
        }
        let Some(store) = self.store.as_mut() else { return };
        match tokio::time::timeout(ANNOUNCE_TIMEOUT, store.announce_ready()).await {
            Ok(Ok(())) => self.announced = true,
            Ok(Err(e)) => warn!(error = format!("{e:#}"), "cannot announce that the network is up; retrying"),
            Err(_) => warn!("announcing that the network is up timed out; retrying"),
        }
    }
}

/// The outcome of a claim under way; never, when none is.
async fn claiming<S>(pending: &mut Option<Claim<S>>) -> (S, Result<OwnLease>) {
    match pending {
        Some(claim) => claim.await,
        None => std::future::pending().await,
    }
}
