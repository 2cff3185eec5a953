//! What `flywheel` exits with, so a script or a CI step can act on a
//! decision:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done; a command that decides said yes (the gate passed, the cycle promoted) |
//! | 1 | an error: the command could not do what it was asked |
//! | 2 | the command line was wrong (clap's usage error) |
//! | 3 | the command ran and its decision is no: `flywheel eval` (the gate rejected the candidate), `flywheel loop` (the cycle ended rejected, rolled back or skipped), `flywheel judges check` (the judge does not agree with the users enough to be trusted) |

/// A command that decides said no; `main` exits with [`NO`] after printing
/// why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecidedNo(pub String);

pub const NO: u8 = 3;
