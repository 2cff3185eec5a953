//! `flywheel up`: everything on embedded defaults. A private Postgres when
//! `DATABASE_URL` is unset, the database and its migrations, the default
//! model pulled and made champion, an API key saved in `FLYWHEEL_HOME`, and
//! the gateway and the worker in one process that one signal stops.

use crate::Config;
use crate::pg::LocalPostgres;

/// Runs everything on embedded defaults until a signal stops it.
pub async fn up(mut cfg: Config) -> anyhow::Result<()> {
    crate::bootstrap::low_priority_training_pool(&cfg);
    std::fs::create_dir_all(&cfg.home)?;
    let local = match &cfg.database.url {
        Some(_) => None,
        None => {
            let pg = LocalPostgres::new(&cfg.home.join("pgdata"), cfg.database.local_port)?;
            pg.start()?;
            flywheel_store::admin::ensure_database(&pg.url("postgres"), "flywheel").await?;
            cfg.database.url = Some(crate::config::DatabaseUrl(pg.url("flywheel")));
            Some(pg)
        }
    };
    let pool = crate::bootstrap::pool(&cfg).await?;
    let champion = crate::bootstrap::ensure_champion(&cfg, &pool).await?;
    let key = dev_key(&cfg, &pool).await?;
    println!(
        "Flywheel is starting on http://{}/v1 with model {}",
        cfg.gateway.addr, champion.name
    );
    println!(
        "API key (team \"default\", saved in {}):",
        cfg.home.join("api-key").display()
    );
    println!("{key}");
    // One signal stops both the gateway and the worker.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::serve::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let worker_listener = crate::worker::listen(&cfg.jobs.addr, pool.clone()).await?;
    let worker = tokio::spawn(flywheel_jobs::worker::run(
        pool.clone(),
        cfg.worker(&pool)?,
        stopped(stop_rx.clone()),
    ));
    let mut result = crate::serve::serve(cfg, pool, stopped(stop_rx)).await;
    match worker.await {
        Ok(Err(e)) if result.is_ok() => result = Err(e),
        Err(e) if result.is_ok() => result = Err(anyhow::anyhow!("worker panicked: {e}")),
        _ => {}
    }
    if let Some(l) = worker_listener {
        l.abort();
    }
    if let Some(pg) = local {
        eprintln!("stopping PostgreSQL");
        pg.stop()?;
    }
    result
}

/// The key `up` prints: reused from `FLYWHEEL_HOME/api-key` while it is valid.
async fn dev_key(cfg: &Config, pool: &flywheel_store::PgPool) -> anyhow::Result<String> {
    let path = cfg.home.join("api-key");
    if let Ok(saved) = std::fs::read_to_string(&path) {
        let saved = saved.trim().to_string();
        if flywheel_store::keys::authenticate(pool, &saved)
            .await?
            .is_some()
        {
            return Ok(saved);
        }
    }
    let (_, secret) = flywheel_store::keys::create_key(pool, "default").await?;
    std::fs::write(&path, format!("{secret}\n"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret)
}
