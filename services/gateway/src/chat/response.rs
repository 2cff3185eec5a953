//! OpenAI's response shapes: `chat.completion` and `chat.completion.chunk`.

use flywheel_engine::{Event, FinishReason, TokenLogprob};
use schemars::JsonSchema;
use serde::Serialize;

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

/// `POST /v1/chat/completions`' answer, when not streamed.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ChatCompletion {
    /// The completion's id: what votes name (`<id>-<i>` for choice `i` > 0).
    pub id: String,
    #[schemars(extend("const" = "chat.completion"))]
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    /// The name the request used.
    pub model: String,
    /// The model version that answered.
    pub system_fingerprint: String,
    #[schemars(length(min = 1))]
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Choice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<Finish>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AssistantMessage {
    #[schemars(extend("const" = "assistant"))]
    pub role: &'static str,
    pub content: String,
    /// Always null: this server does not refuse by policy.
    pub refusal: Option<String>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// An end-of-turn token or a stop sequence.
    Stop,
    /// `max_tokens`, or the model's context window.
    Length,
}

impl From<FinishReason> for Finish {
    fn from(f: FinishReason) -> Self {
        match f {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprobs>,
}

/// A written token, its log-probability and the likeliest alternatives.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TokenLogprobs {
    pub token: String,
    #[schemars(range(max = 0.0))]
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<Alternative>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Alternative {
    pub token: String,
    #[schemars(range(max = 0.0))]
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl From<&TokenLogprob> for TokenLogprobs {
    fn from(lp: &TokenLogprob) -> Self {
        Self {
            token: lp.token.clone(),
            logprob: lp.logprob,
            bytes: lp.token.as_bytes().to_vec(),
            top_logprobs: lp
                .top
                .iter()
                .map(|t| Alternative {
                    token: t.token.clone(),
                    logprob: t.logprob,
                    bytes: t.token.as_bytes().to_vec(),
                })
                .collect(),
        }
    }
}

/// Tokens a request used: the prompt once, and every choice's output.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// One event of a streamed chat completion (`data: <chunk>`), then
/// `data: [DONE]`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[schemars(extend("const" = "chat.completion.chunk"))]
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub system_fingerprint: String,
    /// One choice's piece; none in the last chunk, which carries the usage.
    pub choices: Vec<ChunkChoice>,
    /// Only with `stream_options.include_usage`: null in every chunk but
    /// the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: ChunkDelta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<Finish>,
}

/// What a chunk adds: the role first, then text, then nothing with the
/// finish reason.
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct ChunkDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("const" = "assistant"))]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A chunk as one line of JSON (an SSE event's data): written straight
/// from its type, as each streamed token makes one.
fn to_line(chunk: &ChatCompletionChunk) -> String {
    serde_json::to_string(chunk).expect("a chunk serializes")
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
    pub fn full_response(&self, choices: &[Collected]) -> ChatCompletion {
        let choice = |(index, c): (usize, &Collected)| Choice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: c.text.clone(),
                refusal: None,
            },
            logprobs: (!c.logprobs.is_empty()).then(|| ChoiceLogprobs {
                content: c.logprobs.iter().map(TokenLogprobs::from).collect(),
            }),
            finish_reason: c.finish.map(Finish::from),
        };
        ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices: choices.iter().enumerate().map(choice).collect(),
            usage: usage(choices),
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> String {
        to_line(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn one(
        &self,
        index: usize,
        delta: ChunkDelta,
        logprobs: Option<ChoiceLogprobs>,
        finish_reason: Option<Finish>,
    ) -> String {
        let choice = ChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        };
        self.chunk(vec![choice], None)
    }

    pub fn role_chunk(&self, index: usize) -> String {
        let delta = ChunkDelta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        self.one(index, delta, None, None)
    }

    pub fn delta_chunk(&self, index: usize, d: &Delta) -> String {
        let logprobs = d.logprobs.as_ref().map(|lp| ChoiceLogprobs {
            content: vec![TokenLogprobs::from(lp)],
        });
        let delta = ChunkDelta {
            role: None,
            content: Some(d.text.clone()),
        };
        self.one(index, delta, logprobs, None)
    }

    /// The chunk carrying choice `index`'s `finish_reason`.
    pub fn finish_chunk(&self, index: usize, c: &Collected) -> String {
        self.one(
            index,
            ChunkDelta::default(),
            None,
            c.finish.map(Finish::from),
        )
    }

    /// The last chunk, with the usage of every choice, when asked for.
    pub fn usage_chunk(&self, choices: &[Collected]) -> Option<String> {
        self.include_usage
            .then(|| self.chunk(Vec::new(), Some(usage(choices))))
    }
}

/// Usage of a request's choices: the prompt once, every choice's tokens.
fn usage(choices: &[Collected]) -> Usage {
    let prompt = choices.first().map_or(0, |c| c.prompt_tokens);
    Usage::new(prompt, choices.iter().map(|c| c.completion_tokens).sum())
}
