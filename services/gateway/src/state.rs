//! Shared state of the gateway: the database pool, the journal every
//! acknowledged write goes through, the routes and the loaded models.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use flywheel_store::PgPool;
use flywheel_store::keys::Principal;
use uuid::Uuid;

use crate::AppError;
use crate::journal::Journal;
use crate::serving::{
    Backend, Loader, ModelPool, Resolved, RouteKind, RouteTable, ServedModel, Unresolved,
};
use flywheel_store::models::ModelVersion;
use flywheel_store::upstreams::Upstream;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest request body accepted (HTTP 413 above it).
    pub max_body_bytes: usize,
    /// `max_tokens` when a request gives none (still capped by the context).
    pub default_max_tokens: usize,
    /// Store every completion in Postgres.
    pub log_completions: bool,
    /// Base engines kept loaded at once (versions that are adapters on a
    /// loaded base cost no engine).
    pub max_loaded_models: usize,
    /// How often the routes are read again when no notification came.
    pub route_refresh: Duration,
    /// Retries and the circuit breaker of upstream versions.
    pub upstream: flywheel_upstream::Settings,
    /// How long the server waits on a client.
    pub timeouts: crate::Timeouts,
    /// Most choices (`n`) one chat request may ask for.
    pub max_choices: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            default_max_tokens: 512,
            log_completions: true,
            max_loaded_models: 4,
            route_refresh: Duration::from_secs(5),
            upstream: flywheel_upstream::Settings::default(),
            timeouts: crate::Timeouts::default(),
            max_choices: 8,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: GatewayConfig,
    journal: Journal,
    routes: RwLock<Arc<RouteTable>>,
    models: ModelPool,
    loader: RwLock<Option<Arc<dyn Loader>>>,
    /// The first model this gateway loaded (before routes are known).
    first: RwLock<Option<ServedModel>>,
    /// Keys seen valid, by hash, with when Postgres last confirmed them.
    principals: Mutex<HashMap<Vec<u8>, (Principal, Instant)>>,
    /// Whether this gateway is hearing revocations (see `spawn_key_listener`).
    listening: AtomicBool,
    recent: Mutex<Recent>,
    /// A client per upstream version, kept while its settings are the same
    /// (so its circuit breaker sees every request to it).
    upstreams: Mutex<HashMap<Uuid, (Upstream, Arc<flywheel_upstream::Client>)>>,
    /// What each team's use of each upstream version cost, by (version, team) name.
    upstream_use: Mutex<std::collections::BTreeMap<(String, String), UpstreamUse>>,
    /// Each team's rate-limit buckets in this process.
    limiter: crate::limits::Limiter,
    meters: crate::meters::Meters,
    /// Versions whose last load failed, and when.
    failed_loads: Mutex<HashMap<Uuid, Instant>>,
    /// The version that last answered each team's champion route here.
    last_champion: Mutex<HashMap<Uuid, Uuid>>,
}

/// Requests and tokens one team sent one upstream version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamUse {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Owners of the completions this gateway made or looked up lately, so votes on them
/// can be checked while Postgres is away.
#[derive(Default)]
struct Recent {
    owners: HashMap<String, flywheel_store::completions::Owner>,
    order: VecDeque<String>,
}

const RECENT_CAPACITY: usize = 200_000;

/// How long a confirmed key is used without asking Postgres again (while
/// revocations are being heard).
const KEY_TRUST: Duration = Duration::from_secs(30);

/// How long a version whose load failed is left alone before it is tried again.
const FAILED_LOAD_PAUSE: Duration = Duration::from_secs(30);

/// The gateway's loader, refusing at once a version whose load failed
/// lately and noting each failure: requests that waited on a load that
/// failed do not each load (and hash) the file again.
struct Remembering {
    inner: Arc<dyn Loader>,
    state: AppState,
}

