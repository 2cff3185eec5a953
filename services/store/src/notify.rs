//! Postgres notifications other processes listen for. Whatever changes a
//! team's champion or canary calls [`routes_changed`] in the same
//! transaction, so a listener hears of it exactly when it commits.

use sqlx::PgExecutor;

use crate::Result;

/// The channel gateways `LISTEN` on for champion and canary changes.
pub const ROUTES_CHANNEL: &str = "flywheel_routes";

pub async fn routes_changed(ex: impl PgExecutor<'_>) -> Result<()> {
    sqlx::query("select pg_notify($1, '')")
        .bind(ROUTES_CHANNEL)
        .execute(ex)
        .await?;
    Ok(())
}
