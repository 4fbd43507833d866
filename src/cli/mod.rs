//! The command line: `serve`, `worker`, `migrate`, `keys`, `run`, `openapi`, and the client
//! commands `jobs`, `models`, `datasets` that talk to a server.

pub mod client;
pub mod keys;
pub mod progress;
pub mod run;

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use tokio_util::sync::CancellationToken;

use crate::artifacts::ArtifactStore;
use crate::error::{Error, Result};
use crate::scheduler::{self, SchedulerMetrics, WorkerSettings};
use crate::settings::Settings;
use crate::{server, store};

/// compressd: make transformer models smaller and faster, as a service or from the command line.
#[derive(Debug, Parser)]
#[command(name = "compressd", version, about, propagate_version = true)]
pub struct Cli {
    /// A TOML file overriding the built-in defaults (COMPRESSD_* variables override both).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process arguments; `serve --help` and `worker --help` list every setting's
    /// environment variable (taken from the documented defaults, so the list cannot go stale).
    pub fn parse_args() -> Self {
        let settings_help = settings_help();
        let command = Self::command()
            .mut_subcommand("serve", |c| c.after_long_help(settings_help.clone()))
            .mut_subcommand("worker", |c| c.after_long_help(settings_help));
        let matches = command.get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }
}

impl Command {
    /// Whether this is a client command (`jobs`, `models`, `datasets`), which needs no server
    /// settings.
    pub fn is_client(&self) -> bool {
        matches!(
            self,
            Command::Jobs { .. } | Command::Models { .. } | Command::Datasets { .. }
        )
    }

    /// A client command split from its server arguments; `None` for the server's own commands.
    pub fn into_client(self) -> Option<(client::ClientCommand, client::ServerArgs)> {
        match self {
            Command::Jobs { server, command } => {
                Some((client::ClientCommand::Jobs(command), server))
            }
            Command::Models { server, command } => {
                Some((client::ClientCommand::Models(command), server))
            }
            Command::Datasets { server, command } => {
                Some((client::ClientCommand::Datasets(command), server))
            }
            _ => None,
        }
    }
}

