//! Curated dataset versions: what a build reads (votes and the completions
//! they rate), what it writes (an immutable version with its examples and
//! lineage), and what readers list and export.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Result;

/// Whose feedback a dataset is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One team's feedback.
    Team(Uuid),
    /// Every team that allows its feedback to be pooled (`share_for_training`).
    Shared,
}

impl Scope {
    pub fn team_id(self) -> Option<Uuid> {
        match self {
            Scope::Team(id) => Some(id),
            Scope::Shared => None,
        }
    }
}

/// One vote, as a build reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VoteRow {
    pub id: Uuid,
    pub completion_id: String,
    pub team_id: Uuid,
    pub end_user: String,
    pub rating: String,
    pub correction: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A completion that has at least one vote, as a build reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RatedCompletion {
    pub id: String,
    pub end_user: Option<String>,
    /// The request's `messages` array as logged (contents are hashes for
    /// teams that store no text).
    pub messages: sqlx::types::Json<serde_json::Value>,
    pub output: String,
    pub created_at: DateTime<Utc>,
}

/// The teams a scope reads.
pub async fn scope_teams(ex: impl PgExecutor<'_>, scope: Scope) -> Result<Vec<Uuid>> {
    Ok(match scope {
        Scope::Team(id) => {
            sqlx::query_scalar("select id from teams where id = $1")
                .bind(id)
                .fetch_all(ex)
                .await?
        }
        Scope::Shared => {
            sqlx::query_scalar("select id from teams where share_for_training order by id")
                .fetch_all(ex)
                .await?
        }
    })
}

/// Every vote of the given teams up to `until`, in a stable order.
pub async fn votes(
    ex: impl PgExecutor<'_>,
    teams: &[Uuid],
    until: DateTime<Utc>,
) -> Result<Vec<VoteRow>> {
    Ok(sqlx::query_as(
        "select id, completion_id, team_id, end_user, rating, correction, created_at
         from feedback where team_id = any($1) and created_at <= $2
         order by id",
    )
    .bind(teams)
    .bind(until)
    .fetch_all(ex)
    .await?)
}

/// The ids of the votes [`votes`] would read: all a rebuild needs to see
/// that nothing changed.
pub async fn vote_ids(
    ex: impl PgExecutor<'_>,
    teams: &[Uuid],
    until: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    Ok(
        sqlx::query_scalar("select id from feedback where team_id = any($1) and created_at <= $2")
            .bind(teams)
            .bind(until)
            .fetch_all(ex)
            .await?,
    )
}

/// The chat completions those votes rate (a text completion, from
/// `POST /v1/completions`, has a prompt, not messages, and is not curated).
pub async fn rated_completions(
    ex: impl PgExecutor<'_>,
    teams: &[Uuid],
    until: DateTime<Utc>,
) -> Result<Vec<RatedCompletion>> {
    Ok(sqlx::query_as(
        "select c.id, c.end_user, coalesce(c.request -> 'messages', '[]') as messages, c.output,
                c.created_at
         from completions c
         where c.team_id = any($1)
           and c.request ? 'messages'
           and exists (select 1 from feedback f where f.completion_id = c.id and f.created_at <= $2)",
    )
    .bind(teams)
    .bind(until)
    .fetch_all(ex)
    .await?)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct DatasetVersion {
    pub id: Uuid,
    pub team_id: Option<Uuid>,
    /// Counts from 1 per team (and for the shared pool).
    pub version: i32,
    pub fingerprint: String,
    pub manifest: serde_json::Value,
    pub sft_count: i32,
    pub dpo_count: i32,
    pub kto_count: i32,
    pub window_start: Option<DateTime<Utc>>,
    pub window_end: Option<DateTime<Utc>>,
    pub user_data_deleted_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The columns of a [`DatasetVersion`], for `concat!` (sqlx wants static SQL).
macro_rules! version_columns {
    () => {
        "id, team_id, version, fingerprint, manifest, sft_count, dpo_count, kto_count,
         window_start, window_end, user_data_deleted_at, created_at"
    };
}

/// The version built from exactly this input, if there is one.
pub async fn find_by_fingerprint(
    ex: impl PgExecutor<'_>,
    scope: Scope,
    fingerprint: &str,
) -> Result<Option<DatasetVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        version_columns!(),
        " from dataset_versions
         where team_id is not distinct from $1 and fingerprint = $2"
    ))
    .bind(scope.team_id())
    .bind(fingerprint)
    .fetch_optional(ex)
    .await?)
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<DatasetVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        version_columns!(),
        " from dataset_versions where id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

