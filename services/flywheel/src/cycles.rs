//! `flywheel loop --team T`: start one cycle of the loop now and follow it
//! stage by stage; `flywheel cycles`: what the loop did, cycle by cycle.
//! The stages run in the worker (`flywheel worker`, or `flywheel up`).

use std::time::Duration;

use flywheel_store::PgPool;
use flywheel_store::cycles::{self, Cycle};
use uuid::Uuid;

use crate::Config;
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
    },
    /// One cycle: every stage with its wall time and note, its records and
    /// the reason it ended as it did.
    Show { id: Uuid },
}

/// Starts a cycle (or finds the one running) and follows it to its end.
pub async fn run_loop(cfg: &Config, pool: &PgPool, args: LoopArgs) -> anyhow::Result<()> {
    let team = team_id(pool, &args.team).await?;
    let lc = cfg.loop_config(args.min_new_examples);
    let id = match flywheel_jobs::cycle::start(pool, team, "manual", &lc).await? {
        Some(id) => {
            println!("cycle {id} started for team {}", args.team);
            id
        }
        None => {
            let running = cycles::list(pool, Some(team), 1)
                .await?
                .into_iter()
                .find(|c| c.status == "running")
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
        let stages = c.stages.as_array().cloned().unwrap_or_default();
        for s in stages.iter().skip(printed) {
            println!(
                "  {:<9} {:>8.1} s  {}",
                s["stage"].as_str().unwrap_or("?"),
                s["seconds"].as_f64().unwrap_or(0.0),
                s["note"].as_str().unwrap_or("")
            );
        }
        printed = stages.len();
        if c.status != "running" {
            println!(
                "cycle {}: {} ({})",
                c.id,
                c.status,
                c.reason.as_deref().unwrap_or("")
            );
            return match c.status.as_str() {
                "failed" => Err(anyhow::anyhow!("the cycle failed")),
                _ => Ok(()),
            };
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub async fn run(pool: &PgPool, command: CyclesCommand) -> anyhow::Result<()> {
    match command {
        CyclesCommand::List { team, limit } => {
            let team = match team {
                Some(t) => Some(team_id(pool, &t).await?),
                None => None,
            };
            println!(
                "{:<36}  {:<19}  {:<12}  {:<8}  {:<11}  {:<9}  {:>8}  stages (s)",
                "cycle", "started", "team", "trigger", "status", "stage", "total s"
            );
            for c in cycles::list(pool, team, limit).await? {
                println!("{}", line(&c));
            }
            Ok(())
        }
        CyclesCommand::Show { id } => {
            let c = cycles::get(pool, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no cycle {id}"))?;
            show(pool, &c).await
        }
    }
}

fn line(c: &Cycle) -> String {
    let stages = flywheel_jobs::cycle::stage_seconds(c);
    let total: f64 = stages.iter().map(|(_, s)| s).sum();
    let stages = stages
        .iter()
        .map(|(stage, s)| format!("{stage} {s:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{:<36}  {:<19}  {:<12}  {:<8}  {:<11}  {:<9}  {:>8.0}  {stages}",
        c.id,
        c.created_at.format("%Y-%m-%d %H:%M:%S"),
        c.team,
        c.trigger,
        c.status,
        c.stage,
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
    for s in c.stages.as_array().into_iter().flatten() {
        println!(
            "  {:<9} {:>8.1} s  {}",
            s["stage"].as_str().unwrap_or("?"),
            s["seconds"].as_f64().unwrap_or(0.0),
            s["note"].as_str().unwrap_or("")
        );
    }
    if let Some(r) = &c.reason {
        println!("reason     {r}");
    }
    Ok(())
}
