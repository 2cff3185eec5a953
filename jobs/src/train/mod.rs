//! The training job: fine-tune a LoRA adapter on a dataset version, as a
//! recorded run. A run trains through one of the backends behind
//! [`backend::TrainingBackend`]: in this process ([`in_process`]: every
//! step's loss to `training_steps`, a checkpoint every `checkpoint_every`
//! steps so a worker killed mid-run is followed by one that resumes there, a
//! cancel request honoured at the next step), or outside it, with a shell
//! command ([`command`]) or a Kubernetes Job ([`kubernetes`]), which receive
//! the dataset as TRL JSONL and return a PEFT adapter. Whatever trained it,
//! the adapter becomes a candidate model version with its lineage
//! ([`register`]), and the run records its held-out loss.

pub mod backend;
mod command;
mod data;
pub mod foreground;
mod in_process;
mod kubernetes;
pub mod register;
mod spec;

use anyhow::{Context, bail};
use flywheel_store::PgPool;
use flywheel_store::cycles::Link;
use flywheel_store::sqlx::PgConnection;
use flywheel_store::training::{self, RunStatus, TrainingRun};
use uuid::Uuid;

use crate::queue;
use backend::{RunContext, Trained, TrainingBackend};
use spec::kind_of;

pub use data::{example, load_examples};
pub use register::{Candidate, register_candidate};
pub use spec::{External, JOB_PLACEHOLDERS, KubeJob, RunOutcome, RunSpec, TrainEnv, TrainJob};

/// Creates a queued run and its job in one transaction.
pub async fn create_run(
    pool: &PgPool,
    dataset_version_id: Uuid,
    base_version_id: Uuid,
    spec: &RunSpec,
    max_attempts: u32,
) -> anyhow::Result<(Uuid, String)> {
    let mut tx = pool.begin().await?;
    let queued = queue_run(
        &mut tx,
        dataset_version_id,
        base_version_id,
        spec,
        max_attempts,
    )
    .await?;
    tx.commit().await?;
    Ok(queued)
}

/// Creates a queued run and its job in the caller's transaction. The run's
/// steps are fixed here, from the version's training examples of the
/// objective ([`TrainConfig::for_examples`]), so the record, the schedule and
/// a resumed run all agree on them.
///
/// [`TrainConfig::for_examples`]: flywheel_trainer::TrainConfig::for_examples
pub async fn queue_run(
    conn: &mut PgConnection,
    dataset_version_id: Uuid,
    base_version_id: Uuid,
    spec: &RunSpec,
    max_attempts: u32,
) -> anyhow::Result<(Uuid, String)> {
    let kind = kind_of(spec.train.objective);
    let train_examples =
        flywheel_store::datasets::count_examples(&mut *conn, dataset_version_id, kind, "train")
            .await?;
    let spec = RunSpec {
        train: spec.train.for_examples(train_examples as usize),
        ..spec.clone()
    };
    let run_id = training::create(
        &mut *conn,
        dataset_version_id,
        base_version_id,
        kind,
        &serde_json::to_value(&spec)?,
        spec.train.steps as i32,
    )
    .await?;
    let task = queue::push(conn, queue::TRAINING, &TrainJob { run_id }, max_attempts).await?;
    Ok((run_id, task))
}

/// Trains (or resumes) one run to its end. The step function the worker
/// calls; public so tests can run it directly.
/// The loop gets its candidate through `queue` (where it queues the
/// evaluation). Traced as one span (`train`) with the run's step count,
/// not a span per step.
#[tracing::instrument(
    name = "train",
    skip_all,
    err,
    fields(run = %run_id, steps = tracing::field::Empty, status = tracing::field::Empty)
)]
pub async fn run(
    pool: &PgPool,
    env: &TrainEnv,
    run_id: Uuid,
    queue: &impl flywheel_loop::Queue,
) -> anyhow::Result<RunOutcome> {
    let run = training::get(pool, run_id)
        .await?
        .with_context(|| format!("training run {run_id} does not exist"))?;
    if matches!(run.status, RunStatus::Succeeded | RunStatus::Cancelled) {
        return Ok(RunOutcome::of(&run));
    }
    if run.cancel_requested {
        return cancelled(pool, &run, run.step).await;
    }
    training::start(pool, run_id).await?;
    let dir = env.work_dir.join("runs").join(run.id.to_string());
    // Whatever fails once the run is running (its files, the backend, the
    // candidate) ends it failed, with the error.
    match train_run(pool, env, &run, &dir, queue).await {
        Ok(o) => {
            let _ = std::fs::remove_dir_all(&dir);
            let span = tracing::Span::current();
            span.record("steps", o.steps);
            span.record("status", tracing::field::debug(o.status));
            Ok(o)
        }
        Err(e) => {
            training::finish(
                pool,
                run_id,
                RunStatus::Failed,
                None,
                None,
                Some(&format!("{e:#}")),
            )
            .await?;
            Err(e)
        }
    }
}

