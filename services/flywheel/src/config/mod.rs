//! Configuration: defaults, then an optional `flywheel.toml` (`--config` or
//! `FLYWHEEL_CONFIG`), then the environment (`FLYWHEEL_*`, and the
//! conventional `DATABASE_URL`, `HF_ENDPOINT`). Every setting is declared
//! once, in one entry of [`settings`] (key, variable, default, what it does,
//! where its value goes); parsing is strict (a bad value names its
//! variable or key, and stops the start); `flywheel config show` prints the
//! effective settings and where each came from. CLI flags are only for the
//! knobs of one command.

pub mod settings;

use std::path::{Path, PathBuf};

use settings::{ConfigError, Layers, SETTINGS};

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
    pub shutdown_grace_secs: u64,
    /// The worker's listener (`/metrics`, `/healthz`, `/readyz`); empty:
    /// none.
    pub addr: String,
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
    /// The loop's teacher (`None`: the loop distils nothing by itself).
    pub distill_teacher: Option<String>,
    pub distill_prompts: usize,
    pub distill_below_votes: usize,
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

    /// Every setting parsed from its layers (each setting's entry in
    /// [`settings`] says where its value goes); what no setting covers keeps
    /// its library default.
    pub fn from_layers(l: Layers) -> Result<Self, ConfigError> {
        let mut c = Self {
            home: PathBuf::new(),
            database: DatabaseSettings {
                url: None,
                local_port: 0,
            },
            gateway: GatewaySettings {
                addr: String::new(),
                http: flywheel_gateway::GatewayConfig::default(),
            },
            engine: flywheel_engine::EngineConfig::default(),
            journal: flywheel_gateway::JournalConfig::new(PathBuf::new()),
            models: ModelSettings {
                cache: PathBuf::new(),
                pypi_index: String::new(),
                hf_endpoint: String::new(),
            },
            jobs: JobSettings {
                curation_schedule: None,
                curation_rules: Default::default(),
                max_attempts: 1,
                backoff_secs: 0,
                heartbeat_secs: 1,
                shutdown_grace_secs: 0,
                addr: String::new(),
            },
            training: TrainingSettings {
                artifacts: String::new(),
                checkpoint_every: 1,
                nice: 0,
                external_trainer: None,
                external_trainer_job: None,
                kubectl: String::new(),
                min_new_examples: 0,
                distill_teacher: None,
                distill_prompts: 0,
                distill_below_votes: 0,
            },
            promotion: flywheel_eval::Policy::default(),
            admin: flywheel_admin::AdminConfig::default(),
            eval_concurrency: 1,
            canary_check_secs: 1,
            layers: l.clone(),
        };
        settings::apply(&l, &mut c)?;
        Ok(c)
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
            upstream: self.gateway.http.upstream.clone(),
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
        w.shutdown_grace = std::time::Duration::from_secs(j.shutdown_grace_secs);
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
            distill: self.training.distill_teacher.clone().map(|teacher| {
                flywheel_jobs::distill::LoopDistill {
                    teacher,
                    prompts: self.training.distill_prompts,
                    below_votes: self.training.distill_below_votes as i64,
                }
            }),
        }
        .loop_config(min_new_examples.max(1) as i64, self.promotion.min_items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use settings::Source;

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
    fn a_misspelt_curation_rule_is_named_not_ignored() {
        let e = with(
            None,
            &[("FLYWHEEL_CURATION_RULES", r#"{"max_per_usr": 5}"#)],
        )
        .unwrap_err();
        assert!(e.starts_with("FLYWHEEL_CURATION_RULES = "), "{e}");
        assert!(e.contains("unknown field `max_per_usr`"), "{e}");
        let c = with(
            None,
            &[("FLYWHEEL_CURATION_RULES", r#"{"max_per_user": 5}"#)],
        )
        .unwrap();
        assert_eq!(c.jobs.curation_rules.max_per_user, 5);
    }

    #[test]
    fn each_setting_is_applied_where_its_entry_says() {
        // Every setting set to a valid non-default value at once lands in
        // the configuration (a setting whose entry wrote nowhere would
        // leave its default).
        let c = with(
            None,
            &[
                ("FLYWHEEL_MAX_BATCH", "3"),
                ("FLYWHEEL_PROMOTION_MIN_ITEMS", "12"),
                ("FLYWHEEL_CANARY_CHECK_SECS", "7"),
                ("FLYWHEEL_ADMIN_LOCK_MINUTES", "2"),
                ("FLYWHEEL_JOURNAL_SYNC_MS", "9"),
                ("FLYWHEEL_TRAIN_NICE", "4"),
                ("FLYWHEEL_CURATION_SCHEDULE", "off"),
                ("FLYWHEEL_UPSTREAM_RETRIES", "0"),
                ("FLYWHEEL_UPSTREAM_BACKOFF_MS", "40"),
                ("FLYWHEEL_UPSTREAM_BREAKER_FAILURES", "9"),
                ("FLYWHEEL_UPSTREAM_BREAKER_COOLDOWN_SECS", "8"),
                ("FLYWHEEL_PREFIX_CACHE_MB", "8"),
                ("FLYWHEEL_MAX_CONTEXT", "512"),
                ("FLYWHEEL_MEMORY_MB", "3000"),
                ("FLYWHEEL_QUANTIZE", "q4_1"),
            ],
        )
        .unwrap();
        assert_eq!(c.engine.max_batch, 3);
        assert_eq!(c.engine.prefix_cache_bytes, 8 << 20);
        assert_eq!(c.engine.max_context, 512);
        assert_eq!(c.engine.memory_budget, Some(3000 << 20));
        assert_eq!(c.engine.quantize, flywheel_engine::Quantize::Q4_1);
        assert_eq!(c.promotion.min_items, 12);
        assert_eq!(c.canary_check_secs, 7);
        assert_eq!(c.admin.lock_seconds, 120.0);
        assert_eq!(c.journal.sync_interval, std::time::Duration::from_millis(9));
        assert_eq!(c.training.nice, 4);
        assert_eq!(c.jobs.curation_schedule, None);
        let upstream = &c.gateway.http.upstream;
        assert_eq!(
            (
                upstream.retries,
                upstream.backoff,
                upstream.breaker_failures
            ),
            (0, std::time::Duration::from_millis(40), 9)
        );
        assert_eq!(upstream.breaker_cooldown, std::time::Duration::from_secs(8));
        assert_eq!(SETTINGS.len(), 67);
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
