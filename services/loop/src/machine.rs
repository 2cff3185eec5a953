//! The loop as one state machine. A cycle is at a [`Stage`]; the job of
//! that stage reports what happened, the loop picks a [`Move`], and
//! [`TABLE`] says where each move from each stage leads and how the cycle
//! then stands. [`apply`] is the only code that moves a cycle: a move the
//! table does not list is an error ([`IllegalMove`]), never a silent stall.
//!
//! `flywheel cycles show` and the dashboard draw the same table, with the
//! path a cycle took through it.

use flywheel_store::cycles::{self, Advance, Cycle, Stage, StageEnd, Status};
use flywheel_store::sqlx::PgConnection;
use serde::Serialize;

/// What the loop does next, given what a stage's job reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Move {
    /// The new dataset version holds enough new examples, and enough
    /// held-out evidence for the gate to judge a candidate: a run is queued.
    Train,
    /// Nothing worth training: no votes, too few new examples, another run
    /// on the base, or too little held-out evidence (the note says how much
    /// more is needed).
    Skip,
    /// The run left a candidate: its evaluation is queued.
    Evaluate,
    /// The candidate passed the offline gate: it serves a share of the
    /// team's end users while their thumbs compare it with the champion.
    Canary,
    /// The candidate becomes the champion: on the offline evidence when no
    /// canary is configured, or on the canary's live thumbs.
    Promote,
    /// The candidate failed the offline gate; the champion stays.
    Reject,
    /// The canary lost, ran out of time, was stopped by a person, or
    /// another version was promoted over it.
    RollBack,
    /// The stage's job gave up after its attempts, or its run was cancelled.
    Fail,
}

impl Move {
    pub const ALL: [Move; 8] = [
        Move::Train,
        Move::Skip,
        Move::Evaluate,
        Move::Canary,
        Move::Promote,
        Move::Reject,
        Move::RollBack,
        Move::Fail,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Skip => "skip",
            Self::Evaluate => "evaluate",
            Self::Canary => "canary",
            Self::Promote => "promote",
            Self::Reject => "reject",
            Self::RollBack => "roll_back",
            Self::Fail => "fail",
        }
    }
}

impl std::fmt::Display for Move {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the table: `by` from `from` leads to `to`, the cycle then
/// `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub from: Stage,
    pub by: Move,
    pub to: Stage,
    pub status: Status,
}

const fn t(from: Stage, by: Move, to: Stage, status: Status) -> Transition {
    Transition {
        from,
        by,
        to,
        status,
    }
}

/// Every move the loop may make. A cycle starts at `curate`, `running`,
/// and ends at `done` with the status of the move that ended it.
pub const TABLE: &[Transition] = &[
    t(Stage::Curate, Move::Train, Stage::Train, Status::Running),
    t(Stage::Curate, Move::Skip, Stage::Done, Status::Skipped),
    t(Stage::Curate, Move::Fail, Stage::Done, Status::Failed),
    t(
        Stage::Train,
        Move::Evaluate,
        Stage::Evaluate,
        Status::Running,
    ),
    t(Stage::Train, Move::Fail, Stage::Done, Status::Failed),
    t(
        Stage::Evaluate,
        Move::Canary,
        Stage::Canary,
        Status::Running,
    ),
    t(
        Stage::Evaluate,
        Move::Promote,
        Stage::Done,
        Status::Promoted,
    ),
    t(Stage::Evaluate, Move::Reject, Stage::Done, Status::Rejected),
    t(Stage::Evaluate, Move::Fail, Stage::Done, Status::Failed),
    t(Stage::Canary, Move::Promote, Stage::Done, Status::Promoted),
    t(
        Stage::Canary,
        Move::RollBack,
        Stage::Done,
        Status::RolledBack,
    ),
    t(Stage::Canary, Move::Fail, Stage::Done, Status::Failed),
];

/// The stages a cycle passes through while it runs, in order.
pub const STAGES: [Stage; 4] = [Stage::Curate, Stage::Train, Stage::Evaluate, Stage::Canary];

/// A move the table does not allow from that stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the loop has no move `{by}` from stage `{from}`")]
pub struct IllegalMove {
    pub from: Stage,
    pub by: Move,
}

/// Where `by` from `from` leads.
pub fn next(from: Stage, by: Move) -> Result<Transition, IllegalMove> {
    TABLE
        .iter()
        .find(|t| t.from == from && t.by == by)
        .copied()
        .ok_or(IllegalMove { from, by })
}

/// Moves running cycle `cycle` from `from` by `by`, recording `end` on it
/// and, when the move ends it, `reason`. `Ok(None)` when the cycle was no
/// longer at `from` (a job retried after its cycle moved on: nothing
/// changes); the transition made otherwise.
#[tracing::instrument(name = "cycle.move", skip_all, fields(cycle = %cycle, from = ?from, by = ?by))]
pub async fn apply(
    conn: &mut PgConnection,
    cycle: uuid::Uuid,
    from: Stage,
    by: Move,
    end: &StageEnd<'_>,
    reason: Option<&str>,
) -> Result<Option<Transition>, crate::LoopError> {
    let t = next(from, by)?;
    let moved = cycles::advance(
        &mut *conn,
        cycle,
        &Advance {
            from: t.from,
            by: by.as_str(),
            to: t.to,
            status: t.status,
            reason,
        },
        end,
    )
    .await?;
    if moved {
        tracing::info!(%cycle, from = %t.from, by = %by, to = %t.to, status = %t.status, "cycle moved");
    }
    Ok(moved.then_some(t))
}

