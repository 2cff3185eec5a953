//! The public API's part of `/openapi.json`: each route, with the schemas
//! of what it reads and answers generated from the types its handler uses
//! (schemars: JSON Schema 2020-12, the dialect of OpenAPI 3.1). The
//! dashboard's part and the document around both are in
//! `flywheel_admin::openapi`.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Value, json};

use crate::chat::tokenize::{Detokenize, Text, Tokenize, Tokens};
use crate::chat::{ChatCompletion, ChatCompletionChunk, ChatRequest, TextCompletion, TextRequest};
use crate::error::ErrorBody;
use crate::feedback::{BatchIn, FeedbackBatch, FeedbackIn, Vote};
use crate::health::{Health, Readiness};
use crate::models::{Model, ModelList};
use crate::records::{CompletionRecord, Deleted, FeedbackPage};

/// Generates schemas whose references point into `components.schemas`.
struct Schemas(SchemaGenerator);

impl Schemas {
    fn new() -> Self {
        Self(SchemaGenerator::new(SchemaSettings::draft2020_12().with(
            |s| s.definitions_path = "#/components/schemas/".into(),
        )))
    }

    /// A reference to `T`'s schema, which joins the components.
    fn of<T: JsonSchema>(&mut self) -> Value {
        self.0.subschema_for::<T>().to_value()
    }
}

fn error_response(error: &Value, description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": error}}})
}

/// An operation of a team key: it reads `body` (a schema) and answers
/// `ok` = (status, description, schema), or one of the refusals every
/// keyed route may give.
fn op(error: &Value, summary: &str, body: Option<Value>, ok: (&str, &str, Value)) -> Value {
    let e = |d| error_response(error, d);
    let mut o = json!({
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {
            ok.0: {"description": ok.1, "content": {"application/json": {"schema": ok.2}}},
            "400": e("the request is malformed; the message says how"),
            "401": e("no or a bad credential"),
            "403": e("the key lacks the scope this route needs"),
            "404": e("no such model, completion or route for this team"),
            "408": e("the request body stopped arriving"),
            "413": e("the body is larger than the server accepts"),
            "415": e("the body is not `application/json`"),
            "503": e("the database or the model cannot answer right now; retry shortly"),
        },
    });
    if let Some(schema) = body {
        o["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": schema}}});
    }
    o
}

/// A route under the team's rate limits and the engine's queue.
fn limited(error: &Value, mut o: Value) -> Value {
    let r = &mut o["responses"];
    r["429"] = error_response(
        error,
        "the team's rate limit is reached or the server is at capacity; `retry-after` says when to retry",
    );
    r["500"] = error_response(
        error,
        "the engine failed on this request (the detail is logged)",
    );
    r["502"] = error_response(error, "the upstream that serves this model failed");
    r["504"] = error_response(
        error,
        "the upstream that serves this model did not answer in time",
    );
    o
}

fn probe(summary: &str, ok: &str, schema: Value) -> Value {
    json!({"summary": summary, "responses": {
        "200": {"description": ok, "content": {"application/json": {"schema": schema}}}}})
}

