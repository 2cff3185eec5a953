//! The loop by itself, end to end: real Postgres, a real gateway serving the
//! tiny model, votes and corrections through the public API, and a worker
//! (curation, training, evaluation and its canary monitor) with no step in
//! between from the test but more traffic.
//!
//! On the path a team gets by default (a tenth of its users on a canary, no
//! task suite, near-duplicates and the eval split on, the latency rule at
//! 1.5x, training at nice 19): a first cycle is judged on its held-out
//! corrections, starts a canary, and the worker's monitor promotes it on
//! live thumbs; a canary its users dislike is rolled back by the monitor; a
//! stage whose job gives up fails its cycle with the error; a cycle while
//! another run holds the base is skipped, saying so; too little held-out
//! evidence skips training, saying how much more is needed. And two
//! automatic cycles on the schedule: a winner promoted on the offline
//! evidence, then kept against a tie, on the tiny llama and on a tiny
//! Gemma 2.

use std::time::Duration;

use flywheel_curation::build::Rules;
use flywheel_jobs::schedule::{CurationSchedule, parse_cron};
use flywheel_jobs::stages::JobQueue;
use flywheel_loop::machine::{self, Move};
use flywheel_store::canaries::CanaryStatus;
use flywheel_store::cycles::{Cycle, Stage, Status, Trigger};
use flywheel_store::decisions::DecisionKind;
use flywheel_tests::tiny_loop::{self, chat, rate_routing, routing_traffic, vote, votes_stored};
use flywheel_tests::tiny_task::{self, ANSWER, GENERAL, ROUTING, tickets, topics};
use flywheel_tests::{TestGateway, eventually};
use serde_json::{Value, json};
use uuid::Uuid;

/// Cycle 2's traffic in the scheduled test: more of the same task, in
/// prompts never sent before.
const MORE_TASK: [&str; 12] = [
    "route ticket mike",
    "route ticket november",
    "route ticket oscar",
    "route ticket papa",
    "route ticket quebec",
    "route ticket romeo",
    "route ticket sierra",
    "route ticket tango",
    "route ticket uniform",
    "route ticket victor",
    "route ticket whiskey",
    "route ticket xray",
];

/// The team's cycles, oldest first.
async fn cycles(gw: &TestGateway, team: Uuid) -> Vec<Cycle> {
    let mut c = flywheel_store::cycles::list(&gw.db.pool, Some(team), 50)
        .await
        .unwrap();
    c.reverse();
    c
}

/// Waits for the first cycle after `after` (by id) that ended other than
/// skipped. (A cycle whose slot came while only part of the traffic had
/// arrived ends skipped, below the minimum of new examples.)
async fn decided(gw: &TestGateway, team: Uuid, after: &[Uuid]) -> Cycle {
    let found = eventually(600, || async {
        cycles(gw, team).await.into_iter().find(|c| {
            !after.contains(&c.id) && !matches!(c.status, Status::Running | Status::Skipped)
        })
    })
    .await;
    match found {
        Some(c) => c,
        None => panic!("no cycle was decided: {:#?}", cycles(gw, team).await),
    }
}

fn stages(c: &Cycle) -> Vec<Stage> {
    c.stage_records().into_iter().map(|s| s.stage).collect()
}

fn moves(c: &Cycle) -> Vec<Move> {
    machine::path(c).into_iter().map(|t| t.by).collect()
}

fn general() -> Vec<String> {
    GENERAL.iter().map(|g| g.to_string()).collect()
}

/// A first cycle's traffic on the default path: the general questions,
/// liked, and routing requests the base answers wrong, each corrected by
/// its user, twenty at a time until the examples they make reach the
/// shipped minimum of new ones (200). Returns the routing requests sent
/// (each a correction; at least 40, so the gate gets its 10 held out).
async fn first_traffic(gw: &TestGateway) -> usize {
    let min = flywheel_tests::config().training.min_new_examples;
    let liked = tiny_loop::liked_general(gw, "g", &general()).await;
    let (mut examples, mut votes, mut n) = (liked.examples, liked.votes, 0);
    while examples < min || n < 40 {
        let sent = routing_traffic(gw, &format!("t{n}-"), &tickets(n, 20)).await;
        assert_eq!(sent.right, 0, "the base does not know the task yet");
        (examples, votes, n) = (examples + sent.examples, votes + sent.votes, n + 20);
    }
    votes_stored(gw, votes as i64).await;
    n
}

