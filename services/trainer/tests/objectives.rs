//! Each objective on a tiny random-weight llama the model crate writes itself:
//! the loss falls and the model moves the intended way; the training
//! forward matches the serving forward; gradients match finite differences;
//! adapters round-trip through the PEFT layout.

use std::path::PathBuf;

use candle_core::Tensor;
use flywheel_model::Proj;
use flywheel_trainer::data::Message;
use flywheel_trainer::ops::TrainOps;
use flywheel_trainer::prefix::Prefix;
use flywheel_trainer::train::{answer_logprobs, answer_logprobs_packed};
use flywheel_trainer::{Base, Encoded, Example, Lora, LoraConfig, Objective, TrainConfig, Trainer};

fn tiny() -> Base {
    let dir = std::env::temp_dir().join(format!("fw-trainer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 7).unwrap();
    Base::load(&path).unwrap()
}

fn user(text: &str) -> Vec<Message> {
    vec![Message {
        role: "user".into(),
        content: text.into(),
    }]
}

fn encode(base: &Base, prompt: &str, answer: &str) -> Encoded {
    base.encode(&user(prompt), answer).unwrap()
}

fn sft_examples(base: &Base, pairs: &[(&str, &str)]) -> Vec<Example> {
    pairs
        .iter()
        .map(|(q, a)| Example::Sft {
            prompt: encode(base, q, a),
        })
        .collect()
}

fn lora(base: &Base, seed: u64) -> Lora {
    Lora::new(
        &base.model,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Proj::ALL.to_vec(),
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

fn logprob(base: &Base, lora: Option<&Lora>, e: &Encoded) -> f32 {
    answer_logprobs(&base.model, lora, e)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn train(base: &Base, config: TrainConfig, examples: Vec<Example>) -> (Lora, Vec<f64>) {
    let mut t = Trainer::new(&base.model, lora(base, 1), config.clone(), examples).unwrap();
    let losses = (0..config.steps)
        .map(|_| t.train_step().unwrap().loss)
        .collect();
    let mut trained = t.lora;
    trained.training = false;
    (trained, losses)
}

#[test]
fn training_forward_matches_serving_forward() {
    let base = tiny();
    let e = encode(&base, "hello there", "general kenobi");
    let ids: Vec<u32> = e.prompt.iter().chain(&e.answer).copied().collect();
    let mut cache = base.model.new_cache();
    let serving = base.model.forward(&ids, &mut cache).unwrap();
    // A fresh adapter (B = 0) changes nothing.
    let fresh = lora(&base, 3);
    let last = base
        .model
        .logits(&TrainOps::new(Some(&fresh)), &ids, ids.len() - 1)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = (serving - last)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "max difference {diff}");
}

#[test]
fn gradients_match_finite_differences() {
    let base = tiny();
    let e = encode(&base, "abc", "xyz");
    let l = lora_with_values(&base, 5);
    let loss = |l: &Lora| {
        answer_logprobs(&base.model, Some(l), &e)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&l).backward().unwrap();
    for proj in [Proj::Q, Proj::K, Proj::O, Proj::Down] {
        let a = l.pairs[&(1, proj)].a.clone();
        let g = grads
            .get(a.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let at = g
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
            .unwrap()
            .0;
        let original = a
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let h = 1e-2f32;
        let at_value = |delta: f32| {
            let mut v = original.clone();
            v[at] += delta;
            a.set(&Tensor::from_vec(v, a.as_tensor().shape(), base.model.device()).unwrap())
                .unwrap();
            loss(&l).to_scalar::<f32>().unwrap()
        };
        let numeric = (at_value(h) - at_value(-h)) / (2.0 * h);
        at_value(0.0);
        let rel = (numeric - g[at]).abs() / g[at].abs().max(1e-3);
        assert!(
            rel < 0.05,
            "{proj:?}: autograd {} vs finite difference {numeric}",
            g[at]
        );
    }
}

/// A LoRA whose B matrices are not zero, so every path carries gradient.
fn lora_with_values(base: &Base, seed: u64) -> Lora {
    let l = lora(base, seed);
    for (i, p) in l.pairs.values().enumerate() {
        let (out, r) = p.b.as_tensor().dims2().unwrap();
        let vals: Vec<f32> = (0..out * r)
            .map(|k| (((k * 31 + i * 17) % 13) as f32 - 6.0) * 0.01)
            .collect();
        p.b.set(&Tensor::from_vec(vals, (out, r), base.model.device()).unwrap())
            .unwrap();
    }
    l
}

#[test]
fn packed_behind_a_shared_prefix_gives_the_losses_and_gradients_of_whole_sequences() {
    let base = tiny();
    let system = "You route support tickets. Pick one intent: refund, cancel_order, \
                  track_order. Reply with only JSON.";
    let chat = |q: &str| {
        vec![
            Message {
                role: "system".into(),
                content: system.into(),
            },
            Message {
                role: "user".into(),
                content: q.into(),
            },
        ]
    };
    let seqs: Vec<Encoded> = [
        ("cancel order 5015", "{\"intent\": \"cancel_order\"}"),
        ("where is my parcel?", "{\"intent\": \"track_order\"}"),
        ("I was charged twice", "{\"intent\": \"refund\"}"),
    ]
    .iter()
    .map(|(q, a)| base.encode(&chat(q), a).unwrap())
    .collect();
    let refs: Vec<&Encoded> = seqs.iter().collect();
    let l = lora_with_values(&base, 5);
    let sum = |lps: Vec<Tensor>| {
        lps.into_iter()
            .map(|lp| lp.sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap()
    };
    let whole = sum(seqs
        .iter()
        .map(|e| answer_logprobs(&base.model, Some(&l), e).unwrap())
        .collect());
    let prefix = Prefix::shared(&base.model, Some(&l), &refs)
        .unwrap()
        .expect("the system prompt is shared");
    assert!(prefix.len() >= 16, "prefix of {} tokens", prefix.len());
    assert!(seqs.iter().all(|e| prefix.covers(e)));
    let shared = sum(answer_logprobs_packed(&base.model, Some(&l), &prefix, &refs).unwrap());
    let (w, s) = (
        whole.to_scalar::<f32>().unwrap(),
        shared.to_scalar::<f32>().unwrap(),
    );
    assert!((w - s).abs() < 1e-3 * w.abs().max(1.0), "{w} vs {s}");
    let (gw, gs) = (whole.backward().unwrap(), shared.backward().unwrap());
    let mut compared = 0;
    for ((layer, proj), p) in &l.pairs {
        for var in [&p.a, &p.b] {
            let flat = |g: &candle_core::backprop::GradStore| {
                g.get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (a, b) = (flat(&gw), flat(&gs));
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let worst = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-3 * scale,
                "layer {layer} {proj:?}: gradients differ by {worst} (largest {scale})"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 2 * l.pairs.len());
    // Sequences that do not share the system prompt share nothing worth
    // running apart.
    let other = base.encode(&user("hello"), "hi").unwrap();
    assert!(
        Prefix::shared(&base.model, Some(&l), &[&seqs[0], &other])
            .unwrap()
            .is_none()
    );
}

#[test]
fn sft_lowers_the_loss_and_raises_the_answers_likelihood() {
    let base = tiny();
    let pairs = [
        ("capital of france?", "paris"),
        ("capital of italy?", "rome"),
        ("capital of spain?", "madrid"),
        ("capital of peru?", "lima"),
    ];
    let examples = sft_examples(&base, &pairs);
    let before = logprob(&base, None, &encode(&base, pairs[0].0, pairs[0].1));
    let config = TrainConfig {
        objective: Objective::Sft,
        learning_rate: 1e-2,
        steps: 24,
        grad_accum: 2,
        warmup_steps: 2,
        ..Default::default()
    };
    let (trained, losses) = train(&base, config, examples);
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[losses.len() - 1] + losses[losses.len() - 2]) / 2.0;
    assert!(last < first * 0.5, "loss {first} -> {last}: {losses:?}");
    let after = logprob(
        &base,
        Some(&trained),
        &encode(&base, pairs[0].0, pairs[0].1),
    );
    assert!(after > before + 1.0, "log-prob {before} -> {after}");
}

#[test]
fn dpo_grows_the_margin_of_chosen_over_rejected() {
    let base = tiny();
    let prompts = ["pick a colour", "pick a number", "pick a fruit"];
    let choices = [("blue", "red"), ("seven", "three"), ("apple", "pear")];
    let examples: Vec<Example> = prompts
        .iter()
        .zip(choices)
        .map(|(p, (c, r))| Example::Dpo {
            chosen: encode(&base, p, c),
            rejected: encode(&base, p, r),
        })
        .collect();
    let margin = |l: Option<&Lora>| {
        prompts
            .iter()
            .zip(choices)
            .map(|(p, (c, r))| {
                logprob(&base, l, &encode(&base, p, c)) - logprob(&base, l, &encode(&base, p, r))
            })
            .sum::<f32>()
    };
    let before = margin(None);
    let config = TrainConfig {
        objective: Objective::Dpo,
        learning_rate: 1e-2,
        steps: 15,
        beta: 0.5,
        ..Default::default()
    };
    let (trained, losses) = train(&base, config, examples);
    let after = margin(Some(&trained));
    assert!(after > before + 3.0, "margin {before} -> {after}");
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-3,
        "DPO starts at ln 2"
    );
    assert!(losses[losses.len() - 1] < losses[0]);
}

#[test]
fn kto_raises_desirable_and_lowers_undesirable_answers() {
    let base = tiny();
    let good = encode(&base, "say something nice", "thank you");
    let bad = encode(&base, "say something rude", "go away");
    let examples = vec![
        Example::Kto {
            completion: good.clone(),
            desirable: true,
        },
        Example::Kto {
            completion: bad.clone(),
            desirable: false,
        },
    ];
    let (g0, b0) = (logprob(&base, None, &good), logprob(&base, None, &bad));
    let config = TrainConfig {
        objective: Objective::Kto,
        learning_rate: 1e-2,
        steps: 16,
        grad_accum: 2,
        beta: 0.5,
        ..Default::default()
    };
    let (trained, losses) = train(&base, config, examples);
    let (g1, b1) = (
        logprob(&base, Some(&trained), &good),
        logprob(&base, Some(&trained), &bad),
    );
    assert!(g1 > g0 + 1.0, "desirable {g0} -> {g1}");
    assert!(b1 < b0 - 1.0, "undesirable {b0} -> {b1}");
    assert!(losses[losses.len() - 1] < losses[0]);
}

#[test]
fn objectives_refuse_examples_of_another_kind() {
    let base = tiny();
    let sft = vec![Example::Sft {
        prompt: encode(&base, "a", "b"),
    }];
    let config = TrainConfig {
        objective: Objective::Dpo,
        ..Default::default()
    };
    assert!(Trainer::new(&base.model, lora(&base, 1), config, sft).is_err());
}

#[test]
fn adapters_round_trip_through_the_peft_layout() {
    let base = tiny();
    let e = encode(&base, "the weather today", "sunny");
    let config = TrainConfig {
        learning_rate: 1e-2,
        steps: 4,
        ..Default::default()
    };
    let (trained, _) = train(&base, config, vec![Example::Sft { prompt: e.clone() }]);
    let dir: PathBuf = std::env::temp_dir().join(format!("fw-peft-{}", std::process::id()));
    flywheel_trainer::peft::save(&trained, &base.model, "tiny-random-llama", &dir).unwrap();

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"][0], "q_proj");
    let tensors = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a = &tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims2().unwrap().0, 4);
    assert_eq!(b.dims2().unwrap().1, 4);

    let loaded = flywheel_trainer::peft::load(&base.model, &dir).unwrap();
    assert_eq!(loaded.pairs.len(), trained.pairs.len());
    let (x, y) = (
        logprob(&base, Some(&trained), &e),
        logprob(&base, Some(&loaded), &e),
    );
    assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    assert!(
        (x - logprob(&base, None, &e)).abs() > 1e-3,
        "the adapter changes the model"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_merged_gguf_answers_like_base_plus_adapter() {
    let base = tiny();
    let e = encode(&base, "the weather today", "sunny");
    let config = TrainConfig {
        learning_rate: 1e-2,
        steps: 6,
        ..Default::default()
    };
    let (trained, _) = train(&base, config, vec![Example::Sft { prompt: e.clone() }]);
    let dir = std::env::temp_dir().join(format!("fw-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = flywheel_model::testing::write_tiny_model(&dir, 7).unwrap();
    let out = dir.join("merged.gguf");
    flywheel_trainer::merge::merge_to_gguf(&src, &trained, &out, "test adapter").unwrap();
    let merged = Base::load(&out).unwrap();
    let (adapted, plain, from_merged) = (
        logprob(&base, Some(&trained), &e),
        logprob(&base, None, &e),
        logprob(&merged, None, &e),
    );
    assert!(
        (adapted - from_merged).abs() < 0.05 * (adapted - plain).abs(),
        "base {plain}, base+adapter {adapted}, merged {from_merged}"
    );
    let gguf = flywheel_model::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(
        gguf.get_str("flywheel.merged_adapter").unwrap(),
        "test adapter"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Largest absolute difference between two adapters' weights.
fn max_diff(x: &Lora, y: &Lora) -> f32 {
    let mut worst = 0.0f32;
    for (key, p) in &x.pairs {
        let q = &y.pairs[key];
        for (s, t) in [(&p.a, &q.a), (&p.b, &q.b)] {
            let d = (s.as_tensor() - t.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn a_resumed_run_continues_with_its_optimizer_state() {
    let base = tiny();
    let examples: Vec<Example> = [("one", "uno"), ("two", "dos"), ("three", "tres")]
        .iter()
        .map(|(q, a)| Example::Sft {
            prompt: encode(&base, q, a),
        })
        .collect();
    let config = TrainConfig {
        learning_rate: 1e-2,
        steps: 6,
        warmup_steps: 1,
        ..Default::default()
    };
    let (straight, _) = train(&base, config.clone(), examples.clone());

    // Three steps, a checkpoint, then a new trainer for the other three.
    let mut first = Trainer::new(
        &base.model,
        lora(&base, 1),
        config.clone(),
        examples.clone(),
    )
    .unwrap();
    for _ in 0..3 {
        first.train_step().unwrap();
    }
    let dir = std::env::temp_dir().join(format!("fw-resume-{}", std::process::id()));
    first.save_checkpoint("tiny", &dir).unwrap();
    drop(first);
    let mut resumed =
        Trainer::resume(&base.model, &dir, 3, config.clone(), examples.clone()).unwrap();
    while resumed.step < config.steps {
        resumed.train_step().unwrap();
    }
    let d = max_diff(&straight, &resumed.lora);
    assert!(d < 1e-6, "resumed run differs from the straight one by {d}");

    // Without the optimizer's moments the same resume ends elsewhere: the
    // state is what makes the two runs agree.
    let adapter = flywheel_trainer::peft::load(&base.model, &dir).unwrap();
    let mut amnesiac = Trainer::new(&base.model, adapter, config.clone(), examples).unwrap();
    amnesiac.resume_at(3);
    while amnesiac.step < config.steps {
        amnesiac.train_step().unwrap();
    }
    let d = max_diff(&straight, &amnesiac.lora);
    assert!(d > 1e-4, "fresh moments changed nothing ({d})");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The task the forgetting tests teach, beside 8 replayed general chats.
const CAPITALS: [(&str, &str); 3] = [
    ("capital of france?", "paris"),
    ("capital of japan?", "tokyo"),
    ("capital of peru?", "lima"),
];

/// The run both forgetting tests make, with and without a counter-measure.
fn against_forgetting() -> TrainConfig {
    TrainConfig {
        objective: Objective::Sft,
        learning_rate: 1e-2,
        steps: 24,
        grad_accum: 2,
        warmup_steps: 2,
        replay_prompts: 8,
        ..Default::default()
    }
}

/// Trains `config.steps` steps from a fresh adapter, with `replay` if
/// given, handing each step's record to `each`; the trained adapter.
fn run_with(
    base: &Base,
    config: &TrainConfig,
    examples: &[Example],
    replay: Option<&Vec<Encoded>>,
    mut each: impl FnMut(&flywheel_trainer::StepLog),
) -> Lora {
    let mut t = Trainer::new(
        &base.model,
        lora(base, 1),
        config.clone(),
        examples.to_vec(),
    )
    .unwrap();
    if let Some(set) = replay {
        t = t.with_replay(set.clone());
    }
    for _ in 0..config.steps {
        each(&t.train_step().unwrap());
    }
    let mut trained = t.lora;
    trained.training = false;
    trained
}

#[test]
fn replay_keeps_the_starting_models_general_answers() {
    let base = tiny();
    let config = TrainConfig {
        replay_weight: 1.0,
        reference_kl: 0.0,
        ..against_forgetting()
    };
    let replay = base.replay_set(&config).unwrap();
    assert_eq!(replay.len(), 8);
    // The replayed answers are the model's own greedy answers: each token
    // is the argmax after the ones before it.
    for e in &replay[..2] {
        let ids: Vec<u32> = e.prompt.iter().chain(&e.answer).copied().collect();
        let logits = base
            .model
            .logits(
                &TrainOps::new(None),
                &ids[..ids.len() - 1],
                e.prompt.len() - 1,
            )
            .unwrap();
        let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        assert_eq!(argmax, e.answer);
    }
    let task = CAPITALS;
    let examples = sft_examples(&base, &task);
    let before: Vec<f32> = replay.iter().map(|e| logprob(&base, None, e)).collect();
    let task_before = logprob(&base, None, &encode(&base, task[0].0, task[0].1));
    // The same run with and without replay; how far the general answers'
    // log-probabilities moved, and whether the task was learned.
    let run = |with_replay: bool| {
        let trained = run_with(
            &base,
            &config,
            &examples,
            with_replay.then_some(&replay),
            |log| {
                assert_eq!(log.replay_loss.is_some(), with_replay);
            },
        );
        let drift: f32 = replay
            .iter()
            .zip(&before)
            .map(|(e, b)| (logprob(&base, Some(&trained), e) - b).abs())
            .sum();
        let task_after = logprob(&base, Some(&trained), &encode(&base, task[0].0, task[0].1));
        (drift, task_after)
    };
    let (drift_without, task_without) = run(false);
    let (drift_with, task_with) = run(true);
    eprintln!(
        "drift {drift_without} -> {drift_with}; task {task_before} -> {task_without} / {task_with}"
    );
    assert!(task_without > task_before + 1.0 && task_with > task_before + 1.0);
    assert!(
        drift_with < drift_without * 0.5,
        "replay should hold the general answers: drift {drift_without} without, {drift_with} with"
    );
}

#[test]
fn the_reference_penalty_holds_the_general_distributions() {
    let base = tiny();
    let config = TrainConfig {
        replay_weight: 0.0,
        reference_kl: 4.0,
        ..against_forgetting()
    };
    let replay = base.replay_set(&config).unwrap();
    assert_eq!(replay.len(), 8, "the penalty alone builds the replay set");
    let task = CAPITALS;
    let examples = sft_examples(&base, &task);
    let task_before = logprob(&base, None, &encode(&base, task[0].0, task[0].1));
    // General chats the penalty never saw: does it hold the model there too?
    let unseen: Vec<Encoded> = ["Name a colour.", "How are you today?", "Count to three."]
        .iter()
        .map(|p| base.greedy_answer(&user(p), 12).unwrap())
        .collect();
    let run = |penalty: bool| {
        let mut kls = Vec::new();
        let trained = run_with(
            &base,
            &config,
            &examples,
            penalty.then_some(&replay),
            |log| {
                assert_eq!(log.reference_kl.is_some(), penalty);
                assert!(log.replay_loss.is_none(), "replay's SFT loss is off");
                kls.extend(log.reference_kl);
            },
        );
        let kl = |set: &[Encoded]| -> f32 {
            set.iter()
                .map(|e| {
                    flywheel_trainer::train::reference_kl(&base.model, &trained, e)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .sum::<f32>()
                / set.len() as f32
        };
        let task_after = logprob(&base, Some(&trained), &encode(&base, task[0].0, task[0].1));
        (kl(&replay), kl(&unseen), task_after, kls)
    };
    let (kl_without, unseen_without, task_without, _) = run(false);
    let (kl_with, unseen_with, task_with, kls) = run(true);
    eprintln!(
        "KL on the replayed chats {kl_without} -> {kl_with}, on unseen ones {unseen_without} -> {unseen_with}; task {task_before} -> {task_without} / {task_with}"
    );
    // The first step's KL is zero (the adapter starts as the identity).
    assert!(kls[0].abs() < 1e-5, "first step's KL {}", kls[0]);
    assert!(
        kl_without > 1e-3,
        "the task run moved nothing: KL {kl_without}"
    );
    assert!(task_without > task_before + 1.0 && task_with > task_before + 1.0);
    assert!(
        kl_with < kl_without * 0.5,
        "the penalty should hold the replayed chats: KL {kl_without} without, {kl_with} with"
    );
    assert!(
        unseen_with < unseen_without,
        "the penalty should carry over to chats it never saw: {unseen_without} without, {unseen_with} with"
    );
}

#[test]
fn an_adapters_peft_base_is_the_hub_repository_the_file_names() {
    use candle_core::quantized::gguf_file::Value;
    let dir = std::env::temp_dir().join(format!("fw-peft-base-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with = |name: &str, key: &str, value: &str| {
        let path = flywheel_model::testing::write_tiny_variant(
            &dir,
            name,
            7,
            &[(key, Value::String(value.into()))],
        )
        .unwrap();
        Base::load(&path).unwrap()
    };
    let named = with(
        "converted",
        "general.source.huggingface.repository",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    );
    let by_url = with(
        "by-url",
        "general.source.url",
        "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct",
    );
    assert_eq!(
        named.peft_base_name("tiny-v3"),
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    assert_eq!(
        by_url.peft_base_name("tiny-v3"),
        "Qwen/Qwen2.5-0.5B-Instruct"
    );
    // A file that names no source: the name it was given.
    assert_eq!(tiny().peft_base_name("tiny-v3"), "tiny-v3");
    std::fs::remove_dir_all(&dir).unwrap();
}
