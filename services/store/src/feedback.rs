//! End users' ratings of completions. Every vote is a row; a user's current
//! rating is their latest, the rest is history.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Feedback {
    pub id: Uuid,
    pub completion_id: String,
    pub team_id: Uuid,
    /// `""` when the vote names no user.
    pub end_user: String,
    pub rating: String,
    pub comment: Option<String>,
    pub correction: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Stores votes in one statement; ids already present are skipped.
pub async fn insert_many(ex: impl PgExecutor<'_>, rows: &[Feedback]) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "insert into feedback (id, completion_id, team_id, end_user, rating, comment, correction,
             created_at)
         select * from unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[],
             $6::text[], $7::text[], $8::timestamptz[])
         on conflict (id) do nothing",
    )
    .bind(rows.iter().map(|f| f.id).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|f| f.completion_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|f| f.team_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|f| f.end_user.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|f| f.rating.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|f| f.comment.clone()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|f| f.correction.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|f| f.created_at).collect::<Vec<_>>())
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}

/// Every vote on a completion, oldest first.
pub async fn for_completion(ex: impl PgExecutor<'_>, completion_id: &str) -> Result<Vec<Feedback>> {
    Ok(sqlx::query_as(
        "select id, completion_id, team_id, end_user, rating, comment, correction, created_at
         from feedback where completion_id = $1 order by created_at, id",
    )
    .bind(completion_id)
    .fetch_all(ex)
    .await?)
}

pub async fn count_for_team(ex: impl PgExecutor<'_>, team_id: Uuid) -> Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from feedback where team_id = $1")
            .bind(team_id)
            .fetch_one(ex)
            .await?,
    )
}

/// Deletes one end user's completions and votes in a team and marks the
/// dataset versions built from them; returns how many completions and votes
/// were removed.
pub async fn delete_user_data(
    pool: &sqlx::PgPool,
    team_id: Uuid,
    end_user: &str,
) -> Result<(u64, u64)> {
    let mut tx = pool.begin().await?;
    crate::datasets::mark_user_deleted(&mut *tx, team_id, end_user).await?;
    let votes = sqlx::query("delete from feedback where team_id = $1 and end_user = $2")
        .bind(team_id)
        .bind(end_user)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let completions = sqlx::query("delete from completions where team_id = $1 and end_user = $2")
        .bind(team_id)
        .bind(end_user)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok((completions, votes))
}
