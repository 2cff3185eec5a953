//! Training on a Kubernetes cluster (`FLYWHEEL_EXTERNAL_TRAINER_JOB`): the
//! run's data and the base model go to the artifact store, a Job from the
//! template is submitted with `kubectl` and followed; its containers leave
//! a PEFT adapter in the store. A worker that dies while the Job runs is
//! followed by one that picks up the same Job.

use anyhow::{Context, bail};

use super::backend::{RunContext, Trained, TrainingBackend, cancel_requested, export_data, tail};
use super::spec::{KubeJob, kind_of, run_key};

/// Runs `kubectl` with `args` (and `stdin`), returning its stdout; its
/// stderr is the error when it fails.
async fn kubectl(job: &KubeJob, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(&job.kubectl)
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
            .write_all(text.as_bytes())
            .await?;
    }
    let out = child.wait_with_output().await?;
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

pub struct Kubernetes<'a> {
    pub job: &'a KubeJob,
}

/// Trains on a Kubernetes cluster: uploads the base model if the store lacks
/// it, submits the Job (or finds the one an earlier attempt submitted),
/// follows it, and fetches the adapter it stored; a cancel deletes the Job.
impl TrainingBackend for Kubernetes<'_> {
    async fn train(&self, ctx: &RunContext<'_>) -> anyhow::Result<Trained> {
        let (job, run, base, env) = (self.job, ctx.run, ctx.base, ctx.env);
        export_data(ctx).await?;
        let base_key = format!("models/{}.gguf", base.sha256);
        if !env.artifacts.exists(&base_key).await? {
            tracing::info!(model = %base.name, "uploading the base model for the cluster");
            env.artifacts
                .put_file(&base_key, std::path::Path::new(&base.path))
                .await?;
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
            .replace(
                "{spec_url}",
                &env.artifacts.url(&run_key(run.id, "data/spec.json")),
            )
            .replace("{base_url}", &env.artifacts.url(&base_key))
            .replace("{out_url}", &env.artifacts.url(&out_key))
            .replace("{base_name}", &base.name)
            .replace("{objective}", kind_of(ctx.spec.train.objective))
            .replace("{steps}", &ctx.spec.train.steps.to_string());
        // A worker that died while the Job ran left it running: follow it
        // rather than train twice.
        if kubectl(job, &["get", "job", &name, "-o", "name"], None)
            .await
            .is_ok()
        {
            tracing::info!(job = %name, "following the Job an earlier attempt submitted");
        } else {
            env.artifacts.delete_dir(&out_key).await?;
            kubectl(job, &["apply", "-f", "-"], Some(&manifest)).await?;
            tracing::info!(job = %name, "submitted the training Job");
        }
        loop {
            if cancel_requested(ctx.pool, run.id).await? {
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
                )
                .await?;
                return Ok(Trained::Cancelled {
                    steps: 0,
                    resumed_from: None,
                });
            }
            let text = kubectl(job, &["get", "job", &name, "-o", "json"], None).await?;
            let state: serde_json::Value =
                serde_json::from_str(&text).context("kubectl get job printed no JSON")?;
            match job_state(&state["status"]) {
                JobState::Running => {}
                JobState::Succeeded => break,
                JobState::Failed(why) => {
                    let logs = kubectl(job, &["logs", &format!("job/{name}"), "--tail=20"], None)
                        .await
                        .unwrap_or_default();
                    bail!("Job {name} failed ({why}): {}", tail(&logs, 5));
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(job.poll_secs.max(1))).await;
        }
        let adapter = ctx.dir.join("adapter");
        env.artifacts
            .get_dir(&out_key, &adapter)
            .await
            .with_context(|| format!("Job {name} succeeded but left no adapter"))?;
        Ok(Trained::Adapter {
            dir: adapter,
            measured: None,
            resumed_from: None,
        })
    }
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
        let shipped = include_str!("../../../deploy/kubernetes/train-job.yaml");
        KubeJob::new(shipped.into(), "kubectl".into()).unwrap();
    }
}
