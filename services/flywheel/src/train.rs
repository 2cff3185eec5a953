//! `flywheel train`: fine-tune a LoRA adapter on a curated dataset version,
//! starting from the champion model (or a named version), and save it in
//! PEFT layout with a record of the run. Runs in this process; the queued
//! training job, run records in Postgres, checkpoints and serving the
//! adapter come with the rest of the training issue.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use flywheel_curation::build::{DpoPair, KtoExample, SftExample};
use flywheel_engine::model::Proj;
use flywheel_store::PgPool;
use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Example, Lora, LoraConfig, Objective, TrainConfig, Trainer};

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Dataset version: id, TEAM@N or shared@N.
    #[arg(long)]
    pub dataset: String,
    /// sft, dpo or kto (default: sft if the version has SFT examples, else dpo, else kto).
    #[arg(long)]
    pub objective: Option<String>,
    /// Base model version (default: the champion).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 10)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Projections to adapt: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj"
    )]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// DPO's and KTO's beta.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Where the adapter goes (PEFT layout).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Also merge the adapter into the base (Q8_0 GGUF) and register it as
    /// a candidate model version with this name, with its lineage.
    #[arg(long)]
    pub register: Option<String>,
}

fn to_messages(m: &[flywheel_curation::build::Message]) -> Vec<Message> {
    m.iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// A stored example as a training example.
fn example(
    base: &Base,
    objective: Objective,
    stored: serde_json::Value,
    max_len: usize,
) -> anyhow::Result<Example> {
    Ok(match objective {
        Objective::Sft => {
            let e: SftExample = serde_json::from_value(stored)?;
            Example::Sft {
                prompt: base
                    .encode(&to_messages(&e.prompt), &e.completion)?
                    .truncated(max_len),
            }
        }
        Objective::Dpo => {
            let e: DpoPair = serde_json::from_value(stored)?;
            let prompt = to_messages(&e.prompt);
            Example::Dpo {
                chosen: base.encode(&prompt, &e.chosen)?.truncated(max_len),
                rejected: base.encode(&prompt, &e.rejected)?.truncated(max_len),
            }
        }
        Objective::Kto => {
            let e: KtoExample = serde_json::from_value(stored)?;
            Example::Kto {
                completion: base
                    .encode(&to_messages(&e.prompt), &e.completion)?
                    .truncated(max_len),
                desirable: e.label,
            }
        }
    })
}

pub async fn train(cfg: &crate::Config, pool: &PgPool, args: TrainArgs) -> anyhow::Result<()> {
    let version = crate::datasets::resolve(pool, &args.dataset).await?;
    let objective = match args.objective.as_deref() {
        Some("sft") => Objective::Sft,
        Some("dpo") => Objective::Dpo,
        Some("kto") => Objective::Kto,
        Some(other) => bail!("--objective must be sft, dpo or kto, not {other}"),
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
        bail!("dataset version {} has no {kind} examples", args.dataset);
    }
    let model = match &args.model {
        Some(name) => flywheel_store::models::by_name(pool, name)
            .await?
            .with_context(|| format!("no model version named {name}"))?,
        None => flywheel_store::models::champion(pool)
            .await?
            .context("no champion model: `flywheel models pull` first")?,
    };
    let targets: Vec<Proj> = args
        .targets
        .iter()
        .map(|t| {
            serde_json::from_value(serde_json::Value::String(t.clone()))
                .map_err(|_| anyhow::anyhow!("unknown target module {t}"))
        })
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "training {kind} on dataset {} (version {}, {} examples) from {}",
        version.id,
        version.version,
        rows.len(),
        model.name
    );
    let dataset_id = version.id;
    let (base_id, base_path) = (model.id, PathBuf::from(&model.path));
    let (out, register) = (args.out.clone(), args.register.clone());
    let record = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let base = Base::load(std::path::Path::new(&model.path))?;
        let (mut train_set, mut eval_set) = (Vec::new(), Vec::new());
        for (split, stored) in rows {
            let e = example(&base, objective, stored, args.max_len)?;
            if split == "eval" {
                eval_set.push(e);
            } else {
                train_set.push(e);
            }
        }
        if train_set.is_empty() {
            bail!("no training examples in the train split");
        }
        let lora = Lora::new(
            &base.model,
            LoraConfig {
                rank: args.rank,
                alpha: args.alpha,
                dropout: args.dropout,
                targets,
                seed: 0,
            },
        )?;
        let config = TrainConfig {
            objective,
            learning_rate: args.learning_rate,
            steps: args.steps,
            grad_accum: args.grad_accum,
            warmup_steps: args.warmup_steps.min(args.steps),
            max_len: args.max_len,
            beta: args.beta,
            ..Default::default()
        };
        let (n_train, n_eval) = (train_set.len(), eval_set.len());
        let mut trainer = Trainer::new(&base.model, lora, config.clone(), train_set)?;
        let eval_before = trainer.evaluate(&eval_set)?;
        eprintln!("{n_train} train / {n_eval} eval examples; eval loss before: {eval_before:.4}");
        let started = Instant::now();
        let mut log = Vec::with_capacity(args.steps);
        for _ in 0..args.steps {
            let s = trainer.train_step()?;
            eprintln!(
                "step {:>4}/{}  loss {:.4}  lr {:.2e}  grad norm {:.3}  {:.2} s",
                s.step, args.steps, s.loss, s.learning_rate, s.grad_norm, s.seconds
            );
            log.push(s);
        }
        let eval_after = trainer.evaluate(&eval_set)?;
        let seconds = started.elapsed().as_secs_f64();
        flywheel_trainer::peft::save(&trainer.lora, &base.model, &model.name, &args.out)?;
        let record = serde_json::json!({
            "dataset_version": dataset_id,
            "base_model": {"id": model.id, "name": model.name, "sha256": model.sha256},
            "objective": objective,
            "lora": trainer.lora.config,
            "train": config,
            "examples": {"train": n_train, "eval": n_eval},
            "eval_loss": {"before": eval_before, "after": eval_after},
            "seconds": seconds,
            "steps": log,
        });
        std::fs::write(
            args.out.join("flywheel_run.json"),
            serde_json::to_string_pretty(&record)?,
        )?;
        println!(
            "adapter saved to {} ({:.0} s): eval loss {eval_before:.4} -> {eval_after:.4}",
            args.out.display(),
            seconds
        );
        if args.register.is_some() {
            let note = format!("LoRA from dataset version {dataset_id} on {}", model.name);
            flywheel_trainer::merge::merge_to_gguf(
                &base_path,
                &trainer.lora,
                &args.out.join("merged.gguf"),
                &note,
            )?;
        }
        Ok(record)
    })
    .await
    .context("training panicked")??;

    if let Some(name) = register {
        let cache = flywheel_modelhub::ModelCache::new(&cfg.model_cache)?;
        let fetched = cache.import(&out.join("merged.gguf"), Some(&name)).await?;
        let v = crate::register(pool, &fetched).await?;
        std::fs::remove_file(out.join("merged.gguf"))?;
        let adapter = std::path::absolute(&out).unwrap_or(out.clone());
        flywheel_store::models::set_lineage(
            pool,
            v.id,
            &flywheel_store::models::Lineage {
                base_version_id: Some(base_id),
                dataset_version_id: Some(dataset_id),
                adapter_path: Some(adapter.display().to_string()),
                training: Some(record),
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
