//! `GET /openapi.json`: the OpenAPI 3.1 description of everything a script
//! can call, the public API (`/v1`, bearer team keys) and the dashboard's
//! JSON actions (`/admin/api`, a session cookie and its CSRF token, or a
//! key with the `admin` scope). Kept
//! by hand beside the routes; a test calls every path it lists.

use axum::Json;
use serde_json::{Value, json};

fn error_response(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn op(summary: &str, security: &str, body: Option<Value>, ok: (&str, &str)) -> Value {
    let mut o = json!({
        "summary": summary,
        "security": if security == "session" {
            // Or a key with the `admin` scope.
            json!([{"session": []}, {"bearer": []}])
        } else {
            json!([{security: []}])
        },
        "responses": {
            ok.0: {"description": ok.1},
            "400": error_response("the request is malformed; the message says how"),
            "401": error_response("no or a bad credential"),
        },
    });
    if security == "bearer" {
        let r = &mut o["responses"];
        r["403"] = error_response("the key lacks the scope this route needs");
        r["404"] = error_response("no such model, completion or route for this team");
        r["408"] = error_response("the request body stopped arriving");
        r["413"] = error_response("the body is larger than the server accepts");
        r["415"] = error_response("the body is not `application/json`");
        r["503"] =
            error_response("the database or the model cannot answer right now; retry shortly");
    } else {
        let r = &mut o["responses"];
        r["403"] = error_response("a viewer account, or a key without the `admin` scope");
        r["404"] = error_response("no such team, model, key or run");
        r["409"] = error_response("refused; the message says why");
        r["413"] = error_response("the body is larger than the server accepts");
        r["415"] = error_response("the body is not `application/json`");
        r["422"] = error_response("a value the action cannot take (an unknown scope, ...)");
        r["503"] = error_response("the database cannot answer right now; retry shortly");
    }
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true,
            "content": {"application/json": {"schema": schema}}});
    }
    o
}

/// `o` answering its success status with `schema` (a name under
/// `components.schemas`) as JSON.
fn returns(mut o: Value, schema: &str) -> Value {
    let ok = o["responses"]
        .as_object()
        .and_then(|r| r.keys().find(|k| k.starts_with('2')).cloned())
        .expect("an operation has a success status");
    o["responses"][&ok]["content"] =
        json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}});
    o
}

