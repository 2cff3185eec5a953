//! `flywheel worker`: an apalis worker on the Postgres queues plus the
//! schedules. Each attempt is recorded in `job_runs`; a failed attempt pushes
//! its task's next run back exponentially (in the queue table, so the delay
//! survives restarts); a worker that dies mid-job stops heartbeating and its
//! task is handed to another worker. Locks taken with `FOR UPDATE SKIP
//! LOCKED` mean two workers never run the same task at once.

use std::time::Duration;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId, WorkerBuilder, WorkerBuilderExt};
use apalis_postgres::{Config, PostgresStorage};
use flywheel_store::PgPool;
use flywheel_store::cycles::Link;
use flywheel_store::datasets::Scope;
use tracing::Instrument;

use crate::curate::{self, CurateJob};
use crate::evaluate::{self, EvalEnv, EvalJob};
use crate::queue;
use crate::schedule::{self, CurationSchedule};
use crate::stages::JobQueue;
use crate::train::{self, TrainEnv, TrainJob};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique per process: the queue's locks name it.
    pub name: String,
    /// How often the worker says it is alive and looks for due tasks.
    pub heartbeat: Duration,
    /// Heartbeats missed before a worker's running tasks go back to the queue.
    pub missed_heartbeats: usize,
    /// After the shutdown signal, how long to wait for running jobs before
    /// returning without them: their attempts stop heartbeating, and
    /// another worker takes them over (a training run from its last
    /// checkpoint), as if this one had died.
    pub shutdown_grace: Duration,
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// `None`: no scheduled curation in this process.
    pub curation: Option<CurationSchedule>,
    /// Where training runs keep their files; `None`: this worker takes no
    /// training runs.
    pub training: Option<TrainEnv>,
    /// How evaluations run; `None`: this worker takes none.
    pub evaluation: Option<EvalEnv>,
    /// How often running canaries are checked; `None`: not in this worker.
    pub canary_check: Option<Duration>,
}

impl WorkerConfig {
    /// The grace period a stop gets: at most a heartbeat short of the time
    /// after which other workers take a silent worker's jobs (a stopping
    /// worker no longer heartbeats: past that, another would start a job
    /// this one still runs).
    pub fn effective_grace(&self) -> Duration {
        let silent = self.heartbeat * self.missed_heartbeats as u32;
        self.shutdown_grace
            .min(silent.saturating_sub(self.heartbeat))
    }

    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            heartbeat: Duration::from_secs(3),
            missed_heartbeats: 5,
            shutdown_grace: Duration::from_secs(10),
            max_attempts: queue::DEFAULT_MAX_ATTEMPTS,
            backoff: Backoff::default(),
            curation: None,
            training: None,
            evaluation: None,
            canary_check: None,
        }
    }
}

/// Delay before attempt `n + 1` after attempt `n` failed: `base * 2^(n-1)`,
/// at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            max: Duration::from_secs(600),
        }
    }
}

