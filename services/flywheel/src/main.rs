//! `flywheel`: one binary, a subcommand per part of the system. This file
//! parses the command line, sets up logs and traces (`flywheel::telemetry`)
//! and the runtime, hands over to the library (`flywheel::cli::run`) and
//! turns its result into the exit code (`flywheel::exit`).

use std::process::ExitCode;

use clap::Parser;

#[allow(unsafe_code)]
fn main() -> anyhow::Result<ExitCode> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle's element-wise pool spin-waits between ops and competes
        // with its own matmul threads on small machines (a training step:
        // 1.48 s instead of 1.33 on an idle 2-vCPU machine, much worse when
        // the machine is busy); matmuls still use every core.
        // SAFETY: no other thread exists yet to read the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let cli = flywheel::cli::Cli::parse();
    let telemetry = flywheel::telemetry::init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(flywheel::cli::run(cli));
    // A worker stopped past its grace period leaves its jobs behind, maybe
    // in blocking tasks: they are not waited for.
    runtime.shutdown_background();
    telemetry.shutdown();
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => match e.downcast_ref::<flywheel::exit::DecidedNo>() {
            Some(no) => {
                eprintln!("{no}");
                Ok(ExitCode::from(flywheel::exit::NO))
            }
            None => Err(e),
        },
    }
}
