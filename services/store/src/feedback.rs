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

/// Stores votes in one statement; ids already present are skipped, and so
/// are the votes an end user cast before their data was deleted
/// (`user_deletions`), which a gateway's journal may deliver late.
pub async fn insert_many(ex: impl PgExecutor<'_>, rows: &[Feedback]) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "insert into feedback (id, completion_id, team_id, end_user, rating, comment, correction,
             created_at)
         select * from unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[],
             $6::text[], $7::text[], $8::timestamptz[])
             as f (id, completion_id, team_id, end_user, rating, comment, correction, created_at)
         where not exists (
             select 1 from user_deletions d
              where d.team_id = f.team_id
                and d.end_user_sha256 = encode(sha256(convert_to(f.end_user, 'UTF8')), 'hex')
                and d.deleted_at >= f.created_at)
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

/// Which of a completion's votes a page lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Every vote, oldest first.
    History,
    /// Each end user's latest vote, oldest first.
    Current,
}

/// Up to `limit` of a completion's votes after the vote `after` (in the
/// view's order: by time, then id), and whether more follow.
pub async fn page(
    ex: impl PgExecutor<'_>,
    completion_id: &str,
    view: View,
    after: Option<Uuid>,
    limit: i64,
) -> Result<(Vec<Feedback>, bool)> {
    let source = match view {
        View::History => "select * from feedback where completion_id = $1",
        View::Current => {
            "select distinct on (end_user) * from feedback where completion_id = $1
             order by end_user, created_at desc, id desc"
        }
    };
    let sql = format!(
        "select id, completion_id, team_id, end_user, rating, comment, correction, created_at
         from ({source}) v
         where $2::uuid is null
            or (created_at, id) > (select created_at, id from feedback where id = $2)
         order by created_at, id
         limit $3"
    );
    let mut rows: Vec<Feedback> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(completion_id)
        .bind(after)
        .bind(limit + 1)
        .fetch_all(ex)
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    Ok((rows, more))
}

/// Counts over a completion's votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Summary {
    /// Every vote ever cast.
    pub votes: i64,
    /// End users who voted (the anonymous `""` counts as one).
    pub users: i64,
    /// Current (latest per user) ratings.
    pub up: i64,
    pub down: i64,
}

pub async fn summary(ex: impl PgExecutor<'_>, completion_id: &str) -> Result<Summary> {
    Ok(sqlx::query_as(
        "select (select count(*) from feedback where completion_id = $1) as votes,
                count(*) as users,
                count(*) filter (where rating = 'up') as up,
                count(*) filter (where rating = 'down') as down
         from (select distinct on (end_user) rating from feedback where completion_id = $1
               order by end_user, created_at desc, id desc) latest",
    )
    .bind(completion_id)
    .fetch_one(ex)
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

/// Deletes one end user's completions and votes in a team (their own votes,
/// and everyone's votes on their completions), marks the dataset versions
/// built from them, and notes when (`user_deletions`), so that records of
/// theirs a gateway's journal delivers later are not stored; returns how
/// many completions and votes were removed.
pub async fn delete_user_data(
    pool: &sqlx::PgPool,
    team_id: Uuid,
    end_user: &str,
) -> Result<(u64, u64)> {
    // First the note, committed: every insert that starts from now on sees
    // it. Then, with writes to both tables held off until they are done
    // (the lock waits for inserts in flight, which may not have seen the
    // note, and those are deleted with the rest), the deletes. The lock's
    // mode conflicts with itself, so two deletions take turns instead of
    // deadlocking.
    sqlx::query(
        "insert into user_deletions (team_id, end_user_sha256)
         values ($1, encode(sha256(convert_to($2, 'UTF8')), 'hex'))
         on conflict (team_id, end_user_sha256) do update set deleted_at = now()",
    )
    .bind(team_id)
    .bind(end_user)
    .execute(pool)
    .await?;
    let mut tx = pool.begin().await?;
    sqlx::query("lock table completions, feedback in share row exclusive mode")
        .execute(&mut *tx)
        .await?;
    let votes = sqlx::query(
        "delete from feedback where team_id = $1
           and (end_user = $2
                or completion_id in (select id from completions where team_id = $1 and end_user = $2))",
    )
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
    // After the deletes: a dataset written while they waited for its rows
    // (a distillation holds them locked) is committed by now, and marked.
    crate::datasets::mark_user_deleted(&mut tx, team_id, end_user).await?;
    tx.commit().await?;
    Ok((completions, votes))
}
