//! Shared state of the gateway: the database pool, the journal every
//! acknowledged write goes through, and the model being served.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use flywheel_engine::EngineHandle;
use flywheel_store::PgPool;
use flywheel_store::keys::Principal;
use uuid::Uuid;

use crate::journal::Journal;

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
    journal: Journal,
    served: RwLock<Option<ServedModel>>,
    /// Keys seen valid, by hash: used only while Postgres cannot answer.
    principals: Mutex<HashMap<Vec<u8>, Principal>>,
    recent: Mutex<Recent>,
}

/// Owners of the completions this gateway made lately, so votes on them
/// can be checked while Postgres is away.
#[derive(Default)]
struct Recent {
    owners: HashMap<String, Uuid>,
    order: VecDeque<String>,
}

const RECENT_CAPACITY: usize = 200_000;

impl AppState {
    pub fn new(pool: PgPool, config: GatewayConfig, journal: Journal) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                config,
                journal,
                served: RwLock::new(None),
                principals: Mutex::new(HashMap::new()),
                recent: Mutex::new(Recent::default()),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    pub fn journal(&self) -> &Journal {
        &self.inner.journal
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

    pub(crate) fn remember_principal(&self, hash: Vec<u8>, p: Option<&Principal>) {
        let mut map = self
            .inner
            .principals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match p {
            Some(p) => {
                map.insert(hash, p.clone());
            }
            None => {
                map.remove(&hash);
            }
        }
    }

    pub(crate) fn cached_principal(&self, hash: &[u8]) -> Option<Principal> {
        self.inner
            .principals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
    }

    pub(crate) fn remember_completion(&self, id: &str, team: Uuid) {
        let mut r = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.owners.insert(id.to_string(), team).is_none() {
            r.order.push_back(id.to_string());
        }
        while r.order.len() > RECENT_CAPACITY {
            if let Some(old) = r.order.pop_front() {
                r.owners.remove(&old);
            }
        }
    }

    pub(crate) fn recent_owner(&self, id: &str) -> Option<Uuid> {
        let r = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.owners.get(id).copied()
    }

    pub(crate) fn forget_completions(&self, team: Uuid) {
        let mut r = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.owners.retain(|_, t| *t != team);
        let owners = std::mem::take(&mut r.owners);
        r.order.retain(|id| owners.contains_key(id));
        r.owners = owners;
    }
}
