//! The worker: background jobs on apalis with its Postgres storage, in the
//! same database as everything else. Dataset curation, LoRA training runs
//! (with their backends behind one trait) and evaluations, their schedules,
//! the canary monitor, and the queue the loop puts its stages on
//! ([`stages::JobQueue`]). Each job's step function is public so tests can
//! run it directly; what a job's end means for its cycle is the loop's to
//! decide (`flywheel_loop`), not the job's.
//!
//! Jobs call the store for every SQL statement and the trainer for every
//! gradient; they serve no HTTP. Nothing but the binary depends on this
//! crate.

pub mod canary;
pub mod curate;
pub mod distill;
pub mod evaluate;
pub mod faults;
pub mod judge;
pub mod meters;
pub mod queue;
pub mod schedule;
pub mod stages;
pub mod train;
pub mod worker;
