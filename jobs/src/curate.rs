//! The curation job: read a scope's votes and the completions they rate from
//! one consistent snapshot, build SFT / DPO / KTO examples with the curation
//! rules, and store them as a new immutable dataset version with its
//! manifest and lineage. The same input (votes and rules) finds the version
//! it made before instead of making another.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use flywheel_curation::build::{self, Completion, Dataset, Message, Rating, Rules, Split, Vote};
use flywheel_curation::pii;
use flywheel_curation::raters::RaterReport;
use flywheel_store::PgPool;
use flywheel_store::datasets::{
    self, LineageRow, NewExample, NewVersion, RatedCompletion, Scope, VoteRow,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Bumped whenever the builder's output for the same input changes, so old
/// fingerprints stop matching.
pub const BUILDER: &str = "flywheel-curation/1";

/// What to build: whose feedback, with which rules, up to when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurateJob {
    pub scope: Scope,
    #[serde(default)]
    pub rules: Rules,
    /// Votes recorded after this are left out (default: when the build starts).
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// The loop's cycle this build is the first stage of, if any.
    #[serde(default)]
    pub cycle: Option<Uuid>,
}

/// What a build did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The version holding this input (`None`: there were no votes).
    pub version_id: Option<Uuid>,
    pub version: Option<i32>,
    /// False when an earlier build of the same input was found.
    pub created: bool,
    pub sft: usize,
    pub dpo: usize,
    pub kto: usize,
    pub votes_read: usize,
    pub completions_read: usize,
    pub load_ms: u64,
    pub build_ms: u64,
    pub write_ms: u64,
    /// What the loop's own distillation did first, if the cycle has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distilled: Option<String>,
}

/// Builds (or finds) the dataset version for `job`.
#[tracing::instrument(name = "curate", skip_all, err, fields(scope = ?job.scope))]
pub async fn run(pool: &PgPool, job: &CurateJob) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    // One snapshot for both reads, so votes and completions agree.
    let mut tx = datasets::begin_snapshot(pool).await?;
    let teams = datasets::scope_teams(&mut *tx, job.scope).await?;
    if let Scope::Team(id) = job.scope
        && teams.is_empty()
    {
        bail!("team {id} does not exist");
    }
    let until = match job.until {
        Some(t) => t,
        None => flywheel_store::now(&mut *tx).await?,
    };
    // The vote ids decide whether a version with this input exists; only
    // when none does are the votes and completions read whole.
    let ids = datasets::vote_ids(&mut *tx, &teams, until).await?;
    let votes_read = ids.len();
    // A team's newest distillation is mixed into its curated versions.
    let distilled = match job.scope {
        Scope::Team(team) => datasets::newest_distilled(&mut *tx, team).await?,
        Scope::Shared => None,
    };
    let fingerprint = fingerprint(job, ids, distilled.as_ref().map(|d| d.id));
    if let Some(v) = datasets::find_by_fingerprint(&mut *tx, job.scope, &fingerprint).await? {
        tx.commit().await?;
        let load_ms = t0.elapsed().as_millis() as u64;
        tracing::info!(
            load_ms,
            version = v.version,
            "nothing new since this version"
        );
        return Ok(found(
            Outcome {
                votes_read,
                load_ms,
                ..Outcome::default()
            },
            &v,
        ));
    }
    let votes = datasets::votes(&mut *tx, &teams, until).await?;
    let completions = datasets::rated_completions(&mut *tx, &teams, until).await?;
    let distilled = match distilled {
        Some(d) => Some(Distilled {
            examples: datasets::examples(&mut *tx, d.id, "sft", None).await?,
            lineage: datasets::lineage(&mut *tx, d.id).await?,
            version: d,
        }),
        None => None,
    };
    tx.commit().await?;
    let load_ms = t0.elapsed().as_millis() as u64;
    tracing::info!(
        votes = votes.len(),
        completions = completions.len(),
        load_ms,
        "curation input loaded"
    );

    let mut outcome = Outcome {
        version_id: None,
        version: None,
        created: false,
        sft: 0,
        dpo: 0,
        kto: 0,
        votes_read: votes.len(),
        completions_read: completions.len(),
        load_ms,
        build_ms: 0,
        write_ms: 0,
        distilled: None,
    };
    if votes.is_empty() {
        return Ok(outcome);
    }

    let t1 = Instant::now();
    let (job2, fp) = (job.clone(), fingerprint.clone());
    let built =
        tokio::task::spawn_blocking(move || assemble(&job2, fp, &votes, completions, distilled))
            .await
            .context("dataset build panicked")??;
    outcome.build_ms = t1.elapsed().as_millis() as u64;
    // Tests stop a worker here, between the build and the write.
    if let Some(p) = crate::faults::get().curate_pause {
        tokio::time::sleep(p).await;
    }

    let t2 = Instant::now();
    let mut tx = pool.begin().await?;
    let number =
        datasets::insert_version(&mut tx, &built.version, &built.examples, &built.lineage).await?;
    tx.commit().await?;
    outcome.write_ms = t2.elapsed().as_millis() as u64;
    match number {
        Some(n) => {
            outcome.version_id = Some(built.version.id);
            outcome.version = Some(n);
            outcome.created = true;
            outcome.sft = built.version.sft_count as usize;
            outcome.dpo = built.version.dpo_count as usize;
            outcome.kto = built.version.kto_count as usize;
            Ok(outcome)
        }
        // A concurrent build of the same input won the race.
        None => {
            let v = datasets::find_by_fingerprint(pool, job.scope, &fingerprint)
                .await?
                .context("dataset version vanished after a concurrent build")?;
            Ok(found(outcome, &v))
        }
    }
}

