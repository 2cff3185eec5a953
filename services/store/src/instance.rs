//! Which database this is: the id made once by the migrations, with the
//! database's name and the cluster's system identifier for messages.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

/// The database a journal's records belong to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseIdentity {
    /// `flywheel_instance.id`: decides whether two identities are the same.
    pub id: Uuid,
    /// `current_database()`.
    pub name: String,
    /// The cluster's `pg_control_system().system_identifier`, where this
    /// role may read it (superusers and `pg_monitor`).
    #[serde(default)]
    pub system_identifier: Option<String>,
}

impl std::fmt::Display for DatabaseIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database {:?} (id {}", self.name, self.id)?;
        if let Some(s) = &self.system_identifier {
            write!(f, ", cluster {s}")?;
        }
        f.write_str(")")
    }
}

pub async fn identity(pool: &sqlx::PgPool) -> Result<DatabaseIdentity> {
    let (id, name): (Uuid, String) =
        sqlx::query_as("select id, current_database() from flywheel_instance")
            .fetch_one(pool)
            .await?;
    Ok(DatabaseIdentity {
        id,
        name,
        system_identifier: system_identifier(pool).await,
    })
}

async fn system_identifier(ex: impl PgExecutor<'_>) -> Option<String> {
    sqlx::query_scalar("select system_identifier::text from pg_control_system()")
        .fetch_one(ex)
        .await
        .ok()
}
