//! The command line: one subcommand per part of the system, each handled by
//! its module. [`run`] loads the configuration and dispatches.

use clap::{Parser, Subcommand};

use crate::Config;
use crate::bootstrap::pool;
use crate::pg::LocalPostgres;

#[derive(Parser)]
#[command(
    name = "flywheel",
    version,
    about = "A self-hosted feedback data flywheel for small language models",
    after_help = "Settings come from defaults, then the --config file (or FLYWHEEL_CONFIG), then the environment; `flywheel config show` prints them."
)]
pub struct Cli {
    /// A flywheel.toml whose settings override the defaults (the
    /// environment overrides both).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Everything on embedded defaults: database, model, gateway, worker.
    Up,
    /// The gateway alone (gateway.addr, DATABASE_URL).
    Serve,
    /// The background job worker and its schedules.
    Worker,
    /// Apply database migrations.
    Migrate,
    /// Start the private PostgreSQL cluster `up` uses and print its URL.
    Postgres {
        /// Print `export DATABASE_URL=...` for `eval`.
        #[arg(long)]
        print_env: bool,
    },
    /// The effective configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: crate::keys::KeysCommand,
    },
    /// Model versions.
    Models {
        #[command(subcommand)]
        command: crate::models::ModelsCommand,
    },
    /// Accounts of the admin dashboard (/admin).
    Admin {
        #[command(subcommand)]
        command: crate::admin::AdminCommand,
    },
    /// Team settings.
    Teams {
        #[command(subcommand)]
        command: crate::teams::TeamsCommand,
    },
    /// Curated training datasets.
    Datasets {
        #[command(subcommand)]
        command: crate::datasets::DatasetsCommand,
    },
    /// A teacher model version answers a team's prompts (its log, or a
    /// file); the answers become the team's next SFT dataset version.
    Distill(Box<crate::distill::DistillArgs>),
    /// Judges: model versions that compare two answers, checked against
    /// the team's own users before they are trusted.
    Judges {
        #[command(subcommand)]
        command: crate::judges::JudgesCommand,
    },
    /// Fine-tune a LoRA adapter on a dataset version.
    Train(Box<crate::train::TrainArgs>),
    /// Training runs: list, show, cancel.
    Runs {
        #[command(subcommand)]
        command: crate::train::RunsCommand,
    },
    /// Copy files or folders to and from an artifact store (file://, s3://),
    /// with the same settings (AWS_*) the worker uses.
    Artifacts {
        #[command(subcommand)]
        command: crate::artifacts::ArtifactsCommand,
    },
    /// Evaluate a candidate against a champion (`flywheel eval CANDIDATE
    /// [--against CHAMPION]`), or read reports (`show ID`, `list`).
    Eval(Box<crate::eval::EvalArgs>),
    /// A team's task suites: prompts with checks the gate runs.
    Suites {
        #[command(subcommand)]
        command: crate::eval::SuitesCommand,
    },
    /// The audit log: promotions, rejections, canaries, rollbacks, and why.
    Decisions {
        #[arg(long)]
        team: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object per decision, a line each.
        #[arg(long)]
        json: bool,
    },
    /// Run one cycle of the loop for a team now (curate, train, evaluate,
    /// canary, promote or reject) and follow it.
    Loop(crate::cycles::LoopArgs),
    /// The loop's cycles: trigger, outcome, wall time per stage.
    Cycles {
        #[command(subcommand)]
        command: crate::cycles::CyclesCommand,
    },
    /// Play a scenario through the public API: chats, simulated users'
    /// votes and corrections, held-out scores cycle by cycle.
    Simulate(Box<flywheel_simulate::SimulateArgs>),
    /// The gateway's journal: records set aside (dead letters), replay.
    Journal {
        #[command(subcommand)]
        command: crate::journal::JournalCommand,
    },
    /// Recent background job attempts, newest first.
    Jobs {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// One JSON object per attempt, a line each.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Every setting, its value (secrets redacted) and where it came from.
    Show {
        /// Print the settings' reference table (as in the README) instead.
        #[arg(long)]
        markdown: bool,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Up => crate::up::up(cfg).await,
        Command::Serve => {
            let pool = pool(&cfg).await?;
            crate::serve::serve(cfg, pool, crate::serve::shutdown_signal()).await
        }
        Command::Worker => {
            crate::bootstrap::low_priority_training_pool(&cfg);
            let pool = pool(&cfg).await?;
            crate::worker::run(&cfg, pool, crate::serve::shutdown_signal()).await
        }
        Command::Migrate => {
            pool(&cfg).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Postgres { print_env } => {
            let pg = LocalPostgres::new(&cfg.home.join("pgdata"), cfg.database.local_port)?;
            pg.start()?;
            let url = pg.url("postgres");
            if print_env {
                println!("export DATABASE_URL={url}");
            } else {
                println!("{url}");
            }
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Show { markdown },
        } => {
            match markdown {
                true => print!("{}", crate::config::settings::markdown_table()),
                false => print!("{}", cfg.show()),
            }
            Ok(())
        }
        Command::Keys { command } => crate::keys::run(&pool(&cfg).await?, command).await,
        Command::Models { command } => crate::models::run(&cfg, &pool(&cfg).await?, command).await,
        Command::Teams { command } => crate::teams::run(&pool(&cfg).await?, command).await,
        Command::Admin { command } => crate::admin::run(&pool(&cfg).await?, command).await,
        Command::Datasets { command } => {
            crate::datasets::run(&cfg, &pool(&cfg).await?, command).await
        }
        Command::Judges { command } => crate::judges::run(&cfg, &pool(&cfg).await?, command).await,
        Command::Distill(args) => crate::distill::run(&cfg, &pool(&cfg).await?, *args).await,
        Command::Train(args) if args.jsonl.is_some() => crate::train::train_file(*args).await,
        Command::Train(args) => crate::train::train(&cfg, &pool(&cfg).await?, *args).await,
        Command::Runs { command } => crate::train::runs(&pool(&cfg).await?, command).await,
        Command::Artifacts { command } => crate::artifacts::run(command).await,
        Command::Journal { command } => {
            let pool = match (&command, &cfg.database.url) {
                (crate::journal::JournalCommand::Replay { .. }, Some(_)) => Some(pool(&cfg).await?),
                _ => None,
            };
            crate::journal::run(&cfg, command, pool).await
        }
        Command::Eval(args) => crate::eval::eval(&cfg, &pool(&cfg).await?, *args).await,
        Command::Suites { command } => crate::eval::suites(&cfg, &pool(&cfg).await?, command).await,
        Command::Decisions { team, limit, json } => {
            crate::eval::decisions(&pool(&cfg).await?, team.as_deref(), limit, json).await
        }
        Command::Loop(args) => crate::cycles::run_loop(&cfg, &pool(&cfg).await?, args).await,
        Command::Cycles { command } => crate::cycles::run(&pool(&cfg).await?, command).await,
        Command::Simulate(args) => {
            let env = flywheel_simulate::Env {
                default_url: format!("http://{}", cfg.gateway.addr),
                database_url: cfg.database.url.as_ref().map(|u| u.0.clone()),
            };
            flywheel_simulate::run(&env, *args).await
        }
        Command::Jobs { limit, json } => {
            crate::datasets::jobs(&pool(&cfg).await?, limit, json).await
        }
    }
}
