//! Rater quality: how often each end user's votes agree with what the other
//! raters said about the same prompt and answer. A vote is compared with
//! another rater's correction for that prompt when there is one (the answer
//! is right exactly when it is that correction), else with the majority of
//! the other raters' votes on the same answer. Raters with enough compared
//! votes whose agreement is below the rule's minimum (contrarians,
//! brigades, spam that votes up whatever it sees) are left out of the
//! dataset; the report lists every rater either way. Two rounds: the
//! second compares with the raters the first kept, so a group of spammers
//! agreeing with each other does not vouch for itself.
//!
//! Votes with nothing to compare with (nobody else rated that prompt) are
//! not evidence either way: a rater who always votes the same way is
//! reported (`constant`) but kept unless compared votes say otherwise, since
//! with a model that is always wrong an honest rater votes down every time.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::minhash::normalize;

/// One rater's vote, reduced to what the comparison needs.
#[derive(Debug, Clone)]
pub struct Rated<'a> {
    pub user: &'a str,
    /// What varies between requests (the curation builder's prompt key).
    pub prompt: &'a str,
    /// The normalized answer that was rated.
    pub answer: &'a str,
    pub up: bool,
    /// The rater's correction, normalized.
    pub correction: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RaterReport {
    pub user: String,
    pub votes: usize,
    pub ups: usize,
    /// Votes another rater's vote or correction could be compared with.
    pub compared: usize,
    pub agreeing: usize,
    /// `agreeing / compared`, when anything was compared.
    pub agreement: Option<f64>,
    /// Ten or more votes, every one the same way.
    pub constant: bool,
    pub excluded: bool,
}

/// Votes a rater needs, all one way, to be reported as `constant`.
pub const CONSTANT_MIN_VOTES: usize = 10;

