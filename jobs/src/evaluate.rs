//! The evaluation job: a candidate against the team's champion on the files
//! that would be served, through the serving engine. The team's task suites,
//! the general retention suite, the held-out preference pairs and answers
//! of the candidate's dataset, latency, and the team's judge where it has
//! one ([`crate::judge`]); every metric with its paired
//! interval, every example's output for both models, and the gate's
//! verdict stored. After a training run the verdict goes to the loop
//! ([`flywheel_loop::cycle::evaluated`]), which acts on it: a canary (or a
//! promotion when no canary is configured) or a rejection.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use flywheel_curation::build::{DpoPair, KtoExample, SftExample};
use flywheel_engine::{ChatMessage, EngineHandle};
use flywheel_eval::run::{Answer, Inputs, Memo, Pair, Remembered, Served, Vote};
use flywheel_eval::{Policy, Suite};
use flywheel_store::evals::{self, NewEvaluation};
use flywheel_store::models::ModelVersion;
use flywheel_store::{PgPool, Postgres, Transaction};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::queue;
use flywheel_modelhub::Versions;

/// The queue's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalJob {
    pub evaluation_id: Uuid,
    /// Act on the verdict (canary, promotion or rejection), as the loop does
    /// after a training run; a person's `flywheel eval` only reports.
    #[serde(default)]
    pub act: bool,
}

/// What a worker evaluates with.
#[derive(Debug, Clone)]
pub struct EvalEnv {
    pub versions: Versions,
    pub policy: Policy,
    /// Requests in flight at once (the engine batches them).
    pub concurrency: usize,
    /// The retention suite; `None`: the one shipped with Flywheel.
    pub retention: Option<Suite>,
    /// Retries and circuit breaker of a judge served upstream.
    pub upstream: flywheel_upstream::Settings,
}

/// How an evaluation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalOutcome {
    pub evaluation_id: Uuid,
    pub passed: bool,
    pub reasons: Vec<String>,
    /// What the job did: `canary_started`, `promote`, `reject`, or nothing.
    pub action: Option<String>,
}

/// Creates an evaluation of `candidate` against `champion` and queues it.
pub async fn enqueue(
    pool: &PgPool,
    e: &NewEvaluation,
    act: bool,
    max_attempts: u32,
) -> anyhow::Result<(Uuid, String)> {
    let mut tx = pool.begin().await?;
    let queued = enqueue_in(&mut tx, e, act, max_attempts).await?;
    tx.commit().await?;
    Ok(queued)
}

/// [`enqueue`] in the caller's transaction.
pub async fn enqueue_in(
    tx: &mut Transaction<'_, Postgres>,
    e: &NewEvaluation,
    act: bool,
    max_attempts: u32,
) -> anyhow::Result<(Uuid, String)> {
    let id = evals::create(&mut **tx, e).await?;
    let task = queue::push(
        tx,
        queue::EVALUATION,
        &EvalJob {
            evaluation_id: id,
            act,
        },
        max_attempts,
    )
    .await?;
    Ok((id, task))
}

/// Both models as served; engines are shared when the two run on the same
/// base.
async fn load_pair(
    pool: &PgPool,
    versions: &Versions,
    candidate: &ModelVersion,
    champion: &ModelVersion,
) -> anyhow::Result<(Served, Served)> {
    let mut engines: HashMap<Uuid, EngineHandle> = HashMap::new();
    let champion_served = served(pool, versions, &mut engines, champion).await?;
    let candidate_served = served(pool, versions, &mut engines, candidate).await?;
    Ok((candidate_served, champion_served))
}

/// An engine of `v`, from `engines` when one is loaded.
async fn engine_of(
    versions: &Versions,
    engines: &mut HashMap<Uuid, EngineHandle>,
    v: &ModelVersion,
) -> anyhow::Result<EngineHandle> {
    if let Some(e) = engines.get(&v.id) {
        return Ok(e.clone());
    }
    let e = versions.engine(v).await?;
    engines.insert(v.id, e.clone());
    Ok(e)
}

/// `v` as the gateway would serve it: on its base's engine with its
/// adapter, or on its own.
async fn served(
    pool: &PgPool,
    versions: &Versions,
    engines: &mut HashMap<Uuid, EngineHandle>,
    v: &ModelVersion,
) -> anyhow::Result<Served> {
    let memo = Some(Arc::new(Memo::new(
        evals::remembered(pool, v.id)
            .await?
            .into_iter()
            .map(|r| Remembered {
                key: r.request_sha256,
                text: r.output,
                tokens: r.tokens.max(0) as usize,
            }),
    )));
    let lineage = flywheel_store::models::lineage(pool, v.id).await?;
    let on_base = lineage
        .as_ref()
        .and_then(|l| Some((l.base_version_id?, l.adapter_path.clone()?)));
    if let Some((base_id, path)) = on_base
        && let Some(base) = flywheel_store::models::get(pool, base_id).await?
    {
        let engine = engine_of(versions, engines, &base).await?;
        let weights = versions.adapter(v, &path).await?;
        if let Ok(id) = engine.add_adapter(weights) {
            return Ok(Served {
                engine,
                adapter: Some(id),
                memo,
            });
        }
    }
    Ok(Served {
        engine: engine_of(versions, engines, v).await?,
        adapter: None,
        memo,
    })
}