/// Starts a cycle as `flywheel loop` does.
async fn start_cycle(gw: &TestGateway, team: Uuid) -> Uuid {
    let queue = JobQueue::default();
    let cfg = tiny_loop::loop_config();
    flywheel_loop::cycle::start(&gw.db.pool, &queue, team, Trigger::Manual, &cfg)
        .await
        .unwrap()
        .expect("no cycle was running")
}

/// The first cycle on the default path, up to its canary: judged on the
/// held-out corrections (no suite), passed, and a tenth of the team's users
/// on the candidate. Returns the cycle and how many routing requests its
/// traffic sent.
async fn first_cycle_to_canary(gw: &TestGateway, team: Uuid) -> (Cycle, usize) {
    let sent = first_traffic(gw).await;
    let id = start_cycle(gw, team).await;
    let c = tiny_loop::wait_cycle(&gw.db.pool, id, Some(Stage::Canary), 600).await;
    assert_eq!(
        (c.status, c.stage),
        (Status::Running, Stage::Canary),
        "{c:#?}"
    );
    assert_eq!(moves(&c), [Move::Train, Move::Evaluate, Move::Canary]);
    let e = flywheel_store::evals::get(&gw.db.pool, c.evaluation_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.passed, Some(true), "{:?}", e.reasons);
    let reasons = e.reasons.unwrap().to_string();
    assert!(
        reasons.contains("pass: held-out heldout-corrections contains_match (no task suite)"),
        "{reasons}"
    );
    assert!(reasons.contains("pass: latency (alone)"), "{reasons}");
    let metrics = flywheel_store::evals::metrics(&gw.db.pool, e.id)
        .await
        .unwrap();
    let held = metrics
        .iter()
        .find(|m| m.suite == "heldout-corrections" && m.metric == "contains_match")
        .unwrap();
    // At least the gate's minimum held out, never trained on.
    assert!(held.items >= 10, "{held:?}");
    assert!(held.candidate > 0.5 && held.champion == 0.0, "{held:?}");
    let d = &flywheel_store::decisions::list(&gw.db.pool, Some(team), 1)
        .await
        .unwrap()[0];
    assert_eq!(d.kind, DecisionKind::CanaryStarted);
    (c, sent)
}

/// End users who keep chatting while the canary runs: the first `n` on
/// each side (a user always lands on one side), each sending one routing
/// request, voted by `up`. Returns each side's thumbs up (canary,
/// champion), out of `n` each.
async fn live_traffic(at: &AtCanary, n: usize, up: impl Fn(&str) -> bool) -> (usize, usize) {
    let (gw, canary, candidate) = (&at.gw, at.canary, at.candidate);
    gw.state.refresh_routes().await.unwrap();
    let share = flywheel_tests::config().promotion.canary_share;
    let (mut on_canary, mut on_champion) = (0, 0);
    let (mut up_canary, mut up_champion) = (0, 0);
    // The requests the team's users sent before (the first cycle's routing
    // tickets, most of them trained on). The monitor judges how each
    // side's answers are rated; on these the candidate reliably gives the
    // answer it learned, where on phrasings it never saw the tiny model's
    // answers vary from run to run (exact on 9 to 41 of 50, tried).
    let prompts = tickets(0, at.sent);
    for u in 0.. {
        if on_canary >= n && on_champion >= n {
            break;
        }
        let user = format!("live-{u}");
        let canary_side = flywheel_gateway::serving::placement(canary, &user) < share;
        let count = if canary_side {
            &mut on_canary
        } else {
            &mut on_champion
        };
        if *count >= n {
            continue;
        }
        *count += 1;
        let (id, answer, served_by) = chat(gw, &user, &prompts[u % prompts.len()]).await;
        assert_eq!(
            served_by == candidate.to_string(),
            canary_side,
            "{user} is served by its side"
        );
        let liked = up(&answer);
        if canary_side {
            up_canary += usize::from(liked);
        } else {
            up_champion += usize::from(liked);
        }
        // Users who would like the task's answer write it in.
        let correction = (!liked && up(ANSWER)).then_some(ANSWER);
        vote(gw, &user, &id, liked, correction).await;
    }
    (up_canary, up_champion)
}

