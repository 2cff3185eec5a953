//! The loop: a team's feedback turned into a decision with no human step,
//! as one state machine. A cycle's stages, the moves between them and the
//! status each move leaves are one table ([`machine`]); each stage's job
//! reports what happened ([`cycle`]), the loop picks the move and says what
//! to queue next through [`Queue`], which the worker implements. The
//! decisions that change what a team is served (promotion, canaries,
//! rollback), by the loop or by a person, are [`decide`]; the canary's live
//! verdict is [`canary`]; whether a dataset holds enough held-out evidence
//! for the gate to judge a candidate trained on it is [`evidence`].
//!
//! It depends on the store and the evaluation only: the dashboard and the
//! command line act through it without the worker, and the worker runs the
//! jobs it queues.

pub mod canary;
pub mod cycle;
pub mod decide;
pub mod evidence;
pub mod machine;

pub use cycle::{LoopConfig, Queue, QueueError};
pub use machine::{IllegalMove, Move, TABLE, Transition};

use flywheel_store::{ErrorClass, StoreError};

/// What went wrong in the loop, classified for whoever asked.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// A version, team, cycle or evaluation that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow it now: the version is already the
    /// champion, a canary is running, nothing to roll back.
    #[error("{0}")]
    Conflict(String),
    /// Never allowed as asked: a model trained on another team's feedback.
    #[error("{0}")]
    Refused(String),
    /// A move the table does not list: a bug, reported rather than stalled.
    #[error(transparent)]
    Illegal(#[from] IllegalMove),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Putting the next stage's job on the queue failed.
    #[error("queueing the next stage: {0}")]
    Queue(#[source] QueueError),
    /// A cycle's stored settings could not be read back.
    #[error("the cycle's settings: {0}")]
    Config(#[from] serde_json::Error),
}

impl LoopError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotFound(_) => ErrorClass::NotFound,
            Self::Conflict(_) => ErrorClass::Conflict,
            Self::Refused(_) => ErrorClass::Refused,
            Self::Store(e) => e.class(),
            Self::Illegal(_) | Self::Queue(_) | Self::Config(_) => ErrorClass::Internal,
        }
    }
}

pub type Result<T, E = LoopError> = std::result::Result<T, E>;

/// Who made a decision the loop made by itself.
pub const LOOP_ACTOR: &str = "flywheel";
