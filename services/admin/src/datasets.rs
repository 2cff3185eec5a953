//! Datasets: every version with its counts, and one version's manifest
//! (rules, what was dropped and why, the rater summary, lineage) with its
//! examples as JSON Lines for training tools.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use flywheel_curation::export::Format;
use flywheel_store::datasets::DatasetVersion;
use serde::Deserialize;
use uuid::Uuid;

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::pages::{Chrome, maybe_when, when};

pub struct VersionRow {
    pub v: DatasetVersion,
    pub team: String,
    pub created: String,
}

#[derive(Template)]
#[template(path = "datasets.html")]
struct ListPage {
    chrome: Chrome,
    rows: Vec<VersionRow>,
}

async fn team_names(state: &AdminState) -> Result<HashMap<Uuid, String>, AdminError> {
    Ok(flywheel_store::dashboard::teams(&state.pool)
        .await?
        .into_iter()
        .map(|t| (t.id, t.name))
        .collect())
}

fn team_of(names: &HashMap<Uuid, String>, v: &DatasetVersion) -> String {
    v.team_id.map_or_else(
        || "shared".into(),
        |t| names.get(&t).cloned().unwrap_or_default(),
    )
}

pub async fn list(
    State(state): State<AdminState>,
    signed: Signed,
) -> Result<Html<String>, AdminError> {
    let names = team_names(&state).await?;
    let rows = flywheel_store::datasets::list(&state.pool, None)
        .await?
        .into_iter()
        .map(|v| VersionRow {
            team: team_of(&names, &v),
            created: when(&v.created_at),
            v,
        })
        .collect();
    let page = ListPage {
        chrome: Chrome::new(&signed, "datasets"),
        rows,
    };
    Ok(Html(page.render()?))
}

#[derive(Template)]
#[template(path = "dataset.html")]
struct OnePage {
    chrome: Chrome,
    v: DatasetVersion,
    team: String,
    created: String,
    window: String,
    /// (reason, examples dropped for it).
    dropped: Vec<(String, String)>,
    rules: String,
    raters: String,
    lineage_votes: i64,
    lineage_completions: i64,
    formats: Vec<&'static str>,
}

pub async fn one(
    State(state): State<AdminState>,
    signed: Signed,
    Path(id): Path<Uuid>,
) -> Result<Html<String>, AdminError> {
    let v = flywheel_store::datasets::get(&state.pool, id)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no dataset version has the id {id}")))?;
    let (lineage_votes, lineage_completions) =
        flywheel_store::datasets::lineage_counts(&state.pool, id).await?;
    let names = team_names(&state).await?;
    let m = &v.manifest;
    let dropped = m["dropped"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.replace('_', " "), n.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let pretty = |x: &serde_json::Value| serde_json::to_string_pretty(x).unwrap_or_default();
    let page = OnePage {
        chrome: Chrome::new(&signed, "datasets"),
        team: team_of(&names, &v),
        created: when(&v.created_at),
        window: format!(
            "{} to {}",
            maybe_when(&v.window_start),
            maybe_when(&v.window_end)
        ),
        dropped,
        rules: pretty(&m["rules"]),
        raters: pretty(&m["raters"]),
        lineage_votes,
        lineage_completions,
        formats: Format::ALL.iter().map(|(n, _)| *n).collect(),
        v,
    };
    Ok(Html(page.render()?))
}

#[derive(Deserialize)]
pub struct ExportQuery {
    format: String,
    #[serde(default)]
    split: Option<String>,
}

/// The version's examples as JSON Lines, one download.
pub async fn export(
    State(state): State<AdminState>,
    _signed: Signed,
    Path(id): Path<Uuid>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, AdminError> {
    let format: Format = q.format.parse().map_err(AdminError::bad_request)?;
    let split = match q.split.as_deref() {
        None | Some("") => None,
        Some(s @ ("train" | "eval")) => Some(s),
        Some(other) => {
            return Err(AdminError::bad_request(format!(
                "split must be train or eval, not {other:?}"
            )));
        }
    };
    let v = flywheel_store::datasets::get(&state.pool, id)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no dataset version has the id {id}")))?;
    let rows =
        flywheel_store::datasets::examples(&state.pool, id, format.kind().as_str(), split).await?;
    let mut body = String::new();
    for (_, example) in rows {
        let line = format.line(example).map_err(|e| {
            AdminError::conflict(format!("a stored example does not fit {}: {e}", q.format))
        })?;
        body.push_str(&line.to_string());
        body.push('\n');
    }
    let file = format!(
        "attachment; filename=\"dataset-v{}-{}{}.jsonl\"",
        v.version,
        q.format,
        split.map(|s| format!("-{s}")).unwrap_or_default()
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl".to_string()),
            (header::CONTENT_DISPOSITION, file),
        ],
        body,
    )
        .into_response())
}