/// What the manifest of every distillation's version names as its builder,
/// before the builder's own version (`flywheel-distill/1`).
pub const DISTILLED_BUILDER: &str = "flywheel-distill/";

/// The team's newest distilled version (a teacher's answers), when it holds
/// no data of an end user who had it deleted: a marked one is mixed into
/// nothing, and an older one is not taken in its place.
pub async fn newest_distilled(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
) -> Result<Option<DatasetVersion>> {
    let newest: Option<DatasetVersion> = sqlx::query_as(concat!(
        "select ",
        version_columns!(),
        " from dataset_versions
         where team_id = $1 and starts_with(manifest->>'builder', $2)
         order by version desc limit 1"
    ))
    .bind(team_id)
    .bind(DISTILLED_BUILDER)
    .fetch_optional(ex)
    .await?;
    Ok(newest.filter(|v| v.user_data_deleted_at.is_none()))
}

/// The newest logged request any distillation of the team's log read,
/// among those that hold no deleted user's data: the loop distils again
/// only once a newer one is logged.
pub async fn distilled_log_until(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "select max((manifest->'distillation'->'outcome'->>'log_until')::timestamptz)
         from dataset_versions
         where team_id = $1 and starts_with(manifest->>'builder', $2)
               and user_data_deleted_at is null
               and manifest->'distillation'->>'prompts' = 'log'",
    )
    .bind(team_id)
    .bind(DISTILLED_BUILDER)
    .fetch_one(ex)
    .await?)
}

/// Whether the loop's cycle `cycle` has written a distillation.
pub async fn distilled_in_cycle(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
    cycle: Uuid,
) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from dataset_versions
                        where team_id = $1 and manifest->'distillation'->>'cycle' = $2)",
    )
    .bind(team_id)
    .bind(cycle.to_string())
    .fetch_one(ex)
    .await?)
}

/// A version's lineage: every vote (or logged request) its examples came from.
pub async fn lineage(ex: impl PgExecutor<'_>, version_id: Uuid) -> Result<Vec<LineageRow>> {
    let rows: Vec<(Uuid, Uuid, String, String, String)> = sqlx::query_as(
        "select team_id, feedback_id, completion_id, voter, author from dataset_lineage
         where version_id = $1",
    )
    .bind(version_id)
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(team_id, feedback_id, completion_id, voter, author)| LineageRow {
                team_id,
                feedback_id,
                completion_id,
                voter,
                author,
            },
        )
        .collect())
}

/// A team's version by number (`team` `None`: the shared pool).
pub async fn get_numbered(
    ex: impl PgExecutor<'_>,
    team_id: Option<Uuid>,
    version: i32,
) -> Result<Option<DatasetVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        version_columns!(),
        " from dataset_versions
         where team_id is not distinct from $1 and version = $2"
    ))
    .bind(team_id)
    .bind(version)
    .fetch_optional(ex)
    .await?)
}

/// Versions, newest first; all teams' when `team_id` is `None`.
pub async fn list(ex: impl PgExecutor<'_>, team_id: Option<Uuid>) -> Result<Vec<DatasetVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        version_columns!(),
        " from dataset_versions
         where $1::uuid is null or team_id = $1
         order by created_at desc, version desc"
    ))
    .bind(team_id)
    .fetch_all(ex)
    .await?)
}

/// A version to write: everything but its number, which is assigned here.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub id: Uuid,
    pub scope: Scope,
    pub fingerprint: String,
    pub manifest: serde_json::Value,
    pub sft_count: i32,
    pub dpo_count: i32,
    pub kto_count: i32,
    pub window_start: Option<DateTime<Utc>>,
    pub window_end: Option<DateTime<Utc>>,
}

/// One example: kind (`sft`, `dpo`, `kto`), split (`train`, `eval`) and its
/// serialized form.
#[derive(Debug, Clone)]
pub struct NewExample {
    pub kind: &'static str,
    pub split: &'static str,
    pub example: String,
}

/// The `feedback_id` of lineage that no vote gave (the nil id).
pub const NO_VOTE: Uuid = Uuid::nil();