/// The response bodies of the public API.
fn response_schemas() -> Value {
    let count = json!({"type": "integer", "minimum": 0});
    let usage = json!({"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {"prompt_tokens": count, "completion_tokens": count, "total_tokens": count}});
    let finish = json!({"enum": ["stop", "length"]});
    let time = json!({"type": "string", "format": "date-time"});
    let vote = json!({"type": "object", "required": ["id", "object", "rating", "created_at"], "properties": {
        "id": {"type": "string", "format": "uuid"}, "object": {"const": "feedback"},
        "completion_id": {"type": "string"}, "rating": {"enum": ["up", "down"]},
        "comment": {"type": ["string", "null"]}, "correction": {"type": ["string", "null"]},
        "user": {"type": ["string", "null"]}, "created_at": time}});
    let model = json!({"type": "object", "required": ["id", "object", "created", "owned_by", "role"], "properties": {
        "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
        "owned_by": {"type": "string"}, "version_id": {"type": "string", "format": "uuid"},
        "sha256": {"type": "string"}, "context_length": {"type": ["integer", "null"]},
        "role": {"enum": ["champion", "canary", "named"]}}});
    json!({
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
            "model": {"type": "string"}, "system_fingerprint": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "items": {"type": "object",
                "required": ["index", "message", "logprobs", "finish_reason"], "properties": {
                "index": count,
                "message": {"type": "object", "required": ["role", "content"], "properties": {
                    "role": {"const": "assistant"}, "content": {"type": "string"}, "refusal": {"type": "null"}}},
                "logprobs": {"type": ["object", "null"]},
                "finish_reason": finish}}},
            "usage": usage}},
        "TextCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
            "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
            "model": {"type": "string"}, "system_fingerprint": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "object",
                "required": ["text", "index", "logprobs", "finish_reason"], "properties": {
                "text": {"type": "string"}, "index": count, "finish_reason": finish,
                "logprobs": {"oneOf": [{"type": "null"}, {"type": "object",
                    "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"], "properties": {
                    "tokens": {"type": "array", "items": {"type": "string"}},
                    "token_logprobs": {"type": "array", "items": {"type": ["number", "null"], "maximum": 0}},
                    "top_logprobs": {"type": "array", "items": {"type": ["object", "null"]}},
                    "text_offset": {"type": "array", "items": count}}}]}}}},
            "usage": usage}},
        "Model": model,
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": model}}},
        "Feedback": vote,
        "FeedbackBatch": {"type": "object", "required": ["object", "created", "duplicates", "failed", "data"], "properties": {
            "object": {"const": "list"}, "created": count, "duplicates": count, "failed": count,
            "data": {"type": "array", "items": {"type": "object", "required": ["index", "status"], "properties": {
                "index": count, "status": {"type": "integer"}, "feedback": vote,
                "duplicate_of": count, "error": {"type": "object"}}}}}},
        "CompletionRecord": {"type": "object", "required": ["id", "object", "request", "output", "finish_reason", "usage", "feedback"], "properties": {
            "id": {"type": "string"}, "object": {"enum": ["chat.completion.record", "text_completion.record"]},
            "model_version_id": {"type": "string", "format": "uuid"}, "user": {"type": ["string", "null"]},
            "request": {"type": "object"}, "output": {"type": "string"}, "finish_reason": {"type": "string"},
            "usage": usage, "latency_ms": {"type": "number"}, "ttft_ms": {"type": ["number", "null"]},
            "request_id": {"type": ["string", "null"]}, "started_at": {"type": ["string", "null"]}, "created_at": time,
            "feedback": {"type": "object", "required": ["votes", "users", "up", "down", "current", "history"], "properties": {
                "votes": count, "users": count, "up": count, "down": count,
                "current": {"type": "array", "items": vote}, "current_has_more": {"type": "boolean"},
                "history": {"type": "array", "items": vote}, "history_has_more": {"type": "boolean"}}}}},
        "FeedbackPage": {"type": "object", "required": ["object", "data", "has_more"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": vote},
            "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"}}},
        "Deleted": {"type": "object", "required": ["user", "deleted"], "properties": {
            "user": {"type": "string"}, "deleted": {"type": "object", "required": ["completions", "feedback"],
                "properties": {"completions": count, "feedback": count}}}},
        "Tokens": {"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
            "model": {"type": "string"}, "count": count, "max_model_len": count,
            "tokens": {"type": "array", "items": count}}},
        "Text": {"type": "object", "required": ["prompt"], "properties": {
            "model": {"type": "string"}, "prompt": {"type": "string"}}},
    })
}

fn admin_action(summary: &str, needs_model: bool) -> Value {
    let mut required = vec!["team", "reason"];
    if needs_model {
        required.push("model");
    }
    let mut o = op(
        summary,
        "session",
        Some(json!({
            "type": "object", "required": required,
            "properties": {
                "team": {"type": "string"},
                "model": {"type": "string", "description": "a model version's name"},
                "reason": {"type": "string", "description": "kept in the audit log"},
                "share": {"type": "number", "description": "canaries: the share of users, 0 to 1"},
            },
        })),
        ("200", "done; `done` says what happened"),
    );
    o = with_csrf(o);
    o["responses"]["409"] =
        error_response("refused: nothing to roll back, another team's model, ...");
    o
}

