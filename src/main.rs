//! The `compressd` binary: parse arguments, load settings, start logging, dispatch.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use compressd::cli::{self, Cli, Command};
use compressd::settings::Settings;
use compressd::{telemetry, Error};

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    // The client commands talk to a server: they need none of its settings.
    if cli.command.is_client() {
        return run_client(cli.command);
    }
    if matches!(cli.command, Command::Openapi) {
        print!("{}", compressd::api::openapi::yaml());
        return ExitCode::SUCCESS;
    }
    if matches!(cli.command, Command::Exec { .. } | Command::Run { .. }) {
        // The engine runs in this process: the process-wide settings the benchmarks use (see
        // `compressd_engine::perf`), before any thread starts.
        compressd_engine::perf::tune_threads();
        compressd_engine::perf::tune_allocator();
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("compressd: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings);
    if let Command::Exec { job } = cli.command {
        // A job's child process: stdout carries only protocol messages; logs go to stderr.
        tracing::debug!(%job, "running one job for a worker");
        let status = compressd::scheduler::exec::exec(
            std::io::stdin().lock(),
            &mut std::io::stdout().lock(),
        );
        return ExitCode::from(u8::try_from(status).unwrap_or(1));
    }
    tracing::info!(
        ?settings,
        version = env!("CARGO_PKG_VERSION"),
        "effective configuration"
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("compressd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::execute(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&error);
            ExitCode::FAILURE
        }
    }
}

fn run_client(command: Command) -> ExitCode {
    let Some((command, server)) = command.into_client() else {
        return ExitCode::FAILURE;
    };
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => ExitCode::from(runtime.block_on(cli::client::run(command, server))),
        Err(error) => {
            eprintln!("compressd: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Prints an error with its causes, and every spec violation on its own line.
fn report(error: &Error) {
    let mut message = format!("compressd: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    if let Error::InvalidSpec(violations) = error {
        for violation in violations {
            eprintln!(
                "  {}: {}",
                if violation.pointer.is_empty() {
                    "/"
                } else {
                    &violation.pointer
                },
                violation.message
            );
        }
    }
}
