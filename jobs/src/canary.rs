//! The canary monitor: every few seconds each worker asks the loop to check
//! the running canaries ([`flywheel_loop::canary::check_all`]): promote,
//! roll back, or wait on their live thumbs.

use flywheel_eval::Policy;
use flywheel_store::PgPool;

/// Runs the monitor until `shutdown` resolves.
pub async fn monitor(
    pool: PgPool,
    policy: Policy,
    every: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = flywheel_loop::canary::check_all(&pool, &policy).await {
            tracing::warn!(error = %e, "canary check failed");
        }
    }
}
