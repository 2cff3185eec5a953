//! Nothing acknowledged is lost when the gateway process is killed outright:
//! votes that got a 201 are in the journal and reach Postgres after restart,
//! each exactly once.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::json;

use flywheel_tests::{cli, fresh_database};

fn serve(db: &str, port: u16, journal: &std::path::Path) -> Child {
    flywheel_tests::GatewayProcess::spawn(db, port, journal, &[], Stdio::null())
}

#[tokio::test]
async fn kill_9_after_acknowledged_votes_loses_none_and_duplicates_none() {
    let db = fresh_database("fw_kill").await;
    cli(&db, &["migrate"]);
    let dir = std::env::temp_dir().join(format!("fw-kill-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = flywheel_model::testing::write_tiny_model(&dir, 4).unwrap();
    cli(
        &db,
        &[
            "models",
            "import",
            model.to_str().unwrap(),
            "--name",
            "tiny",
        ],
    );
    let key = cli(&db, &["keys", "create", "--team", "kill"])
        .lines()
        .last()
        .unwrap()
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let journal = dir.join("journal");

    let mut gateway = serve(&db, port, &journal);
    assert!(
        flywheel_tests::ready(&base).await,
        "the gateway did not become ready"
    );
    let http = reqwest::Client::new();
    let chat: serde_json::Value = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = chat["id"].as_str().unwrap().to_string();

    // Keep the flusher from writing votes, so they are only in the journal
    // when the process dies.
    let pool = flywheel_store::connect(&db).await.unwrap();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("lock table feedback in access exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    const N: usize = 120;
    for i in 0..N {
        let resp = http
            .post(format!("{base}/v1/feedback"))
            .bearer_auth(&key)
            .json(&json!({"completion_id": id, "rating": if i % 2 == 0 { "up" } else { "down" }, "user": format!("u{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    gateway.kill().unwrap(); // SIGKILL
    gateway.wait().unwrap();
    blocker.rollback().await.unwrap();
    let count = || async {
        sqlx::query_as::<_, (i64, i64)>("select count(*), count(distinct id) from feedback")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert!(
        count().await.0 < N as i64,
        "the votes were still only in the journal"
    );

    let mut gateway = serve(&db, port, &journal);
    assert!(
        flywheel_tests::ready(&base).await,
        "the gateway did not become ready"
    );
    let mut last = (0, 0);
    for _ in 0..150 {
        last = count().await;
        if last.0 >= N as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    assert_eq!(last, (N as i64, N as i64), "every acknowledged vote, once");
    let completions: i64 = sqlx::query_scalar("select count(*) from completions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(completions, 1);
}