/// The body of [`run`] once the run is marked running.
async fn train_run(
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    dir: &std::path::Path,
    queue: &impl flywheel_loop::Queue,
) -> anyhow::Result<RunOutcome> {
    let spec: RunSpec = serde_json::from_value(run.config.clone())?;
    let rows = flywheel_store::datasets::examples(
        pool,
        run.dataset_version_id,
        kind_of(spec.train.objective),
        None,
    )
    .await?;
    let base = flywheel_store::models::get(pool, run.base_version_id)
        .await?
        .context("the run's base model version is gone")?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)
        .with_context(|| format!("making the run's working folder {}", dir.display()))?;
    let ctx = RunContext {
        pool,
        env,
        run,
        spec: &spec,
        rows: &rows,
        base: &base,
        dir: dir.to_path_buf(),
    };
    match train_with_backend(&ctx).await? {
        Trained::Cancelled {
            steps,
            resumed_from,
        } => {
            let mut o = cancelled(pool, run, steps).await?;
            o.resumed_from = resumed_from;
            Ok(o)
        }
        trained => {
            let o = register::conclude(&ctx, trained).await?;
            evaluate_candidate(pool, run, o, queue).await
        }
    }
}

/// Every candidate a team's run produced goes to the loop, which queues
/// its evaluation against the team's champion.
async fn evaluate_candidate(
    pool: &PgPool,
    run: &TrainingRun,
    o: RunOutcome,
    queue: &impl flywheel_loop::Queue,
) -> anyhow::Result<RunOutcome> {
    let Some(name) = o.candidate.as_ref() else {
        return Ok(o);
    };
    let candidate = flywheel_store::models::by_name(pool, name)
        .await?
        .context("the candidate is gone")?;
    let loss = match (o.eval_loss_before, o.eval_loss_after) {
        (Some(b), Some(a)) => format!(", held-out loss {b:.3} -> {a:.3}"),
        _ => String::new(),
    };
    let note = format!("{} steps{loss}: {}", o.steps, candidate.name);
    let evaluation = flywheel_loop::cycle::trained(pool, queue, run, &candidate, &note).await?;
    Ok(RunOutcome { evaluation, ..o })
}

async fn train_with_backend(ctx: &RunContext<'_>) -> anyhow::Result<Trained> {
    if !ctx.spec.external {
        return in_process::InProcess.train(ctx).await;
    }
    match &ctx.env.external {
        Some(External::Command(template)) => command::Command { template }.train(ctx).await,
        Some(External::KubernetesJob(job)) => kubernetes::Kubernetes { job }.train(ctx).await,
        None => bail!(
            "this run wants an external trainer, but neither FLYWHEEL_EXTERNAL_TRAINER nor \
             FLYWHEEL_EXTERNAL_TRAINER_JOB is set"
        ),
    }
}

/// Closes a run whose cancel was requested, after `steps` steps (and the
/// loop's cycle that queued it).
async fn cancelled(pool: &PgPool, run: &TrainingRun, steps: i32) -> anyhow::Result<RunOutcome> {
    training::finish(pool, run.id, RunStatus::Cancelled, None, None, None).await?;
    let link = Link::Run(run.id);
    flywheel_loop::cycle::gave_up(pool, link, "the training run was cancelled").await?;
    Ok(RunOutcome {
        status: RunStatus::Cancelled,
        steps,
        candidate: None,
        eval_loss_after: None,
        ..RunOutcome::of(run)
    })
}
