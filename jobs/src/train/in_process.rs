//! Training in this process, on a thread of its own at low priority. The
//! thread runs the trainer's loop ([`flywheel_trainer::fit`]) and tells the
//! job about each step and checkpoint over a channel; the job records them
//! in Postgres and the artifact store and answers whether to go on, so the
//! training thread never waits on the database itself.

use std::path::PathBuf;

use anyhow::{Context, bail};
use flywheel_store::training;
use flywheel_trainer::{Base, Control, Lora, Progress, StepLog, Trainer};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use super::backend::{RunContext, Trained, TrainingBackend, base_path};
use super::data::{load_examples, replay_set};
use super::spec::run_key;
use flywheel_modelhub::artifacts;

pub struct InProcess;

/// What the training thread tells the job.
enum Report {
    /// Held-out loss before the first step (fresh runs only).
    EvalBefore(f64),
    /// A step is done; the job answers go on or stop.
    Step(StepLog),
    /// A checkpoint after `step` is in `dir`; the job answers once it is
    /// stored (the folder may then go).
    Checkpoint { step: usize, dir: PathBuf },
}

/// How the thread ended.
enum Ended {
    Done {
        lora: Lora,
        eval_after: f64,
        adapter: PathBuf,
    },
    Stopped {
        steps: usize,
    },
}

/// The thread's side of the conversation.
struct Reporter {
    tx: UnboundedSender<Report>,
    replies: std::sync::mpsc::Receiver<Control>,
    every: usize,
    base_name: String,
    dir: PathBuf,
    fresh: bool,
}

impl Reporter {
    fn ask(&self, report: Report) -> anyhow::Result<Control> {
        self.tx
            .send(report)
            .map_err(|_| anyhow::anyhow!("the training job stopped listening"))?;
        self.replies
            .recv()
            .context("the training job stopped answering")
    }
}

impl Progress for Reporter {
    fn step(&mut self, trainer: &Trainer, log: &StepLog) -> anyhow::Result<Control> {
        if self.ask(Report::Step(log.clone()))? == Control::Stop {
            return Ok(Control::Stop);
        }
        if log.step.is_multiple_of(self.every) && log.step < trainer.config.steps {
            let dir = self.dir.join(format!("checkpoint-{}", log.step));
            trainer.save_checkpoint(&self.base_name, &dir)?;
            self.ask(Report::Checkpoint {
                step: log.step,
                dir,
            })?;
        }
        if self.fresh && crate::faults::get().train_crash_after == Some(log.step) {
            bail!("simulated crash after step {}", log.step);
        }
        if self.fresh
            && let Some(pause) = crate::faults::get().train_step_pause
        {
            std::thread::sleep(pause);
        }
        Ok(Control::Continue)
    }
}

