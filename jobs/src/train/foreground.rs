//! Training in the caller's process, in the foreground: `flywheel train
//! --out DIR` and `flywheel train --jsonl FILE` (the reference external
//! trainer). No run record, queue or checkpoint: progress goes to stderr,
//! the adapter (PEFT layout) and `flywheel_run.json` to the output folder.
//! The same trainer and loop (`flywheel_trainer::fit`) as a queued run's.

use std::time::Instant;

use anyhow::Context;
use flywheel_trainer::{
    Base, Control, Example, Lora, LoraConfig, Objective, Progress, StepLog, TrainConfig, Trainer,
};

/// The examples of a TRL JSONL file (`flywheel datasets export`'s).
pub fn read_jsonl(
    base: &Base,
    path: &std::path::Path,
    max_len: usize,
) -> anyhow::Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            flywheel_trainer::data::parse_line(base, l, max_len)
                .with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// The objective examples of this kind train with.
pub fn objective_of(examples: &[Example]) -> Objective {
    match examples.first() {
        Some(Example::Dpo { .. }) => Objective::Dpo,
        Some(Example::Kto { .. }) => Objective::Kto,
        _ => Objective::Sft,
    }
}

/// Prints each step as it ends and keeps the records.
struct Printer {
    steps: usize,
    log: Vec<StepLog>,
}

impl Progress for Printer {
    fn step(&mut self, _: &Trainer, s: &StepLog) -> anyhow::Result<Control> {
        eprintln!(
            "step {:>4}/{}  loss {:.4}{}{}  lr {:.2e}  grad norm {:.3}  {:.2} s",
            s.step,
            self.steps,
            s.loss,
            s.replay_loss
                .map(|r| format!("  replay {r:.4}"))
                .unwrap_or_default(),
            s.reference_kl
                .map(|k| format!("  KL {k:.4}"))
                .unwrap_or_default(),
            s.learning_rate,
            s.grad_norm,
            s.seconds
        );
        self.log.push(s.clone());
        Ok(Control::Continue)
    }
}

/// The run's replay set, with a line saying what it is and what it cost.
fn replay_set(base: &Base, config: &TrainConfig) -> anyhow::Result<Vec<flywheel_trainer::Encoded>> {
    let started = Instant::now();
    let set = base.replay_set(config)?;
    if set.is_empty() {
        return Ok(set);
    }
    eprintln!(
        "replay: the starting model's answers to {} general prompts, one per step: SFT weight {}, reference KL weight {} ({:.1} s)",
        set.len(),
        config.replay_weight,
        config.reference_kl,
        started.elapsed().as_secs_f64()
    );
    Ok(set)
}

/// Trains, prints progress, saves the adapter and `flywheel_run.json` in
/// `out`; returns the trained adapter and the run record.
#[allow(clippy::too_many_arguments)]
pub fn train(
    base: &Base,
    train_set: Vec<Example>,
    eval_set: Vec<Example>,
    lora_config: LoraConfig,
    config: TrainConfig,
    out: &std::path::Path,
    base_name: &str,
    source: serde_json::Value,
) -> anyhow::Result<(Lora, serde_json::Value)> {
    let lora = Lora::new(&base.model, lora_config)?;
    let (n_train, n_eval) = (train_set.len(), eval_set.len());
    let config = config.for_examples(n_train);
    let steps = config.steps;
    let replay = replay_set(base, &config)?;
    let mut trainer =
        Trainer::new(&base.model, lora, config.clone(), train_set)?.with_replay(replay);
    let eval_before = trainer.evaluate(&eval_set)?;
    let per = config.grad_accum;
    match n_eval {
        0 => eprintln!("{n_train} train / 0 eval examples; {steps} steps of {per}"),
        _ => eprintln!(
            "{n_train} train / {n_eval} eval examples; {steps} steps of {per}; eval loss before: {eval_before:.4}"
        ),
    }
    let started = Instant::now();
    let mut printer = Printer {
        steps,
        log: Vec::with_capacity(steps),
    };
    flywheel_trainer::fit(&mut trainer, &mut printer)?;
    let log = printer.log;
    let eval_after = trainer.evaluate(&eval_set)?;
    let seconds = started.elapsed().as_secs_f64();
    let peft_base = base.peft_base_name(base_name);
    flywheel_trainer::peft::save(&trainer.lora, &base.model, &peft_base, out)?;
    let record = serde_json::json!({
        "source": source,
        "base_model": peft_base,
        "objective": config.objective,
        "lora": trainer.lora.config,
        "train": config,
        "examples": {"train": n_train, "eval": n_eval},
        "eval_loss": {"before": eval_before, "after": eval_after},
        "seconds": seconds,
        "steps": log,
    });
    std::fs::write(
        out.join("flywheel_run.json"),
        serde_json::to_string_pretty(&record)?,
    )?;
    let eval = match n_eval {
        0 => "no eval examples to measure a held-out loss on".to_string(),
        _ => format!("eval loss {eval_before:.4} -> {eval_after:.4}"),
    };
    println!(
        "adapter saved to {} ({seconds:.0} s): {eval}",
        out.display()
    );
    let mut lora = trainer.lora;
    lora.training = false;
    Ok((lora, record))
}