/// An action: the CSRF header, and the refusals every action may answer.
/// Every field `POST /v1/chat/completions` accepts, with the bounds it
/// checks (`services/gateway/src/chat/request.rs`); OpenAI's fields that
/// change nothing here (`store`, `metadata`, ...) are accepted and ignored.
fn chat_body() -> Value {
    let ignored = json!({"description": "accepted and ignored"});
    let tokens = json!({"type": ["integer", "null"], "minimum": 1});
    json!({
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "examples": ["default"],
                      "description": "a version the team may use, its base's name, or `default`"},
            "messages": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant"]},
                    "content": {"oneOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
                    ]},
                    "name": {"type": "string"},
                }}},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
            "top_k": {"type": ["integer", "null"], "minimum": 0},
            "seed": {"type": ["integer", "null"]},
            "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "max_tokens": tokens,
            "max_completion_tokens": tokens,
            "stop": {"oneOf": [{"type": "string", "minLength": 1},
                               {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
                               {"type": "null"}]},
            "stream": {"type": ["boolean", "null"]},
            "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}},
                               "description": "only with `stream: true`"},
            "logprobs": {"type": ["boolean", "null"]},
            "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20,
                             "description": "only with `logprobs: true`"},
            "logit_bias": {"type": ["object", "null"], "maxProperties": 300,
                           "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                           "description": "token id (as a string) to a bias added to its logit"},
            "n": {"type": ["integer", "null"], "minimum": 1,
                  "description": "choices, generated side by side (at most FLYWHEEL_MAX_CHOICES, 8 by default); choice i is recorded and rated as `<id>-<i>`, the first as `<id>`"},
            "user": {"type": ["string", "null"], "maxLength": 256},
            "response_format": {"type": ["object", "null"],
                                "description": "`{\"type\": \"json_object\"}` or `{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}` (OpenAI's strict subset)"},
            "tool_choice": {"const": "none", "description": "tools are not supported"},
            "modalities": {"type": "array", "items": {"const": "text"}},
            "store": ignored, "metadata": ignored, "service_tier": ignored,
            "parallel_tool_calls": ignored, "safety_identifier": ignored, "prompt_cache_key": ignored,
        },
        "additionalProperties": false,
        "examples": [{"model": "default", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "Name three colours."}]}],
    })
}

/// Every field `POST /v1/completions` accepts
/// (`services/gateway/src/chat/text.rs`).
fn text_body() -> Value {
    let ids = json!({"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}});
    json!({
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "examples": ["default"]},
            "prompt": {"oneOf": [
                {"type": "string", "minLength": 1},
                ids,
                {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
                {"type": "array", "minItems": 1, "maxItems": 1, "items": ids},
            ], "description": "text or token ids, one prompt per request"},
            "max_tokens": {"type": ["integer", "null"], "minimum": 0,
                           "description": "default 16; 0 with `echo` and `logprobs` scores the prompt"},
            "echo": {"type": ["boolean", "null"]},
            "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20,
                         "description": "alternatives per token; with `echo`, the prompt's tokens are scored too"},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
            "top_k": {"type": ["integer", "null"], "minimum": 0},
            "seed": {"type": ["integer", "null"]},
            "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "stop": {"oneOf": [{"type": "string", "minLength": 1},
                               {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
                               {"type": "null"}]},
            "logit_bias": {"type": ["object", "null"], "maxProperties": 300,
                           "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
            "n": {"enum": [1, null]},
            "best_of": {"enum": [1, null]},
            "stream": {"enum": [false, null], "description": "text completions are not streamed"},
            "stream_options": {"type": "null"},
            "user": {"type": ["string", "null"], "maxLength": 256},
        },
        "additionalProperties": false,
        "examples": [{"model": "default", "prompt": "The capital of France is", "max_tokens": 0,
                      "echo": true, "logprobs": 1}],
    })
}

/// Each `{name}` in a path, declared as a path parameter of its operations.
fn declare_path_parameters(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, ops) in paths.iter_mut() {
        let names: Vec<&str> = path
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
            .collect();
        for op in ops.as_object_mut().into_iter().flat_map(|o| o.values_mut()) {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let mut params = params;
            for name in &names {
                params.push(json!({"name": name, "in": "path", "required": true,
                                   "schema": {"type": "string", "minLength": 1}}));
            }
            if !params.is_empty() {
                op["parameters"] = Value::Array(params);
            }
        }
    }
}

