//! How an outage of a store (the API server, etcd) is said: once when it
//! begins, at warn level, naming the endpoint and the cause; then once a
//! minute while it lasts; and once when it ends. Every caller that fails on
//! the same endpoint (the lease watch, the policy watches, a renewal) shares
//! one [`Outage`], so three watches failing together make one line, not three
//! a second.

use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// How often a lasting outage is said again.
const SAY_AGAIN: Duration = Duration::from_secs(60);

/// The state of one endpoint, shared by everything that calls it.
#[derive(Debug)]
pub struct Outage {
    /// What is out, in words: "the Kubernetes API server".
    what: &'static str,
    /// Where it is.
    endpoint: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the outage began; none while things work.
    since: Option<Instant>,
    /// When it was last said.
    said: Option<Instant>,
    /// Failures since it began.
    failures: u64,
}

/// What a failure or a recovery made the outage say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// Nothing: already said, or nothing to say.
    Nothing,
    /// The outage began.
    Began,
    /// It goes on (said once a minute).
    Lasts,
    /// It ended.
    Ended,
}

impl Outage {
    /// An endpoint that works until a call says otherwise.
    pub fn new(what: &'static str, endpoint: impl Into<String>) -> Self {
        Outage { what, endpoint: endpoint.into(), state: Mutex::new(State::default()) }
    }

    /// A call failed for `cause`: says so if the outage begins now, or has
    /// not been said for a minute.
    pub fn failed(&self, cause: &dyn Display) {
        self.failed_at(Instant::now(), cause);
    }

    fn failed_at(&self, now: Instant, cause: &dyn Display) -> Said {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failures += 1;
        let Some(since) = state.since else {
            state.since = Some(now);
            state.said = Some(now);
            warn!(endpoint = %self.endpoint, cause = %cause, "{} unreachable; retrying (said again every minute while it lasts)", self.what);
            return Said::Began;
        };
        if state.said.is_some_and(|said| now.duration_since(said) < SAY_AGAIN) {
            return Said::Nothing;
        }
        state.said = Some(now);
        let for_s = now.duration_since(since).as_secs();
        warn!(endpoint = %self.endpoint, cause = %cause, for_s, failures = state.failures, "{} still unreachable; retrying", self.what);
        Said::Lasts
    }

    /// A call worked: says the outage ended, if there was one.
    pub fn recovered(&self) {
        self.recovered_at(Instant::now());
    }

    /// A call made at `asked` was answered. It ends an outage only if it
    /// was made after the outage began: a watch that opened just as the
    /// server went away says nothing of the server now.
    pub fn answered(&self, asked: Instant) {
        self.answered_at(asked, Instant::now());
    }

    fn answered_at(&self, asked: Instant, now: Instant) -> Said {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.since.is_some_and(|since| asked < since) {
            return Said::Nothing;
        }
        drop(state);
        self.recovered_at(now)
    }

    fn recovered_at(&self, now: Instant) -> Said {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(since) = state.since.take() else { return Said::Nothing };
        let after_s = now.duration_since(since).as_secs();
        info!(endpoint = %self.endpoint, after_s, failures = state.failures, "{} reachable again", self.what);
        *state = State::default();
        Said::Ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_said_once_then_once_a_minute_then_once_when_it_ends() {
        let outage = Outage::new("the Kubernetes API server", "https://10.96.0.1:443");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(outage.recovered_at(t0), Said::Nothing, "nothing to end");
        assert_eq!(outage.failed_at(at(0), &"connection refused"), Said::Began);
        // Three watches and a renewal failing every second for most of a minute: silence.
        for s in 1..60 {
            for _ in 0..4 {
                assert_eq!(outage.failed_at(at(s), &"connection refused"), Said::Nothing, "at {s}s");
            }
        }
        assert_eq!(outage.failed_at(at(60), &"connection refused"), Said::Lasts);
        assert_eq!(outage.failed_at(at(61), &"connection refused"), Said::Nothing);
        assert_eq!(outage.recovered_at(at(70)), Said::Ended);
        assert_eq!(outage.recovered_at(at(71)), Said::Nothing, "said once");
        assert_eq!(outage.failed_at(at(80), &"timed out"), Said::Began, "a new outage is said anew");
    }

    #[test]
    fn an_answer_to_a_call_made_before_the_outage_does_not_end_it() {
        let outage = Outage::new("the Kubernetes API server", "https://10.96.0.1:443");
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A watch asked at 0 opens at 3; another failed at 1: the server went away between.
        assert_eq!(outage.failed_at(at(1), &"connection refused"), Said::Began);
        assert_eq!(outage.answered_at(at(0), at(3)), Said::Nothing);
        assert_eq!(outage.failed_at(at(5), &"connection refused"), Said::Nothing, "said once");
        assert_eq!(outage.answered_at(at(900), at(950)), Said::Ended);
    }
}
