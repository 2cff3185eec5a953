//! The job worker as users run it (`flywheel worker`, real processes): a
//! worker killed mid-job is replaced and the job finishes once; failures are
//! retried with growing delays and recorded; two workers never run one job
//! twice.

use std::process::Child;
use std::time::Duration;

use flywheel_jobs::curate::CurateJob;
use flywheel_store::PgPool;
use flywheel_store::datasets::Scope;
use flywheel_store::jobs::{JobRun, TaskState};

use flywheel_tests::{cli, fresh_database, until};

/// A worker process with a fast heartbeat, no schedule and the given knobs.
fn worker(db: &str, env: &[(&str, &str)]) -> Child {
    let base = [
        ("FLYWHEEL_JOB_HEARTBEAT_SECS", "1"),
        ("FLYWHEEL_CURATION_SCHEDULE", "off"),
    ];
    flywheel_tests::spawn(db, &[&base[..], env].concat(), &["worker"])
}

/// `datasets build --no-wait` prints the task id.
fn enqueue_build(db: &str, team: &str) -> String {
    let out = cli(db, &["datasets", "build", "--team", team, "--no-wait"]);
    out.trim()
        .strip_prefix("queued curation job ")
        .unwrap_or_else(|| panic!("unexpected output: {out}"))
        .to_string()
}

/// A curation of a team that does not exist, queued with `attempts`:
/// every attempt fails. Returns its task id and the team it names.
async fn failing_curation(pool: &PgPool, attempts: u32) -> (String, uuid::Uuid) {
    let missing = uuid::Uuid::new_v4();
    let job = CurateJob {
        scope: Scope::Team(missing),
        rules: Default::default(),
        until: None,
        cycle: None,
    };
    let task = flywheel_jobs::queue::push_curation(pool, &job, attempts)
        .await
        .unwrap();
    (task, missing)
}

async fn state(pool: &PgPool, task: &str) -> TaskState {
    flywheel_store::jobs::task_state(pool, task)
        .await
        .unwrap()
        .unwrap()
}

