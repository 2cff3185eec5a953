//! Distillation: a teacher (any model version: an upstream such as the big
//! model a team uses today, or one served here) answers the team's real
//! prompts, and its answers become an SFT dataset version the trainer
//! learns from like any other.
//!
//! The prompts are the team's logged requests, newest first (or a file's):
//! PII redacted as curation redacts it, deduplicated, never those of an end
//! user whose data was deleted (they are gone from the log, and a prompt
//! whose request is deleted while the teacher answers is dropped before
//! the version is written). The version's manifest says where it came from
//! (teacher, prompts, time, what was dropped and why) and its lineage names
//! every logged request it used, so a later deletion marks it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flywheel_curation::build::{Message, SftExample, split_by_hash};
use flywheel_curation::pii::{self, Redactions};
use flywheel_engine::{ChatMessage, Event};
use flywheel_store::PgPool;
use flywheel_store::datasets::{self, LineageRow, NO_VOTE, NewVersion, Scope};
use flywheel_store::models::ModelVersion;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Bumped when the same input would give a different dataset; starts with
/// [`datasets::DISTILLED_BUILDER`], which curation finds distillations by.
pub const DISTILLER: &str = "flywheel-distill/1";

/// Where the prompts come from.
#[derive(Debug, Clone)]
pub enum Prompts {
    /// The team's logged requests, newest first.
    Log,
    /// Given prompts (a file's), named by `origin` in the manifest.
    Given {
        origin: String,
        prompts: Vec<Vec<Message>>,
    },
}

#[derive(Debug, Clone)]
pub struct DistillJob {
    pub team: Uuid,
    pub prompts: Prompts,
    /// Distinct prompts at most.
    pub limit: usize,
    /// The longest answer asked of the teacher.
    pub max_tokens: usize,
    /// Stop asking once the teacher has spent this many tokens (prompt and
    /// answer, as it reports them).
    pub budget_tokens: Option<u64>,
    /// Prompts in flight at once.
    pub concurrency: usize,
    /// The share of prompts (by hash) in the eval split, as curation's rules say.
    pub eval_fraction: f64,
    /// The loop's cycle this distillation is part of, if any.
    pub cycle: Option<Uuid>,
}

/// A model that answers (a teacher, or a judge): an upstream, or an
/// engine in this process.
pub enum Teacher {
    Upstream(flywheel_upstream::Client),
    Engine(flywheel_engine::EngineHandle),
}

/// One answer and the tokens it cost (prompt and answer).
pub struct Answer {
    pub text: String,
    pub tokens: u64,
    /// Ended by the model, not cut at `max_tokens`.
    pub finished: bool,
}

impl Teacher {
    /// `v` as a model to ask: its upstream (with `settings`' retries and
    /// breaker), or an engine on its file.
    pub async fn of(
        pool: &PgPool,
        versions: &flywheel_modelhub::Versions,
        settings: &flywheel_upstream::Settings,
        v: &ModelVersion,
    ) -> anyhow::Result<Teacher> {
        if v.is_upstream() {
            let u = flywheel_store::upstreams::get(pool, v.id)
                .await?
                .with_context(|| format!("{} has no upstream settings", v.name))?;
            return Ok(Teacher::Upstream(flywheel_upstream::Client::openai(
                &u.base_url,
                &u.model,
                u.api_key_env.as_deref(),
                Duration::from_millis(u.timeout_ms.max(1) as u64),
                settings.clone(),
            )?));
        }
        Ok(Teacher::Engine(versions.engine(v).await?))
    }

    /// Greedy, so the dataset is what the teacher says, not one draw of it.
    pub async fn answer(&self, prompt: &[Message], max_tokens: usize) -> anyhow::Result<Answer> {
        let mut events = match self {
            Teacher::Upstream(client) => {
                let messages: Vec<_> = prompt
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect();
                let request = serde_json::json!({
                    "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                });
                client.chat(request).await?
            }
            Teacher::Engine(engine) => {
                let messages: Vec<ChatMessage> = prompt
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                let prompt_ids = engine.prepare_chat(&messages)?;
                let params = flywheel_engine::SamplingParams {
                    temperature: 0.0,
                    max_tokens,
                    seed: Some(0),
                    ..Default::default()
                };
                engine.submit(flywheel_engine::GenerateRequest {
                    prompt_ids,
                    params,
                    adapter: None,
                    ..Default::default()
                })?
            }
        };
        let mut text = String::new();
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Delta { text: t, .. } => text.push_str(&t),
                Event::Done {
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                } => {
                    return Ok(Answer {
                        text,
                        tokens: (prompt_tokens + completion_tokens) as u64,
                        finished: finish_reason == flywheel_engine::FinishReason::Stop,
                    });
                }
                Event::Error(e) | Event::TimedOut(e) => anyhow::bail!(e),
            }
        }
        anyhow::bail!("the teacher stopped without finishing its answer")
    }
}

