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

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
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

    pub fn full_response(&self, c: &Collected) -> Value {
        let logprobs = if c.logprobs.is_empty() {
            Value::Null
        } else {
            json!({"content": c.logprobs.iter().map(logprob_json).collect::<Vec<_>>()})
        };
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": c.text, "refusal": Value::Null},
                "logprobs": logprobs,
                "finish_reason": c.finish.map(FinishReason::as_str),
            }],
            "usage": c.usage(),
        })
    }

    fn chunk(&self, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    pub fn role_chunk(&self) -> Value {
        self.chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        )
    }

    pub fn delta_chunk(&self, d: &Delta) -> Value {
        let logprobs = d
            .logprobs
            .as_ref()
            .map_or(Value::Null, |lp| json!({"content": [logprob_json(lp)]}));
        self.chunk(json!({"content": d.text}), logprobs, None)
    }

    /// The chunk carrying `finish_reason`, then usage when asked for.
    pub fn final_chunks(&self, c: &Collected) -> Vec<Value> {
        let mut out = vec![self.chunk(json!({}), Value::Null, c.finish.map(FinishReason::as_str))];
        if self.include_usage {
            out.push(json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [],
                "usage": c.usage(),
            }));
        }
        out
    }
}
