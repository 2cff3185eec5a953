//! Turning completions and their votes into training examples: rater
//! quality, conflict resolution, filters, PII redaction, near-duplicate
//! removal, a cap per end user, and a train/eval split by prompt hash with
//! a minimum per kind. Pure and deterministic: the same inputs (in any
//! order) give the same output.
//!
//! Near-duplicates are judged on what varies between requests: system
//! messages that many completions share (an application's fixed system
//! prompt) are left out of the comparison, and only examples that teach
//! the same answer with the same verdict can be duplicates of each other.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::minhash::{LshIndex, MinHasher, normalize};
use crate::pii::{Redactions, redact};
use crate::raters::{self, Rated, RaterReport};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A logged completion, as the dataset builder needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub id: String,
    pub end_user: Option<String>,
    pub prompt: Vec<Message>,
    pub output: String,
    /// Seconds since the epoch; orders ties deterministically.
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rating {
    Up,
    Down,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    pub completion_id: String,
    pub end_user: String,
    pub rating: Rating,
    pub correction: Option<String>,
    pub created_at: i64,
}

/// The rules, all recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    pub redact_pii: bool,
    /// Estimated Jaccard similarity of prompts at which a later example is a duplicate.
    pub near_duplicate_threshold: f64,
    /// Examples per end user at most (0 = no cap).
    pub max_per_user: usize,
    pub min_output_chars: usize,
    pub max_output_chars: usize,
    /// Share of prompts (by hash) that go to the eval split.
    pub eval_fraction: f64,
    /// Examples of each kind of evidence (corrections, DPO pairs, KTO votes,
    /// SFT answers) the eval split holds at least, where that kind has four
    /// times as many (else a quarter of them, [`Rules::EVAL_SHARE_CAP`]):
    /// prompts are added to eval, the newest first (corrections first among
    /// SFT examples), until every kind has its minimum. The loop sets it to
    /// at least the gate's minimum of held-out items, so the gate can judge
    /// what the version trains.
    pub min_eval_examples: usize,
    /// A system message this many completions share is left out of the
    /// near-duplicate comparison (0: never).
    pub shared_system_min: usize,
    /// Votes of a rater that could be compared with other raters' before
    /// the rater can be left out.
    pub rater_min_compared: usize,
    /// Raters whose compared votes agree less often than this are left out
    /// (0: keep everyone).
    pub rater_min_agreement: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            redact_pii: true,
            near_duplicate_threshold: 0.8,
            max_per_user: 200,
            min_output_chars: 1,
            max_output_chars: 20_000,
            eval_fraction: 0.1,
            min_eval_examples: 10,
            shared_system_min: 3,
            rater_min_compared: 3,
            rater_min_agreement: 0.5,
        }
    }
}

impl Rules {
    /// The share of a kind of evidence the eval split takes to reach that
    /// kind's minimum: training keeps at least three quarters of each kind.
    pub const EVAL_SHARE_CAP: f64 = 0.25;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftExample {
    pub prompt: Vec<Message>,
    pub completion: String,
    /// Written by the user who voted the model's answer down, not the
    /// model's own liked answer: where the model was wrong.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub correction: bool,
    pub split: Split,
    /// The completion (and so the votes) it came from.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoPair {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub split: Split,
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KtoExample {
    pub prompt: Vec<Message>,
    pub completion: String,
    pub label: bool,
    pub split: Split,
    pub source: String,
}

/// What was dropped and why, for the manifest.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Counts {
    pub completions_seen: usize,
    pub without_votes: usize,
    pub tied_votes: usize,
    pub filtered_length: usize,
    pub near_duplicates: usize,
    pub over_user_cap: usize,
    /// Completions whose every vote came from a rater left out.
    pub rater_excluded: usize,
    pub redactions: Redactions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    TiedVotes,
    Length,
    NearDuplicate,
    OverUserCap,
    RaterExcluded,
}

/// A rated completion that made no example, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dropped {
    pub completion: String,
    pub reason: DropReason,
    /// For a near-duplicate: the completion whose example it repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Dataset {
    pub sft: Vec<SftExample>,
    pub dpo: Vec<DpoPair>,
    pub kto: Vec<KtoExample>,
    pub counts: Counts,
    /// Every rated completion left out, in input order.
    pub dropped: Vec<Dropped>,
    /// Every rater, with agreement and whether their votes were used.
    pub raters: Vec<RaterReport>,
    /// The share of prompt hashes in the eval split before the minimums
    /// (the rules' `eval_fraction`).
    pub eval_share: f64,
    /// Prompts added to eval, newest first, so that each kind of evidence
    /// has its minimum there.
    pub eval_filled: usize,
}

