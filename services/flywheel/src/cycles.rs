//! `flywheel loop --team T`: start one cycle of the loop now and follow it
//! stage by stage; `flywheel cycles`: what the loop did, cycle by cycle,
//! each drawn on the loop's transition table. The stages run in the worker
//! (`flywheel worker`, or `flywheel up`).

use std::time::Duration;

use flywheel_jobs::stages::JobQueue;
use flywheel_loop::machine;
use flywheel_store::PgPool;
use flywheel_store::cycles::{self, Cycle, Stage, Status, Trigger};
use uuid::Uuid;

use crate::Config;
use crate::exit::DecidedNo;
use crate::models::team_id;

#[derive(clap::Args)]
pub struct LoopArgs {
    /// The team whose feedback the cycle turns into a candidate.
    #[arg(long)]
    pub team: String,
    /// Train only when the dataset holds at least this many examples the
    /// team's last run did not have.
    #[arg(long, default_value_t = 1)]
    pub min_new_examples: usize,
    /// Start the cycle and return; `flywheel cycles` follows it.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(clap::Subcommand)]
pub enum CyclesCommand {
    /// The newest cycles first: trigger, outcome, wall time per stage.
    List {
        #[arg(long)]
        team: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// One JSON object per cycle, a line each.
        #[arg(long)]
        json: bool,
    },
    /// One cycle: every stage with its wall time and note, its records, the
    /// reason it ended as it did, and its path through the loop's table.
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
}

/// Starts a cycle (or finds the one running) and follows it to its end.
/// A cycle that ends other than promoted is a "no" ([`DecidedNo`]); one
/// that failed is an error.
pub async fn run_loop(cfg: &Config, pool: &PgPool, args: LoopArgs) -> anyhow::Result<()> {
    let team = team_id(pool, &args.team).await?;
    let lc = cfg.loop_config(args.min_new_examples);
    let queue = JobQueue {
        max_attempts: cfg.jobs.max_attempts.max(1),
    };
    let started = flywheel_loop::cycle::start(pool, &queue, team, Trigger::Manual, &lc).await?;
    let id = match started {
        Some(id) => {
            println!("cycle {id} started for team {}", args.team);
            id
        }
        None => {
            let running = cycles::list(pool, Some(team), 1)
                .await?
                .into_iter()
                .find(|c| c.status == Status::Running)
                .ok_or_else(|| anyhow::anyhow!("the team's running cycle just ended; try again"))?;
            println!(
                "team {} already has cycle {} running (at {}); following it",
                args.team, running.id, running.stage
            );
            running.id
        }
    };
    if args.no_wait {
        return Ok(());
    }
    eprintln!("(the stages run in the worker: `flywheel worker` or `flywheel up`)");
    let mut printed = 0;
    loop {
        let c = cycles::get(pool, id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("cycle {id} is gone"))?;
        let stages = c.stage_records();
        for s in stages.iter().skip(printed) {
            println!("  {:<9} {:>8.1} s  {}", s.stage, s.seconds, s.note);
        }
        printed = stages.len();
        if c.status != Status::Running {
            let reason = c.reason.clone().unwrap_or_default();
            println!("cycle {}: {} ({reason})", c.id, c.status);
            return match c.status {
                Status::Promoted => Ok(()),
                Status::Failed => Err(anyhow::anyhow!("the cycle failed: {reason}")),
                other => Err(DecidedNo(format!("the cycle ended {other}")).into()),
            };
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub async fn run(pool: &PgPool, command: CyclesCommand) -> anyhow::Result<()> {
    match command {
        CyclesCommand::List { team, limit, json } => {
            let team = match team {
                Some(t) => Some(team_id(pool, &t).await?),
                None => None,
            };
            let list = cycles::list(pool, team, limit).await?;
            if json {
                for c in &list {
                    println!("{}", serde_json::to_string(c)?);
                }
                return Ok(());
            }
            println!(
                "{:<36}  {:<19}  {:<12}  {:<8}  {:<11}  {:<9}  {:>8}  stages (s)",
                "cycle", "started", "team", "trigger", "status", "stage", "total s"
            );
            for c in &list {
                println!("{}", line(c));
            }
            Ok(())
        }
        CyclesCommand::Show { id, json } => {
            let c = cycles::get(pool, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no cycle {id}"))?;
            if json {
                let mut v = serde_json::to_value(&c)?;
                v["path"] = serde_json::to_value(machine::path(&c))?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            show(pool, &c).await
        }
    }
}

fn line(c: &Cycle) -> String {
    let stages = c.stage_records();
    let total: f64 = stages.iter().map(|s| s.seconds).sum();
    let stages = stages
        .iter()
        .map(|s| format!("{} {:.0}", s.stage, s.seconds))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{:<36}  {:<19}  {:<12}  {:<8}  {:<11}  {:<9}  {:>8.0}  {stages}",
        c.id,
        c.created_at.format("%Y-%m-%d %H:%M:%S"),
        c.team,
        c.trigger.as_str(),
        c.status.as_str(),
        c.stage.as_str(),
        total
    )
}

async fn show(pool: &PgPool, c: &Cycle) -> anyhow::Result<()> {
    println!("cycle      {}", c.id);
    println!("team       {}", c.team);
    println!("trigger    {}", c.trigger);
    println!("status     {} (stage {})", c.status, c.stage);
    println!("started    {}", c.created_at.format("%Y-%m-%d %H:%M:%S"));
    if let Some(f) = c.finished_at {
        println!("finished   {}", f.format("%Y-%m-%d %H:%M:%S"));
    }
    if let Some(d) = c.dataset_version_id
        && let Some(v) = flywheel_store::datasets::get(pool, d).await?
    {
        println!("dataset    v{} ({d})", v.version);
    }
    if let Some(r) = c.training_run_id {
        println!("run        {r}");
    }
    if let Some(m) = c.candidate_version_id
        && let Some(v) = flywheel_store::models::get(pool, m).await?
    {
        println!("candidate  {}", v.name);
    }
    if let Some(e) = c.evaluation_id {
        println!("evaluation {e} (`flywheel eval show {e}`)");
    }
    if let Some(k) = c.canary_id {
        println!("canary     {k}");
    }
    if let Some(d) = c.decision_id {
        println!("decision   {d}");
    }
    println!("stages:");
    for s in c.stage_records() {
        let by = s.by.as_deref().unwrap_or("?");
        println!(
            "  {:<9} {:>8.1} s  -> {by:<9} {}",
            s.stage, s.seconds, s.note
        );
    }
    if c.status == Status::Running {
        println!("  {:<9} (running)", c.stage);
    }
    if let Some(r) = &c.reason {
        println!("reason     {r}");
    }
    let at = (c.status == Status::Running && c.stage != Stage::Done).then_some(c.stage);
    println!("the loop's table (* the moves this cycle made, ? those open to it now):");
    print!("{}", machine::render_text(&machine::path(c), at));
    Ok(())
}
