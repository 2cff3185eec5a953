//! Signing in: argon2-hashed passwords, a session cookie (HttpOnly,
//! SameSite=Strict, Secure behind TLS) whose SHA-256 is all the database
//! keeps, a CSRF token per session that every form and every JSON action
//! must send back, and a lock after repeated bad passwords. An API key
//! opens the JSON API (`/admin/api`, as an admin) only if it was given the
//! `admin` scope, and never the pages.

use std::sync::LazyLock;

use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use flywheel_store::admins::{self, Session};
use flywheel_store::keys::{self, Principal, Scope};
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::AdminState;
use crate::error::AdminError;

pub const COOKIE: &str = "flywheel_admin";

/// The sign-in page.
#[derive(askama::Template)]
#[template(path = "login.html")]
pub struct LoginPage {
    pub next: String,
    pub message: Option<String>,
    /// The form's sign-in CSRF token, also sent as [`LOGIN_COOKIE`].
    pub csrf: String,
}

/// The cookie that carries the sign-in form's CSRF token (double submit):
/// a form posted from another site has neither, so it cannot sign a
/// browser in to an attacker's account (login CSRF).
pub const LOGIN_COOKIE: &str = "flywheel_login";

/// Hashes a password for storage (argon2id, a random salt, PHC string).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let salt = SaltString::encode_b64(&bytes).map_err(|e| anyhow::anyhow!("a salt: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Checked for unknown usernames too, so a wrong name takes as long as a
/// wrong password.
static DECOY: LazyLock<String> =
    LazyLock::new(|| hash_password("decoy password").expect("argon2 hashes"));

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    cookie(headers, COOKIE)
}

/// The value of cookie `name` the request carries.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.to_string())
}

/// The key of `Authorization: Bearer <key>`, if the request has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Whether `t` looks like a token this dashboard makes (64 hex digits).
fn is_token(t: &str) -> bool {
    t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Equal tokens, compared in time that does not depend on where they
/// differ; never two empty ones.
fn same_token(a: &str, b: &str) -> bool {
    is_token(a)
        && a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether cookies set for this request should be `Secure`.
fn secure(state: &AdminState, headers: &HeaderMap) -> bool {
    state.config.secure_cookies
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"))
}

/// The sign-in page with `status` and `message`, a fresh CSRF token in
/// its form and in [`LOGIN_COOKIE`].
fn login_form(
    status: StatusCode,
    next: String,
    message: Option<String>,
    secure: bool,
    kept: Option<String>,
) -> Result<Response, AdminError> {
    // The token the browser holds, if any, so that two open sign-in tabs
    // both work.
    let csrf = kept.filter(|t| is_token(t)).unwrap_or_else(random_token);
    let page = LoginPage {
        next,
        message,
        csrf: csrf.clone(),
    };
    let mut resp = (status, Html(askama::Template::render(&page)?)).into_response();
    let cookie = format!(
        "{LOGIN_COOKIE}={csrf}; Path=/admin/login; HttpOnly; SameSite=Strict; Max-Age=3600{}",
        if secure { "; Secure" } else { "" }
    );
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("hex token"),
    );
    Ok(resp)
}

/// A request made in a live session, or to the JSON API with an API key
/// that has the `admin` scope.
#[derive(Debug, Clone)]
pub struct Signed {
    pub session: Session,
    token_hash: Vec<u8>,
    /// Made with an API key: no cookie, so no CSRF token to check (a
    /// browser never sends a bearer key by itself).
    by_key: bool,
}

impl Signed {
    pub fn is_admin(&self) -> bool {
        self.session.role == "admin"
    }

    /// Refuses viewers.
    pub fn require_admin(&self) -> Result<(), AdminError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(AdminError::forbidden(
                "this account may look but not act: it has the viewer role",
            ))
        }
    }

    /// An admin-scoped API key acting as an admin; the audit log names
    /// the key and its team.
    fn by_key(p: &Principal) -> Self {
        Self {
            session: Session {
                account_id: p.key_id,
                username: format!("key {} of team {}", p.key_id, p.team_name),
                role: "admin".into(),
                csrf_token: String::new(),
                expires_at: chrono::Utc::now(),
            },
            token_hash: Vec::new(),
            by_key: true,
        }
    }

    /// Refuses a form or call whose CSRF token is not this session's.
    pub fn check_csrf(&self, sent: Option<&str>) -> Result<(), AdminError> {
        if self.by_key {
            return Ok(());
        }
        let ok = sent.is_some_and(|s| {
            let (a, b) = (s.as_bytes(), self.session.csrf_token.as_bytes());
            // The same time whatever prefix matches.
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        });
        if ok {
            Ok(())
        } else {
            Err(AdminError::forbidden(
                "the form's CSRF token is missing or belongs to another session; reload the page",
            ))
        }
    }

    /// An action's checks: an admin, with this session's token.
    pub fn may_act(&self, csrf: Option<&str>) -> Result<(), AdminError> {
        self.check_csrf(csrf)?;
        self.require_admin()
    }
}

