//! Every SQL statement Flywheel runs lives here, as small functions over any
//! executor, so handlers and jobs can compose them in one transaction; the
//! migrations are embedded from `migrations/`.
//!
//! The store knows nothing of models, HTTP or jobs: it takes and returns rows.

pub mod admin;
pub mod admins;
pub mod canaries;
pub mod completions;
pub mod cycles;
pub mod dashboard;
pub mod datasets;
pub mod decisions;
pub mod evals;
pub mod feedback;
pub mod instance;
pub mod jobs;
pub mod judges;
pub mod keys;
pub mod models;
pub mod notify;
pub mod routes;
pub mod synth;
pub mod training;
pub mod upstreams;

pub use sqlx;
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

/// A column value no variant of its enum names (a row written by a newer
/// release, or by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

/// What an error means to whoever asked, whichever part raised it: the one
/// classification every face maps to its answer (both HTTP faces through
/// [`ErrorClass::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// What was asked for does not exist.
    NotFound,
    /// It exists, but its state does not allow this now (a canary already
    /// running, a name taken, nothing to roll back).
    Conflict,
    /// The request's own data can never be accepted as it is (a value the
    /// database cannot store, a broken constraint, a model the team may not
    /// use): sending it again gets the same answer.
    Refused,
    /// The database could not be reached or answered that it is going away:
    /// the same request may work later.
    Unreachable,
    /// Anything else: a bug or an unexpected failure. Its detail is logged,
    /// never shown.
    Internal,
}

impl ErrorClass {
    /// The HTTP status every face answers with: 404, 409, 422, 503 or 500.
    pub fn status(self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::Refused => 422,
            Self::Unreachable => 503,
            Self::Internal => 500,
        }
    }
}

/// Postgres refused a statement because of the data it carried, so sending
/// the same data again gets the same answer: a value it cannot store (a NUL
/// character in text or JSON, an invalid number), a constraint (a foreign key
/// whose row is gone, a check), or a size limit (an index row too large).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The SQLSTATE code, e.g. `22021` or `23503`.
    pub code: String,
    pub message: String,
}

impl StoreError {
    /// `Some` when the database refused the data itself (retrying cannot
    /// help); `None` for everything else: the database unreachable, busy,
    /// shutting down, or refusing for reasons outside the data (a missing
    /// table, permissions), all of which may pass.
    pub fn refusal(&self) -> Option<Refusal> {
        let Self::Db(sqlx::Error::Database(e)) = self else {
            return None;
        };
        let code = e.code()?.into_owned();
        // Class 22: data exception; class 23: integrity constraint
        // violation; 54000: program limit exceeded (e.g. index row size).
        let refused = code.starts_with("22") || code.starts_with("23") || code == "54000";
        refused.then(|| Refusal {
            code,
            message: e.message().to_string(),
        })
    }

    /// What the error means: a missing row, a state that does not allow it,
    /// data the database refuses (a unique key taken is a conflict: the
    /// same data may be accepted once the other row is gone), the database
    /// out of reach, or anything else.
    pub fn class(&self) -> ErrorClass {
        if self.is_unreachable() {
            return ErrorClass::Unreachable;
        }
        match self {
            Self::NotFound(_) => ErrorClass::NotFound,
            Self::Conflict(_) => ErrorClass::Conflict,
            Self::Db(sqlx::Error::RowNotFound) => ErrorClass::NotFound,
            _ => match self.refusal() {
                Some(r) if r.code == "23505" => ErrorClass::Conflict,
                Some(_) => ErrorClass::Refused,
                None => ErrorClass::Internal,
            },
        }
    }

    /// Whether the error says the database could not be reached at all (as
    /// opposed to an answer it gave).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Db(
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Protocol(_)
            )
        ) || matches!(self, Self::Db(sqlx::Error::Database(e))
            if e.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")))
    }
}

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

/// The database's clock (the transaction's start, inside one).
pub async fn now(ex: impl sqlx::PgExecutor<'_>) -> Result<chrono::DateTime<chrono::Utc>> {
    Ok(sqlx::query_scalar("select now()").fetch_one(ex).await?)
}

/// A round trip to the database.
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("select 1").execute(pool).await?;
    Ok(())
}
