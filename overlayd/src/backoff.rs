//! The one retry policy of the daemon, and a throttle for repeated log lines.
//!
//! Every retry paces itself with [`Backoff`]: calls to a store that may be
//! down, the etcd and Kubernetes watches, and reconciles that failed. The
//! first retry is quick, because with several endpoints the client may simply
//! have picked a dead one; then it backs off, with jitter so that a thousand
//! nodes that lost the same server do not come back in step.

use std::time::{Duration, Instant};

use backon::BackoffBuilder;

/// Exponential backoff with jitter: 100 ms, doubling, up to a cap.
pub struct Backoff {
    max: Duration,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// The first delay.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The cap for calls to a store.
    pub const MAX: Duration = Duration::from_secs(2);

    /// A backoff capped at [`Backoff::MAX`].
    pub fn new() -> Self {
        Self::with_max(Self::MAX)
    }

    /// A backoff capped at `max`.
    pub fn with_max(max: Duration) -> Self {
        Backoff { max, delays: Self::build(max) }
    }

    fn build(max: Duration) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::new()
            .with_min_delay(Self::FIRST)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// Sleeps the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts again from the first delay, after a success.
    pub fn reset(&mut self) {
        self.delays = Self::build(self.max);
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

/// The Kubernetes watcher paces its relists and re-watches with the same policy.
impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        Backoff::reset(self);
    }
}

/// Lets a repeated message through once per period: a condition that lasts
/// (the API server is down, the node has no podCIDR yet) is said at once,
/// then every half minute or so, not on every retry.
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    /// A throttle that lets one message through per `every`.
    pub fn new(every: Duration) -> Self {
        Throttle { every, last: None }
    }

    /// Whether to say it now.
    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < self.every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::with_max(Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Backoff::FIRST && first <= 2 * Backoff::FIRST, "{first:?}");
        let later: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        // Jitter adds at most one more delay's worth to the capped delay.
        assert!(later.iter().all(|d| *d <= Duration::from_secs(2)), "{later:?}");
        assert!(later[10] >= Duration::from_secs(1), "{later:?}");
        b.reset();
        assert!(b.next_delay() <= 2 * Backoff::FIRST);
    }

    #[test]
    fn throttle_lets_one_through_per_period() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert!(t.ready());
        assert!(!t.ready());
        let mut always = Throttle::new(Duration::ZERO);
        assert!(always.ready() && always.ready());
    }
}
