//! The training job: fine-tune a LoRA adapter on a dataset version, as a
//! recorded run. Every step's loss and learning rate goes to
//! `training_steps`; every `checkpoint_every` steps the adapter is saved and
//! the run remembers it, so a worker killed mid-run is followed by one that
//! resumes there; a cancel request stops the run at its next step. At the
//! end the adapter is merged into the base, registered as a candidate model
//! version with its lineage, and the run records its held-out loss.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flywheel_curation::build::{DpoPair, KtoExample, SftExample};
use flywheel_store::PgPool;
use flywheel_store::models::{Lineage, ModelVersion};
use flywheel_store::training::{self, TrainingRun};
use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Example, Lora, LoraConfig, Objective, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::artifacts::{self, Artifacts};
use crate::queue;

/// The queue's payload: which run to (continue to) train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    pub run_id: Uuid,
}

/// What a run trains with; stored as the run's `config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub lora: LoraConfig,
    pub train: TrainConfig,
    /// Train with the configured external command instead of in-process.
    #[serde(default)]
    pub external: bool,
}

/// Where runs keep their files, and the knobs a worker sets.
#[derive(Debug, Clone)]
pub struct TrainEnv {
    /// Checkpoints, adapters, exported datasets and logs, under
    /// `runs/<run id>/` in this store (local folder or S3).
    pub artifacts: Artifacts,
    /// Local scratch space for the files a run works on.
    pub work_dir: PathBuf,
    /// Where merged candidate models are stored (the model cache).
    pub model_cache: PathBuf,
    pub checkpoint_every: usize,
    /// Niceness of the training thread (and of the external command's
    /// process), so serving on the same machine keeps the CPU.
    pub nice: i32,
    /// Where `--external` runs train.
    pub external: Option<External>,
    /// Test knob: fail a fresh (not resumed) attempt after this many steps,
    /// as a crash would.
    pub crash_after: Option<usize>,
}

/// An external trainer: it receives the exported dataset and must return a
/// PEFT adapter; Flywheel keeps the record, the evaluation and the candidate.
#[derive(Debug, Clone)]
pub enum External {
    /// `FLYWHEEL_EXTERNAL_TRAINER`: a shell command run on the worker's
    /// machine with `{train}`, `{eval}` (TRL JSONL files), `{base}` (the base
    /// GGUF), `{out}` (where it must leave a PEFT adapter), `{objective}`,
    /// `{steps}` and `{flywheel}` (this program) filled in.
    Command(String),
    /// `FLYWHEEL_EXTERNAL_TRAINER_JOB`: a Kubernetes Job manifest (YAML or
    /// JSON) submitted with `kubectl`. Its containers reach the data through
    /// the artifact store: `{train_url}`, `{eval_url}`, `{base_url}` (the
    /// base GGUF, uploaded once per model) to read, `{out_url}` to leave the
    /// adapter under; also `{job}` (the Job's name, which the manifest must
    /// use), `{run}`, `{base_name}`, `{objective}`, `{steps}`.
    KubernetesJob(KubeJob),
}

#[derive(Debug, Clone)]
pub struct KubeJob {
    /// The manifest's text, placeholders unfilled.
    pub template: String,
    /// The kubectl program (`FLYWHEEL_KUBECTL`, default `kubectl`); it
    /// brings the cluster's address and credentials (kubeconfig).
    pub kubectl: String,
    /// Seconds between status polls.
    pub poll_secs: u64,
}

/// What a Job template may ask for.
pub const JOB_PLACEHOLDERS: [&str; 9] = [
    "job",
    "run",
    "train_url",
    "eval_url",
    "base_url",
    "out_url",
    "base_name",
    "objective",
    "steps",
];