/// The tokens `team`'s jobs may still spend on `v` (the team's upstream
/// budget less what its jobs spent in the window): `None` when `v` is no
/// upstream (what it costs is this machine's time) or the team set no
/// budget.
pub async fn team_allowance(
    pool: &PgPool,
    team: Uuid,
    v: &ModelVersion,
) -> anyhow::Result<Option<u64>> {
    if !v.is_upstream() {
        return Ok(None);
    }
    let b = flywheel_store::upstreams::budget(pool, team).await?;
    if b.left() == Some(0) {
        anyhow::bail!(
            "the team's upstream budget is spent: {} of {} tokens in the last {} days (flywheel teams set TEAM --upstream-budget-tokens N)",
            b.spent,
            b.budget.unwrap_or_default(),
            flywheel_store::upstreams::BUDGET_DAYS
        );
    }
    Ok(b.left())
}

/// The smaller of a job's own budget and what its team has left, and
/// whether the team's is the one that binds.
pub fn binding_budget(job: Option<u64>, team_left: Option<u64>) -> (Option<u64>, bool) {
    match (job, team_left) {
        (Some(j), Some(t)) => (Some(j.min(t)), t < j),
        (None, Some(t)) => (Some(t), true),
        (j, None) => (j, false),
    }
}

/// Records what a team's job spent on `v`, when `v` is an upstream.
pub async fn record_spend(
    pool: &PgPool,
    team: Uuid,
    v: &ModelVersion,
    purpose: flywheel_store::upstreams::Purpose,
    calls: u64,
    tokens: u64,
) -> anyhow::Result<()> {
    if v.is_upstream() && calls > 0 {
        flywheel_store::upstreams::record_spend(pool, team, v.id, purpose, calls, tokens).await?;
    }
    Ok(())
}

/// The loop's own distillation (`training.distill_*`): each cycle's
/// curation first asks `teacher` the team's newest prompts, while the team
/// has fewer than `below_votes` votes and has logged prompts since its
/// newest distillation; the curated version then mixes the answers in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopDistill {
    /// The teacher's model version.
    pub teacher: String,
    /// Distinct prompts at most.
    pub prompts: usize,
    pub below_votes: i64,
}

/// The answers' length limit of the loop's distillations.
const LOOP_MAX_TOKENS: usize = 256;