/// Answers the team's task suites and the retention suite with the team's
/// champion and keeps the answers ([`Memo`]): the champion's half of the
/// next evaluation against it, done ahead (when a suite is added), so that
/// evaluation runs only the candidate. Answers already kept are not made
/// again. Returns the champion's name and the answers generated.
pub async fn remember_champion(
    pool: &PgPool,
    env: &EvalEnv,
    team: Uuid,
) -> anyhow::Result<(String, usize)> {
    let champion = flywheel_store::models::team_champion(pool, team)
        .await?
        .context("the team has no champion")?;
    let served = served(pool, &env.versions, &mut HashMap::new(), &champion).await?;
    let mut suites: Vec<Suite> = evals::team_suites(pool, team)
        .await?
        .into_iter()
        .map(|s| Suite::parse(&s.definition.to_string()))
        .collect::<Result<_, _>>()?;
    suites.push(env.retention.clone().unwrap_or_else(Suite::retention));
    for suite in &suites {
        flywheel_eval::run::answer_suite(&served, suite, env.concurrency)
            .await
            .with_context(|| format!("answering {}", suite.name))?;
    }
    let generated = keep_answers(pool, champion.id, &served).await?;
    Ok((champion.name, generated))
}

/// Stores the answers `served` generated (its memo's fresh ones) as
/// `version`'s; returns how many.
async fn keep_answers(pool: &PgPool, version: Uuid, served: &Served) -> anyhow::Result<usize> {
    let fresh: Vec<evals::Remembered> = served
        .memo
        .iter()
        .flat_map(|m| m.fresh())
        .map(|r| evals::Remembered {
            request_sha256: r.key,
            output: r.text,
            tokens: r.tokens as i32,
        })
        .collect();
    evals::remember(pool, version, &fresh).await?;
    Ok(fresh.len())
}