/// The transitions a cycle took, in order (from its stages' recorded
/// moves), and the one it can take next while running.
pub fn path(c: &Cycle) -> Vec<Transition> {
    c.stage_records()
        .iter()
        .filter_map(|s| {
            let by = Move::ALL
                .into_iter()
                .find(|m| Some(m.as_str()) == s.by.as_deref())?;
            next(s.stage, by).ok()
        })
        .collect()
}

/// The table as text, one move a line, with `taken` marked (`*`) and the
/// stage `at` (a running cycle's) flagged: what `flywheel cycles show`
/// prints.
pub fn render_text(taken: &[Transition], at: Option<Stage>) -> String {
    let mut out = String::new();
    for t in TABLE {
        let mark = if taken.contains(t) {
            "*"
        } else if Some(t.from) == at {
            "?"
        } else {
            " "
        };
        let status = if t.to == Stage::Done {
            format!(" ({})", t.status)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  {mark} {:<9} --{:-<11}> {}{status}\n",
            t.from.as_str(),
            format!("{}-", t.by.as_str()),
            t.to.as_str()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test per row: the move from its stage leads where the table
    /// says, with the status it says.
    fn expect(from: Stage, by: Move, to: Stage, status: Status) {
        assert_eq!(
            next(from, by),
            Ok(Transition {
                from,
                by,
                to,
                status
            })
        );
    }

    #[test]
    fn curation_trains() {
        expect(Stage::Curate, Move::Train, Stage::Train, Status::Running);
    }

    #[test]
    fn curation_skips() {
        expect(Stage::Curate, Move::Skip, Stage::Done, Status::Skipped);
    }

    #[test]
    fn curation_fails() {
        expect(Stage::Curate, Move::Fail, Stage::Done, Status::Failed);
    }

    #[test]
    fn training_is_evaluated() {
        expect(
            Stage::Train,
            Move::Evaluate,
            Stage::Evaluate,
            Status::Running,
        );
    }

    #[test]
    fn training_fails() {
        expect(Stage::Train, Move::Fail, Stage::Done, Status::Failed);
    }

    #[test]
    fn evaluation_starts_a_canary() {
        expect(
            Stage::Evaluate,
            Move::Canary,
            Stage::Canary,
            Status::Running,
        );
    }

    #[test]
    fn evaluation_promotes() {
        expect(
            Stage::Evaluate,
            Move::Promote,
            Stage::Done,
            Status::Promoted,
        );
    }

    #[test]
    fn evaluation_rejects() {
        expect(Stage::Evaluate, Move::Reject, Stage::Done, Status::Rejected);
    }

    #[test]
    fn evaluation_fails() {
        expect(Stage::Evaluate, Move::Fail, Stage::Done, Status::Failed);
    }

    #[test]
    fn canary_promotes() {
        expect(Stage::Canary, Move::Promote, Stage::Done, Status::Promoted);
    }

    #[test]
    fn canary_rolls_back() {
        expect(
            Stage::Canary,
            Move::RollBack,
            Stage::Done,
            Status::RolledBack,
        );
    }

    #[test]
    fn canary_fails() {
        expect(Stage::Canary, Move::Fail, Stage::Done, Status::Failed);
    }

    #[test]
    fn a_move_the_table_does_not_list_is_refused() {
        // Skipping a cycle that already trained, promoting before an
        // evaluation, anything out of a finished cycle.
        for (from, by) in [
            (Stage::Train, Move::Skip),
            (Stage::Curate, Move::Promote),
            (Stage::Train, Move::Canary),
            (Stage::Canary, Move::Reject),
            (Stage::Done, Move::Fail),
            (Stage::Done, Move::Train),
        ] {
            assert_eq!(next(from, by), Err(IllegalMove { from, by }));
        }
        // Exactly the table's rows are allowed, out of every pair.
        let allowed = Stage::ALL
            .iter()
            .flat_map(|&s| Move::ALL.iter().map(move |&m| (s, m)))
            .filter(|&(s, m)| next(s, m).is_ok())
            .count();
        assert_eq!(allowed, TABLE.len());
    }

    #[test]
    fn every_running_stage_can_end_and_done_is_final() {
        for s in STAGES {
            assert!(next(s, Move::Fail).is_ok(), "{s} cannot fail");
            assert!(
                TABLE.iter().any(|t| t.from == s && t.to != s),
                "{s} leads nowhere"
            );
        }
        assert!(TABLE.iter().all(|t| t.from != Stage::Done));
        assert!(
            TABLE
                .iter()
                .all(|t| (t.to == Stage::Done) == (t.status != Status::Running)),
            "a cycle is running exactly until it is done"
        );
    }

    #[test]
    fn the_text_marks_the_path_taken() {
        let taken = [
            next(Stage::Curate, Move::Train).unwrap(),
            next(Stage::Train, Move::Evaluate).unwrap(),
        ];
        let text = render_text(&taken, Some(Stage::Evaluate));
        assert_eq!(text.lines().count(), TABLE.len());
        assert!(text.contains("* curate    --train------> train"), "{text}");
        assert!(
            text.contains("? evaluate  --reject-----> done (rejected)"),
            "{text}"
        );
        assert!(text.contains("  curate    --skip-------> done (skipped)"));
    }
}
