//! Configuration: defaults, overridden by `FLYWHEEL_*` environment variables
//! (and the conventional `DATABASE_URL`, `HF_ENDPOINT`). CLI flags are only
//! for the knobs of one command.

use std::path::PathBuf;

/// A database URL whose `Debug` hides the password.
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.split_once('@') {
            Some((creds, host)) if creds.contains(':') && creds.matches(':').count() > 1 => {
                let user = creds.rsplit_once(':').map_or(creds, |(u, _)| u);
                write!(f, "{user}:***@{host}")
            }
            _ => f.write_str(&self.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where `up` keeps its database, models and key: `FLYWHEEL_HOME`.
    pub home: PathBuf,
    /// `FLYWHEEL_ADDR`.
    pub addr: String,
    /// `DATABASE_URL`; `up` starts its own Postgres when unset.
    pub database_url: Option<DatabaseUrl>,
    /// `FLYWHEEL_MODEL_CACHE`.
    pub model_cache: PathBuf,
    /// `FLYWHEEL_PYPI_INDEX`.
    pub pypi_index: String,
    /// `HF_ENDPOINT`.
    pub hf_endpoint: String,
    /// `FLYWHEEL_QUEUE_CAPACITY`.
    pub queue_capacity: usize,
    /// `FLYWHEEL_MAX_BATCH`: sequences generating at once.
    pub max_batch: usize,
    /// `FLYWHEEL_MAX_BATCHED_TOKENS`: tokens per engine step.
    pub max_batched_tokens: usize,
    /// `FLYWHEEL_THREADS`: kernel threads (0 = one per core).
    pub threads: usize,
    /// `FLYWHEEL_DEFAULT_MAX_TOKENS`.
    pub default_max_tokens: usize,
    /// `FLYWHEEL_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `FLYWHEEL_LOG_COMPLETIONS` (true/false).
    pub log_completions: bool,
    /// `FLYWHEEL_PG_PORT`: port of the Postgres that `up` starts.
    pub local_pg_port: u16,
    /// `FLYWHEEL_JOURNAL_DIR`: where acknowledged writes wait for Postgres.
    pub journal_dir: PathBuf,
    /// `FLYWHEEL_JOURNAL_MAX_PENDING`: records that may wait before writes are refused.
    pub journal_max_pending: usize,
    /// `FLYWHEEL_JOURNAL_SYNC`: `always`, `batch` (group commit, default) or `never`.
    pub journal_sync: flywheel_gateway::SyncPolicy,
    /// `FLYWHEEL_JOURNAL_SYNC_MS`: how long `batch` gathers writes per fsync.
    pub journal_sync_ms: u64,
    /// `FLYWHEEL_CURATION_SCHEDULE`: cron expression (seconds first) for
    /// scheduled curation, or `off`.
    pub curation_schedule: Option<String>,
    /// `FLYWHEEL_CURATION_RULES`: JSON overriding curation rules, e.g.
    /// `{"max_per_user": 50}`.
    pub curation_rules: flywheel_curation::build::Rules,
    /// `FLYWHEEL_JOB_MAX_ATTEMPTS`.
    pub job_max_attempts: u32,
    /// `FLYWHEEL_JOB_BACKOFF_SECS`: delay after a first failed attempt,
    /// doubled for each further one.
    pub job_backoff_secs: u64,
    /// `FLYWHEEL_JOB_HEARTBEAT_SECS`: a worker silent for 5 heartbeats is
    /// presumed dead and its job goes to another worker.
    pub job_heartbeat_secs: u64,
    /// `FLYWHEEL_JOB_PAUSE_MS`: test knob, a sleep inside each curation job.
    pub job_pause_ms: u64,
    /// `FLYWHEEL_ARTIFACTS`: where training checkpoints, adapters and
    /// exported datasets are kept: a folder (default `<home>/artifacts`) or
    /// an `s3://bucket/prefix` URL (configured by the `AWS_*` variables).
    pub artifacts: String,
    /// `FLYWHEEL_CHECKPOINT_EVERY`: steps between training checkpoints.
    pub checkpoint_every: usize,
    /// `FLYWHEEL_TRAIN_NICE`: priority (0-19) training runs at, below serving.
    pub train_nice: i32,
    /// `FLYWHEEL_EXTERNAL_TRAINER`: the command `train --queue --external`
    /// runs (see `flywheel_jobs::train::External::Command`).
    pub external_trainer: Option<String>,
    /// `FLYWHEEL_EXTERNAL_TRAINER_JOB`: a Kubernetes Job template file that
    /// `--external` runs submit instead (see
    /// `flywheel_jobs::train::External::KubernetesJob`), with
    /// `FLYWHEEL_KUBECTL` (default `kubectl`).
    pub external_trainer_job: Option<PathBuf>,
    pub kubectl: String,
    /// `FLYWHEEL_TRAIN_MIN_NEW_EXAMPLES`: the schedule starts a training
    /// run on the champion when a team's newest dataset version has this
    /// many more examples than its last run's (0: never).
    pub train_min_new_examples: usize,
    /// `FLYWHEEL_TRAIN_CRASH_AFTER`: test knob, a training attempt fails
    /// after this many steps as if its worker had died.
    pub train_crash_after: Option<usize>,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let parse = |k: &str, default: usize| -> anyhow::Result<usize> {
            match var(k) {
                Some(v) => v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{k}={v:?} is not a number")),
                None => Ok(default),
            }
        };
        let home = var("FLYWHEEL_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".flywheel"));
        let home = std::path::absolute(&home).unwrap_or(home);
        let artifacts = var("FLYWHEEL_ARTIFACTS")
            .unwrap_or_else(|| home.join("artifacts").display().to_string());
        let journal_dir = var("FLYWHEEL_JOURNAL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("journal"));
        Ok(Self {
            model_cache: var("FLYWHEEL_MODEL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("models")),
            home,
            addr: var("FLYWHEEL_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into()),
            database_url: var("DATABASE_URL").map(DatabaseUrl),
            pypi_index: var("FLYWHEEL_PYPI_INDEX")
                .unwrap_or_else(|| "https://pypi.org/simple".into()),
            hf_endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            queue_capacity: parse("FLYWHEEL_QUEUE_CAPACITY", 64)?,
            max_batch: parse("FLYWHEEL_MAX_BATCH", 16)?,
            max_batched_tokens: parse("FLYWHEEL_MAX_BATCHED_TOKENS", 256)?,
            threads: parse("FLYWHEEL_THREADS", 0)?,
            default_max_tokens: parse("FLYWHEEL_DEFAULT_MAX_TOKENS", 512)?,
            max_body_bytes: parse("FLYWHEEL_MAX_BODY_BYTES", 1 << 20)?,
            log_completions: var("FLYWHEEL_LOG_COMPLETIONS").is_none_or(|v| v != "false"),
            local_pg_port: parse("FLYWHEEL_PG_PORT", 54329)? as u16,
            journal_dir,
            journal_max_pending: parse("FLYWHEEL_JOURNAL_MAX_PENDING", 1_000_000)?,
            journal_sync: match var("FLYWHEEL_JOURNAL_SYNC") {
                Some(v) => v
                    .parse()
                    .map_err(|e| anyhow::anyhow!("FLYWHEEL_JOURNAL_SYNC: {e}"))?,
                None => Default::default(),
            },
            journal_sync_ms: parse("FLYWHEEL_JOURNAL_SYNC_MS", 2)? as u64,
            curation_schedule: match var("FLYWHEEL_CURATION_SCHEDULE") {
                Some(v) if v == "off" => None,
                Some(v) => Some(v),
                None => Some(flywheel_jobs::schedule::DEFAULT_CURATION_CRON.into()),
            },
            curation_rules: match var("FLYWHEEL_CURATION_RULES") {
                Some(v) => serde_json::from_str(&v)
                    .map_err(|e| anyhow::anyhow!("FLYWHEEL_CURATION_RULES: {e}"))?,
                None => Default::default(),
            },
            job_max_attempts: parse(
                "FLYWHEEL_JOB_MAX_ATTEMPTS",
                flywheel_jobs::queue::DEFAULT_MAX_ATTEMPTS as usize,
            )? as u32,
            job_backoff_secs: parse("FLYWHEEL_JOB_BACKOFF_SECS", 10)? as u64,
            job_heartbeat_secs: parse("FLYWHEEL_JOB_HEARTBEAT_SECS", 3)? as u64,
            job_pause_ms: parse("FLYWHEEL_JOB_PAUSE_MS", 0)? as u64,
            artifacts,
            checkpoint_every: parse("FLYWHEEL_CHECKPOINT_EVERY", 50)?,
            external_trainer: var("FLYWHEEL_EXTERNAL_TRAINER"),
            external_trainer_job: var("FLYWHEEL_EXTERNAL_TRAINER_JOB").map(PathBuf::from),
            kubectl: var("FLYWHEEL_KUBECTL").unwrap_or_else(|| "kubectl".into()),
            train_nice: parse("FLYWHEEL_TRAIN_NICE", 19)?.min(19) as i32,
            train_min_new_examples: parse("FLYWHEEL_TRAIN_MIN_NEW_EXAMPLES", 200)?,
            train_crash_after: match parse("FLYWHEEL_TRAIN_CRASH_AFTER", 0)? {
                0 => None,
                n => Some(n),
            },
        })
    }

    pub fn engine(&self) -> flywheel_engine::EngineConfig {
        flywheel_engine::EngineConfig {
            queue_capacity: self.queue_capacity,
            max_batch: self.max_batch,
            max_batched_tokens: self.max_batched_tokens,
            threads: self.threads,
            ..Default::default()
        }
    }

    pub fn journal(&self) -> flywheel_gateway::JournalConfig {
        let mut j = flywheel_gateway::JournalConfig::new(&self.journal_dir);
        j.max_pending = self.journal_max_pending;
        j.sync = self.journal_sync;
        j.sync_interval = std::time::Duration::from_millis(self.journal_sync_ms);
        j
    }

    /// What training runs need: the artifact store, scratch space, the
    /// external trainer if one is configured.
    pub fn train_env(&self) -> anyhow::Result<flywheel_jobs::train::TrainEnv> {
        use flywheel_jobs::train::{External, KubeJob, TrainEnv};
        let external = match (&self.external_trainer_job, &self.external_trainer) {
            (Some(_), Some(_)) => anyhow::bail!(
                "set FLYWHEEL_EXTERNAL_TRAINER or FLYWHEEL_EXTERNAL_TRAINER_JOB, not both"
            ),
            (Some(path), None) => {
                let at = |e: &dyn std::fmt::Display| {
                    anyhow::anyhow!("FLYWHEEL_EXTERNAL_TRAINER_JOB={}: {e}", path.display())
                };
                let template = std::fs::read_to_string(path).map_err(|e| at(&e))?;
                let job = KubeJob::new(template, self.kubectl.clone()).map_err(|e| at(&e))?;
                Some(External::KubernetesJob(job))
            }
            (None, Some(command)) => Some(External::Command(command.clone())),
            (None, None) => None,
        };
        Ok(TrainEnv {
            artifacts: flywheel_jobs::artifacts::Artifacts::open(&self.artifacts)
                .map_err(|e| anyhow::anyhow!("FLYWHEEL_ARTIFACTS={}: {e:#}", self.artifacts))?,
            work_dir: self.home.join("work"),
            model_cache: self.model_cache.clone(),
            checkpoint_every: self.checkpoint_every,
            external,
            nice: self.train_nice,
            crash_after: self.train_crash_after,
        })
    }

    /// The worker's settings; its name is unique to this process.
    pub fn worker(&self) -> anyhow::Result<flywheel_jobs::worker::WorkerConfig> {
        use flywheel_jobs::{schedule, worker};
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let name = format!(
            "{}-{}-{}",
            host.trim().chars().take(32).collect::<String>(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut w = worker::WorkerConfig::new(name);
        w.heartbeat = std::time::Duration::from_secs(self.job_heartbeat_secs.max(1));
        w.max_attempts = self.job_max_attempts.max(1);
        w.backoff.base = std::time::Duration::from_secs(self.job_backoff_secs);
        w.pause =
            (self.job_pause_ms > 0).then(|| std::time::Duration::from_millis(self.job_pause_ms));
        w.training = Some(self.train_env()?);
        w.curation = match &self.curation_schedule {
            Some(expr) => Some(schedule::CurationSchedule {
                cron: schedule::parse_cron(expr)?,
                rules: self.curation_rules.clone(),
                max_attempts: w.max_attempts,
                training: (self.train_min_new_examples > 0).then(|| schedule::TrainingTrigger {
                    min_new_examples: self.train_min_new_examples as i64,
                    spec: flywheel_jobs::train::RunSpec {
                        lora: Default::default(),
                        train: Default::default(),
                        external: false,
                    },
                    max_attempts: w.max_attempts,
                }),
            }),
            None => None,
        };
        Ok(w)
    }

    pub fn gateway(&self) -> flywheel_gateway::GatewayConfig {
        flywheel_gateway::GatewayConfig {
            max_body_bytes: self.max_body_bytes,
            default_max_tokens: self.default_max_tokens,
            log_completions: self.log_completions,
        }
    }
}
