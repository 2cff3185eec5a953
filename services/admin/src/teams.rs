//! Teams and keys: every team with its privacy settings and its API keys
//! (prefixes only: a key's secret is shown once, on the page that made it),
//! and the admin's actions on them: a new key (and team), revoking a key,
//! the privacy and pooling switches, a key's scopes and a team's rate limits.

use askama::Template;
use axum::Json;
use axum::extract::{Form, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use flywheel_store::dashboard::TeamRow;
use flywheel_store::keys::{KeyInfo, Scope};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::error::ApiJson;
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
    /// Every scope with what it opens, for the forms.
    fn scopes(&self) -> Vec<(&'static str, &'static str)> {
        Scope::ALL.iter().map(|s| (s.as_str(), s.opens())).collect()
    }
    /// Whether a new key's box for `scope` starts ticked (not `admin`).
    fn by_default(&self, scope: &str) -> bool {
        Scope::DEFAULT.iter().any(|s| s.as_str() == scope)
    }
    fn has(&self, k: &KeyInfo, scope: &str) -> bool {
        k.scopes.iter().any(|s| s == scope)
    }
    fn limit(&self, n: &Option<i32>) -> String {
        n.map_or(String::new(), |n| n.to_string())
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
#[derive(Serialize, JsonSchema)]
pub struct MadeKey {
    pub team: String,
    pub prefix: String,
    /// What the key may do.
    pub scopes: Vec<String>,
    /// The secret: here once, stored nowhere.
    pub key: String,
}

/// A new key (the team is made with its first key).
async fn make_key(
    state: &AdminState,
    signed: &Signed,
    team: &str,
    scopes: &[Scope],
    csrf: Option<&str>,
) -> Result<MadeKey, AdminError> {
    signed.may_act(csrf)?;
    let team = team.trim();
    if team.is_empty() || team.chars().count() > MAX_TEAM {
        return Err(AdminError::bad_request(format!(
            "a team's name has 1 to {MAX_TEAM} characters"
        )));
    }
    if scopes.is_empty() {
        return Err(AdminError::bad_request("a key needs at least one scope"));
    }
    let (info, secret) = flywheel_store::keys::create_key_with(&state.pool, team, scopes).await?;
    tracing::info!(
        admin = signed.session.username,
        team,
        prefix = info.prefix,
        scopes = info.scopes.join(","),
        "API key created"
    );
    Ok(MadeKey {
        team: team.to_string(),
        prefix: info.prefix,
        scopes: info.scopes,
        key: secret,
    })
}

/// Sets a live key's scopes.
async fn rescope(
    state: &AdminState,
    signed: &Signed,
    prefix: &str,
    scopes: &[Scope],
    csrf: Option<&str>,
) -> Result<String, AdminError> {
    signed.may_act(csrf)?;
    let prefix = prefix.trim();
    if scopes.is_empty() {
        return Err(AdminError::bad_request(
            "a key needs at least one scope (revoke it to stop it working)",
        ));
    }
    if flywheel_store::keys::set_scopes(&state.pool, prefix, scopes).await? == 0 {
        return Err(AdminError::conflict(format!(
            "no active key has the prefix {prefix:?}"
        )));
    }
    let list = flywheel_store::keys::scope_list(scopes);
    tracing::info!(
        admin = signed.session.username,
        prefix,
        scopes = list,
        "API key scopes set"
    );
    Ok(format!("key {prefix}: scopes {list}"))
}

/// Sets a team's rate limits (none: unlimited).
async fn set_limits(
    state: &AdminState,
    signed: &Signed,
    team: &str,
    rpm: Option<u32>,
    tpm: Option<u32>,
    csrf: Option<&str>,
) -> Result<String, AdminError> {
    signed.may_act(csrf)?;
    if rpm == Some(0) || tpm == Some(0) || [rpm, tpm].iter().flatten().any(|&n| n > i32::MAX as u32)
    {
        return Err(AdminError::bad_request(
            "a limit is a whole number above 0, or empty for none",
        ));
    }
    if !flywheel_store::keys::set_limits(&state.pool, team, Some(rpm), Some(tpm)).await? {
        return Err(AdminError::bad_request(format!(
            "no team is called {team:?}"
        )));
    }
    let show = |n: Option<u32>| n.map_or("none".to_string(), |n| n.to_string());
    tracing::info!(
        admin = signed.session.username,
        team,
        requests_per_minute = show(rpm),
        tokens_per_minute = show(tpm),
        "team rate limits"
    );
    Ok(format!(
        "team {team}: requests_per_minute = {}, tokens_per_minute = {}",
        show(rpm),
        show(tpm)
    ))
}

/// The scopes ticked on a form (`scope` repeated).
fn ticked(pairs: &[(String, String)]) -> Result<Vec<Scope>, AdminError> {
    let mut scopes = Vec::new();
    for (name, value) in pairs {
        if name == "scope" {
            let scope: Scope = value.parse().map_err(AdminError::bad_request)?;
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
    }
    Ok(scopes)
}

/// A form's field by name.
fn field<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A limit from a form: empty is none.
fn limit_field(pairs: &[(String, String)], name: &str) -> Result<Option<u32>, AdminError> {
    match field(pairs, name).map(str::trim) {
        None | Some("") => Ok(None),
        Some(n) => n.parse().map(Some).map_err(|_| {
            AdminError::bad_request(format!(
                "{name}: a whole number above 0, or empty for none; not {n:?}"
            ))
        }),
    }
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

/// The form (`team`, `scope` once per ticked box): the secret is in this
/// page only (never cached, never stored).
pub async fn create_key(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<Vec<(String, String)>>,
) -> Result<Html<String>, AdminError> {
    let team = field(&f, "team").unwrap_or_default();
    let made = make_key(&state, &signed, team, &ticked(&f)?, field(&f, "csrf")).await?;
    render(&state, &signed, Some((made.team, made.key)), None).await
}

/// The form on a key's row: `prefix` and its ticked `scope`s.
pub async fn scopes_form(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<Vec<(String, String)>>,
) -> Result<Response, AdminError> {
    let prefix = field(&f, "prefix").unwrap_or_default();
    let done = rescope(&state, &signed, prefix, &ticked(&f)?, field(&f, "csrf")).await?;
    Ok(Redirect::to(&format!(
        "/admin/teams?done={}",
        crate::auth::urlencode(&done)
    ))
    .into_response())
}

/// The form on a team's row: `requests_per_minute` and
/// `tokens_per_minute`, each empty for no limit.
pub async fn limits_form(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<Vec<(String, String)>>,
) -> Result<Response, AdminError> {
    let team = field(&f, "team").unwrap_or_default();
    let (rpm, tpm) = (
        limit_field(&f, "requests_per_minute")?,
        limit_field(&f, "tokens_per_minute")?,
    );
    let done = set_limits(&state, &signed, team, rpm, tpm, field(&f, "csrf")).await?;
    Ok(Redirect::to(&format!(
        "/admin/teams?done={}",
        crate::auth::urlencode(&done)
    ))
    .into_response())
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

#[derive(Deserialize, JsonSchema)]
pub struct NewKeyJson {
    /// Made with its first key.
    #[schemars(length(min = 1, max = MAX_TEAM))]
    team: String,
    /// What the key may do; default: every scope but `admin`.
    #[schemars(length(min = 1))]
    scopes: Option<Vec<Scope>>,
}

pub async fn create_key_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(f): ApiJson<NewKeyJson>,
) -> Result<Json<MadeKey>, AdminError> {
    let scopes = f.scopes.unwrap_or(Scope::DEFAULT.to_vec());
    make_key(&state, &signed, &f.team, &scopes, header_csrf(&headers))
        .await
        .map(Json)
        .map_err(AdminError::api)
}

#[derive(Deserialize, JsonSchema)]
pub struct ScopesJson {
    prefix: String,
    #[schemars(length(min = 1))]
    scopes: Vec<Scope>,
}

pub async fn scopes_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(f): ApiJson<ScopesJson>,
) -> Result<Json<Outcome>, AdminError> {
    rescope(&state, &signed, &f.prefix, &f.scopes, header_csrf(&headers))
        .await
        .map(|done| Json(Outcome { done }))
        .map_err(AdminError::api)
}

#[derive(Deserialize, JsonSchema)]
pub struct LimitsJson {
    team: String,
    /// Null or absent: no limit.
    #[schemars(range(min = 1, max = i32::MAX as u32))]
    requests_per_minute: Option<u32>,
    #[schemars(range(min = 1, max = i32::MAX as u32))]
    tokens_per_minute: Option<u32>,
}

pub async fn limits_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(f): ApiJson<LimitsJson>,
) -> Result<Json<Outcome>, AdminError> {
    let csrf = header_csrf(&headers);
    set_limits(
        &state,
        &signed,
        &f.team,
        f.requests_per_minute,
        f.tokens_per_minute,
        csrf,
    )
    .await
    .map(|done| Json(Outcome { done }))
    .map_err(AdminError::api)
}

#[derive(Deserialize, JsonSchema)]
pub struct RevokeJson {
    prefix: String,
}

pub async fn revoke_key_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(f): ApiJson<RevokeJson>,
) -> Result<Json<Outcome>, AdminError> {
    revoke(&state, &signed, &f.prefix, header_csrf(&headers))
        .await
        .map(|done| Json(Outcome { done }))
        .map_err(AdminError::api)
}

#[derive(Deserialize, JsonSchema)]
pub struct SettingsJson {
    team: String,
    store_text: bool,
    share_for_training: bool,
}

pub async fn settings_api(
    State(state): State<AdminState>,
    signed: Signed,
    headers: HeaderMap,
    ApiJson(f): ApiJson<SettingsJson>,
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
