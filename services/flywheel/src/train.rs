//! `flywheel train`: fine-tune a LoRA adapter on a curated dataset version,
//! starting from the champion model (or a named version). With `--queue` it
//! becomes a recorded run for the workers (checkpoints, resume, cancel,
//! candidate registration: `flywheel_jobs::train`); without, it trains in
//! this process (`flywheel_jobs::train::foreground`) and writes the adapter
//! (PEFT layout) and a run record to `--out`. And `flywheel runs ...` to
//! watch and cancel runs. This module parses and dispatches.

use std::path::PathBuf;

use anyhow::{Context, bail};
use flywheel_jobs::train::{Candidate, RunSpec, foreground, load_examples};
use flywheel_model::Proj;
use flywheel_store::PgPool;
use flywheel_trainer::{Base, LoraConfig, Objective, TrainConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Dataset version: id, TEAM@N or shared@N.
    #[arg(long, required_unless_present = "jsonl")]
    pub dataset: Option<String>,
    /// Train on an exported file instead (`trl-sft`, `trl-dpo` or `trl-kto`
    /// JSONL), without the database: what an external trainer command runs.
    #[arg(long, conflicts_with_all = ["dataset", "queue", "register", "model"], requires = "base_gguf")]
    pub jsonl: Option<PathBuf>,
    /// Held-out examples for `--jsonl` (same format).
    #[arg(long, requires = "jsonl")]
    pub eval_jsonl: Option<PathBuf>,
    /// The base model file for `--jsonl`.
    #[arg(long)]
    pub base_gguf: Option<PathBuf>,
    /// sft, dpo or kto (default: sft if the version has SFT examples, else dpo, else kto).
    #[arg(long)]
    pub objective: Option<String>,
    /// Base model version (default: the champion).
    #[arg(long)]
    pub model: Option<String>,
    /// Optimizer steps; with --epochs above 0, the most a run makes.
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    pub steps: usize,
    /// Passes over the training examples, which set the steps (between
    /// --min-steps and --steps) and, where --steps would not make them, the
    /// examples a step (up to --max-grad-accum); 0 trains exactly --steps.
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: f64,
    /// The fewest steps --epochs gives.
    #[arg(long, default_value_t = TrainConfig::default().min_steps)]
    pub min_steps: usize,
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = TrainConfig::default().grad_accum)]
    pub grad_accum: usize,
    /// The most examples per step --epochs may ask for.
    #[arg(long, default_value_t = TrainConfig::default().max_grad_accum)]
    pub max_grad_accum: usize,
    #[arg(long, default_value_t = TrainConfig::default().warmup_steps)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = LoraConfig::default().rank)]
    pub rank: usize,
    #[arg(long, default_value_t = LoraConfig::default().alpha)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Projections to adapt (default: all of them).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = TrainConfig::default().max_len)]
    pub max_len: usize,
    /// DPO's and KTO's beta.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Against forgetting: replay the starting model's own answers to this
    /// many shipped general prompts, one per step (0: off).
    #[arg(long, default_value_t = TrainConfig::default().replay_prompts)]
    pub replay_prompts: usize,
    /// Weight of the replayed answer's SFT loss in each step (0: off).
    #[arg(long, default_value_t = TrainConfig::default().replay_weight)]
    pub replay_weight: f64,
    /// The reference penalty: weight of KL(starting model || adapted model)
    /// over the replayed chat's next-token distributions in each step (0: off).
    #[arg(long, default_value_t = TrainConfig::default().reference_kl)]
    pub reference_kl: f64,
    /// With --jsonl: the whole run spec as an external trainer is given it
    /// (`{spec}`, `{spec_url}`: `{"lora": {...}, "train": {...}}`). Its
    /// settings are used instead of the flags'.
    #[arg(long, requires = "jsonl")]
    pub spec: Option<PathBuf>,
    /// Where the adapter goes (PEFT layout); not with --queue.
    #[arg(long, short, required_unless_present = "queue")]
    pub out: Option<PathBuf>,
    /// Queue a recorded training run for the workers instead of training here.
    #[arg(long, conflicts_with_all = ["out", "register"])]
    pub queue: bool,
    /// With --queue: train with the workers' external trainer command
    /// (FLYWHEEL_EXTERNAL_TRAINER) instead of in-process.
    #[arg(long, requires = "queue")]
    pub external: bool,
    /// Also merge the adapter into the base (Q8_0 GGUF) and register it as
    /// a candidate model version with this name, with its lineage.
    #[arg(long)]
    pub register: Option<String>,
}

