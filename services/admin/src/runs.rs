//! Training runs: status, progress, throughput and the loss and learning
//! rate curves (charts with their numbers), and cancel.

use askama::Template;
use axum::extract::{Form, Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use flywheel_store::training::{StepRow, TrainingRun};
use uuid::Uuid;

use crate::AdminState;
use crate::auth::Signed;
use crate::chart::{self, Series};
use crate::error::AdminError;
use crate::error::ApiPath;
use crate::pages::{Chrome, maybe_when, when};

pub struct RunRow {
    pub r: TrainingRun,
    pub status: String,
    pub created: String,
    pub throughput: String,
}

fn row(r: TrainingRun) -> RunRow {
    RunRow {
        status: r.status.as_str().to_string(),
        created: when(&r.created_at),
        throughput: r
            .tokens_per_second
            .map_or_else(|| "-".into(), |t| format!("{t:.0} tokens/s")),
        r,
    }
}

#[derive(Template)]
#[template(path = "runs.html")]
struct ListPage {
    chrome: Chrome,
    rows: Vec<RunRow>,
}

pub async fn list(
    State(state): State<AdminState>,
    signed: Signed,
) -> Result<Html<String>, AdminError> {
    let rows = flywheel_store::training::list(&state.pool, 200)
        .await?
        .into_iter()
        .map(row)
        .collect();
    let page = ListPage {
        chrome: Chrome::new(&signed, "runs"),
        rows,
    };
    Ok(Html(page.render()?))
}

#[derive(Template)]
#[template(path = "run.html")]
struct OnePage {
    chrome: Chrome,
    run: RunRow,
    started: String,
    finished: String,
    config: String,
    loss_chart: String,
    lr_chart: String,
    steps: Vec<StepRow>,
    active: bool,
}

impl OnePage {
    fn fmt(&self, v: &f64) -> String {
        format!("{v:.4}")
    }
    fn lr(&self, v: &f64) -> String {
        format!("{v:.2e}")
    }
}

/// At most this many points on a curve (every n-th step beyond it).
const POINTS: usize = 200;

pub async fn one(
    State(state): State<AdminState>,
    signed: Signed,
    Path(id): Path<Uuid>,
) -> Result<Html<String>, AdminError> {
    let r = flywheel_store::training::get(&state.pool, id)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no training run has the id {id}")))?;
    let steps = flywheel_store::training::steps(&state.pool, id).await?;
    let every = steps.len().div_ceil(POINTS).max(1);
    let shown: Vec<&StepRow> = steps.iter().step_by(every).collect();
    let xs: Vec<String> = shown.iter().map(|s| s.step.to_string()).collect();
    let loss_chart = chart::lines(
        "Training loss per step",
        &xs,
        &[Series {
            name: "loss".into(),
            values: shown.iter().map(|s| Some(s.loss)).collect(),
        }],
        None,
        |v| format!("{v:.2}"),
    );
    let lr_chart = chart::lines(
        "Learning rate per step",
        &xs,
        &[Series {
            name: "learning rate".into(),
            values: shown.iter().map(|s| Some(s.learning_rate)).collect(),
        }],
        None,
        |v| format!("{v:.1e}"),
    );
    let page = OnePage {
        chrome: Chrome::new(&signed, "runs"),
        started: maybe_when(&r.started_at),
        finished: maybe_when(&r.finished_at),
        config: serde_json::to_string_pretty(&r.config).unwrap_or_default(),
        active: r.finished_at.is_none(),
        run: row(r),
        loss_chart,
        lr_chart,
        steps,
    };
    Ok(Html(page.render()?))
}

/// Asks the run to stop (it stops at its next step).
pub async fn cancel(
    State(state): State<AdminState>,
    signed: Signed,
    Path(id): Path<Uuid>,
    Form(f): Form<crate::auth::CsrfForm>,
) -> Result<Response, AdminError> {
    request_cancel(&state, &signed, id, f.csrf.as_deref()).await?;
    Ok(Redirect::to(&format!("/admin/runs/{id}")).into_response())
}

async fn request_cancel(
    state: &AdminState,
    signed: &Signed,
    id: Uuid,
    csrf: Option<&str>,
) -> Result<String, AdminError> {
    signed.may_act(csrf)?;
    if !flywheel_store::training::request_cancel(&state.pool, id).await? {
        return Err(AdminError::conflict(
            "no queued or running training run has this id: nothing to cancel",
        ));
    }
    tracing::info!(admin = signed.session.username, run = %id, "training run cancel requested");
    Ok(format!("cancel requested for training run {id}"))
}

pub async fn cancel_api(
    State(state): State<AdminState>,
    signed: Signed,
    ApiPath(id): ApiPath<Uuid>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<crate::pages::Outcome>, AdminError> {
    request_cancel(&state, &signed, id, crate::pages::header_csrf(&headers))
        .await
        .map(|done| axum::Json(crate::pages::Outcome { done }))
        .map_err(AdminError::api)
}
