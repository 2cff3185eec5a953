//! A judge: a model asked which of two answers to a question is better.
//!
//! A judge is only as good as its agreement with the people whose opinion
//! it stands in for, so before its verdicts count it is checked against the
//! team's own end users: on the preference pairs their votes made (the
//! answer they chose, the one they rejected), it is asked about every pair
//! twice, once with each answer first. A verdict counts only when both
//! orders agree; a judge that prefers whichever answer comes first (a
//! known bias of language-model judges) gives no consistent verdict and is
//! found out. Its agreement is the share of consistent verdicts that pick
//! the users' answer, with a Wilson interval; it is trusted when the
//! interval's lower bound is above a bar (chance is one half).

use serde::{Deserialize, Serialize};

use crate::run::Metric;
use crate::stats::{self, Interval, wilson};

/// The suite and metric of a judge's verdicts on the candidate's and the
/// champion's answers to the held-out prompts ([`preference`]).
pub const JUDGED: (&str, &str) = ("judge-heldout", "preference");

/// The question to the judge; `{question}`, `{first}` and `{second}` are
/// replaced. A team may give its own (`--prompt`), with the same places.
pub const DEFAULT_PROMPT: &str = "You are judging two answers to the same request. \
Decide which answer a careful user would prefer: the one that does what the request asks, \
correctly and helpfully.

[Request]
{question}

[Answer A]
{first}

[Answer B]
{second}

Reply with exactly one of: A, B, tie.";

/// The judge's prompt for one ordering.
pub fn prompt(template: &str, question: &str, first: &str, second: &str) -> String {
    // One pass, so an answer that contains `{second}` is not filled in.
    let mut out =
        String::with_capacity(template.len() + question.len() + first.len() + second.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let (value, len) = if tail.starts_with("{question}") {
            (question, "{question}".len())
        } else if tail.starts_with("{first}") {
            (first, "{first}".len())
        } else if tail.starts_with("{second}") {
            (second, "{second}".len())
        } else {
            ("{", 1)
        };
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// What the judge said about one ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    First,
    Second,
    Tie,
    /// Nothing that reads as A, B or tie.
    Unreadable,
}

/// Reads the judge's reply, as asked ("A", "B" or "tie", with whatever
/// markdown or punctuation around it), or as judges tend to phrase it
/// ("Answer B is better", "It's a tie", "Option A"); anything else is
/// unreadable rather than guessed.
pub fn parse(reply: &str) -> Verdict {
    let text = reply
        .to_lowercase()
        .replace(|c: char| !c.is_alphanumeric(), " ");
    let words: Vec<&str> = text.split_whitespace().collect();
    let side = |w: &str| match w {
        "a" => Some(Verdict::First),
        "b" => Some(Verdict::Second),
        _ => None,
    };
    match words.as_slice() {
        [] => return Verdict::Unreadable,
        [only] if *only == "tie" => return Verdict::Tie,
        [only] => return side(only).unwrap_or(Verdict::Unreadable),
        _ => {}
    }
    // "Answer B", "Option A", "Response A": the side after its noun.
    for pair in words.windows(2) {
        if matches!(pair[0], "answer" | "option" | "response")
            && let Some(v) = side(pair[1])
        {
            return v;
        }
    }
    if words.contains(&"tie") {
        return Verdict::Tie;
    }
    // "B is better", "B." with a reason after it: a reply that opens with a side.
    if words.len() > 1
        && matches!(words[1], "is" | "because" | "wins")
        && let Some(v) = side(words[0])
    {
        return v;
    }
    Verdict::Unreadable
}

/// The judge's verdict on a pair, from both orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairVerdict {
    /// It preferred the users' chosen answer in both orders.
    Chosen,
    /// It preferred the rejected answer in both orders.
    Rejected,
    /// A tie in both orders, or a tie in one and a preference in the other.
    Tie,
    /// The same position in both orders, or an unreadable reply.
    Inconsistent,
}

/// Combines the verdicts with the chosen answer first and with it second.
pub fn combine(chosen_first: Verdict, chosen_second: Verdict) -> PairVerdict {
    use Verdict::*;
    match (chosen_first, chosen_second) {
        (First, Second) => PairVerdict::Chosen,
        (Second, First) => PairVerdict::Rejected,
        (Unreadable, _) | (_, Unreadable) | (First, First) | (Second, Second) => {
            PairVerdict::Inconsistent
        }
        (Tie, _) | (_, Tie) => PairVerdict::Tie,
    }
}

