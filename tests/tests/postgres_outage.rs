//! Postgres stopped for a minute in the middle of traffic and started again: the gateway
//! keeps answering (keys it has seen, completions, votes), says "degraded"
//! on /readyz, and once Postgres is back every acknowledged row is there,
//! once. The database is a private cluster of this test's own, so stopping
//! it disturbs nothing else.

use std::time::Duration;

use flywheel::pg::LocalPostgres;
use flywheel_engine::EngineConfig;
use flywheel_gateway::{AppState, GatewayConfig, JournalConfig, ServedModel};
use flywheel_tests::load_engine;
use serde_json::json;

/// A gateway on the tiny model over a private cluster of the test's own:
/// the cluster, the pool, the journal, the gateway's base URL and a key.
async fn gateway_on_own_cluster(
    name: &str,
) -> (
    LocalPostgres,
    flywheel_store::PgPool,
    flywheel_gateway::Journal,
    String,
    String,
) {
    let dir = std::env::temp_dir().join(format!("fw-{name}-{}", uuid::Uuid::new_v4()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pg = LocalPostgres::new(&dir.join("pgdata"), port).unwrap();
    pg.start().unwrap();
    let admin = flywheel_store::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let pool = flywheel::connect_and_migrate(&pg.url(name)).await.unwrap();

    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 8).unwrap();
    let model = flywheel_modelhub::ModelCache::new(dir.join("models"))
        .unwrap()
        .import(&path, Some("tiny"))
        .await
        .unwrap();
    let version = flywheel::register(&pool, &model).await.unwrap();
    flywheel_store::models::set_champion(&pool, &version.name)
        .await
        .unwrap();
    let engine = load_engine(&model, EngineConfig::default()).await;
    let journal =
        flywheel_tests::open_journal(&pool, JournalConfig::new(dir.join("journal"))).await;
    journal.spawn_flusher(pool.clone());
    let state = AppState::new(pool.clone(), GatewayConfig::default(), journal.clone());
    state.set_served(ServedModel::on_engine(engine, &version));
    let (_, key) = flywheel_store::keys::create_key(&pool, "t").await.unwrap();
    state.refresh_routes().await.unwrap();
    state.spawn_route_listener();
    let base = flywheel_tests::spawn_gateway(state, std::future::pending()).await;
    (pg, pool, journal, base, key)
}

#[tokio::test]
async fn traffic_survives_a_postgres_restart() {
    let (pg, pool, journal, base, key) = gateway_on_own_cluster("outage").await;
    let http = reqwest::Client::new();
    let mut sent = 0;
    let mut saw_degraded = false;
    // Postgres is down for rounds 10..20, a little over a minute: traffic
    // keeps coming every six seconds meanwhile.
    let mut down_since = None;
    for round in 0..30 {
        if round == 10 {
            pg.stop().unwrap();
            down_since = Some(std::time::Instant::now());
        }
        if round == 20 {
            assert!(down_since.unwrap().elapsed() >= Duration::from_secs(60));
            pg.start().unwrap();
        }
        if (11..20).contains(&round) {
            tokio::time::sleep(Duration::from_millis(6700)).await;
            // OpenAI clients often list the models first: that works from
            // memory while Postgres is away.
            let models = http
                .get(format!("{base}/v1/models"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(models.status(), 200, "round {round}");
            let listed: serde_json::Value = models.json().await.unwrap();
            assert_eq!(listed["data"][0]["id"], "tiny", "round {round}: {listed}");
        }
        chat_and_vote(&http, &base, &key, round).await;
        sent += 1;
        if (10..20).contains(&round) {
            let ready: serde_json::Value = reqwest::get(format!("{base}/readyz"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            saw_degraded |= ready["status"] == "degraded";
        }
    }
    assert!(saw_degraded, "/readyz said nothing while Postgres was down");
    assert!(
        journal.wait_flushed(Duration::from_secs(30)).await,
        "the journal drained"
    );
    // Each round's completion (its own message) and its vote, once: a lost
    // or a doubled one shows.
    let stored: (i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from completions),
                (select count(distinct request->'messages'->0->>'content') from completions),
                (select count(*) from feedback),
                (select count(distinct completion_id) from feedback)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, (sent, sent, sent, sent));
    assert!(journal.stats().flush_failures > 0, "the outage was real");
    pg.stop().unwrap();
}

/// A chat completion (200) and a vote on it (201).
async fn chat_and_vote(http: &reqwest::Client, base: &str, key: &str, n: usize) {
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": format!("n{n}")}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "round {n}: {}",
        resp.text().await.unwrap()
    );
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = http
        .post(format!("{base}/v1/feedback"))
        .bearer_auth(key)
        .json(&json!({"completion_id": id, "rating": "up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        201,
        "round {n}: {}",
        resp.text().await.unwrap()
    );
}

/// Signals the cluster's postmaster and every backend it started.
fn signal_cluster(pg: &LocalPostgres, signal: &str) {
    let pid = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap().trim().to_string();
    let children = std::process::Command::new("pgrep")
        .args(["-P", &pid])
        .output()
        .unwrap();
    let mut pids: Vec<String> = String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    pids.push(pid);
    let sent = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .args(&pids)
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {pids:?}");
}

/// Postgres hanging rather than gone: the server and its backends stopped
/// with SIGSTOP, so connections are accepted by the kernel and queries
/// never answered. A key the gateway has seen keeps chatting and voting,
/// each answer acknowledged; when the server resumes (SIGCONT), every
/// acknowledged row is stored, once.
#[tokio::test]
async fn traffic_survives_a_postgres_that_hangs() {
    let (pg, pool, journal, base, key) = gateway_on_own_cluster("hang").await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    chat_and_vote(&http, &base, &key, 0).await; // the key is seen while Postgres answers
    signal_cluster(&pg, "STOP");
    // Past the 30 s the gateway trusts a confirmed key without asking.
    let hung = std::time::Instant::now();
    let mut rounds = 1;
    while hung.elapsed() < Duration::from_secs(40) {
        chat_and_vote(&http, &base, &key, rounds).await;
        rounds += 1;
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    // What was acknowledged meanwhile is only in the journal: the server
    // cannot have stored any of it.
    let pending = journal.stats().pending;
    assert!(
        pending >= 2 * (rounds - 1),
        "{pending} pending after {rounds} rounds"
    );
    signal_cluster(&pg, "CONT");
    assert!(
        journal.wait_flushed(Duration::from_secs(60)).await,
        "the journal drained after the server resumed"
    );
    let counts: (i64, i64) = sqlx::query_as(
        "select (select count(*) from completions), (select count(*) from feedback)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counts, (rounds as i64, rounds as i64));
    pg.stop().unwrap();
}
