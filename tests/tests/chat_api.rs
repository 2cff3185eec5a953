//! The chat API on the real SmolLM2 model, driven by a real OpenAI client
//! (`async-openai`), against real Postgres.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, FinishReason,
};
use flywheel_tests::{TestGateway, eventually};
use futures::StreamExt;

const FRANCE: &str = "What is the capital of France?";

fn client(gw: &TestGateway) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.base))
            .with_api_key(gw.key.clone()),
    )
}

fn ask(gw: &TestGateway, question: &str) -> CreateChatCompletionRequestArgs {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model(gw.model()).messages(vec![
        ChatCompletionRequestUserMessageArgs::default()
            .content(question)
            .build()
            .unwrap()
            .into(),
    ]);
    args
}

fn build(args: &mut CreateChatCompletionRequestArgs) -> CreateChatCompletionRequest {
    args.build().unwrap()
}

#[tokio::test]
async fn france_is_answered_with_paris_and_logged() {
    let gw = TestGateway::real().await;
    let resp = client(&gw)
        .chat()
        .create(build(
            ask(&gw, FRANCE)
                .temperature(0.0)
                .max_completion_tokens(30u32),
        ))
        .await
        .unwrap();
    let choice = &resp.choices[0];
    let text = choice.message.content.clone().unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert!(resp.id.starts_with("chatcmpl-"));
    assert_eq!(resp.model, gw.model());
    let usage = resp.usage.unwrap();
    assert_eq!(usage.prompt_tokens, 37, "the reference prompt is 37 tokens");
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    // The completion is in Postgres with the model version that made it.
    let team_id = flywheel_store::keys::authenticate(&gw.db.pool, &gw.key)
        .await
        .unwrap()
        .unwrap()
        .team_id;
    let row = eventually(10, || async {
        flywheel_store::completions::get(&gw.db.pool, team_id, &resp.id)
            .await
            .unwrap()
    })
    .await
    .expect("completion logged");
    assert_eq!(row.model_version_id, gw.served.version_id);
    assert_eq!(row.output, text);
    assert_eq!(row.finish_reason, "stop");
    assert_eq!(row.completion_tokens as u32, usage.completion_tokens);
    assert_eq!(row.request["messages"][0]["content"], FRANCE);
}

