//! One list-then-watch loop for every store the daemon follows (etcd's
//! leases, the API server's Nodes, Pods, Namespaces and NetworkPolicies),
//! as kube-runtime's watcher: an explicit state machine (list, then watch
//! from the listing's version, list again when history is lost), one
//! backoff, and one place that says outages and refusals. A source only
//! says how to list and how to watch ([`ListWatch`]); the events it finds go
//! to the consumer in batches over a bounded channel, so a consumer that
//! falls behind slows the source down instead of growing the heap.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::outage::Outage;
use crate::reflector::WatchEvent;

/// How many events a batch holds before it is sent: a listing of 5,000
/// leases goes as a few batches, not 5,000 sends.
const BATCH: usize = 1024;
/// How many batches may wait for the consumer before a source waits: a
/// watch message is often one event, and the consumer takes all that wait
/// at once, so a burst of 5,000 writes is a few reconciles, not thousands.
pub const CHANNEL: usize = 256;
/// The longest wait between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A batch of a source's events, as the consumer gets it.
pub type Batch<L> = Vec<WatchEvent<<L as ListWatch>::Key, <L as ListWatch>::Value>>;

/// Why a list or a watch stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// History is gone (410 Gone, a compacted etcd revision): list again.
    #[error("the watch's history is gone")]
    Expired,
    /// The store answered, and said no (a 403, an etcd permission error): a
    /// configuration problem, retried all the same, and said as such.
    #[error("{0:#}")]
    Refused(anyhow::Error),
    /// The store could not be reached, or the call broke off.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
}

/// The consumer is gone (the daemon is exiting).
#[derive(Debug)]
pub struct Closed;

/// Where a source puts the events it finds: batched, then sent. It also
/// hears when the source works again, to say that an outage or a refusal is over.
pub struct Sink<K, V> {
    tx: mpsc::Sender<Vec<WatchEvent<K, V>>>,
    events: Vec<WatchEvent<K, V>>,
    outage: Arc<Outage>,
    what: &'static str,
    /// A refusal was said, and not its end.
    refused: bool,
}

impl<K, V> Sink<K, V> {
    /// A sink that sends to `tx`, for a source of `what` whose outages `outage` says.
    pub fn new(tx: mpsc::Sender<Vec<WatchEvent<K, V>>>, outage: Arc<Outage>, what: &'static str) -> Self {
        Sink { tx, events: Vec::new(), outage, what, refused: false }
    }

    /// The store answered a call made at `asked`: a listing came, or a
    /// watch is open. An outage (begun before that call) or a refusal is over.
    pub fn working(&mut self, asked: Instant) {
        self.outage.answered(asked);
        if std::mem::take(&mut self.refused) {
            info!(watch = self.what, "watching {} again", self.what);
        }
    }

    /// Says a failure: an outage through the shared [`Outage`], a refusal once until the store works again.
    fn failed(&mut self, e: &WatchError, hint: &str) {
        let what = self.what;
        match e {
            WatchError::Unreachable(cause) => self.outage.failed(&format!("watching {what}: {cause:#}")),
            WatchError::Refused(cause) if !self.refused => {
                self.refused = true;
                warn!(
                    watch = what,
                    "watching {what} is refused: {cause:#}{hint}; the last state is kept while retrying"
                );
            }
            WatchError::Refused(_) | WatchError::Expired => {}
        }
    }

    /// Adds an event; sends the batch once it is full.
    pub async fn push(&mut self, event: WatchEvent<K, V>) -> Result<(), Closed> {
        self.events.push(event);
        if self.events.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Adds `events` (one watch message's) and sends the batch.
    pub async fn send_all(&mut self, events: impl IntoIterator<Item = WatchEvent<K, V>>) -> Result<(), Closed> {
        for event in events {
            self.push(event).await?;
        }
        self.flush().await
    }

    /// Sends what is batched: the end of a listing, or of one watch message.
    pub async fn flush(&mut self) -> Result<(), Closed> {
        if self.events.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.events);
        self.tx.send(batch).await.map_err(|_| Closed)
    }
}

/// What a source does to stop: the consumer went, or a watch error.
#[derive(Debug)]
pub enum Stop {
    /// The consumer is gone.
    Closed,
    /// The call failed.
    Failed(WatchError),
}

impl From<Closed> for Stop {
    fn from(_: Closed) -> Self {
        Stop::Closed
    }
}

impl From<WatchError> for Stop {
    fn from(e: WatchError) -> Self {
        Stop::Failed(e)
    }
}

/// A store to follow: how to list it, and how to watch it from a version.
pub trait ListWatch: Send + 'static {
    /// An object's key.
    type Key: Send + 'static;
    /// What is kept of an object.
    type Value: Send + 'static;
    /// Where a watch starts: an etcd revision, a resourceVersion.
    type Version: Clone + Debug + Send + 'static;

    /// What is watched, in words, for the log: "nodes", "etcd leases".
    fn what(&self) -> &'static str;

    /// What to do about a refusal, added to the line that says it.
    fn refusal_hint(&self) -> &'static str {
        ""
    }

    /// Lists every object, as `InitApply` events into `sink` (the loop sends
    /// `Init` before and `InitDone` after); returns where the watch starts.
    fn list(
        &mut self,
        sink: &mut Sink<Self::Key, Self::Value>,
    ) -> impl Future<Output = Result<Self::Version, Stop>> + Send;

    /// Watches from `version` until the stream ends, as `Apply` and `Delete`
    /// events into `sink` (flushed after each message; `working` once the
    /// watch is open); returns the version it reached, to watch on from.
    fn watch(
        &mut self,
        version: Self::Version,
        sink: &mut Sink<Self::Key, Self::Value>,
    ) -> impl Future<Output = Result<Self::Version, (Self::Version, Stop)>> + Send;
}

