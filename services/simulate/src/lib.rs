//! `flywheel simulate SCENARIO`: a team's task played through the public
//! API as its users would. Each cycle sends the scenario's traffic as chats,
//! has simulated end users vote on every answer by the scenario's checks
//! (some honest, some noisy, some voting against everyone or always up) and
//! attach the right answer as a correction to some down votes; before the
//! first cycle and after each, the held-out messages (never sent as traffic,
//! never rated) are scored. With `--follow-loop` it waits for the loop to
//! turn after each batch, and while a canary runs its users keep chatting,
//! so the canary is decided on their thumbs. The file format:
//! `scenarios/README.md`.
//!
//! A tool, not a part of the product: the binary runs it as `flywheel
//! simulate`; it talks to the gateway as any client does and reads the
//! loop's cycles from the store.

pub mod follow;
pub mod play;
pub mod scenario;

use anyhow::{Context, bail};
use flywheel_store::PgPool;
use serde::Serialize;

use crate::play::{Score, Target, Traffic};
use crate::scenario::Scenario;

/// `flywheel simulate`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The scenario file (format: scenarios/README.md).
    pub scenario: std::path::PathBuf,
    /// The gateway (default: http:// and the configured gateway.addr).
    #[arg(long)]
    pub url: Option<String>,
    /// An API key of the scenario's team (default: a new one, made in the
    /// database).
    #[arg(long)]
    pub key: Option<String>,
    /// Cycles to run (default: the scenario's).
    #[arg(long)]
    pub cycles: Option<usize>,
    /// The first cycle's number (from 0): its traffic is sent first.
    #[arg(long, default_value_t = 0)]
    pub from_cycle: usize,
    /// Leave the scenario's response_format out (constrained decoding off).
    #[arg(long)]
    pub unstructured: bool,
    /// Chats in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Send traffic and votes only; score nothing held out.
    #[arg(long)]
    pub no_heldout: bool,
    /// Score the held-out messages once and stop.
    #[arg(long, conflicts_with = "no_heldout")]
    pub heldout_only: bool,
    /// Write the report (JSON) here as well.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// After each cycle's traffic, wait for the loop (a worker: `flywheel
    /// up`) to turn by itself: a cycle of the team that trained ends, and
    /// none is running; its outcome and stage times go in the report.
    /// Needs the database (`DATABASE_URL`).
    #[arg(long)]
    pub follow_loop: bool,
    /// How long to wait for the loop per cycle, in minutes.
    #[arg(long, default_value_t = 40)]
    pub loop_timeout_minutes: u64,
    /// End users per rater (default: the scenario's). A canary serves a
    /// share of a team's end users, so it needs many of them to get votes.
    #[arg(long)]
    pub users_per_rater: Option<usize>,
    /// The model every chat asks for: `default` (the team's champion, or
    /// its canary for the users it holds), or a version the team may name
    /// (to score a candidate the loop did not promote).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Chats sent at once, between looks at the loop, while a canary runs.
    #[arg(long, default_value_t = 16)]
    pub canary_chunk: usize,
}

/// Where the simulation runs: the gateway when `--url` is not given, and
/// the database (for a new key when `--key` is not given, and for
/// `--follow-loop`).
#[derive(Debug, Clone)]
pub struct Env {
    pub default_url: String,
    pub database_url: Option<String>,
}

impl Env {
    async fn pool(&self) -> anyhow::Result<PgPool> {
        let url = self
            .database_url
            .as_deref()
            .context("the database is needed here: set DATABASE_URL")?;
        Ok(flywheel_store::connect(url).await?)
    }
}

/// What a simulation measured, cycle by cycle (cycle 0's score is before
/// any traffic).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub structured: bool,
    pub cycles: Vec<CycleReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleReport {
    pub cycle: usize,
    pub traffic: Option<Traffic>,
    /// The loop's cycle that followed the traffic (`--follow-loop`).
    pub turned: Option<follow::Turned>,
    pub heldout: Option<Score>,
}

