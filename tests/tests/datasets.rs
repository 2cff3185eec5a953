//! Curation against real Postgres: each rule on a feedback fixture, the
//! manifest and lineage of the version it writes, immutability and
//! idempotence, exports, deletion marking, and schedule slots that fire once.

use chrono::{Duration, Utc};
use flywheel_curation::build::Rules;
use flywheel_curation::export::Format;
use flywheel_jobs::curate::{self, CurateJob};
use flywheel_store::PgPool;
use flywheel_store::completions::NewCompletion;
use flywheel_store::datasets::{self, Scope};
use flywheel_store::feedback::Feedback;
use flywheel_tests::TestDb;
use serde_json::{Value, json};
use uuid::Uuid;

/// Writes completions and votes the way the gateway's journal does.
struct Fixture {
    pool: PgPool,
    team: Uuid,
    model: Uuid,
    completions: Vec<NewCompletion>,
    votes: Vec<Feedback>,
    clock: chrono::DateTime<Utc>,
}

impl Fixture {
    async fn new(pool: &PgPool, team: &str) -> Self {
        let team = flywheel_store::keys::ensure_team(pool, team).await.unwrap();
        let model = flywheel_store::models::register(
            pool,
            &flywheel_store::models::NewModelVersion {
                name: "fixture-model".into(),
                source: "test".into(),
                sha256: "0".into(),
                format: "gguf".into(),
                path: "/nonexistent".into(),
                size_bytes: 0,
                context_length: None,
            },
        )
        .await
        .unwrap()
        .id;
        Self {
            pool: pool.clone(),
            team,
            model,
            completions: Vec::new(),
            votes: Vec::new(),
            clock: Utc::now() - Duration::hours(1),
        }
    }

    fn tick(&mut self) -> chrono::DateTime<Utc> {
        self.clock += Duration::seconds(1);
        self.clock
    }

    fn completion(&mut self, id: &str, user: &str, prompt: &str, output: &str) {
        let id = format!("{id}-{}", &self.team.simple().to_string()[..6]);
        self.completions.push(NewCompletion {
            id,
            team_id: self.team,
            model_version_id: self.model,
            end_user: Some(user.into()),
            request: json!({"model": "m", "messages": [{"role": "user", "content": prompt}]}),
            output: output.into(),
            finish_reason: "stop".into(),
            prompt_tokens: 5,
            completion_tokens: 5,
            latency_ms: 10.0,
            request_id: None,
            trace_id: None,
            ttft_ms: None,
            started_at: None,
            route: "champion".into(),
            canary_id: None,
        });
    }

    fn vote(&mut self, completion: &str, user: &str, rating: &str, correction: Option<&str>) {
        let completion_id = format!("{completion}-{}", &self.team.simple().to_string()[..6]);
        let created_at = self.tick();
        self.votes.push(Feedback {
            id: Uuid::new_v4(),
            completion_id,
            team_id: self.team,
            end_user: user.into(),
            rating: rating.into(),
            comment: None,
            correction: correction.map(String::from),
            created_at,
        });
    }

    async fn save(&mut self) {
        flywheel_store::completions::insert_many(&self.pool, &self.completions)
            .await
            .unwrap();
        flywheel_store::feedback::insert_many(&self.pool, &self.votes)
            .await
            .unwrap();
        self.completions.clear();
        self.votes.clear();
    }

    fn job(&self, rules: Rules) -> CurateJob {
        CurateJob {
            scope: Scope::Team(self.team),
            rules,
            until: None,
            cycle: None,
        }
    }
}

