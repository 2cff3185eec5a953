//! A fresh database per test on the real Postgres server.

use flywheel_store::PgPool;

/// The server tests create their databases on: `TEST_DATABASE_URL`, then
/// `DATABASE_URL`, then the local default.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates an empty database named `<prefix>_<uuid>` and returns its URL.
pub async fn fresh_database(prefix: &str) -> String {
    let admin = flywheel_store::connect(&admin_url())
        .await
        .expect("the tests need Postgres: set TEST_DATABASE_URL or start one on 127.0.0.1:5432");
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let admin_url = admin_url();
    match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("TEST_DATABASE_URL has no database part: {admin_url}"),
    }
}

/// A database of its own for one test, migrated.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let url = fresh_database("fw_test").await;
        let name = url.rsplit('/').next().unwrap_or_default().to_string();
        let pool = flywheel::connect_and_migrate(&url).await.expect("migrate");
        Self { pool, url, name }
    }
}
