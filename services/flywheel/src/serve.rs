//! `flywheel serve`: the gateway on `gateway.addr`, the champion loaded in
//! the background while `/readyz` says 503.

use anyhow::Context;
use flywheel_engine::EngineHandle;
use flywheel_gateway::{AppState, ServedModel};
use flywheel_store::PgPool;
use flywheel_store::models::ModelVersion;

use crate::Config;
use crate::bootstrap::ensure_champion;

/// Loads a model version into an engine (on a blocking thread).
pub async fn load(cfg: &Config, v: &ModelVersion) -> anyhow::Result<ServedModel> {
    let (path, name) = (v.path.clone(), v.name.clone());
    let engine_cfg = cfg.engine.clone();
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

/// Runs the gateway on `cfg.gateway.addr`: it answers at once (`/readyz` says 503)
/// while the champion is pulled and loaded in the background.
pub async fn serve(
    cfg: Config,
    pool: PgPool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&cfg.gateway.addr)
        .await
        .with_context(|| format!("binding {}", cfg.gateway.addr))?;
    let database = flywheel_store::instance::identity(&pool)
        .await
        .context("reading the database's identity")?;
    let (journal, opened) = flywheel_gateway::Journal::open(cfg.journal.clone(), database)
        .with_context(|| format!("opening the journal in {}", cfg.journal.dir.display()))?;
    if opened.replayed > 0 {
        tracing::info!(records = opened.replayed, "journal replay pending");
    }
    journal.spawn_flusher(pool.clone());
    let state = AppState::new(pool.clone(), cfg.gateway.http.clone(), journal.clone());
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