/// Where the loop stands.
#[derive(Debug)]
enum State<V> {
    /// Nothing known, or history lost: list.
    Listing,
    /// Watching on from this version.
    Watching(V),
}

/// Follows `source` forever (until the consumer goes), sending its events to
/// `tx`. An outage is said through `outage` (shared with the store's other
/// calls); a refusal once, until the store answers again.
pub async fn run<L: ListWatch>(
    mut source: L,
    tx: mpsc::Sender<Vec<WatchEvent<L::Key, L::Value>>>,
    outage: Arc<Outage>,
) {
    let what = source.what();
    let mut sink = Sink::new(tx, outage, what);
    let mut state = State::Listing;
    let mut backoff = Backoff::with_max(BACKOFF_MAX);
    loop {
        let (next, result) = match state {
            State::Listing => match list(&mut source, &mut sink, Instant::now()).await {
                Ok((version, asked)) => {
                    sink.working(asked);
                    (State::Watching(version), Ok(()))
                }
                Err(stop) => (State::Listing, Err(stop)),
            },
            State::Watching(version) => match source.watch(version, &mut sink).await {
                // The server ended the watch (its timeout): go on from where it stood.
                Ok(version) => (State::Watching(version), Ok(())),
                Err((_, Stop::Failed(WatchError::Expired))) => {
                    info!(watch = what, "the watch's history is gone; listing again");
                    (State::Listing, Ok(()))
                }
                Err((version, stop)) => (State::Watching(version), Err(stop)),
            },
        };
        state = next;
        match result {
            Ok(()) => backoff.reset(),
            Err(Stop::Closed) => return,
            Err(Stop::Failed(e)) => {
                sink.failed(&e, source.refusal_hint());
                backoff.wait().await;
            }
        }
    }
}

/// One listing: `Init`, the source's `InitApply` events, `InitDone`, sent.
/// Lists `source` into `sink`; its version, and when the list was asked for.
async fn list<L: ListWatch>(
    source: &mut L,
    sink: &mut Sink<L::Key, L::Value>,
    asked: Instant,
) -> Result<(L::Version, Instant), Stop> {
    sink.push(WatchEvent::Init).await?;
    let version = source.list(sink).await?;
    sink.push(WatchEvent::InitDone).await?;
    sink.flush().await?;
    Ok((version, asked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A source that plays a script: each list and watch takes the next step.
    struct Script {
        steps: VecDeque<Step>,
    }

    enum Step {
        List(Result<Vec<(u32, u32)>, &'static str>),
        Watch(Result<Vec<(u32, Option<u32>)>, &'static str>),
    }

    impl ListWatch for Script {
        type Key = u32;
        type Value = u32;
        type Version = u64;

        fn what(&self) -> &'static str {
            "script"
        }

        async fn list(&mut self, sink: &mut Sink<u32, u32>) -> Result<u64, Stop> {
            match self.steps.pop_front() {
                Some(Step::List(Ok(items))) => {
                    for (k, v) in items {
                        sink.push(WatchEvent::InitApply(k, v)).await?;
                    }
                    Ok(1)
                }
                Some(Step::List(Err("refused"))) => Err(WatchError::Refused(anyhow::anyhow!("403")).into()),
                Some(Step::List(Err(_))) => Err(WatchError::Unreachable(anyhow::anyhow!("connect")).into()),
                _ => std::future::pending().await,
            }
        }

        async fn watch(&mut self, version: u64, sink: &mut Sink<u32, u32>) -> Result<u64, (u64, Stop)> {
            match self.steps.pop_front() {
                Some(Step::Watch(Ok(changes))) => {
                    sink.working(Instant::now());
                    for (k, v) in changes {
                        let event = match v {
                            Some(v) => WatchEvent::Apply(k, v),
                            None => WatchEvent::Delete(k),
                        };
                        sink.push(event).await.map_err(|c| (version, c.into()))?;
                    }
                    sink.flush().await.map_err(|c| (version, c.into()))?;
                    Ok(version + 1)
                }
                Some(Step::Watch(Err("expired"))) => Err((version, WatchError::Expired.into())),
                Some(Step::Watch(Err(_))) => Err((version, WatchError::Unreachable(anyhow::anyhow!("broken")).into())),
                _ => std::future::pending().await,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lists_watches_and_lists_again_when_history_is_lost_whatever_fails_on_the_way() {
        let steps = VecDeque::from([
            Step::List(Err("connect")),
            Step::List(Err("refused")),
            Step::List(Ok(vec![(1, 10), (2, 20)])),
            Step::Watch(Ok(vec![(1, Some(11)), (2, None)])),
            Step::Watch(Err("broken")),
            Step::Watch(Ok(vec![(3, Some(30))])),
            Step::Watch(Err("expired")),
            Step::List(Ok(vec![(3, 31)])),
        ]);
        let (tx, mut rx) = mpsc::channel(CHANNEL);
        let outage = Arc::new(Outage::new("the script", "here"));
        let task = tokio::spawn(run(Script { steps }, tx, outage));
        let mut events = Vec::new();
        while events.len() < 12 {
            events.extend(rx.recv().await.unwrap());
        }
        use WatchEvent::*;
        assert_eq!(
            events,
            vec![
                // The failed listings' Init goes with the one that worked, which replaces all.
                Init,
                Init,
                Init,
                InitApply(1, 10),
                InitApply(2, 20),
                InitDone,
                Apply(1, 11),
                Delete(2),
                // A broken watch resumes where it was; an expired one lists again.
                Apply(3, 30),
                Init,
                InitApply(3, 31),
                InitDone,
            ]
        );
        drop(rx);
        task.abort();
    }
}