impl KubeJob {
    /// Checks the template before any run needs it: it names the Job
    /// `{job}` and asks for nothing unknown (a misspelt placeholder would
    /// otherwise reach the cluster as text). `${VAR}` is left to the shell.
    pub fn new(template: String, kubectl: String) -> anyhow::Result<Self> {
        if !template.contains("{job}") {
            bail!("the Job template must name its Job {{job}}");
        }
        let mut rest = template.as_str();
        let mut unknown = Vec::new();
        while let Some(open) = rest.find('{') {
            let shell = rest[..open].ends_with('$');
            rest = &rest[open + 1..];
            let Some(close) = rest.find('}') else { break };
            let word = &rest[..close];
            let is_name =
                !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if is_name && !shell && !JOB_PLACEHOLDERS.contains(&word) {
                unknown.push(format!("{{{word}}}"));
            }
        }
        if !unknown.is_empty() {
            bail!(
                "the Job template asks for {}; known: {}",
                unknown.join(", "),
                JOB_PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ")
            );
        }
        Ok(Self {
            template,
            kubectl,
            poll_secs: 5,
        })
    }
}

/// How a run ended (for the job's result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    pub status: String,
    pub resumed_from: Option<i32>,
    pub steps: i32,
    pub candidate: Option<String>,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
}

fn kind_of(objective: Objective) -> &'static str {
    match objective {
        Objective::Sft => "sft",
        Objective::Dpo => "dpo",
        Objective::Kto => "kto",
    }
}

/// Creates a queued run and its job in one transaction.
pub async fn create_run(
    pool: &PgPool,
    dataset_version_id: Uuid,
    base_version_id: Uuid,
    spec: &RunSpec,
    max_attempts: u32,
) -> anyhow::Result<(Uuid, String)> {
    let mut tx = pool.begin().await?;
    let run_id = training::create(
        &mut *tx,
        dataset_version_id,
        base_version_id,
        kind_of(spec.train.objective),
        &serde_json::to_value(spec)?,
        spec.train.steps as i32,
    )
    .await?;
    let task = queue::push(&mut tx, queue::TRAINING, &TrainJob { run_id }, max_attempts).await?;
    tx.commit().await?;
    Ok((run_id, task))
}