fn found(mut o: Outcome, v: &datasets::DatasetVersion) -> Outcome {
    o.version_id = Some(v.id);
    o.version = Some(v.version);
    o.sft = v.sft_count as usize;
    o.dpo = v.dpo_count as usize;
    o.kto = v.kto_count as usize;
    o
}

/// Hash of the builder, scope, rules and every vote id read. Votes are never
/// edited (a new vote is a new row), and deleting data deletes its votes, so
/// the ids say exactly what the input was.
/// And the distilled version mixed in, if any: a new distillation makes a
/// new version.
fn fingerprint(job: &CurateJob, mut ids: Vec<Uuid>, distilled: Option<Uuid>) -> String {
    let mut h = Sha256::new();
    h.update(BUILDER.as_bytes());
    h.update(serde_json::to_vec(&job.scope).unwrap_or_default());
    h.update(serde_json::to_vec(&job.rules).unwrap_or_default());
    ids.sort();
    for id in ids {
        h.update(id.as_bytes());
    }
    if let Some(d) = distilled {
        h.update(b"distilled");
        h.update(d.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A distilled version's SFT examples (a teacher's answers to the team's
/// prompts) and lineage, to mix with the votes' examples.
struct Distilled {
    version: datasets::DatasetVersion,
    examples: Vec<(String, serde_json::Value)>,
    lineage: Vec<LineageRow>,
}

/// The distilled examples whose prompt no example of the users' has: where
/// a user corrected or chose an answer, theirs is taught, not the
/// teacher's. All go to the train split. Returns the examples to add and
/// how many were left out.
fn mix_in(ds: &Dataset, distilled: &Distilled) -> anyhow::Result<(Vec<NewExample>, usize)> {
    let key = |p: &[Message]| serde_json::to_string(p).unwrap_or_default();
    let users: HashSet<String> = ds
        .sft
        .iter()
        .map(|e| key(&e.prompt))
        .chain(ds.dpo.iter().map(|e| key(&e.prompt)))
        .collect();
    let mut out = Vec::new();
    let mut left_out = 0;
    for (_, value) in &distilled.examples {
        let e: build::SftExample =
            serde_json::from_value(value.clone()).context("reading a distilled example")?;
        if users.contains(&key(&e.prompt)) {
            left_out += 1;
            continue;
        }
        // Taught, never held out: the gate's held-out evidence is what the
        // users gave, and a teacher's answer is not a user's liked one.
        let e = build::SftExample {
            split: Split::Train,
            ..e
        };
        out.push(example("sft", Split::Train, &e)?);
    }
    Ok((out, left_out))
}

struct Built {
    version: NewVersion,
    examples: Vec<NewExample>,
    lineage: Vec<LineageRow>,
}

/// The CPU part: rows to curation inputs, the build, serialization, lineage.
fn assemble(
    job: &CurateJob,
    fingerprint: String,
    votes: &[VoteRow],
    rows: Vec<RatedCompletion>,
    distilled: Option<Distilled>,
) -> anyhow::Result<Built> {
    let rows_read = rows.len();
    let mut without_text = 0usize;
    let mut completions = Vec::with_capacity(rows.len());
    // Moved, not copied: at a million rows the text is most of the memory.
    for r in rows {
        match prompt_of(&r.messages.0) {
            Some(prompt) => completions.push(Completion {
                id: r.id,
                end_user: r.end_user,
                prompt,
                output: r.output,
                created_at: r.created_at.timestamp_micros(),
            }),
            // Teams that store no text have hashes where the words were.
            None => without_text += 1,
        }
    }
    let curation_votes: Vec<Vote> = votes
        .iter()
        .map(|v| Vote {
            completion_id: v.completion_id.clone(),
            end_user: v.end_user.clone(),
            rating: if v.rating == "up" {
                Rating::Up
            } else {
                Rating::Down
            },
            correction: v.correction.clone(),
            created_at: v.created_at.timestamp_micros(),
        })
        .collect();
    let ds = build::build(&completions, &curation_votes, &job.rules);
    drop(curation_votes);

    let mut examples = Vec::with_capacity(ds.sft.len() + ds.dpo.len() + ds.kto.len());
    let mut used: HashSet<&str> = HashSet::new();
    for e in &ds.sft {
        examples.push(example("sft", e.split, e)?);
        used.insert(&e.source);
    }
    for e in &ds.dpo {
        examples.push(example("dpo", e.split, e)?);
        used.extend(e.sources.iter().map(String::as_str));
    }
    for e in &ds.kto {
        examples.push(example("kto", e.split, e)?);
        used.insert(&e.source);
    }
    let authors: HashMap<&str, &str> = completions
        .iter()
        .map(|c| (c.id.as_str(), c.end_user.as_deref().unwrap_or("")))
        .collect();
    let lineage: Vec<LineageRow> = votes
        .iter()
        .filter(|v| used.contains(v.completion_id.as_str()))
        .map(|v| LineageRow {
            team_id: v.team_id,
            feedback_id: v.id,
            completion_id: v.completion_id.clone(),
            voter: v.end_user.clone(),
            author: authors
                .get(v.completion_id.as_str())
                .copied()
                .unwrap_or("")
                .to_string(),
        })
        .collect();

    let window_start = votes.iter().map(|v| v.created_at).min();
    let window_end = votes.iter().map(|v| v.created_at).max();
    let mut manifest = manifest(
        job,
        &ds,
        votes.len(),
        rows_read,
        without_text,
        &lineage,
        (window_start, window_end),
    );
    let mut lineage = lineage;
    let mut sft_count = ds.sft.len();
    if let Some(d) = distilled {
        let (added, left_out) = mix_in(&ds, &d)?;
        sft_count += added.len();
        manifest["distilled"] = serde_json::json!({
            "version": d.version.version,
            "id": d.version.id,
            "teacher": d.version.manifest["distillation"]["teacher"]["name"],
            "sft_added_to_train": added.len(),
            "left_out_for_the_users_own": left_out,
        });
        examples.extend(added);
        // Its requests' end users: deleting one's data marks this version too.
        lineage.extend(d.lineage);
    }
    Ok(Built {
        version: NewVersion {
            id: Uuid::new_v4(),
            scope: job.scope,
            fingerprint,
            manifest,
            sft_count: sft_count as i32,
            dpo_count: ds.dpo.len() as i32,
            kto_count: ds.kto.len() as i32,
            window_start,
            window_end,
        },
        examples,
        lineage,
    })
}

pub(crate) fn example(
    kind: &'static str,
    split: Split,
    e: &impl Serialize,
) -> anyhow::Result<NewExample> {
    Ok(NewExample {
        kind,
        split: match split {
            Split::Train => "train",
            Split::Eval => "eval",
        },
        example: serde_json::to_string(e)?,
    })
}

/// The logged `messages` as curation messages; `None` unless every content
/// is text.
pub(crate) fn prompt_of(messages: &serde_json::Value) -> Option<Vec<Message>> {
    messages
        .as_array()?
        .iter()
        .map(|m| {
            Some(Message {
                role: m.get("role")?.as_str()?.to_string(),
                content: m.get("content")?.as_str()?.to_string(),
            })
        })
        .collect()
}

/// Lists in the manifest stop here (their totals are given in full).
const MANIFEST_LIST_MAX: usize = 10_000;

/// How many raters were assessed and left out, with every one left out or
/// voting always the same way listed.
fn raters_summary(raters: &[RaterReport]) -> serde_json::Value {
    let listed: Vec<&RaterReport> = raters
        .iter()
        .filter(|r| r.excluded || r.constant)
        .take(MANIFEST_LIST_MAX)
        .collect();
    let compared: Vec<f64> = raters.iter().filter_map(|r| r.agreement).collect();
    serde_json::json!({
        "assessed": raters.len(),
        "excluded": raters.iter().filter(|r| r.excluded).count(),
        "constant": raters.iter().filter(|r| r.constant).count(),
        "with_compared_votes": compared.len(),
        "mean_agreement": if compared.is_empty() { None } else {
            Some(compared.iter().sum::<f64>() / compared.len() as f64)
        },
        "listed": listed,
    })
}

fn split_counts<'a>(splits: impl Iterator<Item = &'a Split>) -> serde_json::Value {
    let (mut train, mut eval) = (0, 0);
    for s in splits {
        match s {
            Split::Train => train += 1,
            Split::Eval => eval += 1,
        }
    }
    serde_json::json!({"train": train, "eval": eval})
}

/// Everything a reader needs to trust the version: rules, counts per kind
/// and split, what was dropped and why, the KTO class balance, the source
/// window and the size of the lineage.
fn manifest(
    job: &CurateJob,
    ds: &Dataset,
    votes: usize,
    completions: usize,
    without_text: usize,
    lineage: &[LineageRow],
    window: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) -> serde_json::Value {
    let desirable = ds.kto.iter().filter(|k| k.label).count();
    let undesirable = ds.kto.len() - desirable;
    let lineage_completions: HashSet<&str> =
        lineage.iter().map(|l| l.completion_id.as_str()).collect();
    let pii_rules: serde_json::Map<String, serde_json::Value> = pii::RULES
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({
        "builder": BUILDER,
        "scope": job.scope,
        "rules": {
            "redact_pii": job.rules.redact_pii,
            "pii_rules": if job.rules.redact_pii { pii_rules } else { Default::default() },
            "near_duplicate_threshold": job.rules.near_duplicate_threshold,
            "near_duplicate_method": format!(
                "MinHash, 128 permutations over word 3-shingles of the normalized prompt \
                 without system messages {} or more completions share; only examples with \
                 the same verdict and the same normalized answer taught (the correction of \
                 a corrected down vote, else the output) can be duplicates; exact repeats \
                 by signature; LSH with 32 bands of 4, buckets with more than {} entries \
                 not searched",
                job.rules.shared_system_min,
                flywheel_curation::minhash::HOT_BUCKET
            ),
            "shared_system_min": job.rules.shared_system_min,
            "conflicts": "latest vote per end user, then majority; ties dropped",
            "max_per_user": job.rules.max_per_user,
            "min_output_chars": job.rules.min_output_chars,
            "max_output_chars": job.rules.max_output_chars,
            "eval_fraction": job.rules.eval_fraction,
            "min_eval_examples": job.rules.min_eval_examples,
            "eval_share": ds.eval_share,
            "eval_filled": ds.eval_filled,
            "split": "FNV-1a of the normalized prompt into 10,000 buckets; buckets below \
                      eval_share go to eval; then, for corrections, DPO pairs, KTO votes and \
                      SFT answers in turn, the newest prompts of that kind go to eval until it \
                      holds min_eval_examples (a quarter of a kind with fewer than four times \
                      that); eval_filled prompts were added so; a prompt is in one split only",
            "rater_min_compared": job.rules.rater_min_compared,
            "rater_min_agreement": job.rules.rater_min_agreement,
            "raters_method": "each rater's latest vote per completion compared with other \
                              raters' corrections of the same prompt (without shared system \
                              messages), else with the majority of their votes on the same \
                              answer; a second round compares with the raters the first kept; \
                              raters with at least rater_min_compared compared votes and \
                              agreement below rater_min_agreement are left out",
        },
        "window": {"start": window.0, "end": window.1, "until": job.until},
        "input": {
            "votes": votes,
            "completions": completions,
            "completions_without_text": without_text,
        },
        "counts": {
            "sft": split_counts(ds.sft.iter().map(|e| &e.split)),
            "dpo": split_counts(ds.dpo.iter().map(|e| &e.split)),
            "kto": split_counts(ds.kto.iter().map(|e| &e.split)),
        },
        "kto_balance": {
            "desirable": desirable,
            "undesirable": undesirable,
            "desirable_fraction": if ds.kto.is_empty() { 0.0 } else { desirable as f64 / ds.kto.len() as f64 },
        },
        "dropped": ds.counts,
        "dropped_examples": ds.dropped.iter().take(MANIFEST_LIST_MAX).collect::<Vec<_>>(),
        "dropped_examples_total": ds.dropped.len(),
        "raters": raters_summary(&ds.raters),
        "lineage": {"votes": lineage.len(), "completions": lineage_completions.len()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_need_text_in_every_message() {
        let text = serde_json::json!([{"role": "user", "content": "hi"}]);
        assert_eq!(prompt_of(&text).unwrap()[0].content, "hi");
        let hashed = serde_json::json!([{"role": "user", "content": {"sha256": "x", "chars": 2}}]);
        assert!(prompt_of(&hashed).is_none());
    }

    #[test]
    fn fingerprint_follows_votes_and_rules_not_their_order() {
        let vote = Uuid::from_u128;
        let job = CurateJob {
            scope: Scope::Team(Uuid::nil()),
            rules: Rules::default(),
            until: None,
            cycle: None,
        };
        let a = fingerprint(&job, vec![vote(1), vote(2)], None);
        assert_eq!(a, fingerprint(&job, vec![vote(2), vote(1)], None));
        assert_ne!(a, fingerprint(&job, vec![vote(1), vote(2), vote(3)], None));
        let mut other = job.clone();
        other.rules.max_per_user = 1;
        assert_ne!(a, fingerprint(&other, vec![vote(1), vote(2)], None));
        // A distillation mixed in is part of the input; another one is another.
        let mixed = fingerprint(&job, vec![vote(1), vote(2)], Some(Uuid::from_u128(7)));
        assert_ne!(a, mixed);
        assert_ne!(
            mixed,
            fingerprint(&job, vec![vote(1), vote(2)], Some(Uuid::from_u128(8)))
        );
    }
}