impl TrainingBackend for InProcess {
    async fn train(&self, ctx: &RunContext<'_>) -> anyhow::Result<Trained> {
        let (pool, run, env) = (ctx.pool, ctx.run, ctx.env);
        // The checkpoint may have been written on another machine.
        let resume = match (run.checkpoint_step, &run.checkpoint_path) {
            (Some(step), Some(url)) => {
                let local = ctx.dir.join("resume");
                artifacts::download(url, &local)
                    .await
                    .with_context(|| format!("fetching checkpoint {url}"))?;
                tracing::info!(step, %url, "resuming from checkpoint");
                Some((step, local))
            }
            _ => None,
        };
        let resumed_from = resume.as_ref().map(|(step, _)| *step);
        let (tx, mut reports) = unbounded_channel();
        let (reply, replies) = std::sync::mpsc::channel();
        let reporter = Reporter {
            tx,
            replies,
            every: env.checkpoint_every.max(1),
            base_name: flywheel_modelhub::base_name(&ctx.base.source, &ctx.base.name),
            dir: ctx.dir.clone(),
            fresh: resume.is_none(),
        };
        let want_eval_before = run.eval_loss_before.is_none() && resume.is_none();
        let (spec, rows, path, adapter) = (
            ctx.spec.clone(),
            ctx.rows.to_vec(),
            base_path(ctx).to_path_buf(),
            ctx.dir.join("adapter"),
        );
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let nice = env.nice;
        let (replay_dir, base_sha256) = (env.model_cache.join("replay"), ctx.base.sha256.clone());
        std::thread::Builder::new()
            .name(format!("train-{}", &run.id.simple().to_string()[..8]))
            .spawn(move || {
                // A thread of its own, so its lowered priority stays with training.
                flywheel_trainer::lower_thread_priority(nice);
                let ended = (|| -> anyhow::Result<Ended> {
                    let mut reporter = reporter;
                    let base = Base::load(&path)?;
                    // Checkpoints and the adapter name the same base.
                    reporter.base_name = base.peft_base_name(&reporter.base_name);
                    let (train_set, eval_set) =
                        load_examples(&base, spec.train.objective, rows, spec.train.max_len)?;
                    let replay = replay_set(&base, &spec.train, &replay_dir, &base_sha256)?;
                    let trainer = match &resume {
                        Some((step, dir)) => Trainer::resume(
                            &base.model,
                            dir,
                            *step as usize,
                            spec.train.clone(),
                            train_set,
                        )?,
                        None => {
                            let lora = Lora::new(&base.model, spec.lora.clone())?;
                            Trainer::new(&base.model, lora, spec.train.clone(), train_set)?
                        }
                    };
                    let mut trainer = trainer.with_replay(replay);
                    if want_eval_before {
                        let before = trainer.evaluate(&eval_set)?;
                        let _ = reporter.tx.send(Report::EvalBefore(before));
                    }
                    if !flywheel_trainer::fit(&mut trainer, &mut reporter)? {
                        return Ok(Ended::Stopped {
                            steps: trainer.step,
                        });
                    }
                    let after = trainer.evaluate(&eval_set)?;
                    flywheel_trainer::peft::save(
                        &trainer.lora,
                        &base.model,
                        &reporter.base_name,
                        &adapter,
                    )?;
                    let mut lora = trainer.lora;
                    lora.training = false;
                    Ok(Ended::Done {
                        lora,
                        eval_after: after,
                        adapter,
                    })
                })();
                let _ = done_tx.send(ended);
            })?;

        // The job's side: record what the thread reports until it is done.
        let mut previous = run.checkpoint_step;
        while let Some(report) = reports.recv().await {
            match report {
                Report::EvalBefore(loss) => training::set_eval_before(pool, run.id, loss).await?,
                Report::Step(s) => {
                    crate::meters::observe_training_step(s.tokens, s.seconds);
                    let step = training::NewStep {
                        step: s.step as i32,
                        loss: s.loss,
                        learning_rate: s.learning_rate,
                        grad_norm: s.grad_norm,
                        tokens: s.tokens as i32,
                        seconds: s.seconds,
                    };
                    let cancel = training::record_step(pool, run.id, &step).await?;
                    let _ = reply.send(if cancel {
                        Control::Stop
                    } else {
                        Control::Continue
                    });
                }
                Report::Checkpoint { step, dir } => {
                    // Each checkpoint has its own key; the run's row names the
                    // newest only once it is stored whole, so a crash mid-upload
                    // leaves the previous one in force.
                    let key = run_key(run.id, &format!("checkpoints/{step}"));
                    env.artifacts.put_dir(&key, &dir).await?;
                    training::checkpoint(pool, run.id, step as i32, &env.artifacts.url(&key))
                        .await?;
                    tokio::fs::remove_dir_all(&dir).await?;
                    if let Some(old) = previous.replace(step as i32) {
                        let old = run_key(run.id, &format!("checkpoints/{old}"));
                        if let Err(e) = env.artifacts.delete_dir(&old).await {
                            tracing::warn!(error = %format!("{e:#}"), "could not delete an old checkpoint");
                        }
                    }
                    let _ = reply.send(Control::Continue);
                }
            }
        }
        match done.await.context("the training thread panicked")?? {
            Ended::Stopped { steps } => Ok(Trained::Cancelled {
                steps: steps as i32,
                resumed_from,
            }),
            Ended::Done {
                lora,
                eval_after,
                adapter,
            } => Ok(Trained::Adapter {
                dir: adapter,
                measured: Some((lora, eval_after)),
                resumed_from,
            }),
        }
    }
}
