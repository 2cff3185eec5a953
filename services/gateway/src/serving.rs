//! Which model version answers a request, and keeping those versions loaded.
//!
//! [`RouteTable`] is the gateway's in-memory copy of every team's champion
//! and canary and every version's name and scope, refreshed when Postgres
//! says the routes changed (`LISTEN flywheel_routes`) and every few seconds
//! besides; while Postgres is down the last copy keeps answering, so
//! `/v1/models` and routing work from memory. A request resolves its route
//! once, when it starts, and keeps the engine it got: a promotion, canary
//! or rollback changes what the *next* request gets, never a stream in
//! flight.
//!
//! [`ModelPool`] keeps up to `max_loaded` base engines in memory, least
//! recently used unloaded first; a version that differs from its base only
//! by a LoRA adapter is served on the base's engine with the adapter
//! applied in the batch, so it costs its adapter's weights, not a copy of
//! the model. Loading happens on its own task: requests for models already
//! loaded never wait for it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flywheel_engine::{AdapterId, AdapterWeights, EngineHandle};
use flywheel_store::models::ModelVersion;
use flywheel_store::routes::{RouteSnapshot, TeamRoute};
use flywheel_store::upstreams::Upstream;
use schemars::JsonSchema;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use uuid::Uuid;

pub type LoadError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, LoadError>> + Send>>;

/// How the gateway gets a model version into memory (the `flywheel`
/// program provides it: files from the cache or the artifact store).
pub trait Loader: Send + Sync + 'static {
    /// An engine serving `version`'s own file.
    fn engine(&self, version: ModelVersion) -> BoxFuture<EngineHandle>;
    /// `version`'s LoRA adapter (stored at `adapter_path`), shaped for `base`.
    fn adapter(&self, version: ModelVersion, adapter_path: String) -> BoxFuture<AdapterWeights>;
}

/// A loaded version, ready to take requests.
#[derive(Clone)]
pub struct ServedModel {
    pub backend: Backend,
    pub version_id: Uuid,
    pub name: String,
}

/// What answers a version's requests.
#[derive(Clone)]
pub enum Backend {
    /// An engine in this process: the version's own, or its base's with
    /// the version's adapter applied.
    Engine {
        engine: EngineHandle,
        adapter: Option<AdapterId>,
    },
    /// An OpenAI-compatible server elsewhere.
    Upstream(Arc<flywheel_upstream::Client>),
}

impl ServedModel {
    /// `version` on an engine of its own.
    pub fn on_engine(engine: EngineHandle, version: &ModelVersion) -> Self {
        Self {
            backend: Backend::Engine {
                engine,
                adapter: None,
            },
            version_id: version.id,
            name: version.name.clone(),
        }
    }

    /// The engine, when one in this process serves it.
    pub fn engine(&self) -> Option<&EngineHandle> {
        match &self.backend {
            Backend::Engine { engine, .. } => Some(engine),
            Backend::Upstream(_) => None,
        }
    }
}

/// How a request reached its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Champion,
    Canary(Uuid),
    /// The request named a version the team may use.
    Named,
}

impl RouteKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Champion => "champion",
            Self::Canary(_) => "canary",
            Self::Named => "named",
        }
    }
}

/// What a request resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub version: ModelVersion,
    pub kind: RouteKind,
}

/// Why a name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// No routes yet (the gateway is starting and Postgres has not answered).
    NotReady,
    /// Unknown, or not this team's to use.
    NotFound,
}

/// The names that route to a team's champion (or canary) rather than to one
/// version: `default`, and the name of every version in the champion's
/// lineage (so clients that name the base model keep getting the team's
/// champion after it is fine-tuned).
pub const DEFAULT_ALIAS: &str = "default";

#[derive(Debug, Default)]
pub struct RouteTable {
    versions: HashMap<Uuid, ModelVersion>,
    by_name: HashMap<String, Uuid>,
    links: HashMap<Uuid, (Option<Uuid>, Option<String>)>,
    teams: HashMap<Uuid, TeamRoute>,
    upstreams: HashMap<Uuid, Upstream>,
    global_champion: Option<Uuid>,
    pub loaded: bool,
}

