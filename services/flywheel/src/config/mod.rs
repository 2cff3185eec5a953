//! Configuration: defaults, then an optional `flywheel.toml` (`--config` or
//! `FLYWHEEL_CONFIG`), then the environment (`FLYWHEEL_*`, and the
//! conventional `DATABASE_URL`, `HF_ENDPOINT`). Every setting is declared
//! once in [`settings::SETTINGS`]; parsing is strict (a bad value names its
//! variable or key, and stops the start); `flywheel config show` prints the
//! effective settings and where each came from. CLI flags are only for the
//! knobs of one command.

pub mod settings;

use std::path::{Path, PathBuf};

use settings::{ConfigError, Layers, SETTINGS, Source};

/// A database URL whose `Debug` and `Display` hide the password.
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    pub fn redacted(&self) -> String {
        match self.0.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((creds, host)) => {
                    let user = creds.split_once(':').map_or(creds, |(u, _)| u);
                    if creds.contains(':') {
                        format!("{scheme}://{user}:***@{host}")
                    } else {
                        self.0.clone()
                    }
                }
                None => self.0.clone(),
            },
            None => self.0.clone(),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where `up` keeps its database, models, journal and key.
    pub home: PathBuf,
    pub database: DatabaseSettings,
    pub gateway: GatewaySettings,
    pub engine: flywheel_engine::EngineConfig,
    pub journal: flywheel_gateway::JournalConfig,
    pub models: ModelSettings,
    pub jobs: JobSettings,
    pub training: TrainingSettings,
    pub promotion: flywheel_eval::Policy,
    pub admin: flywheel_admin::AdminConfig,
    /// Evaluation requests in flight at once.
    pub eval_concurrency: usize,
    /// How often the worker checks running canaries.
    pub canary_check_secs: u64,
    /// Every value as loaded, for `config show`.
    pub layers: Layers,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `None`: `up` starts its own.
    pub url: Option<DatabaseUrl>,
    /// Port of the private cluster `up` starts.
    pub local_port: u16,
}

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub addr: String,
    pub http: flywheel_gateway::GatewayConfig,
}

#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub cache: PathBuf,
    pub pypi_index: String,
    pub hf_endpoint: String,
}

#[derive(Debug, Clone)]
pub struct JobSettings {
    /// `None`: no scheduled curation.
    pub curation_schedule: Option<String>,
    pub curation_rules: flywheel_curation::build::Rules,
    pub max_attempts: u32,
    pub backoff_secs: u64,
    pub heartbeat_secs: u64,
}

#[derive(Debug, Clone)]
pub struct TrainingSettings {
    /// A folder or an `s3://bucket/prefix` URL.
    pub artifacts: String,
    pub checkpoint_every: usize,
    pub nice: i32,
    pub external_trainer: Option<String>,
    pub external_trainer_job: Option<PathBuf>,
    pub kubectl: String,
    pub min_new_examples: usize,
}

