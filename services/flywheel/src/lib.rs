//! The `flywheel` program as a library: the command line ([`cli`]), the
//! layered configuration ([`config`]), getting a database and a model ready
//! ([`bootstrap`]), running the gateway ([`serve`]), the job worker
//! ([`worker`]) or everything at once ([`up`]), and one module per command
//! group. `main.rs` only parses and
//! dispatches; tests drive these functions directly.
//!
//! SQL lives in `flywheel-store`, the model in `flywheel-model` and
//! `flywheel-engine`, jobs in `flywheel-jobs`: this crate wires them up.

pub mod admin;
pub mod artifacts;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod cycles;
pub mod datasets;
pub mod distill;
pub mod eval;
pub mod exit;
pub mod journal;
pub mod judges;
pub mod keys;
pub mod models;
pub mod pg;
pub mod serve;
pub mod teams;
pub mod telemetry;
pub mod train;
pub mod up;
pub mod worker;

pub use bootstrap::{connect_and_migrate, ensure_champion, ensure_local, pull, register};
pub use config::Config;
pub use serve::{load, serve, shutdown_signal};
