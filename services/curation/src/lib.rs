//! Curation rules: the pure functions the dataset builder applies to every
//! example before anything is written. Each rule is deterministic, so the
//! same input always gives the same snapshot.

pub mod build;
pub mod export;
pub mod minhash;
pub mod pii;
