//! Training with an external shell command (`FLYWHEEL_EXTERNAL_TRAINER`) on
//! the worker's machine, below serving priority: it gets the dataset as TRL
//! JSONL and must leave a PEFT adapter; a cancel kills it.

use std::time::Duration;

use anyhow::{Context, bail};

use super::backend::{
    RunContext, Trained, TrainingBackend, base_path, cancel_requested, export_data, tail,
};
use super::spec::{kind_of, run_key};

pub struct Command<'a> {
    pub template: &'a str,
}

impl TrainingBackend for Command<'_> {
    async fn train(&self, ctx: &RunContext<'_>) -> anyhow::Result<Trained> {
        let data = export_data(ctx).await?;
        let adapter = ctx.dir.join("adapter");
        let exe = std::env::current_exe()?;
        let command = self
            .template
            .replace("{train}", &data.train.display().to_string())
            .replace("{eval}", &data.eval.display().to_string())
            .replace("{spec}", &data.spec.display().to_string())
            .replace("{base}", &base_path(ctx).display().to_string())
            .replace("{out}", &adapter.display().to_string())
            .replace("{objective}", kind_of(ctx.spec.train.objective))
            .replace("{steps}", &ctx.spec.train.steps.to_string())
            .replace("{flywheel}", &exe.display().to_string());
        let log_path = ctx.dir.join("external.log");
        let log = std::fs::File::create(&log_path)?;
        tracing::info!(%command, "starting the external trainer");
        let mut child = tokio::process::Command::new("nice")
            .arg("-n")
            .arg(ctx.env.nice.clamp(0, 19).to_string())
            .arg("sh")
            .arg("-c")
            .arg(&command)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the external trainer")?;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status?,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if cancel_requested(ctx.pool, ctx.run.id).await? {
                        let _ = child.kill().await;
                        return Ok(Trained::Cancelled { steps: 0, resumed_from: None });
                    }
                }
            }
        };
        ctx.env
            .artifacts
            .put_file(&run_key(ctx.run.id, "external.log"), &log_path)
            .await?;
        if !status.success() {
            let text = tokio::fs::read_to_string(&log_path)
                .await
                .unwrap_or_default();
            bail!(
                "the external trainer exited with {status}: {}",
                tail(&text, 5)
            );
        }
        Ok(Trained::Adapter {
            dir: adapter,
            measured: None,
            resumed_from: None,
        })
    }
}
