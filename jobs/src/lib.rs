//! Background jobs on apalis with its Postgres storage, in the same database
//! as everything else: dataset curation and LoRA training runs (with their
//! backends behind one trait), their schedules, the artifact store, and the
//! worker that runs them. Each job's step function is public so tests can
//! run it directly.
//!
//! Jobs call the store for every SQL statement and the trainer for every
//! gradient; they serve no HTTP.

pub mod artifacts;
pub mod canary;
pub mod curate;
pub mod cycle;
pub mod evaluate;
pub mod faults;
pub mod promote;
pub mod queue;
pub mod schedule;
pub mod serving;
pub mod train;
pub mod worker;
