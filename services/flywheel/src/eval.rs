//! `flywheel eval`, `flywheel suites` and `flywheel decisions`: evaluating
//! a candidate against a champion (in this process, or queued for the
//! workers), reading reports, adding a team's task suites, and the audit
//! log of decisions.

use anyhow::Context;
use flywheel_eval::Suite;
use flywheel_store::PgPool;
use flywheel_store::evals::{self, NewEvaluation};
use uuid::Uuid;

use crate::Config;
use crate::exit::DecidedNo;
use crate::models::{team_id, version};

#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The candidate model version.
    pub candidate: Option<String>,
    /// The version to compare with (default: the team's champion, else the global one).
    #[arg(long)]
    pub against: Option<String>,
    /// The team whose task suites run (default: the team the candidate was trained for).
    #[arg(long)]
    pub team: Option<String>,
    /// A dataset version whose held-out pairs and answers are scored
    /// (default: the one the candidate was trained on).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Queue it for the workers instead of running it here.
    #[arg(long)]
    pub queue: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum EvalCommand {
    /// An evaluation's report: every metric with its interval, the verdict
    /// and its reasons (`--items` for every example's output).
    Show {
        id: Uuid,
        #[arg(long)]
        items: bool,
    },
    /// The latest evaluations.
    List {
        #[arg(long)]
        team: Option<String>,
        /// One JSON object per evaluation, a line each.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SuitesCommand {
    /// Add a task suite (JSON: name, items with messages and checks) for a team.
    Add {
        file: std::path::PathBuf,
        #[arg(long)]
        team: String,
        /// Also answer the team's suites and the retention suite with its
        /// champion now and keep the answers, so the next evaluation
        /// against that champion runs only the candidate.
        #[arg(long)]
        answer: bool,
    },
    /// A team's task suites.
    List {
        #[arg(long)]
        team: String,
        #[arg(long)]
        json: bool,
    },
    /// Have the team's champion answer its suites and the retention suite
    /// now and keep the answers (as `add --answer` does), so the next
    /// evaluation against it runs only the candidate; for a team with no
    /// suite of its own, the retention suite.
    Answer {
        #[arg(long)]
        team: String,
    },
}

pub async fn eval(cfg: &Config, pool: &PgPool, args: EvalArgs) -> anyhow::Result<()> {
    match args.command {
        Some(EvalCommand::Show { id, items }) => show(pool, id, items).await,
        Some(EvalCommand::List { team, json }) => list(pool, team.as_deref(), json).await,
        None => run(cfg, pool, args.run).await,
    }
}

async fn run(cfg: &Config, pool: &PgPool, a: RunArgs) -> anyhow::Result<()> {
    let name = a
        .candidate
        .context("name the candidate: flywheel eval CANDIDATE [--against CHAMPION]")?;
    let candidate = version(pool, &name).await?;
    let lineage = flywheel_store::models::lineage(pool, candidate.id).await?;
    let dataset = match &a.dataset {
        Some(spec) => Some(crate::datasets::resolve(pool, spec).await?.id),
        None => lineage.as_ref().and_then(|l| l.dataset_version_id),
    };
    let team = match (&a.team, candidate.team_id) {
        (Some(t), _) => Some(team_id(pool, t).await?),
        (None, owner) => owner,
    };
    let champion = match (&a.against, team) {
        (Some(n), _) => version(pool, n).await?,
        (None, Some(t)) => flywheel_store::models::team_champion(pool, t)
            .await?
            .context("no champion to compare with")?,
        (None, None) => flywheel_store::models::champion(pool)
            .await?
            .context("no champion to compare with: give --against")?,
    };
    let new = NewEvaluation {
        team_id: team,
        candidate_version_id: candidate.id,
        champion_version_id: champion.id,
        dataset_version_id: dataset,
        training_run_id: None,
    };
    if a.queue {
        let (id, task) =
            flywheel_jobs::evaluate::enqueue(pool, &new, false, cfg.jobs.max_attempts).await?;
        println!("queued evaluation {id} (job {task}); read it with `flywheel eval show {id}`");
        return Ok(());
    }
    let id = evals::create(pool, &new).await?;
    eprintln!(
        "evaluating {} against {} (evaluation {id})",
        candidate.name, champion.name
    );
    let started = std::time::Instant::now();
    let outcome = flywheel_jobs::evaluate::run(
        pool,
        &cfg.eval_env(pool),
        &flywheel_jobs::evaluate::EvalJob {
            evaluation_id: id,
            act: false,
        },
    )
    .await?;
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    show(pool, outcome.evaluation_id, false).await?;
    if !outcome.passed {
        return Err(DecidedNo(format!(
            "{} did not pass the gate against {}",
            candidate.name, champion.name
        ))
        .into());
    }
    Ok(())
}

/// The report `flywheel eval show` prints.
pub async fn report(pool: &PgPool, id: Uuid, with_items: bool) -> anyhow::Result<String> {
    use std::fmt::Write;
    let e = evals::get(pool, id)
        .await?
        .with_context(|| format!("no evaluation {id}"))?;
    let name = |v| async move {
        flywheel_store::models::get(pool, v)
            .await
            .ok()
            .flatten()
            .map_or_else(|| v.to_string(), |m| m.name)
    };
    let (cand, champ) = (
        name(e.candidate_version_id).await,
        name(e.champion_version_id).await,
    );
    let mut out = String::new();
    writeln!(
        out,
        "evaluation {id}: {cand} (candidate) vs {champ} (champion)"
    )?;
    writeln!(
        out,
        "status {}, created {}",
        e.status,
        e.created_at.format("%Y-%m-%d %H:%M:%S")
    )?;
    if let Some(err) = &e.error {
        writeln!(out, "error: {err}")?;
    }
    writeln!(
        out,
        "\n{:<22} {:<22} {:>6} {:>11} {:>11} {:>11}  95% interval",
        "suite", "metric", "items", "candidate", "champion", "difference"
    )?;
    for m in evals::metrics(pool, id).await? {
        let pct = m.metric.ends_with("rate")
            || m.metric.ends_with("accuracy")
            || m.metric.ends_with("match")
            || m.metric.ends_with("agreement");
        let f = |x: f64| {
            if pct {
                format!("{:.1}%", 100.0 * x)
            } else {
                format!("{x:.3}")
            }
        };
        writeln!(
            out,
            "{:<22} {:<22} {:>6} {:>11} {:>11} {:>11}  [{}, {}]",
            m.suite,
            m.metric,
            m.items,
            f(m.candidate),
            f(m.champion),
            f(m.difference),
            f(m.ci_low),
            f(m.ci_high)
        )?;
    }
    match e.passed {
        Some(p) => writeln!(
            out,
            "\nverdict: {}",
            if p {
                "PASSES the gate"
            } else {
                "FAILS the gate"
            }
        )?,
        None => writeln!(out, "\nverdict: none yet")?,
    }
    for r in e
        .reasons
        .as_ref()
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
    {
        writeln!(out, "  {r}")?;
    }
    if with_items {
        writeln!(out)?;
        for i in evals::items(pool, id, None).await? {
            let who = if i.model_version_id == e.candidate_version_id {
                "candidate"
            } else {
                "champion"
            };
            let mark = match i.passed {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "",
            };
            writeln!(
                out,
                "{} {} {who:<9} {mark:<4} {}",
                i.suite,
                i.item,
                i.output
                    .replace('\n', " ")
                    .chars()
                    .take(100)
                    .collect::<String>()
            )?;
        }
    }
    Ok(out)
}

async fn show(pool: &PgPool, id: Uuid, with_items: bool) -> anyhow::Result<()> {
    print!("{}", report(pool, id, with_items).await?);
    Ok(())
}

async fn list(pool: &PgPool, team: Option<&str>, json: bool) -> anyhow::Result<()> {
    let team = match team {
        Some(t) => Some(team_id(pool, t).await?),
        None => None,
    };
    if json {
        for e in evals::list(pool, team, 50).await? {
            println!("{}", serde_json::to_string(&e)?);
        }
        return Ok(());
    }
    println!(
        "{:<36}  {:<9}  {:<6}  {:<36}  created",
        "evaluation", "status", "passed", "candidate"
    );
    for e in evals::list(pool, team, 50).await? {
        let cand = flywheel_store::models::get(pool, e.candidate_version_id)
            .await?
            .map_or_else(|| e.candidate_version_id.to_string(), |v| v.name);
        println!(
            "{:<36}  {:<9}  {:<6}  {:<36}  {}",
            e.id,
            e.status,
            e.passed.map_or("".into(), |p| p.to_string()),
            cand,
            e.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}

/// The team's champion answers its suites and the retention suite now,
/// and the answers are kept.
async fn answer_ahead(cfg: &Config, pool: &PgPool, team: Uuid) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (champion, generated) =
        flywheel_jobs::evaluate::remember_champion(pool, &cfg.eval_env(pool), team).await?;
    println!(
        "{champion} answered the team's suites and the retention suite: \
         {generated} answers kept ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn suites(cfg: &Config, pool: &PgPool, command: SuitesCommand) -> anyhow::Result<()> {
    match command {
        SuitesCommand::Add { file, team, answer } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let suite = Suite::parse(&text)?;
            let team_id = team_id(pool, &team).await?;
            let stored = evals::add_suite(
                pool,
                Some(team_id),
                &suite.name,
                &suite.sha256(),
                &serde_json::to_value(&suite)?,
            )
            .await?;
            println!(
                "suite {} ({} items) added for team {team} ({})",
                suite.name,
                suite.items.len(),
                &stored.sha256[..12]
            );
            if answer {
                answer_ahead(cfg, pool, team_id).await?;
            }
        }
        SuitesCommand::Answer { team } => {
            let team_id = team_id(pool, &team).await?;
            answer_ahead(cfg, pool, team_id).await?;
        }
        SuitesCommand::List { team, json } => {
            let team_id = team_id(pool, &team).await?;
            let suites = evals::team_suites(pool, team_id).await?;
            if json {
                for s in &suites {
                    println!("{}", serde_json::to_string(s)?);
                }
                return Ok(());
            }
            for s in suites {
                let n = s.definition["items"].as_array().map_or(0, Vec::len);
                println!(
                    "{:<32} {:>5} items  {}  added {}",
                    s.name,
                    n,
                    &s.sha256[..12],
                    s.created_at.format("%Y-%m-%d %H:%M")
                );
            }
        }
    }
    Ok(())
}

/// `flywheel decisions`: the audit log, newest first.
pub async fn decisions(
    pool: &PgPool,
    team: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let team = match team {
        Some(t) => Some(team_id(pool, t).await?),
        None => None,
    };
    if json {
        for d in flywheel_store::decisions::list(pool, team, limit).await? {
            println!("{}", serde_json::to_string(&d)?);
        }
        return Ok(());
    }
    let name = |v: Option<Uuid>| async move {
        match v {
            Some(v) => flywheel_store::models::get(pool, v)
                .await
                .ok()
                .flatten()
                .map_or_else(|| v.to_string(), |m| m.name),
            None => String::new(),
        }
    };
    println!(
        "{:<19}  {:<16}  {:<15}  {:<32}  {:<32}  {:<14}  reason",
        "when", "team", "decision", "candidate", "champion", "by"
    );
    for d in flywheel_store::decisions::list(pool, team, limit).await? {
        let team_name = match d.team_id {
            Some(t) => flywheel_store::keys::team_name(pool, t)
                .await?
                .unwrap_or_default(),
            None => "(all)".into(),
        };
        println!(
            "{:<19}  {:<16}  {:<15}  {:<32}  {:<32}  {:<14}  {}",
            d.created_at.format("%Y-%m-%d %H:%M:%S"),
            team_name,
            d.kind,
            name(d.candidate_version_id).await,
            name(d.champion_version_id).await,
            d.actor,
            d.reason
        );
    }
    Ok(())
}