impl Backoff {
    pub fn after(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[derive(Clone)]
struct Ctx {
    pool: PgPool,
    worker: String,
    max_attempts: u32,
    backoff: Backoff,
    training: Option<TrainEnv>,
    evaluation: Option<EvalEnv>,
}

/// Records an attempt's start and end in `job_runs`; a failure pushes the
/// task's next attempt back by the backoff, and the last attempt's failure
/// ends the loop's cycle the task belongs to (`cycle`).
async fn recorded<T, F>(
    ctx: &Ctx,
    kind: &str,
    task_id: &str,
    attempt: u32,
    args: serde_json::Value,
    cycle: Option<Link>,
    work: F,
) -> Result<(), BoxDynError>
where
    T: serde::Serialize,
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let store = &ctx.pool;
    let run =
        flywheel_store::jobs::run_started(store, task_id, kind, attempt as i32, &ctx.worker, &args)
            .await?;
    let started = std::time::Instant::now();
    // A trace per attempt: the job, its stage's spans (curate, train with
    // its step count, evaluate), and the loop's moves it makes.
    let span = tracing::info_span!(
        "job",
        otel.name = %format!("job {kind}"),
        job.kind = kind,
        job.task = task_id,
        job.attempt = i64::from(attempt),
        job.outcome = tracing::field::Empty,
    );
    let ended = work.instrument(span.clone()).await;
    span.record(
        "job.outcome",
        if ended.is_ok() { "succeeded" } else { "failed" },
    );
    crate::meters::observe_job(kind, ended.is_ok(), started.elapsed().as_secs_f64());
    match ended {
        Ok(outcome) => {
            let result = serde_json::to_value(&outcome)?;
            flywheel_store::jobs::run_finished(store, run, Ok(&result)).await?;
            tracing::info!(task = %task_id, kind, %result, "job done");
            Ok(())
        }
        Err(e) => {
            let message = format!("{e:#}");
            let delay = ctx.backoff.after(attempt);
            tracing::warn!(task = %task_id, kind, attempt, error = %message, retry_in = ?delay, "job failed");
            flywheel_store::jobs::run_finished(store, run, Err(&message)).await?;
            flywheel_store::jobs::delay_task(store, task_id, delay).await?;
            let last = flywheel_store::jobs::task_state(store, task_id)
                .await?
                .is_some_and(|s| attempt as i64 >= i64::from(s.max_attempts));
            if let (true, Some(link)) = (last, cycle) {
                let why = format!("{kind} gave up after {attempt} attempts: {message}");
                flywheel_loop::cycle::gave_up(store, link, &why).await?;
            }
            Err(message.into())
        }
    }
}

/// One attempt of a training run.
async fn train_task(
    job: TrainJob,
    task_id: TaskId,
    attempt: Attempt,
    ctx: Data<Ctx>,
) -> Result<(), BoxDynError> {
    let env = ctx
        .training
        .clone()
        .ok_or("this worker takes no training runs")?;
    let args = serde_json::to_value(&job)?;
    let attempt = attempt.current().max(1) as u32;
    let cycle = Some(Link::Run(job.run_id));
    recorded(
        &ctx,
        "train",
        &task_id.to_string(),
        attempt,
        args,
        cycle,
        async {
            let queue = JobQueue {
                max_attempts: ctx.max_attempts,
            };
            train::run(&ctx.pool, &env, job.run_id, &queue).await
        },
    )
    .await
}

/// One attempt of an evaluation.
async fn eval_task(
    job: EvalJob,
    task_id: TaskId,
    attempt: Attempt,
    ctx: Data<Ctx>,
) -> Result<(), BoxDynError> {
    let env = ctx
        .evaluation
        .clone()
        .ok_or("this worker takes no evaluations")?;
    let args = serde_json::to_value(&job)?;
    let attempt = attempt.current().max(1) as u32;
    recorded(
        &ctx,
        "evaluate",
        &task_id.to_string(),
        attempt,
        args,
        Some(Link::Evaluation(job.evaluation_id)),
        async { evaluate::run(&ctx.pool, &env, &job).await },
    )
    .await
}

/// One attempt of a curation task.
async fn curate_task(
    job: CurateJob,
    task_id: TaskId,
    attempt: Attempt,
    ctx: Data<Ctx>,
) -> Result<(), BoxDynError> {
    let args = serde_json::to_value(&job)?;
    let attempt = attempt.current().max(1) as u32;
    let cycle = job.cycle.map(Link::Cycle);
    recorded(
        &ctx,
        "curate",
        &task_id.to_string(),
        attempt,
        args,
        cycle,
        async {
            let distilled = distill_first(&ctx, &job).await?;
            let mut outcome = curate::run(&ctx.pool, &job).await?;
            outcome.distilled = distilled;
            if let Some(id) = job.cycle {
                let queue = JobQueue {
                    max_attempts: ctx.max_attempts,
                };
                flywheel_loop::cycle::curated(&ctx.pool, &queue, id, outcome.version_id).await?;
            }
            Ok(outcome)
        },
    )
    .await
}

/// The loop's own distillation, before a cycle's curation, when the
/// cycle's work names a teacher ([`crate::distill::by_itself`]); what it
/// did, in words.
async fn distill_first(ctx: &Ctx, job: &CurateJob) -> anyhow::Result<Option<String>> {
    let (Some(cycle), Scope::Team(team)) = (job.cycle, job.scope) else {
        return Ok(None);
    };
    let Some(c) = flywheel_store::cycles::get(&ctx.pool, cycle).await? else {
        return Ok(None);
    };
    let work: Option<crate::stages::Work> = serde_json::from_value(c.config["work"].clone()).ok();
    let Some(spec) = work.and_then(|w| w.distill) else {
        return Ok(None);
    };
    let Some(env) = &ctx.evaluation else {
        return Ok(Some(
            "not distilled: this worker loads no models (it takes no evaluations)".into(),
        ));
    };
    let done = crate::distill::by_itself(
        &ctx.pool,
        &env.versions,
        &env.upstream,
        (team, cycle),
        &spec,
        job.rules.eval_fraction,
    )
    .await
    // The users' data is curated whatever the teacher did.
    .unwrap_or_else(|e| format!("not distilled: {e:#}"));
    tracing::info!(team = %team, "the loop's distillation: {done}");
    Ok(Some(done))
}

/// Runs the worker (and, if configured, the curation schedule) until
/// `shutdown` resolves.
pub async fn run(
    pool: PgPool,
    config: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    queue::setup(&pool).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let schedule = config.curation.clone().map(|s| {
        let mut rx = stop_rx.clone();
        tokio::spawn(schedule::run_curation_schedule(
            pool.clone(),
            s,
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            },
        ))
    });

