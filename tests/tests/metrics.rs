//! `/metrics` read back as Prometheus reads it: the whole page through the
//! Prometheus project's own text-format parser (the PyPI package
//! prometheus-client, which the test command installs), and the histograms
//! of HTTP requests and of completions moving with the traffic sent.

use flywheel_tests::TestGateway;
use flywheel_tests::prometheus::value;
use serde_json::{Value, json};

/// Every sample on the gateway's page.
async fn samples(gw: &TestGateway) -> Vec<(String, Value, f64)> {
    let page = reqwest::get(format!("{}/metrics", gw.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    flywheel_tests::prometheus::samples(&page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_the_histograms_count_the_traffic() {
    let gw = TestGateway::tiny().await;
    let model = gw.model().to_string();
    let before = samples(&gw).await;
    let (mut written, mut wrote_any, mut wrote_two) = (0.0, 0.0, 0.0);
    // The three chats below ask the same; the second and third start from
    // the first's kept cache (all but the prompt's last token).
    let asked = "hi, my parcel has not arrived yet";
    let mut prompt_tokens = 0.0;
    for (user, rating) in [("a", "up"), ("b", "down")] {
        let (status, body) = gw
            .post(
                &gw.key,
                "/v1/chat/completions",
                json!({"model": model, "max_tokens": 5, "user": user,
                       "messages": [{"role": "user", "content": asked}]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        prompt_tokens = body["usage"]["prompt_tokens"].as_f64().unwrap();
        let tokens = body["usage"]["completion_tokens"].as_f64().unwrap();
        written += tokens;
        // The random tiny model may end at once: no first token then.
        wrote_any += f64::from(u8::from(tokens > 0.0));
        wrote_two += f64::from(u8::from(tokens > 1.0));
        let vote = json!({"completion_id": body["id"], "rating": rating, "user": user});
        assert_eq!(gw.post(&gw.key, "/v1/feedback", vote).await.0, 201);
    }
    // A chat that cannot end before its 4 tokens (its end-of-turn tokens
    // banned): at least one completion with gaps between its tokens.
    let bias = gw.no_end_of_turn().await;
    let (status, body) = gw
        .post(
            &gw.key,
            "/v1/chat/completions",
            json!({"model": model, "max_tokens": 4, "logit_bias": bias,
                   "messages": [{"role": "user", "content": asked}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    written += 4.0;
    wrote_any += 1.0;
    wrote_two += 1.0;
    let missing = reqwest::Client::new()
        .get(format!("{}/v1/models/no-such-model", gw.base))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let after = samples(&gw).await;
    let moved =
        |name: &str, labels: Value| value(&after, name, &labels) - value(&before, name, &labels);

    assert!(
        prompt_tokens > 16.0,
        "{prompt_tokens}: too short to be kept"
    );
    assert_eq!(
        moved("flywheel_engine_prompt_tokens_cached_total", json!({})),
        2.0 * (prompt_tokens - 1.0)
    );
    assert_eq!(
        moved("flywheel_engine_prompt_tokens_total", json!({})),
        prompt_tokens + 2.0
    );

    let chats = json!({"method": "POST", "route": "/v1/chat/completions", "status": "200"});
    assert_eq!(
        moved(
            "flywheel_http_request_duration_seconds_count",
            chats.clone()
        ),
        3.0
    );
    assert!(moved("flywheel_http_request_duration_seconds_sum", chats) > 0.0);
    // The route's pattern, not the path asked for.
    let missing = json!({"method": "GET", "route": "/v1/models/{name}", "status": "404"});
    assert_eq!(
        moved("flywheel_http_request_duration_seconds_count", missing),
        1.0
    );
    assert!(
        !after
            .iter()
            .any(|(_, l, _)| l.to_string().contains("no-such-model")),
        "a raw path became a label"
    );
    // Each bucket counts the requests at most its bound: the last (+Inf)
    // counts them all.
    let inf =
        json!({"method": "POST", "route": "/v1/chat/completions", "status": "200", "le": "+Inf"});
    assert_eq!(
        moved("flywheel_http_request_duration_seconds_bucket", inf),
        3.0
    );

    assert_eq!(
        value(&after, "flywheel_model_info", &json!({"model": model})),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "flywheel_build_info",
            &json!({"version": env!("CARGO_PKG_VERSION")})
        ),
        1.0
    );

    // Every loaded engine by the version it loaded: here the one engine.
    assert!(
        moved(
            "flywheel_engines_prompt_tokens_total",
            json!({"model": model})
        ) > 0.0
    );
    assert!(
        moved(
            "flywheel_engines_generated_tokens_total",
            json!({"model": model})
        ) >= written
    );
    for gauge in ["flywheel_engines_queue_depth", "flywheel_engines_running"] {
        assert!(
            after
                .iter()
                .any(|(n, l, _)| n == gauge && l["model"] == model.as_str()),
            "{gauge}"
        );
    }

    // Votes by the version that made the completions, and their rating.
    let version = gw.served.version_id.to_string();
    for rating in ["up", "down"] {
        assert_eq!(
            moved(
                "flywheel_votes_total",
                json!({"version_id": version, "rating": rating})
            ),
            1.0,
            "{rating}"
        );
    }

    let by_model = json!({"model": model});
    assert_eq!(
        moved(
            "flywheel_time_to_first_token_seconds_count",
            by_model.clone()
        ),
        wrote_any
    );
    assert_eq!(
        moved(
            "flywheel_completion_duration_seconds_count",
            by_model.clone()
        ),
        3.0
    );
    assert_eq!(
        moved(
            "flywheel_inter_token_latency_seconds_count",
            by_model.clone()
        ),
        wrote_two
    );
    assert_eq!(
        moved("flywheel_completion_output_tokens_sum", by_model),
        written
    );
}

/// A team whose champion is a model of its own (not an adapter) is served
/// by an engine of its own: its completions are counted under its version,
/// and that engine's queue, batch and tokens have their own series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_champion_on_its_own_engine_has_its_own_series() {
    let gw = TestGateway::tiny().await;
    let dir = std::env::temp_dir().join(format!("fw-metrics-own-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 21).unwrap();
    let own = flywheel_modelhub::ModelCache::new(dir.join("cache"))
        .unwrap()
        .import(&path, Some("tiny-own"))
        .await
        .unwrap();
    let own = flywheel::register(&gw.db.pool, &own).await.unwrap();
    let (_, key) = flywheel_store::keys::create_key(&gw.db.pool, "team-own")
        .await
        .unwrap();
    let team = flywheel_store::keys::team_id(&gw.db.pool, "team-own")
        .await
        .unwrap()
        .unwrap();
    flywheel_store::models::set_team_champion(
        &mut gw.db.pool.acquire().await.unwrap(),
        team,
        Some(own.id),
    )
    .await
    .unwrap();
    gw.state.set_loader(flywheel::serve::gateway_loader(
        &flywheel_tests::config(),
        &gw.db.pool,
    ));
    gw.state.refresh_routes().await.unwrap();

    let before = samples(&gw).await;
    let (status, body) = gw
        .post(
            &key,
            "/v1/chat/completions",
            json!({"model": gw.model(), "max_tokens": 3,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "tiny-own", "served by the team's champion");
    let after = samples(&gw).await;
    let own_model = json!({"model": "tiny-own"});
    let moved = |name: &str| value(&after, name, &own_model) - value(&before, name, &own_model);
    assert_eq!(moved("flywheel_completion_duration_seconds_count"), 1.0);
    assert_eq!(
        moved("flywheel_completion_output_tokens_sum"),
        body["usage"]["completion_tokens"].as_f64().unwrap()
    );
    assert!(moved("flywheel_engines_prompt_tokens_total") > 0.0);
    for gauge in ["flywheel_engines_queue_depth", "flywheel_engines_running"] {
        assert!(
            after
                .iter()
                .any(|(n, l, _)| n == gauge && l["model"] == "tiny-own"),
            "{gauge}"
        );
    }
}
