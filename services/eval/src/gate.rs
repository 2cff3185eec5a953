//! The promotion policy: which offline evidence lets a candidate on (to a
//! canary, or straight to champion), and what live thumbs promote or roll
//! back a canary. Every verdict carries its reasons, in words, with the
//! numbers behind them, for the audit log.

use serde::{Deserialize, Serialize};

use crate::judge::JUDGED;
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
    /// The candidate's decode time per token, measured alone, must not be
    /// shown above this many times the champion's (the lower bound of the
    /// median per-prompt ratio's interval at most this).
    pub max_latency_ratio: f64,
    /// Held-out corrections or preference pairs count as task evidence only
    /// with this many items (and the loop trains only when a dataset holds
    /// out that many).
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
    /// One line per rule (`pass:` or `FAIL:`): what was required, what was
    /// measured; then `info:` lines for held-out metrics that are reported
    /// but decide nothing.
    pub reasons: Vec<String>,
}

fn points(x: f64) -> String {
    format!("{:+.1}", 100.0 * x)
}

fn rule(ok: bool, text: String) -> String {
    format!("{} {text}", if ok { "pass:" } else { "FAIL:" })
}

/// The held-out evidence that a candidate is better, in the order the
/// gate reads it when no task suite can decide: the users' corrections
/// (does the candidate now give the answer users wrote where the champion
/// was wrong), then the preference pairs (does it prefer the answer users
/// chose).
pub const HELD_OUT_EVIDENCE: [(&str, &str); 2] = [
    ("heldout-corrections", "contains_match"),
    ("heldout-dpo", "preference_accuracy"),
];

/// Held-out metrics reported beside the rules, never deciding: what users
/// liked (by construction the champion's own answers, so a rewording counts
/// against the candidate) and the single votes (does the candidate move
/// toward liked answers and away from disliked ones).
const REPORTED: [(&str, &str); 2] = [
    ("heldout-liked", "contains_match"),
    ("heldout-kto", "vote_agreement"),
];

/// Whether a suite's items cannot show any candidate better than the
/// champion: even one passing every item would not have its lower bound
/// above `bar`.
pub fn saturated(m: &Metric, bar: f64) -> bool {
    let failed = ((1.0 - m.champion) * m.items as f64).round() as usize;
    stats::best_lower_bound(m.items, failed) <= bar
}

/// The team's judge, as the gate reads it: its verdicts on the held-out
/// prompts are the metric [`JUDGED`] among the evaluation's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judge {
    /// The model version that judged.
    pub name: String,
    /// What one of its verdicts counts against one of the users' own
    /// held-out items ([`crate::judge::Agreement::weight`]); 0: ignored.
    pub weight: f64,
    /// Why it has that weight (its check against the users), in words.
    pub reason: String,
}