async fn runs(pool: &PgPool, task: &str) -> Vec<JobRun> {
    flywheel_store::jobs::runs_of(pool, task).await.unwrap()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_worker_killed_mid_job_is_replaced_and_the_job_finishes_once() {
    let db = fresh_database("fw_worker_kill").await;
    flywheel_tests::synth(&db, "acme", 400, 200);
    let pool = flywheel_store::connect(&db).await.unwrap();
    // This worker stops for a minute between building and writing.
    let mut slow = worker(&db, &[("FLYWHEEL_TEST_FAULTS", "curate_pause_ms=60000")]);
    let task = enqueue_build(&db, "acme");
    assert!(
        until(30, || async {
            runs(&pool, &task)
                .await
                .iter()
                .any(|r| r.status == "running")
        })
        .await,
        "the first worker never started the job"
    );
    slow.kill().unwrap();
    slow.wait().unwrap();

    let _replacement = Killed(worker(&db, &[]));
    assert!(
        until(60, || async { state(&pool, &task).await.status == "Done" }).await,
        "the job was not finished by the second worker: {:?}",
        state(&pool, &task).await
    );
    let history = runs(&pool, &task).await;
    assert_eq!(history.len(), 2, "{history:#?}");
    assert_eq!(
        history[0].status, "running",
        "the killed attempt never ended"
    );
    assert_eq!(history[1].status, "succeeded");
    assert_ne!(history[0].worker, history[1].worker);
    assert!(history[1].attempt > history[0].attempt);
    let versions = flywheel_store::datasets::list(&pool, None).await.unwrap();
    assert_eq!(versions.len(), 1, "the job wrote its version once");
    assert!(versions[0].kto_count > 0);
}

#[tokio::test]
async fn failing_jobs_are_retried_with_growing_delays_and_their_errors_kept() {
    let db = fresh_database("fw_worker_retry").await;
    cli(&db, &["migrate"]);
    let pool = flywheel_store::connect(&db).await.unwrap();
    let _w = Killed(worker(&db, &[("FLYWHEEL_JOB_BACKOFF_SECS", "1")]));
    let (task, missing) = failing_curation(&pool, 3).await;
    assert!(
        until(60, || async {
            let s = state(&pool, &task).await;
            s.status == "Failed" && s.attempts >= 3
        })
        .await,
        "the job did not use up its attempts: {:?}",
        state(&pool, &task).await
    );
    let history = runs(&pool, &task).await;
    assert_eq!(history.len(), 3, "{history:#?}");
    for r in &history {
        assert_eq!(r.status, "failed");
        let error = r.error.as_deref().unwrap();
        assert!(error.contains(&missing.to_string()), "{error}");
    }
    let gap = |a: &JobRun, b: &JobRun| (b.started_at - a.started_at).num_milliseconds();
    assert!(gap(&history[0], &history[1]) >= 1000, "{history:#?}");
    assert!(gap(&history[1], &history[2]) >= 2000, "{history:#?}");
    // Out of attempts: it is not picked up again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(runs(&pool, &task).await.len(), 3);
}

#[tokio::test]
async fn two_workers_run_each_job_once() {
    let db = fresh_database("fw_worker_pair").await;
    let teams = ["north", "south", "east", "west"];
    for team in teams {
        flywheel_tests::synth(&db, team, 200, 100);
    }
    let pool = flywheel_store::connect(&db).await.unwrap();
    let _a = Killed(worker(&db, &[]));
    let _b = Killed(worker(&db, &[]));
    let tasks: Vec<String> = teams.iter().map(|t| enqueue_build(&db, t)).collect();
    for task in &tasks {
        assert!(
            until(60, || async { state(&pool, task).await.status == "Done" }).await,
            "{task}: {:?}",
            state(&pool, task).await
        );
    }
    for task in &tasks {
        let history = runs(&pool, task).await;
        assert_eq!(history.len(), 1, "{history:#?}");
        assert_eq!(history[0].status, "succeeded");
    }
    let versions = flywheel_store::datasets::list(&pool, None).await.unwrap();
    assert_eq!(versions.len(), teams.len());
}

/// The worker's own listener: probes and its jobs' figures, read back with
/// the Prometheus project's Python parser (as the gateway's are in
/// `tests/tests/metrics.rs`).
#[tokio::test]
async fn a_worker_answers_probes_and_counts_its_jobs_by_kind_and_outcome() {
    let db = fresh_database("fw_worker_metrics").await;
    flywheel_tests::synth(&db, "acme", 40, 20);
    let pool = flywheel_store::connect(&db).await.unwrap();
    let port = flywheel_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _w = Killed(worker(&db, &[("FLYWHEEL_WORKER_ADDR", &addr)]));
    let base = format!("http://{addr}");
    assert!(
        until(30, || async {
            reqwest::get(format!("{base}/healthz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await,
        "the worker's listener never answered"
    );
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );

    // One curation that succeeds, one that fails (its team does not exist).
    let ok = enqueue_build(&db, "acme");
    let (bad, _) = failing_curation(&pool, 1).await;
    assert!(
        until(60, || async {
            state(&pool, &ok).await.status == "Done" && state(&pool, &bad).await.status == "Failed"
        })
        .await
    );
    let rows = flywheel_tests::prometheus::scrape(&format!("{base}/metrics")).await;
    let count = |outcome: &str| {
        flywheel_tests::prometheus::value(
            &rows,
            "flywheel_job_duration_seconds_count",
            &serde_json::json!({"kind": "curate", "outcome": outcome}),
        )
    };
    assert_eq!(
        (count("succeeded"), count("failed")),
        (1.0, 1.0),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|(n, _, v)| n == "flywheel_database_up" && *v == 1.0)
    );

    // A loop cycle that asks for more new examples than there are: it
    // curates, then ends skipped; the page counts cycles by status.
    let out = cli(
        &db,
        &[
            "loop",
            "--team",
            "acme",
            "--min-new-examples",
            "100000",
            "--no-wait",
        ],
    );
    assert!(
        until(60, || async {
            flywheel_store::cycles::count_by_status(&pool)
                .await
                .unwrap()
                .iter()
                .any(|(s, _)| s != "running")
        })
        .await,
        "the cycle never ended: {out}"
    );
    let ended = flywheel_store::cycles::count_by_status(&pool)
        .await
        .unwrap();
    assert_eq!(ended, [("skipped".to_string(), 1)], "{out}");
    let rows = flywheel_tests::prometheus::scrape(&format!("{base}/metrics")).await;
    let cycles = |status: &str| {
        flywheel_tests::prometheus::value(
            &rows,
            "flywheel_cycles",
            &serde_json::json!({"status": status}),
        )
    };
    assert_eq!(
        (cycles("skipped"), cycles("running")),
        (1.0, 0.0),
        "{rows:?}"
    );
}
