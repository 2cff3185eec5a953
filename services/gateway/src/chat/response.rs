//! OpenAI's response shapes: `chat.completion` and `chat.completion.chunk`.

use flywheel_engine::{Event, FinishReason, TokenLogprob};
use serde_json::{Value, json};

/// What a generation produced so far.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// When the first token arrived.
    pub first_token_after: Option<std::time::Instant>,
}

/// How a generation stopped part-way.
#[derive(Debug)]
pub enum Failure {
    Failed(String),
    /// Past its deadline.
    TimedOut(String),
}

/// A piece of output to stream.
pub struct Delta {
    pub text: String,
    pub logprobs: Option<TokenLogprob>,
}

impl Collected {
    /// Folds one engine event in; returns the delta to stream, if any, or
    /// what failed.
    pub fn push(&mut self, ev: Event) -> Result<Option<Delta>, Failure> {
        match ev {
            Event::Delta { text, logprobs } => {
                self.first_token_after
                    .get_or_insert_with(std::time::Instant::now);
                // One delta per generated token until `Done` gives the exact
                // count (it may follow a last flush of held-back text), so
                // an abandoned generation still records what it produced.
                self.completion_tokens += 1;
                self.text.push_str(&text);
                if let Some(lp) = &logprobs {
                    self.logprobs.push(lp.clone());
                }
                if text.is_empty() && logprobs.is_none() {
                    return Ok(None);
                }
                Ok(Some(Delta { text, logprobs }))
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                self.finish = Some(finish_reason);
                self.prompt_tokens = prompt_tokens;
                self.completion_tokens = completion_tokens;
                Ok(None)
            }
            Event::Error(e) => Err(Failure::Failed(e)),
            Event::TimedOut(e) => Err(Failure::TimedOut(e)),
        }
    }
}

fn logprob_json(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.token.as_bytes(),
        "top_logprobs": lp.top.iter().map(|t| json!({
            "token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes(),
        })).collect::<Vec<_>>(),
    })
}

/// Builds response bodies for one completion id.
pub struct Chunker {
    pub id: String,
    model: String,
    /// The model version that answers (`system_fingerprint`).
    fingerprint: String,
    created: i64,
    include_usage: bool,
}

impl Chunker {
    pub fn new(id: String, model: String, fingerprint: String, include_usage: bool) -> Self {
        Self {
            id,
            model,
            fingerprint,
            created: chrono::Utc::now().timestamp(),
            include_usage,
        }
    }

    /// The whole answer: a choice per generation, in order. Usage counts
    /// the prompt once, as OpenAI's API does, and every choice's tokens.
    pub fn full_response(&self, choices: &[Collected]) -> Value {
        let choice = |(i, c): (usize, &Collected)| {
            let logprobs = if c.logprobs.is_empty() {
                Value::Null
            } else {
                json!({"content": c.logprobs.iter().map(logprob_json).collect::<Vec<_>>()})
            };
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": Value::Null},
                "logprobs": logprobs,
                "finish_reason": c.finish.map(FinishReason::as_str),
            })
        };
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices.iter().enumerate().map(choice).collect::<Vec<_>>(),
            "usage": usage(choices),
        })
    }

    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    pub fn role_chunk(&self, index: usize) -> Value {
        self.chunk(
            index,
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        )
    }

    pub fn delta_chunk(&self, index: usize, d: &Delta) -> Value {
        let logprobs = d
            .logprobs
            .as_ref()
            .map_or(Value::Null, |lp| json!({"content": [logprob_json(lp)]}));
        self.chunk(index, json!({"content": d.text}), logprobs, None)
    }

    /// The chunk carrying choice `index`'s `finish_reason`.
    pub fn finish_chunk(&self, index: usize, c: &Collected) -> Value {
        self.chunk(
            index,
            json!({}),
            Value::Null,
            c.finish.map(FinishReason::as_str),
        )
    }

    /// The last chunk, with the usage of every choice, when asked for.
    pub fn usage_chunk(&self, choices: &[Collected]) -> Option<Value> {
        self.include_usage.then(|| {
            json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [],
                "usage": usage(choices),
            })
        })
    }
}

/// Usage of a request's choices: the prompt once, every choice's tokens.
fn usage(choices: &[Collected]) -> Value {
    let prompt = choices.first().map_or(0, |c| c.prompt_tokens);
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}