/// Runs the loop's distillation for `team`'s cycle `cycle` if its data is
/// thin and it has new prompts. Returns what it did, or why it asked
/// nothing, in words, for the curation's record; an error (a teacher that
/// cannot be reached) is the caller's to record without failing the cycle.
pub async fn by_itself(
    pool: &PgPool,
    versions: &flywheel_modelhub::Versions,
    upstream: &flywheel_upstream::Settings,
    (team, cycle): (Uuid, Uuid),
    spec: &LoopDistill,
    eval_fraction: f64,
) -> anyhow::Result<String> {
    let votes = flywheel_store::feedback::count_for_team(pool, team).await?;
    if votes >= spec.below_votes {
        return Ok(format!(
            "not distilled: the team has {votes} vote(s) of its own (the teacher is asked below {})",
            spec.below_votes
        ));
    }
    // A retried curation does not ask the teacher twice for one cycle.
    if datasets::distilled_in_cycle(pool, team, cycle).await? {
        return Ok("not distilled again: this cycle's distillation is written".into());
    }
    // New requests since the newest request a distillation of the log read
    // (one that holds no deleted user's data).
    let watermark = datasets::distilled_log_until(pool, team).await?;
    if !flywheel_store::completions::logged_after(pool, team, watermark).await? {
        return Ok(match watermark {
            None => "not distilled: the team has no logged prompt".into(),
            Some(_) => "not distilled: no prompt logged since the newest distillation".into(),
        });
    }
    let v = flywheel_store::models::by_name(pool, &spec.teacher)
        .await?
        .with_context(|| format!("no model version is named {}", spec.teacher))?;
    if !v.usable_by(team, flywheel_store::keys::team_shares(pool, team).await?) {
        anyhow::bail!("{} is not a model this team may use", v.name);
    }
    let teacher = Teacher::of(pool, versions, upstream, &v).await?;
    let job = DistillJob {
        team,
        prompts: Prompts::Log,
        limit: spec.prompts,
        max_tokens: LOOP_MAX_TOKENS,
        budget_tokens: None,
        concurrency: 4,
        eval_fraction,
        cycle: Some(cycle),
    };
    let o = run(pool, &job, &teacher, &v, |done, total| {
        tracing::info!(teacher = %v.name, "distilling: {done} of {total} prompts answered")
    })
    .await?;
    Ok(match o.version {
        Some(n) => format!(
            "distilled version {n}: {} answers of {} from {} ({} teacher tokens{})",
            o.examples,
            o.asked,
            v.name,
            o.teacher_tokens,
            if o.stopped_by_team_budget {
                ", stopped at the team's upstream budget"
            } else {
                ""
            }
        ),
        None if o.asked == 0 => format!(
            "not distilled: none of the {} logged requests read holds text to ask ({} without)",
            o.prompts_read, o.without_text
        ),
        None => format!(
            "not distilled: {} answered none of {} prompts ({} failed)",
            v.name, o.asked, o.failed
        ),
    })
}

/// What a distillation did, as its manifest records it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    /// The dataset version written (`None`: no prompt was answered).
    #[serde(skip)]
    pub version_id: Option<Uuid>,
    #[serde(skip)]
    pub version: Option<i32>,
    /// Examples written.
    pub examples: usize,
    /// Requests read from the log (or the file's prompts).
    pub prompts_read: usize,
    /// Whose message contents are hashes (a team that stores no text).
    pub without_text: usize,
    pub duplicates: usize,
    pub asked: usize,
    pub answered: usize,
    /// The teacher failed on them, or answered nothing.
    pub failed: usize,
    /// Answers cut at `max_tokens`: left out, as half an answer teaches
    /// the student to stop mid-sentence.
    pub truncated: usize,
    /// Not asked, or asked and dropped: every request holding the prompt
    /// was deleted (its end user's data) while the distillation ran.
    pub deleted_meanwhile: usize,
    pub teacher_tokens: u64,
    /// The newest logged request read (prompts from the log): the loop
    /// distils again only once a request newer than this is logged.
    pub log_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Asking stopped because `budget_tokens` was spent.
    pub stopped_by_budget: bool,
    /// ... because the team's upstream budget was, which was the lower.
    pub stopped_by_team_budget: bool,
    pub redactions: Redactions,
    pub seconds: f64,
}

/// A prompt to ask, and the logged requests that hold it (none for a
/// file's): each is named in the lineage, so any of their end users'
/// deletion marks the version.
struct Asked {
    prompt: Vec<Message>,
    sources: Vec<LoggedSource>,
}

/// What became of one prompt.
enum Asking {
    OverBudget,
    /// Its requests were deleted before the teacher was asked.
    Deleted,
    Answered(anyhow::Result<Answer>),
}

/// Those of `sources` still in the team's log, their rows locked until
/// the transaction `ex` belongs to ends (a deletion waits for it).
async fn still_logged(
    ex: impl sqlx::PgExecutor<'_>,
    team: Uuid,
    sources: &[LoggedSource],
) -> anyhow::Result<Vec<LoggedSource>> {
    let ids: Vec<String> = sources.iter().map(|s| s.completion_id.clone()).collect();
    let kept: std::collections::HashSet<String> =
        flywheel_store::completions::still_logged(ex, team, &ids)
            .await?
            .into_iter()
            .collect();
    Ok(sources
        .iter()
        .filter(|s| kept.contains(&s.completion_id))
        .cloned()
        .collect())
}

#[derive(Clone)]
struct LoggedSource {
    completion_id: String,
    end_user: String,
}

