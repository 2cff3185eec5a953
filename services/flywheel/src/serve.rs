//! `flywheel serve`: the gateway on `gateway.addr`, the champion loaded in
//! the background while `/readyz` says 503.

use std::sync::Arc;

use anyhow::Context;
use flywheel_engine::{AdapterWeights, EngineHandle};
use flywheel_gateway::serving::LoadError;
use flywheel_gateway::{AppState, Loader, ServedModel};
use flywheel_modelhub::Versions;
use flywheel_store::PgPool;
use flywheel_store::models::ModelVersion;

use crate::Config;
use crate::bootstrap::{ensure_champion, versions};

/// Loads a model version into an engine of its own (on a blocking thread).
pub async fn load(cfg: &Config, pool: &PgPool, v: &ModelVersion) -> anyhow::Result<ServedModel> {
    let engine = versions(cfg, pool).engine(v).await?;
    Ok(ServedModel::on_engine(engine, v))
}

/// The gateway's way of loading versions: [`Versions`].
struct GatewayLoader(Arc<Versions>);

/// A loader for a gateway of this configuration on `pool`.
pub fn gateway_loader(cfg: &Config, pool: &PgPool) -> Arc<dyn Loader> {
    Arc::new(GatewayLoader(Arc::new(versions(cfg, pool))))
}

fn boxed(e: anyhow::Error) -> LoadError {
    format!("{e:#}").into()
}

impl Loader for GatewayLoader {
    fn engine(
        &self,
        version: ModelVersion,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<EngineHandle, LoadError>> + Send>>
    {
        let v = self.0.clone();
        Box::pin(async move { v.engine(&version).await.map_err(boxed) })
    }

    fn adapter(
        &self,
        version: ModelVersion,
        adapter_path: String,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<AdapterWeights, LoadError>> + Send>,
    > {
        let v = self.0.clone();
        Box::pin(async move { v.adapter(&version, &adapter_path).await.map_err(boxed) })
    }
}

/// The dashboard's state: its own settings, and canaries started from it
/// as the loop starts them (a tenth of the users when the loop promotes on
/// offline evidence alone).
pub fn admin_state(
    cfg: &Config,
    pool: &PgPool,
    journal: &flywheel_gateway::Journal,
) -> flywheel_admin::AdminState {
    let share = cfg.promotion.canary_share;
    let journal = journal.clone();
    let health: flywheel_admin::Health = Arc::new(move || {
        let s = journal.stats();
        vec![
            (
                "Journal",
                format!(
                    "{} waiting for Postgres, {} stored since start{}",
                    s.pending,
                    s.stored,
                    if s.full {
                        " (full: new writes are refused)"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "Set aside",
                format!(
                    "{} record(s) Postgres refused (flywheel journal dead-letters)",
                    s.dead_letters
                ),
            ),
            (
                "Flushing",
                if s.database_ok {
                    "to Postgres".to_string()
                } else {
                    "Postgres unreachable: records wait in the journal".to_string()
                },
            ),
        ]
    });
    flywheel_admin::AdminState {
        pool: pool.clone(),
        health: Some(health),
        config: flywheel_admin::AdminConfig {
            canary_share: if share > 0.0 { share } else { 0.1 },
            canary_deadline_hours: cfg.promotion.canary_deadline_hours,
            ..cfg.admin.clone()
        },
    }
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
    let app = flywheel_gateway::router(state.clone())
        .merge(flywheel_admin::router(admin_state(&cfg, &pool, &journal)))
        .merge(flywheel_admin::openapi::router(
            flywheel_gateway::openapi::part(),
        ));
    state.set_loader(gateway_loader(&cfg, &pool));
    state.spawn_key_listener();
    state.spawn_route_listener();
    let loader_state = state.clone();
    let loader_cfg = cfg.clone();
    let loader = tokio::spawn(async move {
        let v = ensure_champion(&loader_cfg, &pool).await?;
        loader_state.refresh_routes().await?;
        let served = load(&loader_cfg, &pool, &v).await?;
        loader_state.set_served(served);
        tracing::info!(model = v.name, "ready");
        anyhow::Ok(())
    });
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    let server = flywheel_gateway::serve(listener, app, cfg.gateway.http.timeouts, shutdown);
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
