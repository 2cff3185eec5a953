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
        // Rows, and the acknowledged votes among them (each vote had its
        // own user, u0 to u119): a lost vote or a stray row shows in one.
        sqlx::query_as::<_, (i64, i64)>(
            "select count(*), count(*) filter (where end_user = any($1)) from feedback",
        )
        .bind((0..N).map(|i| format!("u{i}")).collect::<Vec<_>>())
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
    let users: i64 = sqlx::query_scalar("select count(distinct end_user) from feedback")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(users, N as i64, "one row for each acknowledged vote");
    let completions: i64 = sqlx::query_scalar("select count(*) from completions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(completions, 1);
}

/// The journal's disk fills up (a 256 KiB tmpfs, mounted for the test: it
/// needs root, as `make test` runs here) while Postgres is held back: votes
/// the journal cannot hold are refused with 503, never acknowledged and
/// lost. The gateway is then killed and started again once Postgres takes
/// writes: its replay stores exactly the acknowledged votes, the journal
/// frees its disk, and votes are taken again.
#[tokio::test]
async fn a_full_journal_disk_refuses_votes_and_loses_none_it_acknowledged() {
    let setup = flywheel_tests::TinySetup::new("fw_diskfull").await;
    let journal = setup.dir.join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&journal)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(journal.clone());
    let key = setup.key("full");
    let gateway = flywheel_tests::GatewayProcess::start(&setup.db, &journal, &[]).await;
    let chat =
        json!({"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]});
    let (status, chat) = gateway.post(&key, "/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{chat}");
    let id = chat["id"].as_str().unwrap().to_string();
    let pool = flywheel_store::connect(&setup.db).await.unwrap();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("lock table feedback in access exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    // Comments of 2 KiB and of 50 bytes in turn, until the disk is full: a
    // short vote may fit where a long one was cut off.
    let vote = |i: usize| {
        let comment = if i.is_multiple_of(2) {
            "x".repeat(2048)
        } else {
            "y".repeat(50)
        };
        json!({"completion_id": id, "rating": "down", "user": format!("u{i}"), "comment": comment})
    };
    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    for i in 0..400 {
        match gateway.post(&key, "/v1/feedback", vote(i)).await {
            (201, _) => acknowledged.push(format!("u{i}")),
            (503, body) => {
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("disk is full"), "{body}");
                refused += 1;
            }
            (other, body) => panic!("vote {i}: {other} {body}"),
        }
    }
    assert!(refused > 0, "the disk never filled");
    assert!(
        acknowledged.len() > 20,
        "only {} acknowledged",
        acknowledged.len()
    );

    gateway.kill(); // SIGKILL: the votes are only in the full journal
    blocker.rollback().await.unwrap();
    let gateway = flywheel_tests::GatewayProcess::start(&setup.db, &journal, &[]).await;
    let landed = flywheel_tests::until(60, || async {
        let n: i64 = sqlx::query_scalar("select count(*) from feedback")
            .fetch_one(&pool)
            .await
            .unwrap();
        n >= acknowledged.len() as i64
    })
    .await;
    assert!(landed, "the acknowledged votes did not land");
    let mut users: Vec<String> = sqlx::query_scalar("select end_user from feedback")
        .fetch_all(&pool)
        .await
        .unwrap();
    users.sort();
    acknowledged.sort();
    assert_eq!(
        users, acknowledged,
        "exactly the acknowledged votes, once each"
    );
    // The journal frees its disk once everything is stored.
    let taken = flywheel_tests::until(60, || async {
        gateway.post(&key, "/v1/feedback", vote(10_000)).await.0 == 201
    })
    .await;
    assert!(taken, "votes were still refused after the journal drained");
    gateway.kill();
}
