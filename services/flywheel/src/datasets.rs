//! `flywheel datasets ...` and `flywheel jobs`: building dataset versions on
//! demand (through the queue, or in this process), listing and showing them,
//! exporting them for training tools, and generating synthetic feedback for
//! benchmarks.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flywheel_curation::build::Rules;
use flywheel_curation::export::Format;
use flywheel_jobs::curate::{self, CurateJob, Outcome};
use flywheel_jobs::queue;
use flywheel_store::PgPool;
use flywheel_store::datasets::{self, DatasetVersion, Scope};
use uuid::Uuid;

/// `--team NAME` or `--shared`.
pub async fn scope(pool: &PgPool, team: Option<&str>, shared: bool) -> anyhow::Result<Scope> {
    match (team, shared) {
        (Some(_), true) => bail!("give --team or --shared, not both"),
        (None, true) => Ok(Scope::Shared),
        (Some(name), false) => flywheel_store::keys::team_id(pool, name)
            .await?
            .map(Scope::Team)
            .with_context(|| format!("no team named {name}")),
        (None, false) => bail!("give --team NAME (or --shared for teams that pool feedback)"),
    }
}

/// How `datasets build` runs the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Enqueue it and return.
    Enqueue,
    /// Enqueue it and wait for a worker to finish it.
    Wait,
    /// Run it here, without the queue.
    Inline,
}

pub async fn build(
    pool: &PgPool,
    job: CurateJob,
    mode: RunMode,
    max_attempts: u32,
) -> anyhow::Result<Option<Outcome>> {
    if mode == RunMode::Inline {
        let t = Instant::now();
        let outcome = curate::run(pool, &job).await?;
        report(&outcome);
        eprintln!(
            "built in {:.2} s (load {} ms, curate {} ms, write {} ms)",
            t.elapsed().as_secs_f64(),
            outcome.load_ms,
            outcome.build_ms,
            outcome.write_ms
        );
        return Ok(Some(outcome));
    }
    let task = queue::push_curation(pool, &job, max_attempts).await?;
    println!("queued curation job {task}");
    if mode == RunMode::Enqueue {
        return Ok(None);
    }
    let outcome = wait(pool, &task).await?;
    report(&outcome);
    Ok(Some(outcome))
}