    let storage_config = |queue: &str| {
        Config::default()
            .queue(queue)
            .batch_size(1)
            .heartbeat_interval(config.heartbeat)
            .missed_heartbeats(config.missed_heartbeats)
    };
    let ctx = Ctx {
        pool: pool.clone(),
        worker: config.name.clone(),
        max_attempts: config.max_attempts,
        backoff: config.backoff,
        training: config.training.clone(),
        evaluation: config.evaluation.clone(),
    };
    let curation = WorkerBuilder::new(format!("{}-curate", config.name))
        .backend(
            PostgresStorage::<CurateJob>::new(&pool)
                .with_config(storage_config(queue::CURATION))
                .with_pubsub(),
        )
        .concurrency(1)
        .data(ctx.clone())
        .build(curate_task);
    let (stop_all, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
            Ok::<(), std::io::Error>(())
        }
    };
    tracing::info!(worker = %config.name, queue = queue::CURATION, "worker started");
    let curation = curation.run_until(stopped(&stop_all));
    let train_stop = stopped(&stop_all);
    let training = async {
        if config.training.is_none() {
            return Ok(());
        }
        tracing::info!(worker = %config.name, queue = queue::TRAINING, "training worker started");
        WorkerBuilder::new(format!("{}-train", config.name))
            .backend(
                PostgresStorage::<TrainJob>::new(&pool)
                    .with_config(storage_config(queue::TRAINING))
                    .with_pubsub(),
            )
            .concurrency(1)
            .data(ctx.clone())
            .build(train_task)
            .run_until(train_stop)
            .await
    };
    let eval_stop = stopped(&stop_all);
    let evaluation = async {
        if config.evaluation.is_none() {
            return Ok(());
        }
        tracing::info!(worker = %config.name, queue = queue::EVALUATION, "evaluation worker started");
        WorkerBuilder::new(format!("{}-eval", config.name))
            .backend(
                PostgresStorage::<EvalJob>::new(&pool)
                    .with_config(storage_config(queue::EVALUATION))
                    .with_pubsub(),
            )
            .concurrency(1)
            .data(ctx.clone())
            .build(eval_task)
            .run_until(eval_stop)
            .await
    };
    let monitor = match (&config.canary_check, &config.evaluation) {
        (Some(every), Some(env)) => {
            let mut rx = stop_rx.clone();
            Some(tokio::spawn(crate::canary::monitor(
                pool.clone(),
                env.policy.clone(),
                *every,
                async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                },
            )))
        }
        _ => None,
    };
    // The signal stops taking jobs; those running get the grace period to
    // end, then are left behind.
    let grace = config.effective_grace();
    if grace < config.shutdown_grace {
        tracing::warn!(
            asked = ?config.shutdown_grace,
            ?grace,
            "the shutdown grace is cut short: other workers take a silent worker's jobs after \
             FLYWHEEL_JOB_HEARTBEAT_SECS x 5"
        );
    }
    let grace_over = {
        let stop_all = stop_all.clone();
        async move {
            shutdown.await;
            tracing::info!(
                ?grace,
                "stopping: no new jobs; waiting for the running ones"
            );
            let _ = stop_all.send(());
            tokio::time::sleep(grace).await;
        }
    };
    let result = tokio::select! {
        // The workers first: with no grace at all they still stop cleanly.
        biased;
        (curation, training, evaluation) = async { tokio::join!(curation, training, evaluation) } => {
            curation.and(training).and(evaluation)
        }
        () = grace_over => {
            tracing::warn!(
                "jobs still running after the shutdown grace period: left to another worker, \
                 which takes them over once this one's heartbeat stops"
            );
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    if let Some(s) = schedule {
        let _ = s.await;
    }
    if let Some(m) = monitor {
        let _ = m.await;
    }
    result.map_err(|e| anyhow::anyhow!("worker stopped: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_grace_ends_before_other_workers_take_over() {
        let mut c = WorkerConfig::new("w");
        c.heartbeat = Duration::from_secs(3);
        c.missed_heartbeats = 5;
        c.shutdown_grace = Duration::from_secs(10);
        assert_eq!(c.effective_grace(), Duration::from_secs(10));
        c.shutdown_grace = Duration::from_secs(15);
        assert_eq!(c.effective_grace(), Duration::from_secs(12));
        c.heartbeat = Duration::from_secs(1);
        assert_eq!(c.effective_grace(), Duration::from_secs(4));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(10),
        };
        assert_eq!(b.after(1), Duration::from_secs(2));
        assert_eq!(b.after(2), Duration::from_secs(4));
        assert_eq!(b.after(3), Duration::from_secs(8));
        assert_eq!(b.after(4), Duration::from_secs(10));
        assert_eq!(b.after(40), Duration::from_secs(10));
    }
}
