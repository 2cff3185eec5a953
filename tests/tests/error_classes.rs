//! One classification of what goes wrong below the HTTP faces, answered
//! alike by both, the API and the dashboard: not found 404, a state that
//! does not allow it 409, data that can never be accepted 422, the database
//! out of reach 503, anything else 500 with its detail in the log only.
//! The errors are real ones (from Postgres, a stopped connection, a
//! dropped table), not raised in their place.

use std::time::Duration;

use flywheel_engine::EngineConfig;
use flywheel_gateway::{AppError, AppState, GatewayConfig, JournalConfig, ServedModel};
use flywheel_store::{ErrorClass, StoreError};
use flywheel_tests::admin::{Client, flushed, signed_in};
use flywheel_tests::proxy::Proxy;
use flywheel_tests::{TestDb, TestGateway, fresh_database, load_engine, open_journal};
use serde_json::{Value, json};

#[tokio::test]
async fn store_errors_are_classified_by_what_they_mean() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let db_err = |e: flywheel_store::sqlx::Error| StoreError::from(e);
    sqlx::query("insert into teams (name) values ('twice')")
        .execute(pool)
        .await
        .unwrap();
    let taken = sqlx::query("insert into teams (name) values ('twice')")
        .execute(pool)
        .await
        .map_err(db_err)
        .unwrap_err();
    let unstorable = sqlx::query("insert into teams (name) values ($1)")
        .bind("nul\u{0}here")
        .execute(pool)
        .await
        .map_err(db_err)
        .unwrap_err();
    let broken = sqlx::query("select * from no_such_table")
        .execute(pool)
        .await
        .map_err(db_err)
        .unwrap_err();
    let missing = flywheel_store::models::set_champion(pool, "no-such-model")
        .await
        .unwrap_err();
    let away = flywheel_store::connect("postgres://postgres@127.0.0.1:1/nowhere")
        .await
        .unwrap_err();
    for (e, class) in [
        (missing, ErrorClass::NotFound),
        (taken, ErrorClass::Conflict),
        (unstorable, ErrorClass::Refused),
        (away, ErrorClass::Unreachable),
        (broken, ErrorClass::Internal),
    ] {
        assert_eq!(e.class(), class, "{e}");
        let text = e.to_string();
        let answered = AppError::from(e);
        assert_eq!(answered.status().as_u16(), class.status(), "{text}");
        if class == ErrorClass::Internal || class == ErrorClass::Unreachable {
            let body = answered.body().to_string();
            assert!(
                !body.contains("no_such_table") && !body.contains("nowhere"),
                "{body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_conflict_and_refused_reach_the_faces_as_404_409_422() {
    let gw = TestGateway::tiny().await;
    let pool = &gw.db.pool;
    // Not found, on both faces.
    let (status, body) = gw.get(&gw.key, "/v1/completions/chatcmpl-nothing").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let admin = signed_in(&gw, "ada", "admin").await;
    let r = admin
        .get(&format!("/admin/cycles/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    // The API has no action whose state can refuse it (writes are
    // journaled, input Postgres could never store is refused up front with
    // a 400): conflicts and refusals are the dashboard's actions'.
    let csrf = admin.csrf().await;
    let api = |path: &'static str, body: Value| {
        let req = admin
            .http
            .post(format!("{}{path}", admin.base))
            .header("x-csrf-token", csrf.clone())
            .json(&body);
        admin.send(req)
    };
    let r = api(
        "/admin/api/rollback",
        json!({"team": "team-a", "reason": "nothing to undo yet"}),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let err: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no promotion"),
        "{}",
        r.body
    );
    // Another team's candidate: never allowed for this team.
    flywheel_store::keys::create_key(pool, "team-b")
        .await
        .unwrap();
    let team_b = flywheel_store::keys::team_id(pool, "team-b")
        .await
        .unwrap()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("fw-classes-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 5).unwrap();
    let model = flywheel_modelhub::ModelCache::new(dir.join("cache"))
        .unwrap()
        .import(&path, Some("team-b-only"))
        .await
        .unwrap();
    let v = flywheel::register(pool, &model).await.unwrap();
    flywheel_store::models::set_scope(pool, v.id, Some(team_b), false)
        .await
        .unwrap();
    let r = api(
        "/admin/api/promote",
        json!({"team": "team-a", "model": "team-b-only", "reason": "try"}),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("another team's feedback"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_schema_is_a_500_on_both_faces_and_its_detail_stays_in_the_log() {
    let gw = TestGateway::tiny().await;
    let admin = signed_in(&gw, "ada", "admin").await;
    let id = gw.complete(&gw.key, Some("u")).await;
    flushed(&gw).await;
    let (status, _) = gw.get(&gw.key, &format!("/v1/completions/{id}")).await;
    assert_eq!(status, 200);
    // The fault: tables the pages read are gone.
    for table in ["cycles", "completions"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("drop table {table} cascade")))
            .execute(&gw.db.pool)
            .await
            .unwrap();
    }
    let (status, body) = gw.get(&gw.key, &format!("/v1/completions/{id}")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert!(!body.to_string().contains("relation"), "{body}");
    let r = admin
        .get(&format!("/admin/cycles/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(
        r.body.contains("the server had an error") && !r.body.contains("relation"),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_out_of_reach_is_a_503_on_both_faces() {
    // A gateway whose every connection to Postgres goes through a proxy,
    // which the test stops: the database out of reach for this gateway,
    // while the server goes on for the other tests.
    let url = fresh_database("fw_reach").await;
    let direct = flywheel::connect_and_migrate(&url).await.unwrap();
    let dir = std::env::temp_dir().join(format!("fw-reach-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 3).unwrap();
    let model = flywheel_modelhub::ModelCache::new(dir.join("cache"))
        .unwrap()
        .import(&path, Some("tiny"))
        .await
        .unwrap();
    let v = flywheel::register(&direct, &model).await.unwrap();
    flywheel_store::models::set_champion(&direct, &v.name)
        .await
        .unwrap();
    let (_, key) = flywheel_store::keys::create_key(&direct, "team-a")
        .await
        .unwrap();
    let proxy = Proxy::for_database(&url).await;
    let pool = flywheel_store::connect(&proxy.url(&url)).await.unwrap();
    let journal = open_journal(&pool, JournalConfig::new(dir.join("journal"))).await;
    journal.spawn_flusher(pool.clone());
    let state = AppState::new(pool.clone(), GatewayConfig::default(), journal.clone());
    state.set_served(ServedModel::on_engine(
        load_engine(&model, EngineConfig::default()).await,
        &v,
    ));
    state.refresh_routes().await.unwrap();
    let base = flywheel_tests::spawn_gateway(state, std::future::pending()).await;
    let gw_get = |path: String| {
        let (base, key) = (base.clone(), key.clone());
        async move {
            let r = reqwest::Client::new()
                .get(format!("{base}{path}"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, body) = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "tiny", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 200);
    let id = body.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(journal.wait_flushed(Duration::from_secs(10)).await);
    assert_eq!(gw_get(format!("/v1/completions/{id}")).await.0, 200);
    let hash = flywheel_admin::hash_password(flywheel_tests::admin::PASSWORD).unwrap();
    flywheel_store::admins::upsert(&direct, "ada", &hash, "admin")
        .await
        .unwrap();
    let mut admin = Client::at(&base);
    assert_eq!(
        admin
            .login("ada", flywheel_tests::admin::PASSWORD)
            .await
            .status,
        303
    );
    assert_eq!(admin.get("/admin/models").await.status, 200);

    proxy.stop();
    let (status, body) = gw_get(format!("/v1/completions/{id}")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "service_unavailable");
    let r = admin.get("/admin/models").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("the database is unavailable"), "{}", r.body);
}