/// The feedback every rule has something to do with.
fn rules_fixture(f: &mut Fixture) {
    // A good answer with an e-mail address in it.
    f.completion(
        "paris",
        "ann",
        "What is the capital of France?",
        "Paris. Write to jane.doe@example.com for more.",
    );
    f.vote("paris", "ann", "up", None);
    // The same prompt, differently typed, the same answer, also liked: a
    // duplicate (with another answer it would not be).
    f.completion(
        "paris2",
        "bob",
        "what is the capital of france",
        "paris. Write to jane.doe@example.com for more!",
    );
    f.vote("paris2", "bob", "up", None);
    // The same prompt disliked: the rejected side of a DPO pair.
    f.completion("lyon", "cat", "What is the capital of France?", "Lyon.");
    f.vote("lyon", "cat", "down", None);
    // Disliked with a correction, and a phone number and a card in the prompt.
    f.completion(
        "callback",
        "dan",
        "Call me on +44 20 7946 0958 about card 4111 1111 1111 1111",
        "No.",
    );
    f.vote(
        "callback",
        "dan",
        "down",
        Some("We will call you back today."),
    );
    // Conflicting votes: eve changes her mind, so two ups win.
    f.completion("conflict", "eve", "Name a primary colour.", "Red.");
    f.vote("conflict", "eve", "down", None);
    f.vote("conflict", "fay", "up", None);
    f.vote("conflict", "eve", "up", None);
    // A tie decides nothing.
    f.completion("tie", "gus", "Is a tomato a fruit?", "Yes, botanically.");
    f.vote("tie", "gus", "up", None);
    f.vote("tie", "hal", "down", None);
    // An empty answer is filtered.
    f.completion("empty", "ivy", "Say something.", "   ");
    f.vote("empty", "ivy", "up", None);
    // One user with many liked answers: the cap keeps 3.
    for i in 0..6 {
        let id = format!("spam{i}");
        let prompt = format!(
            "Tell me fact number {i} about {}",
            ["owls", "bees", "moss", "tides", "salt", "iron"][i]
        );
        f.completion(&id, "zed", &prompt, "Here is a fact.");
        f.vote(&id, "zed", "up", None);
    }
    // Enough distinct prompts for both splits.
    for i in 0..60 {
        let id = format!("q{i}");
        let topic = ["rivers", "stars", "bread", "trains", "music", "glass"][i % 6];
        let prompt = format!(
            "Question {i}: explain {topic} to a child of age {}",
            4 + i % 9
        );
        f.completion(&id, &format!("user{i}"), &prompt, "A simple explanation.");
        f.vote(
            &id,
            &format!("user{i}"),
            if i % 4 == 0 { "down" } else { "up" },
            None,
        );
    }
}

fn strings(v: &Value) -> String {
    v.to_string()
}

async fn export_lines(pool: &PgPool, version: Uuid, format: Format) -> Vec<Value> {
    let path = std::env::temp_dir().join(format!("fw-export-{}.jsonl", Uuid::new_v4()));
    let n = flywheel::datasets::export(pool, &version.to_string(), format, None, Some(&path))
        .await
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n);
    lines
}

