//! Background jobs on apalis with its Postgres storage, in the same database
//! as everything else: dataset curation and LoRA training runs (evaluation
//! and promotion to come), their schedules, and the worker that runs them. Each
//! job's step function is public so tests can run it directly.

pub mod artifacts;
pub mod curate;
pub mod queue;
pub mod schedule;
pub mod train;
pub mod worker;