/// A completion whose votes were resolved.
struct Resolved<'a> {
    c: &'a Completion,
    up: bool,
    correction: Option<String>,
}

/// Latest vote per user, then the majority; a tie decides nothing. The
/// latest correction among the votes is kept.
fn resolve<'a>(c: &'a Completion, votes: &[&Vote]) -> Option<Resolved<'a>> {
    let latest = latest_votes(votes);
    let ups = latest.iter().filter(|v| v.rating == Rating::Up).count();
    let downs = latest.len() - ups;
    if ups == downs {
        return None;
    }
    let correction = votes
        .iter()
        .filter(|v| {
            v.correction
                .as_deref()
                .is_some_and(|t| !t.trim().is_empty())
        })
        .max_by_key(|v| v.created_at)
        .and_then(|v| v.correction.clone());
    Some(Resolved {
        c,
        up: ups > downs,
        correction,
    })
}

fn prompt_text(prompt: &[Message]) -> String {
    prompt
        .iter()
        .map(|m| format!("{}: {}", m.role, m.content))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Buckets of the split hash: a prompt is in eval when its bucket is below
/// `eval_share * SPLIT_BUCKETS`.
const SPLIT_BUCKETS: u64 = 10_000;

/// Stable across runs and machines (FNV-1a of the normalized prompt).
fn split_bucket(prompt_key: &str) -> u64 {
    let h = prompt_key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    h % SPLIT_BUCKETS
}

/// The split of a prompt by its hash alone (as the eval share of a build
/// places prompts before its minimums): for examples made outside a build,
/// such as a teacher's answers.
pub fn split_by_hash(prompt: &[Message], eval_fraction: f64) -> Split {
    let cutoff = (eval_fraction.clamp(0.0, 1.0) * SPLIT_BUCKETS as f64).round() as u64;
    if split_bucket(&prompt_text(prompt)) < cutoff {
        Split::Eval
    } else {
        Split::Train
    }
}

/// Where an example's prompt is and when its completion was made: what
/// the split is decided on.
#[derive(Debug, Clone)]
struct Placed {
    key: String,
    bucket: u64,
    /// The newest of its completions' times.
    time: i64,
}

/// The prompts that go to eval: those whose bucket falls below
/// `eval_fraction`'s share, then, kind by kind (corrections, which the gate
/// judges first; preference pairs; single votes; every SFT answer), the
/// newest prompts of that kind not yet in eval until it holds its minimum
/// (`min_eval_examples`, or a quarter of a smaller kind). Newest first, so
/// the votes since the last promotion, the corrections of the current
/// champion above all, are always what the gate reads. Returns the eval
/// prompts and how many were added beyond the hash share.
fn eval_prompts(kinds: [Vec<&Placed>; 4], rules: &Rules) -> (HashSet<String>, usize) {
    let cutoff = (rules.eval_fraction.clamp(0.0, 1.0) * SPLIT_BUCKETS as f64).round() as u64;
    let mut eval: HashSet<String> = kinds
        .iter()
        .flatten()
        .filter(|p| p.bucket < cutoff)
        .map(|p| p.key.clone())
        .collect();
    let mut filled = 0;
    for kind in kinds {
        let cap = (kind.len() as f64 * Rules::EVAL_SHARE_CAP).floor() as usize;
        let need = rules.min_eval_examples.min(cap);
        let mut held = kind.iter().filter(|p| eval.contains(&p.key)).count();
        let mut newest: Vec<&&Placed> = kind.iter().filter(|p| !eval.contains(&p.key)).collect();
        newest.sort_by(|a, b| (b.time, a.bucket, &a.key).cmp(&(a.time, b.bucket, &b.key)));
        for p in newest {
            if held >= need {
                break;
            }
            if eval.insert(p.key.clone()) {
                filled += 1;
            }
            held += kind.iter().filter(|q| q.key == p.key).count();
        }
    }
    (eval, filled)
}

fn split_of(key: &str, eval: &HashSet<String>) -> Split {
    if eval.contains(key) {
        Split::Eval
    } else {
        Split::Train
    }
}

/// System messages at least `min` completions share (normalized).
fn shared_systems(completions: &[Completion], min: usize) -> HashSet<String> {
    if min == 0 {
        return HashSet::new();
    }
    let mut seen: HashMap<String, HashSet<&str>> = HashMap::new();
    for c in completions {
        for m in c.prompt.iter().filter(|m| m.role == "system") {
            seen.entry(normalize(&m.content))
                .or_default()
                .insert(c.id.as_str());
        }
    }
    seen.into_iter()
        .filter(|(_, ids)| ids.len() >= min)
        .map(|(text, _)| text)
        .collect()
}

/// What varies between requests: the prompt without shared system
/// messages, normalized.
fn varying_prompt(prompt: &[Message], shared: &HashSet<String>) -> String {
    let kept: Vec<Message> = prompt
        .iter()
        .filter(|m| !(m.role == "system" && shared.contains(&normalize(&m.content))))
        .cloned()
        .collect();
    normalize(&prompt_text(&kept))
}

fn hash_text(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The latest vote of each end user among one completion's votes (a down
/// vote wins a tie in time).
fn latest_votes<'a>(votes: &[&'a Vote]) -> Vec<&'a Vote> {
    let mut latest: BTreeMap<&str, &Vote> = BTreeMap::new();
    for v in votes {
        let e = latest.entry(v.end_user.as_str()).or_insert(v);
        if (v.created_at, v.rating == Rating::Down) > (e.created_at, e.rating == Rating::Down) {
            *e = v;
        }
    }
    latest.into_values().collect()
}

