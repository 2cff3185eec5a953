//! Cycles of the loop: one per team at a time, each the record of one turn
//! curate -> train -> evaluate -> canary -> promote or reject, with the wall
//! time of every stage and the move that ended it. A stage moves on only
//! from the stage it expects, so a job retried after its cycle moved on
//! changes nothing. Which moves exist is the loop's transition table
//! (`flywheel_loop::machine`); the store only records them.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

/// Declares a text-backed enum: its column values, `as_str`, `Display` and
/// `FromStr`, so a value is never a string literal at its call site.
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema, sqlx::Type)]
        #[serde(rename_all = "snake_case")]
        #[sqlx(type_name = "text", rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::UnknownValue;
            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(crate::UnknownValue {
                        what: stringify!($name),
                        value: other.to_string(),
                    }),
                }
            }
        }
    };
}
pub(crate) use text_enum;

text_enum! {
    /// Where a cycle is: the stage whose job runs now, or `done`.
    Stage {
        Curate = "curate",
        Train = "train",
        Evaluate = "evaluate",
        Canary = "canary",
        Done = "done",
    }
}

text_enum! {
    /// How a cycle stands: `running` until it ends, then how it ended.
    Status {
        Running = "running",
        Promoted = "promoted",
        Rejected = "rejected",
        RolledBack = "rolled_back",
        Skipped = "skipped",
        Failed = "failed",
    }
}

text_enum! {
    /// What started a cycle.
    Trigger {
        /// The worker's curation slot.
        Schedule = "schedule",
        /// `flywheel loop`.
        Manual = "manual",
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Cycle {
    pub id: Uuid,
    pub team_id: Uuid,
    pub team: String,
    pub trigger: Trigger,
    pub status: Status,
    pub stage: Stage,
    pub stage_started_at: DateTime<Utc>,
    /// The stages behind it: `[{stage, move, started_at, finished_at, seconds, note}]`.
    pub stages: serde_json::Value,
    pub config: serde_json::Value,
    pub dataset_version_id: Option<Uuid>,
    pub training_run_id: Option<Uuid>,
    pub candidate_version_id: Option<Uuid>,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
    pub decision_id: Option<Uuid>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One stage behind a cycle, as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageRecord {
    pub stage: Stage,
    /// The move that ended it (absent in cycles recorded before moves were).
    #[serde(default, rename = "move")]
    pub by: Option<String>,
    pub seconds: f64,
    #[serde(default)]
    pub note: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

impl Cycle {
    /// The stages behind it, in order.
    pub fn stage_records(&self) -> Vec<StageRecord> {
        serde_json::from_value(self.stages.clone()).unwrap_or_default()
    }
}

const COLUMNS: &str = "c.id, c.team_id, t.name as team, c.trigger, c.status, c.stage,
    c.stage_started_at, c.stages, c.config, c.dataset_version_id, c.training_run_id,
    c.candidate_version_id, c.evaluation_id, c.canary_id, c.decision_id, c.reason,
    c.created_at, c.finished_at";

/// Starts a cycle at its curation stage; `None` when the team already has
/// one running.
pub async fn start(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
    trigger: Trigger,
    config: &serde_json::Value,
) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "insert into cycles (id, team_id, trigger, status, stage, config)
         values ($1, $2, $3, $4, $5, $6)
         on conflict do nothing returning id",
    )
    .bind(Uuid::new_v4())
    .bind(team_id)
    .bind(trigger)
    .bind(Status::Running)
    .bind(Stage::Curate)
    .bind(config)
    .fetch_optional(ex)
    .await?)
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Cycle>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from cycles c join teams t on t.id = c.team_id where c.id = $1"
    )))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

/// The newest cycles first, of one team or of all.
pub async fn list(
    ex: impl PgExecutor<'_>,
    team_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Cycle>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from cycles c join teams t on t.id = c.team_id
         where $1::uuid is null or c.team_id = $1
         order by c.created_at desc, c.id limit $2"
    )))
    .bind(team_id)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Teams with a running cycle.
