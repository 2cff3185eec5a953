//! Putting jobs on the apalis queues, inside the caller's transaction so a
//! job exists exactly when the change that asked for it commits.

use apalis::prelude::{TaskBuilder, TaskId};
use flywheel_store::PgPool;
use serde::Serialize;
use sqlx::PgConnection;

use crate::curate::CurateJob;

/// The queue curation jobs run on.
pub const CURATION: &str = "flywheel.curate";

/// The queue training runs go through.
pub const TRAINING: &str = "flywheel.train";

/// The queue evaluations go through.
pub const EVALUATION: &str = "flywheel.eval";

/// Attempts a job gets unless configured otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// Creates apalis's schema (`apalis.*`, its own migration table) next to
/// ours. Safe to run again.
pub async fn setup(pool: &PgPool) -> anyhow::Result<()> {
    let mut migrator = apalis_postgres::PostgresStorage::migrations();
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// Enqueues one job; returns its task id.
pub async fn push<T: Serialize>(
    conn: &mut PgConnection,
    queue: &str,
    job: &T,
    max_attempts: u32,
) -> anyhow::Result<String> {
    // apalis-postgres reads task ids back as ULIDs.
    let id = TaskId::from(ulid::Ulid::generate());
    let task = TaskBuilder::new(serde_json::to_vec(job)?)
        .task_id(id.clone())
        .max_attempts(max_attempts as usize)
        .build();
    apalis_postgres::queries::push_tasks(conn, queue, vec![task]).await?;
    Ok(id.to_string())
}

/// Enqueues a curation job in its own transaction.
pub async fn push_curation(
    pool: &PgPool,
    job: &CurateJob,
    max_attempts: u32,
) -> anyhow::Result<String> {
    let mut tx = pool.begin().await?;
    let id = push(&mut tx, CURATION, job, max_attempts).await?;
    tx.commit().await?;
    Ok(id)
}
