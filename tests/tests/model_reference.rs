//! The real SmolLM2-135M-Instruct against llama.cpp's reference vectors
//! (tests/testdata, produced with llama-cpp-python 0.3.36 on the same GGUF):
//! tokenizer ids, first-token log-probabilities and greedy continuations.

use flywheel_model::gguf::GgufFile;
use flywheel_model::ops::log_softmax;
use flywheel_model::{Llama, TextTokenizer};
use flywheel_tests::real_model;
use flywheel_tests::reference::{argmax, ids};
use serde_json::Value;

/// The `n` highest entries of `logprobs`, best first.
fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

fn lines(name: &str) -> Vec<Value> {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn tokenizer_matches_llama_cpp_on_tricky_strings() {
    let gguf = GgufFile::open(&real_model().await.path).unwrap();
    let tok = TextTokenizer::from_gguf(&gguf).unwrap();
    let cases = lines("smollm2_tokenizer_llamacpp.jsonl");
    assert!(cases.len() >= 12);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(tok.encode(text).unwrap(), expected, "ids of {text:?}");
        assert_eq!(
            tok.decode(&expected, false).unwrap(),
            text,
            "decode of {text:?}"
        );
    }
}

#[tokio::test]
async fn forward_matches_f32_reference() {
    let path = real_model().await.path.clone();
    let reference = lines("smollm2_f32_reference.jsonl");
    tokio::task::spawn_blocking(move || {
        let mut gguf = GgufFile::open(&path).unwrap();
        let tok = TextTokenizer::from_gguf(&gguf).unwrap();
        let model = Llama::load(&mut gguf, &flywheel_model::device()).unwrap();
        for case in reference {
            let prompt = case["prompt"].as_str().unwrap();
            let prompt_ids = ids(&case["prompt_ids"]);
            assert_eq!(tok.encode(prompt).unwrap(), prompt_ids, "prompt ids");

            let mut cache = model.new_cache();
            let logits = model.forward(&prompt_ids, &mut cache).unwrap();
            let lp = log_softmax(&logits).unwrap();
            let top = top_n(&lp, 5);
            for (got, want) in top.iter().zip(case["top5_first"].as_array().unwrap()) {
                assert_eq!(
                    got.0 as u64,
                    want[0].as_u64().unwrap(),
                    "top ids for {prompt:?}"
                );
                // Summation order differs between engines; 5e-3 nats is far
                // below the gap that changes a choice.
                let want_lp = want[1].as_f64().unwrap() as f32;
                assert!((got.1 - want_lp).abs() < 5e-3, "{} vs {want_lp}", got.1);
            }

            let expected = ids(&case["greedy_ids"]);
            let mut next = argmax(&logits.to_vec1::<f32>().unwrap());
            let mut greedy = vec![next];
            while greedy.len() < expected.len() && !tok.stop_ids.contains(&next) {
                let logits = model.forward(&[next], &mut cache).unwrap();
                next = argmax(&logits.to_vec1::<f32>().unwrap());
                greedy.push(next);
            }
            assert_eq!(greedy, expected, "greedy continuation of {prompt:?}");
            let text = tok.decode(&greedy, true).unwrap();
            assert_eq!(text, case["greedy_text"].as_str().unwrap());
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn batched_prompt_equals_token_by_token() {
    // Prefill of many tokens at once (causal mask) and one token at a time
    // (KV cache) must agree.
    let path = real_model().await.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut gguf = GgufFile::open(&path).unwrap();
        let tok = TextTokenizer::from_gguf(&gguf).unwrap();
        let model = Llama::load(&mut gguf, &flywheel_model::device()).unwrap();
        let ids = tok.encode("The quick brown fox jumps over").unwrap();
        let all = model
            .forward(&ids, &mut model.new_cache())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut cache = model.new_cache();
        let mut last = Vec::new();
        for &id in &ids {
            last = model
                .forward(&[id], &mut cache)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        }
        let max_diff = all
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-3, "max logit difference {max_diff}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn serving_forward_matches_f32_reference() {
    use flywheel_engine::testing::CpuForward;
    let path = real_model().await.path.clone();
    let reference = lines("smollm2_f32_reference.jsonl");
    tokio::task::spawn_blocking(move || {
        let tok = TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let model = CpuForward::load(&path, 2).unwrap();
        for case in reference {
            let prompt_ids = ids(&case["prompt_ids"]);
            let mut cache = model.new_sequence();
            let step = |cache: &mut _, tokens: &[u32]| model.logits(cache, tokens).unwrap();
            let logits = step(&mut cache, &prompt_ids);
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
            let lp: Vec<f32> = logits.iter().map(|l| l - lse).collect();
            for (got, want) in top_n(&lp, 5)
                .iter()
                .zip(case["top5_first"].as_array().unwrap())
            {
                assert_eq!(got.0 as u64, want[0].as_u64().unwrap());
                let want_lp = want[1].as_f64().unwrap() as f32;
                assert!((got.1 - want_lp).abs() < 5e-3, "{} vs {want_lp}", got.1);
            }
            let expected = ids(&case["greedy_ids"]);
            let mut next = argmax(&logits);
            let mut greedy = vec![next];
            while greedy.len() < expected.len() && !tok.stop_ids.contains(&next) {
                next = argmax(&step(&mut cache, &[next]));
                greedy.push(next);
            }
            assert_eq!(
                greedy, expected,
                "greedy continuation of {:?}",
                case["prompt"]
            );
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn quality_check_answers_every_factual_prompt() {
    use flywheel_engine::{ChatMessage, Event, GenerateRequest, SamplingParams};
    let engine = flywheel_tests::real_engine().await;
    let cases = lines("quality.jsonl");
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let expect = case["expect"].as_str().unwrap();
        let prompt_ids = engine
            .prepare_chat(&[ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }])
            .unwrap();
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 48,
            ..Default::default()
        };
        let mut rx = engine
            .submit(GenerateRequest {
                prompt_ids,
                params,
                adapter: None,
                ..Default::default()
            })
            .unwrap();
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Delta { text: t, .. } => text.push_str(&t),
                Event::Done { .. } => break,
                Event::Error(e) | Event::TimedOut(e) => panic!("{e}"),
            }
        }
        if !text.to_lowercase().contains(&expect.to_lowercase()) {
            failures.push(format!("{prompt} -> {text:?} (expected {expect})"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
