//! The chat request as OpenAI clients send it, and its validation into
//! engine parameters. Every rejection names the offending field.

use std::collections::HashMap;
use std::sync::Arc;

use flywheel_engine::{ChatMessage, JsonShape, SamplingParams};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::AppError;

/// A chat completion request: OpenAI's fields that this server reads or
/// ignores; any other field is refused.
// OpenAI's other fields are ignored (`IGNORED`) or refused with a reason
// (`UNSUPPORTED`); the schema lists the read and the ignored ones.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(transform = closed)]
pub struct ChatRequest {
    /// A version the team may use, its base's name, or `default`.
    #[schemars(length(min = 1), example = &"default")]
    pub model: String,
    #[schemars(length(min = 1))]
    pub messages: Vec<InMessage>,
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f32>,
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub top_p: Option<f32>,
    /// Not in OpenAI's API, but common in compatible servers.
    #[schemars(range(min = 0))]
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f32>,
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f32>,
    #[schemars(range(min = 1))]
    pub max_tokens: Option<i64>,
    #[schemars(range(min = 1))]
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    /// Only with `logprobs: true`.
    #[schemars(range(min = 0, max = 20))]
    pub top_logprobs: Option<i64>,
    /// Choices, generated side by side (at most `FLYWHEEL_MAX_CHOICES`, 8
    /// by default); choice i is recorded and rated as `<id>-<i>`, the first
    /// as `<id>`.
    #[schemars(range(min = 1))]
    pub n: Option<i64>,
    /// The end user, for their votes and their data's deletion.
    #[schemars(length(max = 256))]
    pub user: Option<String>,
    /// Token id (as a string) to a bias from -100 to 100 added to its logit.
    #[schemars(extend("maxProperties" = 300, "additionalProperties" = {"type": "number", "minimum": -100, "maximum": 100}))]
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Everything else, checked against what we support or knowingly ignore.
    #[serde(flatten)]
    #[schemars(skip)]
    pub rest: HashMap<String, Value>,
}

/// The schema closed to what the request reads: its fields, those taken
/// from `rest` (`response_format`, and `tool_choice` and `modalities` at
/// the one value each may have here) and the ignored ones.
fn closed(schema: &mut schemars::Schema) {
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        properties.insert(
            "response_format".into(),
            serde_json::json!({"type": ["object", "null"],
                "description": "`{\"type\": \"json_object\"}` or `{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}` (OpenAI's strict subset)"}),
        );
        properties.insert(
            "tool_choice".into(),
            serde_json::json!({"enum": ["none", null], "description": "tools are not supported"}),
        );
        properties.insert(
            "modalities".into(),
            serde_json::json!({"type": ["array", "null"], "items": {"const": "text"}}),
        );
    }
    closed_schema(schema, IGNORED);
}

/// `schema` closed to its declared properties, plus `ignored`: fields the
/// server accepts and ignores. For bodies that keep unknown fields aside to
/// refuse them with a reason (`#[serde(flatten)] rest`), which schemars
/// cannot see.
pub(super) fn closed_schema(schema: &mut schemars::Schema, ignored: &[&str]) {
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for name in ignored {
            properties
                .entry(*name)
                .or_insert_with(|| serde_json::json!({"description": "accepted and ignored"}));
        }
    }
    schema.insert("additionalProperties".into(), false.into());
}

/// A message as sent.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(transform = closed_message)]
pub struct InMessage {
    /// `developer` is read as `system`.
    #[schemars(extend("enum" = ["system", "developer", "user", "assistant"]))]
    pub role: String,
    // Required: `None` only so that its absence is refused with its name.
    #[serde(default)]
    pub content: Option<Content>,
    /// Accepted and ignored, as it only labels participants.
    #[serde(default)]
    #[allow(dead_code)]
    pub name: Option<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub rest: HashMap<String, Value>,
}

fn closed_message(schema: &mut schemars::Schema) {
    closed_schema(schema, &[]);
    if let Some(required) = schema.get_mut("required").and_then(Value::as_array_mut) {
        required.push("content".into());
    }
}

/// Text, or parts of text.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A part of a message: text only.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Part {
    #[serde(rename = "type")]
    #[schemars(extend("const" = "text"))]
    pub kind: String,
    #[schemars(required)]
    pub text: Option<String>,
}

/// One stop sequence or up to four.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Stop {
    One(#[schemars(length(min = 1))] String),
    Many(#[schemars(length(max = 4), inner(length(min = 1)))] Vec<String>),
}

#[derive(Debug, Deserialize, Default, JsonSchema)]
pub struct StreamOptions {
    /// A last chunk with the usage of every choice.
    pub include_usage: Option<bool>,
}

/// Fields OpenAI defines that change nothing for a self-hosted text model.
const IGNORED: &[&str] = &[
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
    "user",
];

/// Fields OpenAI defines that we do not implement: refused, not ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("tools", "tool calling is not supported by this server"),
    (
        "functions",
        "function calling is not supported by this server",
    ),
    (
        "function_call",
        "function calling is not supported by this server",
    ),
    ("audio", "audio output is not supported by this server"),
    (
        "prediction",
        "predicted outputs are not supported by this server",
    ),
    (
        "web_search_options",
        "web search is not supported by this server",
    ),
    (
        "reasoning_effort",
        "reasoning_effort is not supported by this model",
    ),
];

