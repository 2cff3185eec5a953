//! Per-team rate limits: requests per minute and tokens per minute, each a
//! token bucket that refills evenly and holds at most one minute's worth
//! (so a quiet team may burst up to its limit, never past it).
//!
//! A request is admitted while the team has a request left and its token
//! bucket is not in debt; the tokens a completion used (prompt and output)
//! are taken when it ends, so a long answer can leave the bucket below
//! zero and the team's next requests wait until it refills. Each gateway
//! process keeps its own buckets: behind N replicas a team gets up to N
//! times its limit, as with per-instance limits in other servers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use flywheel_store::keys::{Limits, Principal};
use uuid::Uuid;

use crate::AppError;

/// One limit's bucket: `level` units available, refilling at
/// `per_minute / 60` a second up to `per_minute`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    per_minute: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_minute: u32, now: Instant) -> Self {
        Self {
            level: f64::from(per_minute),
            per_minute: f64::from(per_minute),
            at: now,
        }
    }

    /// Refills for the time since it was last touched, and follows a
    /// changed limit (never holding more than a minute of the new one).
    fn refill(&mut self, per_minute: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.per_minute = f64::from(per_minute);
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Seconds until the bucket holds one unit, rounded up (at least 1).
    fn wait_for_one(&self) -> u64 {
        let seconds = (1.0 - self.level) * 60.0 / self.per_minute;
        (seconds.ceil() as u64).max(1)
    }
}

/// A limit reached: which, and how long until the bucket has room.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Refused {
    /// `requests_per_minute` or `tokens_per_minute` (the `/metrics` label).
    why: &'static str,
    per_minute: u32,
    wait_s: u64,
}

impl From<Refused> for AppError {
    fn from(r: Refused) -> Self {
        let what = r.why.trim_end_matches("_per_minute");
        AppError::RateLimited {
            message: format!(
                "This team's rate limit of {} {what} per minute is reached; retry after {} s.",
                r.per_minute, r.wait_s
            ),
            retry_after_s: r.wait_s,
        }
    }
}