/// Without a session: pages send the browser to the sign-in page, the JSON
/// API answers 401; a session that could not be read (the database out of
/// reach) is answered by what went wrong, not with a sign-in page.
pub enum NoSession {
    Page(String),
    Api,
    Failed(AdminError),
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        match self {
            Self::Page(next) => {
                let to = format!("/admin/login?next={}", urlencode(&next));
                Redirect::to(&to).into_response()
            }
            Self::Api => AdminError::unauthorized().api().into_response(),
            Self::Failed(e) => e.into_response(),
        }
    }
}

impl FromRequestParts<AdminState> for Signed {
    type Rejection = NoSession;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        let path = parts.uri.path();
        let reject = || {
            if path.starts_with("/admin/api") {
                NoSession::Api
            } else {
                let full = parts
                    .uri
                    .path_and_query()
                    .map_or(path, |p| p.as_str())
                    .to_string();
                NoSession::Page(full)
            }
        };
        if path.starts_with("/admin/api")
            && let Some(secret) = bearer(&parts.headers)
        {
            return match keys::authenticate(&state.pool, secret).await {
                Ok(Some(p)) if p.may(Scope::Admin) => Ok(Self::by_key(&p)),
                Ok(Some(p)) => Err(NoSession::Failed(
                    AdminError::forbidden(format!(
                        "this API key may not use the admin API: it has the scopes {}, not `admin`",
                        keys::scope_list(&p.scopes)
                    ))
                    .api(),
                )),
                Ok(None) => Err(NoSession::Api),
                Err(e) => Err(NoSession::Failed(AdminError::from(e).api())),
            };
        }
        let Some(token) = cookie_token(&parts.headers) else {
            return Err(reject());
        };
        let hash = token_hash(&token);
        match admins::session(&state.pool, &hash).await {
            Ok(Some(session)) => Ok(Self {
                session,
                token_hash: hash,
                by_key: false,
            }),
            Ok(None) => Err(reject()),
            Err(e) => {
                let failed = AdminError::from(e);
                Err(NoSession::Failed(if path.starts_with("/admin/api") {
                    failed.api()
                } else {
                    failed
                }))
            }
        }
    }
}

#[derive(Deserialize)]
pub struct Next {
    next: Option<String>,
}

/// Only our own pages: never an absolute or protocol-relative URL.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/admin") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_string()
        }
        _ => "/admin".into(),
    }
}

pub async fn login_page(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<Next>,
) -> Result<Response, AdminError> {
    login_form(
        StatusCode::OK,
        safe_next(q.next.as_deref()),
        None,
        secure(&state, &headers),
        cookie(&headers, LOGIN_COOKIE),
    )
}

#[derive(Deserialize)]
pub struct Credentials {
    username: String,
    password: String,
    next: Option<String>,
    /// The sign-in form's CSRF token.
    csrf: Option<String>,
}

