//! Empty or odd identifiers and other careless input, against real
//! Postgres: an empty end user deletes nothing, strange ids are 400 or 404
//! (never 5xx), the auth scheme is case-insensitive, a batch of identical
//! votes stores one, a completion's votes come a page at a time, and a
//! temperature too small to divide by decodes greedily.

use flywheel_tests::TestGateway;
use serde_json::json;

async fn delete(gw: &TestGateway, path: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .delete(format!("{}{path}", gw.base))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or_default(),
    )
}

async fn vote_count(gw: &TestGateway) -> i64 {
    assert!(
        gw.state
            .journal()
            .wait_flushed(std::time::Duration::from_secs(10))
            .await
    );
    flywheel_store::feedback::count_for_team(&gw.db.pool, gw.team_id().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_empty_end_user_deletes_nothing() {
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, None).await;
    let (status, _) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "up"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, body) = delete(&gw, "/v1/users//data").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "user");
    assert_eq!(
        vote_count(&gw).await,
        1,
        "the anonymous vote is still there"
    );
}

#[tokio::test]
async fn odd_ids_are_400_or_404_never_5xx() {
    let gw = TestGateway::tiny().await;
    let long = "x".repeat(300);
    for path in [
        "/v1/completions/a%00b".to_string(),
        "/v1/completions/chatcmpl-unknown".to_string(),
        format!("/v1/completions/{long}"),
        "/v1/completions/a%00b/feedback".to_string(),
    ] {
        let (status, body) = gw.get(&gw.key, &path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    for path in [
        "/v1/users/a%00b/data".to_string(),
        format!("/v1/users/{long}/data"),
    ] {
        let (status, body) = delete(&gw, &path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], "user", "{body}");
    }
    let (status, body) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            json!({"completion_id": "x".repeat(200), "rating": "up"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn deleting_a_user_counts_the_votes_on_their_completions() {
    let gw = TestGateway::tiny().await;
    let carol = gw.complete(&gw.key, Some("carol")).await;
    for user in ["bob", "dan"] {
        let (status, _) = gw
            .post(
                &gw.key,
                "/v1/feedback",
                json!({"completion_id": carol, "rating": "up", "user": user}),
            )
            .await;
        assert_eq!(status, 201);
    }
    let (status, body) = delete(&gw, "/v1/users/carol/data").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"]["completions"], 1);
    assert_eq!(
        body["deleted"]["feedback"], 2,
        "bob's and dan's votes went with carol's completion"
    );
    assert_eq!(vote_count(&gw).await, 0);
}

/// Deletions lock the log's tables while they run: several at once take
/// turns (a lock mode that let them share would deadlock them, and
/// Postgres would abort all but one).
#[tokio::test]
async fn deletions_of_several_users_at_once_all_succeed() {
    let gw = TestGateway::tiny().await;
    let users = ["ann", "ben", "cat", "dov", "eve", "fay"];
    for user in users {
        gw.complete(&gw.key, Some(user)).await;
    }
    let deletions = users.map(|user| {
        let gw = &gw;
        async move { delete(gw, &format!("/v1/users/{user}/data")).await }
    });
    for (status, body) in futures::future::join_all(deletions).await {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deleted"]["completions"], 1, "{body}");
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let gw = TestGateway::tiny().await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/models", gw.base))
            .header("authorization", format!("{scheme} {}", gw.key))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
    }
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.base))
        .header("authorization", format!("Basic {}", gw.key))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn identical_votes_in_one_batch_are_stored_once() {
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, None).await;
    let same = json!({"completion_id": id, "rating": "down", "user": "ann", "comment": "no"});
    let mut items = vec![same.clone(); 999];
    // Near but not identical: another comment is another vote.
    items.push(json!({"completion_id": id, "rating": "down", "user": "ann", "comment": "no!"}));
    let (status, body) = gw
        .post(&gw.key, "/v1/feedback/batch", json!({"items": items}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["created"], &body["duplicates"], &body["failed"]),
        (&json!(2), &json!(998), &json!(0))
    );
    let first = &body["data"][0];
    assert_eq!(first["status"], 201);
    let repeat = &body["data"][500];
    assert_eq!(
        (&repeat["status"], &repeat["duplicate_of"]),
        (&json!(200), &json!(0))
    );
    assert_eq!(repeat["feedback"]["id"], first["feedback"]["id"]);
    assert_eq!(vote_count(&gw).await, 2);
}

#[tokio::test]
async fn a_completions_votes_come_a_page_at_a_time() {
    let gw = TestGateway::tiny().await;
    let id = gw.complete(&gw.key, None).await;
    // 250 users vote; the first 10 change their minds.
    let mut items: Vec<_> = (0..250)
        .map(|i| json!({"completion_id": id, "rating": "up", "user": format!("u{i:03}")}))
        .collect();
    items.extend(
        (0..10).map(|i| json!({"completion_id": id, "rating": "down", "user": format!("u{i:03}")})),
    );
    let (status, body) = gw
        .post(&gw.key, "/v1/feedback/batch", json!({"items": items}))
        .await;
    assert_eq!((status, &body["created"]), (200, &json!(260)), "{body}");

    let (status, record) = gw.get(&gw.key, &format!("/v1/completions/{id}")).await;
    assert_eq!(status, 200, "{record}");
    let fb = &record["feedback"];
    assert_eq!(
        (&fb["votes"], &fb["users"], &fb["up"], &fb["down"]),
        (&json!(260), &json!(250), &json!(240), &json!(10))
    );
    assert_eq!(fb["history"].as_array().unwrap().len(), 100);
    assert_eq!(fb["history_has_more"], true);
    assert_eq!(fb["current"].as_array().unwrap().len(), 100);

    for (view, want) in [("history", 260), ("current", 250)] {
        let mut seen = std::collections::HashSet::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut path = format!("/v1/completions/{id}/feedback?view={view}&limit=64");
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let (status, page) = gw.get(&gw.key, &path).await;
            assert_eq!(status, 200, "{page}");
            pages += 1;
            for v in page["data"].as_array().unwrap() {
                assert!(
                    seen.insert(v["id"].as_str().unwrap().to_string()),
                    "{view}: twice"
                );
            }
            if page["has_more"] == false {
                break;
            }
            after = page["last_id"].as_str().map(str::to_string);
        }
        assert_eq!(seen.len(), want, "{view}");
        assert_eq!(pages, want.div_ceil(64), "{view}");
    }
    let (status, body) = gw
        .get(&gw.key, &format!("/v1/completions/{id}/feedback?limit=0"))
        .await;
    assert_eq!((status, &body["error"]["param"]), (400, &json!("limit")));
}

#[tokio::test]
async fn a_vanishing_temperature_decodes_greedily() {
    let gw = TestGateway::tiny().await;
    let answer = |temperature: f64| {
        let gw = &gw;
        async move {
            let (status, body) = gw
                .post(
                    &gw.key,
                    "/v1/chat/completions",
                    json!({"model": gw.model(), "max_tokens": 24, "temperature": temperature,
                           "messages": [{"role": "user", "content": "hello there"}]}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let greedy = answer(0.0).await;
    assert!(!greedy.is_empty());
    assert_eq!(answer(1e-38).await, greedy);
    assert_eq!(answer(1e-30).await, greedy);
}