impl RouteTable {
    pub fn from_snapshot(s: RouteSnapshot) -> Self {
        let mut t = RouteTable {
            loaded: true,
            ..Default::default()
        };
        for v in s.versions {
            if v.is_champion {
                t.global_champion = Some(v.id);
            }
            t.by_name.insert(v.name.clone(), v.id);
            t.versions.insert(v.id, v);
        }
        for l in s.links {
            t.links.insert(l.id, (l.base_version_id, l.adapter_path));
        }
        for r in s.teams {
            t.teams.insert(r.team_id, r);
        }
        for u in s.upstreams {
            t.upstreams.insert(u.model_version_id, u);
        }
        t
    }

    /// Where a version is served, when an upstream serves it.
    pub fn upstream_of(&self, id: Uuid) -> Option<&Upstream> {
        self.upstreams.get(&id)
    }

    pub fn version(&self, id: Uuid) -> Option<&ModelVersion> {
        self.versions.get(&id)
    }

    /// The base and adapter a version is served with, when it is an adapter.
    pub fn adapter_of(&self, id: Uuid) -> Option<(Uuid, String)> {
        match self.links.get(&id) {
            Some((Some(base), Some(path))) => Some((*base, path.clone())),
            _ => None,
        }
    }

    pub fn global_champion(&self) -> Option<&ModelVersion> {
        self.global_champion.and_then(|id| self.versions.get(&id))
    }

    /// A team's champion: its own, else the global one.
    pub fn champion_of(&self, team: Uuid) -> Option<&ModelVersion> {
        self.teams
            .get(&team)
            .and_then(|r| r.champion_version_id)
            .and_then(|id| self.versions.get(&id))
            .or_else(|| self.global_champion())
    }

    /// A team's running canary: (canary id, version, share).
    pub fn canary_of(&self, team: Uuid) -> Option<(Uuid, &ModelVersion, f64)> {
        let r = self.teams.get(&team)?;
        let v = self.versions.get(&r.canary_version_id?)?;
        Some((r.canary_id?, v, r.canary_share?))
    }

    fn pools(&self, team: Uuid) -> bool {
        self.teams.get(&team).is_some_and(|r| r.share_for_training)
    }

    /// Whether `name` routes to the team's champion or canary.
    fn is_alias(&self, team: Uuid, name: &str) -> bool {
        if name == DEFAULT_ALIAS || self.global_champion().is_some_and(|g| g.name == name) {
            return true;
        }
        let mut at = self.champion_of(team).map(|v| v.id);
        let mut hops = 0;
        while let Some(id) = at {
            if self.versions.get(&id).is_some_and(|v| v.name == name) {
                return true;
            }
            at = self.links.get(&id).and_then(|l| l.0);
            hops += 1;
            if hops > 64 {
                break;
            }
        }
        false
    }

    /// The version that answers `team`'s request for `name`; `user` keeps
    /// an end user on one side of a canary (a request without one is placed
    /// at random by `fallback`).
    pub fn resolve(
        &self,
        team: Uuid,
        name: &str,
        user: Option<&str>,
        fallback: &str,
    ) -> Result<Resolved, Unresolved> {
        if !self.loaded {
            return Err(Unresolved::NotReady);
        }
        if self.is_alias(team, name) {
            if let Some((canary, v, share)) = self.canary_of(team)
                && placement(canary, user.unwrap_or(fallback)) < share
            {
                return Ok(Resolved {
                    version: v.clone(),
                    kind: RouteKind::Canary(canary),
                });
            }
            return self
                .champion_of(team)
                .map(|v| Resolved {
                    version: v.clone(),
                    kind: RouteKind::Champion,
                })
                .ok_or(Unresolved::NotReady);
        }
        let v = self
            .by_name
            .get(name)
            .and_then(|id| self.versions.get(id))
            .filter(|v| v.usable_by(team, self.pools(team)))
            .ok_or(Unresolved::NotFound)?;
        Ok(Resolved {
            version: v.clone(),
            kind: RouteKind::Named,
        })
    }

    /// What `team` can use by name: its champion, then its canary.
    pub fn listed(&self, team: Uuid) -> Vec<(&ModelVersion, Role)> {
        let mut out = Vec::new();
        if let Some(c) = self.champion_of(team) {
            out.push((c, Role::Champion));
        }
        if let Some((_, v, _)) = self.canary_of(team) {
            out.push((v, Role::Canary));
        }
        out
    }
}

/// What a model is to the team.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves `default` and the base's name.
    Champion,
    /// Serves a share of the team's end users.
    Canary,
    /// Served when named.
    Named,
}