/// Polls the queue until the task is done or out of attempts, printing
/// what happens to it.
async fn wait(pool: &PgPool, task: &str) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut last = String::new();
    let mut warned = false;
    loop {
        let state = flywheel_store::jobs::task_state(pool, task)
            .await?
            .context("the job vanished from the queue")?;
        let line = format!("{} (attempt {})", state.status, state.attempts);
        if line != last {
            eprintln!("[{:>5.1}s] job {}", started.elapsed().as_secs_f64(), line);
            last = line;
        }
        let runs = flywheel_store::jobs::runs_of(pool, task).await?;
        match state.status.as_str() {
            "Done" => {
                let result = runs
                    .iter()
                    .rev()
                    .find_map(|r| r.result.clone())
                    .context("the job finished without a result")?;
                return Ok(serde_json::from_value(result)?);
            }
            "Failed" | "Killed" if state.attempts >= state.max_attempts => {
                let error = runs.iter().rev().find_map(|r| r.error.clone());
                bail!(
                    "job failed after {} attempts: {}",
                    state.attempts,
                    error.unwrap_or_else(|| "no error recorded".into())
                );
            }
            "Pending"
                if !warned
                    && state.attempts == 0
                    && started.elapsed() > Duration::from_secs(10) =>
            {
                eprintln!("still waiting for a worker; is `flywheel worker` running?");
                warned = true;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn report(o: &Outcome) {
    match (o.version, o.created) {
        (None, _) => println!("no votes yet: nothing to build"),
        (Some(n), true) => println!(
            "dataset version {n} ({}) created: {} SFT, {} DPO, {} KTO from {} votes on {} completions",
            o.version_id.unwrap_or_default(),
            o.sft,
            o.dpo,
            o.kto,
            o.votes_read,
            o.completions_read
        ),
        (Some(n), false) => println!(
            "no new feedback: dataset version {n} ({}) already holds this input",
            o.version_id.unwrap_or_default()
        ),
    }
}

/// Finds a version by id, `TEAM@N`, or `shared@N`.
pub async fn resolve(pool: &PgPool, spec: &str) -> anyhow::Result<DatasetVersion> {
    let found = if let Ok(id) = spec.parse::<Uuid>() {
        datasets::get(pool, id).await?
    } else if let Some((who, n)) = spec.rsplit_once('@') {
        let n: i32 = n
            .parse()
            .with_context(|| format!("`{spec}`: the version after @ must be a number"))?;
        let team = if who == "shared" {
            None
        } else {
            Some(
                flywheel_store::keys::team_id(pool, who)
                    .await?
                    .with_context(|| format!("no team named {who}"))?,
            )
        };
        datasets::get_numbered(pool, team, n).await?
    } else {
        bail!("`{spec}` is not a dataset version: give its id, TEAM@N or shared@N");
    };
    found.with_context(|| format!("no dataset version {spec}"))
}

pub async fn list(pool: &PgPool, team: Option<&str>, json: bool) -> anyhow::Result<()> {
    let team_id = match team {
        Some(name) => Some(
            flywheel_store::keys::team_id(pool, name)
                .await?
                .with_context(|| format!("no team named {name}"))?,
        ),
        None => None,
    };
    if json {
        for v in flywheel_store::datasets::list(pool, team_id).await? {
            println!("{}", serde_json::to_string(&v)?);
        }
        return Ok(());
    }
    println!(
        "{:<36}  {:>3}  {:>7}  {:>7}  {:>7}  {:<19}  note",
        "id", "ver", "sft", "dpo", "kto", "created"
    );
    for v in datasets::list(pool, team_id).await? {
        println!(
            "{:<36}  {:>3}  {:>7}  {:>7}  {:>7}  {:<19}  {}",
            v.id,
            v.version,
            v.sft_count,
            v.dpo_count,
            v.kto_count,
            v.created_at.format("%Y-%m-%d %H:%M:%S"),
            if v.user_data_deleted_at.is_some() {
                "contains deleted user data"
            } else if v.team_id.is_none() {
                "shared"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub async fn show(pool: &PgPool, spec: &str) -> anyhow::Result<()> {
    let v = resolve(pool, spec).await?;
    let (votes, completions) = datasets::lineage_counts(pool, v.id).await?;
    let mut out = serde_json::to_value(&v)?;
    out["lineage_rows"] = serde_json::json!({"votes": votes, "completions": completions});
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Writes a version's examples in `format` to `out` (stdout when `None`);
/// returns how many lines were written.
pub async fn export(
    pool: &PgPool,
    spec: &str,
    format: Format,
    split: Option<&str>,
    out: Option<&std::path::Path>,
) -> anyhow::Result<usize> {
    if let Some(s) = split
        && s != "train"
        && s != "eval"
    {
        bail!("--split must be train or eval, not {s}");
    }
    let v = resolve(pool, spec).await?;
    let rows = datasets::examples(pool, v.id, format.kind().as_str(), split).await?;
    let mut sink: Box<dyn Write> = match out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for (_, example) in &rows {
        serde_json::to_writer(&mut sink, &format.line(example.clone())?)?;
        sink.write_all(b"\n")?;
    }
    sink.flush()?;
    Ok(rows.len())
}

/// Fills a team with synthetic completions and ratings, in chunks, with
/// progress on stderr.
pub async fn synth(
    pool: &PgPool,
    team: &str,
    completions: i64,
    ratings: i64,
) -> anyhow::Result<()> {
    if ratings > completions {
        bail!("--ratings must not exceed --completions");
    }
    let team_id = flywheel_store::keys::ensure_team(pool, team).await?;
    let chunk = 100_000;
    let t = Instant::now();
    for first in (0..completions).step_by(chunk as usize) {
        let n = chunk.min(completions - first);
        flywheel_store::synth::completions(pool, team_id, first, n).await?;
        eprintln!(
            "[{:>5.1}s] completions {}/{completions}",
            t.elapsed().as_secs_f64(),
            first + n
        );
    }
    for first in (0..ratings).step_by(chunk as usize) {
        let n = chunk.min(ratings - first);
        flywheel_store::synth::ratings(pool, team_id, completions, ratings, first, n).await?;
        eprintln!(
            "[{:>5.1}s] ratings {}/{ratings}",
            t.elapsed().as_secs_f64(),
            first + n
        );
    }
    flywheel_store::admin::analyze_log(pool).await?;
    println!("team {team}: {completions} completions, {ratings} ratings");
    Ok(())
}

pub async fn jobs(pool: &PgPool, limit: i64, json: bool) -> anyhow::Result<()> {
    if json {
        for r in flywheel_store::jobs::recent_runs(pool, limit).await? {
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    println!(
        "{:<36}  {:<8}  {:>3}  {:<10}  {:<19}  {:>8}  error/result",
        "task", "kind", "try", "status", "started", "seconds"
    );
    for r in flywheel_store::jobs::recent_runs(pool, limit).await? {
        let secs = r
            .finished_at
            .map(|f| format!("{:.1}", (f - r.started_at).num_milliseconds() as f64 / 1e3))
            .unwrap_or_default();
        let detail = r
            .error
            .clone()
            .or_else(|| r.result.as_ref().map(|v| v.to_string()))
            .unwrap_or_default();
        println!(
            "{:<36}  {:<8}  {:>3}  {:<10}  {:<19}  {:>8}  {}",
            r.task_id,
            r.kind,
            r.attempt,
            r.status,
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            secs,
            detail.chars().take(120).collect::<String>()
        );
    }
    Ok(())
}

/// Rules from the defaults (or `FLYWHEEL_CURATION_RULES`) and command-line
/// overrides.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuleFlags {
    /// Keep PII as written (redaction is on by default).
    #[arg(long)]
    pub no_redact: bool,
    /// Estimated prompt similarity (0-1) at which an example is a near-duplicate.
    #[arg(long)]
    pub near_duplicate_threshold: Option<f64>,
    /// Examples per end user at most (0: no cap).
    #[arg(long)]
    pub max_per_user: Option<usize>,
    #[arg(long)]
    pub min_output_chars: Option<usize>,
    #[arg(long)]
    pub max_output_chars: Option<usize>,
    /// Share of prompts (by hash) in the eval split.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Examples of each kind the eval split holds at least.
    #[arg(long)]
    pub min_eval_examples: Option<usize>,
    /// Raters whose compared votes agree less often than this (0-1) are
    /// left out (0: keep everyone).
    #[arg(long)]
    pub rater_min_agreement: Option<f64>,
}

impl RuleFlags {
    pub fn apply(&self, mut r: Rules) -> anyhow::Result<Rules> {
        if self.no_redact {
            r.redact_pii = false;
        }
        if let Some(t) = self.near_duplicate_threshold {
            if !(0.0..=1.0).contains(&t) {
                bail!("--near-duplicate-threshold must be between 0 and 1");
            }
            r.near_duplicate_threshold = t;
        }
        if let Some(f) = self.eval_fraction {
            if !(0.0..=1.0).contains(&f) {
                bail!("--eval-fraction must be between 0 and 1");
            }
            r.eval_fraction = f;
        }
        if let Some(a) = self.rater_min_agreement {
            if !(0.0..=1.0).contains(&a) {
                bail!("--rater-min-agreement must be between 0 and 1");
            }
            r.rater_min_agreement = a;
        }
        r.min_eval_examples = self.min_eval_examples.unwrap_or(r.min_eval_examples);
        r.max_per_user = self.max_per_user.unwrap_or(r.max_per_user);
        r.min_output_chars = self.min_output_chars.unwrap_or(r.min_output_chars);
        r.max_output_chars = self.max_output_chars.unwrap_or(r.max_output_chars);
        Ok(r)
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DatasetsCommand {
    /// Build a new dataset version from feedback (a job for the worker by default).
    Build {
        /// The team whose feedback to curate.
        #[arg(long)]
        team: Option<String>,
        /// Pool the feedback of every team that shares it.
        #[arg(long)]
        shared: bool,
        /// Run the build in this process instead of queueing it.
        #[arg(long)]
        inline: bool,
        /// Queue the job and return without waiting.
        #[arg(long, conflicts_with = "inline")]
        no_wait: bool,
        #[command(flatten)]
        rules: RuleFlags,
    },
    /// List dataset versions.
    List {
        #[arg(long)]
        team: Option<String>,
        /// One JSON object per version, a line each.
        #[arg(long)]
        json: bool,
    },
    /// A version's manifest and lineage size (VERSION: id, TEAM@N or shared@N).
    Show { version: String },
    /// Write a version's examples as JSON Lines.
    Export {
        version: String,
        /// trl-sft, trl-dpo, trl-kto, messages, openai, openai-dpo.
        #[arg(long)]
        format: flywheel_curation::export::Format,
        /// train or eval (default: both).
        #[arg(long)]
        split: Option<String>,
        /// Output file (default: stdout).
        #[arg(long, short)]
        out: Option<std::path::PathBuf>,
    },
    /// Generate synthetic completions and ratings for benchmarks.
    Synth {
        #[arg(long)]
        team: String,
        #[arg(long, default_value_t = 1_000_000)]
        completions: i64,
        #[arg(long, default_value_t = 500_000)]
        ratings: i64,
    },
}

pub async fn run(
    cfg: &crate::Config,
    pool: &PgPool,
    command: DatasetsCommand,
) -> anyhow::Result<()> {
    use self as ds;
    match command {
        DatasetsCommand::Build {
            team,
            shared,
            inline,
            no_wait,
            rules,
        } => {
            let job = flywheel_jobs::curate::CurateJob {
                scope: ds::scope(pool, team.as_deref(), shared).await?,
                rules: rules.apply(cfg.jobs.curation_rules.clone())?,
                until: None,
                cycle: None,
            };
            let mode = match (inline, no_wait) {
                (true, _) => RunMode::Inline,
                (false, true) => RunMode::Enqueue,
                (false, false) => RunMode::Wait,
            };
            ds::build(pool, job, mode, cfg.jobs.max_attempts).await?;
        }
        DatasetsCommand::List { team, json } => ds::list(pool, team.as_deref(), json).await?,
        DatasetsCommand::Show { version } => ds::show(pool, &version).await?,
        DatasetsCommand::Export {
            version,
            format,
            split,
            out,
        } => {
            let n = ds::export(pool, &version, format, split.as_deref(), out.as_deref()).await?;
            eprintln!("exported {n} examples");
        }
        DatasetsCommand::Synth {
            team,
            completions,
            ratings,
        } => ds::synth(pool, &team, completions, ratings).await?,
    }
    Ok(())
}