/// A team's first cycle on the default path, run by a worker with the
/// shipped settings, up to its canary.
struct AtCanary {
    gw: TestGateway,
    team: Uuid,
    cycle: Cycle,
    candidate: Uuid,
    canary: Uuid,
    /// Routing requests the first cycle's traffic sent.
    sent: usize,
    worker: (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ),
}

impl AtCanary {
    async fn start() -> Self {
        let gw = TestGateway::tiny().await;
        let pool = gw.db.pool.clone();
        let team = gw.team_id().await;
        let home = tiny_loop::home();
        let worker = tiny_loop::spawn_worker(&pool, tiny_loop::worker(&pool, &home, "w"));
        let (cycle, sent) = first_cycle_to_canary(&gw, team).await;
        let (candidate, canary) = (
            cycle.candidate_version_id.unwrap(),
            cycle.canary_id.unwrap(),
        );
        Self {
            gw,
            team,
            cycle,
            candidate,
            canary,
            sent,
            worker,
        }
    }

    async fn stop(self) {
        let _ = self.worker.0.send(());
        self.worker.1.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_cycle_judged_on_held_out_corrections_is_promoted_by_its_canary() {
    let at = AtCanary::start().await;
    let (gw, team, c, candidate, canary) = (&at.gw, at.team, &at.cycle, at.candidate, at.canary);
    let pool = gw.db.pool.clone();

    // The users keep chatting: the canary answers their requests right, the
    // champion does not; the worker's monitor decides once each side has
    // the shipped minimum of votes.
    let min = flywheel_tests::config().promotion.canary_min_votes as usize;
    let (up_canary, up_champion) = live_traffic(&at, min, |a| a == ANSWER).await;
    // The scenario holds before the monitor is judged on it: the users
    // liked the canary's answers more.
    assert!(
        up_canary > up_champion,
        "{up_canary} vs {up_champion} of {min}"
    );
    let c = tiny_loop::wait_cycle(&pool, c.id, None, 120).await;
    assert_eq!(c.status, Status::Promoted, "{c:#?}");
    assert_eq!(
        stages(&c),
        [Stage::Curate, Stage::Train, Stage::Evaluate, Stage::Canary]
    );
    assert_eq!(
        moves(&c),
        [Move::Train, Move::Evaluate, Move::Canary, Move::Promote]
    );
    let kinds: Vec<DecisionKind> = flywheel_store::decisions::list(&pool, Some(team), 5)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.kind)
        .collect();
    assert_eq!(
        kinds,
        [DecisionKind::CanaryPassed, DecisionKind::CanaryStarted]
    );
    let ended = flywheel_store::canaries::get(&pool, canary)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.status, CanaryStatus::Promoted);
    let champion = flywheel_store::models::team_champion(&pool, team)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.id, candidate);
    // Every user is served by it now.
    let served = eventually(20, || async {
        let (_, answer, by) = chat(gw, "anyone", "route ticket zebra").await;
        (by == candidate.to_string()).then_some(answer)
    })
    .await
    .expect("the new champion serves the team");
    assert_eq!(served, ANSWER);
    at.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_its_users_dislike_is_rolled_back_by_the_monitor() {
    let at = AtCanary::start().await;
    let (gw, team, c, canary) = (&at.gw, at.team, &at.cycle, at.canary);
    let pool = gw.db.pool.clone();

    // The corrections came from users whose idea of the task the others do
    // not share: the live users dislike the answer the canary learned (and
    // an empty one, which the tiny candidate gives to some requests), and
    // like the champion's. The offline evidence passed; the thumbs decide.
    let min = flywheel_tests::config().promotion.canary_min_votes as usize;
    let (up_canary, up_champion) = live_traffic(&at, min, |a| !a.is_empty() && a != ANSWER).await;
    assert!(
        up_canary < up_champion,
        "{up_canary} vs {up_champion} of {min}"
    );
    let c = tiny_loop::wait_cycle(&pool, c.id, None, 120).await;
    assert_eq!(c.status, Status::RolledBack, "{c:#?}");
    assert_eq!(
        moves(&c),
        [Move::Train, Move::Evaluate, Move::Canary, Move::RollBack]
    );
    let reason = c.reason.unwrap();
    assert!(reason.contains("worse than the champion"), "{reason}");
    let d = &flywheel_store::decisions::list(&pool, Some(team), 1)
        .await
        .unwrap()[0];
    assert_eq!(
        (d.kind, d.canary_id),
        (DecisionKind::RolledBack, Some(canary))
    );
    assert_eq!(
        flywheel_store::models::team_champion(&pool, team)
            .await
            .unwrap()
            .unwrap()
            .id,
        gw.served.version_id,
        "the champion stays"
    );
    at.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_job_gives_up_fails_its_cycle_with_the_error() {
    let gw = TestGateway::tiny().await;
    let pool = gw.db.pool.clone();
    let team = gw.team_id().await;
    let home = tiny_loop::home();
    // The fault: the worker's scratch space is unusable (its folder's
    // parent is a file), so every attempt of the training job fails when it
    // lays out the run's files.
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("not-a-folder"), "a file").unwrap();
    let mut w = tiny_loop::worker(&pool, &home, "w");
    if let Some(t) = w.training.as_mut() {
        t.work_dir = home.join("not-a-folder").join("work");
    }
    // The shipped attempts, a second apart rather than 10 s doubling (the
    // five would take two and a half minutes of waiting).
    w.backoff.base = Duration::from_secs(1);
    let attempts = w.max_attempts;
    let (stop, worker) = tiny_loop::spawn_worker(&pool, w);
    first_traffic(&gw).await;
    let id = start_cycle(&gw, team).await;
    let c = tiny_loop::wait_cycle(&pool, id, None, 300).await;
    assert_eq!((c.status, c.stage), (Status::Failed, Stage::Done), "{c:#?}");
    assert_eq!(moves(&c), [Move::Train, Move::Fail]);
    let reason = c.reason.unwrap();
    assert!(
        reason.contains(&format!("train gave up after {attempts} attempts")),
        "{reason}"
    );
    assert!(reason.contains("Not a directory"), "{reason}");
    let run = flywheel_store::training::get(&pool, c.training_run_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, flywheel_store::training::RunStatus::Failed);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_while_another_run_holds_the_base_is_skipped_with_the_reason() {
    let gw = TestGateway::tiny().await;
    let pool = gw.db.pool.clone();
    let team = gw.team_id().await;
    // Another team on the same base has a run queued; this worker takes no
    // training runs, so it stays queued while the team's cycle looks.
    let (_, other_key) = flywheel_store::keys::create_key(&pool, "other")
        .await
        .unwrap();
    let other = flywheel_store::keys::team_id(&pool, "other")
        .await
        .unwrap()
        .unwrap();
    let (status, body) = gw
        .post(
            &other_key,
            "/v1/chat/completions",
            json!({"model": gw.model(), "max_tokens": 8, "user": "o",
                   "messages": [{"role": "user", "content": "route ticket other"}]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = gw
        .post(
            &other_key,
            "/v1/feedback",
            json!({"completion_id": body["id"], "rating": "down", "user": "o",
                   "correction": ANSWER}),
        )
        .await;
    assert_eq!(status, 201);
    assert!(
        gw.state
            .journal()
            .wait_flushed(Duration::from_secs(10))
            .await
    );
    let built = flywheel_jobs::curate::run(
        &pool,
        &flywheel_jobs::curate::CurateJob {
            scope: flywheel_store::datasets::Scope::Team(other),
            rules: Rules::default(),
            until: None,
            cycle: None,
        },
    )
    .await
    .unwrap();
    let spec = tiny_loop::work().spec;
    let (run, _) = flywheel_jobs::train::create_run(
        &pool,
        built.version_id.unwrap(),
        gw.served.version_id,
        &spec,
        1,
    )
    .await
    .unwrap();

    let home = tiny_loop::home();
    let mut w = tiny_loop::worker(&pool, &home, "w");
    w.training = None;
    let (stop, worker) = tiny_loop::spawn_worker(&pool, w);
    first_traffic(&gw).await;
    let id = start_cycle(&gw, team).await;
    let c = tiny_loop::wait_cycle(&pool, id, None, 120).await;
    assert_eq!(c.status, Status::Skipped, "{c:#?}");
    assert_eq!(moves(&c), [Move::Skip]);
    let reason = c.reason.unwrap();
    assert_eq!(
        reason,
        format!(
            "a training run on {} is already queued or running; a later slot tries again",
            gw.model()
        )
    );
    assert!(c.training_run_id.is_none());
    let held = flywheel_store::training::get(&pool, run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.status, flywheel_store::training::RunStatus::Queued);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_held_out_evidence_skips_training_and_says_how_much_more() {
    let gw = TestGateway::tiny().await;
    let pool = gw.db.pool.clone();
    let team = gw.team_id().await;
    // 24 corrections and liked answers until the examples pass the minimum
    // of new ones; but a quarter of 24 corrections (6) is all curation
    // holds out, and the gate needs 10.
    let min = flywheel_tests::config().training.min_new_examples;
    let fixed = routing_traffic(&gw, "t", &tickets(0, 24)).await;
    let (mut examples, mut votes, mut n) = (fixed.examples, fixed.votes, 0);
    while examples < min {
        let liked = tiny_loop::liked_general(&gw, &format!("g{n}-"), &topics(n, 20)).await;
        (examples, votes, n) = (examples + liked.examples, votes + liked.votes, n + 20);
    }
    votes_stored(&gw, votes as i64).await;
    let home = tiny_loop::home();
    let mut w = tiny_loop::worker(&pool, &home, "w");
    w.training = None;
    let (stop, worker) = tiny_loop::spawn_worker(&pool, w);
    let id = start_cycle(&gw, team).await;
    let c = tiny_loop::wait_cycle(&pool, id, None, 120).await;
    assert_eq!(c.status, Status::Skipped, "{c:#?}");
    let reason = c.reason.clone().unwrap();
    assert!(
        reason.starts_with("too little held-out evidence to judge a candidate"),
        "{reason}"
    );
    // At least a quarter of them held out, fewer than the gate's 10.
    let held: usize = reason
        .split("holds out ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!((6..10).contains(&held), "{reason}");
    assert!(reason.contains(&format!("holds out {held} of 24 corrections")));
    assert!(
        reason.contains("about 16 more corrections will do"),
        "{reason}"
    );
    assert!(c.training_run_id.is_none(), "nothing was trained");
    // What the cycle curated is on record.
    let note = &c.stage_records()[0].note;
    assert!(note.contains("24 corrections"), "{note}");
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_automatic_cycles_promote_a_winner_then_keep_it_against_a_tie() {
    two_automatic_cycles(TestGateway::tiny().await, tiny_loop::work().spec.lora).await;
}

// The same two cycles, the same settings, on Gemma 2's tiny model
// (tests/testdata/families/gemma2, built with transformers): its norms,
// soft-caps, GELU and SentencePiece vocabulary curated, trained, evaluated
// and promoted as the llama is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_automatic_cycles_on_a_gemma2_model() {
    let gw = TestGateway::family("gemma2").await;
    two_automatic_cycles(gw, tiny_loop::work().spec.lora).await;
}

/// The scheduled loop's two cycles on `gw`'s model, its adapters `lora`.
async fn two_automatic_cycles(gw: TestGateway, lora: flywheel_trainer::LoraConfig) {
    let pool = gw.db.pool.clone();
    let team = gw.team_id().await;
    let base = gw.served.version_id;
    let task = tiny_task::routing_suite();
    flywheel_store::evals::add_suite(
        &pool,
        Some(team),
        &task.name,
        &task.sha256(),
        &serde_json::to_value(&task).unwrap(),
    )
    .await
    .unwrap();

    // Cycle 1's traffic: the task, corrected by its users (the suite's
    // prompts and 40 more); general questions, whose answers the users like.
    for (i, p) in ROUTING.iter().enumerate() {
        let user = format!("t{i}");
        let (id, answer, _) = chat(&gw, &user, p).await;
        assert_ne!(answer, ANSWER, "the base does not know the task yet");
        rate_routing(&gw, &user, &id, &answer).await;
    }
    routing_traffic(&gw, "r", &tickets(0, 40)).await;
    tiny_loop::liked_general(&gw, "g", &general()).await;
    votes_stored(&gw, (ROUTING.len() + 40 + GENERAL.len()) as i64).await;

    // Each curation slot (every second here: the slots are what this test
    // shows) starts a cycle once 10 new examples are in, not the shipped
    // 200 (two batches of a dozen chats; the canary tests run the default),
    // and a passing candidate is promoted on the offline evidence (canary
    // share 0; the tests above run the canary).
    // Steps from the dataset's size, 12 passes between 30 and 300 steps (the
    // shipped 150 to 150 would not show the version's size setting them).
    let mut work = tiny_loop::work();
    work.spec.lora = lora;
    work.spec.train = flywheel_trainer::TrainConfig {
        steps: 300,
        epochs: 12.0,
        min_steps: 30,
        ..work.spec.train
    };
    let train_config = work.spec.train.clone();
    let home = tiny_loop::home();
    let mut w = tiny_loop::worker(&pool, &home, "loop-test");
    let min_items = flywheel_tests::config().promotion.min_items;
    let cfg = work.loop_config(10, min_items);
    w.curation = Some(CurationSchedule {
        cron: parse_cron("* * * * * *").unwrap(),
        rules: tiny_loop::work().rules,
        max_attempts: w.max_attempts,
        cycles: Some(cfg),
    });
    if let Some(e) = w.evaluation.as_mut() {
        e.policy.canary_share = 0.0;
    }
    let (stop, worker) = tiny_loop::spawn_worker(&pool, w);

    // Cycle 1, by itself: curate, train, evaluate, promote.
    let first = decided(&gw, team, &[]).await;
    assert_eq!(first.status, Status::Promoted, "{first:#?}");
    assert_eq!(first.trigger, Trigger::Schedule);
    assert_eq!(
        stages(&first),
        [Stage::Curate, Stage::Train, Stage::Evaluate],
        "{first:#?}"
    );
    let dataset = flywheel_store::datasets::get(&pool, first.dataset_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    // 52 corrections and the liked general answers (an empty one is left
    // out by the curation rules).
    assert!((52..=64).contains(&dataset.sft_count), "{dataset:?}");
    let run = flywheel_store::training::get(&pool, first.training_run_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status.as_str(), "succeeded");
    assert_eq!(run.dataset_version_id, dataset.id);
    assert_eq!(run.base_version_id, base, "trained from the base");
    let candidate = first.candidate_version_id.unwrap();
    assert_eq!(run.candidate_version_id, Some(candidate));
    let e = flywheel_store::evals::get(&pool, first.evaluation_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((e.passed, e.champion_version_id), (Some(true), base));
    let metrics = flywheel_store::evals::metrics(&pool, e.id).await.unwrap();
    let routing = metrics.iter().find(|m| m.suite == "routing").unwrap();
    assert!(
        routing.candidate > 0.9 && routing.champion < 0.1,
        "{routing:?}"
    );
    let decisions = flywheel_store::decisions::list(&pool, Some(team), 10)
        .await
        .unwrap();
    assert_eq!(decisions[0].id, first.decision_id.unwrap());
    assert_eq!(decisions[0].kind, DecisionKind::Promote);
    let champion = flywheel_store::models::team_champion(&pool, team)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.id, candidate);
    // Each stage's wall time, and the stages back to back.
    let recorded = first.stage_records();
    for pair in recorded.windows(2) {
        assert_eq!(pair[0].finished_at, pair[1].started_at);
    }
    assert!(recorded.iter().all(|s| s.seconds >= 0.0));
    // The run's steps were fixed from the version's training examples
    // when it was queued.
    let train_examples =
        flywheel_store::datasets::count_examples(&pool, dataset.id, "sft", "train")
            .await
            .unwrap();
    let steps = train_config.for_examples(train_examples as usize).steps as i64;
    assert!(
        steps < train_config.steps as i64,
        "the bound, not the dataset, set {steps} steps"
    );
    assert_eq!(i64::from(run.total_steps), steps);
    assert!(
        recorded[1].note.contains(&format!("{steps} steps")),
        "{recorded:?}"
    );
    // Nothing new: no second cycle starts by itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cycles(&gw, team).await.len(),
        1,
        "one cycle for one batch of feedback"
    );

    // The team is served by its new champion; more traffic, rated as before.
    eventually(20, || async {
        let (_, answer, _) = chat(&gw, "probe", ROUTING[0]).await;
        (answer == ANSWER).then_some(())
    })
    .await
    .expect("the promoted candidate answers the team's requests");
    for (i, p) in MORE_TASK.iter().enumerate() {
        let user = format!("m{i}");
        let (id, answer, _) = chat(&gw, &user, p).await;
        rate_routing(&gw, &user, &id, &answer).await;
    }

    // Cycle 2, by itself: its candidate is no better than the champion on
    // the task (the champion now passes the suite, which is saturated and
    // no longer decides; the held-out corrections do, and show no gain),
    // so it is rejected and the champion stays.
    let second = decided(&gw, team, &[first.id]).await;
    assert_eq!(second.status, Status::Rejected, "{second:#?}");
    assert_eq!(
        stages(&second),
        [Stage::Curate, Stage::Train, Stage::Evaluate]
    );
    let reason = second.reason.clone().unwrap();
    assert!(
        reason.contains("pass: task suite routing is saturated"),
        "{reason}"
    );
    assert!(
        reason.contains("FAIL: held-out heldout-corrections contains_match"),
        "{reason}"
    );
    let run2 = flywheel_store::training::get(&pool, second.training_run_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run2.base_version_id, base, "again from the base");
    let v2 = flywheel_store::datasets::get(&pool, second.dataset_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(v2.version > dataset.version, "{v2:?}");
    // The slot may come while part of cycle 2's votes are still arriving:
    // what it needs is the minimum of new examples of any kind, on top of
    // everything cycle 1 trained on.
    let examples =
        |v: &flywheel_store::datasets::DatasetVersion| v.sft_count + v.dpo_count + v.kto_count;
    assert!(
        examples(&v2) >= examples(&dataset) + 10,
        "{dataset:?} -> {v2:?}"
    );
    assert!(v2.sft_count > dataset.sft_count, "cumulative: {v2:?}");
    for c in cycles(&gw, team).await {
        if c.status == Status::Skipped {
            let why = c.reason.unwrap_or_default();
            assert!(
                why.contains("new examples since the last run; 10 needed"),
                "{why}"
            );
        }
    }
    let e2 = flywheel_store::evals::get(&pool, second.evaluation_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        e2.champion_version_id, candidate,
        "against cycle 1's winner"
    );
    assert_eq!(e2.passed, Some(false));
    let d: Value = serde_json::to_value(
        &flywheel_store::decisions::list(&pool, Some(team), 1)
            .await
            .unwrap()[0],
    )
    .unwrap();
    assert_eq!(d["kind"], "reject");
    assert_eq!(d["id"], json!(second.decision_id.unwrap()));
    let champion = flywheel_store::models::team_champion(&pool, team)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.id, candidate, "the champion stays");

    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
