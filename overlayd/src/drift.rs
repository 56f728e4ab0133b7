//! The kernel's news (rtnetlink and nftables events) as reconcile triggers.
//! Each event is held against what was last applied: our own writes match
//! it and start nothing. A drift waits a moment for the rest of its burst (a
//! deleted device takes its routes, neighbours and FDB entries with it), so
//! a burst is one repair; a device's or a table's news is judged by its
//! latest state once the burst is over (a device we just made reports
//! itself down, then up). A lost event (the socket overflowed, or the
//! daemon fell behind) means anything may have changed: the whole node is
//! read back.
//!
//! The events come over a bounded channel: a burst the daemon cannot keep
//! up with fills the kernel's socket buffer, which the kernel reports as an
//! overflow, instead of growing the daemon's heap.

use overlay_netlink::{KernelEvent, KernelEvents};
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tracing::{info, warn};

use prometheus_client::metrics::counter::Counter;

use crate::backoff::Throttle;
use crate::memory::{release_freed_memory, TRIM_AFTER};
use crate::node_state::Resource;

/// How long a drift waits for the rest of its burst.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How many events may wait for the daemon before the reader waits (and the kernel's buffer fills).
const CHANNEL: usize = 4096;
/// How often an overflow that goes on is said again.
const SAY_OVERFLOW_EVERY: Duration = Duration::from_secs(60);

/// Follows the kernel's events (rtnetlink, its socket buffer `buffer`
/// bytes, and nftables) on tasks of their own. Without them, the periodic
/// resync still repairs drift, only later.
pub fn watch_kernel(buffer: usize) -> mpsc::Receiver<KernelEvent> {
    let (tx, rx) = mpsc::channel(CHANNEL);
    for (what, events) in [("rtnetlink", KernelEvents::route(buffer)), ("nftables", KernelEvents::nftables())] {
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
                            if tx.send(event).await.is_err() {
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

/// What a burst of events came to, once it was over.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// The resource that drifted, and the event that showed it.
    pub drifted: Option<(Resource, KernelEvent)>,
    /// The underlay changed (an address, its MTU, a default route).
    pub underlay: bool,
    /// Events were lost: the whole node must be read back.
    pub overflow: bool,
}

/// The drift found since the last reconcile, waiting for its burst to end.
pub struct Drift {
    repair_at: Option<Instant>,
    /// The first event that showed drift.
    drifted: Option<(Resource, KernelEvent)>,
    underlay: bool,
    overflow: bool,
    /// Events judged by their subject's latest state: a link's, a table's.
    settling: Vec<KernelEvent>,
    checked: usize,
    /// Overflows since start, and how often they are said.
    overflows: Counter,
    say_overflow: Throttle,
}

impl Drift {
    /// Nothing drifted yet; overflows are counted on `overflows`.
    pub fn new(overflows: Counter) -> Self {
        Drift {
            repair_at: None,
            drifted: None,
            underlay: false,
            overflow: false,
            settling: Vec::new(),
            checked: 0,
            overflows,
            say_overflow: Throttle::new(SAY_OVERFLOW_EVERY),
        }
    }

    /// Starts anew after a reconcile: events that arrive from now on are held
    /// against what it applied (its own writes match).
    pub fn reset(&mut self) {
        self.repair_at = None;
        self.drifted = None;
        self.underlay = false;
        self.overflow = false;
        self.settling.clear();
    }

    /// Takes one event: `judge` says which resource it shows to have drifted
    /// from what was applied; `underlay`, whether it is news of the underlay;
    /// `idle`, whether no more events wait.
    pub fn take(
        &mut self,
        event: KernelEvent,
        judge: impl Fn(&KernelEvent) -> Option<Resource>,
        underlay: bool,
        idle: bool,
    ) {
        if event == KernelEvent::Overflow {
            self.overflowed();
        }
        if underlay {
            self.underlay = true;
            self.due_soon();
        }
        let resource = judge(&event);
        if settles(&event) {
            match (self.settling.iter().position(|e| same_subject(e, &event)), resource) {
                (Some(at), _) => self.settling[at] = event,
                (None, Some(_)) => {
                    self.settling.push(event);
                    self.due_soon();
                }
                (None, None) => {}
            }
        } else if let Some(resource) = resource {
            if self.drifted.is_none() {
                self.drifted = Some((resource, event));
                self.due_soon();
            }
        }
        // A big apply queues as many events as it wrote entries, all its own:
        // once they are checked, their buffers go back to the kernel.
        self.checked += 1;
        if self.checked >= TRIM_AFTER && idle {
            release_freed_memory();
            self.checked = 0;
        }
    }

    fn overflowed(&mut self) {
        self.overflow = true;
        self.overflows.inc();
        self.due_soon();
        if self.say_overflow.ready() {
            warn!(overflows = self.overflows.get(), "the kernel dropped events the daemon could not read in time; reading the whole node back (said once a minute while it goes on)");
        }
    }

    fn due_soon(&mut self) {
        self.repair_at.get_or_insert(Instant::now() + DEBOUNCE);
    }

    /// When the burst is over: never while nothing drifted. Cancel-safe.
    pub async fn due(&self) {
        match self.repair_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// What the burst came to; `judge` holds the settled events against what was applied now.
    pub fn settle(&mut self, judge: impl Fn(&KernelEvent) -> Option<Resource>) -> Settled {
        // A device or table that drifted is the cause of the entries' drift
        // that came with it (a deleted device takes its entries).
        let settled = self.settling.drain(..).find_map(|e| Some((judge(&e)?, e)));
        let result = Settled {
            drifted: settled.or(self.drifted.take()),
            underlay: std::mem::take(&mut self.underlay),
            overflow: std::mem::take(&mut self.overflow),
        };
        self.repair_at = None;
        if result.overflow {
            info!("reading the whole node back after lost kernel events");
        }
        result
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Family;

    fn link(up: bool) -> KernelEvent {
        KernelEvent::Link { index: 7, name: "overlay.1".into(), up, mtu: Some(1450), mac: None, gone: false }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_repair_judged_by_its_latest_state_and_an_overflow_reads_the_node() {
        let overflows = Counter::default();
        let mut drift = Drift::new(overflows.clone());
        // A device that reports itself down, then up: right at the end, so no repair.
        let down_is_wrong =
            |e: &KernelEvent| matches!(e, KernelEvent::Link { up: false, .. }).then_some(Resource::Device(Family::V4));
        drift.take(link(false), down_is_wrong, false, true);
        drift.take(link(true), down_is_wrong, false, true);
        drift.due().await;
        assert_eq!(drift.settle(down_is_wrong), Settled::default());
        // Lost events: the node is read back, and the overflow counted.
        drift.take(KernelEvent::Overflow, |_| None, false, true);
        drift.due().await;
        let settled = drift.settle(|_| None);
        assert!(settled.overflow && settled.drifted.is_none());
        assert_eq!(overflows.get(), 1);
        // Nothing due after a reset.
        drift.take(link(false), down_is_wrong, true, true);
        drift.reset();
        assert!(tokio::time::timeout(Duration::from_secs(1), drift.due()).await.is_err());
    }
}
