//! Models: the registry with lineage (base, dataset, run, evaluation), each
//! team's champion and canary, and the decisions that change them
//! (promote, start a canary, roll back), each confirmed, with a required
//! reason, and written to the audit log by the same functions the loop and
//! the CLI use. The same actions answer JSON under `/admin/api`.

use std::collections::HashMap;

use askama::Template;
use axum::Json;
use axum::extract::{Form, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use flywheel_loop::decide::{self as promote, Why};
use flywheel_store::decisions::Decision;
use flywheel_store::decisions::DecisionKind;
use flywheel_store::models::ModelVersion;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::error::ApiJson;
use crate::pages::{Chrome, DoneQuery, Outcome, header_csrf, short, when};

pub struct VersionView {
    pub v: ModelVersion,
    pub owner: String,
    pub base: String,
    pub dataset: String,
    pub run: String,
    /// The newest evaluation of this version as a candidate.
    pub evaluation: Option<(Uuid, String)>,
    pub created: String,
}

pub struct TeamModels {
    pub name: String,
    pub champion: String,
    pub canary: Option<String>,
    /// The versions this team may be served by.
    pub usable: Vec<String>,
}

#[derive(Template)]
#[template(path = "models.html")]
struct ModelsPage {
    chrome: Chrome,
    versions: Vec<VersionView>,
    teams: Vec<TeamModels>,
    /// Each team's use of each upstream version in the last 30 days.
    upstream_use: Vec<flywheel_store::upstreams::Use>,
    /// What the teams' jobs (distillation, judging) spent on upstream
    /// versions in the last 30 days.
    upstream_spent: Vec<flywheel_store::upstreams::Spent>,
    done: Option<String>,
}

pub async fn page(
    State(state): State<AdminState>,
    signed: Signed,
    Query(d): Query<DoneQuery>,
) -> Result<Html<String>, AdminError> {
    let pool = &state.pool;
    let all = flywheel_store::models::list(pool).await?;
    let names: HashMap<Uuid, String> = all.iter().map(|v| (v.id, v.name.clone())).collect();
    let teams = flywheel_store::dashboard::teams(pool).await?;
    let team_names: HashMap<Uuid, String> = teams.iter().map(|t| (t.id, t.name.clone())).collect();
    let evaluations = flywheel_store::evals::list(pool, None, 500).await?;
    let mut versions = Vec::new();
    for v in &all {
        let lineage = flywheel_store::models::lineage(pool, v.id).await?;
        let name = |id: Option<Uuid>| {
            id.map_or_else(
                || "-".into(),
                |id| names.get(&id).cloned().unwrap_or(short(&id)),
            )
        };
        let evaluation = evaluations
            .iter()
            .find(|e| e.candidate_version_id == v.id)
            .map(|e| {
                let verdict = match e.passed {
                    Some(true) => "passed",
                    Some(false) => "failed",
                    None => e.status.as_str(),
                };
                (e.id, verdict.to_string())
            });
        let run = lineage
            .as_ref()
            .and_then(|l| l.training.as_ref())
            .and_then(|t| t["run"].as_str().map(str::to_string));
        versions.push(VersionView {
            owner: match (v.team_id, v.pooled) {
                (Some(t), _) => team_names.get(&t).cloned().unwrap_or(short(&t)),
                (None, true) => "pooled".into(),
                (None, false) => "base".into(),
            },
            base: name(lineage.as_ref().and_then(|l| l.base_version_id)),
            dataset: lineage
                .as_ref()
                .and_then(|l| l.dataset_version_id)
                .map_or_else(|| "-".into(), |d| short(&d)),
            run: run.map_or_else(|| "-".into(), |r| r.chars().take(8).collect()),
            evaluation,
            created: when(&v.created_at),
            v: v.clone(),
        });
    }
    let mut team_models = Vec::new();
    for t in &teams {
        let pools = flywheel_store::keys::team_shares(pool, t.id).await?;
        let champion = flywheel_store::models::team_champion(pool, t.id)
            .await?
            .map_or_else(|| "-".into(), |v| v.name);
        let canary = flywheel_store::canaries::running_for(pool, t.id)
            .await?
            .map(|c| {
                format!(
                    "{} on {:.0}% of users until {}",
                    names
                        .get(&c.candidate_version_id)
                        .cloned()
                        .unwrap_or_default(),
                    100.0 * c.share,
                    when(&c.deadline)
                )
            });
        team_models.push(TeamModels {
            name: t.name.clone(),
            champion,
            canary,
            usable: all
                .iter()
                .filter(|v| v.usable_by(t.id, pools))
                .map(|v| v.name.clone())
                .collect(),
        });
    }
    let since = chrono::Utc::now() - chrono::Duration::days(30);
    let upstream_use = flywheel_store::upstreams::usage(pool, since).await?;
    let upstream_spent = flywheel_store::upstreams::spent(pool, since).await?;
    let page = ModelsPage {
        chrome: Chrome::new(&signed, "models"),
        versions,
        teams: team_models,
        upstream_use,
        upstream_spent,
        done: d.done,
    };
    Ok(Html(page.render()?))
}

/// An action's fields, from a form or a JSON body.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Action {
    team: String,
    /// A model version's name (promote and canary).
    #[serde(default)]
    model: Option<String>,
    /// Kept in the audit log.
    #[serde(default)]
    #[schemars(required, length(min = 1))]
    reason: String,
    /// Forms: the confirmation box (`yes`). The JSON API confirms by
    /// calling.
    #[serde(default)]
    #[schemars(skip)]
    confirm: Option<String>,
    /// Forms: the session's CSRF token (the JSON API takes it as the
    /// `X-CSRF-Token` header).
    #[serde(default)]
    #[schemars(skip)]
    csrf: Option<String>,
    /// Canaries: the share of users, 0 to 1 (default from the settings).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    share: Option<f64>,
}

