//! `GET /openapi.json`: the OpenAPI 3.1 description of everything a script
//! can call: the public API (`/v1`, bearer team keys), whose part the
//! gateway makes (`flywheel_gateway::openapi`), and the dashboard's JSON
//! actions (`/admin/api`, a session cookie and its CSRF token, or a key
//! with the `admin` scope). The schemas of bodies and answers are generated
//! from the types the handlers read and write; a test calls every path
//! listed, and schemathesis checks the answers against their schemas.

use axum::routing::get;
use axum::{Json, Router};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Value, json};

use flywheel_store::decisions::Decision;

use crate::models::Action;
use crate::overview::Overview;
use crate::pages::Outcome;
use crate::teams::{LimitsJson, MadeKey, NewKeyJson, RevokeJson, ScopesJson, SettingsJson};

/// A reference to `T`'s schema, which joins `g`'s definitions.
fn of<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    g.subschema_for::<T>().to_value()
}

fn error_response(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// An admin operation: it reads `body` (a schema) and answers `ok` =
/// (description, schema) with 200, or one of the refusals every admin
/// route may give.
fn op(summary: &str, body: Option<Value>, ok: (&str, Value)) -> Value {
    let mut o = json!({
        "summary": summary,
        // A session, or a key with the `admin` scope.
        "security": [{"session": []}, {"bearer": []}],
        "responses": {
            "200": {"description": ok.0, "content": {"application/json": {"schema": ok.1}}},
            "400": error_response("the request is malformed; the message says how"),
            "401": error_response("no or a bad credential"),
            "403": error_response("a viewer account, or a key without the `admin` scope"),
            "404": error_response("no such team, model, key or run"),
            "409": error_response("refused; the message says why"),
            "413": error_response("the body is larger than the server accepts"),
            "415": error_response("the body is not `application/json`"),
            "422": error_response("a value the action cannot take (an unknown scope, ...)"),
            "503": error_response("the database cannot answer right now; retry shortly"),
        },
    });
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true,
            "content": {"application/json": {"schema": schema}}});
    }
    o
}

/// An action: the CSRF header, and the refusals every action may answer.
fn with_csrf(mut o: Value) -> Value {
    o["parameters"] = json!([{"name": "X-CSRF-Token", "in": "header", "required": false,
        "schema": {"type": "string"}, "description": "with a session, required: the session's CSRF token (in every page's forms); not with an admin key"}]);
    o["responses"]["403"] = error_response(
        "a missing or foreign CSRF token, a viewer account, or a key without the `admin` scope",
    );
    o
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
            let mut params = op["parameters"].as_array().cloned().unwrap_or_default();
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

/// The dashboard's JSON actions: `paths` and the schemas they refer to.
fn admin_part() -> Value {
    let mut g = SchemaGenerator::new(
        SchemaSettings::draft2020_12()
            .with(|s| s.definitions_path = "#/components/schemas/".into()),
    );
    let g = &mut g;
    let action = |g: &mut SchemaGenerator, summary: &str| {
        with_csrf(op(
            summary,
            Some(of::<Action>(g)),
            ("done; `done` says what happened", of::<Outcome>(g)),
        ))
    };
    let mut decisions = op(
        "The audit log",
        None,
        ("decisions, newest first", of::<Vec<Decision>>(g)),
    );
    decisions["parameters"] = json!([{"name": "team", "in": "query", "required": false,
        "schema": {"type": "string"}, "description": "one team's decisions only"}]);
    let paths = json!({
        "/admin/api/overview": {"get": op("Per team: champion, canary, traffic and thumbs over time, cycles", None,
            ("the overview", of::<Overview>(g)))},
        "/admin/api/decisions": {"get": decisions},
        "/admin/api/promote": {"post": action(g, "Make a model version the team's champion")},
        "/admin/api/canary": {"post": action(g, "Serve a model version to a share of the team's users")},
        "/admin/api/rollback": {"post": action(g, "Stop the team's canary, or bring back the champion before its last promotion")},
        "/admin/api/runs/{id}/cancel": {"post": with_csrf(op("Ask a queued or running training run to stop", None,
            ("cancel requested", of::<Outcome>(g))))},
        "/admin/api/keys": {"post": with_csrf(op("A new API key for a team (made with its first key); the secret is in this response only",
            Some(of::<NewKeyJson>(g)), ("the key", of::<MadeKey>(g))))},
        "/admin/api/keys/scopes": {"post": with_csrf(op("Set what a live key may do",
            Some(of::<ScopesJson>(g)), ("saved; gateways apply it from the key's next request", of::<Outcome>(g))))},
        "/admin/api/teams/limits": {"post": with_csrf(op("A team's rate limits, per gateway process (null: none)",
            Some(of::<LimitsJson>(g)), ("saved", of::<Outcome>(g))))},
        "/admin/api/keys/revoke": {"post": with_csrf(op("Revoke a key by its prefix (or id)",
            Some(of::<RevokeJson>(g)), ("revoked", of::<Outcome>(g))))},
        "/admin/api/teams/settings": {"post": with_csrf(op("A team's privacy and pooling settings",
            Some(of::<SettingsJson>(g)), ("saved", of::<Outcome>(g))))},
    });
    let schemas: serde_json::Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({"paths": paths, "components": {"schemas": schemas}})
}

/// The document: the gateway's `public` part (paths and schemas) and the
/// dashboard's.
pub fn document(public: Value) -> Value {
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Flywheel",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The OpenAI-compatible API of a team's model, its feedback, and the admin dashboard's actions.",
        },
        "paths": {},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (`flywheel keys create`); under /admin/api, one with the `admin` scope"},
                "session": {"type": "apiKey", "in": "cookie", "name": crate::auth::COOKIE,
                            "description": "an admin session (POST /admin/login with the sign-in form's `csrf` field and its `flywheel_login` cookie, both from GET /admin/login)"},
            },
            "schemas": {},
        },
    });
    // The two parts name different things: a name in both is a mistake.
    let merge = |into: &mut Value, from: &Value| {
        if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
            for (name, v) in from {
                let clash = into.insert(name.clone(), v.clone());
                assert!(
                    clash.is_none(),
                    "`{name}` is in both parts of the OpenAPI document"
                );
            }
        }
    };
    for part in [public, admin_part()] {
        merge(&mut doc["paths"], &part["paths"]);
        merge(
            &mut doc["components"]["schemas"],
            &part["components"]["schemas"],
        );
    }
    declare_path_parameters(&mut doc);
    doc
}

/// `GET /openapi.json`, with the gateway's `public` part.
pub fn router(public: Value) -> Router {
    let doc = std::sync::Arc::new(document(public));
    Router::new().route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { Json(doc.as_ref().clone()) }
        }),
    )
}
