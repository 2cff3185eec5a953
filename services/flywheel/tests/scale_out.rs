//! Flywheel scaled out, as processes on one database: three `flywheel
//! serve` gateways (each with its own journal) and two `flywheel worker`s.
//! Under traffic spread over the three, one gateway is killed with
//! SIGKILL and started again on its journal: every chat and vote any
//! gateway acknowledged is stored, once. The workers run every queued job
//! exactly once between them. A promotion made with the CLI reaches every
//! gateway. A user's data deleted through one gateway while another holds
//! that user's records in its journal (its database out of reach) stays
//! deleted when those records are delivered.

use std::collections::BTreeSet;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_tests::{GatewayProcess, TinySetup, cli, eventually, until};
use serde_json::json;

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(db: &str) -> Killed {
    let addr = format!("127.0.0.1:{}", flywheel_tests::free_port());
    Killed(flywheel_tests::spawn(
        db,
        &[
            ("FLYWHEEL_JOB_HEARTBEAT_SECS", "1"),
            ("FLYWHEEL_CURATION_SCHEDULE", "off"),
            ("FLYWHEEL_WORKER_ADDR", &addr),
        ],
        &["worker"],
    ))
}

/// What the gateways acknowledged: completion ids, and votes as
/// (completion id, comment).
#[derive(Default)]
struct Acked {
    completions: BTreeSet<String>,
    votes: BTreeSet<(String, String)>,
    /// Chats acknowledged by each sender (two a gateway: A's 0 and 1, B's
    /// 2 and 3, C's 4 and 5).
    by_sender: [usize; 6],
}