enum Kind {
    Promote,
    Canary,
    Rollback,
}

/// Runs an action after the checks every caller shares; returns what
/// happened, in words.
async fn act(
    state: &AdminState,
    signed: &Signed,
    kind: Kind,
    a: &Action,
    csrf: Option<&str>,
) -> Result<String, AdminError> {
    signed.may_act(csrf)?;
    let reason = a.reason.trim();
    if reason.is_empty() {
        return Err(AdminError::bad_request(
            "give a reason: it goes into the audit log",
        ));
    }
    let pool = &state.pool;
    let team = flywheel_store::keys::team_id(pool, a.team.trim())
        .await?
        .ok_or_else(|| AdminError::bad_request(format!("no team is called {:?}", a.team)))?;
    let version = || async {
        let name = a
            .model
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| AdminError::bad_request("choose a model version"))?;
        flywheel_store::models::by_name(pool, name)
            .await?
            .ok_or_else(|| AdminError::bad_request(format!("no model version is called {name:?}")))
    };
    let actor = format!("admin:{}", signed.session.username);
    let why = || Why {
        reason,
        evidence: json!({"via": "dashboard"}),
        actor: &actor,
        evaluation_id: None,
        canary_id: None,
    };
    let done = match kind {
        Kind::Promote => {
            let v = version().await?;
            promote::promote(pool, team, &v, DecisionKind::ManualPromote, why()).await?;
            format!("{} is now team {}'s champion", v.name, a.team)
        }
        Kind::Canary => {
            let v = version().await?;
            let share = a.share.unwrap_or(state.config.canary_share);
            if !(share > 0.0 && share < 1.0) {
                return Err(AdminError::bad_request(format!(
                    "share must be between 0 and 1, not {share}"
                )));
            }
            promote::start_canary(
                pool,
                team,
                &v,
                share,
                state.config.canary_deadline_hours,
                why(),
            )
            .await?;
            format!(
                "{} serves {:.0}% of team {}'s users as a canary",
                v.name,
                100.0 * share,
                a.team
            )
        }
        Kind::Rollback => {
            let done = promote::manual_rollback(pool, team, reason, &actor).await?;
            format!("team {}: {done}", a.team)
        }
    };
    tracing::info!(admin = signed.session.username, %done, "dashboard decision");
    Ok(done)
}

async fn form_action(
    state: AdminState,
    signed: Signed,
    kind: Kind,
    a: Action,
) -> Result<Response, AdminError> {
    if a.confirm.as_deref() != Some("yes") {
        // The CSRF token is checked first: a forged form learns nothing.
        signed.check_csrf(a.csrf.as_deref())?;
        return Err(AdminError::bad_request(
            "tick the confirmation box: this changes what the team's users are served",
        ));
    }
    let done = act(&state, &signed, kind, &a, a.csrf.as_deref()).await?;
    let to = format!("/admin/models?done={}", crate::auth::urlencode(&done));
    Ok(Redirect::to(&to).into_response())
}

