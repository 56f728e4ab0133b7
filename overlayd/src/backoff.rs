//! Retry pacing for calls to a store that may be down.

use std::time::Duration;

/// The first retry is quick because, with several endpoints, the client may
/// simply have picked a dead one; then it backs off to a few seconds.
pub struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    /// A fresh backoff, starting at the quick first retry.
    pub fn new() -> Self {
        Backoff(Self::FIRST)
    }

    /// Sleeps the current delay, then doubles it up to the cap.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::MAX);
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}
