//! Shared state of the gateway: the database pool, the journal every
//! acknowledged write goes through, and the model being served.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    /// Keys seen valid, by hash, with when Postgres last confirmed them.
    principals: Mutex<HashMap<Vec<u8>, (Principal, Instant)>>,
    /// Whether this gateway is hearing revocations (see `spawn_key_listener`).
    listening: AtomicBool,
    recent: Mutex<Recent>,
}

/// Owners of the completions this gateway made or looked up lately, so votes on them
/// can be checked while Postgres is away.
#[derive(Default)]
struct Recent {
    owners: HashMap<String, Uuid>,
    order: VecDeque<String>,
}

const RECENT_CAPACITY: usize = 200_000;

/// How long a confirmed key is used without asking Postgres again (while
/// revocations are being heard).
const KEY_TRUST: Duration = Duration::from_secs(30);

impl AppState {
    pub fn new(pool: PgPool, config: GatewayConfig, journal: Journal) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                config,
                journal,
                served: RwLock::new(None),
                principals: Mutex::new(HashMap::new()),
                listening: AtomicBool::new(false),
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
                map.insert(hash, (p.clone(), Instant::now()));
            }
            None => {
                map.remove(&hash);
            }
        }
    }

    /// A key Postgres confirmed, however long ago (for when it cannot answer).
    pub(crate) fn cached_principal(&self, hash: &[u8]) -> Option<Principal> {
        self.inner
            .principals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .map(|(p, _)| p.clone())
    }

    /// A key confirmed recently enough to skip Postgres: only while this
    /// gateway is hearing revocations, which clear the cache.
    pub(crate) fn fresh_principal(&self, hash: &[u8]) -> Option<Principal> {
        if !self.inner.listening.load(Ordering::Relaxed) {
            return None;
        }
        let map = self
            .inner
            .principals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < KEY_TRUST)
            .map(|(p, _)| p.clone())
    }

    fn forget_principals(&self) {
        self.inner
            .principals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Keeps the entries (for outages) but stops trusting them without asking.
    fn distrust_principals(&self) {
        let mut map = self
            .inner
            .principals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let old = Instant::now()
            .checked_sub(KEY_TRUST)
            .unwrap_or_else(Instant::now);
        for (_, at) in map.values_mut() {
            *at = old;
        }
    }

    /// Listens for key revocations: each one clears the key cache, so a
    /// revoked key is refused on its next request. While not listening
    /// (connection lost), every request asks Postgres.
    pub fn spawn_key_listener(&self) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                match flywheel_store::PgListener::connect_with(state.pool()).await {
                    Ok(mut listener) => {
                        if listener
                            .listen(flywheel_store::keys::REVOKED_CHANNEL)
                            .await
                            .is_ok()
                        {
                            // Revocations missed while away: forget everything.
                            state.forget_principals();
                            state.inner.listening.store(true, Ordering::Relaxed);
                            while listener.try_recv().await.is_ok_and(|n| n.is_some()) {
                                state.forget_principals();
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "key revocation listener cannot connect"),
                }
                state.inner.listening.store(false, Ordering::Relaxed);
                state.distrust_principals();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
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