/// The adapter's and the optimizer's settings from the flags.
fn configs(args: &TrainArgs, objective: Objective) -> anyhow::Result<(LoraConfig, TrainConfig)> {
    let targets: Vec<Proj> = args
        .targets
        .iter()
        .map(|t| {
            serde_json::from_value(serde_json::Value::String(t.clone()))
                .map_err(|_| anyhow::anyhow!("unknown target module {t}"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((
        LoraConfig {
            rank: args.rank,
            alpha: args.alpha,
            dropout: args.dropout,
            targets,
            seed: 0,
        },
        TrainConfig {
            objective,
            learning_rate: args.learning_rate,
            steps: args.steps,
            epochs: args.epochs,
            min_steps: args.min_steps,
            grad_accum: args.grad_accum,
            max_grad_accum: args.max_grad_accum,
            warmup_steps: args.warmup_steps,
            max_len: args.max_len,
            beta: args.beta,
            replay_prompts: args.replay_prompts,
            replay_weight: args.replay_weight,
            reference_kl: args.reference_kl,
            ..Default::default()
        },
    ))
}

/// The adapter's and the optimizer's settings from a run's spec file; an
/// `--objective` that names another objective is refused.
fn spec_configs(
    path: &std::path::Path,
    wanted: Option<Objective>,
) -> anyhow::Result<(LoraConfig, TrainConfig)> {
    #[derive(serde::Deserialize)]
    struct Spec {
        lora: LoraConfig,
        train: TrainConfig,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let spec: Spec = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a run spec", path.display()))?;
    if let Some(w) = wanted
        && w != spec.train.objective
    {
        bail!(
            "--objective {w:?} disagrees with the spec's {:?}",
            spec.train.objective
        );
    }
    Ok((spec.lora, spec.train))
}

fn parse_objective(s: Option<&str>) -> anyhow::Result<Option<Objective>> {
    Ok(match s {
        None => None,
        Some("sft") => Some(Objective::Sft),
        Some("dpo") => Some(Objective::Dpo),
        Some("kto") => Some(Objective::Kto),
        Some(other) => bail!("--objective must be sft, dpo or kto, not {other}"),
    })
}

/// `flywheel train --jsonl FILE --base-gguf MODEL --out DIR`: no database.
pub async fn train_file(args: TrainArgs) -> anyhow::Result<()> {
    let (Some(jsonl), Some(base_path), Some(out)) =
        (args.jsonl.clone(), args.base_gguf.clone(), args.out.clone())
    else {
        bail!("--jsonl needs --base-gguf and --out");
    };
    let wanted = parse_objective(args.objective.as_deref())?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let base = Base::load(&base_path)?;
        let train_set = foreground::read_jsonl(&base, &jsonl, args.max_len)?;
        let eval_set = match &args.eval_jsonl {
            Some(p) => foreground::read_jsonl(&base, p, args.max_len)?,
            None => Vec::new(),
        };
        let (lora_config, config) = match &args.spec {
            Some(path) => spec_configs(path, wanted)?,
            None => configs(
                &args,
                wanted.unwrap_or_else(|| foreground::objective_of(&train_set)),
            )?,
        };
        let name = base_path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let source = serde_json::json!({"jsonl": jsonl});
        foreground::train(
            &base,
            train_set,
            eval_set,
            lora_config,
            config,
            &out,
            &name,
            source,
        )?;
        Ok(())
    })
    .await
    .context("training panicked")?
}

pub async fn train(cfg: &crate::Config, pool: &PgPool, args: TrainArgs) -> anyhow::Result<()> {
    let Some(spec) = args.dataset.clone() else {
        bail!("give --dataset (or --jsonl)");
    };
    let version = crate::datasets::resolve(pool, &spec).await?;
    let objective = match parse_objective(args.objective.as_deref())? {
        Some(o) => o,
        None if version.sft_count > 0 => Objective::Sft,
        None if version.dpo_count > 0 => Objective::Dpo,
        None => Objective::Kto,
    };
    let kind = match objective {
        Objective::Sft => "sft",
        Objective::Dpo => "dpo",
        Objective::Kto => "kto",
    };
    let rows = flywheel_store::datasets::examples(pool, version.id, kind, None).await?;
    if rows.is_empty() {
        bail!("dataset version {spec} has no {kind} examples");
    }
    let model = match &args.model {
        Some(name) => flywheel_store::models::by_name(pool, name)
            .await?
            .with_context(|| format!("no model version named {name}"))?,
        None => flywheel_store::models::champion(pool)
            .await?
            .context("no champion model: `flywheel models pull` first")?,
    };
    eprintln!(
        "training {kind} on dataset {} (version {}, {} examples) from {}",
        version.id,
        version.version,
        rows.len(),
        model.name
    );
    let (lora_config, train_config) = configs(&args, objective)?;
    if args.queue {
        let spec = RunSpec {
            lora: lora_config,
            train: train_config,
            external: args.external,
        };
        let (run, task) = flywheel_jobs::train::create_run(
            pool,
            version.id,
            model.id,
            &spec,
            cfg.jobs.max_attempts,
        )
        .await?;
        println!(
            "queued training run {run} (job {task}); follow it with `flywheel runs show {run}`"
        );
        return Ok(());
    }
    let Some(out) = args.out.clone() else {
        bail!("--out is required unless --queue");
    };
    let dataset_id = version.id;
    let (base_id, base_path) = (model.id, PathBuf::from(&model.path));
    let register = args.register.clone();
    let out2 = out.clone();
    let (record, lora) = tokio::task::spawn_blocking(move || {
        let base = Base::load(std::path::Path::new(&model.path))?;
        let (train_set, eval_set) = load_examples(&base, objective, rows, args.max_len)?;
        let source = serde_json::json!({"dataset_version": dataset_id, "base_model_id": model.id});
        let (lora, record) = foreground::train(
            &base,
            train_set,
            eval_set,
            lora_config,
            train_config,
            &out2,
            &flywheel_modelhub::base_name(&model.source, &model.name),
            source,
        )?;
        anyhow::Ok((record, lora))
    })
    .await
    .context("training panicked")??;

    if let Some(name) = register {
        let adapter = std::path::absolute(&out).unwrap_or(out.clone());
        let v = flywheel_jobs::train::register_candidate(
            pool,
            &flywheel_modelhub::Artifacts::open(&cfg.training.artifacts)?,
            &cfg.models.cache,
            &Candidate {
                base_path: &base_path,
                lora: &lora,
                name: &name,
                note: &format!("LoRA from dataset version {dataset_id}"),
                lineage: &flywheel_store::models::Lineage {
                    base_version_id: Some(base_id),
                    dataset_version_id: Some(dataset_id),
                    adapter_path: Some(adapter.display().to_string()),
                    training: Some(record),
                },
            },
        )
        .await?;
        println!(
            "registered candidate model version {} ({}); serve it with `flywheel models promote {}`",
            v.name, v.id, v.name
        );
    }
    Ok(())
}

/// `flywheel runs list`.
pub async fn list_runs(pool: &PgPool) -> anyhow::Result<()> {
    println!(
        "{:<36}  {:<9}  {:<4}  {:>11}  {:>9}  {:>9}  {:>7}  created",
        "run", "status", "obj", "steps", "eval bef.", "eval aft.", "tok/s"
    );
    let loss = |v: Option<f64>| v.map(|l| format!("{l:.4}")).unwrap_or_default();
    for r in flywheel_store::training::list(pool, 50).await? {
        println!(
            "{:<36}  {:<9}  {:<4}  {:>5}/{:<5}  {:>9}  {:>9}  {:>7}  {}",
            r.id,
            r.status,
            r.objective,
            r.step,
            r.total_steps,
            loss(r.eval_loss_before),
            loss(r.eval_loss_after),
            r.tokens_per_second
                .map(|t| format!("{t:.0}"))
                .unwrap_or_default(),
            r.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}

/// `flywheel runs show ID`: the record and its per-step losses.
pub async fn show_run(pool: &PgPool, id: uuid::Uuid) -> anyhow::Result<()> {
    let run = flywheel_store::training::get(pool, id)
        .await?
        .with_context(|| format!("no training run {id}"))?;
    let steps = flywheel_store::training::steps(pool, id).await?;
    let mut out = serde_json::to_value(&run)?;
    out["steps"] = serde_json::to_value(&steps)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `flywheel runs cancel ID`.
pub async fn cancel_run(pool: &PgPool, id: uuid::Uuid) -> anyhow::Result<()> {
    if !flywheel_store::training::request_cancel(pool, id).await? {
        bail!("training run {id} is not queued or running");
    }
    println!("cancel requested for training run {id}");
    Ok(())
}

/// Merges a PEFT adapter (trained here or elsewhere) into its base and
/// registers the result as a model version with its lineage.
pub async fn import_adapter(
    cfg: &crate::Config,
    pool: &PgPool,
    dir: &str,
    base: Option<&str>,
    name: &str,
) -> anyhow::Result<flywheel_store::models::ModelVersion> {
    // An adapter in an artifact store is fetched to a scratch folder first.
    let fetched = dir
        .contains("://")
        .then(|| std::env::temp_dir().join(format!("flywheel-adapter-{}", uuid::Uuid::new_v4())));
    let (local, recorded) = match &fetched {
        Some(tmp) => {
            flywheel_modelhub::artifacts::download(dir, tmp).await?;
            (tmp.clone(), dir.to_string())
        }
        None => {
            let p = PathBuf::from(dir);
            let abs = std::path::absolute(&p).unwrap_or(p.clone());
            (p, abs.display().to_string())
        }
    };
    let result = import_local_adapter(cfg, pool, &local, &recorded, base, name).await;
    if let Some(tmp) = fetched {
        let _ = std::fs::remove_dir_all(tmp);
    }
    result
}

async fn import_local_adapter(
    cfg: &crate::Config,
    pool: &PgPool,
    dir: &std::path::Path,
    recorded: &str,
    base: Option<&str>,
    name: &str,
) -> anyhow::Result<flywheel_store::models::ModelVersion> {
    let base = match base {
        Some(b) => flywheel_store::models::by_name(pool, b)
            .await?
            .with_context(|| format!("no model version named {b}"))?,
        None => flywheel_store::models::champion(pool)
            .await?
            .context("no champion model to merge into: give --base")?,
    };
    let (adapter_dir, base_path) = (dir.to_path_buf(), PathBuf::from(&base.path));
    let path = base_path.clone();
    let lora = tokio::task::spawn_blocking(move || {
        let model = Base::load(&path)?.model;
        flywheel_trainer::peft::load(&model, &adapter_dir)
    })
    .await
    .context("loading the adapter panicked")??;
    flywheel_jobs::train::register_candidate(
        pool,
        &flywheel_modelhub::Artifacts::open(&cfg.training.artifacts)?,
        &cfg.models.cache,
        &Candidate {
            base_path: &base_path,
            lora: &lora,
            name,
            note: &format!("PEFT adapter {recorded} on {}", base.name),
            lineage: &flywheel_store::models::Lineage {
                base_version_id: Some(base.id),
                dataset_version_id: None,
                adapter_path: Some(recorded.to_string()),
                training: Some(serde_json::json!({"imported_adapter": recorded})),
            },
        },
    )
    .await
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RunsCommand {
    /// The latest training runs.
    List {
        /// One JSON object per run, a line each.
        #[arg(long)]
        json: bool,
    },
    /// One run with its per-step loss and learning rate.
    Show { id: uuid::Uuid },
    /// Stop a run at its next step.
    Cancel { id: uuid::Uuid },
}

/// `flywheel runs ...`.
pub async fn runs(pool: &PgPool, command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List { json: true } => {
            for r in flywheel_store::training::list(pool, 50).await? {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        RunsCommand::List { json: false } => list_runs(pool).await,
        RunsCommand::Show { id } => show_run(pool, id).await,
        RunsCommand::Cancel { id } => cancel_run(pool, id).await,
    }
}
