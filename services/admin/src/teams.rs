//! Teams and keys: every team with its privacy settings and its API keys
//! (prefixes only: a key's secret is shown once, on the page that made it),
//! and the admin's actions on them: a new key (and team), revoking a key,
//! the privacy and pooling switches.

use askama::Template;
use axum::Json;
use axum::extract::{Form, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use flywheel_store::dashboard::TeamRow;
use flywheel_store::keys::KeyInfo;
use serde::{Deserialize, Serialize};

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::pages::{Chrome, DoneQuery, Outcome, header_csrf, maybe_when, when};

#[derive(Template)]
#[template(path = "teams.html")]
struct TeamsPage {
    chrome: Chrome,
    teams: Vec<TeamRow>,
    keys: Vec<KeyInfo>,
    /// A key just made: (team, secret), shown this once.
    made: Option<(String, String)>,
    done: Option<String>,
}

impl TeamsPage {
    fn when(&self, t: &chrono::DateTime<chrono::Utc>) -> String {
        when(t)
    }
    fn maybe_when(&self, t: &Option<chrono::DateTime<chrono::Utc>>) -> String {
        maybe_when(t)
    }
}

async fn render(
    state: &AdminState,
    signed: &Signed,
    made: Option<(String, String)>,
    done: Option<String>,
) -> Result<Html<String>, AdminError> {
    let page = TeamsPage {
        chrome: Chrome::new(signed, "teams"),
        teams: flywheel_store::dashboard::teams(&state.pool).await?,
        keys: flywheel_store::keys::list_keys(&state.pool, None).await?,
        made,
        done,
    };
    Ok(Html(page.render()?))
}

pub async fn page(
    State(state): State<AdminState>,
    signed: Signed,
    axum::extract::Query(d): axum::extract::Query<DoneQuery>,
) -> Result<Html<String>, AdminError> {
    render(&state, &signed, None, d.done).await
}

/// Longest team name accepted.
const MAX_TEAM: usize = 100;

/// A key just made.
#[derive(Serialize)]
pub struct MadeKey {
    pub team: String,
    pub prefix: String,
    /// The secret: here once, stored nowhere.
    pub key: String,
}

/// A new key (the team is made with its first key).
async fn make_key(
    state: &AdminState,
    signed: &Signed,
    team: &str,
    csrf: Option<&str>,
) -> Result<MadeKey, AdminError> {
    signed.may_act(csrf)?;
    let team = team.trim();
    if team.is_empty() || team.chars().count() > MAX_TEAM {
        return Err(AdminError::bad_request(format!(
            "a team's name has 1 to {MAX_TEAM} characters"
        )));
    }
    let (info, secret) = flywheel_store::keys::create_key(&state.pool, team).await?;
    tracing::info!(
        admin = signed.session.username,
        team,
        prefix = info.prefix,
        "API key created"
    );
    Ok(MadeKey {
        team: team.to_string(),
        prefix: info.prefix,
        key: secret,
    })
}

async fn revoke(
    state: &AdminState,
    signed: &Signed,
    prefix: &str,
    csrf: Option<&str>,
) -> Result<String, AdminError> {
    signed.may_act(csrf)?;
    let prefix = prefix.trim();
    if flywheel_store::keys::revoke_key(&state.pool, prefix).await? == 0 {
        return Err(AdminError::conflict(format!(
            "no active key has the prefix {prefix:?}"
        )));
    }
    tracing::info!(admin = signed.session.username, prefix, "API key revoked");
    Ok(format!("key {prefix} revoked"))
}

async fn set(
    state: &AdminState,
    signed: &Signed,
    team: &str,
    store: bool,
    share: bool,
    csrf: Option<&str>,
) -> Result<String, AdminError> {
    signed.may_act(csrf)?;
    if !flywheel_store::keys::set_store_text(&state.pool, team, store).await?
        || !flywheel_store::keys::set_share_for_training(&state.pool, team, share).await?
    {
        return Err(AdminError::bad_request(format!(
            "no team is called {team:?}"
        )));
    }
    tracing::info!(
        admin = signed.session.username,
        team,
        store,
        share,
        "team settings"
    );
    Ok(format!(
        "team {team}: store_text = {store}, share_for_training = {share}"
    ))
}

#[derive(Deserialize)]
pub struct NewKey {
    csrf: Option<String>,
    team: String,
}

/// The form: the secret is in this page only (never cached, never stored).
pub async fn create_key(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<NewKey>,
) -> Result<Html<String>, AdminError> {
    let made = make_key(&state, &signed, &f.team, f.csrf.as_deref()).await?;
    render(&state, &signed, Some((made.team, made.key)), None).await
}

#[derive(Deserialize)]
pub struct Revoke {
    csrf: Option<String>,
    prefix: String,
    confirm: Option<String>,
}

pub async fn revoke_key(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<Revoke>,
) -> Result<Response, AdminError> {
    signed.check_csrf(f.csrf.as_deref())?;
    if f.confirm.as_deref() != Some("yes") {
        return Err(AdminError::bad_request(
            "tick the confirmation box: the key stops working at once",
        ));
    }
    revoke(&state, &signed, &f.prefix, f.csrf.as_deref()).await?;
    Ok(Redirect::to(&format!(
        "/admin/teams?done=key+{}+revoked",
        f.prefix.trim()
    ))
    .into_response())
}

#[derive(Deserialize)]
pub struct Settings {
    csrf: Option<String>,
    team: String,
    /// Checkboxes: present when ticked.
    store_text: Option<String>,
    share_for_training: Option<String>,
}

pub async fn settings(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<Settings>,
) -> Result<Response, AdminError> {
    let (store, share) = (f.store_text.is_some(), f.share_for_training.is_some());
    set(&state, &signed, &f.team, store, share, f.csrf.as_deref()).await?;
    Ok(Redirect::to("/admin/teams?done=settings+saved").into_response())
}

#[derive(Deserialize)]
pub struct NewKeyJson {
    team: String,
}

pub async fn create_key_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    Json(f): Json<NewKeyJson>,
) -> Result<Json<MadeKey>, AdminError> {
    make_key(&state, &signed, &f.team, header_csrf(&headers))
        .await
        .map(Json)
        .map_err(AdminError::api)
}

#[derive(Deserialize)]
pub struct RevokeJson {
    prefix: String,
}

pub async fn revoke_key_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    Json(f): Json<RevokeJson>,
) -> Result<Json<Outcome>, AdminError> {
    revoke(&state, &signed, &f.prefix, header_csrf(&headers))
        .await
        .map(|done| Json(Outcome { done }))
        .map_err(AdminError::api)
}

#[derive(Deserialize)]
pub struct SettingsJson {
    team: String,
    store_text: bool,
    share_for_training: bool,
}

pub async fn settings_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    Json(f): Json<SettingsJson>,
) -> Result<Json<Outcome>, AdminError> {
    let csrf = header_csrf(&headers);
    set(
        &state,
        &signed,
        &f.team,
        f.store_text,
        f.share_for_training,
        csrf,
    )
    .await
    .map(|done| Json(Outcome { done }))
    .map_err(AdminError::api)
}