/// The chat operation's answers: JSON, or an event stream of chunks.
fn chat_op(o: Value) -> Value {
    let mut o = returns(o, "ChatCompletion");
    o["responses"]["200"]["content"]["text/event-stream"] = json!({"schema": {"type": "string", "description": "`data: <chat.completion.chunk>` lines, then `data: [DONE]`"}});
    o
}

/// A route under the team's rate limits and the engine's queue.
fn limited(mut o: Value) -> Value {
    let r = &mut o["responses"];
    r["429"] = error_response(
        "the team's rate limit is reached or the server is at capacity; `retry-after` says when to retry",
    );
    r["500"] = error_response("the engine failed on this request (the detail is logged)");
    r["502"] = error_response("the upstream that serves this model failed");
    r["504"] = error_response("the upstream that serves this model did not answer in time");
    o
}

fn with_csrf(mut o: Value) -> Value {
    o["parameters"] = json!([{"name": "X-CSRF-Token", "in": "header", "required": false,
        "schema": {"type": "string"}, "description": "with a session, required: the session's CSRF token (in every page's forms); not with an admin key"}]);
    o["responses"]["403"] = error_response(
        "a missing or foreign CSRF token, a viewer account, or a key without the `admin` scope",
    );
    o["responses"]["409"] = error_response("refused; the message says why");
    o
}

/// The document.
pub fn document() -> Value {
    let mut doc = paths();
    declare_path_parameters(&mut doc);
    if let (Some(schemas), Value::Object(more)) = (
        doc["components"]["schemas"].as_object_mut(),
        response_schemas(),
    ) {
        schemas.extend(more);
    }
    doc
}