/// How a judge did against the users on a set of pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    pub pairs: usize,
    pub chosen: usize,
    pub rejected: usize,
    pub ties: usize,
    pub inconsistent: usize,
    /// Of all its replies, the share that picked the first answer shown
    /// (0.5 for a judge without position bias).
    pub first_position_share: f64,
    /// Its replies that read as no verdict at all.
    #[serde(default)]
    pub unreadable: usize,
    /// The share of its consistent preferences that are the users'.
    pub agreement: f64,
    pub agreement_low: f64,
    pub agreement_high: f64,
    /// The lower bound its agreement must clear.
    pub bar: f64,
    pub trusted: bool,
    /// Why it is trusted or not, in words.
    pub reason: String,
}

/// The judge's record on `verdicts` (one per pair) and `replies` (both
/// orders of every pair), against `bar`.
pub fn agreement(verdicts: &[PairVerdict], replies: &[Verdict], bar: f64) -> Agreement {
    let count = |v: PairVerdict| verdicts.iter().filter(|&&x| x == v).count();
    let (chosen, rejected) = (count(PairVerdict::Chosen), count(PairVerdict::Rejected));
    let (ties, inconsistent) = (count(PairVerdict::Tie), count(PairVerdict::Inconsistent));
    let preferences = chosen + rejected;
    let Interval {
        estimate,
        low,
        high,
    } = wilson(chosen, preferences);
    let picked = replies
        .iter()
        .filter(|r| matches!(r, Verdict::First | Verdict::Second))
        .count();
    let firsts = replies.iter().filter(|r| **r == Verdict::First).count();
    let first_position_share = if picked == 0 {
        0.0
    } else {
        firsts as f64 / picked as f64
    };
    // Right where it is consistent is not enough: a judge consistent on a
    // handful of pairs is mostly position or noise.
    let consistent_enough = 2 * preferences >= verdicts.len();
    let trusted = preferences > 0 && consistent_enough && low > bar;
    let reason = if preferences == 0 {
        format!(
            "no consistent preference on {} pairs ({} inconsistent across the two orders; it picked the first answer shown in {:.0}% of its picks): ignored",
            verdicts.len(),
            inconsistent,
            100.0 * first_position_share
        )
    } else if !consistent_enough {
        format!(
            "a consistent preference on only {preferences} of {} pairs ({} inconsistent across the two orders, {ties} ties): ignored",
            verdicts.len(),
            inconsistent
        )
    } else if trusted {
        format!(
            "agrees with the users on {chosen} of {preferences} consistent preferences ({:.0}%, 95% interval {:.0}-{:.0}%), above the bar of {:.0}%",
            100.0 * estimate,
            100.0 * low,
            100.0 * high,
            100.0 * bar
        )
    } else {
        format!(
            "agrees with the users on {chosen} of {preferences} consistent preferences ({:.0}%, 95% interval {:.0}-{:.0}%), not shown above the bar of {:.0}%: ignored",
            100.0 * estimate,
            100.0 * low,
            100.0 * high,
            100.0 * bar
        )
    };
    Agreement {
        pairs: verdicts.len(),
        chosen,
        rejected,
        ties,
        inconsistent,
        first_position_share,
        unreadable: replies
            .iter()
            .filter(|r| **r == Verdict::Unreadable)
            .count(),
        agreement: estimate,
        agreement_low: low,
        agreement_high: high,
        bar,
        trusted,
        reason,
    }
}