impl Config {
    /// The configuration of this process: `file` (or `FLYWHEEL_CONFIG`)
    /// over the defaults, the environment over both.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let from_env = std::env::var("FLYWHEEL_CONFIG")
            .ok()
            .filter(|v| !v.is_empty());
        let file = file.map(Path::to_path_buf).or(from_env.map(PathBuf::from));
        Ok(Self::from_layers(Layers::load(file.as_deref(), |k| {
            std::env::var(k).ok()
        })?)?)
    }

    /// Defaults and the environment only (what tests of the library use).
    pub fn from_env() -> anyhow::Result<Self> {
        Self::load(None)
    }

    pub fn from_layers(l: Layers) -> Result<Self, ConfigError> {
        let home = PathBuf::from(l.value("home"));
        let home = std::path::absolute(&home).unwrap_or(home);
        // `$FLYWHEEL_HOME/...` defaults live under `home`.
        let under_home = |key: &str| -> PathBuf {
            let v = l.value(key);
            match v.strip_prefix("$FLYWHEEL_HOME/") {
                Some(rest) => home.join(rest),
                None => PathBuf::from(v),
            }
        };
        let port = l.number("database.local_port", 1..=65535)? as u16;
        let usize_of = |key: &str, min: u64| -> Result<usize, ConfigError> {
            Ok(l.number(key, min..=u32::MAX as u64)? as usize)
        };
        let mut journal = flywheel_gateway::JournalConfig::new(under_home("journal.dir"));
        journal.max_pending = usize_of("journal.max_pending", 1)?;
        journal.sync = l.parse("journal.sync", "always, batch or never")?;
        journal.sync_interval =
            std::time::Duration::from_millis(l.number("journal.sync_ms", 0..=10_000)?);
        let engine = flywheel_engine::EngineConfig {
            queue_capacity: usize_of("engine.queue_capacity", 1)?,
            max_batch: usize_of("engine.max_batch", 1)?,
            max_batched_tokens: usize_of("engine.max_batched_tokens", 1)?,
            threads: usize_of("engine.threads", 0)?,
            simd: l.parse("engine.simd", "avx512, avx2 or portable")?,
            ..Default::default()
        };
        let curation_rules = serde_json::from_str(l.value("jobs.curation_rules"))
            .map_err(|e| l.invalid("jobs.curation_rules", e.to_string()))?;
        let curation_schedule = match l.value("jobs.curation_schedule") {
            "off" => None,
            expr => {
                flywheel_jobs::schedule::parse_cron(expr)
                    .map_err(|e| l.invalid("jobs.curation_schedule", e.to_string()))?;
                Some(expr.to_string())
            }
        };
        let artifacts = match l.source("training.artifacts") {
            Source::Default => under_home("training.artifacts").display().to_string(),
            _ => l.value("training.artifacts").to_string(),
        };
        Ok(Self {
            database: DatabaseSettings {
                url: l.text("database.url").map(DatabaseUrl),
                local_port: port,
            },
            gateway: GatewaySettings {
                addr: l.value("gateway.addr").to_string(),
                http: flywheel_gateway::GatewayConfig {
                    max_body_bytes: usize_of("gateway.max_body_bytes", 1)?,
                    default_max_tokens: usize_of("gateway.default_max_tokens", 1)?,
                    log_completions: l.bool("gateway.log_completions")?,
                    max_loaded_models: usize_of("gateway.max_loaded_models", 1)?,
                    route_refresh: std::time::Duration::from_secs(
                        l.number("gateway.route_refresh_secs", 1..=86_400)?,
                    ),
                },
            },
            engine,
            journal,
            models: ModelSettings {
                cache: under_home("models.cache"),
                pypi_index: l.value("models.pypi_index").to_string(),
                hf_endpoint: l.value("models.hf_endpoint").to_string(),
            },
            jobs: JobSettings {
                curation_schedule,
                curation_rules,
                max_attempts: l.number("jobs.max_attempts", 1..=1000)? as u32,
                backoff_secs: l.number("jobs.backoff_secs", 0..=86_400)?,
                heartbeat_secs: l.number("jobs.heartbeat_secs", 1..=3600)?,
            },
            training: TrainingSettings {
                artifacts,
                checkpoint_every: usize_of("training.checkpoint_every", 1)?,
                nice: l.number("training.nice", 0..=19)? as i32,
                external_trainer: l.text("training.external_trainer"),
                external_trainer_job: l.text("training.external_trainer_job").map(PathBuf::from),
                kubectl: l.value("training.kubectl").to_string(),
                min_new_examples: usize_of("training.min_new_examples", 0)?,
            },
            promotion: flywheel_eval::Policy {
                task_min_lower_bound: l.float("promotion.task_min_lower_bound", -1.0..=1.0)?,
                retention_min_lower_bound: l
                    .float("promotion.retention_min_lower_bound", -1.0..=1.0)?,
                max_latency_ratio: l.float("promotion.max_latency_ratio", 0.1..=100.0)?,
                min_items: usize_of("promotion.min_items", 1)?,
                canary_share: l.float("promotion.canary_share", 0.0..=0.9)?,
                canary_min_votes: l.number("promotion.canary_min_votes", 1..=1_000_000)?,
                canary_deadline_hours: l
                    .float("promotion.canary_deadline_hours", 0.0..=10_000.0)?,
                canary_confidence: l.float("promotion.canary_confidence", 0.5..=0.9999)?,
            },
            admin: flywheel_admin::AdminConfig {
                max_failed_logins: l.number("admin.max_failed_logins", 1..=1000)? as i32,
                lock_seconds: 60.0 * l.float("admin.lock_minutes", 0.0..=10_000.0)?,
                session_hours: l.float("admin.session_hours", 0.01..=10_000.0)?,
                secure_cookies: l.bool("admin.secure_cookies")?,
                ..Default::default()
            },
            eval_concurrency: usize_of("promotion.eval_concurrency", 1)?,
            canary_check_secs: l.number("jobs.canary_check_secs", 1..=86_400)?,
            home,
            layers: l,
        })
    }

    /// `flywheel config show`: every setting, its value (secrets redacted)
    /// and where it came from.
    pub fn show(&self) -> String {
        let mut out = format!(
            "{:<28}  {:<32}  {:<40}  source\n",
            "key", "variable", "value"
        );
        for s in SETTINGS {
            let value = self.layers.value(s.key);
            let shown = match (s.secret, value.is_empty()) {
                (_, true) => "(unset)".to_string(),
                (true, false) => DatabaseUrl(value.to_string()).redacted(),
                (false, false) => value.to_string(),
            };
            out.push_str(&format!(
                "{:<28}  {:<32}  {:<40}  {}\n",
                s.key,
                s.env,
                shown,
                self.layers.source(s.key)
            ));
        }
        out
    }

    /// What training runs need: the artifact store, scratch space, the
    /// external trainer if one is configured.
    pub fn train_env(&self) -> anyhow::Result<flywheel_jobs::train::TrainEnv> {
        use flywheel_jobs::train::{External, KubeJob, TrainEnv};
        let t = &self.training;
        let external = match (&t.external_trainer_job, &t.external_trainer) {
            (Some(_), Some(_)) => anyhow::bail!(
                "set FLYWHEEL_EXTERNAL_TRAINER or FLYWHEEL_EXTERNAL_TRAINER_JOB, not both"
            ),
            (Some(path), None) => {
                let at = |e: &dyn std::fmt::Display| {
                    anyhow::anyhow!("FLYWHEEL_EXTERNAL_TRAINER_JOB={}: {e}", path.display())
                };
                let template = std::fs::read_to_string(path).map_err(|e| at(&e))?;
                let job = KubeJob::new(template, t.kubectl.clone()).map_err(|e| at(&e))?;
                Some(External::KubernetesJob(job))
            }
            (None, Some(command)) => Some(External::Command(command.clone())),
            (None, None) => None,
        };
        Ok(TrainEnv {
            artifacts: flywheel_modelhub::Artifacts::open(&t.artifacts)
                .map_err(|e| anyhow::anyhow!("FLYWHEEL_ARTIFACTS={}: {e:#}", t.artifacts))?,
            work_dir: self.home.join("work"),
            model_cache: self.models.cache.clone(),
            checkpoint_every: t.checkpoint_every,
            external,
            nice: t.nice,
        })
    }

    /// How this process evaluates candidates.
    pub fn eval_env(&self, pool: &flywheel_store::PgPool) -> flywheel_jobs::evaluate::EvalEnv {
        flywheel_jobs::evaluate::EvalEnv {
            versions: crate::bootstrap::versions(self, pool),
            policy: self.promotion.clone(),
            concurrency: self.eval_concurrency,
            retention: None,
        }
    }

    /// The worker's settings; its name is unique to this process.
    pub fn worker(
        &self,
        pool: &flywheel_store::PgPool,
    ) -> anyhow::Result<flywheel_jobs::worker::WorkerConfig> {
        use flywheel_jobs::{schedule, worker};
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let name = format!(
            "{}-{}-{}",
            host.trim().chars().take(32).collect::<String>(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let j = &self.jobs;
        let mut w = worker::WorkerConfig::new(name);
        w.heartbeat = std::time::Duration::from_secs(j.heartbeat_secs.max(1));
        w.max_attempts = j.max_attempts.max(1);
        w.backoff.base = std::time::Duration::from_secs(j.backoff_secs);
        w.training = Some(self.train_env()?);
        w.canary_check = Some(std::time::Duration::from_secs(self.canary_check_secs));
        w.evaluation = Some(self.eval_env(pool));
        let min_new = self.training.min_new_examples;
        w.curation = match &j.curation_schedule {
            Some(expr) => Some(schedule::CurationSchedule {
                cron: schedule::parse_cron(expr)?,
                rules: j.curation_rules.clone(),
                max_attempts: w.max_attempts,
                cycles: (min_new > 0).then(|| self.loop_config(min_new)),
            }),
            None => None,
        };
        Ok(w)
    }

    /// What the loop's cycles run with: training once a team's dataset
    /// holds `min_new_examples` examples its last run did not have, with
    /// the default training spec.
    pub fn loop_config(&self, min_new_examples: usize) -> flywheel_loop::LoopConfig {
        flywheel_jobs::stages::Work {
            rules: self.jobs.curation_rules.clone(),
            spec: flywheel_jobs::train::RunSpec {
                lora: Default::default(),
                train: Default::default(),
                external: false,
            },
            max_attempts: self.jobs.max_attempts.max(1),
        }
        .loop_config(min_new_examples.max(1) as i64, self.promotion.min_items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, String> {
        let path = file.map(|text| {
            let p = std::env::temp_dir().join(format!("fw-config-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&p, text).unwrap();
            p
        });
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Layers::load(path.as_deref(), |k| env.get(k).cloned())
            .and_then(Config::from_layers)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let c = with(None, &[]).unwrap();
        assert_eq!(c.gateway.addr, "127.0.0.1:8080");
        assert_eq!(c.journal.sync, flywheel_gateway::SyncPolicy::Batch);
        assert!(c.models.cache.ends_with(".flywheel/models"));
        let c = with(
            Some("home = \"/srv/fw\"\n[gateway]\naddr = \"0.0.0.0:9000\"\nlog_completions = false\n[engine]\nmax_batch = 4\n[jobs.curation_rules]\nmax_per_user = 7\n"),
            &[("FLYWHEEL_ADDR", "127.0.0.1:7000")],
        )
        .unwrap();
        assert_eq!(c.gateway.addr, "127.0.0.1:7000", "the environment wins");
        assert!(!c.gateway.http.log_completions);
        assert_eq!(c.engine.max_batch, 4);
        assert_eq!(c.jobs.curation_rules.max_per_user, 7);
        assert_eq!(c.models.cache, PathBuf::from("/srv/fw/models"));
        assert!(matches!(
            c.layers.source("gateway.addr"),
            Source::Env("FLYWHEEL_ADDR")
        ));
        assert!(matches!(
            c.layers.source("engine.max_batch"),
            Source::File(_)
        ));
        assert!(c.show().contains("environment (FLYWHEEL_ADDR)"));
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named() {
        let e = with(Some("[gateway]\nadr = \"x\"\n"), &[]).unwrap_err();
        assert!(e.contains("unknown setting `gateway.adr`"), "{e}");
    }

    #[test]
    fn a_bad_boolean_is_named_with_its_value() {
        let e = with(None, &[("FLYWHEEL_LOG_COMPLETIONS", "flase")]).unwrap_err();
        assert_eq!(
            e,
            "FLYWHEEL_LOG_COMPLETIONS = \"flase\": expected true or false"
        );
        let e = with(Some("[gateway]\nlog_completions = \"yes\"\n"), &[]).unwrap_err();
        assert!(e.starts_with("gateway.log_completions in "), "{e}");
    }

    #[test]
    fn a_port_out_of_range_is_named_with_its_value() {
        let e = with(None, &[("FLYWHEEL_PG_PORT", "70000")]).unwrap_err();
        assert_eq!(
            e,
            "FLYWHEEL_PG_PORT = \"70000\": expected a number from 1 to 65535"
        );
        assert!(with(None, &[("FLYWHEEL_PG_PORT", "-1")]).is_err());
    }

    #[test]
    fn the_readme_table_lists_every_setting() {
        let readme = include_str!("../../../../README.md");
        let table = settings::markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from the code; it should read:\n{table}"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let c = with(
            None,
            &[("DATABASE_URL", "postgres://fw:hunter2@db:5432/fw")],
        )
        .unwrap();
        let shown = c.show();
        assert!(shown.contains("postgres://fw:***@db:5432/fw"), "{shown}");
        assert!(!shown.contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