#[derive(Debug, Clone)]
pub struct LineageRow {
    pub team_id: Uuid,
    /// The vote; [`NO_VOTE`] for an example made from a logged prompt
    /// alone (a teacher's answer to it).
    pub feedback_id: Uuid,
    pub completion_id: String,
    pub voter: String,
    pub author: String,
}

/// Writes a version with its examples and lineage inside the caller's
/// transaction. Returns `None` (and writes nothing) when a concurrent build
/// already stored the same fingerprint.
pub async fn insert_version(
    conn: &mut PgConnection,
    v: &NewVersion,
    examples: &[NewExample],
    lineage: &[LineageRow],
) -> Result<Option<i32>> {
    // One build per scope at a time: the lock orders version numbers and
    // makes a concurrent duplicate see the first one's row.
    let lock_key = v.scope.team_id().unwrap_or(Uuid::nil()).to_string();
    sqlx::query("select pg_advisory_xact_lock(hashtext('dataset:' || $1))")
        .bind(&lock_key)
        .execute(&mut *conn)
        .await?;
    let number: Option<i32> = sqlx::query_scalar(
        "insert into dataset_versions (id, team_id, version, fingerprint, manifest, sft_count,
             dpo_count, kto_count, window_start, window_end)
         select $1, $2, coalesce(max(version), 0) + 1, $3, $4, $5, $6, $7, $8, $9
         from dataset_versions where team_id is not distinct from $2
         on conflict do nothing
         returning version",
    )
    .bind(v.id)
    .bind(v.scope.team_id())
    .bind(&v.fingerprint)
    .bind(&v.manifest)
    .bind(v.sft_count)
    .bind(v.dpo_count)
    .bind(v.kto_count)
    .bind(v.window_start)
    .bind(v.window_end)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(number) = number else {
        return Ok(None);
    };

    let id = v.id.to_string();
    let mut ordinals = std::collections::HashMap::<&str, i32>::new();
    copy_rows(
        conn,
        "copy dataset_examples (version_id, kind, ordinal, split, example) from stdin",
        examples.iter().map(|e| {
            let n = ordinals.entry(e.kind).or_default();
            *n += 1;
            [
                id.clone(),
                e.kind.to_string(),
                n.to_string(),
                e.split.to_string(),
                e.example.clone(),
            ]
        }),
    )
    .await?;
    copy_rows(
        conn,
        "copy dataset_lineage (version_id, team_id, feedback_id, completion_id, voter, author)
         from stdin",
        lineage.iter().map(|l| {
            [
                id.clone(),
                l.team_id.to_string(),
                l.feedback_id.to_string(),
                l.completion_id.clone(),
                l.voter.clone(),
                l.author.clone(),
            ]
        }),
    )
    .await?;
    // A build reads its input in a snapshot and writes it later: an end
    // user whose data was deleted in between is in the input but gone from
    // the log. Such a version is marked as it is written (a deletion and a
    // write take the same lock, so one of the two sees the other).
    sqlx::query(
        "update dataset_versions set user_data_deleted_at = now()
         where id = $1 and exists (
             select 1 from dataset_lineage l
             where l.version_id = $1
               and not exists (select 1 from completions c where c.id = l.completion_id))",
    )
    .bind(v.id)
    .execute(&mut *conn)
    .await?;
    Ok(Some(number))
}

/// Streams rows through `COPY ... FROM STDIN` (text format) in chunks.
async fn copy_rows<const N: usize>(
    conn: &mut PgConnection,
    statement: &str,
    rows: impl Iterator<Item = [String; N]>,
) -> Result<()> {
    let mut copy = conn.copy_in_raw(statement).await?;
    let mut buf = Vec::with_capacity(1 << 20);
    for row in rows {
        for (i, field) in row.iter().enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            copy_escape(field, &mut buf);
        }
        buf.push(b'\n');
        if buf.len() >= 1 << 20 {
            copy.send(std::mem::take(&mut buf)).await?;
            buf.reserve(1 << 20);
        }
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// COPY's text format: backslash, tab, newline and carriage return escaped.
fn copy_escape(field: &str, out: &mut Vec<u8>) {
    for b in field.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// A version's examples of one kind (and one split, if given), in order.
pub async fn examples(
    ex: impl PgExecutor<'_>,
    version_id: Uuid,
    kind: &str,
    split: Option<&str>,
) -> Result<Vec<(String, serde_json::Value)>> {
    Ok(sqlx::query_as(
        "select split, example from dataset_examples
         where version_id = $1 and kind = $2 and ($3::text is null or split = $3)
         order by ordinal",
    )
    .bind(version_id)
    .bind(kind)
    .bind(split)
    .fetch_all(ex)
    .await?)
}

/// How many examples of one kind and split a version holds.
pub async fn count_examples(
    ex: impl PgExecutor<'_>,
    version_id: Uuid,
    kind: &str,
    split: &str,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "select count(*) from dataset_examples
         where version_id = $1 and kind = $2 and split = $3",
    )
    .bind(version_id)
    .bind(kind)
    .bind(split)
    .fetch_one(ex)
    .await?)
}

