//! Teams and keys: every team with its privacy settings and its API keys
//! (prefixes only: a key's secret is shown once, on the page that made it),
//! and the admin's actions on them: a new key (and team), revoking a key,
//! the privacy and pooling switches.

use askama::Template;
use axum::extract::{Form, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use flywheel_store::dashboard::TeamRow;
use flywheel_store::keys::KeyInfo;
use serde::Deserialize;

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::pages::{Chrome, maybe_when, when};

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

#[derive(Deserialize)]
pub struct Done {
    done: Option<String>,
}

pub async fn page(
    State(state): State<AdminState>,
    signed: Signed,
    axum::extract::Query(d): axum::extract::Query<Done>,
) -> Result<Html<String>, AdminError> {
    render(&state, &signed, None, d.done).await
}

#[derive(Deserialize)]
pub struct NewKey {
    csrf: Option<String>,
    team: String,
}

/// Longest team name accepted from the form.
const MAX_TEAM: usize = 100;

/// A new key (the team is made with its first key). The secret is in this
/// response only: the page is not cached, and nothing stores it.
pub async fn create_key(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<NewKey>,
) -> Result<Html<String>, AdminError> {
    signed.may_act(f.csrf.as_deref())?;
    let team = f.team.trim();
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
    render(&state, &signed, Some((team.to_string(), secret)), None).await
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
    signed.may_act(f.csrf.as_deref())?;
    if f.confirm.as_deref() != Some("yes") {
        return Err(AdminError::bad_request(
            "tick the confirmation box: the key stops working at once",
        ));
    }
    let n = flywheel_store::keys::revoke_key(&state.pool, f.prefix.trim()).await?;
    if n == 0 {
        return Err(AdminError::conflict(format!(
            "no active key has the prefix {:?}",
            f.prefix
        )));
    }
    tracing::info!(
        admin = signed.session.username,
        prefix = f.prefix,
        "API key revoked"
    );
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
    signed.may_act(f.csrf.as_deref())?;
    let (store, share) = (f.store_text.is_some(), f.share_for_training.is_some());
    if !flywheel_store::keys::set_store_text(&state.pool, &f.team, store).await?
        || !flywheel_store::keys::set_share_for_training(&state.pool, &f.team, share).await?
    {
        return Err(AdminError::bad_request(format!(
            "no team is called {:?}",
            f.team
        )));
    }
    tracing::info!(
        admin = signed.session.username,
        team = f.team,
        store,
        share,
        "team settings"
    );
    Ok(Redirect::to("/admin/teams?done=settings+saved").into_response())
}
