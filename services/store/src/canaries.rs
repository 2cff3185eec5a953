//! Canaries: a candidate serving a share of one team's traffic, and the
//! live thumbs that decide it.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::cycles::text_enum;
use crate::{Result, StoreError};

text_enum! {
    /// Where a canary is.
    CanaryStatus {
        Running = "running",
        Promoted = "promoted",
        RolledBack = "rolled_back",
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Canary {
    pub id: Uuid,
    pub team_id: Uuid,
    pub candidate_version_id: Uuid,
    pub champion_version_id: Uuid,
    pub share: f64,
    pub status: CanaryStatus,
    pub evaluation_id: Option<Uuid>,
    pub reason: Option<String>,
    pub started_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, team_id, candidate_version_id, champion_version_id, share, status,
    evaluation_id, reason, started_at, deadline, ended_at";

/// Starts a canary; a conflict when the team already runs one.
pub async fn start(
    conn: &mut PgConnection,
    team_id: Uuid,
    candidate: Uuid,
    champion: Uuid,
    share: f64,
    deadline: DateTime<Utc>,
    evaluation_id: Option<Uuid>,
) -> Result<Canary> {
    let id = Uuid::new_v4();
    let row: Option<Canary> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into canaries (id, team_id, candidate_version_id, champion_version_id, share,
             status, deadline, evaluation_id)
         values ($1, $2, $3, $4, $5, 'running', $6, $7)
         on conflict do nothing returning {COLUMNS}"
    )))
    .bind(id)
    .bind(team_id)
    .bind(candidate)
    .bind(champion)
    .bind(share)
    .bind(deadline)
    .bind(evaluation_id)
    .fetch_optional(&mut *conn)
    .await?;
    let canary = row.ok_or_else(|| {
        StoreError::Conflict("this team already runs a canary; end it first".into())
    })?;
    crate::notify::routes_changed(&mut *conn).await?;
    Ok(canary)
}

/// Ends a running canary: `promoted` or `rolled_back`, with why.
pub async fn end(
    conn: &mut PgConnection,
    id: Uuid,
    status: CanaryStatus,
    reason: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "update canaries set status = $2, reason = $3, ended_at = now()
         where id = $1 and status = 'running'",
    )
    .bind(id)
    .bind(status)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    crate::notify::routes_changed(&mut *conn).await?;
    Ok(done.rows_affected() == 1)
}

pub async fn running(ex: impl PgExecutor<'_>) -> Result<Vec<Canary>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from canaries where status = 'running' order by started_at"
    )))
    .fetch_all(ex)
    .await?)
}

pub async fn running_for(ex: impl PgExecutor<'_>, team_id: Uuid) -> Result<Option<Canary>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from canaries where status = 'running' and team_id = $1"
    )))
    .bind(team_id)
    .fetch_optional(ex)
    .await?)
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Canary>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from canaries where id = $1"
    )))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

/// Thumbs on one arm since the canary started: each end user's latest vote
/// on each completion counts once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Arm {
    pub completions: i64,
    pub up: i64,
    pub down: i64,
}

/// The canary's arm (completions it served) and the champion's arm (the
/// team's completions the champion served over the same period).
pub async fn arms(ex: impl PgExecutor<'_>, c: &Canary) -> Result<(Arm, Arm)> {
    let rows: Vec<(bool, i64, i64, i64)> = sqlx::query_as(
        "with served as (
             select id, (route = 'canary' and canary_id = $1) as canary
             from completions
             where team_id = $2 and created_at >= $3
               and ((route = 'canary' and canary_id = $1)
                    or (route = 'champion' and model_version_id = $4))
         ), latest as (
             select distinct on (f.completion_id, f.end_user) f.completion_id, f.rating
             from feedback f join served s on s.id = f.completion_id
             order by f.completion_id, f.end_user, f.created_at desc, f.id desc
         )
         select s.canary, count(distinct s.id),
                count(l.rating) filter (where l.rating = 'up'),
                count(l.rating) filter (where l.rating = 'down')
         from served s left join latest l on l.completion_id = s.id
         group by s.canary",
    )
    .bind(c.id)
    .bind(c.team_id)
    .bind(c.started_at)
    .bind(c.champion_version_id)
    .fetch_all(ex)
    .await?;
    let (mut canary, mut champion) = (Arm::default(), Arm::default());
    for (is_canary, completions, up, down) in rows {
        let arm = Arm {
            completions,
            up,
            down,
        };
        if is_canary {
            canary = arm;
        } else {
            champion = arm;
        }
    }
    Ok((canary, champion))
}