impl Remembering {
    fn guarded<T: Send + 'static>(
        &self,
        version: &ModelVersion,
        load: crate::serving::BoxFuture<T>,
    ) -> crate::serving::BoxFuture<T> {
        let (state, id, name) = (self.state.clone(), version.id, version.name.clone());
        Box::pin(async move {
            if state.failed_lately(id) {
                return Err(format!("loading {name} failed moments ago").into());
            }
            load.await.inspect_err(|_| {
                state.lock_failed().insert(id, Instant::now());
            })
        })
    }
}

impl Loader for Remembering {
    fn engine(
        &self,
        version: ModelVersion,
    ) -> crate::serving::BoxFuture<flywheel_engine::EngineHandle> {
        let load = self.inner.engine(version.clone());
        self.guarded(&version, load)
    }

    fn adapter(
        &self,
        version: ModelVersion,
        adapter_path: String,
    ) -> crate::serving::BoxFuture<flywheel_engine::AdapterWeights> {
        let load = self.inner.adapter(version.clone(), adapter_path);
        self.guarded(&version, load)
    }
}

impl AppState {
    pub fn new(pool: PgPool, config: GatewayConfig, journal: Journal) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                config: config.clone(),
                journal,
                routes: RwLock::new(Arc::new(RouteTable::default())),
                models: ModelPool::new(config.max_loaded_models),
                loader: RwLock::new(None),
                first: RwLock::new(None),
                principals: Mutex::new(HashMap::new()),
                listening: AtomicBool::new(false),
                recent: Mutex::new(Recent::default()),
                upstreams: Mutex::new(HashMap::new()),
                upstream_use: Mutex::new(Default::default()),
                limiter: Default::default(),
                meters: Default::default(),
                failed_loads: Mutex::new(HashMap::new()),
                last_champion: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The histograms of `/metrics`.
    pub(crate) fn meters(&self) -> &crate::meters::Meters {
        &self.inner.meters
    }