/// The public routes: `paths` and the `components.schemas` they refer to.
pub fn part() -> Value {
    let mut s = Schemas::new();
    let error = &s.of::<ErrorBody>();
    let chat = {
        let mut o = op(
            error,
            "A chat completion (OpenAI's shape; `stream` for SSE, `response_format` for JSON)",
            Some(s.of::<ChatRequest>()),
            (
                "200",
                "the completion, or an event stream",
                s.of::<ChatCompletion>(),
            ),
        );
        o["responses"]["200"]["content"]["text/event-stream"] = json!({"schema": {
            "type": "string",
            "description": "`data: <ChatCompletionChunk>` events, then `data: [DONE]`",
            "contentMediaType": "text/event-stream",
            "contentSchema": s.of::<ChatCompletionChunk>(),
        }});
        limited(error, o)
    };
    let text = op(
        error,
        "A text completion (OpenAI's legacy shape, no chat template; `echo` and `logprobs` score the prompt)",
        Some(s.of::<TextRequest>()),
        ("200", "the completion", s.of::<TextCompletion>()),
    );
    let text = limited(error, text);
    let tokenize = op(
        error,
        "Token ids of a text (`prompt`) or a conversation (`messages`, rendered as a chat completion would be) under the model that would serve it (vLLM's shape)",
        Some(s.of::<Tokenize>()),
        ("200", "the ids and their count", s.of::<Tokens>()),
    );
    let detokenize = op(
        error,
        "The text of token ids",
        Some(s.of::<Detokenize>()),
        ("200", "the text", s.of::<Text>()),
    );
    let paths = json!({
        "/v1/chat/completions": {"post": chat},
        "/v1/completions": {"post": text},
        "/v1/models": {"get": op(error, "The models this key's team may call", None,
            ("200", "a list", s.of::<ModelList>()))},
        "/v1/models/{name}": {"get": op(error, "One model", None,
            ("200", "the model", s.of::<Model>()))},
        "/v1/feedback": {"post": op(error, "An end user's rating of a completion",
            Some(s.of::<FeedbackIn>()),
            ("201", "stored (acknowledged: never lost)", s.of::<Vote>()))},
        "/v1/feedback/batch": {"post": op(error, "Up to 1,000 ratings at once",
            Some(s.of::<BatchIn>()),
            ("200", "each item's outcome", s.of::<FeedbackBatch>()))},
        "/v1/completions/{id}": {"get": op(error, "A stored completion", None,
            ("200", "the record", s.of::<CompletionRecord>()))},
        "/v1/completions/{id}/feedback": {"get": op(error, "A completion's votes", None,
            ("200", "a page of votes", s.of::<FeedbackPage>()))},
        "/v1/users/{user}/data": {"delete": op(error, "Delete an end user's completions and votes", None,
            ("200", "what was deleted", s.of::<Deleted>()))},
        "/tokenize": {"post": tokenize},
        "/detokenize": {"post": detokenize},
        "/healthz": {"get": probe("The process answers", "ok", s.of::<Health>())},
        "/readyz": {"get": {
            "summary": "A model is loaded and writes can be kept",
            "responses": {
                "200": {"description": "ready or degraded", "content": {"application/json": {"schema": s.of::<Readiness>()}}},
                "503": {"description": "not ready", "content": {"application/json": {"schema": s.of::<Readiness>()}}},
            }}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "the text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    });
    let schemas: serde_json::Map<String, Value> = s.0.take_definitions(true).into_iter().collect();
    json!({"paths": paths, "components": {"schemas": schemas}})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reference resolves to a schema of the part.
    #[test]
    fn every_reference_resolves() {
        let part = part();
        let text = part.to_string();
        let schemas = part["components"]["schemas"].as_object().unwrap();
        let refs: Vec<&str> = text
            .split("\"$ref\":\"#/components/schemas/")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap())
            .collect();
        assert!(refs.len() > 20, "{refs:?}");
        for r in refs {
            assert!(schemas.contains_key(r), "{r} is referenced, not defined");
        }
    }

    /// The chat body lists each field the handler takes from `rest` and
    /// each ignored field, and refuses the rest.
    #[test]
    fn the_chat_body_lists_what_the_server_reads_and_nothing_else() {
        let part = part();
        let chat = &part["components"]["schemas"]["ChatRequest"];
        assert_eq!(chat["additionalProperties"], false);
        let properties = chat["properties"].as_object().unwrap();
        for field in [
            "model",
            "messages",
            "logit_bias",
            "n",
            "response_format",
            "tool_choice",
            "modalities",
            "store",
            "metadata",
        ] {
            assert!(properties.contains_key(field), "{field}");
        }
        for unsupported in ["tools", "functions", "audio", "rest"] {
            assert!(!properties.contains_key(unsupported), "{unsupported}");
        }
        assert_eq!(chat["required"], json!(["model", "messages"]));
    }
}