#[tokio::test]
async fn streaming_answers_and_reports_usage() {
    let gw = TestGateway::real().await;
    let mut stream = client(&gw)
        .chat()
        .create_stream(build(
            ask(&gw, FRANCE)
                .temperature(0.0)
                .max_completion_tokens(30u32)
                .stream_options(ChatCompletionStreamOptions {
                    include_usage: Some(true),
                    include_obfuscation: None,
                }),
        ))
        .await
        .unwrap();
    let (mut text, mut finish, mut usage, mut ids) = (String::new(), None, None, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        ids.push(chunk.id.clone());
        for c in &chunk.choices {
            if let Some(t) = &c.delta.content {
                text.push_str(t);
            }
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(finish, Some(FinishReason::Stop));
    let usage = usage.expect("usage chunk with include_usage");
    assert_eq!(usage.prompt_tokens, 37);
    assert!(usage.completion_tokens > 0);
    assert!(
        ids.len() > 3 && ids.iter().all(|id| id == &ids[0]),
        "one id per completion"
    );

    // Streaming and not give the same greedy text.
    let full = client(&gw)
        .chat()
        .create(build(
            ask(&gw, FRANCE)
                .temperature(0.0)
                .max_completion_tokens(30u32),
        ))
        .await
        .unwrap();
    assert_eq!(
        full.choices[0].message.content.as_deref(),
        Some(text.as_str())
    );
    assert_ne!(full.id, ids[0], "ids are unique per completion");
}

#[tokio::test]
async fn same_seed_gives_same_text() {
    let gw = TestGateway::real().await;
    let c = client(&gw);
    let run = |seed: i64| {
        let req = build(
            ask(&gw, "Write a sentence about the sea.")
                .temperature(1.0)
                .seed(seed)
                .max_completion_tokens(20u32),
        );
        let c = c.clone();
        async move {
            c.chat().create(req).await.unwrap().choices[0]
                .message
                .content
                .clone()
                .unwrap()
        }
    };
    let a = run(42).await;
    let b = run(42).await;
    assert_eq!(a, b);
    let others = [run(1).await, run(2).await, run(3).await];
    assert!(others.iter().any(|o| o != &a), "seeds 1-3 all gave {a:?}");
}

#[tokio::test]
async fn max_tokens_five_finishes_with_length() {
    let gw = TestGateway::real().await;
    let resp = client(&gw)
        .chat()
        .create(build(
            ask(&gw, "Tell me a long story about dragons.").max_completion_tokens(5u32),
        ))
        .await
        .unwrap();
    assert_eq!(resp.choices[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(resp.usage.unwrap().completion_tokens, 5);
    // The older `max_tokens` spelling works the same way.
    #[allow(deprecated)]
    let resp = client(&gw)
        .chat()
        .create(build(
            ask(&gw, "Tell me a long story about dragons.").max_tokens(3u32),
        ))
        .await
        .unwrap();
    assert_eq!(resp.usage.unwrap().completion_tokens, 3);
}

#[tokio::test]
async fn logprobs_and_stop_strings() {
    let gw = TestGateway::real().await;
    let resp = client(&gw)
        .chat()
        .create(build(
            ask(&gw, FRANCE)
                .temperature(0.0)
                .max_completion_tokens(12u32)
                .logprobs(true)
                .top_logprobs(3u8),
        ))
        .await
        .unwrap();
    let content = resp.choices[0].logprobs.clone().unwrap().content.unwrap();
    assert_eq!(content.len() as u32, resp.usage.unwrap().completion_tokens);
    // Greedy: each chosen token is its position's most likely one; the first
    // matches llama.cpp's reference log-probability for "The".
    assert_eq!(content[0].token, "The");
    assert!(
        (content[0].logprob - -1.8851).abs() < 5e-3,
        "{}",
        content[0].logprob
    );
    for t in &content {
        assert_eq!(t.top_logprobs.len(), 3);
        assert_eq!(t.top_logprobs[0].logprob, t.logprob);
    }

    let resp = client(&gw)
        .chat()
        .create(build(
            ask(&gw, FRANCE)
                .temperature(0.0)
                .max_completion_tokens(30u32)
                .stop(vec!["Paris".to_string()]),
        ))
        .await
        .unwrap();
    let text = resp.choices[0].message.content.clone().unwrap();
    assert_eq!(resp.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(
        !text.contains("Paris") && text.starts_with("The capital of France is"),
        "{text:?}"
    );
}

#[tokio::test]
async fn simultaneous_requests_all_complete_correctly() {
    let gw = TestGateway::real().await;
    let c = client(&gw);
    let questions = [
        FRANCE,
        "Name three colours.",
        "What is 2+2?",
        "Say hello.",
        FRANCE,
    ];
    let alone = c
        .chat()
        .create(build(
            ask(&gw, FRANCE)
                .temperature(0.0)
                .max_completion_tokens(16u32),
        ))
        .await
        .unwrap()
        .choices[0]
        .message
        .content
        .clone();
    let tasks: Vec<_> = questions
        .iter()
        .map(|q| {
            let req = build(ask(&gw, q).temperature(0.0).max_completion_tokens(16u32));
            let c = c.clone();
            tokio::spawn(async move { c.chat().create(req).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        let resp = t.await.unwrap().expect("every request completes");
        assert!(resp.usage.unwrap().completion_tokens > 0);
        answers.push(resp.choices[0].message.content.clone());
    }
    assert_eq!(answers[0], alone, "same answer under load as alone");
    assert_eq!(answers[0], answers[4]);
}

#[tokio::test]
async fn models_lists_the_served_version() {
    let gw = TestGateway::real().await;
    let list = client(&gw).models().list().await.unwrap();
    assert_eq!(list.data.len(), 1);
    assert_eq!(list.data[0].id, gw.model());
}

#[tokio::test]
async fn client_leaving_a_stream_stops_generation() {
    let gw = TestGateway::real().await;
    let before = gw.engine().stats().cancelled;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(&gw.key)
        .json(&serde_json::json!({
            "model": gw.model(), "stream": true, "max_tokens": 2000, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Write a very long essay about rivers."}]
        }))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body); // the client goes away after the first chunk
    let stopped = eventually(60, || async {
        (gw.engine().stats().cancelled > before).then_some(())
    })
    .await;
    assert!(
        stopped.is_some(),
        "generation kept running after the client left"
    );
    let metrics = reqwest::get(format!("{}/metrics", gw.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("flywheel_engine_requests_cancelled_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn eight_seeded_streams_at_once_match_their_solo_runs() {
    // The kernels compute every sequence's numbers with the same operations
    // whatever else is in the batch, so the texts must be identical, not
    // merely close.
    let gw = TestGateway::real().await;
    let c = client(&gw);
    let req = |i: i64| {
        build(
            ask(
                &gw,
                [
                    "Tell me about cats.",
                    "What is rain?",
                    FRANCE,
                    "Name a fruit.",
                ][i as usize % 4],
            )
            .temperature(0.8)
            .seed(100 + i)
            .max_completion_tokens(24u32),
        )
    };
    let run = |req: CreateChatCompletionRequest| {
        let c = c.clone();
        async move {
            let mut stream = c.chat().create_stream(req).await.unwrap();
            let mut text = String::new();
            while let Some(chunk) = stream.next().await {
                for ch in chunk.unwrap().choices {
                    text.push_str(ch.delta.content.as_deref().unwrap_or(""));
                }
            }
            text
        }
    };
    let mut alone = Vec::new();
    for i in 0..8 {
        alone.push(run(req(i)).await);
    }
    let together: Vec<_> = (0..8).map(|i| tokio::spawn(run(req(i)))).collect();
    for (i, t) in together.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), alone[i], "stream {i}");
    }
    assert!(gw.engine().stats().last_batch >= 1);
}

#[tokio::test]
async fn tokenize_counts_what_a_completion_reads_and_detokenize_gives_the_text_back() {
    let gw = TestGateway::real().await;
    let messages = serde_json::json!([{"role": "user", "content": FRANCE}]);
    let (status, tokens) = gw
        .post(
            &gw.key,
            "/tokenize",
            serde_json::json!({"model": gw.model(), "messages": messages}),
        )
        .await;
    assert_eq!(status, 200, "{tokens}");
    // The count a chat completion of the same conversation reports.
    let done = client(&gw)
        .chat()
        .create(build(ask(&gw, FRANCE).max_tokens(1u32)))
        .await
        .unwrap();
    let prompt_tokens = done.usage.unwrap().prompt_tokens as u64;
    assert_eq!(tokens["count"].as_u64(), Some(prompt_tokens), "{tokens}");
    assert_eq!(
        tokens["tokens"].as_array().unwrap().len() as u64,
        prompt_tokens
    );
    assert_eq!(tokens["max_model_len"], 8192);

    // A text and back.
    let text = "Flywheel turns feedback into training data: 12 × 3 = 36.";
    let (status, ids) = gw
        .post(&gw.key, "/tokenize", serde_json::json!({"prompt": text}))
        .await;
    assert_eq!(status, 200, "{ids}");
    assert!(ids["count"].as_u64().unwrap() > 5, "{ids}");
    let (status, back) = gw
        .post(
            &gw.key,
            "/detokenize",
            serde_json::json!({"tokens": ids["tokens"]}),
        )
        .await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["prompt"], text);

    // Bad input is a 4xx naming the field.
    for (path, body, want) in [
        (
            "/tokenize",
            serde_json::json!({"prompt": "a", "messages": messages}),
            (400, Some("prompt")),
        ),
        ("/tokenize", serde_json::json!({}), (400, Some("prompt"))),
        (
            "/detokenize",
            serde_json::json!({"tokens": [1, 49152]}),
            (400, Some("tokens")),
        ),
        (
            "/tokenize",
            serde_json::json!({"prompt": "a", "model": "no-such-model"}),
            (404, None),
        ),
    ] {
        let (status, body) = gw.post(&gw.key, path, body).await;
        assert_eq!((status, body["error"]["param"].as_str()), want, "{body}");
    }
    let (status, _) = gw
        .post(
            "fw-not-a-key",
            "/tokenize",
            serde_json::json!({"prompt": "a"}),
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn logit_bias_bans_and_forces_tokens() {
    let gw = TestGateway::real().await;
    let first = |bias: serde_json::Value| {
        let body = serde_json::json!({
            "model": gw.model(), "temperature": 0.0, "max_tokens": 1, "logprobs": true,
            "messages": [{"role": "user", "content": FRANCE}], "logit_bias": bias,
        });
        let gw = &gw;
        async move {
            let (status, done) = gw.post(&gw.key, "/v1/chat/completions", body).await;
            assert_eq!(status, 200, "{done}");
            done["choices"][0]["logprobs"]["content"][0]["token"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let id_of = |text: String| {
        let gw = &gw;
        async move {
            let (_, t) = gw
                .post(&gw.key, "/tokenize", serde_json::json!({"prompt": text}))
                .await;
            assert_eq!(t["count"], 1, "{text} is one token: {t}");
            t["tokens"][0].as_u64().unwrap()
        }
    };
    let plain = first(serde_json::json!({})).await;
    let plain_id = id_of(plain.clone()).await;
    // Banned, greedy decoding takes another token.
    let banned = first(serde_json::json!({ plain_id.to_string(): -100 })).await;
    assert_ne!(banned, plain);
    // Pushed up, an unlikely token is taken.
    let pushed = id_of("Rome".into()).await;
    let forced = first(serde_json::json!({ pushed.to_string(): 100 })).await;
    assert_eq!(forced, "Rome");
    assert_ne!(plain, "Rome");
}

/// `POST /v1/completions` through the OpenAI client, as evaluation tools
/// call it. A continuation is scored (`echo`, `logprobs`, `max_tokens` 0):
/// the prompt's last token gets the log-probability the model gives it when
/// it reads the prompt before it and writes that token itself (two
/// different paths through the engine: forced steps and a prefill), and a
/// right continuation outscores a wrong one. Echo with writing, and the
/// record keeps the prompt and only what was written.
#[tokio::test]
async fn text_completions_score_continuations_as_evaluation_tools_ask() {
    use async_openai::types::chat::Prompt;
    use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionRequestArgs};
    let gw = TestGateway::real().await;
    let client = client(&gw);
    let ask = |prompt: Prompt, max_tokens: u32, echo: bool, logprobs: Option<u8>| {
        let mut a = CreateCompletionRequestArgs::default();
        a.model(gw.model())
            .prompt(prompt)
            .max_tokens(max_tokens)
            .echo(echo)
            .temperature(0.0);
        if let Some(n) = logprobs {
            a.logprobs(n);
        }
        a.build().unwrap()
    };
    let ids = |text: String| {
        let gw = &gw;
        async move {
            let (status, t) = gw
                .post(&gw.key, "/tokenize", serde_json::json!({"prompt": text}))
                .await;
            assert_eq!(status, 200, "{t}");
            serde_json::from_value::<Vec<u32>>(t["tokens"].clone()).unwrap()
        }
    };
    let create = |req: CreateCompletionRequest| {
        let client = client.clone();
        async move { client.completions().create(req).await.unwrap() }
    };
    let prompt = "The capital of France is";
    let prompt_ids = ids(prompt.to_string()).await;

    // The model's own next token after reading the prompt, and its
    // log-probability.
    let next = create(ask(Prompt::String(prompt.into()), 1, false, Some(1))).await;
    assert_eq!(next.object, "text_completion");
    let lp = next.choices[0].logprobs.clone().unwrap();
    assert_eq!(lp.tokens.len(), 1);
    let written = lp.token_logprobs[0].unwrap();
    let with_next = ids(format!("{prompt}{}", lp.tokens[0])).await;
    assert_eq!(with_next[..prompt_ids.len()], prompt_ids[..]);
    assert_eq!(with_next.len(), prompt_ids.len() + 1);

    // The prompt and that token scored as given.
    let scored = create(ask(
        Prompt::IntegerArray(with_next.clone()),
        0,
        true,
        Some(0),
    ))
    .await;
    let s = &scored.choices[0];
    assert_eq!(s.text, format!("{prompt}{}", lp.tokens[0]));
    let l = s.logprobs.clone().unwrap();
    assert_eq!(l.tokens.len(), with_next.len());
    assert_eq!(l.tokens.concat(), s.text);
    assert_eq!(
        l.token_logprobs[0], None,
        "the first token has nothing to be scored on"
    );
    assert!(
        l.token_logprobs[1..]
            .iter()
            .all(|x| x.is_some_and(|x| x <= 0.0))
    );
    let last = l.token_logprobs.last().unwrap().unwrap();
    assert!(
        (last - written).abs() < 1e-3,
        "scored {last}, written with {written}"
    );
    let usage = scored.usage.unwrap();
    assert_eq!(
        (usage.prompt_tokens as usize, usage.completion_tokens),
        (with_next.len(), 0)
    );

    // A right continuation outscores a wrong one (what a multiple-choice
    // evaluation asks).
    let continuation = |text: &'static str| {
        let (create, ask, prompt_ids) = (&create, &ask, &prompt_ids);
        async move {
            let full = format!("{prompt}{text}");
            let r = create(ask(Prompt::String(full), 0, true, Some(0))).await;
            let l = r.choices[0].logprobs.clone().unwrap();
            l.token_logprobs[prompt_ids.len()..]
                .iter()
                .map(|x| x.unwrap())
                .sum::<f32>()
        }
    };
    let (paris, london) = (
        continuation(" Paris.").await,
        continuation(" London.").await,
    );
    assert!(paris > london, "Paris {paris}, London {london}");

    // Echo with writing: the prompt, then what the model wrote.
    let echoed = create(ask(Prompt::String(prompt.into()), 4, true, None)).await;
    let text = &echoed.choices[0].text;
    assert!(
        text.starts_with(&format!("{prompt}{}", lp.tokens[0])),
        "{text}"
    );
    let usage = echoed.usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, prompt_ids.len());
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 4);
    let id = echoed.id.clone();
    let pool = gw.db.pool.clone();
    let row = eventually(15, || async {
        sqlx::query_as::<_, (serde_json::Value, String, i32)>(
            "select request, output, completion_tokens from completions where id = $1",
        )
        .bind(&id)
        .fetch_optional(&pool)
        .await
        .unwrap()
    })
    .await
    .expect("the text completion was recorded");
    assert_eq!(row.0["prompt"], prompt);
    assert_eq!(
        format!("{prompt}{}", row.1),
        *text,
        "the record holds only what was written"
    );
    assert_eq!(row.2 as u32, usage.completion_tokens);

    // What it cannot do is a 400 naming the field.
    for (body, param) in [
        (serde_json::json!({"model": gw.model()}), "prompt"),
        (
            serde_json::json!({"model": gw.model(), "prompt": "a", "n": 2}),
            "n",
        ),
        (
            serde_json::json!({"model": gw.model(), "prompt": "a", "stream": true}),
            "stream",
        ),
        (
            serde_json::json!({"model": gw.model(), "prompt": "a", "suffix": "b"}),
            "suffix",
        ),
        (
            serde_json::json!({"model": gw.model(), "prompt": ["a", "b"]}),
            "prompt",
        ),
        (
            serde_json::json!({"model": gw.model(), "prompt": [1, 49152]}),
            "prompt",
        ),
        (
            serde_json::json!({"model": gw.model(), "prompt": "a", "max_tokens": -1}),
            "max_tokens",
        ),
        (
            serde_json::json!({"model": gw.model(), "prompt": "a", "logprobs": 21}),
            "logprobs",
        ),
        (
            serde_json::json!({"model": gw.model(), "prompt": "a", "max_tokens": 9000}),
            "prompt",
        ),
    ] {
        let (status, err) = gw.post(&gw.key, "/v1/completions", body.clone()).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (400, Some(param)),
            "{body} -> {err}"
        );
    }
}

/// `n` choices, generated side by side: choice i samples as a request of
/// its own with seed + i would (the same text), streamed or not; each is
/// recorded under its own id (`<id>-<i>` past the first) and rated by it;
/// past the configured maximum, 400.
#[tokio::test]
async fn n_choices_are_sampled_side_by_side_recorded_and_rated_each() {
    let gw = TestGateway::real().await;
    let c = client(&gw);
    let question = "Name a fruit and say why you like it.";
    let req = |n: u8, seed: i64| {
        build(
            ask(&gw, question)
                .temperature(1.0)
                .seed(seed)
                .n(n)
                .max_completion_tokens(16u32),
        )
    };
    let alone: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let r = c.chat().create(req(1, 40 + i)).await.unwrap();
            v.push(r.choices[0].message.content.clone().unwrap());
        }
        v
    };
    assert!(
        alone[0] != alone[1] || alone[1] != alone[2],
        "three seeds gave one text; the test could not tell choices apart: {alone:?}"
    );

    let three = c.chat().create(req(3, 40)).await.unwrap();
    assert_eq!(three.choices.len(), 3);
    for (i, choice) in three.choices.iter().enumerate() {
        assert_eq!(choice.index as usize, i);
        assert_eq!(
            choice.message.content.as_deref(),
            Some(alone[i].as_str()),
            "choice {i}"
        );
    }
    let usage = three.usage.clone().unwrap();
    let one = c.chat().create(req(1, 40)).await.unwrap().usage.unwrap();
    assert_eq!(
        usage.prompt_tokens, one.prompt_tokens,
        "the prompt is counted once"
    );
    let rows = eventually(15, || async {
        let rows: Vec<(String, String, i32)> = sqlx::query_as(
            "select id, output, completion_tokens from completions where id like $1 order by id",
        )
        .bind(format!("{}%", three.id))
        .fetch_all(&gw.db.pool)
        .await
        .unwrap();
        (rows.len() == 3).then_some(rows)
    })
    .await
    .expect("three records");
    let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        ids,
        [
            three.id.clone(),
            format!("{}-1", three.id),
            format!("{}-2", three.id)
        ]
    );
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.1, alone[i]);
    }
    assert_eq!(
        rows.iter().map(|r| r.2 as u32).sum::<u32>(),
        usage.completion_tokens
    );
    let (status, vote) = gw
        .post(
            &gw.key,
            "/v1/feedback",
            serde_json::json!({"completion_id": format!("{}-2", three.id), "rating": "down", "user": "ann"}),
        )
        .await;
    assert_eq!(status, 201, "{vote}");

    // Streamed: the same texts, told apart by index, each finished.
    let mut stream = c.chat().create_stream(req(2, 40)).await.unwrap();
    let (mut texts, mut finished) = (vec![String::new(); 2], vec![false; 2]);
    while let Some(chunk) = stream.next().await {
        for ch in chunk.unwrap().choices {
            let i = ch.index as usize;
            texts[i].push_str(ch.delta.content.as_deref().unwrap_or(""));
            finished[i] |= ch.finish_reason.is_some();
        }
    }
    assert_eq!(texts, alone[..2]);
    assert_eq!(finished, [true, true]);

    let (status, err) = gw
        .post(
            &gw.key,
            "/v1/chat/completions",
            serde_json::json!({"model": gw.model(), "n": 9,
                               "messages": [{"role": "user", "content": question}]}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("n")),
        "{err}"
    );
}