    /// Per-team rate limits.
    pub(crate) fn limiter(&self) -> &crate::limits::Limiter {
        &self.inner.limiter
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// How versions get loaded when a request needs one not in memory.
    pub fn set_loader(&self, loader: Arc<dyn Loader>) {
        *self.inner.loader.write().unwrap_or_else(|p| p.into_inner()) = Some(loader);
    }

    /// The gateway's first model, once loaded (for readiness and metrics).
    pub fn served(&self) -> Option<ServedModel> {
        self.inner
            .first
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves `model` (already loaded) from now on: the first model, and
    /// any request routed to its version.
    pub fn set_served(&self, model: ServedModel) {
        if let Some(engine) = model.engine() {
            self.inner.models.insert(model.version_id, engine.clone());
        }
        *self.inner.first.write().unwrap_or_else(|p| p.into_inner()) = Some(model);
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.inner
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn models(&self) -> &ModelPool {
        &self.inner.models
    }

    /// Reads the routes again from Postgres; on failure the last ones stay.
    pub async fn refresh_routes(&self) -> Result<(), flywheel_store::StoreError> {
        let snapshot = flywheel_store::routes::snapshot(self.pool()).await?;
        *self.inner.routes.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(RouteTable::from_snapshot(snapshot));
        Ok(())
    }

    /// Keeps the routes fresh: on every `flywheel_routes` notification, and
    /// every `route_refresh` besides (a notification can be missed while
    /// the connection is down).
    pub fn spawn_route_listener(&self) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            let every = state.config().route_refresh;
            loop {
                let mut listener =
                    match flywheel_store::PgListener::connect_with(state.pool()).await {
                        Ok(mut l) => match l.listen(flywheel_store::notify::ROUTES_CHANNEL).await {
                            Ok(()) => Some(l),
                            Err(_) => None,
                        },
                        Err(_) => None,
                    };
                // Changes made while not listening: read them now.
                let _ = state.refresh_routes().await;
                loop {
                    // Some(true): notified or quiet for a while, read again;
                    // Some(false) / None: the connection is gone.
                    let again = match listener.as_mut() {
                        Some(l) => match tokio::time::timeout(every, l.try_recv()).await {
                            Ok(Ok(Some(_))) | Err(_) => true,
                            Ok(Ok(None)) | Ok(Err(_)) => false,
                        },
                        None => {
                            tokio::time::sleep(every).await;
                            true
                        }
                    };
                    if again && let Err(e) = state.refresh_routes().await {
                        tracing::debug!(error = %e, "could not refresh the routes");
                    }
                    if !again || listener.is_none() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    /// The version that answers this request, loaded: routed by the team's
    /// champion and canary, or the version named.
    pub async fn route(
        &self,
        principal: &Principal,
        name: &str,
        user: Option<&str>,
        fallback: &str,
    ) -> Result<(ServedModel, RouteKind), AppError> {
        let routes = self.routes();
        // Before the first routes arrive (Postgres not answered yet), the
        // gateway's first model answers to its own name.
        if !routes.loaded
            && let Some(first) = self
                .served()
                .filter(|f| f.name == name || name == "default")
        {
            return Ok((first, RouteKind::Champion));
        }
        let resolved = match routes.resolve(principal.team_id, name, user, fallback) {
            Ok(r) => r,
            Err(Unresolved::NotReady) => {
                return Err(AppError::Unavailable(
                    "the model is still loading; retry shortly".into(),
                ));
            }
            Err(Unresolved::NotFound) => {
                return Err(AppError::NotFound {
                    message: format!("The model `{name}` does not exist."),
                    code: "model_not_found",
                });
            }
        };
        match self.load(&routes, &resolved.version).await {
            Ok(served) => {
                if resolved.kind == RouteKind::Champion {
                    self.remember_champion(principal.team_id, resolved.version.id);
                }
                Ok((served, resolved.kind))
            }
            // A version the request named is what it asked for; a champion
            // or canary that cannot be loaded leaves the team on the model
            // that served it before.
            Err(e) if resolved.kind == RouteKind::Named => Err(e),
            Err(e) => {
                for fallback in self.fallbacks(&routes, principal.team_id, &resolved) {
                    if let Ok(served) = self.load(&routes, &fallback).await {
                        tracing::warn!(team = %principal.team_name, model = %resolved.version.name,
                            serving = %fallback.name, "the routed model cannot be loaded; \
                            the team's previous model answers");
                        return Ok((served, RouteKind::Champion));
                    }
                }
                Err(e)
            }
        }
    }

    /// `version` loaded: an upstream's client, an engine already in memory,
    /// or loaded now. A version that failed to load is not tried again for
    /// [`FAILED_LOAD_PAUSE`] (a corrupted file is not hashed on every
    /// request, nor by each request that waited on the failed load).
    async fn load(
        &self,
        routes: &RouteTable,
        version: &ModelVersion,
    ) -> Result<ServedModel, AppError> {
        if let Some(upstream) = routes.upstream_of(version.id) {
            return Ok(ServedModel {
                backend: Backend::Upstream(self.upstream_client(upstream)?),
                version_id: version.id,
                name: version.name.clone(),
            });
        }
        if let Some(engine) = self.inner.models.get(version.id)
            && routes.adapter_of(version.id).is_none()
        {
            return Ok(ServedModel::on_engine(engine, version));
        }
        let unavailable = || {
            AppError::Unavailable(format!(
                "the model `{}` could not be loaded; retry shortly",
                version.name
            ))
        };
        if self.failed_lately(version.id) {
            return Err(unavailable());
        }
        let loader = self
            .inner
            .loader
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                AppError::Unavailable(format!(
                    "the model `{}` is not loaded on this gateway",
                    version.name
                ))
            })?;
        let remembering = Remembering {
            inner: loader,
            state: self.clone(),
        };
        match self.inner.models.serve(&remembering, routes, version).await {
            Ok(served) => {
                self.lock_failed().remove(&version.id);
                Ok(served)
            }
            Err(e) => {
                tracing::error!(version = %version.name, error = %e, "could not load a model");
                Err(unavailable())
            }
        }
    }

    fn lock_failed(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Instant>> {
        self.inner
            .failed_loads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a load of `version` failed less than [`FAILED_LOAD_PAUSE`] ago.
    fn failed_lately(&self, version: Uuid) -> bool {
        self.lock_failed()
            .get(&version)
            .is_some_and(|at| at.elapsed() < FAILED_LOAD_PAUSE)
    }

    /// Remembers that `version` answered `team`'s champion route.
    fn remember_champion(&self, team: Uuid, version: Uuid) {
        self.inner
            .last_champion
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(team, version);
    }

    /// What answers `team` when `resolved` (its champion or canary) cannot
    /// be loaded: for a canary, the champion; then the version that last
    /// answered the team's champion route on this gateway.
    fn fallbacks(&self, routes: &RouteTable, team: Uuid, resolved: &Resolved) -> Vec<ModelVersion> {
        let mut out = Vec::new();
        if let RouteKind::Canary(_) = resolved.kind
            && let Some(champion) = routes.champion_of(team)
        {
            out.push(champion.clone());
        }
        let last = self
            .inner
            .last_champion
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&team)
            .copied();
        if let Some(v) = last.and_then(|id| routes.version(id)) {
            out.push(v.clone());
        }
        out.retain(|v| v.id != resolved.version.id);
        out.dedup_by_key(|v| v.id);
        out
    }

    /// The client of an upstream version (made on first use, and again
    /// when its settings changed).
    fn upstream_client(&self, u: &Upstream) -> Result<Arc<flywheel_upstream::Client>, AppError> {
        let mut clients = self
            .inner
            .upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((seen, client)) = clients.get(&u.model_version_id)
            && seen == u
        {
            return Ok(client.clone());
        }
        let client = Arc::new(flywheel_upstream::Client::openai(
            &u.base_url,
            &u.model,
            u.api_key_env.as_deref(),
            Duration::from_millis(u.timeout_ms.max(1) as u64),
            self.inner.config.upstream.clone(),
        )?);
        clients.insert(u.model_version_id, (u.clone(), client.clone()));
        Ok(client)
    }

    /// Counts one request of `team` to the upstream version `version`.
    pub(crate) fn count_upstream_use(
        &self,
        version: &str,
        team: &str,
        prompt: usize,
        completion: usize,
    ) {
        let mut all = self
            .inner
            .upstream_use
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let u = all
            .entry((version.to_string(), team.to_string()))
            .or_default();
        u.requests += 1;
        u.prompt_tokens += prompt as u64;
        u.completion_tokens += completion as u64;
    }

    /// Each (version, team)'s use of upstreams so far (for `/metrics`).
    pub(crate) fn upstream_use(&self) -> Vec<((String, String), UpstreamUse)> {
        let all = self
            .inner
            .upstream_use
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The upstream clients made so far, by version (for `/metrics`).
    pub(crate) fn upstream_clients(&self) -> Vec<(Uuid, Arc<flywheel_upstream::Client>)> {
        let clients = self
            .inner
            .upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        clients
            .iter()
            .map(|(id, (_, c))| (*id, c.clone()))
            .collect()
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

    pub(crate) fn remember_completion(&self, id: &str, owner: flywheel_store::completions::Owner) {
        let mut r = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.owners.insert(id.to_string(), owner).is_none() {
            r.order.push_back(id.to_string());
        }
        while r.order.len() > RECENT_CAPACITY {
            if let Some(old) = r.order.pop_front() {
                r.owners.remove(&old);
            }
        }
    }

    pub(crate) fn recent_owner(&self, id: &str) -> Option<flywheel_store::completions::Owner> {
        let r = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.owners.get(id).copied()
    }

    pub(crate) fn forget_completions(&self, team: Uuid) {
        let mut r = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.owners.retain(|_, o| o.team_id != team);
        let owners = std::mem::take(&mut r.owners);
        r.order.retain(|id| owners.contains_key(id));
        r.owners = owners;
    }
}
