//! A circuit breaker: after enough consecutive failures an upstream is not
//! called for a while (callers get an immediate error instead of waiting on
//! a server that is down), then one trial call decides whether it is back.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Calls go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// Calls are refused until `until`.
    Open { until: Instant },
    /// One trial call is in flight; others are refused until it ends, or
    /// until `until` (a trial whose end was never heard: its caller left).
    HalfOpen { until: Instant },
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    failures_to_open: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(failures_to_open: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            failures_to_open: failures_to_open.max(1),
            cooldown,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a call go out now? `Err` says how long until one may.
    pub fn admit(&self) -> Result<(), Duration> {
        let mut s = self.state();
        match *s {
            State::Closed { .. } => Ok(()),
            State::Open { until } | State::HalfOpen { until } => {
                let now = Instant::now();
                if now >= until {
                    *s = State::HalfOpen {
                        until: now + self.cooldown,
                    };
                    Ok(())
                } else if matches!(*s, State::HalfOpen { .. }) {
                    // The trial decides soon; a caller may come back in a second.
                    Err(Duration::from_secs(1).min(until - now))
                } else {
                    Err(until - now)
                }
            }
        }
    }

    /// The server answered.
    pub fn success(&self) {
        *self.state() = State::Closed { failures: 0 };
    }

    /// The server failed a call (its fault: down, timing out, 5xx).
    pub fn failure(&self) {
        let mut s = self.state();
        let failures = match *s {
            State::Closed { failures } => failures + 1,
            State::HalfOpen { .. } | State::Open { .. } => self.failures_to_open,
        };
        *s = if failures >= self.failures_to_open {
            tracing::warn!(
                cooldown_s = self.cooldown.as_secs_f64(),
                "upstream circuit opened"
            );
            State::Open {
                until: Instant::now() + self.cooldown,
            }
        } else {
            State::Closed { failures }
        };
    }

    /// A call ended in a way that says nothing of the server's health (the
    /// request was refused as invalid): a trial lets the next one try.
    pub fn release(&self) {
        let mut s = self.state();
        if matches!(*s, State::HalfOpen { .. }) {
            *s = State::Open {
                until: Instant::now(),
            };
        }
    }

    pub fn is_open(&self) -> bool {
        match *self.state() {
            State::Closed { .. } => false,
            State::Open { until } => Instant::now() < until,
            State::HalfOpen { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_a_trial_closes_it() {
        let b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(b.admit().is_ok());
            b.failure();
        }
        // A success in between starts the count again.
        b.success();
        for _ in 0..2 {
            b.failure();
        }
        assert!(
            b.admit().is_ok(),
            "two in a row after a success: still closed"
        );
        b.failure();
        let wait = b.admit().expect_err("three in a row: open");
        assert_eq!(wait, Duration::from_secs(10));
        assert!(b.is_open());

        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.admit().is_ok(), "after the cooldown one trial goes out");
        assert!(b.admit().is_err(), "and only one");
        b.success();
        assert!(b.admit().is_ok() && !b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_it_again_for_a_whole_cooldown() {
        let b = Breaker::new(1, Duration::from_secs(5));
        b.failure();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.admit().is_ok());
        b.failure();
        assert_eq!(b.admit(), Err(Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_refused_as_invalid_lets_the_next_call_try() {
        let b = Breaker::new(1, Duration::from_secs(5));
        b.failure();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(b.admit().is_ok());
        b.release();
        assert!(b.admit().is_ok(), "the next call is the new trial");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_never_heard_from_again_expires() {
        let b = Breaker::new(1, Duration::from_secs(5));
        b.failure();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            b.admit().is_ok(),
            "the trial goes out, and its caller leaves"
        );
        assert!(b.admit().is_err());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.admit().is_ok(), "a cooldown later another trial may go");
    }
}
