//! What a run is: the queue's payload, the run's specification, the
//! worker's training environment, and how a run ended.

use std::path::PathBuf;

use anyhow::bail;
use flywheel_store::training::{RunStatus, TrainingRun};
use flywheel_trainer::{LoraConfig, Objective, TrainConfig};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use flywheel_modelhub::Artifacts;

/// The queue's payload: which run to (continue to) train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    pub run_id: Uuid,
}

/// What a run trains with; stored as the run's `config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub lora: LoraConfig,
    pub train: TrainConfig,
    /// Train with the configured external trainer instead of in-process.
    #[serde(default)]
    pub external: bool,
}

/// Where runs keep their files, and the knobs a worker sets.
#[derive(Debug, Clone)]
pub struct TrainEnv {
    /// Checkpoints, adapters, exported datasets and logs, under
    /// `runs/<run id>/` in this store (local folder or S3).
    pub artifacts: Artifacts,
    /// Local scratch space for the files a run works on.
    pub work_dir: PathBuf,
    /// Where merged candidate models are stored (the model cache).
    pub model_cache: PathBuf,
    pub checkpoint_every: usize,
    /// Niceness of the training thread (and of the external command's
    /// process), so serving on the same machine keeps the CPU.
    pub nice: i32,
    /// Where `--external` runs train.
    pub external: Option<External>,
}

/// An external trainer: it receives the exported dataset and must return a
/// PEFT adapter; Flywheel keeps the record, the evaluation and the candidate.
#[derive(Debug, Clone)]
pub enum External {
    /// `FLYWHEEL_EXTERNAL_TRAINER`: a shell command run on the worker's
    /// machine with `{train}`, `{eval}` (TRL JSONL files), `{spec}` (the
    /// whole run spec, JSON), `{base}` (the base GGUF), `{out}` (where it
    /// must leave a PEFT adapter), `{objective}`, `{steps}` and `{flywheel}`
    /// (this program) filled in.
    Command(String),
    /// `FLYWHEEL_EXTERNAL_TRAINER_JOB`: a Kubernetes Job manifest (YAML or
    /// JSON) submitted with `kubectl`; see [`KubeJob`].
    KubernetesJob(KubeJob),
}

/// How a run ended (for the job's result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    pub status: RunStatus,
    pub resumed_from: Option<i32>,
    pub steps: i32,
    pub candidate: Option<String>,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    /// The evaluation queued for the candidate.
    #[serde(default)]
    pub evaluation: Option<Uuid>,
}

impl RunOutcome {
    pub(crate) fn of(run: &TrainingRun) -> Self {
        Self {
            status: run.status,
            resumed_from: None,
            steps: run.step,
            candidate: run.candidate_version_id.map(|c| c.to_string()),
            eval_loss_before: run.eval_loss_before,
            eval_loss_after: run.eval_loss_after,
            evaluation: None,
        }
    }
}

pub(crate) fn kind_of(objective: Objective) -> &'static str {
    match objective {
        Objective::Sft => "sft",
        Objective::Dpo => "dpo",
        Objective::Kto => "kto",
    }
}

/// The run's keys in the artifact store.
pub(crate) fn run_key(run: Uuid, what: &str) -> String {
    format!("runs/{run}/{what}")
}

/// A Kubernetes Job template. Its containers reach the data through the
/// artifact store: `{train_url}`, `{eval_url}`, `{spec_url}` (the whole run
/// spec, JSON), `{base_url}` (the base GGUF, uploaded once per model) to
/// read, `{out_url}` to leave the adapter under;
/// also `{job}` (the Job's name, which the manifest must use), `{run}`,
/// `{base_name}`, `{objective}`, `{steps}`.
#[derive(Debug, Clone)]
pub struct KubeJob {
    /// The manifest's text, placeholders unfilled.
    pub template: String,
    /// The kubectl program (`FLYWHEEL_KUBECTL`, default `kubectl`); it
    /// brings the cluster's address and credentials (kubeconfig).
    pub kubectl: String,
    /// Seconds between status polls.
    pub poll_secs: u64,
}

/// What a Job template may ask for.
pub const JOB_PLACEHOLDERS: [&str; 10] = [
    "job",
    "run",
    "train_url",
    "eval_url",
    "spec_url",
    "base_url",
    "out_url",
    "base_name",
    "objective",
    "steps",
];

impl KubeJob {
    /// Checks the template before any run needs it: it names the Job
    /// `{job}` and asks for nothing unknown (a misspelt placeholder would
    /// otherwise reach the cluster as text). `${VAR}` is left to the shell.
    pub fn new(template: String, kubectl: String) -> anyhow::Result<Self> {
        if !template.contains("{job}") {
            bail!("the Job template must name its Job {{job}}");
        }
        let mut rest = template.as_str();
        let mut unknown = Vec::new();
        while let Some(open) = rest.find('{') {
            let shell = rest[..open].ends_with('$');
            rest = &rest[open + 1..];
            let Some(close) = rest.find('}') else { break };
            let word = &rest[..close];
            let is_name =
                !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if is_name && !shell && !JOB_PLACEHOLDERS.contains(&word) {
                unknown.push(format!("{{{word}}}"));
            }
        }
        if !unknown.is_empty() {
            bail!(
                "the Job template asks for {}; known: {}",
                unknown.join(", "),
                JOB_PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ")
            );
        }
        Ok(Self {
            template,
            kubectl,
            poll_secs: 5,
        })
    }
}
