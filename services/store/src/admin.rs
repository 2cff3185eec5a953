//! Statements about databases rather than rows: creating the database
//! `flywheel up` uses, refreshing planner statistics after bulk loads.

use sqlx::PgExecutor;

use crate::Result;

/// Creates database `name` on the server `admin_url` points at, unless it
/// exists. `name` is ours (never user input): it is quoted, not bound.
pub async fn ensure_database(admin_url: &str, name: &str) -> Result<()> {
    let admin = crate::connect(admin_url).await?;
    let exists: bool =
        sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "create database \"{}\"",
            name.replace('"', "\"\"")
        )))
        .execute(&admin)
        .await?;
    }
    admin.close().await;
    Ok(())
}

/// Refreshes the planner's statistics of the log tables (after bulk loads).
pub async fn analyze_log(ex: impl PgExecutor<'_> + Copy) -> Result<()> {
    sqlx::query("analyze completions").execute(ex).await?;
    sqlx::query("analyze feedback").execute(ex).await?;
    Ok(())
}
