//! Shared state of the gateway: the database pool and the model being served.

use std::sync::{Arc, RwLock};

use flywheel_engine::EngineHandle;
use flywheel_store::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest request body accepted (HTTP 413 above it).
    pub max_body_bytes: usize,
    /// `max_tokens` when a request gives none (still capped by the context).
    pub default_max_tokens: usize,
    /// Store every completion in Postgres.
    pub log_completions: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            default_max_tokens: 512,
            log_completions: true,
        }
    }
}

/// A loaded model and the registry row it came from.
#[derive(Clone)]
pub struct ServedModel {
    pub engine: EngineHandle,
    pub version_id: Uuid,
    pub name: String,
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: GatewayConfig,
    served: RwLock<Option<ServedModel>>,
}

impl AppState {
    pub fn new(pool: PgPool, config: GatewayConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                config,
                served: RwLock::new(None),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// The model being served, or `None` while it loads.
    pub fn served(&self) -> Option<ServedModel> {
        self.inner
            .served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts serving `model` (replacing any previous one).
    pub fn set_served(&self, model: ServedModel) {
        *self.inner.served.write().unwrap_or_else(|p| p.into_inner()) = Some(model);
    }
}
