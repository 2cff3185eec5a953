//! The overview: per team, the champion and any canary with its live
//! comparison, requests and thumbs-up rate per model version over time
//! (charts with the same numbers as a table), feedback volume, what the
//! loop is doing, and the database's health.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use askama::Template;
use axum::Json;
use axum::extract::State;
use axum::response::Html;
use chrono::{DateTime, TimeDelta, Utc};
use flywheel_store::canaries::{self, Arm, Canary};
use flywheel_store::cycles::{Cycle, Status};
use flywheel_store::dashboard::{self, Bucket};
use flywheel_store::models::{self, ModelVersion};
use schemars::JsonSchema;
use serde::Serialize;
use uuid::Uuid;

use crate::AdminState;
use crate::auth::Signed;
use crate::chart::{self, Series};
use crate::error::AdminError;
use crate::pages::{Chrome, maybe_when, rate, when};

/// How far back the overview looks.
const WINDOW_DAYS: i64 = 14;

#[derive(Debug, Serialize, JsonSchema)]
pub struct TeamView {
    pub id: Uuid,
    pub name: String,
    pub champion: Option<String>,
    pub canary: Option<CanaryView>,
    pub completions: i64,
    pub votes: i64,
    pub up: i64,
    /// One row per (bucket, model version) with traffic or votes.
    pub table: Vec<Row>,
    #[serde(skip)]
    pub requests_chart: String,
    #[serde(skip)]
    pub rate_chart: String,
    pub running: Option<CycleView>,
    pub recent: Vec<CycleView>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Row {
    pub bucket: String,
    pub model: String,
    pub requests: i64,
    pub votes: i64,
    pub up: i64,
    pub up_rate: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CanaryView {
    pub id: Uuid,
    pub candidate: String,
    pub champion: String,
    pub share: String,
    pub deadline: String,
    pub candidate_arm: ArmView,
    pub champion_arm: ArmView,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ArmView {
    pub completions: i64,
    pub up: i64,
    pub down: i64,
    pub up_rate: String,
}

impl From<Arm> for ArmView {
    fn from(a: Arm) -> Self {
        Self {
            completions: a.completions,
            up: a.up,
            down: a.down,
            up_rate: rate(a.up, a.up + a.down),
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CycleView {
    pub id: Uuid,
    pub status: String,
    pub stage: String,
    pub started: String,
    pub finished: String,
    pub reason: String,
    pub evaluation_id: Option<Uuid>,
}

impl From<&Cycle> for CycleView {
    fn from(c: &Cycle) -> Self {
        Self {
            id: c.id,
            status: c.status.to_string(),
            stage: c.stage.to_string(),
            started: when(&c.created_at),
            finished: maybe_when(&c.finished_at),
            reason: c.reason.clone().unwrap_or_default(),
            evaluation_id: c.evaluation_id,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Overview {
    pub teams: Vec<TeamView>,
    pub database_ms: String,
    pub versions: usize,
    /// The worker's latest job attempts, newest first.
    pub jobs: Vec<JobView>,
    /// The serving process's own health: (label, value).
    pub health: Vec<(&'static str, String)>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct JobView {
    pub kind: String,
    pub attempt: i32,
    pub status: String,
    pub started: String,
    pub seconds: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    chrome: Chrome,
    o: Overview,
}

/// (requests, votes, thumbs up) in one bucket for one version.
type Counts = (i64, i64, i64);

/// A bucket size that gives the window a couple of dozen points.
fn bucket_seconds(span: TimeDelta) -> f64 {
    let target = span.num_seconds().max(1) as f64 / 24.0;
    [60.0, 300.0, 900.0, 3600.0, 6.0 * 3600.0, 86400.0]
        .into_iter()
        .find(|&b| b >= target)
        .unwrap_or(86400.0)
}

fn label(t: &DateTime<Utc>, bucket: f64) -> String {
    if bucket >= 86400.0 {
        t.format("%m-%d").to_string()
    } else {
        t.format("%m-%d %H:%M").to_string()
    }
}

async fn canary_view(
    state: &AdminState,
    c: &Canary,
    names: &HashMap<Uuid, String>,
) -> Result<CanaryView, AdminError> {
    let (cand, champ) = canaries::arms(&state.pool, c).await?;
    let name = |id: &Uuid| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    Ok(CanaryView {
        id: c.id,
        candidate: name(&c.candidate_version_id),
        champion: name(&c.champion_version_id),
        share: format!("{:.0}%", 100.0 * c.share),
        deadline: when(&c.deadline),
        candidate_arm: cand.into(),
        champion_arm: champ.into(),
    })
}

async fn team_view(
    state: &AdminState,
    id: Uuid,
    name: String,
    names: &HashMap<Uuid, String>,
) -> Result<TeamView, AdminError> {
    let pool = &state.pool;
    let now = Utc::now();
    let since = now - TimeDelta::days(WINDOW_DAYS);
    // A window that starts at the team's first traffic, for teams younger
    // than it.
    let start = dashboard::first_traffic(pool, id, since)
        .await?
        .unwrap_or(now);
    let bucket = bucket_seconds(now - start);
    let rows = dashboard::traffic(pool, id, start, bucket).await?;
    let table: BTreeMap<(DateTime<Utc>, Uuid), Counts> = rows
        .iter()
        .map(|b| ((b.bucket, b.model_version_id), (b.requests, b.votes, b.up)))
        .collect();
    let buckets: BTreeSet<DateTime<Utc>> = table.keys().map(|(t, _)| *t).collect();
    let buckets: Vec<DateTime<Utc>> = buckets.into_iter().collect();
    let mut versions: Vec<Uuid> = table.keys().map(|(_, v)| *v).collect();
    versions.sort();
    versions.dedup();
    let name_of = |v: &Uuid| names.get(v).cloned().unwrap_or_else(|| v.to_string());
    let xs: Vec<String> = buckets.iter().map(|t| label(t, bucket)).collect();
    let series = |f: &dyn Fn(&Counts) -> Option<f64>| -> Vec<Series> {
        versions
            .iter()
            .map(|v| Series {
                name: name_of(v),
                values: buckets
                    .iter()
                    .map(|t| table.get(&(*t, *v)).and_then(f))
                    .collect(),
            })
            .collect()
    };
    let requests_chart = chart::lines(
        &format!("Requests per model version, team {name}"),
        &xs,
        &series(&|e| (e.0 > 0).then_some(e.0 as f64)),
        None,
        chart::count,
    );
    let rate_chart = chart::lines(
        &format!("Thumbs-up rate per model version, team {name}"),
        &xs,
        &series(&|e| (e.1 > 0).then(|| e.2 as f64 / e.1 as f64)),
        Some(1.0),
        chart::percent,
    );
    let table_rows: Vec<Row> = table
        .iter()
        .map(|((t, v), (r, n, up))| Row {
            bucket: label(t, bucket),
            model: name_of(v),
            requests: *r,
            votes: *n,
            up: *up,
            up_rate: rate(*up, *n),
        })
        .collect();
    let sum = |f: fn(&Bucket) -> i64| rows.iter().map(f).sum::<i64>();
    let champion = models::team_champion(pool, id).await?.map(|v| v.name);
    let canary = match canaries::running_for(pool, id).await? {
        Some(c) => Some(canary_view(state, &c, names).await?),
        None => None,
    };
    let cycles = flywheel_store::cycles::list(pool, Some(id), 5).await?;
    Ok(TeamView {
        id,
        name,
        champion,
        canary,
        completions: sum(|b| b.requests),
        votes: sum(|b| b.votes),
        up: sum(|b| b.up),
        table: table_rows,
        requests_chart,
        rate_chart,
        running: cycles
            .iter()
            .find(|c| c.status == Status::Running)
            .map(CycleView::from),
        recent: cycles.iter().map(CycleView::from).collect(),
    })
}

pub async fn overview(state: &AdminState) -> Result<Overview, AdminError> {
    let database_ms = dashboard::ping(&state.pool).await?;
    let all: Vec<ModelVersion> = models::list(&state.pool).await?;
    let names: HashMap<Uuid, String> = all.iter().map(|v| (v.id, v.name.clone())).collect();
    let mut teams = Vec::new();
    for t in dashboard::teams(&state.pool).await? {
        teams.push(team_view(state, t.id, t.name, &names).await?);
    }
    let jobs = flywheel_store::jobs::recent_runs(&state.pool, 8)
        .await?
        .into_iter()
        .map(|j| JobView {
            seconds: j.finished_at.map_or_else(
                || "running".into(),
                |f| format!("{:.1} s", (f - j.started_at).as_seconds_f64()),
            ),
            started: when(&j.started_at),
            kind: j.kind,
            attempt: j.attempt,
            status: j.status,
            error: j.error.unwrap_or_default(),
        })
        .collect();
    Ok(Overview {
        teams,
        database_ms: format!("{database_ms:.1}"),
        versions: all.len(),
        jobs,
        health: state.health.as_ref().map(|h| h()).unwrap_or_default(),
    })
}

pub async fn page(
    State(state): State<AdminState>,
    signed: Signed,
) -> Result<Html<String>, AdminError> {
    let page = OverviewPage {
        chrome: Chrome::new(&signed, "overview"),
        o: overview(&state).await?,
    };
    Ok(Html(page.render()?))
}

pub async fn api(
    State(state): State<AdminState>,
    _signed: Signed,
) -> Result<Json<Overview>, AdminError> {
    overview(&state).await.map(Json).map_err(AdminError::api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_grow_with_the_window() {
        assert_eq!(bucket_seconds(TimeDelta::minutes(10)), 60.0);
        assert_eq!(bucket_seconds(TimeDelta::hours(2)), 300.0);
        assert_eq!(bucket_seconds(TimeDelta::hours(20)), 3600.0);
        assert_eq!(bucket_seconds(TimeDelta::days(14)), 86400.0);
    }
}