/// What a version holds of each kind of evidence, in all and in its eval
/// split: corrections (SFT examples a user wrote), preference pairs (DPO)
/// and single votes (KTO).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct EvidenceCounts {
    pub corrections: i64,
    pub eval_corrections: i64,
    pub pairs: i64,
    pub eval_pairs: i64,
    pub votes: i64,
    pub eval_votes: i64,
}

pub async fn evidence_counts(ex: impl PgExecutor<'_>, version_id: Uuid) -> Result<EvidenceCounts> {
    Ok(sqlx::query_as(
        "select
             count(*) filter (where kind = 'sft' and (example->>'correction')::boolean)
                 as corrections,
             count(*) filter (where kind = 'sft' and split = 'eval'
                 and (example->>'correction')::boolean) as eval_corrections,
             count(*) filter (where kind = 'dpo') as pairs,
             count(*) filter (where kind = 'dpo' and split = 'eval') as eval_pairs,
             count(*) filter (where kind = 'kto') as votes,
             count(*) filter (where kind = 'kto' and split = 'eval') as eval_votes
         from dataset_examples where version_id = $1",
    )
    .bind(version_id)
    .fetch_one(ex)
    .await?)
}

/// How many votes a version's lineage names (a distilled example names a
/// request, no vote) and how many distinct completions.
pub async fn lineage_counts(ex: impl PgExecutor<'_>, version_id: Uuid) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "select count(*) filter (where feedback_id <> $2), count(distinct completion_id)
         from dataset_lineage where version_id = $1",
    )
    .bind(version_id)
    .bind(NO_VOTE)
    .fetch_one(ex)
    .await?)
}

/// Marks the versions that hold data of `end_user` (as voter or as the
/// completion's user) in `team_id`; returns how many were marked.
pub async fn mark_user_deleted(
    conn: &mut PgConnection,
    team_id: Uuid,
    end_user: &str,
) -> Result<u64> {
    // The locks a version's write takes ([`insert_version`]): the team's
    // and the shared pool's. A write that holds one finishes first and is
    // marked here; one that waits finds the deleted rows gone and marks
    // itself.
    for key in [team_id, Uuid::nil()] {
        sqlx::query("select pg_advisory_xact_lock(hashtext('dataset:' || $1))")
            .bind(key.to_string())
            .execute(&mut *conn)
            .await?;
    }
    Ok(sqlx::query(
        "update dataset_versions set user_data_deleted_at = now()
         where user_data_deleted_at is null and id in (
             select version_id from dataset_lineage
             where team_id = $1 and (voter = $2 or author = $2))",
    )
    .bind(team_id)
    .bind(end_user)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Teams with votes newer than their latest dataset version (or with votes
/// and no version yet): what a scheduled curation should rebuild.
pub async fn teams_with_new_feedback(ex: impl PgExecutor<'_>) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "select t.id from teams t
         where exists (
             select 1 from feedback f
             where f.team_id = t.id
               and f.created_at > coalesce(
                   (select max(created_at) from dataset_versions d where d.team_id = t.id),
                   '-infinity'))
         order by t.id",
    )
    .fetch_all(ex)
    .await?)
}

/// A read-only transaction that sees one snapshot for all its reads
/// (repeatable read), so the votes and the completions they rate agree.
pub async fn begin_snapshot(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_escaping_keeps_special_bytes() {
        let mut out = Vec::new();
        copy_escape("a\\b\tc\nd\re", &mut out);
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re");
    }
}