/// Reports every rater in `votes` (one latest vote per rater and
/// completion), sorted by user; `excluded` is set by the rule
/// `compared >= min_compared && agreement < min_agreement`. The second
/// round's numbers are reported where it compared enough votes, else the
/// first round's.
pub fn assess(votes: &[Rated<'_>], min_compared: usize, min_agreement: f64) -> Vec<RaterReport> {
    let first = compare(votes, None, min_compared, min_agreement);
    let kept: HashSet<String> = first
        .iter()
        .filter(|r| !r.excluded)
        .map(|r| r.user.clone())
        .collect();
    let second = compare(votes, Some(&kept), min_compared, min_agreement);
    first
        .into_iter()
        .zip(second)
        .map(|(a, b)| if b.compared >= min_compared { b } else { a })
        .collect()
}

fn compare(
    votes: &[Rated<'_>],
    evidence_from: Option<&HashSet<String>>,
    min_compared: usize,
    min_agreement: f64,
) -> Vec<RaterReport> {
    let counts = |u: &str| evidence_from.is_none_or(|k| k.contains(u));
    // Per prompt: who corrected it and to what. Per (prompt, answer): who
    // voted which way.
    let mut corrections: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    let mut verdicts: HashMap<(&str, &str), Vec<(&str, bool)>> = HashMap::new();
    for v in votes.iter().filter(|v| counts(v.user)) {
        if let Some(c) = &v.correction {
            corrections
                .entry(v.prompt)
                .or_default()
                .push((v.user, c.as_str()));
        }
        verdicts
            .entry((v.prompt, v.answer))
            .or_default()
            .push((v.user, v.up));
    }
    let mut by_user: BTreeMap<&str, RaterReport> = BTreeMap::new();
    for v in votes {
        let r = by_user.entry(v.user).or_insert_with(|| RaterReport {
            user: v.user.to_string(),
            votes: 0,
            ups: 0,
            compared: 0,
            agreeing: 0,
            agreement: None,
            constant: false,
            excluded: false,
        });
        r.votes += 1;
        r.ups += usize::from(v.up);
        let right: Vec<&str> = corrections
            .get(v.prompt)
            .into_iter()
            .flatten()
            .filter(|(u, _)| *u != v.user)
            .map(|(_, c)| *c)
            .collect();
        let expected = if !right.is_empty() {
            Some(right.contains(&v.answer))
        } else {
            let others = verdicts
                .get(&(v.prompt, v.answer))
                .into_iter()
                .flatten()
                .filter(|(u, _)| *u != v.user);
            let (ups, all) = others.fold((0, 0), |(u, a), (_, up)| (u + usize::from(*up), a + 1));
            (all > 0 && 2 * ups != all).then_some(2 * ups > all)
        };
        if let Some(expected) = expected {
            r.compared += 1;
            r.agreeing += usize::from(expected == v.up);
        }
    }
    by_user
        .into_values()
        .map(|mut r| {
            r.agreement = (r.compared > 0).then(|| r.agreeing as f64 / r.compared as f64);
            r.constant = r.votes >= CONSTANT_MIN_VOTES && (r.ups == 0 || r.ups == r.votes);
            r.excluded =
                r.compared >= min_compared && r.agreement.is_some_and(|a| a < min_agreement);
            r
        })
        .collect()
}

/// The normalized form answers and corrections are compared in.
pub fn answer_key(text: &str) -> String {
    normalize(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rated<'a>(user: &'a str, prompt: &'a str, answer: &'a str, up: bool) -> Rated<'a> {
        Rated {
            user,
            prompt,
            answer,
            up,
            correction: None,
        }
    }

    #[test]
    fn contrarians_and_spam_are_left_out_and_honest_raters_kept() {
        let prompts: Vec<String> = (0..6).map(|i| format!("prompt {i}")).collect();
        let mut votes = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            // The model is right on a third of the prompts. Two honest
            // raters, one of whom corrects the wrong answers; a contrarian;
            // a spammer who votes up whatever it sees.
            let right = i % 3 == 0;
            votes.push(rated("honest-a", p, "answer", right));
            let mut b = rated("honest-b", p, "answer", right);
            if !right {
                b.correction = Some("the right answer".into());
            }
            votes.push(b);
            votes.push(rated("contrarian", p, "answer", !right));
            votes.push(rated("spammer", p, "answer", true));
        }
        let reports = assess(&votes, 3, 0.5);
        let by: HashMap<&str, &RaterReport> =
            reports.iter().map(|r| (r.user.as_str(), r)).collect();
        assert!(!by["honest-a"].excluded && !by["honest-b"].excluded);
        assert_eq!(by["honest-a"].agreement, Some(1.0));
        assert!(by["contrarian"].excluded, "{:?}", by["contrarian"]);
        assert_eq!(by["contrarian"].agreement, Some(0.0));
        // Agrees where the model was right, not where it was corrected.
        assert!(by["spammer"].excluded, "{:?}", by["spammer"]);
        assert_eq!(by["spammer"].agreement, Some(2.0 / 6.0));
    }

    #[test]
    fn a_rater_with_little_to_compare_is_kept_and_a_constant_one_reported() {
        let prompts: Vec<String> = (0..12).map(|i| format!("prompt {i}")).collect();
        let mut votes: Vec<Rated> = prompts
            .iter()
            .map(|p| rated("always-down", p, "answer", false))
            .collect();
        // Two prompts rated by a second rater who disagrees: two compared
        // votes each, below the minimum of three, so neither is left out.
        votes.push(rated("other", &prompts[0], "answer", true));
        votes.push(rated("other", &prompts[1], "answer", true));
        let reports = assess(&votes, 3, 0.5);
        let down = reports.iter().find(|r| r.user == "always-down").unwrap();
        assert!(down.constant && !down.excluded);
        assert_eq!((down.compared, down.agreeing), (2, 0));
        let other = reports.iter().find(|r| r.user == "other").unwrap();
        assert_eq!((other.compared, other.agreeing), (2, 0));
        assert!(!other.excluded && !other.constant);
        // Three disagreements and nobody else to back either of them: both
        // are left out.
        votes.push(rated("other", &prompts[2], "answer", true));
        let reports = assess(&votes, 3, 0.5);
        assert!(reports.iter().all(|r| r.excluded), "{reports:?}");
        // A third rater who sides with one of them settles it.
        for p in &prompts[..3] {
            votes.push(rated("third", p, "answer", false));
        }
        let reports = assess(&votes, 3, 0.5);
        let excluded: Vec<&str> = reports
            .iter()
            .filter(|r| r.excluded)
            .map(|r| r.user.as_str())
            .collect();
        assert_eq!(excluded, ["other"]);
    }

    #[test]
    fn a_brigade_does_not_vouch_for_itself() {
        // Three honest raters down-vote a wrong answer and one corrects it;
        // four brigade accounts up-vote it. Round one compares everyone
        // with everyone; round two only with the raters round one kept.
        let mut votes = Vec::new();
        let prompts: Vec<String> = (0..4).map(|i| format!("prompt {i}")).collect();
        for p in &prompts {
            for u in ["h1", "h2", "h3"] {
                let mut v = rated(u, p, "wrong", false);
                if u == "h1" {
                    v.correction = Some("right".into());
                }
                votes.push(v);
            }
            for u in ["b1", "b2", "b3", "b4"] {
                votes.push(rated(u, p, "wrong", true));
            }
        }
        let reports = assess(&votes, 3, 0.5);
        for r in &reports {
            assert_eq!(r.excluded, r.user.starts_with('b'), "{r:?}");
        }
    }
}
