//! The worker's side of the loop: what a cycle's stages run with
//! ([`Work`], kept with each cycle) and how the loop's next stage becomes a
//! job on the apalis queues ([`JobQueue`], the [`flywheel_loop::Queue`] the
//! loop calls inside the transaction that moves the cycle).

use flywheel_curation::build::Rules;
use flywheel_loop::evidence::Needs;
use flywheel_loop::{LoopConfig, QueueError};
use flywheel_store::datasets::{DatasetVersion, Scope};
use flywheel_store::models::ModelVersion;
use flywheel_store::sqlx::PgConnection;
use flywheel_trainer::Objective;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::curate::CurateJob;
use crate::evaluate::EvalJob;
use crate::queue;
use crate::train::{self, RunSpec};

/// What each stage of a cycle runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Work {
    pub rules: Rules,
    pub spec: RunSpec,
    /// Attempts each stage's job gets.
    pub max_attempts: u32,
    /// A teacher whose answers each cycle's curation mixes in while the
    /// team's data is thin (`None`: the loop distils nothing by itself).
    #[serde(default)]
    pub distill: Option<crate::distill::LoopDistill>,
}

impl Work {
    /// The loop's settings for cycles that run with this: training when a
    /// version has `min_new_examples` more than the last run's, and held-out
    /// evidence of `min_items` examples (the gate's minimum; the curation
    /// rules hold out at least that many of a kind large enough).
    pub fn loop_config(self, min_new_examples: i64, min_items: usize) -> LoopConfig {
        let rules = Rules {
            min_eval_examples: self.rules.min_eval_examples.max(min_items),
            ..self.rules
        };
        LoopConfig {
            min_new_examples,
            needs: Needs {
                min_items,
                eval_share_cap: Rules::EVAL_SHARE_CAP,
            },
            work: serde_json::to_value(Work { rules, ..self }).unwrap_or_default(),
        }
    }
}

/// The apalis queues as the loop sees them.
#[derive(Debug, Clone, Copy)]
pub struct JobQueue {
    /// Attempts of an evaluation job (curation and training take the
    /// cycle's own).
    pub max_attempts: u32,
}

impl Default for JobQueue {
    fn default() -> Self {
        Self {
            max_attempts: queue::DEFAULT_MAX_ATTEMPTS,
        }
    }
}

fn work(v: &serde_json::Value) -> Result<Work, QueueError> {
    Ok(serde_json::from_value(v.clone())?)
}

impl flywheel_loop::Queue for JobQueue {
    async fn curate(
        &self,
        conn: &mut PgConnection,
        team: Uuid,
        cycle: Uuid,
        w: &serde_json::Value,
    ) -> Result<(), QueueError> {
        let w = work(w)?;
        let job = CurateJob {
            scope: Scope::Team(team),
            rules: w.rules,
            until: None,
            cycle: Some(cycle),
        };
        queue::push(conn, queue::CURATION, &job, w.max_attempts).await?;
        Ok(())
    }

    async fn train(
        &self,
        conn: &mut PgConnection,
        dataset: &DatasetVersion,
        base: &ModelVersion,
        w: &serde_json::Value,
    ) -> Result<Uuid, QueueError> {
        let w = work(w)?;
        let mut spec = w.spec;
        spec.train.objective = if dataset.sft_count > 0 {
            Objective::Sft
        } else if dataset.dpo_count > 0 {
            Objective::Dpo
        } else {
            Objective::Kto
        };
        let (run, _) = train::queue_run(conn, dataset.id, base.id, &spec, w.max_attempts).await?;
        Ok(run)
    }

    async fn evaluate(&self, conn: &mut PgConnection, evaluation: Uuid) -> Result<(), QueueError> {
        let job = EvalJob {
            evaluation_id: evaluation,
            act: true,
        };
        queue::push(conn, queue::EVALUATION, &job, self.max_attempts).await?;
        Ok(())
    }
}