pub async fn promote_form(
    State(state): State<AdminState>,
    signed: Signed,
    Form(a): Form<Action>,
) -> Result<Response, AdminError> {
    form_action(state, signed, Kind::Promote, a).await
}

pub async fn canary_form(
    State(state): State<AdminState>,
    signed: Signed,
    Form(a): Form<Action>,
) -> Result<Response, AdminError> {
    form_action(state, signed, Kind::Canary, a).await
}

pub async fn rollback_form(
    State(state): State<AdminState>,
    signed: Signed,
    Form(a): Form<Action>,
) -> Result<Response, AdminError> {
    form_action(state, signed, Kind::Rollback, a).await
}

async fn api_action(
    state: AdminState,
    signed: Signed,
    headers: HeaderMap,
    kind: Kind,
    a: Action,
) -> Result<Json<Outcome>, AdminError> {
    act(&state, &signed, kind, &a, header_csrf(&headers))
        .await
        .map(|done| Json(Outcome { done }))
        .map_err(AdminError::api)
}

pub async fn promote_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(a): ApiJson<Action>,
) -> Result<Json<Outcome>, AdminError> {
    api_action(state, signed, headers, Kind::Promote, a).await
}

pub async fn canary_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(a): ApiJson<Action>,
) -> Result<Json<Outcome>, AdminError> {
    api_action(state, signed, headers, Kind::Canary, a).await
}

pub async fn rollback_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(a): ApiJson<Action>,
) -> Result<Json<Outcome>, AdminError> {
    api_action(state, signed, headers, Kind::Rollback, a).await
}

#[derive(Deserialize)]
pub struct DecisionsQuery {
    #[serde(default)]
    team: String,
}

struct DecisionView {
    d: Decision,
    team: String,
    candidate: String,
    champion: String,
    at: String,
}

#[derive(Template)]
#[template(path = "decisions.html")]
struct DecisionsPage {
    chrome: Chrome,
    team: String,
    teams: Vec<String>,
    rows: Vec<DecisionView>,
}

async fn decisions_of(
    state: &AdminState,
    team: &str,
) -> Result<(Vec<Decision>, HashMap<Uuid, String>), AdminError> {
    let pool = &state.pool;
    let team_id = match team.trim() {
        "" => None,
        name => Some(
            flywheel_store::keys::team_id(pool, name)
                .await?
                .ok_or_else(|| AdminError::bad_request(format!("no team is called {name:?}")))?,
        ),
    };
    let teams: HashMap<Uuid, String> = flywheel_store::dashboard::teams(pool)
        .await?
        .into_iter()
        .map(|t| (t.id, t.name))
        .collect();
    Ok((
        flywheel_store::decisions::list(pool, team_id, 200).await?,
        teams,
    ))
}

pub async fn decisions(
    State(state): State<AdminState>,
    signed: Signed,
    Query(q): Query<DecisionsQuery>,
) -> Result<Html<String>, AdminError> {
    let (list, teams) = decisions_of(&state, &q.team).await?;
    let names: HashMap<Uuid, String> = flywheel_store::models::list(&state.pool)
        .await?
        .into_iter()
        .map(|m| (m.id, m.name))
        .collect();
    let name = |id: Option<Uuid>| {
        id.and_then(|i| names.get(&i).cloned())
            .unwrap_or("-".into())
    };
    let rows = list
        .into_iter()
        .map(|d| DecisionView {
            team: d
                .team_id
                .and_then(|t| teams.get(&t).cloned())
                .unwrap_or_else(|| "all".into()),
            candidate: name(d.candidate_version_id),
            champion: name(d.champion_version_id),
            at: when(&d.created_at),
            d,
        })
        .collect();
    let mut team_names: Vec<String> = teams.into_values().collect();
    team_names.sort();
    let page = DecisionsPage {
        chrome: Chrome::new(&signed, "decisions"),
        team: q.team,
        teams: team_names,
        rows,
    };
    Ok(Html(page.render()?))
}

pub async fn decisions_api(
    State(state): State<AdminState>,
    _signed: Signed,
    Query(q): Query<DecisionsQuery>,
) -> Result<Json<Vec<Decision>>, AdminError> {
    decisions_of(&state, &q.team)
        .await
        .map(|(d, _)| Json(d))
        .map_err(AdminError::api)
}