/// Asks `teacher` (the version `teacher_version`) the job's prompts and
/// writes its answers as the team's next dataset version. `progress` hears
/// (answered so far, prompts to ask) as answers come in.
pub async fn run(
    pool: &PgPool,
    job: &DistillJob,
    teacher: &Teacher,
    teacher_version: &ModelVersion,
    progress: impl Fn(usize, usize),
) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let mut outcome = Outcome::default();
    let (asked, origin) = prompts(pool, job, &mut outcome).await?;
    let total = asked.len();
    outcome.asked = total;

    // Refused before anything is asked when the team's budget is spent.
    let team_left = team_allowance(pool, job.team, teacher_version).await?;
    let (budget, team_binds) = binding_budget(job.budget_tokens, team_left);
    let spent = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let over_budget =
        |spent: &AtomicU64| budget.is_some_and(|b| spent.load(Ordering::Relaxed) >= b);
    let mut answers = futures::stream::iter(asked.into_iter().enumerate())
        .map(|(i, mut a)| {
            let (spent, calls) = (spent.clone(), calls.clone());
            async move {
                if over_budget(&spent) {
                    return (i, a, Asking::OverBudget);
                }
                // Asked only while a request holding it is still logged:
                // a deleted user's words never reach the teacher.
                if !a.sources.is_empty() {
                    match still_logged(pool, job.team, &a.sources).await {
                        Ok(kept) if kept.is_empty() => return (i, a, Asking::Deleted),
                        Ok(kept) => a.sources = kept,
                        Err(e) => return (i, a, Asking::Answered(Err(e))),
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
                let r = teacher.answer(&a.prompt, job.max_tokens).await;
                if let Ok(ans) = &r {
                    spent.fetch_add(ans.tokens, Ordering::Relaxed);
                }
                (i, a, Asking::Answered(r))
            }
        })
        .buffer_unordered(job.concurrency.max(1));
    let mut done = Vec::with_capacity(total);
    let mut last_report = Instant::now();
    let mut settled = 0;
    while let Some((i, a, r)) = answers.next().await {
        settled += 1;
        match r {
            Asking::OverBudget => {
                outcome.stopped_by_budget = !team_binds;
                outcome.stopped_by_team_budget = team_binds;
            }
            Asking::Deleted => outcome.deleted_meanwhile += 1,
            Asking::Answered(Ok(ans)) if ans.text.trim().is_empty() => outcome.failed += 1,
            Asking::Answered(Ok(ans)) if !ans.finished => outcome.truncated += 1,
            Asking::Answered(Ok(ans)) => {
                outcome.answered += 1;
                done.push((i, a, ans.text));
            }
            Asking::Answered(Err(e)) => {
                outcome.failed += 1;
                tracing::warn!(error = %format!("{e:#}"), "the teacher did not answer a prompt");
            }
        }
        if last_report.elapsed() > Duration::from_secs(2) || settled == total {
            progress(outcome.answered, total);
            last_report = Instant::now();
        }
    }
    drop(answers);
    outcome.teacher_tokens = spent.load(Ordering::Relaxed);
    record_spend(
        pool,
        job.team,
        teacher_version,
        flywheel_store::upstreams::Purpose::Distill,
        calls.load(Ordering::Relaxed),
        outcome.teacher_tokens,
    )
    .await?;
    // In the order asked (newest first), whatever order they finished in.
    done.sort_by_key(|(i, _, _)| *i);

    // Requests deleted while the teacher answered leave no lineage, and a
    // prompt none of whose requests is left no example. The rows read
    // here stay locked until the version is written, so a deletion that
    // comes now waits and then marks the version.
    let mut tx = pool.begin().await?;
    let mut written = Vec::with_capacity(done.len());
    for (i, mut a, text) in done {
        if !a.sources.is_empty() {
            a.sources = still_logged(&mut *tx, job.team, &a.sources).await?;
            if a.sources.is_empty() {
                outcome.deleted_meanwhile += 1;
                continue;
            }
        }
        written.push((i, a, text));
    }
    let done = written;
    outcome.examples = done.len();
    outcome.seconds = t0.elapsed().as_secs_f64();
    if done.is_empty() {
        tx.commit().await?;
        return Ok(outcome);
    }

    let eval_fraction = job.eval_fraction;
    let mut examples = Vec::with_capacity(done.len());
    let mut lineage = Vec::new();
    let mut h = Sha256::new();
    h.update(DISTILLER.as_bytes());
    h.update(teacher_version.id.as_bytes());
    for (n, (_, a, text)) in done.iter().enumerate() {
        for src in &a.sources {
            lineage.push(LineageRow {
                team_id: job.team,
                feedback_id: NO_VOTE,
                completion_id: src.completion_id.clone(),
                voter: String::new(),
                author: src.end_user.clone(),
            });
        }
        let source = match a.sources.first() {
            Some(s) => s.completion_id.clone(),
            None => format!("{origin}#{n}"),
        };
        let e = SftExample {
            prompt: a.prompt.clone(),
            completion: text.clone(),
            correction: false,
            split: split_by_hash(&a.prompt, eval_fraction),
            source,
        };
        let line = crate::curate::example("sft", e.split, &e)?;
        h.update(line.example.as_bytes());
        examples.push(line);
    }
    let manifest = serde_json::json!({
        "builder": DISTILLER,
        "distillation": {
            "teacher": {"id": teacher_version.id, "name": teacher_version.name,
                        "source": teacher_version.source, "format": teacher_version.format},
            "prompts": origin,
            "limit": job.limit,
            "max_tokens": job.max_tokens,
            "budget_tokens": job.budget_tokens,
            "team_budget_left": team_left,
            "cycle": job.cycle,
            "eval_fraction": eval_fraction,
            "outcome": &outcome,
        },
        "counts": {"sft": examples.len(), "dpo": 0, "kto": 0},
    });
    let version = NewVersion {
        id: Uuid::new_v4(),
        scope: Scope::Team(job.team),
        fingerprint: hex::encode(h.finalize()),
        manifest,
        sft_count: examples.len() as i32,
        dpo_count: 0,
        kto_count: 0,
        window_start: None,
        window_end: None,
    };
    let number = datasets::insert_version(&mut tx, &version, &examples, &lineage)
        .await?
        .context("the same teacher gave the same answers to the same prompts before: that dataset version exists")?;
    tx.commit().await?;
    outcome.version_id = Some(version.id);
    outcome.version = Some(number);
    Ok(outcome)
}

/// The prompts to ask, redacted and deduplicated, and where they came from.
async fn prompts(
    pool: &PgPool,
    job: &DistillJob,
    outcome: &mut Outcome,
) -> anyhow::Result<(Vec<Asked>, String)> {
    let (candidates, origin): (Vec<Asked>, String) = match &job.prompts {
        Prompts::Log => {
            // Enough of the newest requests that duplicates still leave `limit`.
            let read = (job.limit.saturating_mul(10)).clamp(1_000, 200_000) as i64;
            let rows = flywheel_store::completions::recent_prompts(pool, job.team, read).await?;
            outcome.prompts_read = rows.len();
            outcome.log_until = rows.iter().map(|r| r.created_at).max();
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                match crate::curate::prompt_of(&r.messages.0) {
                    Some(prompt) if !prompt.is_empty() => out.push(Asked {
                        prompt,
                        sources: vec![LoggedSource {
                            completion_id: r.id,
                            end_user: r.end_user.unwrap_or_default(),
                        }],
                    }),
                    _ => outcome.without_text += 1,
                }
            }
            (out, "log".to_string())
        }
        Prompts::Given { origin, prompts } => {
            outcome.prompts_read = prompts.len();
            let out = prompts
                .iter()
                .map(|p| Asked {
                    prompt: p.clone(),
                    sources: Vec::new(),
                })
                .collect();
            (out, origin.clone())
        }
    };
    // Prompt (redacted) -> its place in `asked`.
    let mut seen = std::collections::HashMap::new();
    let mut asked: Vec<Asked> = Vec::new();
    for mut a in candidates {
        for m in &mut a.prompt {
            let (text, r) = pii::redact(&m.content);
            outcome.redactions.add(&r);
            m.content = text;
        }
        let key = serde_json::to_string(&a.prompt)?;
        if let Some(&at) = seen.get(&key) {
            outcome.duplicates += 1;
            let first: &mut Asked = &mut asked[at];
            first.sources.append(&mut a.sources);
            continue;
        }
        if asked.len() == job.limit {
            break;
        }
        seen.insert(key, asked.len());
        asked.push(a);
    }
    Ok((asked, origin))
}

#[cfg(test)]
mod tests {
    #[test]
    fn curation_finds_distillations_by_their_builder() {
        assert!(super::DISTILLER.starts_with(flywheel_store::datasets::DISTILLED_BUILDER));
    }
}