/// Chats and rates on `base` until `stop`; only what is answered 200 or 201
/// counts as acknowledged (a killed gateway's refused connections do not).
async fn traffic(
    base: String,
    key: String,
    tag: usize,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let chat = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(
                &json!({"model": "tiny", "max_tokens": 2, "user": format!("user-{tag}"),
                          "messages": [{"role": "user", "content": format!("ticket {tag}-{n}")}]}),
            )
            .send()
            .await;
        let Ok(resp) = chat else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if resp.status() != 200 {
            continue;
        }
        let Ok(body) = resp.json::<serde_json::Value>().await else {
            continue;
        };
        let id = body["id"].as_str().unwrap().to_string();
        {
            let mut acked = acked.lock().unwrap();
            acked.completions.insert(id.clone());
            acked.by_sender[tag] += 1;
        }
        let comment = format!("vote {tag}-{n}");
        let vote = http
            .post(format!("{base}/v1/feedback"))
            .bearer_auth(&key)
            .json(
                &json!({"completion_id": id, "rating": "up", "comment": comment,
                          "user": format!("user-{tag}")}),
            )
            .send()
            .await;
        if vote.is_ok_and(|r| r.status() == 201) {
            acked.lock().unwrap().votes.insert((id, comment));
        }
    }
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The version id that answered `key`'s chat on `gw`.
async fn served_by(gw: &GatewayProcess, key: &str) -> String {
    let (status, body) = gw
        .post(
            key,
            "/v1/chat/completions",
            json!({"model": "tiny", "max_tokens": 1,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["system_fingerprint"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_and_two_workers_share_one_database_and_lose_nothing() {
    let s = TinySetup::new("fw_scale_out").await;
    let key = s.key("acme");
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    // Gateway C reaches Postgres through a proxy the test can cut.
    let proxy = flywheel_tests::proxy::Proxy::for_database(&s.db).await;
    let journals: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| s.dir.join(format!("journal-{n}")))
        .collect();
    let a = GatewayProcess::start(&s.db, &journals[0], &[]).await;
    let b = GatewayProcess::start(&s.db, &journals[1], &[]).await;
    let c = GatewayProcess::start(&proxy.url(&s.db), &journals[2], &[]).await;
    let _workers = [worker(&s.db), worker(&s.db)];

    // Traffic on all three; B is killed outright part-way and started
    // again on its journal while A and C keep serving.
    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = [&a, &b, &c]
        .iter()
        .enumerate()
        .flat_map(|(i, gw)| (0..2).map(move |j| (i * 2 + j, gw.base.clone())))
        .map(|(tag, base)| {
            tokio::spawn(traffic(base, key.clone(), tag, acked.clone(), stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b_port = b.base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let before = acked.lock().unwrap().by_sender;
    assert!(
        before[2] + before[3] > 0,
        "B acknowledged nothing before it was killed"
    );
    b.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b_child = GatewayProcess::spawn(
        &s.db,
        b_port,
        &journals[1],
        &[],
        std::process::Stdio::null(),
    );
    let b = GatewayProcess {
        child: b_child,
        base: format!("http://127.0.0.1:{b_port}"),
    };
    assert!(flywheel_tests::ready(&b.base).await, "B did not come back");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in senders {
        t.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.by_sender[2] + acked.by_sender[3] > before[2] + before[3],
        "B acknowledged nothing once back"
    );
    assert!(
        acked.completions.len() >= 30,
        "{} chats",
        acked.completions.len()
    );
    for gw in [&a, &b, &c] {
        assert!(
            until(30, || async {
                gw.metric("flywheel_journal_pending_records").await == 0.0
            })
            .await,
            "{} never drained its journal",
            gw.base
        );
    }
    let stored: BTreeSet<String> = sqlx::query_scalar("select id from completions")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let lost: Vec<_> = acked.completions.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged chats lost: {lost:?}");
    let votes: Vec<(String, String)> =
        sqlx::query_as("select completion_id, comment from feedback")
            .fetch_all(&pool)
            .await
            .unwrap();
    let vote_set: BTreeSet<(String, String)> = votes.iter().cloned().collect();
    assert_eq!(votes.len(), vote_set.len(), "a vote stored twice");
    let lost: Vec<_> = acked.votes.difference(&vote_set).collect();
    assert!(lost.is_empty(), "acknowledged votes lost: {lost:?}");

    // The workers run each queued curation once between them.
    let tasks: Vec<String> = (0..4)
        .map(|_| {
            let out = cli(&s.db, &["datasets", "build", "--team", "acme", "--no-wait"]);
            out.trim()
                .strip_prefix("queued curation job ")
                .unwrap_or_else(|| panic!("{out}"))
                .to_string()
        })
        .collect();
    for task in &tasks {
        assert!(
            until(60, || async {
                flywheel_store::jobs::task_state(&pool, task)
                    .await
                    .unwrap()
                    .is_some_and(|t| t.status == "Done")
            })
            .await,
            "{task} never finished"
        );
        let runs = flywheel_store::jobs::runs_of(&pool, task).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:#?}");
        assert_eq!(runs[0].status, "succeeded");
    }

    // A promotion reaches every gateway.
    let copy = s.dir.join("tiny-copy.gguf");
    std::fs::copy(s.dir.join("tiny-4.gguf"), &copy).unwrap();
    cli(
        &s.db,
        &[
            "models",
            "import",
            copy.to_str().unwrap(),
            "--name",
            "tiny-2",
        ],
    );
    let v2 = flywheel_store::models::by_name(&pool, "tiny-2")
        .await
        .unwrap()
        .unwrap()
        .id
        .to_string();
    cli(
        &s.db,
        &[
            "models",
            "promote",
            "tiny-2",
            "--team",
            "acme",
            "--reason",
            "scale-out test",
        ],
    );
    for gw in [&a, &b, &c] {
        let switched = eventually(20, || async {
            (served_by(gw, &key).await == v2).then_some(())
        })
        .await;
        assert!(
            switched.is_some(),
            "{} still serves the old champion",
            gw.base
        );
    }

    // C loses the database; ursula's chat and vote wait in its journal,
    // and olga's.
    proxy.stop();
    let mut held = Vec::new();
    for user in ["ursula", "olga"] {
        let (status, body) = c
            .post(
                &key,
                "/v1/chat/completions",
                json!({"model": "tiny", "max_tokens": 2, "user": user,
                       "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        let (status, body) = c
            .post(
                &key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": "down", "user": user}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        held.push(id);
    }
    assert!(c.metric("flywheel_journal_pending_records").await >= 4.0);
    // Ursula's data is deleted through A while C holds her records.
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/users/ursula/data", a.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // C is replaced by one that reaches the database, on the same journal.
    c.kill();
    let c = GatewayProcess::start(&s.db, &journals[2], &[]).await;
    assert!(
        until(30, || async {
            c.metric("flywheel_journal_pending_records").await == 0.0
        })
        .await
    );
    let n = |sql: &'static str| count(&pool, sql);
    assert_eq!(
        n("select count(*) from completions where end_user = 'olga'").await,
        1
    );
    assert_eq!(
        n("select count(*) from feedback where end_user = 'olga'").await,
        1
    );
    for table in ["completions", "feedback"] {
        let sql = format!("select count(*) from {table} where end_user = 'ursula'");
        assert_eq!(
            count(&pool, &sql).await,
            0,
            "{table}: deleted data came back"
        );
    }
    // Her held chat is not stored; olga's is, under the id C gave it.
    for (id, want) in [(&held[0], 0), (&held[1], 1)] {
        let n: i64 = sqlx::query_scalar("select count(*) from completions where id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, want, "held chat {id}");
    }
}