/// Judges an evaluation's metrics. `task_suites` names the team's own
/// suites; `retention` the general one; `judge` the team's judge, if it
/// has one.
///
/// Task evidence: each task suite's pass rate must be shown better (its
/// lower bound above the policy's bar), unless the suite is saturated (the
/// champion passes so much of it that no candidate could be shown better):
/// then it only must not be shown worse, and the held-out evidence decides.
/// With no suite that can decide, the first held-out evidence of
/// [`HELD_OUT_EVIDENCE`] with at least `min_items` items must be shown
/// better. A judge the users' votes showed trustworthy joins that
/// evidence, weighted ([`with_judge`]); a judge that was not is reported
/// and ignored. Forgetting: the retention suite's lower bound above its bar.
/// Speed: the median time per token, measured alone, within the ratio; a
/// latency that was not measured fails.
pub fn judge(
    policy: &Policy,
    metrics: &[Metric],
    task_suites: &[String],
    retention: &str,
    judge: Option<&Judge>,
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
    let bar = policy.task_min_lower_bound;
    let mut decided = false;
    let mut saturated_suites = Vec::new();
    for name in task_suites {
        let Some(m) = find(name, "pass_rate") else {
            continue;
        };
        if saturated(m, bar) {
            saturated_suites.push(name.as_str());
            check(
                m.ci_high >= 0.0,
                format!(
                    "task suite {name} is saturated (the champion passes {:.1}%: no candidate \
                     could be shown better on its {} items): {:.1}% vs {:.1}%, difference {} \
                     points [{}, {}], must not be shown worse",
                    100.0 * m.champion,
                    m.items,
                    100.0 * m.candidate,
                    100.0 * m.champion,
                    points(m.difference),
                    points(m.ci_low),
                    points(m.ci_high),
                ),
            );
            continue;
        }
        decided = true;
        check(
            m.ci_low > bar,
            format!(
                "task suite {name}: pass rate {:.1}% vs {:.1}%, difference {} points [{}, {}], lower bound must exceed {}",
                100.0 * m.candidate,
                100.0 * m.champion,
                points(m.difference),
                points(m.ci_low),
                points(m.ci_high),
                points(bar)
            ),
        );
    }
    let judged_metric = find(JUDGED.0, JUDGED.1);
    // Reported after the rules, where a judge that decides nothing belongs.
    let mut judge_info = None;
    if let Some(j) = judge {
        let what = match judged_metric {
            Some(m) => format!(
                "judge {} prefers the candidate's answer on {:.1}% and the champion's on {:.1}% of {} held-out prompts",
                j.name,
                100.0 * m.candidate,
                100.0 * m.champion,
                m.items
            ),
            None => format!("judge {}", j.name),
        };
        if j.weight <= 0.0 {
            judge_info = Some(format!("info: {what}; ignored: {}", j.reason));
        } else if decided {
            judge_info = Some(format!(
                "info: {what} (weight {:.2}; the task suites decide)",
                j.weight
            ));
        }
    }
    let judged = judge.zip(judged_metric);
    let judged = judged.filter(|(j, m)| j.weight > 0.0 && m.items > 0);
    if !decided {
        let held_out = HELD_OUT_EVIDENCE
            .into_iter()
            .find_map(|(s, k)| find(s, k).filter(|m| m.items >= policy.min_items));
        let suites = if saturated_suites.is_empty() {
            "no task suite".to_string()
        } else {
            format!(
                "the task suites are saturated ({})",
                saturated_suites.join(", ")
            )
        };
        if let Some((j, jm)) = judged {
            // The users' own evidence, even with fewer items than the
            // policy asks for alone: the judge's verdicts add to it.
            let users = held_out.or_else(|| {
                HELD_OUT_EVIDENCE
                    .into_iter()
                    .find_map(|(s, k)| find(s, k).filter(|m| m.items > 0))
            });
            let (ok, text) = with_judge(policy, users, j, jm);
            check(ok, format!("{text} ({suites})"));
        } else {
            match held_out {
                Some(m) => check(
                    m.ci_low > bar,
                    format!(
                        "held-out {} {} ({suites}): {:.1}% vs {:.1}% over {} items, difference {} points [{}, {}], lower bound must exceed {}",
                        m.suite,
                        m.metric,
                        100.0 * m.candidate,
                        100.0 * m.champion,
                        m.items,
                        points(m.difference),
                        points(m.ci_low),
                        points(m.ci_high),
                        points(bar)
                    ),
                ),
                None => check(
                    false,
                    format!(
                        "no evidence the candidate is better: {suites}, and fewer than {} held-out \
                         corrections or preference pairs",
                        policy.min_items
                    ),
                ),
            }
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
    // for an adapter that costs 2% of throughput at serving). The rule reads
    // the median of each prompt's time ratio and its interval: a candidate
    // is rejected when shown slower than the allowance, so the noise of a
    // busy machine widens the interval rather than deciding by chance.
    // Evaluations made before the ratio was measured fall back to the
    // medians' ratio (alone, else batched).
    let ratio = find("latency", "solo_time_ratio");
    let (latency, how) = match find("latency", "solo_ms_per_token_p50") {
        Some(m) => (Some(m), "alone"),
        None => (find("latency", "ms_per_token_p50"), "batched"),
    };
    match (ratio, latency) {
        (Some(r), times) => {
            let (low, high) = (1.0 + r.ci_low, 1.0 + r.ci_high);
            let ms = times.map_or(String::new(), |m| {
                format!(", {:.2} vs {:.2} ms per token", m.candidate, m.champion)
            });
            check(
                low <= policy.max_latency_ratio,
                format!(
                    "latency (alone): {:.2}x the champion's time per token [{low:.2}x, {high:.2}x] \
                     (median over {} prompts{ms}), must not be shown above {:.2}x",
                    r.candidate, r.items, policy.max_latency_ratio
                ),
            );
        }
        (None, Some(m)) => {
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
        (None, None) => check(
            false,
            format!(
                "latency was not measured (no answer of both models ran to {} tokens), and the \
                 rule of at most {:.2}x needs it",
                crate::run::SOLO_MIN_TOKENS,
                policy.max_latency_ratio
            ),
        ),
    }
    reasons.extend(judge_info);
    for (suite, metric) in REPORTED {
        if let Some(m) = find(suite, metric) {
            reasons.push(format!(
                "info: held-out {suite} {metric}: {:.1}% vs {:.1}% over {} items, difference {} points [{}, {}] (reported, not a rule)",
                100.0 * m.candidate,
                100.0 * m.champion,
                m.items,
                points(m.difference),
                points(m.ci_low),
                points(m.ci_high),
            ));
        }
    }
    Verdict { passed, reasons }
}

/// The users' held-out evidence (`users`, if any) and a trusted judge's
/// verdicts on the held-out prompts (`judged`), as one. Each prompt the
/// judge decided (a preference, not a tie or an inconsistent pair) counts
/// `judge.weight` of a user's item; ties count in the judge's difference
/// (as zero) but add no items. The combined difference, and each bound of
/// its interval, is the weighted mean of the two's. Averaging the bounds
/// rather than pooling the items claims no precision from putting the two
/// together (the judge reads the same prompts, so the two can be wrong
/// together): if each lower bound holds with 97.5%, their weighted mean
/// holds with at least 95% whatever the dependence between them (both hold
/// but for at most 2.5% + 2.5%). What it bounds is a blend of two measures
/// (the users' and the judge's), which is what "weighted by its agreement"
/// means here. The weighted items must reach the policy's `min_items`, and
/// the lower bound its bar.
pub fn with_judge(
    policy: &Policy,
    users: Option<&Metric>,
    judge: &Judge,
    judged: &Metric,
) -> (bool, String) {
    let n_users = users.map_or(0.0, |m| m.items as f64);
    let decided = ((judged.candidate + judged.champion) * judged.items as f64).round();
    let n_judged = judge.weight * decided;
    let total = n_users + n_judged;
    let mean = |of: fn(&Metric) -> f64| {
        (users.map_or(0.0, |m| m.items as f64 * of(m)) + n_judged * of(judged)) / total
    };
    let (d, low, high) = (
        mean(|m| m.difference),
        mean(|m| m.ci_low),
        mean(|m| m.ci_high),
    );
    let users_text = match users {
        Some(m) => format!(
            "held-out {} {}: {:.1}% vs {:.1}% over {} items, difference {} points [{}, {}]",
            m.suite,
            m.metric,
            100.0 * m.candidate,
            100.0 * m.champion,
            m.items,
            points(m.difference),
            points(m.ci_low),
            points(m.ci_high)
        ),
        None => "no held-out corrections or preference pairs".to_string(),
    };
    let judge_text = format!(
        "judge {} at weight {:.2} ({}): prefers the candidate's answer on {:.1}% and the \
         champion's on {:.1}% of {} held-out prompts ({decided} decided), difference {} points \
         [{}, {}]",
        judge.name,
        judge.weight,
        judge.reason,
        100.0 * judged.candidate,
        100.0 * judged.champion,
        judged.items,
        points(judged.difference),
        points(judged.ci_low),
        points(judged.ci_high)
    );
    let bar = policy.task_min_lower_bound;
    if total < policy.min_items as f64 {
        return (
            false,
            format!(
                "no evidence the candidate is better: {users_text}; {judge_text}; together \
                 {total:.1} weighted items, fewer than {}",
                policy.min_items
            ),
        );
    }
    (
        low > bar,
        format!(
            "{users_text}; {judge_text}; together ({total:.1} weighted items) a difference of \
             {} points [{}, {}], lower bound must exceed {}",
            points(d),
            points(low),
            points(high),
            points(bar)
        ),
    )
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
        let v = judge(&p, &good, &tasks, "general-retention", None);
        assert!(v.passed, "{v:?}");
        assert_eq!(v.reasons.len(), 3);
        // Measured alone, the probe decides, whatever the batched median.
        let alone = m("latency", "solo_ms_per_token_p50", 20.0, 10.0, 8.0, 12.0);
        let slow_alone = [&good[..], &[alone]].concat();
        let v = judge(&p, &slow_alone, &tasks, "general-retention", None);
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
        let v = judge(&p, &forgetful, &tasks, "general-retention", None);
        assert!(!v.passed);
        assert!(
            v.reasons
                .iter()
                .any(|r| r.starts_with("FAIL: retention suite")),
            "{v:?}"
        );
        // Better on nothing measurable: not promoted.
        let v = judge(&p, &good[1..], &[], "general-retention", None);
        assert!(!v.passed);
        assert!(v.reasons[0].contains("no evidence"), "{v:?}");
    }

    #[test]
    fn a_saturated_suite_reports_and_the_held_out_corrections_decide() {
        let p = Policy::default();
        let tasks = vec!["routing".to_string()];
        let mut suite = m("routing", "pass_rate", 1.0, 0.975, 0.0, 0.075);
        suite.items = 40;
        // The second cycle: 100% vs 97.5% on 40 items cannot show a
        // gain; 4 failures of 40 could.
        assert!(saturated(&suite, 0.0));
        let mut open = suite.clone();
        open.champion = 0.9;
        assert!(!saturated(&open, 0.0));
        let mut corrections = m("heldout-corrections", "contains_match", 0.6, 0.0, 0.3, 0.9);
        corrections.items = 10;
        let rest = [
            m("general-retention", "pass_rate", 0.62, 0.62, -0.02, 0.02),
            m("latency", "solo_ms_per_token_p50", 14.0, 13.0, 0.0, 2.0),
        ];
        let v = judge(
            &p,
            &[&[suite.clone(), corrections.clone()][..], &rest].concat(),
            &tasks,
            "general-retention",
            None,
        );
        assert!(v.passed, "{v:?}");
        assert!(
            v.reasons[0].starts_with("pass: task suite routing is saturated"),
            "{v:?}"
        );
        assert!(v.reasons[1].contains("held-out heldout-corrections contains_match (the task suites are saturated (routing))"), "{v:?}");
        // Saturated and shown worse: a veto after all.
        let mut worse = suite.clone();
        (worse.candidate, worse.ci_low, worse.ci_high) = (0.8, -0.3, -0.05);
        let v = judge(
            &p,
            &[&[worse, corrections.clone()][..], &rest].concat(),
            &tasks,
            "general-retention",
            None,
        );
        assert!(
            !v.passed && v.reasons[0].starts_with("FAIL: task suite routing is saturated"),
            "{v:?}"
        );
        // No suite, nine corrections: too few; the pairs, if ten, decide.
        corrections.items = 9;
        let v = judge(
            &p,
            &[&[corrections.clone()][..], &rest].concat(),
            &[],
            "general-retention",
            None,
        );
        assert!(
            !v.passed && v.reasons[0].contains("fewer than 10 held-out corrections"),
            "{v:?}"
        );
        let mut pairs = m("heldout-dpo", "preference_accuracy", 0.7, 0.2, 0.1, 0.9);
        pairs.items = 10;
        let v = judge(
            &p,
            &[&[corrections, pairs][..], &rest].concat(),
            &[],
            "general-retention",
            None,
        );
        assert!(
            v.passed && v.reasons[0].contains("heldout-dpo preference_accuracy (no task suite)"),
            "{v:?}"
        );
    }

    #[test]
    fn a_trusted_judge_moves_a_borderline_decision_by_its_weight() {
        let p = Policy::default();
        // Two of ten corrections now answered, none before: the interval
        // touches zero, so the users' evidence alone cannot pass.
        let mut corrections = m("heldout-corrections", "contains_match", 0.2, 0.0, 0.0, 0.5);
        corrections.items = 10;
        let mut prefers = m(JUDGED.0, JUDGED.1, 0.6, 0.0, 0.4, 0.8);
        prefers.items = 20;
        let rest = [
            m("general-retention", "pass_rate", 0.62, 0.62, -0.02, 0.02),
            m("latency", "solo_ms_per_token_p50", 14.0, 13.0, 0.0, 2.0),
        ];
        let with = |judged: &Metric| [&[corrections.clone(), judged.clone()][..], &rest].concat();
        let alone = judge(&p, &with(&prefers), &[], "general-retention", None);
        assert!(
            !alone.passed && alone.reasons[0].starts_with("FAIL: held-out heldout-corrections"),
            "{alone:?}"
        );
        let trusted = Judge {
            name: "judge-7b".into(),
            weight: 0.5,
            reason: "agrees with the users on 12 of 12".into(),
        };
        // 10 items at [0, ...] and 12 decided verdicts (of 20; the rest
        // ties) at half weight at [0.4, ...]: a lower bound of
        // (10 x 0 + 6 x 0.4) / 16 = +15 points.
        let v = judge(
            &p,
            &with(&prefers),
            &[],
            "general-retention",
            Some(&trusted),
        );
        assert!(v.passed, "{v:?}");
        assert!(
            v.reasons[0].contains("judge judge-7b at weight 0.50")
                && v.reasons[0].contains("of 20 held-out prompts (12 decided)")
                && v.reasons[0].contains(
                    "together (16.0 weighted items) a difference of +35.0 points [+15.0, "
                ),
            "{v:?}"
        );
        // Ties alone add nothing: a judge that decided nothing cannot make
        // up for too few users' items.
        let mut few = corrections.clone();
        (
            few.items,
            few.candidate,
            few.difference,
            few.ci_low,
            few.ci_high,
        ) = (4, 1.0, 1.0, 1.0, 1.0);
        let mut undecided = prefers.clone();
        (
            undecided.candidate,
            undecided.difference,
            undecided.ci_low,
            undecided.ci_high,
        ) = (0.0, 0.0, 0.0, 0.0);
        let v = judge(
            &p,
            &[&[few, undecided][..], &rest].concat(),
            &[],
            "general-retention",
            Some(&trusted),
        );
        assert!(
            !v.passed && v.reasons[0].contains("4.0 weighted items, fewer than 10"),
            "{v:?}"
        );
        // The same judge preferring the champion pulls the same evidence down.
        let mut against = prefers.clone();
        (against.candidate, against.champion) = (0.0, 0.6);
        (against.difference, against.ci_low, against.ci_high) = (-0.6, -0.8, -0.4);
        let v = judge(
            &p,
            &with(&against),
            &[],
            "general-retention",
            Some(&trusted),
        );
        assert!(!v.passed, "{v:?}");
        // A judge the users' votes did not vouch for is reported, not counted.
        let ignored = Judge {
            weight: 0.0,
            reason: "no consistent preference on 12 pairs".into(),
            ..trusted.clone()
        };
        let v = judge(
            &p,
            &with(&prefers),
            &[],
            "general-retention",
            Some(&ignored),
        );
        assert!(!v.passed, "{v:?}");
        assert!(
            v.reasons
                .iter()
                .any(|r| r.starts_with("info: judge judge-7b")
                    && r.contains("ignored: no consistent")),
            "{v:?}"
        );
        // A weak judge alone cannot stand in for the users' evidence: 12
        // decided verdicts at 0.1 are 1.2 weighted items, fewer than 10.
        let weak = Judge {
            weight: 0.1,
            ..trusted
        };
        let v = judge(
            &p,
            &[&[prefers][..], &rest].concat(),
            &[],
            "general-retention",
            Some(&weak),
        );
        assert!(
            !v.passed && v.reasons[0].contains("1.2 weighted items, fewer than 10"),
            "{v:?}"
        );
    }

    #[test]
    fn latency_fails_when_shown_above_the_allowance() {
        let p = Policy::default();
        let tasks = vec!["routing".to_string()];
        let base = [
            m("routing", "pass_rate", 0.8, 0.1, 0.6, 0.8),
            m("general-retention", "pass_rate", 0.62, 0.63, -0.025, 0.01),
        ];
        let ratio = |est: f64, low: f64, high: f64| {
            let mut r = m(
                "latency",
                "solo_time_ratio",
                est,
                1.0,
                low - 1.0,
                high - 1.0,
            );
            r.items = 24;
            r
        };
        // Twice as slow, and shown so.
        let v = judge(
            &p,
            &[&base[..], &[ratio(2.0, 1.8, 2.2)]].concat(),
            &tasks,
            "general-retention",
            None,
        );
        assert!(
            !v.passed && v.reasons[2].starts_with("FAIL: latency (alone): 2.00x"),
            "{v:?}"
        );
        // A noisy 1.7x whose interval holds 1.2x: not shown above 1.5x.
        let v = judge(
            &p,
            &[&base[..], &[ratio(1.7, 1.2, 2.3)]].concat(),
            &tasks,
            "general-retention",
            None,
        );
        assert!(v.passed, "{v:?}");
        // Just above, tightly: shown above.
        let v = judge(
            &p,
            &[&base[..], &[ratio(1.56, 1.52, 1.6)]].concat(),
            &tasks,
            "general-retention",
            None,
        );
        assert!(!v.passed, "{v:?}");
    }

    #[test]
    fn latency_that_was_not_measured_fails_the_rule() {
        let p = Policy::default();
        let tasks = vec!["routing".to_string()];
        let metrics = [
            m("routing", "pass_rate", 0.8, 0.1, 0.6, 0.8),
            m("general-retention", "pass_rate", 0.62, 0.63, -0.025, 0.01),
        ];
        let v = judge(&p, &metrics, &tasks, "general-retention", None);
        assert!(!v.passed);
        assert!(
            v.reasons[2].starts_with("FAIL: latency was not measured"),
            "{v:?}"
        );
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
