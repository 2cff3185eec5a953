//! `flywheel`: one binary, a subcommand per part of the system.

use anyhow::Context;
use clap::{Parser, Subcommand};
use flywheel::{Config, pg::LocalPostgres};

#[derive(Parser)]
#[command(
    name = "flywheel",
    version,
    about = "A self-hosted feedback data flywheel for small language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything on embedded defaults: database, model, gateway.
    Up,
    /// The gateway alone (FLYWHEEL_ADDR, DATABASE_URL).
    Serve,
    /// The background job worker and its schedules (FLYWHEEL_CURATION_SCHEDULE, FLYWHEEL_JOB_*).
    Worker,
    /// Apply database migrations.
    Migrate,
    /// Start the private PostgreSQL cluster `up` uses and print its URL.
    Postgres {
        /// Print `export DATABASE_URL=...` for `eval`.
        #[arg(long)]
        print_env: bool,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Model versions.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Team settings.
    Teams {
        #[command(subcommand)]
        command: TeamsCommand,
    },
    /// Curated training datasets.
    Datasets {
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// Fine-tune a LoRA adapter on a dataset version (in this process).
    Train(Box<flywheel::train::TrainArgs>),
    /// Training runs: list, show, cancel.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Copy files or folders to and from an artifact store (file://, s3://),
    /// with the same settings (AWS_*) the worker uses.
    Artifacts {
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
    /// The gateway's journal: records set aside (dead letters), replay.
    Journal {
        #[command(subcommand)]
        command: flywheel::journal::JournalCommand,
    },
    /// Recent background job attempts, newest first.
    Jobs {
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum ArtifactsCommand {
    /// Download URL (an object, or every object below it) to PATH.
    Get {
        url: String,
        path: std::path::PathBuf,
    },
    /// Upload PATH (a file, or every file below a folder) to URL.
    Put {
        path: std::path::PathBuf,
        url: String,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// The latest training runs.
    List,
    /// One run with its per-step loss and learning rate.
    Show { id: uuid::Uuid },
    /// Stop a run at its next step.
    Cancel { id: uuid::Uuid },
}

#[derive(Subcommand)]
enum DatasetsCommand {
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
        rules: flywheel::datasets::RuleFlags,
    },
    /// List dataset versions.
    List {
        #[arg(long)]
        team: Option<String>,
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

#[derive(Subcommand)]
enum TeamsCommand {
    /// Change a team's settings.
    Set {
        team: String,
        /// Store message text (`false`: hashes and counts only).
        #[arg(long, action = clap::ArgAction::Set)]
        store_text: Option<bool>,
        /// Let this team's feedback go into datasets shared across teams.
        #[arg(long, action = clap::ArgAction::Set)]
        share_for_training: Option<bool>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a team (created if new); the key is the last line printed.
    Create {
        #[arg(long)]
        team: String,
    },
    /// List keys (prefixes only; secrets are never stored).
    List {
        #[arg(long)]
        team: Option<String>,
    },
    /// Revoke a key by id or prefix.
    Revoke { key: String },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch a model and register it: the default SmolLM2-135M-Instruct, or
    /// a Hugging Face hub file `owner/repo/file.gguf[@revision]`.
    Pull {
        spec: Option<String>,
        /// Make it the champion.
        #[arg(long)]
        champion: bool,
    },
    /// Register a local GGUF file.
    Import {
        path: std::path::PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        champion: bool,
    },
    /// List model versions.
    List,
    /// Make a model version the champion.
    Promote { name: String },
    /// Register a PEFT LoRA adapter trained elsewhere: merged into its base
    /// (Q8_0 GGUF) as a new model version.
    ImportAdapter {
        /// Folder with adapter_config.json and adapter_model.safetensors,
        /// or its URL in an artifact store (file://, s3://).
        dir: String,
        /// The base model version (default: the champion).
        #[arg(long)]
        base: Option<String>,
        #[arg(long)]
        name: String,
    },
}

#[allow(unsafe_code)]
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle's element-wise pool spin-waits between ops and competes
        // with its own matmul threads on small machines (a training step:
        // 1.48 s instead of 1.33 on an idle 2-vCPU machine, much worse when
        // the machine is busy); matmuls still use every core.
        // SAFETY: no other thread exists yet to read the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = Config::from_env()?;
    match cli.command {
        Command::Up => up(cfg).await,
        Command::Postgres { print_env } => {
            let pg = LocalPostgres::new(&cfg.home.join("pgdata"), cfg.local_pg_port)?;
            pg.start()?;
            let url = pg.url("postgres");
            if print_env {
                println!("export DATABASE_URL={url}");
            } else {
                println!("{url}");
            }
            Ok(())
        }
        Command::Serve => {
            let pool = pool(&cfg).await?;
            flywheel::serve(cfg, pool, flywheel::shutdown_signal()).await
        }
        Command::Migrate => {
            pool(&cfg).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys { command } => {
            let pool = pool(&cfg).await?;
            keys(&pool, command).await
        }
        Command::Worker => {
            low_priority_training_pool(&cfg);
            let pool = pool(&cfg).await?;
            flywheel_jobs::worker::run(pool, cfg.worker()?, flywheel::shutdown_signal()).await
        }
        Command::Teams {
            command:
                TeamsCommand::Set {
                    team,
                    store_text,
                    share_for_training,
                },
        } => {
            let pool = pool(&cfg).await?;
            if store_text.is_none() && share_for_training.is_none() {
                anyhow::bail!("nothing to set: give --store-text and/or --share-for-training");
            }
            if let Some(v) = store_text {
                if !flywheel_store::keys::set_store_text(&pool, &team, v).await? {
                    anyhow::bail!("no team named {team}");
                }
                println!("team {team}: store_text = {v}");
            }
            if let Some(v) = share_for_training {
                if !flywheel_store::keys::set_share_for_training(&pool, &team, v).await? {
                    anyhow::bail!("no team named {team}");
                }
                println!("team {team}: share_for_training = {v}");
            }
            Ok(())
        }
        Command::Datasets { command } => {
            let pool = pool(&cfg).await?;
            datasets(&cfg, &pool, command).await
        }
        Command::Train(args) if args.jsonl.is_some() => flywheel::train::train_file(*args).await,
        Command::Train(args) => {
            let pool = pool(&cfg).await?;
            flywheel::train::train(&cfg, &pool, *args).await
        }
        Command::Runs { command } => {
            let pool = pool(&cfg).await?;
            match command {
                RunsCommand::List => flywheel::train::list_runs(&pool).await,
                RunsCommand::Show { id } => flywheel::train::show_run(&pool, id).await,
                RunsCommand::Cancel { id } => flywheel::train::cancel_run(&pool, id).await,
            }
        }
        Command::Artifacts { command } => {
            use flywheel_jobs::artifacts;
            let (n, from, to) = match command {
                ArtifactsCommand::Get { url, path } => (
                    artifacts::download(&url, &path).await?,
                    url,
                    path.display().to_string(),
                ),
                ArtifactsCommand::Put { path, url } => (
                    artifacts::upload(&path, &url).await?,
                    path.display().to_string(),
                    url,
                ),
            };
            println!("copied {n} file(s) from {from} to {to}");
            Ok(())
        }
        Command::Journal { command } => {
            let pool = match (&command, &cfg.database_url) {
                (flywheel::journal::JournalCommand::Replay { .. }, Some(_)) => {
                    Some(pool(&cfg).await?)
                }
                _ => None,
            };
            flywheel::journal::run(&cfg, command, pool).await
        }
        Command::Jobs { limit } => {
            let pool = pool(&cfg).await?;
            flywheel::datasets::jobs(&pool, limit).await
        }
        Command::Models { command } => {
            let pool = pool(&cfg).await?;
            models(&cfg, &pool, command).await
        }
    }
}

async fn pool(cfg: &Config) -> anyhow::Result<flywheel_store::PgPool> {
    let url = cfg
        .database_url
        .as_ref()
        .context("DATABASE_URL is not set (or use `flywheel up`, which starts its own database)")?;
    flywheel::connect_and_migrate(&url.0).await
}

/// The global rayon pool is where candle's matmuls run, that is training
/// (serving has a pool of its own): its threads get the training priority.
fn low_priority_training_pool(cfg: &Config) {
    let nice = cfg.train_nice;
    let built = rayon::ThreadPoolBuilder::new()
        .start_handler(move |_| {
            flywheel_trainer::lower_thread_priority(nice);
        })
        .build_global();
    if let Err(e) = built {
        tracing::warn!(error = %e, "training threads keep normal priority");
    }
}

async fn up(mut cfg: Config) -> anyhow::Result<()> {
    low_priority_training_pool(&cfg);
    std::fs::create_dir_all(&cfg.home)?;
    let local = match &cfg.database_url {
        Some(_) => None,
        None => {
            let pg = LocalPostgres::new(&cfg.home.join("pgdata"), cfg.local_pg_port)?;
            pg.start()?;
            ensure_database(&pg.url("postgres"), "flywheel").await?;
            cfg.database_url = Some(flywheel::config::DatabaseUrl(pg.url("flywheel")));
            Some(pg)
        }
    };
    let pool = pool(&cfg).await?;
    let champion = flywheel::ensure_champion(&cfg, &pool).await?;
    let key = dev_key(&cfg, &pool).await?;
    println!(
        "Flywheel is starting on http://{}/v1 with model {}",
        cfg.addr, champion.name
    );
    println!(
        "API key (team \"default\", saved in {}):",
        cfg.home.join("api-key").display()
    );
    println!("{key}");
    // One signal stops both the gateway and the worker.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        flywheel::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let worker = tokio::spawn(flywheel_jobs::worker::run(
        pool.clone(),
        cfg.worker()?,
        stopped(stop_rx.clone()),
    ));
    let mut result = flywheel::serve(cfg, pool, stopped(stop_rx)).await;
    match worker.await {
        Ok(Err(e)) if result.is_ok() => result = Err(e),
        Err(e) if result.is_ok() => result = Err(anyhow::anyhow!("worker panicked: {e}")),
        _ => {}
    }
    if let Some(pg) = local {
        eprintln!("stopping PostgreSQL");
        pg.stop()?;
    }
    result
}

/// Creates the database if it does not exist.
async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let admin = flywheel_store::connect(admin_url).await?;
    let exists: bool =
        sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        // `name` is ours, never user input.
        sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
            .execute(&admin)
            .await?;
    }
    Ok(())
}

/// The key `up` prints: reused from `FLYWHEEL_HOME/api-key` while it is valid.
async fn dev_key(cfg: &Config, pool: &flywheel_store::PgPool) -> anyhow::Result<String> {
    let path = cfg.home.join("api-key");
    if let Ok(saved) = std::fs::read_to_string(&path) {
        let saved = saved.trim().to_string();
        if flywheel_store::keys::authenticate(pool, &saved)
            .await?
            .is_some()
        {
            return Ok(saved);
        }
    }
    let (_, secret) = flywheel_store::keys::create_key(pool, "default").await?;
    std::fs::write(&path, format!("{secret}\n"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret)
}

async fn datasets(
    cfg: &Config,
    pool: &flywheel_store::PgPool,
    command: DatasetsCommand,
) -> anyhow::Result<()> {
    use flywheel::datasets::{self as ds, RunMode};
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
                rules: rules.apply(cfg.curation_rules.clone())?,
                until: None,
            };
            let mode = match (inline, no_wait) {
                (true, _) => RunMode::Inline,
                (false, true) => RunMode::Enqueue,
                (false, false) => RunMode::Wait,
            };
            ds::build(pool, job, mode, cfg.job_max_attempts).await?;
        }
        DatasetsCommand::List { team } => ds::list(pool, team.as_deref()).await?,
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

async fn keys(pool: &flywheel_store::PgPool, command: KeysCommand) -> anyhow::Result<()> {
    use flywheel_store::keys;
    match command {
        KeysCommand::Create { team } => {
            let (info, secret) = keys::create_key(pool, &team).await?;
            println!(
                "created key {} ({}) for team {}",
                info.id, info.prefix, info.team
            );
            println!("{secret}");
        }
        KeysCommand::List { team } => {
            println!(
                "{:<36}  {:<16}  {:<12}  {:<20}  status",
                "id", "team", "prefix", "created"
            );
            for k in keys::list_keys(pool, team.as_deref()).await? {
                let status = match k.revoked_at {
                    Some(t) => format!("revoked {}", t.format("%Y-%m-%d %H:%M")),
                    None => "active".into(),
                };
                println!(
                    "{:<36}  {:<16}  {:<12}  {:<20}  {status}",
                    k.id,
                    k.team,
                    k.prefix,
                    k.created_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        KeysCommand::Revoke { key } => match keys::revoke_key(pool, &key).await? {
            0 => anyhow::bail!("no active key matches {key}"),
            n => println!("revoked {n} key(s)"),
        },
    }
    Ok(())
}

async fn models(
    cfg: &Config,
    pool: &flywheel_store::PgPool,
    command: ModelsCommand,
) -> anyhow::Result<()> {
    use flywheel_store::models;
    let (fetched, champion) = match command {
        ModelsCommand::Pull { spec, champion } => {
            (flywheel::pull(cfg, spec.as_deref()).await?, champion)
        }
        ModelsCommand::Import {
            path,
            name,
            champion,
        } => {
            let cache = flywheel_modelhub::ModelCache::new(&cfg.model_cache)?;
            (cache.import(&path, name.as_deref()).await?, champion)
        }
        ModelsCommand::List => {
            println!(
                "{:<36}  {:<32}  {:<10}  {:<8}  source",
                "id", "name", "sha256", "champion"
            );
            for v in models::list(pool).await? {
                println!(
                    "{:<36}  {:<32}  {:<10}  {:<8}  {}",
                    v.id,
                    v.name,
                    &v.sha256[..10.min(v.sha256.len())],
                    if v.is_champion { "yes" } else { "" },
                    v.source
                );
            }
            return Ok(());
        }
        ModelsCommand::ImportAdapter { dir, base, name } => {
            let v =
                flywheel::train::import_adapter(cfg, pool, &dir, base.as_deref(), &name).await?;
            println!("registered {} ({}) from the adapter in {dir}", v.name, v.id);
            return Ok(());
        }
        ModelsCommand::Promote { name } => {
            let v = models::set_champion(pool, &name).await?;
            println!("{} is now the champion", v.name);
            return Ok(());
        }
    };
    let v = flywheel::register(pool, &fetched).await?;
    println!("registered {} ({}) sha256 {}", v.name, v.id, v.sha256);
    if champion || models::champion(pool).await?.is_none() {
        models::set_champion(pool, &v.name).await?;
        println!("{} is now the champion", v.name);
    }
    Ok(())
}
