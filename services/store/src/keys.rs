//! Teams and their API keys. Only a key's SHA-256 is stored: the secret is
//! shown once, when it is created.

use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

const KEY_PREFIX: &str = "fw-";

/// What a key may do on the API; a key is given one or more.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Chat completions.
    Chat,
    /// Votes, comments and corrections.
    Feedback,
    /// Reading back logged completions and their votes.
    Read,
    /// Deleting an end user's data.
    Delete,
    /// The admin API (`/admin/api`) as an admin, for every team: for
    /// automation run by the platform team, never given by default.
    Admin,
}

impl Scope {
    /// Every scope there is.
    pub const ALL: [Scope; 5] = [
        Scope::Chat,
        Scope::Feedback,
        Scope::Read,
        Scope::Delete,
        Scope::Admin,
    ];

    /// What a key made without a list may do: everything on the team's
    /// own API, not the admin API.
    pub const DEFAULT: [Scope; 4] = [Scope::Chat, Scope::Feedback, Scope::Read, Scope::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Chat => "chat",
            Scope::Feedback => "feedback",
            Scope::Read => "read",
            Scope::Delete => "delete",
            Scope::Admin => "admin",
        }
    }

    /// What the scope opens, for help texts and the dashboard.
    pub fn opens(self) -> &'static str {
        match self {
            Scope::Chat => "POST /v1/chat/completions, /v1/completions, /tokenize",
            Scope::Feedback => "POST /v1/feedback",
            Scope::Read => "GET /v1/completions/{id}",
            Scope::Delete => "DELETE /v1/users/{user}/data",
            Scope::Admin => "/admin/api/* as an admin, every team",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "no scope is called {s:?}; the scopes: {}",
                    scope_list(&Scope::ALL)
                )
            })
    }
}

/// A comma-separated list of scopes ("chat,feedback"): known names, at
/// least one, each once.
pub fn parse_scopes(list: &str) -> std::result::Result<Vec<Scope>, String> {
    let mut scopes = Vec::new();
    for name in list.split(',').filter(|n| !n.trim().is_empty()) {
        let scope: Scope = name.parse()?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(format!(
            "a key needs at least one scope: {}",
            scope_list(&Scope::ALL)
        ));
    }
    Ok(scopes)
}

/// Scopes as a comma-separated list.
pub fn scope_list(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn scope_names(scopes: &[Scope]) -> Vec<String> {
    scopes.iter().map(|s| s.as_str().to_string()).collect()
}

/// Names read back from the database; ones this build does not know (a
/// newer schema) are left out, so they grant nothing.
fn known_scopes(names: &[String]) -> Vec<Scope> {
    names.iter().filter_map(|n| n.parse().ok()).collect()
}

/// A team's rate limits (none: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

/// The team a request acts for, found from its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub team_id: Uuid,
    pub team_name: String,
    pub key_id: Uuid,
    /// Whether message text may be stored for this team.
    pub store_text: bool,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// The team's rate limits.
    pub limits: Limits,
}