fn bad(message: impl Into<String>, param: &str) -> AppError {
    AppError::bad_request(message, Some(param))
}

/// `response_format` as OpenAI's API takes it ([`JsonShape::from_response_format`]).
fn response_format(value: &serde_json::Value) -> Result<Option<Arc<JsonShape>>, AppError> {
    JsonShape::from_response_format(value).map_err(|e| bad(e, "response_format"))
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub struct Validated {
    pub messages: Vec<ChatMessage>,
    pub params: SamplingParams,
    /// `max_tokens` as asked; `None` means "as many as fit".
    pub max_tokens: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices to generate (the gateway caps it).
    pub n: usize,
}

/// A validated request as an upstream gets it: the messages as validated
/// (text parts joined, `developer` as `system`, as the local engine reads
/// them) and what the client asked, without the fields the gateway answers
/// itself (the model name, how to stream) or keeps to itself (the end
/// user's id, OpenAI's storage flags); the length field the client used,
/// or `max_tokens` at the gateway's default when it set none.
pub fn for_upstream(body: &Value, messages: &[ChatMessage], default_max_tokens: usize) -> Value {
    let mut out = body.clone();
    if let Some(fields) = out.as_object_mut() {
        for field in ["model", "stream", "stream_options"].iter().chain(IGNORED) {
            fields.remove(*field);
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        fields.insert("messages".into(), messages.into());
        let asked = ["max_tokens", "max_completion_tokens"]
            .iter()
            .any(|f| fields.get(*f).is_some_and(|v| !v.is_null()));
        if !asked {
            fields.insert("max_tokens".into(), default_max_tokens.into());
        }
    }
    out
}

impl ChatRequest {
    pub fn validate(self) -> Result<Validated, AppError> {
        let mut json = None;
        for (field, value) in &self.rest {
            if value.is_null() || IGNORED.contains(&field.as_str()) {
                continue;
            }
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(f, _)| f == field) {
                return Err(bad(*why, field));
            }
            match field.as_str() {
                "tool_choice" if value == "none" => {}
                "tool_choice" => return Err(bad("tool calling is not supported", field)),
                "modalities" if value == &serde_json::json!(["text"]) => {}
                "modalities" => return Err(bad("only the text modality is supported", field)),
                "response_format" => json = response_format(value)?,
                _ => {
                    return Err(bad(
                        format!("Unrecognized request argument supplied: {field}"),
                        field,
                    ));
                }
            }
        }
        let n = match self.n {
            None => 1,
            Some(n) if n < 1 => return Err(bad(format!("n must be at least 1, got {n}"), "n")),
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        };
        if self.model.trim().is_empty() {
            return Err(bad("model must not be empty", "model"));
        }
        if let Some(user) = self.user.as_deref().filter(|u| !u.is_empty()) {
            crate::input::end_user(user, "user")?;
        }
        let messages = convert_messages(self.messages)?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => Some(("max_completion_tokens", n)),
            (None, Some(n)) => Some(("max_tokens", n)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            Some((name, n)) if n < 1 => {
                return Err(bad(format!("{name} must be at least 1, got {n}"), name));
            }
            Some((_, n)) => Some(n as usize),
            None => None,
        };
        let logprobs = self.logprobs.unwrap_or(false);
        let top_logprobs = match self.top_logprobs {
            None => 0,
            Some(n) if !(0..=20).contains(&n) => {
                return Err(bad("top_logprobs must be between 0 and 20", "top_logprobs"));
            }
            Some(_) if !logprobs => {
                return Err(bad(
                    "top_logprobs requires logprobs to be true",
                    "top_logprobs",
                ));
            }
            Some(n) => n as usize,
        };
        let params = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stop: self.stop,
            logit_bias: self.logit_bias,
        }
        .params(logprobs, top_logprobs, json)?;
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(bad(
                "stream_options is only allowed when stream is true",
                "stream_options",
            ));
        }
        Ok(Validated {
            messages,
            params,
            max_tokens,
            stream,
            n,
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

/// The sampling fields chat and text completions share, as sent.
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<Stop>,
    pub logit_bias: Option<HashMap<String, f32>>,
}

impl Sampling {
    /// Checked into the engine's parameters (`max_tokens` left unlimited
    /// for the caller to set), with the log-probabilities and JSON shape
    /// the endpoint asked for.
    pub fn params(
        self,
        logprobs: bool,
        top_logprobs: usize,
        json: Option<Arc<JsonShape>>,
    ) -> Result<SamplingParams, AppError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(bad(
                format!("temperature must be between 0 and 2, got {temperature}"),
                "temperature",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad(
                format!("top_p must be in (0, 1], got {top_p}"),
                "top_p",
            ));
        }
        let top_k = match self.top_k {
            Some(k) if k < 0 => return Err(bad("top_k must not be negative", "top_k")),
            Some(k) => k as usize,
            None => 0,
        };
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v
                && !(-2.0..=2.0).contains(&v)
            {
                return Err(bad(
                    format!("{name} must be between -2 and 2, got {v}"),
                    name,
                ));
            }
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > 4 {
            return Err(bad("at most 4 stop sequences are allowed", "stop"));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(bad("stop sequences must not be empty", "stop"));
        }
        Ok(SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            max_tokens: usize::MAX,
            stop,
            logprobs,
            top_logprobs,
            ignore_eos: false,
            forced: Vec::new(),
            json,
            logit_bias: logit_bias(self.logit_bias.unwrap_or_default())?,
            speculative: true,
        })
    }
}