fn paths() -> Value {
    let key = "bearer";
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Flywheel",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The OpenAI-compatible API of a team's model, its feedback, and the admin dashboard's actions.",
        },
        "paths": {
            "/v1/chat/completions": {"post": limited(chat_op(op("A chat completion (OpenAI's shape; `stream` for SSE, `response_format` for JSON)", key,
                Some(chat_body()), ("200", "the completion, or an event stream"))))},
            "/v1/completions": {"post": limited(returns(op("A text completion (OpenAI's legacy shape, no chat template; `echo` and `logprobs` score the prompt)", key,
                Some(text_body()), ("200", "the completion")), "TextCompletion"))},
            "/v1/models": {"get": returns(op("The models this key's team may call", key, None, ("200", "a list")), "ModelList")},
            "/v1/models/{name}": {"get": returns(op("One model", key, None, ("200", "the model")), "Model")},
            "/v1/feedback": {"post": returns(op("An end user's rating of a completion", key,
                Some(json!({"type": "object", "required": ["completion_id", "rating"], "properties": {
                    "completion_id": {"type": "string"}, "rating": {"enum": ["up", "down"]},
                    "user": {"type": "string"}, "comment": {"type": "string"}, "correction": {"type": "string"}}})),
                ("201", "stored (acknowledged: never lost)")), "Feedback")},
            "/v1/feedback/batch": {"post": returns(op("Up to 1,000 ratings at once", key,
                Some(json!({"type": "object", "required": ["items"], "properties": {"items": {"type": "array"}}})),
                ("200", "each item's outcome")), "FeedbackBatch")},
            "/v1/completions/{id}": {"get": returns(op("A stored completion", key, None, ("200", "the record")), "CompletionRecord")},
            "/v1/completions/{id}/feedback": {"get": returns(op("A completion's votes", key, None, ("200", "a page of votes")), "FeedbackPage")},
            "/v1/users/{user}/data": {"delete": returns(op("Delete an end user's completions and votes", key, None, ("200", "what was deleted")), "Deleted")},
            "/tokenize": {"post": returns(op("Token ids of a text (`prompt`) or a conversation (`messages`, rendered as a chat completion would be) under the model that would serve it (vLLM's shape)", key,
                Some(json!({"type": "object", "properties": {"model": {"type": "string"}, "prompt": {"type": "string"}, "messages": {"type": "array"}}})),
                ("200", "`count`, `max_model_len` and `tokens`")), "Tokens")},
            "/detokenize": {"post": returns(op("The text of token ids", key,
                Some(json!({"type": "object", "required": ["tokens"], "properties": {"model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}})),
                ("200", "`prompt`: the text")), "Text")},
            "/healthz": {"get": {"summary": "The process answers", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "A model is loaded", "responses": {"200": {"description": "ready"}, "503": {"description": "loading"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/admin/api/overview": {"get": op("Per team: champion, canary, traffic and thumbs over time, cycles", "session", None, ("200", "the overview"))},
            "/admin/api/decisions": {"get": op("The audit log (`?team=T`)", "session", None, ("200", "decisions, newest first"))},
            "/admin/api/promote": {"post": admin_action("Make a model version the team's champion", true)},
            "/admin/api/canary": {"post": admin_action("Serve a model version to a share of the team's users", true)},
            "/admin/api/rollback": {"post": admin_action("Stop the team's canary, or bring back the champion before its last promotion", false)},
            "/admin/api/runs/{id}/cancel": {"post": with_csrf(op("Ask a queued or running training run to stop", "session", None, ("200", "cancel requested")))},
            "/admin/api/keys": {"post": with_csrf(op("A new API key for a team (made with its first key); the secret is in this response only", "session",
                Some(json!({"type": "object", "required": ["team"], "properties": {"team": {"type": "string"},
                    "scopes": {"type": "array", "items": {"$ref": "#/components/schemas/Scope"}, "minItems": 1,
                               "description": "what the key may do; default: every scope but admin"}}})),
                ("200", "`team`, `prefix`, `scopes` and `key`")))},
            "/admin/api/keys/scopes": {"post": with_csrf(op("Set what a live key may do", "session",
                Some(json!({"type": "object", "required": ["prefix", "scopes"], "properties": {"prefix": {"type": "string"},
                    "scopes": {"type": "array", "items": {"$ref": "#/components/schemas/Scope"}, "minItems": 1}}})),
                ("200", "saved; gateways apply it from the key's next request")))},
            "/admin/api/teams/limits": {"post": with_csrf(op("A team's rate limits, per gateway process (null: none)", "session",
                Some(json!({"type": "object", "required": ["team"], "properties": {"team": {"type": "string"},
                    "requests_per_minute": {"type": ["integer", "null"], "minimum": 1},
                    "tokens_per_minute": {"type": ["integer", "null"], "minimum": 1}}})),
                ("200", "saved")))},
            "/admin/api/keys/revoke": {"post": with_csrf(op("Revoke a key by its prefix (or id)", "session",
                Some(json!({"type": "object", "required": ["prefix"], "properties": {"prefix": {"type": "string"}}})),
                ("200", "revoked")))},
            "/admin/api/teams/settings": {"post": with_csrf(op("A team's privacy and pooling settings", "session",
                Some(json!({"type": "object", "required": ["team", "store_text", "share_for_training"], "properties": {
                    "team": {"type": "string"}, "store_text": {"type": "boolean"}, "share_for_training": {"type": "boolean"}}})),
                ("200", "saved")))},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (`flywheel keys create`); under /admin/api, one with the `admin` scope"},
                "session": {"type": "apiKey", "in": "cookie", "name": crate::auth::COOKIE,
                            "description": "an admin session (POST /admin/login with the sign-in form's `csrf` field and its `flywheel_login` cookie, both from GET /admin/login)"},
            },
            "schemas": {
                "Scope": {"enum": ["chat", "feedback", "read", "delete", "admin"],
                          "description": "chat: POST /v1/chat/completions, /v1/completions, /tokenize and /detokenize; feedback: POST /v1/feedback and /v1/feedback/batch; read: GET /v1/completions/{id} and its feedback; delete: DELETE /v1/users/{user}/data; admin: /admin/api as an admin, every team (never a default)"},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
            },
        },
    })
}

pub async fn serve() -> Json<Value> {
    Json(document())
}