pub async fn login(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Form(c): Form<Credentials>,
) -> Result<Response, AdminError> {
    let next = safe_next(c.next.as_deref());
    let secure = secure(&state, &headers);
    let kept = cookie(&headers, LOGIN_COOKIE);
    let refuse = |status: StatusCode, message: String| -> Result<Response, AdminError> {
        login_form(status, next.clone(), Some(message), secure, kept.clone())
    };
    // Before the password is looked at: a form another site posted carries
    // no token this browser's cookie matches.
    let from_our_form = match (kept.as_deref(), c.csrf.as_deref()) {
        (Some(kept), Some(sent)) => same_token(kept, sent),
        _ => false,
    };
    if !from_our_form {
        return refuse(
            StatusCode::FORBIDDEN,
            "the sign-in form has expired or did not come from this site: sign in again".into(),
        );
    }
    let account = admins::by_username(&state.pool, c.username.trim()).await?;
    let hash = account
        .as_ref()
        .map_or_else(|| DECOY.clone(), |a| a.password_hash.clone());
    let password = c.password.clone();
    let good = tokio::task::spawn_blocking(move || verify(&password, &hash))
        .await
        .unwrap_or(false);
    let Some(account) = account else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "wrong username or password".into(),
        );
    };
    let now = chrono::Utc::now();
    if let Some(until) = account.locked_until.filter(|u| *u > now) {
        return locked(refuse, until - now);
    }
    if !good {
        let until = admins::record_failure(
            &state.pool,
            account.id,
            state.config.max_failed_logins,
            state.config.lock_seconds,
        )
        .await?;
        tracing::warn!(username = account.username, "admin sign-in refused");
        if let Some(until) = until.filter(|u| *u > now) {
            return locked(refuse, until - now);
        }
        return refuse(
            StatusCode::UNAUTHORIZED,
            "wrong username or password".into(),
        );
    }
    admins::record_success(&state.pool, account.id).await?;
    let token = random_token();
    admins::create_session(
        &state.pool,
        &token_hash(&token),
        account.id,
        &random_token(),
        state.config.session_hours * 3600.0,
    )
    .await?;
    tracing::info!(username = account.username, "admin signed in");
    let cookie = format!(
        "{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}{}",
        (state.config.session_hours * 3600.0) as i64,
        if secure { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to(&next).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("hex token"),
    );
    // The sign-in form's token has done its work.
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "flywheel_login=; Path=/admin/login; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(resp)
}

fn locked(
    refuse: impl Fn(StatusCode, String) -> Result<Response, AdminError>,
    left: chrono::TimeDelta,
) -> Result<Response, AdminError> {
    let seconds = ((left.num_milliseconds() + 999) / 1000).max(1);
    let mut resp = refuse(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "too many bad passwords: this account is locked for {} more minute(s)",
            (seconds + 59) / 60
        ),
    )?;
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    Ok(resp)
}

/// A form that carries only its CSRF token.
#[derive(Deserialize)]
pub struct CsrfForm {
    pub csrf: Option<String>,
}

pub async fn logout(
    State(state): State<AdminState>,
    signed: Signed,
    Form(f): Form<CsrfForm>,
) -> Result<Response, AdminError> {
    signed.check_csrf(f.csrf.as_deref())?;
    admins::end_session(&state.pool, &signed.token_hash).await?;
    let mut resp = Redirect::to("/admin/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "flywheel_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(resp)
}

/// Percent-encodes a value for a URL's path or query (unreserved bytes and
/// `/` kept).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_against_its_hash_only() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse", &h));
        assert!(!verify("correct horsf", &h));
        assert!(!verify("correct horse", "not a hash"));
    }

    #[test]
    fn next_stays_on_the_dashboard() {
        assert_eq!(
            safe_next(Some("/admin/models?team=a")),
            "/admin/models?team=a"
        );
        assert_eq!(safe_next(Some("https://evil.example/admin")), "/admin");
        assert_eq!(safe_next(Some("//evil.example")), "/admin");
        assert_eq!(safe_next(Some("/admin\\@evil")), "/admin");
        assert_eq!(safe_next(None), "/admin");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; flywheel_admin=abc; b=2"),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("abc"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("flywheel_adminx=abc"),
        );
        assert_eq!(cookie_token(&h), None);
    }
}
