//! Nothing acknowledged is lost, whatever a client sends: the real binary
//! against real Postgres. Records Postgres refuses are set aside and the
//! others flow on; input that can never be stored is refused up front; a
//! journal is bound to its database; a torn last record is skipped and
//! counted; each fsync policy does what it says.

use std::time::Duration;

use flywheel_gateway::journal::Record;
use flywheel_store::completions::NewCompletion;
use flywheel_store::feedback::Feedback;
use serde_json::json;
use uuid::Uuid;

use flywheel_tests::{GatewayProcess, TinySetup, until};

/// `flywheel journal ...` on `journal`.
fn journal_cli(db: &str, journal: &std::path::Path, args: &[&str]) -> String {
    let dir = journal.display().to_string();
    let args = [&["journal"], args].concat();
    let ran = flywheel_tests::run(Some(db), &[("FLYWHEEL_JOURNAL_DIR", &dir)], &args, None);
    assert!(ran.ok(), "{}", ran.stderr);
    ran.stdout
}

/// How `child` ended, if it did within 30 s.
async fn exit_of(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Whether team `team`'s `n` completions and `n` votes are in Postgres within 10 s.
async fn team_lands(pool: &sqlx::PgPool, team: &str, n: i64) -> bool {
    // Generous: the bound says "not blocked", not how fast (a full test run
    // on 2 cores once took over 10 s while the journal set poison aside).
    until(30, || async {
        let c = count(
            pool,
            &format!("select count(*) from completions c join teams t on t.id = c.team_id where t.name = '{team}'"),
        )
        .await;
        let f = count(
            pool,
            &format!("select count(*) from feedback f join teams t on t.id = f.team_id where t.name = '{team}'"),
        )
        .await;
        c == n && f == n
    })
    .await
}

/// One completion and one vote by `key`'s team through `gw`.
async fn ordinary_traffic(gw: &GatewayProcess, key: &str) {
    let id = gw.complete(key, Some("bo")).await;
    let (status, body) = gw
        .post(
            key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "up", "user": "bo"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

fn completion(id: &str, team: Uuid, model: Uuid, user: Option<String>, output: &str) -> Record {
    Record::Completion(NewCompletion {
        id: id.into(),
        team_id: team,
        model_version_id: model,
        end_user: user,
        request: json!({"messages": [{"role": "user", "content": "hi"}]}),
        output: output.into(),
        finish_reason: "stop".into(),
        prompt_tokens: 1,
        completion_tokens: 1,
        latency_ms: 1.0,
        request_id: None,
        trace_id: None,
        ttft_ms: None,
        started_at: None,
        route: "champion".into(),
        canary_id: None,
    })
}

fn vote(completion: &str, team: Uuid, comment: &str) -> Record {
    Record::Feedback(Feedback {
        id: Uuid::new_v4(),
        completion_id: completion.into(),
        team_id: team,
        end_user: "u".into(),
        rating: "up".into(),
        comment: Some(comment.into()),
        correction: None,
        created_at: chrono::Utc::now(),
    })
}

#[tokio::test]
async fn records_postgres_refuses_are_set_aside_and_the_others_flow_on() {
    let s = TinySetup::new("fw_poison").await;
    let key_b = s.key("beta");
    s.key("alpha");
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    let team: Uuid = sqlx::query_scalar("select id from teams where name = 'alpha'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let model: Uuid = sqlx::query_scalar("select id from model_versions where name = 'tiny'")
        .fetch_one(&pool)
        .await
        .unwrap();
    // A journal as an earlier version left it (bare JSON lines, no header):
    // it acknowledged records Postgres cannot store, among good ones.
    let long_user: String = (0..250)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    let records = [
        completion("chatcmpl-nul", team, model, None, "a\u{0}b"),
        completion("chatcmpl-good", team, model, None, "fine"),
        completion("chatcmpl-long-user", team, model, Some(long_user), "x"),
        vote("chatcmpl-good", team, "nul \u{0} in a comment"),
        vote("chatcmpl-good", team, "a fine comment"),
    ];
    let journal = s.dir.join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let lines: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(journal.join("journal-000000000000.jsonl"), lines).unwrap();

    let gw = GatewayProcess::start(&s.db, &journal, &[]).await;
    ordinary_traffic(&gw, &key_b).await;
    assert!(
        team_lands(&pool, "beta", 1).await,
        "another team's writes reach Postgres"
    );
    assert!(
        until(10, || async {
            count(
                &pool,
                "select count(*) from completions where id = 'chatcmpl-good'",
            )
            .await
                == 1
                && count(
                    &pool,
                    "select count(*) from feedback where comment = 'a fine comment'",
                )
                .await
                    == 1
        })
        .await,
        "the good records around the poison landed"
    );
    assert_eq!(gw.metric("flywheel_journal_set_aside_total").await, 3.0);
    assert_eq!(gw.metric("flywheel_journal_dead_letters").await, 3.0);
    let listed = journal_cli(&s.db, &journal, &["dead-letters"]);
    for (what, code) in [
        ("completion chatcmpl-nul", "22021"),
        ("completion chatcmpl-long-user", "54000"),
    ] {
        let line = listed
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("{what} is not listed:\n{listed}"));
        assert!(line.contains(code), "{line}");
    }
    assert!(listed.contains("3 record(s)"), "{listed}");
    // Replayed unchanged, they are refused again and stay.
    let replayed = journal_cli(&s.db, &journal, &["replay"]);
    assert!(
        replayed.contains("stored 0 record(s); 3 still refused"),
        "{replayed}"
    );
    // Once the cause is fixed (here: the index that limited the size goes),
    // a replay stores what it can.
    sqlx::query("drop index completions_team_user")
        .execute(&pool)
        .await
        .unwrap();
    let replayed = journal_cli(&s.db, &journal, &["replay"]);
    assert!(
        replayed.contains("stored 1 record(s); 2 still refused"),
        "{replayed}"
    );
    assert_eq!(
        count(
            &pool,
            "select count(*) from completions where id = 'chatcmpl-long-user'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn input_that_can_never_be_stored_is_refused_up_front() {
    let s = TinySetup::new("fw_refuse").await;
    let (key_a, key_b) = (s.key("alpha"), s.key("beta"));
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    let gw = GatewayProcess::start(&s.db, &s.dir.join("journal"), &[]).await;
    let id = gw.complete(&key_a, None).await;
    let chat = |extra: serde_json::Value| {
        let mut body = json!({"model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": "a\u{0}b"}]})),
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"user": "a\u{0}b"})),
            "user",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"user": "u".repeat(3000)})),
            "user",
        ),
        (
            "/v1/feedback",
            json!({"completion_id": id, "rating": "up", "comment": "a\u{0}b"}),
            "comment",
        ),
        (
            "/v1/feedback",
            json!({"completion_id": "a\u{0}b", "rating": "up"}),
            "completion_id",
        ),
    ];
    for (round, (path, body, field)) in cases.into_iter().enumerate() {
        let (status, err) = gw.post(&key_a, path, body).await;
        assert_eq!(status, 400, "{path} {field}: {err}");
        assert_eq!(err["error"]["param"], field, "{err}");
        ordinary_traffic(&gw, &key_b).await;
        assert!(
            team_lands(&pool, "beta", round as i64 + 1).await,
            "beta's writes flow after {field}"
        );
    }
    assert_eq!(gw.metric("flywheel_journal_set_aside_total").await, 0.0);
}

