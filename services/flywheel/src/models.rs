//! `flywheel models`: the model-version registry (pull, import, list,
//! promote, adapters trained elsewhere).

use flywheel_store::decisions::DecisionKind;

use crate::Config;

/// Who a command acts for, in the audit log: the operating-system user.
pub fn actor() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .map(|u| format!("cli:{u}"))
        .unwrap_or_else(|_| "cli".into())
}

pub async fn team_id(pool: &flywheel_store::PgPool, team: &str) -> anyhow::Result<uuid::Uuid> {
    flywheel_store::keys::team_id(pool, team)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no team named {team}"))
}

pub async fn version(
    pool: &flywheel_store::PgPool,
    name: &str,
) -> anyhow::Result<flywheel_store::models::ModelVersion> {
    flywheel_store::models::by_name(pool, name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no model version named {name}"))
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model and register it: the default SmolLM2-135M-Instruct, a
    /// Hugging Face hub repository `owner/repo[@revision]` (its model folder,
    /// converted to GGUF), or a hub file `owner/repo/file.gguf[@revision]`.
    Pull {
        spec: Option<String>,
        /// Make it the champion.
        #[arg(long)]
        champion: bool,
        /// A repository's matrices quantized as it is converted.
        #[arg(long, value_enum)]
        quantize: Option<MatrixType>,
    },
    /// Register a local GGUF file, or a Hugging Face folder (config.json,
    /// safetensors, tokenizer.json), converted to GGUF.
    Import {
        path: std::path::PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        champion: bool,
        /// A folder's matrices quantized as it is converted.
        #[arg(long, value_enum)]
        quantize: Option<MatrixType>,
    },
    /// Register a model served by an OpenAI-compatible server elsewhere
    /// (vLLM, TGI, llama.cpp's server, a hosted API): routed, logged, rated
    /// and curated like a model served here.
    AddUpstream(AddUpstream),
    /// List model versions.
    List {
        /// One JSON object per version, a line each.
        #[arg(long)]
        json: bool,
    },
    /// Make a model version the champion: a team's (`--team`, with a
    /// `--reason` for the audit log) or, without `--team`, the global one
    /// every team without a champion of its own gets.
    Promote {
        name: String,
        #[arg(long)]
        team: Option<String>,
        /// Why (required with --team; kept in `flywheel decisions`).
        #[arg(long, requires = "team")]
        reason: Option<String>,
    },
    /// Undo a team's last promotion (or stop its running canary).
    Rollback {
        #[arg(long)]
        team: String,
        #[arg(long)]
        reason: String,
    },
    /// Serve a candidate to a share of a team's traffic, compared live with
    /// its champion until the thumbs decide.
    Canary {
        name: String,
        #[arg(long)]
        team: String,
        /// Share of the team's end users it serves (default: the configured one).
        #[arg(long)]
        share: Option<f64>,
        #[arg(long)]
        reason: String,
    },
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
        /// The team whose data trained it: only that team may be served by
        /// it (without: every team may).
        #[arg(long)]
        team: Option<String>,
    },
}

/// The types `--quantize` converts a folder's matrices to: those the
/// serving kernels compute on as stored.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MatrixType {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_1")]
    Q4_1,
}

impl MatrixType {
    fn ggml(self) -> flywheel_modelhub::GgmlDType {
        match self {
            MatrixType::Q8_0 => flywheel_modelhub::GgmlDType::Q8_0,
            MatrixType::Q4_1 => flywheel_modelhub::GgmlDType::Q4_1,
        }
    }
}

/// `flywheel models add-upstream`.
#[derive(Debug, Clone, clap::Args)]
pub struct AddUpstream {
    /// The version's name, as clients and the dashboard see it.
    name: String,
    /// The API's base URL, up to its version: `http://host:8000/v1`.
    #[arg(long)]
    url: String,
    /// The model name the server knows it by.
    #[arg(long)]
    model: String,
    /// The environment variable holding the API key, on every gateway
    /// (the key itself is never stored).
    #[arg(long)]
    api_key_env: Option<String>,
    /// The longest one answer may take, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u32,
    /// Its context window, when known (shown on the dashboard).
    #[arg(long)]
    context_length: Option<i32>,
    /// Only this team may be served by it (without: every team may).
    #[arg(long)]
    team: Option<String>,
}