/// Most entries `logit_bias` may have (as OpenAI's API allows).
const MAX_LOGIT_BIAS: usize = 300;

/// `logit_bias`, checked: token ids (the model's vocabulary is checked
/// when the request reaches its engine) and biases from -100 to 100, sorted
/// by id.
fn logit_bias(map: HashMap<String, f32>) -> Result<Vec<(u32, f32)>, AppError> {
    if map.len() > MAX_LOGIT_BIAS {
        return Err(bad(
            format!(
                "logit_bias may name at most {MAX_LOGIT_BIAS} tokens, not {}",
                map.len()
            ),
            "logit_bias",
        ));
    }
    let mut bias = Vec::with_capacity(map.len());
    for (token, b) in map {
        let id: u32 = token.trim().parse().map_err(|_| {
            bad(
                format!("logit_bias keys are token ids; {token:?} is not one"),
                "logit_bias",
            )
        })?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(bad(
                format!("logit_bias values must be between -100 and 100, got {b} for token {id}"),
                "logit_bias",
            ));
        }
        bias.push((id, b));
    }
    bias.sort_by_key(|&(id, _)| id);
    Ok(bias)
}

pub(super) fn convert_messages(messages: Vec<InMessage>) -> Result<Vec<ChatMessage>, AppError> {
    if messages.is_empty() {
        return Err(bad(
            "messages must contain at least one message",
            "messages",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            if let Some(field) = m.rest.iter().find(|(_, v)| !v.is_null()).map(|(k, _)| k) {
                let why = if field == "tool_calls" {
                    "tool calls are not supported by this server".to_string()
                } else {
                    format!("unsupported message field {field}")
                };
                return Err(bad(why, &at(field)));
            }
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(bad(
                        format!("role {other:?} is not supported; use system, developer, user or assistant"),
                        &at("role"),
                    ));
                }
            };
            let content = match m.content {
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(bad(
                                    format!("content part type {kind:?} is not supported; only text"),
                                    &at("content"),
                                ));
                            }
                        }
                    }
                    text
                }
                None => return Err(bad("content is required", &at("content"))),
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Validated, AppError> {
        serde_json::from_value::<ChatRequest>(v).unwrap().validate()
    }

    fn param_of(e: AppError) -> Option<String> {
        e.body()["error"]["param"].as_str().map(str::to_string)
    }

    #[test]
    fn minimal_request_gets_openai_defaults() {
        let v = parse(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(v.params.temperature, 1.0);
        assert_eq!(v.params.top_p, 1.0);
        assert!(v.max_tokens.is_none());
        assert!(!v.stream);
    }

    #[test]
    fn text_parts_are_joined_and_developer_is_system() {
        let v = parse(serde_json::json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]}))
        .unwrap();
        assert_eq!(v.messages[0].role, "system");
        assert_eq!(v.messages[1].content, "ab");
    }

    #[test]
    fn each_bad_field_is_named() {
        let base =
            || serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let cases = [
            ("temperature", serde_json::json!(-0.5)),
            ("top_p", serde_json::json!(0.0)),
            ("max_tokens", serde_json::json!(0)),
            ("n", serde_json::json!(0)),
            ("tools", serde_json::json!([{"type": "function"}])),
            (
                "response_format",
                serde_json::json!({"type": "json_schema"}),
            ),
            ("frequency_penalty", serde_json::json!(3.0)),
            ("top_logprobs", serde_json::json!(5)),
            ("bogus_field", serde_json::json!(1)),
        ];
        for (field, value) in cases {
            let mut req = base();
            req[field] = value;
            let err = parse(req).unwrap_err();
            assert_eq!(param_of(err).as_deref(), Some(field), "{field}");
        }
        let err = parse(serde_json::json!({"model": "m", "messages": []})).unwrap_err();
        assert_eq!(param_of(err).as_deref(), Some("messages"));
        let err = parse(
            serde_json::json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
        )
        .unwrap_err();
        assert_eq!(param_of(err).as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn null_and_ignorable_fields_pass() {
        let v = parse(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": null, "store": false, "tool_choice": "none", "response_format": {"type": "text"}}),
        );
        assert!(v.is_ok());
    }
}