/// Where an end user falls in `[0, 1)` for a canary: the same user always
/// lands in the same place, and different canaries place users independently.
pub fn placement(canary: Uuid, user: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(canary.as_bytes());
    h.update(user.as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// A base engine, once loaded, and the adapters attached to it.
struct Slot {
    engine: OnceCell<EngineHandle>,
    adapters: Mutex<HashMap<Uuid, Arc<OnceCell<AdapterId>>>>,
    last_used: Mutex<Instant>,
}

impl Slot {
    fn new() -> Self {
        Self {
            engine: OnceCell::new(),
            adapters: Mutex::new(HashMap::new()),
            last_used: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// The versions loaded in this gateway, within a budget of base engines.
pub struct ModelPool {
    slots: Mutex<HashMap<Uuid, Arc<Slot>>>,
    max_loaded: usize,
}

impl ModelPool {
    pub fn new(max_loaded: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            max_loaded: max_loaded.max(1),
        }
    }

    fn slot(&self, base: Uuid) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(base)
            .or_insert_with(|| Arc::new(Slot::new()))
            .clone()
    }

    /// Puts an engine for `version` in the pool (a gateway's first model,
    /// loaded before the routes are known).
    pub fn insert(&self, version: Uuid, engine: EngineHandle) {
        let _ = self.slot(version).engine.set(engine);
        self.evict(version);
    }

    /// The engine of `base`, loading it if needed.
    async fn engine(
        &self,
        loader: &dyn Loader,
        base: &ModelVersion,
    ) -> Result<EngineHandle, LoadError> {
        let slot = self.slot(base.id);
        slot.touch();
        let fresh = slot.engine.get().is_none();
        let engine = slot
            .engine
            .get_or_try_init(|| loader.engine(base.clone()))
            .await?
            .clone();
        if fresh {
            self.evict(base.id);
        }
        Ok(engine)
    }

    /// Unloads the least recently used engines beyond the budget (never
    /// `keep`). Requests running on an unloaded engine finish on it.
    fn evict(&self, keep: Uuid) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let ready: Vec<(Uuid, Instant)> = slots
                .iter()
                .filter(|(_, s)| s.engine.get().is_some())
                .map(|(id, s)| (*id, *s.last_used.lock().unwrap_or_else(|p| p.into_inner())))
                .collect();
            if ready.len() <= self.max_loaded {
                return;
            }
            let Some((oldest, _)) = ready
                .into_iter()
                .filter(|(id, _)| *id != keep)
                .min_by_key(|(_, at)| *at)
            else {
                return;
            };
            slots.remove(&oldest);
            tracing::info!(version = %oldest, "unloaded a model (least recently used)");
        }
    }

    /// Engines loaded now, and the bytes of weights they and their adapters hold.
    pub fn loaded(&self) -> Vec<(Uuid, usize)> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .filter_map(|(id, s)| {
                let e = s.engine.get()?;
                Some((*id, e.info().weight_bytes + e.adapter_bytes()))
            })
            .collect()
    }

    /// A loaded engine of `version`, if any (for readiness and metrics).
    pub fn get(&self, version: Uuid) -> Option<EngineHandle> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(&version).and_then(|s| s.engine.get().cloned())
    }

    /// `version` ready to serve: on its own engine, or on its base's with
    /// its adapter.
    pub async fn serve(
        &self,
        loader: &dyn Loader,
        routes: &RouteTable,
        version: &ModelVersion,
    ) -> Result<ServedModel, LoadError> {
        if let Some((base_id, path)) = routes.adapter_of(version.id)
            && let Some(base) = routes.version(base_id)
        {
            let engine = self.engine(loader, base).await?;
            let slot = self.slot(base.id);
            let cell = slot
                .adapters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(version.id)
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone();
            let attached = cell
                .get_or_try_init(|| async {
                    let weights = loader.adapter(version.clone(), path.clone()).await?;
                    engine.add_adapter(weights).map_err(LoadError::from)
                })
                .await;
            match attached {
                Ok(id) => {
                    return Ok(ServedModel {
                        backend: Backend::Engine {
                            engine,
                            adapter: Some(*id),
                        },
                        version_id: version.id,
                        name: version.name.clone(),
                    });
                }
                // An engine that applies no adapters (a GPU): the merged file.
                Err(e) => tracing::warn!(version = %version.name, error = %e,
                    "serving the merged file instead of the adapter"),
            }
        }
        let engine = self.engine(loader, version).await?;
        Ok(ServedModel::on_engine(engine, version))
    }
}
