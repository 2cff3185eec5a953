//! Completions: the list (filtered by team, rating, model version, time and
//! text, newest first, a page at a time) and one completion with its
//! conversation, parameters, latency and every vote, comment and
//! correction.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Html;
use chrono::{DateTime, NaiveDate, Utc};
use flywheel_store::dashboard::{self, CompletionFilter, CompletionRow};
use flywheel_store::feedback::Feedback;
use serde::Deserialize;
use uuid::Uuid;

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::pages::{Chrome, when};

const PAGE: i64 = 50;

/// The list's query string; empty fields mean "any".
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    team: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    rating: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    /// The cursor: `<RFC 3339 time>,<completion id>` of the last row shown.
    #[serde(default)]
    before: String,
}

fn parse_time(field: &str, v: &str) -> Result<Option<DateTime<Utc>>, AdminError> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(Some(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc()));
    }
    Err(AdminError::bad_request(format!(
        "{field} must be a date (2026-12-01) or an RFC 3339 time, not {v:?}"
    )))
}

#[derive(Template)]
#[template(path = "completions.html")]
struct ListPage {
    chrome: Chrome,
    q: ListQuery,
    teams: Vec<String>,
    models: Vec<String>,
    rows: Vec<CompletionRow>,
    next: Option<String>,
}

impl ListPage {
    fn when(&self, t: &DateTime<Utc>) -> String {
        when(t)
    }
    fn next_link(&self, cursor: &str) -> String {
        let enc = crate::auth::urlencode;
        format!(
            "/admin/completions?team={}&model={}&rating={}&q={}&since={}&until={}&before={}",
            enc(&self.q.team),
            enc(&self.q.model),
            enc(&self.q.rating),
            enc(&self.q.q),
            enc(&self.q.since),
            enc(&self.q.until),
            enc(cursor)
        )
    }
}

pub async fn list(
    State(state): State<AdminState>,
    signed: Signed,
    Query(q): Query<ListQuery>,
) -> Result<Html<String>, AdminError> {
    let pool = &state.pool;
    let teams = dashboard::teams(pool).await?;
    let models = flywheel_store::models::list(pool).await?;
    let team = match q.team.trim() {
        "" => None,
        name => Some(
            teams
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| AdminError::bad_request(format!("no team is called {name:?}")))?
                .id,
        ),
    };
    let model_version = match q.model.trim() {
        "" => None,
        name => Some(
            models
                .iter()
                .find(|m| m.name == name)
                .ok_or_else(|| {
                    AdminError::bad_request(format!("no model version is called {name:?}"))
                })?
                .id,
        ),
    };
    let rating = match q.rating.as_str() {
        "" => None,
        r @ ("up" | "down" | "none" | "corrected") => Some(r.to_string()),
        other => {
            return Err(AdminError::bad_request(format!(
                "rating must be up, down, none or corrected, not {other:?}"
            )));
        }
    };
    let before = match q.before.split_once(',') {
        None if q.before.is_empty() => None,
        Some((t, id)) => Some((
            parse_time("before", t)?
                .ok_or_else(|| AdminError::bad_request("before needs a time"))?,
            id.to_string(),
        )),
        None => {
            return Err(AdminError::bad_request(
                "before must be <time>,<completion id>",
            ));
        }
    };
    let filter = CompletionFilter {
        team,
        model_version,
        rating,
        text: Some(q.q.trim().to_string()).filter(|t| !t.is_empty()),
        since: parse_time("since", &q.since)?,
        until: parse_time("until", &q.until)?,
        before,
    };
    let rows = dashboard::completions(pool, &filter, PAGE).await?;
    let next = (rows.len() as i64 == PAGE)
        .then(|| rows.last())
        .flatten()
        .map(|r| format!("{},{}", r.created_at.to_rfc3339(), r.id));
    let page = ListPage {
        chrome: Chrome::new(&signed, "completions"),
        teams: teams.into_iter().map(|t| t.name).collect(),
        models: models.into_iter().map(|m| m.name).collect(),
        q,
        rows,
        next,
    };
    Ok(Html(page.render()?))
}

/// One message of the conversation, as stored.
struct Message {
    role: String,
    content: String,
}

#[derive(Template)]
#[template(path = "completion.html")]
struct OnePage {
    chrome: Chrome,
    c: flywheel_store::completions::Completion,
    team: String,
    model: String,
    messages: Vec<Message>,
    /// The request without its messages: the sampling parameters.
    parameters: String,
    votes: Vec<Feedback>,
    created: String,
}

impl OnePage {
    fn when(&self, t: &DateTime<Utc>) -> String {
        when(t)
    }
}

pub async fn one(
    State(state): State<AdminState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Html<String>, AdminError> {
    let pool = &state.pool;
    let missing = || AdminError::not_found(format!("no completion has the id {id:?}"));
    let team = flywheel_store::completions::owner(pool, &id)
        .await?
        .ok_or_else(missing)?
        .team_id;
    let c = flywheel_store::completions::get(pool, team, &id)
        .await?
        .ok_or_else(missing)?;
    let names: HashMap<Uuid, String> = flywheel_store::models::list(pool)
        .await?
        .into_iter()
        .map(|m| (m.id, m.name))
        .collect();
    let messages = c.request["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| Message {
                    role: m["role"].as_str().unwrap_or("?").to_string(),
                    content: match &m["content"] {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                })
                .collect()
        })
        .unwrap_or_default();
    let mut params = c.request.clone();
    if let Some(o) = params.as_object_mut() {
        o.remove("messages");
    }
    let page = OnePage {
        chrome: Chrome::new(&signed, "completions"),
        team: flywheel_store::keys::team_name(pool, c.team_id)
            .await?
            .unwrap_or_default(),
        model: names
            .get(&c.model_version_id)
            .cloned()
            .unwrap_or_else(|| c.model_version_id.to_string()),
        messages,
        parameters: serde_json::to_string_pretty(&params).unwrap_or_default(),
        votes: dashboard::votes(pool, &id).await?,
        created: when(&c.created_at),
        c,
    };
    Ok(Html(page.render()?))
}