fn print_score(label: &str, s: &Score) {
    println!(
        "{label}: held-out {}/{} right ({:.1}%), served by {}, {:.0} s",
        s.right,
        s.items,
        100.0 * s.rate(),
        s.served_by
            .iter()
            .map(|(v, n)| format!("{v} x{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.seconds
    );
}

/// Plays `args.scenario` as its arguments say.
pub async fn run(env: &Env, args: SimulateArgs) -> anyhow::Result<()> {
    let mut s = Scenario::load(&args.scenario)?;
    if let Some(n) = args.users_per_rater {
        anyhow::ensure!(n > 0, "--users-per-rater must be at least 1");
        s.users_per_rater = n;
    }
    let key = match args.key {
        Some(k) => k,
        None => {
            let pool = env.pool().await?;
            flywheel_store::keys::create_key(&pool, &s.team).await?.1
        }
    };
    let target = Target {
        url: args
            .url
            .unwrap_or_else(|| env.default_url.clone())
            .trim_end_matches('/')
            .to_string(),
        key,
        structured: !args.unstructured && s.response_format.is_some(),
        model: args.model.clone(),
        concurrency: args.concurrency,
    };
    let mut report = Report {
        scenario: s.name.clone(),
        structured: target.structured,
        ..Default::default()
    };
    let write = |report: &Report| -> anyhow::Result<()> {
        if let Some(path) = &args.report {
            std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
        }
        Ok(())
    };
    println!(
        "scenario {} for team {}: {} traffic, {} held-out messages; response_format {}",
        s.name,
        s.team,
        s.traffic.len(),
        s.heldout.len(),
        if target.structured {
            "sent"
        } else {
            "not sent"
        }
    );
    if !args.no_heldout {
        let score = play::heldout(&s, &target).await?;
        print_score(&format!("before cycle {}", args.from_cycle + 1), &score);
        report.cycles.push(CycleReport {
            cycle: args.from_cycle,
            heldout: Some(score),
            ..Default::default()
        });
        write(&report)?;
    }
    if args.heldout_only {
        return Ok(());
    }
    let follow = match args.follow_loop {
        true => {
            let pool = env.pool().await?;
            let team = flywheel_store::keys::team_id(&pool, &s.team)
                .await?
                .with_context(|| format!("no team is called {}", s.team))?;
            Some((pool, team))
        }
        false => None,
    };
    let cycles = args.cycles.unwrap_or(s.cycles);
    for k in args.from_cycle..args.from_cycle + cycles {
        let started = chrono::Utc::now();
        if (k + 1) * s.chats_per_cycle > s.traffic.len() {
            bail!(
                "the scenario has traffic for {} cycles",
                s.traffic.len() / s.chats_per_cycle
            );
        }
        let first = k * s.chats_per_cycle;
        let batch = first..first + s.chats_per_cycle;
        let sent = play::send(&s, &target, batch.map(|i| (i, i))).await?;
        println!(
            "cycle {}: {} chats, {} right, {} up, {} down, {} corrections ({} votes by second raters), {} failed, {:.0} s",
            k + 1,
            sent.chats,
            sent.right,
            sent.up,
            sent.down,
            sent.corrections,
            sent.second_votes,
            sent.failed,
            sent.seconds
        );
        let mut cycle = CycleReport {
            cycle: k + 1,
            traffic: Some(sent),
            ..Default::default()
        };
        if let Some((pool, team)) = &follow {
            let timeout = std::time::Duration::from_secs(args.loop_timeout_minutes * 60);
            let chatting = follow::KeepChatting {
                scenario: &s,
                target: &target,
                batch: (first, s.chats_per_cycle),
                chunk: args.canary_chunk,
            };
            let turned = follow::follow_loop(pool, *team, started, timeout, chatting).await?;
            if let Some(c) = &turned.canary_traffic {
                println!(
                    "cycle {}: while the canary ran, {} more chats: {}",
                    k + 1,
                    c.chats,
                    c.by_version
                        .iter()
                        .map(|(v, a)| format!(
                            "{v} answered {} ({} right), {} up / {} down",
                            a.chats, a.right, a.up, a.down
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            println!(
                "cycle {}: the loop's cycle {} ended {} after {:.0} s ({}); {}",
                k + 1,
                turned.cycle_id,
                turned.status,
                turned.waited_seconds,
                turned
                    .stages
                    .iter()
                    .map(|(s, t)| format!("{s} {t:.0} s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                turned.reason.as_deref().unwrap_or("")
            );
            cycle.turned = Some(turned);
        }
        if !args.no_heldout {
            let score = play::heldout(&s, &target).await?;
            print_score(&format!("after cycle {}", k + 1), &score);
            cycle.heldout = Some(score);
        }
        report.cycles.push(cycle);
        write(&report)?;
    }
    Ok(())
}
