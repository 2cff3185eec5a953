//! The feedback API and the completion log: votes, history, validation,
//! team isolation, bulk import, privacy, and votes that arrive before the
//! completion's row is in Postgres. Data paths, so the tiny model serves.

use flywheel_tests::TestGateway;
use serde_json::json;

async fn votes(pool: sqlx::PgPool, team: uuid::Uuid) -> i64 {
    flywheel_store::feedback::count_for_team(&pool, team)
        .await
        .unwrap()
}

async fn completions(pool: sqlx::PgPool, team: uuid::Uuid) -> i64 {
    flywheel_store::completions::count_for_team(&pool, team)
        .await
        .unwrap()
}

#[tokio::test]
async fn votes_replace_per_user_and_keep_history() {
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, Some("alice")).await;
    let (status, first) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "up", "user": "ann"}),
        )
        .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["object"], "feedback");
    assert_eq!(first["rating"], "up");
    let (status, _) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "down", "user": "ann",
              "comment": "wrong", "correction": "The right answer."}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "up", "user": "bob"}),
        )
        .await;
    assert_eq!(status, 201);

    let (status, record) = gw.get(&gw.key, &format!("/v1/completions/{id}")).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["user"], "alice");
    assert_eq!(record["model_version_id"], gw.served.version_id.to_string());
    assert!(record["request_id"].is_string(), "x-request-id is kept");
    let history = record["feedback"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    let current = record["feedback"]["current"].as_array().unwrap();
    assert_eq!(current.len(), 2);
    let ann = current.iter().find(|v| v["user"] == "ann").unwrap();
    assert_eq!(
        (ann["rating"].as_str(), ann["correction"].as_str()),
        (Some("down"), Some("The right answer."))
    );
}

#[tokio::test]
async fn invalid_votes_are_400_naming_the_field() {
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, None).await;
    let cases = [
        (json!({"completion_id": id}), "rating"),
        (json!({"completion_id": id, "rating": "meh"}), "rating"),
        (json!({"rating": "up"}), "completion_id"),
        (json!({"completion_id": 7, "rating": "up"}), "completion_id"),
        (
            json!({"completion_id": id, "rating": "up", "comment": 5}),
            "comment",
        ),
        (
            json!({"completion_id": id, "rating": "up", "stars": 5}),
            "stars",
        ),
        (
            json!({"completion_id": id, "rating": "up", "user": "x".repeat(300)}),
            "user",
        ),
    ];
    for (body, param) in cases {
        let (status, resp) = gw.post(&gw.key, "/v1/feedback", body.clone()).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{body}");
    }
}