#[tokio::test]
async fn a_vote_racing_its_completions_deletion_is_set_aside() {
    let s = TinySetup::new("fw_race").await;
    let key = s.key("race");
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    let journal_a = s.dir.join("journal-a");
    let a = GatewayProcess::start(&s.db, &journal_a, &[]).await;
    let b = GatewayProcess::start(&s.db, &s.dir.join("journal-b"), &[]).await;
    let id = a.complete(&key, Some("zoe")).await;
    assert!(
        until(10, || async {
            count(&pool, "select count(*) from completions").await == 1
        })
        .await
    );
    // Zoe's data is deleted through the other gateway; this one still knows
    // her completion and accepts a vote on it, which can no longer be stored.
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/users/zoe/data", b.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = a
        .post(
            &key,
            "/v1/feedback",
            json!({"completion_id": id, "rating": "down", "user": "yan"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    ordinary_traffic(&a, &key).await;
    assert!(
        until(10, || async {
            count(&pool, "select count(*) from feedback").await == 1
        })
        .await,
        "the votes behind it land"
    );
    let listed = journal_cli(&s.db, &journal_a, &["dead-letters"]);
    let line = listed
        .lines()
        .find(|l| l.contains(&format!("feedback {}", body["id"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("the vote is not listed:\n{listed}"));
    assert!(
        line.contains("23503") && line.contains("foreign key"),
        "{line}"
    );
}

/// Votes acknowledged while the flusher cannot write, then the process killed.
async fn kill_with_pending_votes(s: &TinySetup, journal: &std::path::Path, n: usize) {
    let key = s.key("pending");
    let gw = GatewayProcess::start(&s.db, journal, &[]).await;
    let id = gw.complete(&key, None).await;
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    assert!(
        until(10, || async {
            count(&pool, "select count(*) from completions").await == 1
        })
        .await
    );
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("lock table feedback in access exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    for i in 0..n {
        let (status, _) = gw
            .post(
                &key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": "up", "user": format!("u{i}")}),
            )
            .await;
        assert_eq!(status, 201);
    }
    gw.kill();
    blocker.rollback().await.unwrap();
}

#[tokio::test]
async fn a_journal_for_another_database_is_refused_at_start() {
    let (one, other) = (
        TinySetup::new("fw_jone").await,
        TinySetup::new("fw_jother").await,
    );
    let journal = one.dir.join("journal");
    kill_with_pending_votes(&one, &journal, 5).await;

    let mut wrong = GatewayProcess::spawn(
        &other.db,
        flywheel_tests::free_port(),
        &journal,
        &[],
        std::process::Stdio::piped(),
    );
    let status = exit_of(&mut wrong)
        .await
        .expect("a gateway on another database must not start");
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut wrong.stderr.take().unwrap(), &mut stderr).unwrap();
    let (one_name, other_name) = (
        one.db.rsplit('/').next().unwrap(),
        other.db.rsplit('/').next().unwrap(),
    );
    assert!(
        stderr.contains(&format!("records for database \"{one_name}\""))
            && stderr.contains(&format!("connected to database \"{other_name}\"")),
        "{stderr}"
    );
    let pool = flywheel_store::connect(&other.db).await.unwrap();
    assert_eq!(count(&pool, "select count(*) from feedback").await, 0);

    // Its own database takes it.
    let _gw = GatewayProcess::start(&one.db, &journal, &[]).await;
    let pool = flywheel_store::connect(&one.db).await.unwrap();
    assert!(
        until(10, || async {
            count(&pool, "select count(*) from feedback").await == 5
        })
        .await
    );
}

/// Two gateways on one journal folder would replay and delete each
/// other's segments: the second refuses to start while the first holds
/// the folder, and a gateway starts on it once the first is gone, however
/// it ended (here `kill -9`).
#[tokio::test]
async fn a_second_gateway_on_a_journal_in_use_refuses_to_start() {
    let s = TinySetup::new("fw_jlock").await;
    let journal = s.dir.join("journal");
    let key = s.key("acme");
    let first = GatewayProcess::start(&s.db, &journal, &[]).await;

    let mut second = GatewayProcess::spawn(
        &s.db,
        flywheel_tests::free_port(),
        &journal,
        &[],
        std::process::Stdio::piped(),
    );
    let Some(status) = exit_of(&mut second).await else {
        let _ = second.kill();
        panic!("a second gateway on the same journal must not start");
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("is in use by another process"), "{stderr}");
    // The first serves on.
    let (status, body) = first
        .post(
            &key,
            "/v1/chat/completions",
            json!({"model": "default", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    first.kill();
    let _again = GatewayProcess::start(&s.db, &journal, &[]).await;
}

/// A deletion sent to one gateway while another holds the user's records
/// in its journal, unable to reach the database: when those arrive (here
/// by the replay of the second gateway, killed and started again), none
/// is stored. What the user sends after the deletion is stored.
#[tokio::test]
async fn a_deletion_holds_against_records_another_gateway_delivers_later() {
    let s = TinySetup::new("fw_jdelete").await;
    let key = s.key("acme");
    let proxy = flywheel_tests::proxy::Proxy::for_database(&s.db).await;
    let a = GatewayProcess::start(&s.db, &s.dir.join("journal-a"), &[]).await;
    let b_journal = s.dir.join("journal-b");
    let b = GatewayProcess::start(&proxy.url(&s.db), &b_journal, &[]).await;
    let chat = |user: &'static str| {
        json!({"model": "default", "max_tokens": 2, "user": user,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    // B knows the key while the database is in reach.
    let (status, first) = b.post(&key, "/v1/chat/completions", chat("ursula")).await;
    assert_eq!(status, 200, "{first}");

    // B loses the database; ursula's chat and votes wait in its journal.
    proxy.stop();
    let (status, held) = b.post(&key, "/v1/chat/completions", chat("ursula")).await;
    assert_eq!(status, 200, "{held}");
    for id in [&first["id"], &held["id"]] {
        let vote = json!({"completion_id": id, "rating": "up", "user": "ursula"});
        let (status, body) = b.post(&key, "/v1/feedback", vote).await;
        assert_eq!(status, 201, "{body}");
    }
    // Another user's chat and vote, held too: kept.
    let (status, other) = b.post(&key, "/v1/chat/completions", chat("olga")).await;
    assert_eq!(status, 200, "{other}");
    let vote = json!({"completion_id": other["id"], "rating": "down", "user": "olga"});
    assert_eq!(b.post(&key, "/v1/feedback", vote).await.0, 201);

    // Ursula's data is deleted through A.
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/users/ursula/data", a.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // B comes back and delivers what it held.
    b.kill();
    let b = GatewayProcess::start(&s.db, &b_journal, &[]).await;
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    assert!(
        until(30, || async {
            count(
                &pool,
                "select count(*) from feedback where end_user = 'olga'",
            )
            .await
                == 1
        })
        .await,
        "B's journal was not delivered"
    );
    assert!(
        until(10, || async {
            b.metric("flywheel_journal_pending_records").await == 0.0
        })
        .await
    );
    for table in ["completions", "feedback"] {
        let sql = format!("select count(*) from {table} where end_user = 'ursula'");
        assert_eq!(
            count(&pool, &sql).await,
            0,
            "{table}: deleted data came back"
        );
    }

    // She comes back: what she sends now is kept.
    let (status, again) = b.post(&key, "/v1/chat/completions", chat("ursula")).await;
    assert_eq!(status, 200, "{again}");
    assert!(
        until(10, || async {
            count(
                &pool,
                "select count(*) from completions where end_user = 'ursula'",
            )
            .await
                == 1
        })
        .await
    );
}

#[tokio::test]
async fn a_torn_last_record_is_skipped_and_counted() {
    let s = TinySetup::new("fw_torn").await;
    let journal = s.dir.join("journal");
    kill_with_pending_votes(&s, &journal, 8).await;
    // The machine died in the middle of writing one more record.
    let last = std::fs::read_dir(&journal)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .max()
        .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, br#"1a2b3c4d {"kind":"feedback","id":"9f"#).unwrap();
    drop(f);

    let gw = GatewayProcess::start(&s.db, &journal, &[]).await;
    assert_eq!(gw.metric("flywheel_journal_torn_records_total").await, 1.0);
    assert_eq!(
        gw.metric("flywheel_journal_corrupt_records_total").await,
        0.0
    );
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    assert!(
        until(10, || async {
            count(&pool, "select count(*) from feedback").await == 8
        })
        .await,
        "every acknowledged vote lands"
    );
}

#[tokio::test]
async fn each_fsync_policy_syncs_as_it_says() {
    let s = TinySetup::new("fw_fsync").await;
    let key = s.key("sync");
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    let mut stored = 0;
    for policy in ["always", "batch", "never"] {
        let gw = GatewayProcess::start(
            &s.db,
            &s.dir.join(format!("journal-{policy}")),
            &[("FLYWHEEL_JOURNAL_SYNC", policy)],
        )
        .await;
        let id = gw.complete(&key, None).await;
        // Thirty votes at once: `batch` shares syncs between them.
        let votes: Vec<_> = (0..30)
            .map(|i| {
                let (base, key, id) = (gw.base.clone(), key.clone(), id.clone());
                tokio::spawn(async move {
                    reqwest::Client::new()
                        .post(format!("{base}/v1/feedback"))
                        .bearer_auth(key)
                        .json(
                            &json!({"completion_id": id, "rating": "up", "user": format!("u{i}")}),
                        )
                        .send()
                        .await
                        .unwrap()
                        .status()
                })
            })
            .collect();
        for v in votes {
            assert_eq!(v.await.unwrap(), 201);
        }
        let syncs = gw.metric("flywheel_journal_syncs_total").await;
        match policy {
            "always" => assert!(syncs >= 31.0, "always: {syncs} syncs for 31 records"),
            "batch" => assert!(
                (1.0..31.0).contains(&syncs),
                "batch: {syncs} syncs for 31 records"
            ),
            _ => assert_eq!(syncs, 0.0, "never syncs"),
        }
        stored += 30;
        assert!(
            until(10, || async {
                count(&pool, "select count(*) from feedback").await == stored
            })
            .await
        );
    }
}
