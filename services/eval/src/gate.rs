//! The promotion policy: which offline evidence lets a candidate on (to a
//! canary, or straight to champion), and what live thumbs promote or roll
//! back a canary. Every verdict carries its reasons, in words, with the
//! numbers behind them, for the audit log.

use serde::{Deserialize, Serialize};

use crate::run::Metric;
use crate::stats;

/// Settings (`[promotion]` in `flywheel.toml`, `FLYWHEEL_PROMOTION_*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Each task suite's pass-rate difference must have its 95% lower bound
    /// above this (0: the candidate is better, not merely not worse).
    pub task_min_lower_bound: f64,
    /// The retention suite's pass-rate difference must have its lower bound
    /// above this (−0.03: at most three points worse).
    pub retention_min_lower_bound: f64,
    /// The candidate's median decode time per token may be at most this many
    /// times the champion's.
    pub max_latency_ratio: f64,
    /// Held-out metrics count as task evidence only with this many items.
    pub min_items: usize,
    /// Share of a team's traffic a passing candidate serves as a canary
    /// (0: promote on the offline evidence alone).
    pub canary_share: f64,
    /// Votes each arm needs before the canary is decided either way.
    pub canary_min_votes: u64,
    /// Hours a canary may run; undecided by then, it is rolled back.
    pub canary_deadline_hours: f64,
    /// Promote once `P(canary better)` reaches this; roll back once it falls
    /// to `1 - this`.
    pub canary_confidence: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            task_min_lower_bound: 0.0,
            retention_min_lower_bound: -0.03,
            max_latency_ratio: 1.5,
            min_items: 10,
            canary_share: 0.1,
            canary_min_votes: 50,
            canary_deadline_hours: 24.0,
            canary_confidence: 0.95,
        }
    }
}

/// The offline verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    /// One line per rule: what was required, what was measured, ✓ or ✗.
    pub reasons: Vec<String>,
}

fn points(x: f64) -> String {
    format!("{:+.1}", 100.0 * x)
}

fn rule(ok: bool, text: String) -> String {
    format!("{} {text}", if ok { "pass:" } else { "FAIL:" })
}

/// Judges an evaluation's metrics. `task_suites` names the team's own
/// suites; `retention` the general one.
pub fn judge(
    policy: &Policy,
    metrics: &[Metric],
    task_suites: &[String],
    retention: &str,
) -> Verdict {
    let find = |suite: &str, metric: &str| {
        metrics
            .iter()
            .find(|m| m.suite == suite && m.metric == metric)
    };
    let mut reasons = Vec::new();
    let mut passed = true;
    let mut check = |ok: bool, text: String| {
        passed &= ok;
        reasons.push(rule(ok, text));
    };
    // Task evidence: the team's suites, else held-out answers, else pairs.
    let mut evidence = 0;
    for name in task_suites {
        if let Some(m) = find(name, "pass_rate") {
            evidence += 1;
            check(
                m.ci_low > policy.task_min_lower_bound,
                format!(
                    "task suite {name}: pass rate {:.1}% vs {:.1}%, difference {} points [{}, {}], lower bound must exceed {}",
                    100.0 * m.candidate,
                    100.0 * m.champion,
                    points(m.difference),
                    points(m.ci_low),
                    points(m.ci_high),
                    points(policy.task_min_lower_bound)
                ),
            );
        }
    }
    if evidence == 0 {
        let held_out = [
            ("heldout-sft", "contains_match"),
            ("heldout-dpo", "preference_accuracy"),
        ]
        .into_iter()
        .find_map(|(s, k)| find(s, k).filter(|m| m.items >= policy.min_items));
        match held_out {
            Some(m) => check(
                m.ci_low > policy.task_min_lower_bound,
                format!(
                    "held-out {} {}: {:.1}% vs {:.1}% over {} items, difference {} points [{}, {}], lower bound must exceed {}",
                    m.suite,
                    m.metric,
                    100.0 * m.candidate,
                    100.0 * m.champion,
                    m.items,
                    points(m.difference),
                    points(m.ci_low),
                    points(m.ci_high),
                    points(policy.task_min_lower_bound)
                ),
            ),
            None => check(
                false,
                format!(
                    "no evidence the candidate is better: no task suite, and fewer than {} held-out examples",
                    policy.min_items
                ),
            ),
        }
    }
    match find(retention, "pass_rate") {
        Some(m) => check(
            m.ci_low > policy.retention_min_lower_bound,
            format!(
                "retention suite {retention}: pass rate {:.1}% vs {:.1}%, difference {} points [{}, {}], lower bound must exceed {}",
                100.0 * m.candidate,
                100.0 * m.champion,
                points(m.difference),
                points(m.ci_low),
                points(m.ci_high),
                points(policy.retention_min_lower_bound)
            ),
        ),
        None => check(
            false,
            format!("the retention suite {retention} was not run"),
        ),
    }
    // Measured alone where the evaluation ran the probe: items answered
    // several at a time share their steps with other items' prefills, so a
    // batched time per token moves with the answers' lengths (seen: 1.64x
    // for an adapter that costs 2% of throughput at serving). Otherwise the
    // batched median, not the p95 (whose tail moves with the batching from
    // run to run). Both batched quantiles are reported.
    let (latency, how) = match find("latency", "solo_ms_per_token_p50") {
        Some(m) => (Some(m), "alone"),
        None => (find("latency", "ms_per_token_p50"), "batched"),
    };
    if let Some(m) = latency {
        let ratio = if m.champion > 0.0 {
            m.candidate / m.champion
        } else {
            1.0
        };
        check(
            ratio <= policy.max_latency_ratio,
            format!(
                "latency ({how}): median {:.1} vs {:.1} ms per token, {:.2}x, at most {:.2}x",
                m.candidate, m.champion, ratio, policy.max_latency_ratio
            ),
        );
    }
    Verdict { passed, reasons }
}