impl Agreement {
    /// How much one of the judge's verdicts counts in the gate against one
    /// of the users' own held-out items: `2 * low - 1` of its agreement's
    /// interval, so 0 for a judge not shown better than a coin and 1 for
    /// one shown always to agree; 0 when it is not trusted.
    pub fn weight(&self) -> f64 {
        if self.trusted {
            (2.0 * self.agreement_low - 1.0).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// The judge's verdicts on held-out prompts, each from both orders, the
/// candidate's answer in the place of the users' chosen one: the share of
/// prompts it preferred the candidate's answer on against the share it
/// preferred the champion's (ties and inconsistent verdicts count for
/// neither), with the difference's paired interval.
pub fn preference(verdicts: &[PairVerdict]) -> Metric {
    let side = |want: PairVerdict| -> Vec<f64> {
        verdicts
            .iter()
            .map(|v| f64::from(u8::from(*v == want)))
            .collect()
    };
    Metric::paired(
        JUDGED.0,
        JUDGED.1,
        &side(PairVerdict::Chosen),
        &side(PairVerdict::Rejected),
        stats::mean,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_verdict_in_the_usual_phrasings() {
        assert_eq!(parse("A"), Verdict::First);
        assert_eq!(parse("Answer B is better."), Verdict::Second);
        assert_eq!(parse("**Tie**"), Verdict::Tie);
        assert_eq!(parse("I cannot decide"), Verdict::Unreadable);
        assert_eq!(parse("Answer: b"), Verdict::Second);
        assert_eq!(parse("It's a tie."), Verdict::Tie);
        assert_eq!(parse("A tie"), Verdict::Tie);
        assert_eq!(
            parse("B is better because it routes the ticket."),
            Verdict::Second
        );
        assert_eq!(parse("**A**"), Verdict::First);
        // An article is not a verdict.
        assert_eq!(
            parse("As a careful user I would pick B"),
            Verdict::Unreadable
        );
    }

    #[test]
    fn fills_the_template_once() {
        let p = prompt(
            "{question}|{first}|{second}|{other}",
            "q",
            "has {second}",
            "s",
        );
        assert_eq!(p, "q|has {second}|s|{other}");
    }

    #[test]
    fn a_judge_that_always_picks_the_first_answer_is_found_out() {
        let verdicts: Vec<_> = (0..30)
            .map(|_| combine(Verdict::First, Verdict::First))
            .collect();
        let a = agreement(&verdicts, &[Verdict::First; 60], 0.6);
        assert_eq!((a.inconsistent, a.unreadable), (30, 0));
        assert!(!a.trusted);
        assert_eq!(a.first_position_share, 1.0);
        assert!(a.reason.contains("ignored"), "{}", a.reason);
    }

    #[test]
    fn a_judge_that_agrees_with_users_is_trusted_and_a_coin_is_not() {
        let agreeing: Vec<_> = (0..30)
            .map(|i| match i % 10 {
                0 => combine(Verdict::Second, Verdict::First),
                _ => combine(Verdict::First, Verdict::Second),
            })
            .collect();
        let a = agreement(&agreeing, &[], 0.6);
        assert_eq!((a.chosen, a.rejected), (27, 3));
        assert!(a.trusted, "{}", a.reason);

        let coin: Vec<_> = (0..30)
            .map(|i| match i % 2 {
                0 => PairVerdict::Chosen,
                _ => PairVerdict::Rejected,
            })
            .collect();
        let c = agreement(&coin, &[], 0.6);
        assert!(!c.trusted && c.agreement_low < 0.5, "{}", c.reason);
    }

    #[test]
    fn a_judge_consistent_on_few_pairs_is_not_trusted() {
        let mut verdicts = vec![PairVerdict::Chosen; 10];
        verdicts.extend([PairVerdict::Inconsistent; 30]);
        let a = agreement(&verdicts, &[], 0.6);
        assert!(a.agreement_low > 0.6 && !a.trusted, "{}", a.reason);
    }

    #[test]
    fn the_weight_grows_with_the_agreement_shown() {
        let right = |n: usize, of: usize| {
            let mut v = vec![PairVerdict::Chosen; n];
            v.extend(vec![PairVerdict::Rejected; of - n]);
            agreement(&v, &[], 0.6)
        };
        let (few, many) = (right(12, 12), right(60, 60));
        assert!(few.trusted && many.trusted);
        // Shown right on more pairs, it counts for more; never above one.
        assert!(
            few.weight() > 0.4 && few.weight() < many.weight(),
            "{few:?}"
        );
        assert!(many.weight() <= 1.0);
        // Right on 70% of 30 is not shown above 60%: no weight at all.
        let middling = right(21, 30);
        assert!(
            !middling.trusted && middling.weight() == 0.0,
            "{middling:?}"
        );
    }

    #[test]
    fn preference_counts_the_candidate_against_the_champion() {
        use PairVerdict::*;
        let m = preference(&[Chosen, Chosen, Chosen, Rejected, Tie, Inconsistent]);
        assert_eq!((m.suite.as_str(), m.metric.as_str()), JUDGED);
        assert_eq!(m.items, 6);
        assert!((m.candidate - 0.5).abs() < 1e-9 && (m.champion - 1.0 / 6.0).abs() < 1e-9);
        assert!(m.ci_low < m.difference && m.difference < m.ci_high, "{m:?}");
    }

    #[test]
    fn ties_and_mixed_orders_are_not_preferences() {
        assert_eq!(combine(Verdict::Tie, Verdict::Tie), PairVerdict::Tie);
        assert_eq!(combine(Verdict::Tie, Verdict::Second), PairVerdict::Tie);
        assert_eq!(
            combine(Verdict::Second, Verdict::Second),
            PairVerdict::Inconsistent
        );
        assert_eq!(
            combine(Verdict::Unreadable, Verdict::Second),
            PairVerdict::Inconsistent
        );
    }
}
