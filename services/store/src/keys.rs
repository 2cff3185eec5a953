//! Teams and their API keys. Only a key's SHA-256 is stored: the secret is
//! shown once, when it is created.

use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

const KEY_PREFIX: &str = "fw-";

/// The team a request acts for, found from its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub team_id: Uuid,
    pub team_name: String,
    pub key_id: Uuid,
    /// Whether message text may be stored for this team.
    pub store_text: bool,
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: Uuid,
    pub team: String,
    pub prefix: String,
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

/// Creates a key for `team` (creating the team too) and returns its info and
/// the secret, which is not stored anywhere.
pub async fn create_key(pool: &sqlx::PgPool, team: &str) -> Result<(KeyInfo, String)> {
    let mut tx = pool.begin().await?;
    let team_id = ensure_team(&mut *tx, team).await?;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    let prefix = secret[..KEY_PREFIX.len() + 8].to_string();
    let (id, created_at): (Uuid, DateTime<Utc>) = sqlx::query_as(
        "insert into api_keys (team_id, prefix, key_hash) values ($1, $2, $3)
         returning id, created_at",
    )
    .bind(team_id)
    .bind(&prefix)
    .bind(hash_key(&secret))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let info = KeyInfo {
        id,
        team: team.to_string(),
        prefix,
        created_at,
        revoked_at: None,
    };
    Ok((info, secret))
}

/// The principal behind a live (not revoked) key.
pub async fn authenticate(ex: impl PgExecutor<'_>, secret: &str) -> Result<Option<Principal>> {
    let row: Option<(Uuid, String, Uuid, bool)> = sqlx::query_as(
        "select t.id, t.name, k.id, t.store_text from api_keys k join teams t on t.id = k.team_id
         where k.key_hash = $1 and k.revoked_at is null",
    )
    .bind(hash_key(secret))
    .fetch_optional(ex)
    .await?;
    Ok(
        row.map(|(team_id, team_name, key_id, store_text)| Principal {
            team_id,
            team_name,
            key_id,
            store_text,
        }),
    )
}

pub async fn list_keys(ex: impl PgExecutor<'_>, team: Option<&str>) -> Result<Vec<KeyInfo>> {
    Ok(sqlx::query_as(
        "select k.id, t.name as team, k.prefix, k.created_at, k.revoked_at
         from api_keys k join teams t on t.id = k.team_id
         where $1::text is null or t.name = $1
         order by k.created_at",
    )
    .bind(team)
    .fetch_all(ex)
    .await?)
}

/// The channel on which revocations are announced to running gateways.
pub const REVOKED_CHANNEL: &str = "flywheel_keys_revoked";

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
    sqlx::query("select pg_notify($1, '')")
        .bind(REVOKED_CHANNEL)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
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