/// Builds SFT, DPO and KTO examples from completions and their votes.
pub fn build(completions: &[Completion], votes: &[Vote], rules: &Rules) -> Dataset {
    let mut by_completion: HashMap<&str, Vec<&Vote>> = HashMap::new();
    for v in votes {
        by_completion
            .entry(v.completion_id.as_str())
            .or_default()
            .push(v);
    }
    let mut ordered: Vec<&Completion> = completions.iter().collect();
    ordered.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let shared = shared_systems(completions, rules.shared_system_min);
    let varying: HashMap<&str, String> = ordered
        .iter()
        .filter(|c| by_completion.contains_key(c.id.as_str()))
        .map(|c| (c.id.as_str(), varying_prompt(&c.prompt, &shared)))
        .collect();

    let mut ds = Dataset::default();

    // Rater quality, on every rater's latest vote per completion.
    let answers: HashMap<&str, String> = ordered
        .iter()
        .filter(|c| by_completion.contains_key(c.id.as_str()))
        .map(|c| (c.id.as_str(), raters::answer_key(&c.output)))
        .collect();
    let mut rated = Vec::new();
    for c in &ordered {
        let Some(vs) = by_completion.get(c.id.as_str()) else {
            continue;
        };
        for v in latest_votes(vs) {
            rated.push(Rated {
                user: v.end_user.as_str(),
                prompt: varying[c.id.as_str()].as_str(),
                answer: answers[c.id.as_str()].as_str(),
                up: v.rating == Rating::Up,
                correction: v
                    .correction
                    .as_deref()
                    .filter(|t| !t.trim().is_empty())
                    .map(raters::answer_key),
            });
        }
    }
    let rater_reports = if rules.rater_min_agreement > 0.0 {
        raters::assess(&rated, rules.rater_min_compared, rules.rater_min_agreement)
    } else {
        raters::assess(&rated, usize::MAX, 0.0)
    };
    let left_out: HashSet<&str> = rater_reports
        .iter()
        .filter(|r| r.excluded)
        .map(|r| r.user.as_str())
        .collect();

    let hasher = MinHasher::default();
    let mut seen = LshIndex::new(4, rules.near_duplicate_threshold);
    // The completion behind each entry of `seen`.
    let mut seen_ids: Vec<&str> = Vec::new();
    let mut per_user: HashMap<&str, usize> = HashMap::new();
    // Resolved answers grouped by normalized prompt, for DPO pairs.
    let mut groups: BTreeMap<String, Vec<(Resolved<'_>, Vec<Message>, String)>> = BTreeMap::new();
    // Where every example's prompt is, per kind, in push order.
    let (mut sft_b, mut dpo_b, mut kto_b) = (Vec::new(), Vec::new(), Vec::new());
    fn set_aside(ds: &mut Dataset, c: &Completion, reason: DropReason, duplicate_of: Option<&str>) {
        ds.dropped.push(Dropped {
            completion: c.id.clone(),
            reason,
            duplicate_of: duplicate_of.map(String::from),
        });
    }

    for c in ordered {
        ds.counts.completions_seen += 1;
        let Some(all) = by_completion.get(c.id.as_str()) else {
            ds.counts.without_votes += 1;
            continue;
        };
        let vs: Vec<&Vote> = all
            .iter()
            .copied()
            .filter(|v| !left_out.contains(v.end_user.as_str()))
            .collect();
        if vs.is_empty() {
            ds.counts.rater_excluded += 1;
            set_aside(&mut ds, c, DropReason::RaterExcluded, None);
            continue;
        }
        let Some(r) = resolve(c, &vs) else {
            ds.counts.tied_votes += 1;
            set_aside(&mut ds, c, DropReason::TiedVotes, None);
            continue;
        };
        // What the example teaches: a corrected down vote's correction, else
        // the output. Its length decides (an empty answer corrected by its
        // user still teaches the correction).
        let taught = match (&r.correction, r.up) {
            (Some(gold), false) => gold.as_str(),
            _ => c.output.as_str(),
        };
        let len = taught.trim().chars().count();
        if len < rules.min_output_chars.max(1) || len > rules.max_output_chars {
            ds.counts.filtered_length += 1;
            set_aside(&mut ds, c, DropReason::Length, None);
            continue;
        }
        let user = c.end_user.as_deref().unwrap_or("");
        if rules.max_per_user > 0
            && !user.is_empty()
            && per_user.get(user).copied().unwrap_or(0) >= rules.max_per_user
        {
            ds.counts.over_user_cap += 1;
            set_aside(&mut ds, c, DropReason::OverUserCap, None);
            continue;
        }
        let key = normalize(&prompt_text(&c.prompt));
        // Near-duplicate prompts that teach the same answer with the same
        // verdict add nothing; a duplicate prompt with another answer or
        // the opposite verdict still makes an example (and DPO pairs).
        let group = hash_text(&format!("{} {}", r.up, normalize(taught)));
        let signature = hasher.signature(&varying[c.id.as_str()]);
        match seen.insert_in(signature, group) {
            Err(dup) => {
                ds.counts.near_duplicates += 1;
                set_aside(&mut ds, c, DropReason::NearDuplicate, Some(seen_ids[dup]));
                continue;
            }
            Ok(_) => seen_ids.push(c.id.as_str()),
        }
        *per_user.entry(user).or_default() += 1;
        let mut clean = |t: &str| -> String {
            if rules.redact_pii {
                let (out, n) = redact(t);
                ds.counts.redactions.add(&n);
                out
            } else {
                t.to_string()
            }
        };
        let prompt: Vec<Message> = c
            .prompt
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: clean(&m.content),
            })
            .collect();
        let output = clean(&c.output);
        let correction = r.correction.as_deref().map(&mut clean);
        let placed = Placed {
            bucket: split_bucket(&key),
            key: key.clone(),
            time: c.created_at,
        };
        // Splits are set once every example is in (see `eval_prompts`).
        let split = Split::Train;
        if r.up {
            ds.sft.push(SftExample {
                prompt: prompt.clone(),
                completion: output.clone(),
                correction: false,
                split,
                source: c.id.clone(),
            });
            sft_b.push(placed.clone());
        } else if let Some(gold) = &correction {
            ds.sft.push(SftExample {
                prompt: prompt.clone(),
                completion: gold.clone(),
                correction: true,
                split,
                source: c.id.clone(),
            });
            sft_b.push(placed.clone());
        }
        // An empty answer is no preference or KTO example: its correction
        // (above) is what it teaches.
        if output.trim().is_empty() {
            continue;
        }
        if let (false, Some(gold)) = (r.up, &correction) {
            ds.dpo.push(DpoPair {
                prompt: prompt.clone(),
                chosen: gold.clone(),
                rejected: output.clone(),
                split,
                sources: vec![c.id.clone()],
            });
            dpo_b.push(placed.clone());
        }
        ds.kto.push(KtoExample {
            prompt: prompt.clone(),
            completion: output.clone(),
            label: r.up,
            split,
            source: c.id.clone(),
        });
        kto_b.push(placed);
        groups.entry(key).or_default().push((r, prompt, output));
    }
    for (key, answers) in groups {
        let bucket = split_bucket(&key);
        let ups = answers.iter().filter(|a| a.0.up);
        for (u, prompt, chosen) in ups {
            for (d, _, rejected) in answers.iter().filter(|a| !a.0.up) {
                ds.dpo.push(DpoPair {
                    prompt: prompt.clone(),
                    chosen: chosen.clone(),
                    rejected: rejected.clone(),
                    split: Split::Train,
                    sources: vec![u.c.id.clone(), d.c.id.clone()],
                });
                dpo_b.push(Placed {
                    key: key.clone(),
                    bucket,
                    time: u.c.created_at.max(d.c.created_at),
                });
            }
        }
    }
    let corrections = ds
        .sft
        .iter()
        .zip(&sft_b)
        .filter(|(e, _)| e.correction)
        .map(|(_, p)| p)
        .collect();
    let kinds = [
        corrections,
        dpo_b.iter().collect(),
        kto_b.iter().collect(),
        sft_b.iter().collect(),
    ];
    let (eval, filled) = eval_prompts(kinds, rules);
    ds.eval_share = rules.eval_fraction.clamp(0.0, 1.0);
    ds.eval_filled = filled;
    ds.raters = rater_reports;
    for (e, p) in ds.sft.iter_mut().zip(&sft_b) {
        e.split = split_of(&p.key, &eval);
    }
    for (e, p) in ds.dpo.iter_mut().zip(&dpo_b) {
        e.split = split_of(&p.key, &eval);
    }
    for (e, p) in ds.kto.iter_mut().zip(&kto_b) {
        e.split = split_of(&p.key, &eval);
    }
    ds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(id: &str, user: &str, prompt: &str, output: &str, t: i64) -> Completion {
        Completion {
            id: id.into(),
            end_user: Some(user.into()),
            prompt: vec![Message {
                role: "user".into(),
                content: prompt.into(),
            }],
            output: output.into(),
            created_at: t,
        }
    }

    fn vote(c: &str, user: &str, up: bool, t: i64, correction: Option<&str>) -> Vote {
        Vote {
            completion_id: c.into(),
            end_user: user.into(),
            rating: if up { Rating::Up } else { Rating::Down },
            correction: correction.map(String::from),
            created_at: t,
        }
    }

    #[test]
    fn latest_vote_per_user_then_majority() {
        let cs = vec![completion("a", "u", "What is 2+2?", "4", 1)];
        // v1 changes their mind to down; v2 and v3 say up: majority up.
        let vs = vec![
            vote("a", "v1", true, 1, None),
            vote("a", "v1", false, 2, None),
            vote("a", "v2", true, 3, None),
            vote("a", "v3", true, 4, None),
        ];
        let ds = build(&cs, &vs, &Rules::default());
        assert_eq!(ds.sft.len(), 1);
        assert!(ds.kto[0].label);
        // A tie decides nothing.
        let vs = vec![
            vote("a", "v1", true, 1, None),
            vote("a", "v2", false, 2, None),
        ];
        let ds = build(&cs, &vs, &Rules::default());
        assert_eq!(
            (ds.sft.len(), ds.kto.len(), ds.counts.tied_votes),
            (0, 0, 1)
        );
    }

    #[test]
    fn corrections_become_gold_answers_and_dpo_pairs() {
        let cs = vec![completion("a", "u", "Capital of France?", "Lyon", 1)];
        let vs = vec![vote("a", "v", false, 1, Some("Paris"))];
        let ds = build(&cs, &vs, &Rules::default());
        assert_eq!(ds.sft[0].completion, "Paris");
        assert_eq!(
            (ds.dpo[0].chosen.as_str(), ds.dpo[0].rejected.as_str()),
            ("Paris", "Lyon")
        );
        assert!(!ds.kto[0].label);
    }

    #[test]
    fn up_and_down_answers_to_one_prompt_pair_up() {
        let cs = vec![
            completion("a", "u1", "Name a fruit.", "Apple.", 1),
            completion("b", "u2", "name a FRUIT", "A car.", 2),
        ];
        let vs = vec![
            vote("a", "x", true, 3, None),
            vote("b", "y", false, 4, None),
        ];
        let ds = build(&cs, &vs, &Rules::default());
        assert_eq!(ds.dpo.len(), 1);
        assert_eq!(
            (ds.dpo[0].chosen.as_str(), ds.dpo[0].rejected.as_str()),
            ("Apple.", "A car.")
        );
        assert_eq!(ds.dpo[0].sources, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn duplicates_pii_caps_lengths_and_splits() {
        let rules = Rules {
            max_per_user: 2,
            ..Rules::default()
        };
        let mut cs = vec![
            completion(
                "p1",
                "alice",
                "Email me at ann@example.com please",
                "Sure, ann@example.com noted.",
                1,
            ),
            completion(
                "p2",
                "bob",
                "Email me at ann@example.com please!",
                "Sure, ann@example.com noted!",
                2,
            ), // duplicate: same prompt and answer, same verdict
            completion("p3", "bob", "", "   ", 3), // empty output
        ];
        for i in 0..4 {
            cs.push(completion(
                &format!("c{i}"),
                "carol",
                &format!("question number {i} about topic {}", i * 7),
                "answer",
                10 + i,
            ));
        }
        let mut vs: Vec<Vote> = cs
            .iter()
            .map(|c| vote(&c.id, "rater", true, 100, None))
            .collect();
        vs.push(vote("nobody", "x", true, 1, None));
        let ds = build(&cs, &vs, &rules);
        assert_eq!(ds.counts.near_duplicates, 1);
        assert_eq!(ds.counts.filtered_length, 1);
        assert_eq!(ds.counts.over_user_cap, 2, "carol is capped at 2");
        assert_eq!(ds.sft.len(), 3);
        let text = serde_json::to_string(&ds.sft).unwrap();
        assert!(!text.contains("ann@example.com") && text.contains("[EMAIL]"));
        assert_eq!(ds.counts.redactions.emails, 2);
        // Too few of any kind for a minimum: the split is the hash's alone.
        assert_eq!(ds.eval_filled, 0);
        let cutoff = (ds.eval_share * SPLIT_BUCKETS as f64).round() as u64;
        for e in &ds.sft {
            let bucket = split_bucket(&normalize(&prompt_text(&e.prompt)));
            assert_eq!(e.split == Split::Eval, bucket < cutoff);
        }
        // Why each rated completion made no example.
        let why: Vec<(&str, DropReason, Option<&str>)> = ds
            .dropped
            .iter()
            .map(|d| (d.completion.as_str(), d.reason, d.duplicate_of.as_deref()))
            .collect();
        assert_eq!(
            why,
            [
                ("p2", DropReason::NearDuplicate, Some("p1")),
                ("p3", DropReason::Length, None),
                ("c2", DropReason::OverUserCap, None),
                ("c3", DropReason::OverUserCap, None),
            ]
        );
    }

    #[test]
    fn an_empty_answer_its_user_corrected_still_teaches_the_correction() {
        let cs = vec![
            completion("empty", "ann", "route my ticket", "  ", 1),
            completion("empty-liked", "bob", "say nothing", "", 2),
            completion("short", "cy", "route this one", "no", 3),
        ];
        let vs = vec![
            vote("empty", "ann", false, 10, Some("ok")),
            vote("empty-liked", "bob", true, 11, None),
            vote("short", "cy", false, 12, Some("ok")),
        ];
        let ds = build(&cs, &vs, &Rules::default());
        let taught: Vec<(&str, &str)> = ds
            .sft
            .iter()
            .map(|e| (e.source.as_str(), e.completion.as_str()))
            .collect();
        assert_eq!(taught, [("empty", "ok"), ("short", "ok")]);
        // The liked empty answer teaches nothing; the corrected one makes no
        // pair or KTO example of its empty text.
        assert_eq!(ds.counts.filtered_length, 1);
        assert_eq!(ds.dropped[0].completion, "empty-liked");
        assert_eq!(ds.dpo.len(), 1);
        assert_eq!(ds.dpo[0].rejected, "no");
        assert_eq!(ds.kto.len(), 1);
        assert_eq!(ds.kto[0].source, "short");
    }

    fn with_system(id: &str, user: &str, system: &str, text: &str, output: &str) -> Completion {
        let mut c = completion(id, user, text, output, 1);
        c.prompt.insert(
            0,
            Message {
                role: "system".into(),
                content: system.into(),
            },
        );
        c
    }

    const SYSTEM: &str = "You are the support assistant of an online shop. Read the \
        customer's message and reply with a JSON object naming the intent of the message \
        and the order id it mentions, with no other text. The intents are track_order, \
        cancel_order, refund, change_address and complaint. Use null when no order id is \
        given. Be precise and never invent an order id.";

    #[test]
    fn a_shared_system_prompt_does_not_make_requests_duplicates() {
        // Six different customer messages answered the same way: the long
        // shared system prompt would make them near-duplicates.
        let texts = [
            "where is my parcel",
            "my order has not arrived",
            "when will my package come",
            "has my order shipped yet",
            "tracking shows nothing for my order",
            "is my delivery on its way",
        ];
        let cs: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| with_system(&format!("c{i}"), &format!("u{i}"), SYSTEM, t, "track"))
            .collect();
        let vs: Vec<_> = cs.iter().map(|c| vote(&c.id, "r", true, 5, None)).collect();
        let ds = build(&cs, &vs, &Rules::default());
        assert_eq!((ds.sft.len(), ds.counts.near_duplicates), (6, 0));
        // The shared system prompt stays in every example.
        assert!(ds.sft.iter().all(|e| e.prompt[0].content == SYSTEM));
        // Compared with the system prompt, they are duplicates of the first.
        let all_of_it = Rules {
            shared_system_min: 0,
            ..Rules::default()
        };
        let ds = build(&cs, &vs, &all_of_it);
        assert_eq!((ds.sft.len(), ds.counts.near_duplicates), (1, 5));
    }

    #[test]
    fn near_duplicate_prompts_with_different_right_answers_are_both_kept() {
        // Near, not equal: one word differs in a long message.
        let a = "hello I ordered a blue winter jacket last week and it still has not \
                 arrived can you tell me where it is right now please thanks a lot";
        let b = "hello I ordered a blue winter jacket last week and it still has not \
                 arrived can you tell me where it is right now please thanks so much";
        let cs = vec![
            with_system("a", "u1", SYSTEM, a, "I don't know."),
            with_system("b", "u2", SYSTEM, b, "I don't know."),
            with_system("c", "u3", SYSTEM, b, "I don't know."),
        ];
        let vs = vec![
            vote(
                "a",
                "u1",
                false,
                5,
                Some(r#"{"intent": "track_order", "order_id": "5015"}"#),
            ),
            vote(
                "b",
                "u2",
                false,
                6,
                Some(r#"{"intent": "track_order", "order_id": "7731"}"#),
            ),
            vote(
                "c",
                "u3",
                false,
                7,
                Some(r#"{"intent": "track_order", "order_id": "5015"}"#),
            ),
        ];
        let ds = build(&cs, &vs, &Rules::default());
        let kept: Vec<&str> = ds.sft.iter().map(|e| e.source.as_str()).collect();
        assert_eq!(kept, ["a", "b"], "c teaches what a teaches");
        assert_eq!(ds.dropped[0].duplicate_of.as_deref(), Some("a"));
    }

    #[test]
    fn the_eval_split_holds_a_minimum_of_each_kind() {
        let cs: Vec<_> = (0..40)
            .map(|i| {
                completion(
                    &format!("c{i}"),
                    &format!("u{i}"),
                    &format!("question {i} about subject {}", i * 31),
                    &format!("answer {i}"),
                    i,
                )
            })
            .collect();
        // 12 corrected down votes: 40 SFT, 12 DPO, 40 KTO examples.
        let vs: Vec<_> = (0..40)
            .map(|i| {
                let fix = format!("better answer {i}");
                let down = i % 10 < 3;
                vote(
                    &format!("c{i}"),
                    "r",
                    !down,
                    50,
                    down.then_some(fix.as_str()),
                )
            })
            .collect();
        let none = Rules {
            eval_fraction: 0.0,
            min_eval_examples: 0,
            ..Rules::default()
        };
        let ds = build(&cs, &vs, &none);
        assert_eq!((ds.sft.len(), ds.dpo.len(), ds.kto.len()), (40, 12, 40));
        assert!(ds.kto.iter().all(|e| e.split == Split::Train));
        let ds = build(
            &cs,
            &vs,
            &Rules {
                min_eval_examples: 8,
                ..none
            },
        );
        let evals = |splits: Vec<Split>| splits.iter().filter(|s| **s == Split::Eval).count();
        let sft = evals(ds.sft.iter().map(|e| e.split).collect());
        let dpo = evals(ds.dpo.iter().map(|e| e.split).collect());
        let kto = evals(ds.kto.iter().map(|e| e.split).collect());
        // Corrections and pairs: a quarter of 12; votes and answers: 8.
        assert_eq!((sft, dpo, kto), (8, 3, 8));
        assert_eq!(ds.eval_filled, 8);
        // The newest corrections are the held-out ones (those of the
        // champion now serving); the older ones train.
        let held: Vec<&str> = ds
            .sft
            .iter()
            .filter(|e| e.correction && e.split == Split::Eval)
            .map(|e| e.source.as_str())
            .collect();
        assert_eq!(held, ["c30", "c31", "c32"]);
        // Then the newest of the rest, for the votes' minimum.
        let rest: Vec<&str> = ds
            .kto
            .iter()
            .filter(|e| e.split == Split::Eval && e.label)
            .map(|e| e.source.as_str())
            .collect();
        assert_eq!(rest, ["c35", "c36", "c37", "c38", "c39"]);
        // One prompt, one split, whatever the kind.
        for d in &ds.dpo {
            let s = ds.sft.iter().find(|e| e.prompt == d.prompt).unwrap();
            assert_eq!(s.split, d.split);
        }
        // The same input in another order splits the same way.
        let mut shuffled = cs.clone();
        shuffled.reverse();
        let again = build(
            &shuffled,
            &vs,
            &Rules {
                min_eval_examples: 8,
                ..none
            },
        );
        assert_eq!(again.sft, ds.sft);
    }

    #[test]
    fn a_first_cycle_of_corrections_holds_out_what_the_gate_needs() {
        // 120 rated chats, 52 of them corrected: the gate's 10 held-out
        // corrections, the rest of them to train on.
        let cs: Vec<_> = (0..120)
            .map(|i| {
                completion(
                    &format!("c{i}"),
                    &format!("u{}", i % 12),
                    &format!("ticket {i}: my parcel {} went to {}", i * 17, i * 29),
                    "wrong",
                    i,
                )
            })
            .collect();
        let vs: Vec<_> = (0..120)
            .map(|i| {
                let down = i % 30 < 13;
                let fix = format!("fixed {i}");
                vote(
                    &format!("c{i}"),
                    "r",
                    !down,
                    200 + i,
                    down.then_some(fix.as_str()),
                )
            })
            .collect();
        let ds = build(&cs, &vs, &Rules::default());
        let corrections = ds.sft.iter().filter(|e| e.correction).count();
        let held = |e: &&SftExample| e.correction && e.split == Split::Eval;
        assert_eq!(corrections, 52);
        assert!(
            ds.sft.iter().filter(held).count() >= 10,
            "{:?}",
            ds.eval_filled
        );
        // At most a quarter, plus what the hash share put there.
        assert!(ds.sft.iter().filter(held).count() <= 13 + 6);
    }

    #[test]
    fn raters_who_disagree_with_everyone_are_left_out() {
        // Four prompts, each asked by three users; the model is wrong every
        // time. Two honest raters vote down (one corrects); the spammer
        // votes up.
        let mut cs = Vec::new();
        let mut vs = Vec::new();
        for i in 0..4 {
            let text = format!("question number {i} about the topic {}", i * 7);
            for (who, up, fix) in [
                ("honest-a", false, Some("right")),
                ("honest-b", false, None),
                ("spammer", true, None),
            ] {
                let id = format!("{who}-{i}");
                cs.push(completion(&id, who, &text, "wrong", i));
                vs.push(vote(&id, who, up, 20, fix));
            }
        }
        let ds = build(&cs, &vs, &Rules::default());
        let spam = ds.raters.iter().find(|r| r.user == "spammer").unwrap();
        assert!(spam.excluded && spam.agreement == Some(0.0), "{spam:?}");
        assert_eq!(ds.counts.rater_excluded, 4);
        assert!(ds.raters.iter().filter(|r| r.excluded).count() == 1);
        assert!(ds.kto.iter().all(|e| !e.label), "no up vote of the spammer");
        assert_eq!((ds.sft.len(), ds.kto.len()), (4, 8));
        // Without the rule the spammer's up votes become SFT examples of
        // the wrong answer.
        let everyone = Rules {
            rater_min_agreement: 0.0,
            ..Rules::default()
        };
        let ds = build(&cs, &vs, &everyone);
        assert_eq!(ds.sft.iter().filter(|e| e.completion == "wrong").count(), 4);
    }

    #[test]
    fn the_same_input_in_any_order_gives_the_same_dataset() {
        let cs: Vec<_> = (0..30)
            .map(|i| {
                completion(
                    &format!("c{i}"),
                    &format!("u{}", i % 4),
                    &format!("prompt {i} words {}", i * 13),
                    &format!("answer {i}"),
                    i,
                )
            })
            .collect();
        let vs: Vec<_> = (0..30)
            .map(|i| vote(&format!("c{i}"), "r", i % 3 != 0, 50 + i, None))
            .collect();
        let a = build(&cs, &vs, &Rules::default());
        let mut cs2 = cs.clone();
        cs2.reverse();
        let mut vs2 = vs.clone();
        vs2.reverse();
        assert_eq!(a, build(&cs2, &vs2, &Rules::default()));
        let evals = a.kto.iter().filter(|k| k.split == Split::Eval).count();
        assert!(evals < a.kto.len(), "not everything is eval");
    }
}