fn messages(m: &[flywheel_curation::build::Message]) -> Vec<ChatMessage> {
    m.iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// A dataset version's held-out evidence: its eval split's preference
/// pairs, corrections, liked answers and single votes.
#[derive(Debug, Default)]
struct HeldOut {
    pairs: Vec<Pair>,
    corrections: Vec<Answer>,
    liked: Vec<Answer>,
    votes: Vec<Vote>,
}

async fn held_out(pool: &PgPool, dataset: Uuid) -> anyhow::Result<HeldOut> {
    let rows = |kind| flywheel_store::datasets::examples(pool, dataset, kind, Some("eval"));
    let mut out = HeldOut::default();
    for (i, (_, e)) in rows("dpo").await?.into_iter().enumerate() {
        let p: DpoPair = serde_json::from_value(e)?;
        out.pairs.push(Pair {
            id: format!("pair-{i}"),
            prompt: messages(&p.prompt),
            chosen: p.chosen,
            rejected: p.rejected,
        });
    }
    for (i, (_, e)) in rows("sft").await?.into_iter().enumerate() {
        let a: SftExample = serde_json::from_value(e)?;
        let (list, id) = match a.correction {
            true => (&mut out.corrections, format!("correction-{i}")),
            false => (&mut out.liked, format!("liked-{i}")),
        };
        list.push(Answer {
            id,
            prompt: messages(&a.prompt),
            answer: a.completion,
        });
    }
    for (i, (_, e)) in rows("kto").await?.into_iter().enumerate() {
        let k: KtoExample = serde_json::from_value(e)?;
        out.votes.push(Vote {
            id: format!("vote-{i}"),
            prompt: messages(&k.prompt),
            answer: k.completion,
            up: k.label,
        });
    }
    Ok(out)
}

/// Runs one evaluation to its end. The step function the worker calls.
#[tracing::instrument(name = "evaluate", skip_all, err, fields(evaluation = %job.evaluation_id))]
pub async fn run(pool: &PgPool, env: &EvalEnv, job: &EvalJob) -> anyhow::Result<EvalOutcome> {
    let e = evals::get(pool, job.evaluation_id)
        .await?
        .with_context(|| format!("evaluation {} does not exist", job.evaluation_id))?;
    match evaluate(pool, env, &e).await {
        Ok(mut outcome) if job.act => {
            let kind = flywheel_loop::cycle::evaluated(
                pool,
                &env.policy,
                &e,
                outcome.passed,
                &outcome.reasons,
            )
            .await?;
            outcome.action = kind.map(|k| k.to_string());
            Ok(outcome)
        }
        Ok(outcome) => Ok(outcome),
        Err(err) => {
            evals::finish(
                pool,
                e.id,
                None,
                &serde_json::json!([]),
                &serde_json::json!({}),
                Some(&format!("{err:#}")),
            )
            .await?;
            Err(err)
        }
    }
}

async fn evaluate(
    pool: &PgPool,
    env: &EvalEnv,
    e: &evals::Evaluation,
) -> anyhow::Result<EvalOutcome> {
    evals::start(&mut *pool.acquire().await?, e.id).await?;
    let get = |id| async move {
        flywheel_store::models::get(pool, id)
            .await?
            .with_context(|| format!("model version {id} is gone"))
    };
    let (candidate, champion) = (
        get(e.candidate_version_id).await?,
        get(e.champion_version_id).await?,
    );
    let task_suites: Vec<Suite> = match e.team_id {
        Some(team) => evals::team_suites(pool, team)
            .await?
            .into_iter()
            .map(|s| Suite::parse(&s.definition.to_string()))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let held = match e.dataset_version_id {
        Some(d) => held_out(pool, d).await?,
        None => HeldOut::default(),
    };
    let retention = env.retention.clone().unwrap_or_else(Suite::retention);
    let retention_name = retention.name.clone();
    let inputs = Inputs {
        task_suites: task_suites.clone(),
        retention: Some(retention),
        pairs: held.pairs,
        corrections: held.corrections,
        liked: held.liked,
        votes: held.votes,
        answer_max_tokens: 128,
    };
    let (cand, champ) = load_pair(pool, &env.versions, &candidate, &champion).await?;
    let label = format!("{} vs {}", candidate.name, champion.name);
    let progress: flywheel_eval::run::OnProgress = Arc::new(move |what: &str| {
        tracing::info!(evaluation = %label, "evaluating: {what}");
    });
    let mut cmp = flywheel_eval::run::compare(&cand, &champ, &inputs, env.concurrency, progress)
        .await
        .context("running the models")?;
    // The team's judge, checked against its users, then asked about the
    // held-out answers if they vouch for it.
    let judged = crate::judge::in_evaluation(
        pool,
        &env.versions,
        &env.upstream,
        env.concurrency,
        e,
        &cmp.items,
    )
    .await?;
    if let Some((report, metric)) = &judged {
        tracing::info!(evaluation = %e.id, judge = %report.judge, weight = report.weight,
            "judge: {}", report.reason);
        cmp.metrics.extend(metric.clone());
        evals::set_judge(pool, e.id, &serde_json::to_value(report)?).await?;
    }
    let metrics: Vec<evals::Metric> = cmp
        .metrics
        .iter()
        .map(|m| evals::Metric {
            suite: m.suite.clone(),
            metric: m.metric.clone(),
            items: m.items as i32,
            candidate: m.candidate,
            champion: m.champion,
            difference: m.difference,
            ci_low: m.ci_low,
            ci_high: m.ci_high,
        })
        .collect();
    let items: Vec<evals::Item> = cmp
        .items
        .iter()
        .map(|i| evals::Item {
            suite: i.suite.clone(),
            item: i.item.clone(),
            model_version_id: if i.model == "candidate" {
                candidate.id
            } else {
                champion.id
            },
            prompt: i.prompt.clone(),
            output: i.output.clone(),
            passed: i.passed,
            score: i.score,
        })
        .collect();
    evals::add_metrics(pool, e.id, &metrics).await?;
    evals::add_items(pool, e.id, &items).await?;
    for (version, served) in [(candidate.id, &cand), (champion.id, &champ)] {
        keep_answers(pool, version, served).await?;
    }
    let names: Vec<String> = task_suites.iter().map(|s| s.name.clone()).collect();
    let judge = judged.map(|(r, _)| flywheel_eval::gate::Judge {
        name: r.judge,
        weight: r.weight,
        reason: r.reason,
    });
    let verdict = flywheel_eval::gate::judge(
        &env.policy,
        &cmp.metrics,
        &names,
        &retention_name,
        judge.as_ref(),
    );
    evals::finish(
        pool,
        e.id,
        Some(verdict.passed),
        &serde_json::to_value(&verdict.reasons)?,
        &serde_json::to_value(&env.policy)?,
        None,
    )
    .await?;
    Ok(EvalOutcome {
        evaluation_id: e.id,
        passed: verdict.passed,
        reasons: verdict.reasons,
        action: None,
    })
}