impl Principal {
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: Uuid,
    pub team: String,
    pub prefix: String,
    /// What the key may do ([`Scope`] names).
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub fn hash_key(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Returns the team's id, creating the team if needed.
pub async fn ensure_team(ex: impl PgExecutor<'_>, name: &str) -> Result<Uuid> {
    let id = sqlx::query_scalar(
        "insert into teams (name) values ($1)
         on conflict (name) do update set name = excluded.name
         returning id",
    )
    .bind(name)
    .fetch_one(ex)
    .await?;
    Ok(id)
}

/// Creates a key with every scope for `team` (creating the team too) and
/// returns its info and the secret, which is not stored anywhere.
pub async fn create_key(pool: &sqlx::PgPool, team: &str) -> Result<(KeyInfo, String)> {
    create_key_with(pool, team, &Scope::DEFAULT).await
}

/// [`create_key`] with only `scopes` (at least one).
pub async fn create_key_with(
    pool: &sqlx::PgPool,
    team: &str,
    scopes: &[Scope],
) -> Result<(KeyInfo, String)> {
    let mut tx = pool.begin().await?;
    let team_id = ensure_team(&mut *tx, team).await?;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    let prefix = secret[..KEY_PREFIX.len() + 8].to_string();
    let (id, created_at): (Uuid, DateTime<Utc>) = sqlx::query_as(
        "insert into api_keys (team_id, prefix, key_hash, scopes) values ($1, $2, $3, $4)
         returning id, created_at",
    )
    .bind(team_id)
    .bind(&prefix)
    .bind(hash_key(&secret))
    .bind(scope_names(scopes))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let info = KeyInfo {
        id,
        team: team.to_string(),
        prefix,
        scopes: scope_names(scopes),
        created_at,
        revoked_at: None,
    };
    Ok((info, secret))
}

/// The principal behind a live (not revoked) key.
pub async fn authenticate(ex: impl PgExecutor<'_>, secret: &str) -> Result<Option<Principal>> {
    type Row = (
        Uuid,
        String,
        Uuid,
        bool,
        Vec<String>,
        Option<i32>,
        Option<i32>,
    );
    let row: Option<Row> = sqlx::query_as(
        "select t.id, t.name, k.id, t.store_text, k.scopes,
                t.requests_per_minute, t.tokens_per_minute
         from api_keys k join teams t on t.id = k.team_id
         where k.key_hash = $1 and k.revoked_at is null",
    )
    .bind(hash_key(secret))
    .fetch_optional(ex)
    .await?;
    Ok(row.map(
        |(team_id, team_name, key_id, store_text, scopes, rpm, tpm)| Principal {
            team_id,
            team_name,
            key_id,
            store_text,
            scopes: known_scopes(&scopes),
            limits: Limits {
                requests_per_minute: rpm.map(|n| n as u32),
                tokens_per_minute: tpm.map(|n| n as u32),
            },
        },
    ))
}

pub async fn list_keys(ex: impl PgExecutor<'_>, team: Option<&str>) -> Result<Vec<KeyInfo>> {
    Ok(sqlx::query_as(
        "select k.id, t.name as team, k.prefix, k.scopes, k.created_at, k.revoked_at
         from api_keys k join teams t on t.id = k.team_id
         where $1::text is null or t.name = $1
         order by k.created_at",
    )
    .bind(team)
    .fetch_all(ex)
    .await?)
}

/// The channel on which changes to keys (revocations, scopes) and to
/// teams' limits are announced to running gateways, which then forget the
/// keys they had confirmed.
pub const REVOKED_CHANNEL: &str = "flywheel_keys_revoked";

/// Announces on [`REVOKED_CHANNEL`] when `tx` commits.
async fn announce(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<()> {
    sqlx::query("select pg_notify($1, '')")
        .bind(REVOKED_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Revokes a key by id or prefix; returns how many keys were revoked.
/// Gateways listening on [`REVOKED_CHANNEL`] hear of it when it commits.
pub async fn revoke_key(pool: &sqlx::PgPool, id_or_prefix: &str) -> Result<u64> {
    let id = Uuid::parse_str(id_or_prefix).ok();
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "update api_keys set revoked_at = now()
         where revoked_at is null and (id = $1 or prefix = $2)",
    )
    .bind(id)
    .bind(id_or_prefix)
    .execute(&mut *tx)
    .await?;
    announce(&mut tx).await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// Sets what a live key (by id or prefix) may do; returns how many keys
/// changed. Gateways forget what they knew of keys when it commits, so a
/// scope taken away is refused from the next request on.
pub async fn set_scopes(pool: &sqlx::PgPool, id_or_prefix: &str, scopes: &[Scope]) -> Result<u64> {
    let id = Uuid::parse_str(id_or_prefix).ok();
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "update api_keys set scopes = $3
         where revoked_at is null and (id = $1 or prefix = $2)",
    )
    .bind(id)
    .bind(id_or_prefix)
    .bind(scope_names(scopes))
    .execute(&mut *tx)
    .await?;
    announce(&mut tx).await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// Changes a team's rate limits: for each, `None` leaves it as it is and
/// `Some(None)` removes it. False if no such team. Running gateways hear of
/// it when it commits (announced as key changes are) and apply it from the
/// team's next request.
pub async fn set_limits(
    pool: &sqlx::PgPool,
    team: &str,
    requests_per_minute: Option<Option<u32>>,
    tokens_per_minute: Option<Option<u32>>,
) -> Result<bool> {
    let as_sql = |n: Option<u32>| n.map(|n| n.min(i32::MAX as u32) as i32);
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "update teams set
            requests_per_minute = case when $2 then $3 else requests_per_minute end,
            tokens_per_minute = case when $4 then $5 else tokens_per_minute end
         where name = $1",
    )
    .bind(team)
    .bind(requests_per_minute.is_some())
    .bind(requests_per_minute.and_then(as_sql))
    .bind(tokens_per_minute.is_some())
    .bind(tokens_per_minute.and_then(as_sql))
    .execute(&mut *tx)
    .await?;
    announce(&mut tx).await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// Sets whether a team's message text is stored; false if no such team.
pub async fn set_store_text(ex: impl PgExecutor<'_>, team: &str, store_text: bool) -> Result<bool> {
    let done = sqlx::query("update teams set store_text = $2 where name = $1")
        .bind(team)
        .bind(store_text)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets whether a team's feedback may go into datasets shared across teams;
/// false if no such team.
pub async fn set_share_for_training(
    ex: impl PgExecutor<'_>,
    team: &str,
    share: bool,
) -> Result<bool> {
    let done = sqlx::query("update teams set share_for_training = $2 where name = $1")
        .bind(team)
        .bind(share)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// A team's id by name.
pub async fn team_id(ex: impl PgExecutor<'_>, team: &str) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar("select id from teams where name = $1")
        .bind(team)
        .fetch_optional(ex)
        .await?)
}

/// Whether a team pools its feedback into shared datasets.
pub async fn team_shares(ex: impl PgExecutor<'_>, team_id: Uuid) -> Result<bool> {
    Ok(
        sqlx::query_scalar("select share_for_training from teams where id = $1")
            .bind(team_id)
            .fetch_optional(ex)
            .await?
            .unwrap_or(false),
    )
}

/// A team's name.
pub async fn team_name(ex: impl PgExecutor<'_>, team_id: Uuid) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("select name from teams where id = $1")
        .bind(team_id)
        .fetch_optional(ex)
        .await?)
}
