//! Every SQL query Flywheel runs lives here, as small functions over any
//! executor, so handlers and jobs can compose them in one transaction.

pub mod completions;
pub mod datasets;
pub mod feedback;
pub mod jobs;
pub mod keys;
pub mod models;
pub mod synth;
pub mod training;

pub use sqlx::postgres::PgListener;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
pub use sqlx::{PgPool, Postgres, Transaction};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Connects a pool to `url`.
pub async fn connect(url: &str) -> Result<PgPool> {
    let opts: PgConnectOptions = url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(opts)
        .await?)
}

/// Applies pending migrations. Other tools (the job queue) keep their own
/// migrations in the same database, so unknown applied versions are fine.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    let mut migrator = sqlx::migrate!("../../migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// A round trip to the database.
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("select 1").execute(pool).await?;
    Ok(())
}