/// The settings' variables, as `compressd serve --help` shows them.
pub fn settings_help() -> String {
    let mut help = String::from(
        "Settings (config/default.toml documents each; a --config file overrides the defaults, \
         and these variables override both; list settings take comma-separated items):\n",
    );
    for key in Settings::keys() {
        help.push_str(&format!(
            "  {}{}\n",
            crate::settings::ENV_PREFIX,
            key.to_uppercase()
        ));
    }
    help
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (and, once built, an in-process worker).
    Serve {
        /// Serve the API only, leaving jobs to separate `compressd worker` processes.
        #[arg(long)]
        no_worker: bool,
    },
    /// Run jobs from the configured database, without the API.
    Worker,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage API keys in the configured database.
    Keys {
        /// What to do with keys.
        #[command(subcommand)]
        action: keys::KeysCommand,
    },
    /// Run one job spec locally, with no server: model and dataset are local paths.
    Run {
        /// The job spec (JSON).
        spec: PathBuf,
        /// Folder for the outputs (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print the OpenAPI document (YAML), as stored in openapi.yaml.
    Openapi,
    /// Client: submit, list, follow, cancel, delete and download jobs on a server.
    Jobs {
        /// Which server, and the output format.
        #[command(flatten)]
        server: client::ServerArgs,
        /// What to do.
        #[command(subcommand)]
        command: client::JobsCommand,
    },
    /// Client: register a model on a server (upload a folder, or a file://, s3://, hf:// URI).
    Models {
        /// Which server, and the output format.
        #[command(flatten)]
        server: client::ServerArgs,
        /// What to do.
        #[command(subcommand)]
        command: client::InputsCommand,
    },
    /// Client: register a dataset on a server (upload a file, or a file://, s3://, hf:// URI).
    Datasets {
        /// Which server, and the output format.
        #[command(flatten)]
        server: client::ServerArgs,
        /// What to do.
        #[command(subcommand)]
        command: client::InputsCommand,
    },
    /// Internal: run one job for a worker (request on stdin, progress messages on stdout).
    #[command(hide = true)]
    Exec {
        /// The job, for the process list and logs; the request on stdin is authoritative.
        #[arg(long)]
        job: uuid::Uuid,
    },
}

/// Runs a subcommand with loaded settings.
///
/// # Errors
/// Whatever the subcommand fails with; the binary prints it and exits non-zero.
pub async fn execute(command: Command, settings: Settings) -> Result<()> {
    match command {
        Command::Serve { no_worker } => serve(&settings, no_worker).await,
        Command::Worker => worker(&settings).await,
        Command::Migrate => {
            let store = store::connect(&settings).await?;
            store.migrate().await?;
            tracing::info!(backend = ?store.backend(), "migrations applied");
            Ok(())
        }
        Command::Keys { action } => keys::run(action, &settings).await,
        Command::Run { spec, out } => run::run_spec_file(&spec, &out),
        Command::Openapi => {
            print!("{}", crate::api::openapi::yaml());
            Ok(())
        }
        // `main` runs these without server settings; reaching here is a wiring mistake.
        Command::Exec { .. }
        | Command::Jobs { .. }
        | Command::Models { .. }
        | Command::Datasets { .. } => Err(Error::NotImplemented(
            "`exec` and the client commands run outside `execute`".into(),
        )),
    }
}

/// `compressd worker`: claims and runs jobs until SIGTERM or Ctrl-C, then hands running jobs back.
async fn worker(settings: &Settings) -> Result<()> {
    let store = store::connect(settings).await?;
    if settings.migrate_on_start {
        store.migrate().await?;
    }
    let worker_settings =
        WorkerSettings::from_settings(settings).map_err(|e| Error::io("current executable", e))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        stop.cancel();
    });
    let artifacts = ArtifactStore::from_settings(settings)?;
    scheduler::run(
        store,
        artifacts,
        worker_settings,
        SchedulerMetrics::default(),
        shutdown,
    )
    .await;
    Ok(())
}

async fn serve(settings: &Settings, no_worker: bool) -> Result<()> {
    let state = server::build_state(settings).await?;
    let shutdown = CancellationToken::new();
    let worker = if no_worker {
        tracing::info!("API only (--no-worker): jobs run in separate `compressd worker` processes");
        None
    } else {
        let worker_settings = WorkerSettings::from_settings(settings)
            .map_err(|e| Error::io("current executable", e))?;
        let (store, metrics) = (state.store.clone(), state.metrics.scheduler.clone());
        Some(tokio::spawn(scheduler::run(
            store,
            state.artifacts.clone(),
            worker_settings,
            metrics,
            shutdown.clone(),
        )))
    };
    let sweeper = (settings.orphan_sweep_interval_secs > 0).then(|| {
        crate::artifacts::sweep::spawn_sweeper(
            state.artifacts.clone(),
            state.store.clone(),
            Duration::from_secs(settings.orphan_sweep_age_secs),
            Duration::from_secs(settings.orphan_sweep_interval_secs),
        )
    });
    // Every API process delivers webhooks; replicas share the outbox through leases.
    let webhooks = tokio::spawn(crate::webhooks::delivery::run(
        state.store.clone(),
        crate::webhooks::DeliveryConfig::from_settings(settings),
        state.metrics.webhooks.clone(),
        shutdown.clone(),
    ));
    let address = server::listen_address(settings, state.config.access.mode);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| Error::io(address.to_string(), e))?;
    let stop = shutdown.clone();
    let signal = async move {
        server::shutdown_signal().await;
        stop.cancel();
    };
    let served = server::serve(
        listener,
        state,
        signal,
        Duration::from_secs(settings.shutdown_grace_secs),
    )
    .await;
    shutdown.cancel();
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    // An attempt cut short here is claimed again after its lease: nothing is lost.
    webhooks.abort();
    if let Some(worker) = worker {
        // Running jobs are stopped and handed back to the queue before the process exits.
        let _ = worker.await;
    }
    served
}
