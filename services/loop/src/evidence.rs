//! Whether the gate could judge a candidate trained on a dataset version,
//! decided before any training is spent on it. With no task suite, the
//! gate's evidence that a candidate is better is the version's held-out
//! corrections (what users wrote where the champion was wrong) or, failing
//! those, its held-out preference pairs; it needs `min_items` of one of
//! them. Curation holds out at least that many of a kind once the kind is
//! large enough (at most a share of it goes to eval), so when a version
//! falls short the loop says how many more corrections would do it.

use flywheel_store::datasets::EvidenceCounts;
use serde::{Deserialize, Serialize};

/// What the gate needs, as the cycle was started with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Needs {
    /// Held-out examples of one kind the gate needs (the policy's
    /// `min_items`).
    pub min_items: usize,
    /// The share of a kind curation may hold out to reach its minimum.
    pub eval_share_cap: f64,
}

/// What a version offers the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgeable {
    /// By the team's own task suites.
    Suites(usize),
    /// By held-out corrections.
    Corrections(i64),
    /// By held-out preference pairs.
    Pairs(i64),
    /// Not at all; the text says what is missing and how much more would do.
    No(String),
}

/// Judges `counts` (a version's evidence) for a team with `suites` task
/// suites.
pub fn judgeable(counts: &EvidenceCounts, suites: usize, needs: &Needs) -> Judgeable {
    let min = needs.min_items as i64;
    if suites > 0 {
        return Judgeable::Suites(suites);
    }
    if counts.eval_corrections >= min {
        return Judgeable::Corrections(counts.eval_corrections);
    }
    if counts.eval_pairs >= min {
        return Judgeable::Pairs(counts.eval_pairs);
    }
    // Corrections of a kind this large put `min` in eval.
    let enough = (needs.min_items as f64 / needs.eval_share_cap.clamp(1e-6, 1.0)).ceil() as i64;
    let more = (enough - counts.corrections).max(1);
    Judgeable::No(format!(
        "too little held-out evidence to judge a candidate: the gate needs {min} held-out \
         corrections or preference pairs (or a task suite), and this version holds out {} of \
         {} corrections and {} of {} pairs; about {more} more corrections will do \
         ({enough} hold {min} out)",
        counts.eval_corrections, counts.corrections, counts.eval_pairs, counts.pairs,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEEDS: Needs = Needs {
        min_items: 10,
        eval_share_cap: 0.25,
    };

    #[test]
    fn corrections_then_pairs_then_a_shortfall_in_votes_to_come() {
        let mut c = EvidenceCounts {
            corrections: 52,
            eval_corrections: 10,
            pairs: 52,
            eval_pairs: 10,
            votes: 120,
            eval_votes: 18,
        };
        assert_eq!(judgeable(&c, 0, &NEEDS), Judgeable::Corrections(10));
        c.eval_corrections = 9;
        assert_eq!(judgeable(&c, 0, &NEEDS), Judgeable::Pairs(10));
        // A team that wrote a suite is judged by it whatever its votes.
        assert_eq!(judgeable(&c, 1, &NEEDS), Judgeable::Suites(1));
        c = EvidenceCounts {
            corrections: 24,
            eval_corrections: 6,
            pairs: 26,
            eval_pairs: 7,
            votes: 120,
            eval_votes: 20,
        };
        match judgeable(&c, 0, &NEEDS) {
            Judgeable::No(why) => {
                assert!(why.contains("holds out 6 of 24 corrections"), "{why}");
                assert!(why.contains("about 16 more corrections"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
}