#[tokio::test]
async fn curation_applies_each_rule_and_records_manifest_and_lineage() {
    let db = TestDb::new().await;
    let mut f = Fixture::new(&db.pool, "acme").await;
    rules_fixture(&mut f);
    f.save().await;
    // Another team's feedback stays out.
    let mut other = Fixture::new(&db.pool, "globex").await;
    other.completion(
        "secret",
        "ann",
        "Globex internal question",
        "Globex answer.",
    );
    other.vote("secret", "ann", "up", None);
    other.save().await;

    let rules = Rules {
        max_per_user: 3,
        eval_fraction: 0.3,
        ..Rules::default()
    };
    let out = curate::run(&db.pool, &f.job(rules.clone())).await.unwrap();
    assert!(out.created);
    assert_eq!(out.version, Some(1));
    let v = datasets::get(&db.pool, out.version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    let m = &v.manifest;
    let dropped = &m["dropped"];
    assert_eq!(dropped["near_duplicates"], 1, "{m:#}");
    assert_eq!(dropped["tied_votes"], 1, "{m:#}");
    assert_eq!(dropped["filtered_length"], 1, "{m:#}");
    assert_eq!(dropped["over_user_cap"], 3, "{m:#}");
    // Each one named, with its reason.
    let reasons: Vec<&str> = m["dropped_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 6, "{m:#}");
    assert_eq!(m["dropped_examples_total"], 6);
    for (reason, n) in [
        ("near_duplicate", 1),
        ("tied_votes", 1),
        ("length", 1),
        ("over_user_cap", 3),
    ] {
        assert_eq!(
            reasons.iter().filter(|r| **r == reason).count(),
            n,
            "{reason}"
        );
    }
    let dup = m["dropped_examples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["reason"] == "near_duplicate")
        .unwrap();
    assert!(dup["duplicate_of"].is_string(), "{dup}");
    assert_eq!(m["raters"]["excluded"], 0, "{m:#}");
    assert_eq!(dropped["redactions"]["emails"], 1, "{m:#}");
    assert_eq!(dropped["redactions"]["phones"], 1, "{m:#}");
    assert_eq!(dropped["redactions"]["cards"], 1, "{m:#}");
    assert_eq!(m["rules"]["max_per_user"], 3);
    assert!(m["rules"]["pii_rules"]["iban"].is_string());
    assert_eq!(m["input"]["votes"], 76, "only acme's votes: {m:#}");

    let everything = [
        export_lines(&db.pool, v.id, Format::TrlSft).await,
        export_lines(&db.pool, v.id, Format::TrlDpo).await,
        export_lines(&db.pool, v.id, Format::TrlKto).await,
        export_lines(&db.pool, v.id, Format::OpenAi).await,
    ]
    .concat();
    let all = strings(&Value::Array(everything));
    for secret in ["jane.doe@example.com", "7946 0958", "4111 1111", "Globex"] {
        assert!(!all.contains(secret), "{secret} leaked into an export");
    }
    assert!(all.contains("[EMAIL]") && all.contains("[PHONE]") && all.contains("[CARD]"));

    // SFT: liked answers and the correction as gold; the conflict resolved up.
    let sft = export_lines(&db.pool, v.id, Format::TrlSft).await;
    let answers: Vec<&str> = sft
        .iter()
        .map(|l| l["completion"][0]["content"].as_str().unwrap())
        .collect();
    assert!(answers.contains(&"We will call you back today."));
    assert!(answers.contains(&"Red."));
    assert!(!answers.contains(&"Yes, botanically."), "ties are dropped");
    assert_eq!(
        answers
            .iter()
            .filter(|a| a.to_lowercase().starts_with("paris"))
            .count(),
        1,
        "the duplicate is dropped"
    );
    assert_eq!(
        answers.iter().filter(|a| **a == "Here is a fact.").count(),
        3,
        "capped at 3 per user"
    );

    // DPO: up vs down on one prompt, and correction vs answer.
    let dpo = export_lines(&db.pool, v.id, Format::TrlDpo).await;
    let pair = |chosen: &str, rejected: &str| {
        dpo.iter().any(|l| {
            l["chosen"][0]["content"]
                .as_str()
                .unwrap()
                .starts_with(chosen)
                && l["rejected"][0]["content"] == rejected
        })
    };
    assert!(pair("Paris.", "Lyon."), "{dpo:#?}");
    assert!(pair("We will call you back today.", "No."));

    // KTO: labels as voted, class balance in the manifest.
    let kto = export_lines(&db.pool, v.id, Format::TrlKto).await;
    let ups = kto.iter().filter(|l| l["label"] == true).count();
    assert_eq!(m["kto_balance"]["desirable"], ups);
    assert_eq!(m["kto_balance"]["undesirable"], kto.len() - ups);
    assert!(ups > 0 && ups < kto.len());

    // The split is by prompt: no prompt in both.
    let mut by_split: std::collections::HashMap<String, std::collections::HashSet<String>> =
        Default::default();
    for kind in ["sft", "dpo", "kto"] {
        for (split, example) in datasets::examples(&db.pool, v.id, kind, None)
            .await
            .unwrap()
        {
            let prompt = flywheel_curation::minhash::normalize(&example["prompt"].to_string());
            by_split.entry(split).or_default().insert(prompt);
        }
    }
    let (train, eval) = (&by_split["train"], &by_split["eval"]);
    assert!(!train.is_empty() && !eval.is_empty());
    assert!(train.is_disjoint(eval));

    // Lineage: the votes of every completion that made an example.
    let (lineage_votes, lineage_completions) =
        datasets::lineage_counts(&db.pool, v.id).await.unwrap();
    assert_eq!(m["lineage"]["votes"], lineage_votes);
    assert_eq!(m["lineage"]["completions"], lineage_completions);
    assert!(lineage_votes >= lineage_completions && lineage_completions > 60);

    // Snapshots are immutable.
    let edit = sqlx::query("update dataset_examples set split = 'eval' where version_id = $1")
        .bind(v.id)
        .execute(&db.pool)
        .await;
    assert!(edit.unwrap_err().to_string().contains("immutable"));
}

#[tokio::test]
async fn no_new_feedback_no_new_version_and_deletion_marks_versions() {
    let db = TestDb::new().await;
    let mut f = Fixture::new(&db.pool, "acme").await;
    rules_fixture(&mut f);
    f.save().await;
    let first = curate::run(&db.pool, &f.job(Rules::default()))
        .await
        .unwrap();
    let again = curate::run(&db.pool, &f.job(Rules::default()))
        .await
        .unwrap();
    assert!(first.created && !again.created);
    assert_eq!(first.version_id, again.version_id);
    assert_eq!(datasets::list(&db.pool, None).await.unwrap().len(), 1);

    // Different rules are a different snapshot of the same feedback.
    let stricter = Rules {
        max_per_user: 1,
        ..Rules::default()
    };
    let other = curate::run(&db.pool, &f.job(stricter)).await.unwrap();
    assert!(other.created);
    assert_eq!(other.version, Some(2));

    // A new vote makes version 3.
    f.completion("late", "kim", "What colour is the sky?", "Blue.");
    f.vote("late", "kim", "up", None);
    f.save().await;
    let third = curate::run(&db.pool, &f.job(Rules::default()))
        .await
        .unwrap();
    assert_eq!(third.version, Some(3));
    assert_eq!(third.sft, first.sft + 1);

    // Deleting kim's data marks version 3 only; ann's marks every version.
    flywheel_store::feedback::delete_user_data(&db.pool, f.team, "kim")
        .await
        .unwrap();
    let marked = |n: i32| {
        let pool = db.pool.clone();
        let team = f.team;
        async move {
            datasets::get_numbered(&pool, Some(team), n)
                .await
                .unwrap()
                .unwrap()
                .user_data_deleted_at
                .is_some()
        }
    };
    assert!(!marked(1).await && !marked(2).await && marked(3).await);
    flywheel_store::feedback::delete_user_data(&db.pool, f.team, "ann")
        .await
        .unwrap();
    assert!(marked(1).await && marked(2).await);
    // And the next build no longer has her data.
    let after = curate::run(&db.pool, &f.job(Rules::default()))
        .await
        .unwrap();
    assert!(after.created);
    let v = datasets::get(&db.pool, after.version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    let sft = strings(&Value::Array(
        export_lines(&db.pool, v.id, Format::Messages).await,
    ));
    // Her liked answer is gone; bob's, a near-duplicate of it while hers
    // was there (one of the two was dropped), now stands for itself.
    assert!(!sft.contains("Paris. Write to [EMAIL] for more."), "{sft}");
    assert!(sft.contains("paris. Write to [EMAIL] for more!"), "{sft}");
}

#[tokio::test]
async fn the_same_input_gives_the_same_snapshot() {
    let mut snapshots = Vec::new();
    for _ in 0..2 {
        let db = TestDb::new().await;
        let mut f = Fixture::new(&db.pool, "acme").await;
        // Same team id in both databases, so completion ids match.
        sqlx::query("update teams set id = '11111111-1111-1111-1111-111111111111' where id = $1")
            .bind(f.team)
            .execute(&db.pool)
            .await
            .unwrap();
        f.team = Uuid::parse_str("11111111-1111-1111-1111-111111111111").unwrap();
        rules_fixture(&mut f);
        // Written in a different order each time.
        if snapshots.is_empty() {
            f.completions.reverse();
            f.votes.reverse();
        }
        f.save().await;
        let out = curate::run(&db.pool, &f.job(Rules::default()))
            .await
            .unwrap();
        let v = datasets::get(&db.pool, out.version_id.unwrap())
            .await
            .unwrap()
            .unwrap();
        let mut examples = Vec::new();
        for kind in ["sft", "dpo", "kto"] {
            examples.push(
                datasets::examples(&db.pool, v.id, kind, None)
                    .await
                    .unwrap(),
            );
        }
        let mut manifest = v.manifest.clone();
        manifest["window"] = Value::Null;
        snapshots.push((examples, manifest));
    }
    assert!(!snapshots[0].0[0].is_empty());
    assert_eq!(snapshots[0], snapshots[1]);
}

#[tokio::test]
async fn shared_datasets_pool_only_teams_that_allow_it() {
    let db = TestDb::new().await;
    for (team, share) in [("open", true), ("closed", false), ("also-open", true)] {
        let mut f = Fixture::new(&db.pool, team).await;
        f.completion(
            "c",
            "u",
            &format!("A question only {team} asked"),
            "An answer.",
        );
        f.vote("c", "u", "up", None);
        f.save().await;
        flywheel_store::keys::set_share_for_training(&db.pool, team, share)
            .await
            .unwrap();
    }
    let job = CurateJob {
        scope: Scope::Shared,
        rules: Rules::default(),
        until: None,
        cycle: None,
    };
    let out = curate::run(&db.pool, &job).await.unwrap();
    assert_eq!(out.kto, 2);
    let v = datasets::get(&db.pool, out.version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.team_id, None);
    let text = strings(&Value::Array(
        export_lines(&db.pool, v.id, Format::TrlKto).await,
    ));
    assert!(text.contains("only open asked") && text.contains("only also-open asked"));
    assert!(!text.contains("only closed asked"));
}

#[tokio::test]
async fn a_schedule_slot_fires_once_across_workers() {
    let db = TestDb::new().await;
    let mut f = Fixture::new(&db.pool, "acme").await;
    f.completion("c", "u", "Any question", "Any answer.");
    f.vote("c", "u", "up", None);
    f.save().await;
    let s = flywheel_jobs::schedule::CurationSchedule {
        cron: flywheel_jobs::schedule::parse_cron("0 */15 * * * *").unwrap(),
        rules: Rules::default(),
        max_attempts: 3,
        cycles: None,
    };
    let slot = Utc::now();
    let fired = flywheel_jobs::schedule::fire_curation(&db.pool, &s, slot)
        .await
        .unwrap();
    assert_eq!(fired.len(), 1, "acme has new feedback");
    let twice = flywheel_jobs::schedule::fire_curation(&db.pool, &s, slot)
        .await
        .unwrap();
    assert!(twice.is_empty(), "a second worker finds the slot taken");
    let state = flywheel_store::jobs::task_state(&db.pool, &fired[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.status, "Pending");
    assert_eq!(state.max_attempts, 3);
    assert!(flywheel_jobs::schedule::parse_cron("every tuesday").is_err());
}

#[tokio::test]
async fn a_slot_starts_a_cycle_that_trains_only_on_enough_new_examples() {
    use flywheel_jobs::stages::{JobQueue, Work};
    use flywheel_loop::cycle;
    use flywheel_store::cycles::{self as cycles, Link, Stage, Status, Trigger};
    let db = TestDb::new().await;
    let mut f = Fixture::new(&db.pool, "acme").await;
    flywheel_store::models::set_champion(&db.pool, "fixture-model")
        .await
        .unwrap();
    rules_fixture(&mut f);
    f.save().await;
    // The team wrote a task suite, so the gate is judged by it and how much
    // held-out evidence the few votes here give does not decide whether a
    // cycle trains (that rule is tested in the_loop.rs).
    let suite = flywheel_tests::tiny_task::routing_suite();
    flywheel_store::evals::add_suite(
        &db.pool,
        Some(f.team),
        &suite.name,
        &suite.sha256(),
        &serde_json::to_value(&suite).unwrap(),
    )
    .await
    .unwrap();
    let cfg = Work {
        rules: Rules::default(),
        spec: flywheel_jobs::train::RunSpec {
            lora: Default::default(),
            train: Default::default(),
            external: false,
        },
        max_attempts: 2,
        distill: None,
    }
    .loop_config(10, 10);
    let s = flywheel_jobs::schedule::CurationSchedule {
        cron: flywheel_jobs::schedule::parse_cron("0 */15 * * * *").unwrap(),
        rules: Rules::default(),
        max_attempts: 2,
        cycles: Some(cfg.clone()),
    };
    let fire = |minutes: i64| {
        let (pool, s) = (db.pool.clone(), s.clone());
        async move {
            let slot = Utc::now() + Duration::minutes(minutes);
            flywheel_jobs::schedule::fire_curation(&pool, &s, slot)
                .await
                .unwrap()
        }
    };
    // The cycle's first stage, as the worker runs it.
    let team = f.team;
    let curate = |id: &str| {
        let pool = db.pool.clone();
        let id: Uuid = id.parse().unwrap();
        async move {
            let job = CurateJob {
                scope: Scope::Team(team),
                rules: Rules::default(),
                // The fixture's clock runs ahead of the database's.
                until: Some(Utc::now() + Duration::hours(1)),
                cycle: Some(id),
            };
            let out = curate::run(&pool, &job).await.unwrap();
            cycle::curated(&pool, &JobQueue::default(), id, out.version_id)
                .await
                .unwrap();
            cycles::get(&pool, id).await.unwrap().unwrap()
        }
    };

    let started = fire(1).await;
    assert_eq!(started.len(), 1, "acme has new feedback: a cycle starts");
    assert!(fire(2).await.is_empty(), "one running cycle per team");
    let c = curate(&started[0]).await;
    assert_eq!((c.status, c.stage), (Status::Running, Stage::Train));
    assert_eq!(c.trigger, Trigger::Schedule);
    let run = flywheel_store::training::get(&db.pool, c.training_run_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(run.dataset_version_id), c.dataset_version_id);
    assert_eq!(
        (run.status.as_str(), run.objective.as_str()),
        ("queued", "sft")
    );
    let note = c.stages[0]["note"].as_str().unwrap();
    assert!(note.starts_with("dataset v1: "), "{note}");
    assert_eq!(c.stages[0]["stage"], "curate");

    // The run ends (here by hand); its cycle is ended for the test.
    flywheel_store::training::finish(
        &db.pool,
        run.id,
        flywheel_store::training::RunStatus::Succeeded,
        None,
        Some(0.1),
        None,
    )
    .await
    .unwrap();
    cycle::gave_up(&db.pool, Link::Run(run.id), "ended by the test")
        .await
        .unwrap();
    let c = cycles::get(&db.pool, c.id).await.unwrap().unwrap();
    assert_eq!((c.status, c.stage), (Status::Failed, Stage::Done));
    assert_eq!(c.reason.as_deref(), Some("ended by the test"));
    assert!(fire(3).await.is_empty(), "nothing new since the last run");

    // Two new votes (4 examples: SFT and KTO): a cycle, skipped after
    // curation.
    fn ask(f: &mut Fixture, from: usize, n: usize) {
        // Votes after the last version was built.
        f.clock = f.clock.max(Utc::now());
        for i in from..from + n {
            let id = format!("new{i}");
            f.completion(
                &id,
                &format!("n{i}"),
                &format!(
                    "Brand new question {i} about {}",
                    ["kites", "maps", "clocks", "ferns"][i % 4]
                ),
                "A fresh answer.",
            );
            f.vote(&id, &format!("n{i}"), "up", None);
        }
    }
    ask(&mut f, 0, 2);
    f.save().await;
    let started = fire(4).await;
    assert_eq!(started.len(), 1);
    let skipped = curate(&started[0]).await;
    assert_eq!(skipped.status, Status::Skipped);
    let total = |v: &datasets::DatasetVersion| v.sft_count + v.dpo_count + v.kto_count;
    let (v1, v2) = (
        datasets::get(&db.pool, run.dataset_version_id)
            .await
            .unwrap()
            .unwrap(),
        datasets::get(&db.pool, skipped.dataset_version_id.unwrap())
            .await
            .unwrap()
            .unwrap(),
    );
    let new = total(&v2) - total(&v1);
    assert!((1..10).contains(&new), "{v1:?} {v2:?}");
    assert_eq!(
        skipped.reason.unwrap(),
        format!("{new} new examples since the last run; 10 needed")
    );
    assert!(skipped.training_run_id.is_none());

    // Twelve more: the next cycle trains on the newest version.
    ask(&mut f, 2, 12);
    f.save().await;
    let started = fire(5).await;
    let c = curate(&started[0]).await;
    assert_eq!(c.stage, Stage::Train, "{c:?}");
    let v = flywheel_store::datasets::get(&db.pool, c.dataset_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.version, 3);
    assert_eq!(
        cycles::list(&db.pool, Some(team), 10).await.unwrap().len(),
        3
    );
    // A slot fires once.
    let slot = Utc::now() + Duration::minutes(6);
    cycle::gave_up(&db.pool, Link::Cycle(c.id), "ended by the test")
        .await
        .unwrap();
    ask(&mut f, 14, 1);
    f.save().await;
    let a = flywheel_jobs::schedule::fire_curation(&db.pool, &s, slot)
        .await
        .unwrap();
    let b = flywheel_jobs::schedule::fire_curation(&db.pool, &s, slot)
        .await
        .unwrap();
    assert!(a.len() == 1 && b.is_empty());
}

/// A build reads its input in a snapshot and writes later; an end user
/// whose data was deleted in between is gone from the log by then. The
/// version is marked as it is written, so their words are not used
/// unmarked (here the deletion is made to fall in that gap: the lineage
/// names a request the log no longer holds).
#[tokio::test]
async fn a_version_written_after_its_input_was_deleted_is_marked() {
    let db = TestDb::new().await;
    let mut f = Fixture::new(&db.pool, "acme").await;
    let team = f.team;
    let write = |completion: String| {
        let pool = db.pool.clone();
        async move {
            let id = Uuid::new_v4();
            let mut tx = pool.begin().await.unwrap();
            datasets::insert_version(
                &mut tx,
                &datasets::NewVersion {
                    id,
                    scope: Scope::Team(team),
                    fingerprint: id.to_string(),
                    manifest: json!({}),
                    sft_count: 0,
                    dpo_count: 0,
                    kto_count: 0,
                    window_start: None,
                    window_end: None,
                },
                &[],
                &[datasets::LineageRow {
                    team_id: team,
                    feedback_id: datasets::NO_VOTE,
                    completion_id: completion,
                    voter: String::new(),
                    author: "gone".into(),
                }],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            datasets::get(&pool, id).await.unwrap().unwrap()
        }
    };
    f.completion("kept", "ann", "a prompt", "an answer");
    let kept = f.completions[0].id.clone();
    f.save().await;
    assert!(
        write(kept).await.user_data_deleted_at.is_none(),
        "a request still logged marks nothing"
    );
    assert!(
        write("chatcmpl-deleted-meanwhile".into())
            .await
            .user_data_deleted_at
            .is_some(),
        "a request no longer logged marks the version"
    );
}
