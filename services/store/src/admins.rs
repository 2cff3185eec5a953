//! Admin accounts and their sessions: the dashboard's sign-in. The store
//! keeps hashes only; hashing passwords and minting tokens is the caller's.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{Result, StoreError};

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Account {
    pub id: Uuid,
    pub username: String,
    #[serde(skip)]
    pub password_hash: String,
    pub role: String,
    pub failed_logins: i32,
    pub locked_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl Account {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }
}

/// Creates an account, or sets the password and role of an existing one
/// (and unlocks it).
pub async fn upsert(
    ex: impl PgExecutor<'_>,
    username: &str,
    password_hash: &str,
    role: &str,
) -> Result<Account> {
    Ok(sqlx::query_as(
        "insert into admin_accounts (username, password_hash, role) values ($1, $2, $3)
         on conflict (username) do update
             set password_hash = excluded.password_hash, role = excluded.role,
                 failed_logins = 0, locked_until = null
         returning id, username, password_hash, role, failed_logins, locked_until, created_at",
    )
    .bind(username)
    .bind(password_hash)
    .bind(role)
    .fetch_one(ex)
    .await?)
}

pub async fn by_username(ex: impl PgExecutor<'_>, username: &str) -> Result<Option<Account>> {
    Ok(sqlx::query_as(
        "select id, username, password_hash, role, failed_logins, locked_until, created_at
         from admin_accounts where username = $1",
    )
    .bind(username)
    .fetch_optional(ex)
    .await?)
}

pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<Account>> {
    Ok(sqlx::query_as(
        "select id, username, password_hash, role, failed_logins, locked_until, created_at
         from admin_accounts order by username",
    )
    .fetch_all(ex)
    .await?)
}

/// Counts a bad password; at `limit` in a row the account locks for
/// `lock_seconds`, doubling with each further failure. Returns the lock's
/// end when it is locked.
pub async fn record_failure(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    limit: i32,
    lock_seconds: f64,
) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "update admin_accounts
         set failed_logins = failed_logins + 1,
             locked_until = case when failed_logins + 1 >= $2
                 then now() + make_interval(secs => $3 * power(2, least(failed_logins + 1 - $2, 10)))
                 else locked_until end
         where id = $1
         returning locked_until",
    )
    .bind(id)
    .bind(limit)
    .bind(lock_seconds)
    .fetch_one(ex)
    .await?)
}

/// A good password: the count starts again.
pub async fn record_success(ex: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    sqlx::query("update admin_accounts set failed_logins = 0, locked_until = null where id = $1")
        .bind(id)
        .execute(ex)
        .await?;
    Ok(())
}

/// A signed-in account, as a request's session cookie finds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Session {
    pub account_id: Uuid,
    pub username: String,
    pub role: String,
    pub csrf_token: String,
    pub expires_at: DateTime<Utc>,
}

pub async fn create_session(
    ex: impl PgExecutor<'_>,
    token_hash: &[u8],
    account: Uuid,
    csrf_token: &str,
    ttl_seconds: f64,
) -> Result<()> {
    sqlx::query(
        "insert into admin_sessions (token_hash, account_id, csrf_token, expires_at)
         values ($1, $2, $3, now() + make_interval(secs => $4))",
    )
    .bind(token_hash)
    .bind(account)
    .bind(csrf_token)
    .bind(ttl_seconds)
    .execute(ex)
    .await?;
    Ok(())
}

/// The live session whose cookie hashes to `token_hash`.
pub async fn session(ex: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<Option<Session>> {
    Ok(sqlx::query_as(
        "select s.account_id, a.username, a.role, s.csrf_token, s.expires_at
         from admin_sessions s join admin_accounts a on a.id = s.account_id
         where s.token_hash = $1 and s.expires_at > now()",
    )
    .bind(token_hash)
    .fetch_optional(ex)
    .await?)
}

pub async fn end_session(ex: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<()> {
    sqlx::query("delete from admin_sessions where token_hash = $1 or expires_at < now()")
        .bind(token_hash)
        .execute(ex)
        .await?;
    Ok(())
}

/// Checks a role name from the command line.
pub fn check_role(role: &str) -> Result<()> {
    match role {
        "viewer" | "admin" => Ok(()),
        other => Err(StoreError::Conflict(format!(
            "role must be viewer or admin, not {other:?}"
        ))),
    }
}
