//! The Grafana dashboard that ships in `deploy/observability` asks only for
//! series `flywheel serve` and `flywheel worker` export: every metric its
//! queries name is on one of the two `/metrics` pages (read with the
//! Prometheus project's own parser) once traffic, a vote, a refusal and a
//! job have happened.

use std::collections::BTreeSet;

use flywheel_tests::{GatewayProcess, TinySetup, cli, until};
use serde_json::json;

fn dashboard() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/observability/grafana/dashboards/flywheel.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The `flywheel_*` metric names in a PromQL expression.
fn names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("flywheel_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every series name a page exports: its samples, and for each family it
/// declares (`# TYPE`), the names Prometheus stores it under.
fn exported(page: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = flywheel_tests::prometheus::samples(page)
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    for line in page.lines() {
        if let Some(family) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.split_whitespace().next())
        {
            for suffix in ["", "_total", "_bucket", "_count", "_sum"] {
                out.insert(format!("{family}{suffix}"));
            }
        }
    }
    out
}

async fn page(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_asks_only_for_series_the_processes_export() {
    let s = TinySetup::new("fw_dashboard_series").await;
    let key = s.key("acme");
    cli(
        &s.db,
        &["teams", "set", "acme", "--requests-per-minute", "1"],
    );
    let gw = GatewayProcess::start(&s.db, &s.dir.join("journal"), &[]).await;
    let id = gw.complete(&key, Some("ann")).await;
    let (status, _) = gw
        .post(
            &key,
            "/v1/chat/completions",
            json!({"model": "tiny", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "again"}]}),
        )
        .await;
    assert_eq!(status, 429, "the team's limit refuses the second request");
    let (status, body) = gw
        .post(
            &key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "up", "user": "ann"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let addr = format!("127.0.0.1:{}", flywheel_tests::free_port());
    let mut worker = flywheel_tests::spawn(
        &s.db,
        &[
            ("FLYWHEEL_WORKER_ADDR", &addr),
            ("FLYWHEEL_CURATION_SCHEDULE", "off"),
            ("FLYWHEEL_JOB_HEARTBEAT_SECS", "1"),
        ],
        &["worker"],
    );
    // Waits for the worker to run the curation (and fails if it fails).
    cli(&s.db, &["datasets", "build", "--team", "acme"]);
    assert!(
        until(30, || async {
            page(&format!("http://{addr}/metrics"))
                .await
                .contains("flywheel_job_duration_seconds_count")
        })
        .await,
        "the worker never counted its job"
    );

    let mut series = exported(&page(&format!("{}/metrics", gw.base)).await);
    series.extend(exported(&page(&format!("http://{addr}/metrics")).await));
    let d = dashboard();
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut asked = 0;
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let named = names(expr);
            assert!(!named.is_empty(), "{expr}");
            for n in named {
                assert!(
                    series.contains(&n),
                    "panel `{}` asks for {n}, which neither process exports",
                    p["title"]
                );
                asked += 1;
            }
        }
    }
    assert!(asked >= 12, "{asked}");
    let _ = worker.kill();
    let _ = worker.wait();
}