fn to_messages(m: &[flywheel_curation::build::Message]) -> Vec<Message> {
    m.iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// A stored dataset example as a training example.
pub fn example(
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

/// Loads a dataset version's examples for an objective, split into
/// (train, eval).
pub fn load_examples(
    base: &Base,
    objective: Objective,
    rows: Vec<(String, serde_json::Value)>,
    max_len: usize,
) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (split, stored) in rows {
        let e = example(base, objective, stored, max_len)?;
        if split == "eval" {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    if train.is_empty() {
        bail!("no training examples in the train split");
    }
    Ok((train, eval))
}

/// The run's scratch folder on this machine.
fn work_dir(env: &TrainEnv, run: Uuid) -> PathBuf {
    env.work_dir.join("runs").join(run.to_string())
}

/// The run's keys in the artifact store.
fn run_key(run: Uuid, what: &str) -> String {
    format!("runs/{run}/{what}")
}

/// Trains (or resumes) one run to its end. The step function the worker
/// calls; public so tests can run it directly.
#[tracing::instrument(skip_all, err, fields(run = %run_id))]
pub async fn run(pool: &PgPool, env: &TrainEnv, run_id: Uuid) -> anyhow::Result<RunOutcome> {
    let run = training::get(pool, run_id)
        .await?
        .with_context(|| format!("training run {run_id} does not exist"))?;
    if matches!(run.status.as_str(), "succeeded" | "cancelled") {
        return Ok(outcome(&run, None));
    }
    if run.cancel_requested {
        training::finish(pool, run_id, "cancelled", None, None, None).await?;
        return Ok(RunOutcome {
            status: "cancelled".into(),
            ..outcome(&run, None)
        });
    }
    training::start(pool, run_id).await?;
    let spec: RunSpec = serde_json::from_value(run.config.clone())?;
    let objective = spec.train.objective;
    let rows =
        flywheel_store::datasets::examples(pool, run.dataset_version_id, kind_of(objective), None)
            .await?;
    let base = flywheel_store::models::get(pool, run.base_version_id)
        .await?
        .context("the run's base model version is gone")?;
    let handle = tokio::runtime::Handle::current();
    let (pool2, env2, run2) = (pool.clone(), env.clone(), run.clone());
    // A thread of its own, so its lowered priority stays with training.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let nice = env.nice;
    std::thread::Builder::new()
        .name(format!("train-{}", &run_id.simple().to_string()[..8]))
        .spawn(move || {
            flywheel_trainer::lower_thread_priority(nice);
            let result = if spec.external {
                external_blocking(&handle, &pool2, &env2, &run2, &spec, rows, &base)
            } else {
                train_blocking(&handle, &pool2, &env2, &run2, &spec, rows, &base)
            };
            let _ = tx.send(result);
        })?;
    let result = rx.await.context("the training thread panicked")?;
    match result {
        Ok(o) => Ok(o),
        Err(e) => {
            training::finish(pool, run_id, "failed", None, None, Some(&format!("{e:#}"))).await?;
            Err(e)
        }
    }
}

fn outcome(run: &TrainingRun, resumed_from: Option<i32>) -> RunOutcome {
    RunOutcome {
        status: run.status.clone(),
        resumed_from,
        steps: run.step,
        candidate: run.candidate_version_id.map(|c| c.to_string()),
        eval_loss_before: run.eval_loss_before,
        eval_loss_after: run.eval_loss_after,
    }
}

fn train_blocking(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    spec: &RunSpec,
    rows: Vec<(String, serde_json::Value)>,
    base_row: &ModelVersion,
) -> anyhow::Result<RunOutcome> {
    let base = Base::load(Path::new(&base_row.path))?;
    let (train_set, eval_set) =
        load_examples(&base, spec.train.objective, rows, spec.train.max_len)?;
    let dir = work_dir(env, run.id);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (mut trainer, resumed_from) = match (run.checkpoint_step, &run.checkpoint_path) {
        (Some(step), Some(url)) => {
            // The checkpoint may have been written on another machine.
            let local = dir.join("resume");
            rt.block_on(artifacts::download(url, &local))
                .with_context(|| format!("fetching checkpoint {url}"))?;
            tracing::info!(step, %url, "resuming from checkpoint");
            let t = Trainer::resume(
                &base.model,
                &local,
                step as usize,
                spec.train.clone(),
                train_set,
            )?;
            (t, Some(step))
        }
        _ => {
            let lora = Lora::new(&base.model, spec.lora.clone())?;
            let t = Trainer::new(&base.model, lora, spec.train.clone(), train_set)?;
            (t, None)
        }
    };
    if run.eval_loss_before.is_none() && resumed_from.is_none() {
        let before = trainer.evaluate(&eval_set)?;
        rt.block_on(training::set_eval_before(pool, run.id, before))?;
    }
    let base_name = &base_row.name;
    let total = spec.train.steps;
    let every = env.checkpoint_every.max(1);
    let mut previous = run.checkpoint_step;
    while trainer.step < total {
        let s = trainer.train_step()?;
        let cancel = rt.block_on(training::record_step(
            pool,
            run.id,
            s.step as i32,
            s.loss,
            s.learning_rate,
            s.grad_norm,
            s.tokens as i32,
            s.seconds,
        ))?;
        if cancel {
            let mut o = cancelled(rt, pool, run, s.step as i32)?;
            o.resumed_from = resumed_from;
            return Ok(o);
        }
        if s.step % every == 0 && s.step < total {
            // Each checkpoint has its own key; the run's row names the
            // newest only once it is stored whole, so a crash mid-upload
            // leaves the previous one in force.
            let local = dir.join(format!("checkpoint-{}", s.step));
            trainer.save_checkpoint(base_name, &local)?;
            let key = run_key(run.id, &format!("checkpoints/{}", s.step));
            rt.block_on(env.artifacts.put_dir(&key, &local))?;
            rt.block_on(training::checkpoint(
                pool,
                run.id,
                s.step as i32,
                &env.artifacts.url(&key),
            ))?;
            std::fs::remove_dir_all(&local)?;
            if let Some(old) = previous.replace(s.step as i32) {
                let old = run_key(run.id, &format!("checkpoints/{old}"));
                if let Err(e) = rt.block_on(env.artifacts.delete_dir(&old)) {
                    tracing::warn!(error = %format!("{e:#}"), "could not delete an old checkpoint");
                }
            }
        }
        if env.crash_after == Some(s.step) && resumed_from.is_none() {
            bail!("simulated crash after step {}", s.step);
        }
    }
    let after = trainer.evaluate(&eval_set)?;
    let adapter = dir.join("adapter");
    flywheel_trainer::peft::save(&trainer.lora, &base.model, base_name, &adapter)?;
    let mut o = conclude(rt, pool, env, run, &trainer.lora, base_row, &adapter, after)?;
    o.resumed_from = resumed_from;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(o)
}

/// Closes a run whose cancel was requested, after `steps` steps.
fn cancelled(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    run: &TrainingRun,
    steps: i32,
) -> anyhow::Result<RunOutcome> {
    rt.block_on(training::finish(
        pool,
        run.id,
        "cancelled",
        None,
        None,
        None,
    ))?;
    Ok(RunOutcome {
        status: "cancelled".into(),
        resumed_from: None,
        steps,
        candidate: None,
        eval_loss_before: run.eval_loss_before,
        eval_loss_after: None,
    })
}

/// Merges the finished adapter, registers the candidate and closes the run.
#[allow(clippy::too_many_arguments)]
fn conclude(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    lora: &Lora,
    base_row: &ModelVersion,
    adapter: &Path,
    eval_after: f64,
) -> anyhow::Result<RunOutcome> {
    let note = format!(
        "LoRA from dataset version {} on {} (run {})",
        run.dataset_version_id, base_row.name, run.id
    );
    let name = format!("{}-ft-{}", base_row.name, &run.id.simple().to_string()[..8]);
    let key = run_key(run.id, "adapter");
    rt.block_on(env.artifacts.put_dir(&key, adapter))?;
    let lineage = Lineage {
        base_version_id: Some(base_row.id),
        dataset_version_id: Some(run.dataset_version_id),
        adapter_path: Some(env.artifacts.url(&key)),
        training: Some(serde_json::json!({"run": run.id})),
    };
    let candidate = rt
        .block_on(register_candidate(
            pool,
            &env.artifacts,
            &env.model_cache,
            Path::new(&base_row.path),
            lora,
            &name,
            &note,
            &lineage,
        ))?
        .id;
    let before = rt
        .block_on(training::get(pool, run.id))?
        .and_then(|r| r.eval_loss_before);
    rt.block_on(training::finish(
        pool,
        run.id,
        "succeeded",
        Some(candidate),
        Some(eval_after),
        None,
    ))?;
    Ok(RunOutcome {
        status: "succeeded".into(),
        resumed_from: None,
        steps: run.total_steps,
        candidate: Some(name),
        eval_loss_before: before,
        eval_loss_after: Some(eval_after),
    })
}

/// Mean loss of `lora` (or the base, with a fresh adapter) on `eval`.
fn eval_loss(base: &Base, lora: Lora, spec: &RunSpec, eval: &[Example]) -> anyhow::Result<f64> {
    if eval.is_empty() {
        return Ok(0.0);
    }
    let mut t = Trainer::new(&base.model, lora, spec.train.clone(), eval.to_vec())?;
    t.evaluate(eval)
}

/// A run trained outside this process: the dataset goes out as TRL JSONL
/// (kept in the artifact store), a PEFT adapter comes back, and Flywheel
/// keeps the record, the held-out loss and the candidate.
#[allow(clippy::too_many_arguments)]
fn external_blocking(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    spec: &RunSpec,
    rows: Vec<(String, serde_json::Value)>,
    base_row: &ModelVersion,
) -> anyhow::Result<RunOutcome> {
    let base_path = Path::new(&base_row.path);
    use flywheel_curation::export::Format;
    let external = env.external.as_ref().context(
        "this run wants an external trainer, but neither FLYWHEEL_EXTERNAL_TRAINER nor \
         FLYWHEEL_EXTERNAL_TRAINER_JOB is set",
    )?;
    let dir = work_dir(env, run.id);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let format = match spec.train.objective {
        Objective::Sft => Format::TrlSft,
        Objective::Dpo => Format::TrlDpo,
        Objective::Kto => Format::TrlKto,
    };
    let (train_file, eval_file) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    let (mut train_text, mut eval_text) = (String::new(), String::new());
    for (split, stored) in &rows {
        let line = serde_json::to_string(&format.line(stored.clone())?)? + "\n";
        if split == "eval" {
            eval_text.push_str(&line);
        } else {
            train_text.push_str(&line);
        }
    }
    std::fs::write(&train_file, train_text)?;
    std::fs::write(&eval_file, eval_text)?;
    for (file, name) in [(&train_file, "train.jsonl"), (&eval_file, "eval.jsonl")] {
        rt.block_on(
            env.artifacts
                .put_file(&run_key(run.id, &format!("data/{name}")), file),
        )?;
    }
    let adapter = dir.join("adapter");
    let finished = match external {
        External::Command(template) => run_command(
            rt,
            pool,
            env,
            run,
            spec,
            template,
            (&train_file, &eval_file),
            base_path,
            &adapter,
        )?,
        External::KubernetesJob(job) => {
            run_kube_job(rt, pool, env, run, spec, job, base_row, &adapter)?
        }
    };
    if !finished {
        return cancelled(rt, pool, run, 0);
    }
    // What came back must be a LoRA adapter for this base.
    let base = Base::load(base_path)?;
    let lora = flywheel_trainer::peft::load(&base.model, &adapter)
        .context("the external trainer did not leave a usable PEFT adapter")?;
    let (_, eval_set) = load_examples(&base, spec.train.objective, rows, spec.train.max_len)?;
    let before = eval_loss(
        &base,
        Lora::new(&base.model, spec.lora.clone())?,
        spec,
        &eval_set,
    )?;
    rt.block_on(training::set_eval_before(pool, run.id, before))?;
    let after = eval_loss(&base, lora.clone(), spec, &eval_set)?;
    rt.block_on(training::record_step(
        pool,
        run.id,
        run.total_steps,
        after,
        0.0,
        0.0,
        0,
        0.0,
    ))?;
    let o = conclude(rt, pool, env, run, &lora, base_row, &adapter, after)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(o)
}

fn cancel_requested(rt: &tokio::runtime::Handle, pool: &PgPool, run: Uuid) -> anyhow::Result<bool> {
    Ok(rt
        .block_on(training::get(pool, run))?
        .is_some_and(|r| r.cancel_requested))
}

/// The last `n` lines of `text`, joined with " | ".
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Runs the external command to its end; false when the run was cancelled
/// meanwhile (the command is killed).
#[allow(clippy::too_many_arguments)]
fn run_command(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    spec: &RunSpec,
    template: &str,
    (train_file, eval_file): (&Path, &Path),
    base_path: &Path,
    adapter: &Path,
) -> anyhow::Result<bool> {
    let exe = std::env::current_exe()?;
    let command = template
        .replace("{train}", &train_file.display().to_string())
        .replace("{eval}", &eval_file.display().to_string())
        .replace("{base}", &base_path.display().to_string())
        .replace("{out}", &adapter.display().to_string())
        .replace("{objective}", kind_of(spec.train.objective))
        .replace("{steps}", &spec.train.steps.to_string())
        .replace("{flywheel}", &exe.display().to_string());
    let log_path = work_dir(env, run.id).join("external.log");
    let log = std::fs::File::create(&log_path)?;
    tracing::info!(%command, "starting the external trainer");
    let mut child = std::process::Command::new("nice")
        .arg("-n")
        .arg(env.nice.clamp(0, 19).to_string())
        .arg("sh")
        .arg("-c")
        .arg(&command)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the external trainer")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if cancel_requested(rt, pool, run.id)? {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    rt.block_on(
        env.artifacts
            .put_file(&run_key(run.id, "external.log"), &log_path),
    )?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!(
            "the external trainer exited with {status}: {}",
            tail(&text, 5)
        );
    }
    Ok(true)
}

/// Runs `kubectl` with `args` (and `stdin`), returning its stdout; its
/// stderr is the error when it fails.
fn kubectl(job: &KubeJob, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(&job.kubectl)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", job.kubectl))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("kubectl's stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 3)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a Job's status says.
#[derive(Debug, PartialEq)]
enum JobState {
    Running,
    Succeeded,
    Failed(String),
}

fn job_state(status: &serde_json::Value) -> JobState {
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    let holds = |kind: &str| {
        conditions
            .iter()
            .find(|c| c["type"] == kind && c["status"] == "True")
    };
    if let Some(c) = holds("Failed") {
        let why = [&c["reason"], &c["message"]]
            .iter()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(": ");
        JobState::Failed(why)
    } else if holds("Complete").is_some() || status["succeeded"].as_i64().unwrap_or(0) > 0 {
        JobState::Succeeded
    } else {
        JobState::Running
    }
}

/// Trains on a Kubernetes cluster: uploads the base model if the store lacks
/// it, submits the Job (or finds the one an earlier attempt submitted),
/// follows it, and fetches the adapter it stored. False when the run was
/// cancelled meanwhile (the Job is deleted).
#[allow(clippy::too_many_arguments)]
fn run_kube_job(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    spec: &RunSpec,
    job: &KubeJob,
    base: &ModelVersion,
    adapter: &Path,
) -> anyhow::Result<bool> {
    let base_key = format!("models/{}.gguf", base.sha256);
    if !rt.block_on(env.artifacts.exists(&base_key))? {
        tracing::info!(model = %base.name, "uploading the base model for the cluster");
        rt.block_on(env.artifacts.put_file(&base_key, Path::new(&base.path)))?;
    }
    let name = format!("flywheel-train-{}", &run.id.simple().to_string()[..12]);
    let out_key = run_key(run.id, "returned");
    let manifest = job
        .template
        .replace("{job}", &name)
        .replace("{run}", &run.id.to_string())
        .replace(
            "{train_url}",
            &env.artifacts.url(&run_key(run.id, "data/train.jsonl")),
        )
        .replace(
            "{eval_url}",
            &env.artifacts.url(&run_key(run.id, "data/eval.jsonl")),
        )
        .replace("{base_url}", &env.artifacts.url(&base_key))
        .replace("{out_url}", &env.artifacts.url(&out_key))
        .replace("{base_name}", &base.name)
        .replace("{objective}", kind_of(spec.train.objective))
        .replace("{steps}", &spec.train.steps.to_string());
    // A worker that died while the Job ran left it running: follow it
    // rather than train twice.
    if kubectl(job, &["get", "job", &name, "-o", "name"], None).is_ok() {
        tracing::info!(job = %name, "following the Job an earlier attempt submitted");
    } else {
        rt.block_on(env.artifacts.delete_dir(&out_key))?;
        kubectl(job, &["apply", "-f", "-"], Some(&manifest))?;
        tracing::info!(job = %name, "submitted the training Job");
    }
    loop {
        if cancel_requested(rt, pool, run.id)? {
            kubectl(
                job,
                &[
                    "delete",
                    "job",
                    &name,
                    "--wait=false",
                    "--cascade=background",
                ],
                None,
            )?;
            return Ok(false);
        }
        let text = kubectl(job, &["get", "job", &name, "-o", "json"], None)?;
        let state: serde_json::Value =
            serde_json::from_str(&text).context("kubectl get job printed no JSON")?;
        match job_state(&state["status"]) {
            JobState::Running => {}
            JobState::Succeeded => break,
            JobState::Failed(why) => {
                let logs = kubectl(job, &["logs", &format!("job/{name}"), "--tail=20"], None)
                    .unwrap_or_default();
                bail!("Job {name} failed ({why}): {}", tail(&logs, 5));
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(job.poll_secs.max(1)));
    }
    rt.block_on(env.artifacts.get_dir(&out_key, adapter))
        .with_context(|| format!("Job {name} succeeded but left no adapter"))?;
    Ok(true)
}

/// Merges `lora` into the base GGUF (Q8_0 where adapted), keeps the result
/// in the model cache and in the artifact store (`models/<sha256>.gguf`, the
/// version's source, so a gateway on another machine can fetch it) and
/// registers it as model version `name` with its lineage. Every way a
/// candidate appears (a run, `train --register`, `models import-adapter`)
/// goes through here.
#[allow(clippy::too_many_arguments)]
pub async fn register_candidate(
    pool: &PgPool,
    artifacts: &Artifacts,
    model_cache: &Path,
    base_path: &Path,
    lora: &Lora,
    name: &str,
    note: &str,
    lineage: &Lineage,
) -> anyhow::Result<ModelVersion> {
    let tmp = std::env::temp_dir().join(format!("flywheel-merge-{}.gguf", Uuid::new_v4()));
    let (base, adapter, out, note) = (
        base_path.to_path_buf(),
        lora.clone(),
        tmp.clone(),
        note.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        flywheel_trainer::merge::merge_to_gguf(&base, &adapter, &out, &note)
    })
    .await
    .context("merging panicked")??;
    let cache = flywheel_modelhub::ModelCache::new(model_cache)?;
    let fetched = cache.import(&tmp, Some(name)).await;
    let _ = std::fs::remove_file(&tmp);
    let fetched = fetched?;
    let key = format!("models/{}.gguf", fetched.sha256);
    if !artifacts.exists(&key).await? {
        artifacts.put_file(&key, &fetched.path).await?;
    }
    let v = flywheel_store::models::register(
        pool,
        &flywheel_store::models::NewModelVersion {
            name: fetched.name.clone(),
            source: artifacts.url(&key),
            sha256: fetched.sha256.clone(),
            format: fetched.format.clone(),
            path: fetched.path.display().to_string(),
            size_bytes: fetched.size_bytes as i64,
        },
    )
    .await?;
    flywheel_store::models::set_lineage(pool, v.id, lineage).await?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_status_reads_as_kubernetes_reports_it() {
        assert_eq!(job_state(&json!({})), JobState::Running);
        assert_eq!(job_state(&json!({"active": 1})), JobState::Running);
        assert_eq!(
            job_state(
                &json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            ),
            JobState::Succeeded
        );
        // A condition that no longer holds decides nothing.
        assert_eq!(
            job_state(&json!({"conditions": [{"type": "Failed", "status": "False"}]})),
            JobState::Running
        );
        assert_eq!(
            job_state(&json!({"failed": 1, "conditions": [{
                "type": "Failed", "status": "True",
                "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"
            }]})),
            JobState::Failed(
                "DeadlineExceeded: Job was active longer than specified deadline".into()
            )
        );
    }

    #[test]
    fn job_templates_are_checked_up_front() {
        let ok = KubeJob::new(
            r#"{"metadata": {"name": "{job}"}, "args": ["get {train_url} ${HOME}/x"]}"#.into(),
            "kubectl".into(),
        );
        assert!(ok.is_ok(), "{ok:?}");
        let typo = KubeJob::new("name: {job}\nurl: {trian_url}".into(), "kubectl".into());
        assert!(format!("{:#}", typo.unwrap_err()).contains("{trian_url}"));
        let nameless = KubeJob::new("name: fixed".into(), "kubectl".into());
        assert!(nameless.is_err());
        // The template shipped in deploy/ passes.
        let shipped = include_str!("../../deploy/kubernetes/train-job.yaml");
        KubeJob::new(shipped.into(), "kubectl".into()).unwrap();
    }

    #[test]
    fn tail_keeps_the_last_lines_in_order() {
        assert_eq!(tail("a\nb\nc\nd", 2), "c | d");
        assert_eq!(tail("", 3), "");
    }
}
