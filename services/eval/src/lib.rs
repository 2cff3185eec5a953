//! Whether a candidate is better than the champion, measured on what would
//! be served: suites of prompts with checks ([`suite`], [`check`]), the
//! held-out preference pairs and answers of a team's dataset, and latency,
//! all run through the serving engine with the same sampling code
//! ([`run`]); candidate and champion compared item by item with paired
//! confidence intervals ([`stats`]) and judged by the promotion policy
//! ([`gate`]); and the canary's sequential test on live thumbs
//! ([`stats::prob_better`], [`gate::judge_canary`]).
//!
//! No database or HTTP: the job that records evaluations (`flywheel-jobs`)
//! drives it.

pub mod check;
pub mod gate;
pub mod judge;
pub mod run;
pub mod stats;
pub mod suite;

pub use check::Check;
pub use gate::{CanaryVerdict, Policy, Verdict};
pub use suite::{Suite, SuiteItem};

/// The general retention suite shipped with Flywheel.
pub const RETENTION_SUITE: &str = include_str!("../suites/general-retention.json");