#[derive(Debug, Default)]
struct TeamBuckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// Every team's buckets in this process, and what was refused.
#[derive(Debug, Default)]
pub struct Limiter {
    teams: Mutex<HashMap<Uuid, TeamBuckets>>,
    /// Requests refused, by team name and why (for `/metrics`).
    refused: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Limiter {
    /// Admits one request of `principal`'s team or says how long to wait.
    pub fn admit(&self, principal: &Principal) -> Result<(), AppError> {
        self.admit_at(principal.team_id, principal.limits, Instant::now())
            .map_err(|refused| {
                self.count_refusal(&principal.team_name, refused.why);
                refused.into()
            })
    }

    /// Counts a request of `team` refused for `why`.
    pub fn count_refusal(&self, team: &str, why: &'static str) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        *refused.entry((team.to_string(), why)).or_default() += 1;
    }

    /// Refusals so far, by (team, why).
    pub fn refusals(&self) -> Vec<((String, &'static str), u64)> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn admit_at(&self, team: Uuid, limits: Limits, now: Instant) -> Result<(), Refused> {
        let mut teams = self.teams.lock().unwrap_or_else(|e| e.into_inner());
        let b = teams.entry(team).or_default();
        match limits.requests_per_minute {
            Some(rpm) => {
                let bucket = b.requests.get_or_insert_with(|| Bucket::full(rpm, now));
                bucket.refill(rpm, now);
                if bucket.level < 1.0 {
                    return Err(Refused {
                        why: "requests_per_minute",
                        per_minute: rpm,
                        wait_s: bucket.wait_for_one(),
                    });
                }
            }
            None => b.requests = None,
        }
        match limits.tokens_per_minute {
            Some(tpm) => {
                let bucket = b.tokens.get_or_insert_with(|| Bucket::full(tpm, now));
                bucket.refill(tpm, now);
                if bucket.level <= 0.0 {
                    // Until it is above zero again.
                    let wait = (-bucket.level * 60.0 / bucket.per_minute).floor() as u64 + 1;
                    return Err(Refused {
                        why: "tokens_per_minute",
                        per_minute: tpm,
                        wait_s: wait,
                    });
                }
            }
            None => b.tokens = None,
        }
        if let Some(bucket) = b.requests.as_mut() {
            bucket.level -= 1.0;
        }
        Ok(())
    }

    /// Takes the tokens a finished completion used from its team's bucket.
    pub fn spend(&self, team: Uuid, tokens: usize) {
        self.spend_at(team, tokens, Instant::now());
    }

    fn spend_at(&self, team: Uuid, tokens: usize, now: Instant) {
        let mut teams = self.teams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = teams.get_mut(&team).and_then(|b| b.tokens.as_mut()) {
            let per_minute = bucket.per_minute as u32;
            bucket.refill(per_minute, now);
            bucket.level -= tokens as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(rpm: Option<u32>, tpm: Option<u32>) -> Limits {
        Limits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    fn retry_after(r: Result<(), Refused>) -> u64 {
        r.expect_err("a rate limit").wait_s
    }

    #[test]
    fn a_team_gets_its_requests_per_minute_then_waits_for_the_refill() {
        let (l, team, t0) = (Limiter::default(), Uuid::new_v4(), Instant::now());
        let lim = limits(Some(3), None);
        for _ in 0..3 {
            l.admit_at(team, lim, t0).unwrap();
        }
        // One request refills every 20 s.
        assert_eq!(retry_after(l.admit_at(team, lim, t0)), 20);
        assert_eq!(
            retry_after(l.admit_at(team, lim, t0 + Duration::from_secs(15))),
            5
        );
        l.admit_at(team, lim, t0 + Duration::from_secs(20)).unwrap();
        assert!(l.admit_at(team, lim, t0 + Duration::from_secs(21)).is_err());
    }

    #[test]
    fn one_teams_limit_leaves_another_team_alone() {
        let (l, a, b, t0) = (
            Limiter::default(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Instant::now(),
        );
        l.admit_at(a, limits(Some(1), None), t0).unwrap();
        assert!(l.admit_at(a, limits(Some(1), None), t0).is_err());
        l.admit_at(b, limits(Some(1), None), t0).unwrap();
        for _ in 0..100 {
            l.admit_at(b, limits(None, None), t0).unwrap();
        }
    }

    #[test]
    fn tokens_are_taken_when_a_completion_ends_and_debt_makes_the_team_wait() {
        let (l, team, t0) = (Limiter::default(), Uuid::new_v4(), Instant::now());
        let lim = limits(None, Some(600)); // 10 tokens a second
        l.admit_at(team, lim, t0).unwrap();
        l.spend_at(team, 500, t0);
        // 100 left: admitted.
        l.admit_at(team, lim, t0).unwrap();
        l.spend_at(team, 400, t0);
        // 300 in debt: 30 s until it is back above zero.
        assert_eq!(retry_after(l.admit_at(team, lim, t0)), 31);
        assert!(l.admit_at(team, lim, t0 + Duration::from_secs(30)).is_err());
        l.admit_at(team, lim, t0 + Duration::from_secs(31)).unwrap();
    }

    #[test]
    fn a_bucket_never_holds_more_than_a_minute_of_its_limit() {
        let (l, team, t0) = (Limiter::default(), Uuid::new_v4(), Instant::now());
        let lim = limits(Some(2), None);
        let later = t0 + Duration::from_secs(3600);
        l.admit_at(team, lim, later).unwrap();
        l.admit_at(team, lim, later).unwrap();
        assert!(l.admit_at(team, lim, later).is_err());
    }

    #[test]
    fn a_lowered_limit_applies_at_once() {
        let (l, team, t0) = (Limiter::default(), Uuid::new_v4(), Instant::now());
        l.admit_at(team, limits(Some(100), None), t0).unwrap();
        l.admit_at(team, limits(Some(1), None), t0).unwrap();
        assert!(l.admit_at(team, limits(Some(1), None), t0).is_err());
    }
}