#[tokio::test]
async fn other_teams_and_unknown_ids_get_404() {
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, None).await;
    let (_, other) = flywheel_store::keys::create_key(&gw.db.pool, "team-b")
        .await
        .unwrap();
    let (status, body) = gw
        .post(
            &other,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "down"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "completion_not_found");
    let (status, _) = gw.get(&other, &format!("/v1/completions/{id}")).await;
    assert_eq!(status, 404);
    let (status, _) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            json!({"completion_id": "chatcmpl-nope", "rating": "up"}),
        )
        .await;
    assert_eq!(status, 404);
    // Team B's own completion is theirs to rate.
    let theirs = gw.complete(&other, None).await;
    let (status, _) = gw
        .post(
            &other,
            "/v1/feedback",
            json!({"completion_id": theirs, "rating": "up"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = gw.get(&gw.key, &format!("/v1/completions/{theirs}")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn batch_says_what_happened_to_each_item() {
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, None).await;
    let (status, body) = gw
        .post(
            &gw.key,
            "/v1/feedback/batch",
            json!({"items": [
                {"completion_id": id, "rating": "up", "user": "u1"},
                {"completion_id": id, "rating": "sideways"},
                {"completion_id": "chatcmpl-missing", "rating": "down"},
                {"completion_id": id, "rating": "down", "user": "u2"},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let statuses: Vec<_> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![201, 400, 404, 201]);
    assert_eq!(
        (body["created"].as_u64(), body["failed"].as_u64()),
        (Some(2), Some(2))
    );
    let too_many: Vec<_> = (0..1001)
        .map(|_| json!({"completion_id": id, "rating": "up"}))
        .collect();
    let (status, body) = gw
        .post(&gw.key, "/v1/feedback/batch", json!({"items": too_many}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "items");
    assert!(
        gw.wait_for_rows(2, votes).await,
        "every accepted vote is stored"
    );
}

#[tokio::test]
async fn a_vote_before_its_completion_is_stored_is_accepted_and_lands() {
    let gw = TestGateway::tiny().await;
    // Hold the completions table so the flusher cannot write for a while.
    let mut blocker = gw.db.pool.begin().await.unwrap();
    sqlx::query("lock table completions in access exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let id = gw.complete(&gw.key, None).await;
    let (status, body) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "up"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        gw.state.journal().stats().pending >= 2,
        "both wait in the journal"
    );
    blocker.rollback().await.unwrap();
    assert!(
        gw.wait_for_rows(1, completions).await,
        "the completion reaches Postgres"
    );
    assert!(gw.wait_for_rows(1, votes).await, "so does the vote");
}

#[tokio::test]
async fn a_stream_the_client_abandons_is_logged_once_as_cancelled() {
    // The real model: 2000 tokens take far longer than reading one chunk.
    let gw = TestGateway::real().await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(&gw.key)
        .json(&json!({"model": gw.model(), "stream": true, "max_tokens": 2000, "temperature": 1.0,
                      "seed": 1, "user": "leaver",
                      "messages": [{"role": "user", "content": "Write a very long essay about rivers."}]}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);
    assert!(gw.wait_for_rows(1, completions).await, "logged once");
    let (reason, tokens, output): (String, i32, String) = sqlx::query_as(
        "select finish_reason, completion_tokens, output from completions where end_user = 'leaver'",
    )
    .fetch_one(&gw.db.pool)
    .await
    .unwrap();
    assert_eq!(reason, "cancelled");
    assert!((1..2000).contains(&tokens), "{tokens}");
    assert!(
        !output.is_empty(),
        "the text produced before the client left is kept"
    );
}

#[tokio::test]
async fn teams_can_keep_text_out_and_users_can_be_forgotten() {
    let gw = TestGateway::tiny().await;
    assert!(
        flywheel_store::keys::set_store_text(&gw.db.pool, "team-a", false)
            .await
            .unwrap()
    );
    let secret = gw.complete(&gw.key, Some("carol")).await;
    let (_, record) = gw.get(&gw.key, &format!("/v1/completions/{secret}")).await;
    let content = &record["request"]["messages"][0]["content"];
    assert!(
        content["sha256"].as_str().unwrap().starts_with("sha256:"),
        "{record}"
    );
    assert_eq!(content["chars"], 5);
    assert!(record["output"].as_str().unwrap().starts_with("sha256:"));
    assert!(!record.to_string().contains("hello"));

    let kept = gw.complete(&gw.key, Some("dave")).await;
    for id in [&secret, &kept] {
        let (status, _) = gw
            .post(
                &gw.key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": "up", "user": "carol"}),
            )
            .await;
        assert_eq!(status, 201);
    }
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/users/carol/data", gw.base))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["deleted"]["completions"], 1);
    assert_eq!(
        body["deleted"]["feedback"], 2,
        "carol's votes, on her own and on dave's completion"
    );
    assert_eq!(
        gw.get(&gw.key, &format!("/v1/completions/{secret}"))
            .await
            .0,
        404
    );
    let (status, rest) = gw.get(&gw.key, &format!("/v1/completions/{kept}")).await;
    assert_eq!(status, 200);
    assert_eq!(rest["feedback"]["history"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_full_journal_refuses_votes_loudly() {
    use flywheel_gateway::{AppState, GatewayConfig, JournalConfig};
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, None).await;
    assert!(
        gw.state
            .journal()
            .wait_flushed(std::time::Duration::from_secs(10))
            .await
    );
    // A second gateway on the same database whose journal holds three records
    // and whose flusher cannot write (the table is locked).
    let mut cfg =
        JournalConfig::new(std::env::temp_dir().join(format!("fw-full-{}", uuid::Uuid::new_v4())));
    cfg.max_pending = 3;
    let journal = flywheel_tests::open_journal(&gw.db.pool, cfg).await;
    journal.spawn_flusher(gw.db.pool.clone());
    let state = AppState::new(gw.db.pool.clone(), GatewayConfig::default(), journal);
    state.set_served(gw.served.clone());
    let base = flywheel_tests::spawn_gateway(state, std::future::pending()).await;
    let mut blocker = gw.db.pool.begin().await.unwrap();
    sqlx::query("lock table feedback in access exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let resp = http
            .post(format!("{base}/v1/feedback"))
            .bearer_auth(&gw.key)
            .json(&json!({"completion_id": id, "rating": "up"}))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, vec![201, 201, 201, 503, 503]);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("flywheel_journal_full 1"), "{metrics}");
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    blocker.rollback().await.unwrap();
    // The three acknowledged votes land; the refused ones were never promised.
    assert!(
        gw.wait_for_rows(3, votes).await,
        "every accepted vote is stored"
    );
}
