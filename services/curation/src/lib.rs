//! Curation rules: the pure functions the dataset builder applies to every
//! example before anything is written. Each rule is deterministic, so the
//! same input always gives the same snapshot.
//!
//! No I/O: the database, files and the network belong to the callers.

pub mod build;
pub mod export;
pub mod minhash;
pub mod pii;
pub mod raters;
