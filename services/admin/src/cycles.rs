//! One cycle of the loop: its stages with their wall times, notes and the
//! moves that ended them, the records it made, why it ended, and the
//! loop's table drawn as a picture with the path this cycle took through it
//! (drawn from `flywheel_loop::TABLE`, the table the loop itself moves by).

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Html;
use flywheel_loop::machine::{self, STAGES, TABLE, Transition};
use flywheel_store::cycles::{Cycle, Stage, StageRecord, Status};
use uuid::Uuid;

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::pages::{Chrome, maybe_when, when};

#[derive(Template)]
#[template(path = "cycle.html")]
struct Page {
    chrome: Chrome,
    c: Cycle,
    status: String,
    stage: String,
    started: String,
    finished: String,
    stages: Vec<StageRecord>,
    diagram: String,
    candidate: String,
}

impl Page {
    fn seconds(&self, s: &f64) -> String {
        format!("{s:.1}")
    }
}

pub async fn one(
    State(state): State<AdminState>,
    signed: Signed,
    Path(id): Path<Uuid>,
) -> Result<Html<String>, AdminError> {
    let c = flywheel_store::cycles::get(&state.pool, id)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no cycle {id}")))?;
    let candidate = match c.candidate_version_id {
        Some(v) => flywheel_store::models::get(&state.pool, v)
            .await?
            .map_or_else(|| v.to_string(), |m| m.name),
        None => String::new(),
    };
    let at = (c.status == Status::Running).then_some(c.stage);
    let page = Page {
        chrome: Chrome::new(&signed, "overview"),
        status: c.status.to_string(),
        stage: c.stage.to_string(),
        started: when(&c.created_at),
        finished: maybe_when(&c.finished_at),
        stages: c.stage_records(),
        diagram: diagram(&machine::path(&c), at),
        candidate,
        c,
    };
    Ok(Html(page.render()?))
}

/// Where a stage's or an outcome's box sits: (x, y) of its top left.
fn place(stage: Stage, status: Status) -> (f64, f64) {
    const W: f64 = 150.0;
    match stage {
        Stage::Done => {
            let i = [
                Status::Skipped,
                Status::Failed,
                Status::Rejected,
                Status::Promoted,
                Status::RolledBack,
            ]
            .iter()
            .position(|s| *s == status)
            .unwrap_or(0);
            (10.0 + W * i as f64, 170.0)
        }
        s => {
            let i = STAGES.iter().position(|x| *x == s).unwrap_or(0);
            (10.0 + W * i as f64 + W / 2.0, 30.0)
        }
    }
}

const BOX: (f64, f64) = (120.0, 36.0);

/// The loop's table as an SVG: the running stages in a row, the ways a
/// cycle ends below, an arrow per move; the moves in `taken` drawn bold and
/// numbered in order, the stage `at` (a running cycle's) outlined.
pub fn diagram(taken: &[Transition], at: Option<Stage>) -> String {
    let mut svg = String::from(
        r#"<svg class="loop-table" viewBox="0 0 780 230" role="img" aria-label="The loop's stages and moves, with this cycle's path"><defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>"#,
    );
    for t in TABLE {
        let (fx, fy) = place(t.from, Status::Running);
        let (tx, ty) = place(t.to, t.status);
        let step = taken.iter().position(|x| x == t);
        let (x1, y1, x2, y2) = if t.to == Stage::Done {
            (fx + BOX.0 / 2.0, fy + BOX.1, tx + BOX.0 / 2.0, ty)
        } else {
            (fx + BOX.0, fy + BOX.1 / 2.0, tx, ty + BOX.1 / 2.0)
        };
        let class = if step.is_some() { "move taken" } else { "move" };
        svg.push_str(&format!(
            r#"<line class="{class}" x1="{x1:.0}" y1="{y1:.0}" x2="{x2:.0}" y2="{y2:.0}" marker-end="url(#arrow)"><title>{} from {}</title></line>"#,
            t.by, t.from
        ));
        if let Some(n) = step {
            let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
            svg.push_str(&format!(
                r#"<circle class="step" cx="{mx:.0}" cy="{my:.0}" r="9"/><text class="step" x="{mx:.0}" y="{:.0}" text-anchor="middle">{}</text>"#,
                my + 4.0,
                n + 1
            ));
        }
    }
    let mut boxes: Vec<(Stage, Status, String)> = STAGES
        .iter()
        .map(|s| (*s, Status::Running, s.to_string()))
        .collect();
    for s in [
        Status::Skipped,
        Status::Failed,
        Status::Rejected,
        Status::Promoted,
        Status::RolledBack,
    ] {
        boxes.push((Stage::Done, s, s.as_str().replace('_', " ")));
    }
    let ended = taken
        .last()
        .filter(|t| t.to == Stage::Done)
        .map(|t| t.status);
    for (stage, status, label) in boxes {
        let (x, y) = place(stage, status);
        let here = if stage == Stage::Done {
            ended == Some(status)
        } else {
            at == Some(stage)
        };
        let passed = taken
            .iter()
            .any(|t| t.from == stage && stage != Stage::Done);
        let class = match (here, passed) {
            (true, _) => "stage here",
            (false, true) => "stage passed",
            _ => "stage",
        };
        svg.push_str(&format!(
            r#"<rect class="{class}" x="{x:.0}" y="{y:.0}" width="{}" height="{}" rx="6"/><text x="{:.0}" y="{:.0}" text-anchor="middle">{label}</text>"#,
            BOX.0,
            BOX.1,
            x + BOX.0 / 2.0,
            y + BOX.1 / 2.0 + 5.0
        ));
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_loop::Move;

    #[test]
    fn the_picture_has_a_move_for_each_row_and_marks_the_path() {
        let taken = [
            machine::next(Stage::Curate, Move::Train).unwrap(),
            machine::next(Stage::Train, Move::Evaluate).unwrap(),
            machine::next(Stage::Evaluate, Move::Reject).unwrap(),
        ];
        let svg = diagram(&taken, None);
        assert_eq!(svg.matches("<line ").count(), TABLE.len());
        assert_eq!(svg.matches(r#"class="move taken""#).count(), 3);
        // Numbered in the order the cycle took them.
        assert!(svg.contains(r#"text-anchor="middle">3</text>"#));
        // It ended rejected: that box is the one marked.
        let rejected = svg
            .split("<rect")
            .find(|r| r.contains(">rejected<"))
            .unwrap();
        assert!(rejected.contains("stage here"), "{rejected}");
        // A running cycle's stage is the one outlined.
        let svg = diagram(&taken[..1], Some(Stage::Train));
        let train = svg.split("<rect").find(|r| r.contains(">train<")).unwrap();
        assert!(train.contains("stage here"), "{train}");
    }
}
