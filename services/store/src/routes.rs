//! What every gateway needs to route requests: each team's champion and
//! canary and every model version's name and scope, read in one snapshot;
//! and the channel that tells gateways it changed (`LISTEN flywheel_routes`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::Result;
use crate::models::ModelVersion;

/// A team's routing.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TeamRoute {
    pub team_id: Uuid,
    /// `None`: the global champion.
    pub champion_version_id: Option<Uuid>,
    pub share_for_training: bool,
    pub canary_id: Option<Uuid>,
    pub canary_version_id: Option<Uuid>,
    pub canary_share: Option<f64>,
}

/// A version's lineage link, for serving adapters on their base.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct VersionLink {
    pub id: Uuid,
    pub base_version_id: Option<Uuid>,
    pub adapter_path: Option<String>,
}

/// Everything routing needs, consistent with itself.
#[derive(Debug, Clone, Default)]
pub struct RouteSnapshot {
    pub versions: Vec<ModelVersion>,
    pub links: Vec<VersionLink>,
    pub teams: Vec<TeamRoute>,
    /// Where each upstream version is served.
    pub upstreams: Vec<crate::upstreams::Upstream>,
    pub read_at: Option<DateTime<Utc>>,
}

pub async fn snapshot(pool: &sqlx::PgPool) -> Result<RouteSnapshot> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    let versions = crate::models::list(&mut *tx).await?;
    let links = sqlx::query_as(
        "select id, base_version_id, adapter_path from model_versions order by created_at",
    )
    .fetch_all(&mut *tx)
    .await?;
    let teams = sqlx::query_as(
        "select t.id as team_id, t.champion_version_id, t.share_for_training,
                c.id as canary_id, c.candidate_version_id as canary_version_id,
                c.share as canary_share
         from teams t left join canaries c on c.team_id = t.id and c.status = 'running'
         order by t.id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let upstreams = crate::upstreams::list(&mut *tx).await?;
    let read_at = crate::now(&mut *tx).await?;
    tx.commit().await?;
    Ok(RouteSnapshot {
        versions,
        links,
        teams,
        upstreams,
        read_at: Some(read_at),
    })
}