/// What a canary's live thumbs say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CanaryVerdict {
    Continue { prob_better: f64 },
    Promote { prob_better: f64, reason: String },
    RollBack { prob_better: f64, reason: String },
}

/// Judges a canary from both arms' (up, down) votes; `overdue` when its
/// deadline has passed.
pub fn judge_canary(
    policy: &Policy,
    canary: (u64, u64),
    champion: (u64, u64),
    overdue: bool,
) -> CanaryVerdict {
    let p = stats::prob_better(canary.0, canary.1, champion.0, champion.1);
    let rate = |(u, d): (u64, u64)| {
        if u + d == 0 {
            0.0
        } else {
            100.0 * u as f64 / (u + d) as f64
        }
    };
    let summary = format!(
        "thumbs up {:.1}% of {} votes vs {:.1}% of {}, P(canary better) = {:.3}",
        rate(canary),
        canary.0 + canary.1,
        rate(champion),
        champion.0 + champion.1,
        p
    );
    let enough = canary.0 + canary.1 >= policy.canary_min_votes
        && champion.0 + champion.1 >= policy.canary_min_votes;
    if enough && p >= policy.canary_confidence {
        return CanaryVerdict::Promote {
            prob_better: p,
            reason: summary,
        };
    }
    if enough && p <= 1.0 - policy.canary_confidence {
        return CanaryVerdict::RollBack {
            prob_better: p,
            reason: format!("worse than the champion: {summary}"),
        };
    }
    if overdue {
        let why = if enough {
            "no clear difference by the deadline"
        } else {
            "too few votes by the deadline"
        };
        return CanaryVerdict::RollBack {
            prob_better: p,
            reason: format!(
                "{why} (at least {} per arm needed): {summary}",
                policy.canary_min_votes
            ),
        };
    }
    CanaryVerdict::Continue { prob_better: p }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(suite: &str, metric: &str, cand: f64, champ: f64, low: f64, high: f64) -> Metric {
        Metric {
            suite: suite.into(),
            metric: metric.into(),
            items: 100,
            candidate: cand,
            champion: champ,
            difference: cand - champ,
            ci_low: low,
            ci_high: high,
        }
    }

    #[test]
    fn a_better_candidate_passes_and_a_forgetful_one_does_not() {
        let p = Policy::default();
        let tasks = vec!["routing".to_string()];
        let good = [
            m("routing", "pass_rate", 0.8, 0.1, 0.6, 0.8),
            m("general-retention", "pass_rate", 0.62, 0.63, -0.025, 0.01),
            m("latency", "ms_per_token_p50", 14.0, 13.0, 0.0, 2.0),
        ];
        let v = judge(&p, &good, &tasks, "general-retention");
        assert!(v.passed, "{v:?}");
        assert_eq!(v.reasons.len(), 3);
        // Measured alone, the probe decides, whatever the batched median.
        let alone = m("latency", "solo_ms_per_token_p50", 20.0, 10.0, 8.0, 12.0);
        let slow_alone = [&good[..], &[alone]].concat();
        let v = judge(&p, &slow_alone, &tasks, "general-retention");
        assert!(!v.passed, "{v:?}");
        assert!(
            v.reasons
                .iter()
                .any(|r| r.starts_with("FAIL: latency (alone)")),
            "{v:?}"
        );
        let forgetful = [
            m("routing", "pass_rate", 0.8, 0.1, 0.6, 0.8),
            m("general-retention", "pass_rate", 0.50, 0.63, -0.18, -0.08),
        ];
        let v = judge(&p, &forgetful, &tasks, "general-retention");
        assert!(!v.passed);
        assert!(
            v.reasons
                .iter()
                .any(|r| r.starts_with("FAIL: retention suite")),
            "{v:?}"
        );
        // Better on nothing measurable: not promoted.
        let v = judge(&p, &good[1..], &[], "general-retention");
        assert!(!v.passed);
        assert!(v.reasons[0].contains("no evidence"), "{v:?}");
    }

    #[test]
    fn canaries_wait_for_votes_then_decide() {
        let p = Policy {
            canary_min_votes: 40,
            ..Default::default()
        };
        assert!(matches!(
            judge_canary(&p, (9, 1), (5, 5), false),
            CanaryVerdict::Continue { .. }
        ));
        assert!(matches!(
            judge_canary(&p, (36, 4), (20, 20), false),
            CanaryVerdict::Promote { .. }
        ));
        assert!(matches!(
            judge_canary(&p, (10, 30), (30, 10), false),
            CanaryVerdict::RollBack { .. }
        ));
        match judge_canary(&p, (3, 1), (2, 2), true) {
            CanaryVerdict::RollBack { reason, .. } => assert!(reason.contains("too few votes")),
            other => panic!("{other:?}"),
        }
    }
}
