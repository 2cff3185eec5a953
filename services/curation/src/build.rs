//! Turning completions and their votes into training examples: conflict
//! resolution, filters, PII redaction, near-duplicate removal, a cap per
//! end user, and a train/eval split by prompt hash. Pure and
//! deterministic: the same inputs (in any order) give the same output.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::minhash::{LshIndex, MinHasher, normalize};
use crate::pii::{Redactions, redact};

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
#[serde(default)]
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
        }
    }
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
    pub redactions: Redactions,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Dataset {
    pub sft: Vec<SftExample>,
    pub dpo: Vec<DpoPair>,
    pub kto: Vec<KtoExample>,
    pub counts: Counts,
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
    let mut latest: BTreeMap<&str, &Vote> = BTreeMap::new();
    for v in votes {
        let e = latest.entry(v.end_user.as_str()).or_insert(v);
        if (v.created_at, v.rating == Rating::Down) > (e.created_at, e.rating == Rating::Down) {
            *e = v;
        }
    }
    let ups = latest.values().filter(|v| v.rating == Rating::Up).count();
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

/// Stable across runs and machines (FNV-1a of the normalized prompt).
fn split_of(prompt_key: &str, eval_fraction: f64) -> Split {
    let h = prompt_key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    if ((h % 10_000) as f64) < eval_fraction * 10_000.0 {
        Split::Eval
    } else {
        Split::Train
    }
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

    let mut ds = Dataset::default();
    let hasher = MinHasher::default();
    let mut seen = LshIndex::new(4, rules.near_duplicate_threshold);
    let mut per_user: HashMap<&str, usize> = HashMap::new();
    // Resolved answers grouped by normalized prompt, for DPO pairs.
    let mut groups: BTreeMap<String, Vec<(Resolved<'_>, Vec<Message>, String)>> = BTreeMap::new();

    for c in ordered {
        ds.counts.completions_seen += 1;
        let Some(vs) = by_completion.get(c.id.as_str()) else {
            ds.counts.without_votes += 1;
            continue;
        };
        let Some(r) = resolve(c, vs) else {
            ds.counts.tied_votes += 1;
            continue;
        };
        let len = c.output.trim().chars().count();
        if len < rules.min_output_chars.max(1) || len > rules.max_output_chars {
            ds.counts.filtered_length += 1;
            continue;
        }
        let user = c.end_user.as_deref().unwrap_or("");
        if rules.max_per_user > 0
            && !user.is_empty()
            && per_user.get(user).copied().unwrap_or(0) >= rules.max_per_user
        {
            ds.counts.over_user_cap += 1;
            continue;
        }
        let key = normalize(&prompt_text(&c.prompt));
        // Near-duplicate prompts with the same verdict add nothing; a
        // duplicate prompt with the opposite verdict still makes a DPO pair.
        let dup = seen
            .insert(hasher.signature(&format!("{key} {}", r.up)))
            .is_err();
        if dup {
            ds.counts.near_duplicates += 1;
            continue;
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
        let split = split_of(&key, rules.eval_fraction);
        if r.up {
            ds.sft.push(SftExample {
                prompt: prompt.clone(),
                completion: output.clone(),
                split,
                source: c.id.clone(),
            });
        } else if let Some(gold) = &correction {
            ds.sft.push(SftExample {
                prompt: prompt.clone(),
                completion: gold.clone(),
                split,
                source: c.id.clone(),
            });
            ds.dpo.push(DpoPair {
                prompt: prompt.clone(),
                chosen: gold.clone(),
                rejected: output.clone(),
                split,
                sources: vec![c.id.clone()],
            });
        }
        ds.kto.push(KtoExample {
            prompt: prompt.clone(),
            completion: output.clone(),
            label: r.up,
            split,
            source: c.id.clone(),
        });
        groups.entry(key).or_default().push((r, prompt, output));
    }
    for (key, answers) in groups {
        let split = split_of(&key, rules.eval_fraction);
        let ups = answers.iter().filter(|a| a.0.up);
        for (u, prompt, chosen) in ups {
            for (d, _, rejected) in answers.iter().filter(|a| !a.0.up) {
                ds.dpo.push(DpoPair {
                    prompt: prompt.clone(),
                    chosen: chosen.clone(),
                    rejected: rejected.clone(),
                    split,
                    sources: vec![u.c.id.clone(), d.c.id.clone()],
                });
            }
        }
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
                "Sure.",
                2,
            ), // near duplicate, same verdict
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
        // The split is a function of the prompt alone.
        for e in &ds.sft {
            assert_eq!(
                e.split,
                split_of(&normalize(&prompt_text(&e.prompt)), rules.eval_fraction)
            );
        }
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