pub async fn running_teams(ex: impl PgExecutor<'_>) -> Result<Vec<Uuid>> {
    Ok(
        sqlx::query_scalar("select team_id from cycles where status = $1")
            .bind(Status::Running)
            .fetch_all(ex)
            .await?,
    )
}

/// How many cycles there are in each status (`running`, `promoted`,
/// `rejected`, ...), every team together; statuses with none are left out.
pub async fn count_by_status(ex: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("select status, count(*) from cycles group by status order by status")
            .fetch_all(ex)
            .await?,
    )
}

/// The running cycle a record belongs to: by its own id, its training
/// run, its evaluation or its canary.
#[derive(Debug, Clone, Copy)]
pub enum Link {
    Cycle(Uuid),
    Run(Uuid),
    Evaluation(Uuid),
    Canary(Uuid),
}

/// The running cycle `link` names, if any.
pub async fn running_for(ex: impl PgExecutor<'_>, link: Link) -> Result<Option<Cycle>> {
    let (column, id) = match link {
        Link::Cycle(id) => ("id", id),
        Link::Run(id) => ("training_run_id", id),
        Link::Evaluation(id) => ("evaluation_id", id),
        Link::Canary(id) => ("canary_id", id),
    };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from cycles c join teams t on t.id = c.team_id
         where c.{column} = $1 and c.status = $2"
    )))
    .bind(id)
    .bind(Status::Running)
    .fetch_optional(ex)
    .await?)
}

/// What a stage's end records on its cycle (unset fields stay as they are).
#[derive(Debug, Clone, Default)]
pub struct StageEnd<'a> {
    /// What happened in the stage, for the record (`"v3: 65 SFT, 61 DPO"`).
    pub note: &'a str,
    pub dataset_version_id: Option<Uuid>,
    pub training_run_id: Option<Uuid>,
    pub candidate_version_id: Option<Uuid>,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
    pub decision_id: Option<Uuid>,
}

/// One move of a cycle, as the loop's table allows it.
#[derive(Debug, Clone, Copy)]
pub struct Advance<'a> {
    pub from: Stage,
    /// The move's name, recorded with the stage it ended.
    pub by: &'a str,
    pub to: Stage,
    pub status: Status,
    /// Why the cycle ended as it did (kept when `None`).
    pub reason: Option<&'a str>,
}

/// Ends stage `a.from` of running cycle `id`: it goes behind with its wall
/// time, the move and the note, and the cycle moves to `a.to` with
/// `a.status`. False when the cycle was not running at `a.from` (a retried
/// job after the cycle moved on).
pub async fn advance(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    a: &Advance<'_>,
    end: &StageEnd<'_>,
) -> Result<bool> {
    let done = sqlx::query(
        "update cycles set
             stages = stages || jsonb_build_array(jsonb_build_object(
                 'stage', stage,
                 'move', $5::text,
                 'started_at', stage_started_at,
                 'finished_at', now(),
                 'seconds', round(extract(epoch from now() - stage_started_at)::numeric, 3),
                 'note', $4::text)),
             stage = $3, stage_started_at = now(), status = $6,
             reason = coalesce($7, reason),
             finished_at = case when $6 = $14 then null else now() end,
             dataset_version_id = coalesce($8, dataset_version_id),
             training_run_id = coalesce($9, training_run_id),
             candidate_version_id = coalesce($10, candidate_version_id),
             evaluation_id = coalesce($11, evaluation_id),
             canary_id = coalesce($12, canary_id),
             decision_id = coalesce($13, decision_id)
         where id = $1 and stage = $2 and status = $14",
    )
    .bind(id)
    .bind(a.from)
    .bind(a.to)
    .bind(end.note)
    .bind(a.by)
    .bind(a.status)
    .bind(a.reason)
    .bind(end.dataset_version_id)
    .bind(end.training_run_id)
    .bind(end.candidate_version_id)
    .bind(end.evaluation_id)
    .bind(end.canary_id)
    .bind(end.decision_id)
    .bind(Status::Running)
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}
