//! Model versions as they are served, for the gateway and for evaluations
//! alike: the version's file on this machine (fetched from the artifact
//! store when missing, its sha256 checked), an engine on it, and, for a
//! candidate that is a LoRA adapter on a base, the adapter's weights shaped
//! for the serving kernels.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flywheel_engine::{AdapterPair, AdapterWeights, EngineConfig, EngineHandle};
use flywheel_store::PgPool;
use flywheel_store::models::ModelVersion;

use crate::artifacts;

/// Where versions' files live and how engines are built.
#[derive(Debug, Clone)]
pub struct Versions {
    pub pool: PgPool,
    /// The model cache (files named by sha256).
    pub cache: PathBuf,
    pub engine: EngineConfig,
}

impl Versions {
    /// `v` with its file on this machine: as it is, or fetched from its
    /// source in an artifact store (a candidate trained elsewhere), checked
    /// against its sha256, its path updated. `None` when the file is missing
    /// and its source is not an artifact store.
    pub async fn ensure_local(&self, v: ModelVersion) -> anyhow::Result<Option<ModelVersion>> {
        if Path::new(&v.path).exists() {
            return Ok(Some(v));
        }
        if !(v.source.starts_with("s3://") || v.source.starts_with("file://")) {
            return Ok(None);
        }
        tracing::info!(model = v.name, source = v.source, "fetching the model file");
        std::fs::create_dir_all(&self.cache)?;
        let path = self.cache.join(format!("{}.gguf", v.sha256));
        let part = self.cache.join(format!(
            ".{}.{}.part",
            v.sha256,
            uuid::Uuid::new_v4().simple()
        ));
        artifacts::download(&v.source, &part).await?;
        let sha = crate::sha256_file(&part).await?;
        if sha != v.sha256 {
            let _ = std::fs::remove_file(&part);
            bail!(
                "{} has sha256 {sha}, but model version {} was registered as {}",
                v.source,
                v.name,
                v.sha256
            );
        }
        std::fs::rename(&part, &path)?;
        let path = path.display().to_string();
        flywheel_store::models::set_path(&self.pool, v.id, &path).await?;
        Ok(Some(ModelVersion { path, ..v }))
    }

    async fn local(&self, v: &ModelVersion) -> anyhow::Result<ModelVersion> {
        if v.is_upstream() {
            bail!(
                "model version {} is served by an upstream ({}): it has no weights here",
                v.name,
                v.source
            );
        }
        self.ensure_local(v.clone()).await?.with_context(|| {
            format!(
                "the file of model version {} is missing ({})",
                v.name, v.path
            )
        })
    }

    /// An engine on `v`'s own file (on a blocking thread). The file is
    /// hashed first: one whose contents are not the version's (corrupted
    /// on disk, or replaced) is refused, never served.
    pub async fn engine(&self, v: &ModelVersion) -> anyhow::Result<EngineHandle> {
        let v = self.local(v).await?;
        verify(&v).await?;
        let cfg = self.engine.clone();
        let engine = tokio::task::spawn_blocking(move || {
            EngineHandle::load(Path::new(&v.path), &v.name, cfg)
        })
        .await
        .context("loading the model panicked")??;
        Ok(engine)
    }

    /// The LoRA adapter of candidate `v`, stored at `adapter_path` (a folder
    /// or an artifact-store URL), in the serving kernels' layout.
    pub async fn adapter(
        &self,
        v: &ModelVersion,
        adapter_path: &str,
    ) -> anyhow::Result<AdapterWeights> {
        let dir = if adapter_path.contains("://") {
            let dir = self.cache.join("adapters").join(v.id.to_string());
            if !dir.join(flywheel_trainer::peft::WEIGHTS_FILE).exists() {
                artifacts::download(adapter_path, &dir)
                    .await
                    .with_context(|| format!("fetching the adapter {adapter_path}"))?;
            }
            dir
        } else {
            PathBuf::from(adapter_path)
        };
        // The candidate's own file has its base's shape.
        let own = self.local(v).await?;
        tokio::task::spawn_blocking(move || adapter_weights(Path::new(&own.path), &dir))
            .await
            .context("reading the adapter panicked")?
    }
}

/// Refuses `v`'s file when its sha256 is not the one `v` was registered
/// with.
pub async fn verify(v: &ModelVersion) -> anyhow::Result<()> {
    let sha = crate::sha256_file(Path::new(&v.path))
        .await
        .with_context(|| format!("reading {}", v.path))?;
    if sha != v.sha256 {
        bail!(
            "the file of model version {} ({}) has sha256 {sha}, but the version was registered \
             with {}: the file is corrupted or was replaced, so it is not loaded",
            v.name,
            v.path,
            v.sha256
        );
    }
    Ok(())
}

/// The LoRA adapter in `dir` (PEFT layout) for a model shaped like the one
/// in `gguf`, in the serving kernels' layout.
pub fn adapter_weights(gguf: &Path, dir: &Path) -> anyhow::Result<AdapterWeights> {
    let file = flywheel_model::gguf::GgufFile::open(gguf)?;
    let shape = flywheel_model::LlamaConfig::from_gguf(&file)?;
    let lora = flywheel_trainer::peft::load_for(&shape, &candle_core::Device::Cpu, dir)?;
    Ok(served_adapter(&lora)?)
}

/// A trained LoRA adapter in the serving kernels' layout.
pub fn served_adapter(lora: &flywheel_trainer::Lora) -> candle_core::Result<AdapterWeights> {
    let (scale, pairs) = lora.plain()?;
    Ok(AdapterWeights {
        scale,
        pairs: pairs
            .into_iter()
            .map(|(layer, proj, rank, a, b)| AdapterPair {
                layer,
                proj,
                rank,
                a,
                b,
            })
            .collect(),
    })
}
