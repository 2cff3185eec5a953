//! Test support shared by every test that needs more than a function: the
//! end-to-end tests in this crate and the tests of the `flywheel` binary.
//! A fresh database per test ([`db`]), the gateway in process ([`gateway`])
//! or the binary as a process ([`process`]), an S3 stand-in ([`s3`]), a stand-in for an OpenAI-compatible server
//! ([`standin`]), the
//! tiny model's task for promotion and loop tests ([`tiny_task`]), the loop
//! on it with the shipped settings ([`tiny_loop`]), a slower copy of a
//! model that answers the same ([`slow_model`]), and waiting with a
//! deadline ([`wait`]).

pub mod admin;
pub mod db;
pub mod gateway;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod reference;
pub mod s3;
pub mod slow_model;
pub mod standin;
pub mod tiny_loop;
pub mod tiny_task;
pub mod wait;

pub use db::{TestDb, admin_url, fresh_database};
pub use gateway::{
    TestGateway, config, load_engine, model_cache, open_journal, real_engine, real_model,
    spawn_gateway,
};
pub use process::{
    GatewayProcess, Ran, TinySetup, cli, command, free_port, ready, run, spawn, synth, test_home,
};
pub use s3::S3;
pub use wait::{eventually, until};