pub async fn run(
    cfg: &Config,
    pool: &flywheel_store::PgPool,
    command: ModelsCommand,
) -> anyhow::Result<()> {
    use flywheel_store::models;
    let (fetched, champion) = match command {
        ModelsCommand::Pull {
            spec,
            champion,
            quantize,
        } => (
            crate::bootstrap::pull_as(cfg, spec.as_deref(), quantize.map(MatrixType::ggml)).await?,
            champion,
        ),
        ModelsCommand::Import {
            path,
            name,
            champion,
            quantize,
        } => {
            let cache = flywheel_modelhub::ModelCache::new(&cfg.models.cache)?;
            let q = quantize.map(MatrixType::ggml);
            (cache.import_as(&path, name.as_deref(), q).await?, champion)
        }
        ModelsCommand::AddUpstream(args) => {
            add_upstream(pool, args).await?;
            return Ok(());
        }
        ModelsCommand::List { json: true } => {
            for v in models::list(pool).await? {
                println!("{}", serde_json::to_string(&v)?);
            }
            return Ok(());
        }
        ModelsCommand::List { json: false } => {
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
        ModelsCommand::ImportAdapter {
            dir,
            base,
            name,
            team,
        } => {
            let scope = match &team {
                Some(t) => Some(team_id(pool, t).await?),
                None => None,
            };
            let v = crate::train::import_adapter(cfg, pool, &dir, base.as_deref(), &name).await?;
            if scope.is_some() {
                models::set_scope(pool, v.id, scope, false).await?;
            }
            println!("registered {} ({}) from the adapter in {dir}", v.name, v.id);
            return Ok(());
        }
        ModelsCommand::Promote {
            name, team: None, ..
        } => {
            let v = models::set_champion(pool, &name).await?;
            println!("{} is now the champion", v.name);
            return Ok(());
        }
        ModelsCommand::Promote {
            name,
            team: Some(team),
            reason,
        } => {
            let reason = reason
                .ok_or_else(|| anyhow::anyhow!("give --reason: it goes into the audit log"))?;
            let (team_id, v) = (team_id(pool, &team).await?, version(pool, &name).await?);
            let why = flywheel_loop::decide::Why {
                reason: &reason,
                evidence: serde_json::json!({}),
                actor: &actor(),
                evaluation_id: None,
                canary_id: None,
            };
            flywheel_loop::decide::promote(pool, team_id, &v, DecisionKind::ManualPromote, why)
                .await?;
            println!("{} is now team {team}'s champion", v.name);
            return Ok(());
        }
        ModelsCommand::Rollback { team, reason } => {
            let team_id = team_id(pool, &team).await?;
            let done =
                flywheel_loop::decide::manual_rollback(pool, team_id, &reason, &actor()).await?;
            println!("team {team}: {done}");
            return Ok(());
        }
        ModelsCommand::Canary {
            name,
            team,
            share,
            reason,
        } => {
            let (team_id, v) = (team_id(pool, &team).await?, version(pool, &name).await?);
            let share = share.unwrap_or(cfg.promotion.canary_share);
            if !(share > 0.0 && share < 1.0) {
                anyhow::bail!("--share must be between 0 and 1, not {share}");
            }
            let why = flywheel_loop::decide::Why {
                reason: &reason,
                evidence: serde_json::json!({}),
                actor: &actor(),
                evaluation_id: None,
                canary_id: None,
            };
            let c = flywheel_loop::decide::start_canary(
                pool,
                team_id,
                &v,
                share,
                cfg.promotion.canary_deadline_hours,
                why,
            )
            .await?;
            println!(
                "canary {} started: {} serves {:.0}% of team {team}'s users until {}",
                c.id,
                v.name,
                100.0 * share,
                c.deadline.format("%Y-%m-%d %H:%M UTC")
            );
            return Ok(());
        }
    };
    let v = crate::bootstrap::register(pool, &fetched).await?;
    println!("registered {} ({}) sha256 {}", v.name, v.id, v.sha256);
    memory_note(cfg, &v.name, &fetched.path);
    if champion || models::champion(pool).await?.is_none() {
        models::set_champion(pool, &v.name).await?;
        println!("{} is now the champion", v.name);
    }
    Ok(())
}

/// Says what serving a model file will take under this configuration, and
/// whether this machine has it now (the gateway refuses to load a model
/// that does not fit; the file may be meant for another machine).
fn memory_note(cfg: &Config, name: &str, path: &std::path::Path) {
    use flywheel_engine::{MemoryLimit, MemoryPlan, Size};
    match MemoryPlan::for_file(path, &cfg.engine) {
        Ok(plan) => {
            println!(
                "serving it takes about {} of memory: {plan}",
                Size(plan.needed())
            );
            if let Some(limit) = MemoryLimit::now(cfg.engine.memory_budget)
                && let Err(e) = plan.check(name, &limit)
            {
                eprintln!("warning: this machine cannot serve it now: {e}");
            }
        }
        Err(e) => eprintln!("warning: cannot tell how much memory serving {name} takes: {e}"),
    }
}

async fn add_upstream(pool: &flywheel_store::PgPool, args: AddUpstream) -> anyhow::Result<()> {
    let AddUpstream {
        name,
        url,
        model,
        api_key_env,
        timeout_secs,
        context_length,
        team,
    } = args;
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url.contains(char::is_whitespace)
    {
        anyhow::bail!("--url must be an http:// or https:// URL, such as http://127.0.0.1:8000/v1");
    }
    if let Some(var) = &api_key_env {
        let valid = var
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            anyhow::bail!(
                "--api-key-env takes the name of an environment variable (such as UPSTREAM_API_KEY), not the key"
            );
        }
        if std::env::var_os(var).is_none() {
            eprintln!("note: {var} is not set here; every gateway that serves {name} needs it set");
        }
    }
    if timeout_secs == 0 {
        anyhow::bail!("--timeout-secs must be at least 1");
    }
    let scope = match &team {
        Some(t) => Some(team_id(pool, t).await?),
        None => None,
    };
    let new = flywheel_store::upstreams::NewUpstream {
        team_id: scope,
        name,
        base_url: url,
        model,
        api_key_env,
        timeout_ms: i32::try_from(u64::from(timeout_secs) * 1000).unwrap_or(i32::MAX),
        context_length,
    };
    let v = flywheel_store::upstreams::register(pool, &new).await?;
    println!(
        "registered {} ({}): served by {} as {}",
        v.name, v.id, v.source, new.model
    );
    Ok(())
}
