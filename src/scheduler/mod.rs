//! The scheduler: workers that claim jobs under a lease, run each in a child process, and record
//! what happened; and the reaper that returns jobs of dead workers to the queue.
//!
//! A job runs on exactly one worker at a time: a claim increments the job's `attempt` and stamps
//! the worker's id and a lease expiry; every later write of that worker is conditioned on
//! (job, attempt, owner) ([`crate::store::Lease`]), so once the lease lapses and another worker
//! claims the job, the first one can change nothing. Workers heartbeat well inside the lease;
//! one whose heartbeat changes nothing kills its child at once.
//!
//! - [`worker`]: the claim loop (woken by queue notices, polling as fallback).
//! - [`attempt`]: one claimed attempt: child, heartbeats, cancel, outcome; [`forward`]: its writes.
//! - [`runner`]: spawning and stopping the child; [`protocol`]: what it says; [`exec`]: the child.
//! - [`exec`]: the child's entry; [`engine_run`]: its real run on the engine.
//! - [`inputs`]: a job's model and dataset as local paths; [`publish`]: its outputs as artifacts.
//! - [`plan`]: what a dry run computes.
//! - [`reaper`]: expired leases back to the queue, or failed after `max_attempts`.

pub mod attempt;
pub mod engine_run;
pub mod exec;
pub mod forward;
pub mod inputs;
pub mod metrics;
pub mod plan;
pub mod protocol;
pub mod publish;
pub mod reaper;
pub mod runner;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use metrics::SchedulerMetrics;
use tokio_util::sync::CancellationToken;

use crate::artifacts::ArtifactStore;
use crate::events::hub::EventHub;
use crate::settings::Settings;
use crate::store::Store;

/// Default time between heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Default lease: a worker silent for this long is presumed dead.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Default time a stopped child gets between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Default wait of an idle worker between polls when no notice woke it.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default back-off before a job's second attempt (doubles for each further one).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(5);
/// Default stderr lines kept from a child for its failure report.
pub const DEFAULT_LOG_TAIL_LINES: usize = 20;

/// How workers and the reaper behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs one worker process runs at once.
    pub concurrency: usize,
    /// Lease length.
    pub lease: Duration,
    /// Time between heartbeats (must be well under `lease`).
    pub heartbeat: Duration,
    /// Idle poll interval, the fallback when no notice arrives.
    pub poll_interval: Duration,
    /// SIGTERM-to-SIGKILL grace of a stopped child.
    pub stop_grace: Duration,
    /// Back-off before the second attempt.
    pub retry_backoff: Duration,
    /// Time between reaper passes.
    pub reap_interval: Duration,
    /// Folder under which each job gets its work folder (checkpoints), kept across attempts.
    pub work_dir: PathBuf,
    /// The binary run as `<executable> exec …` (normally this very binary).
    pub executable: PathBuf,
    /// Stderr lines kept from a child.
    pub log_tail_lines: usize,
    /// Where jobs are tracked in MLflow (see [`crate::tracking`]).
    pub tracking: crate::tracking::TrackingDefaults,
}

impl WorkerSettings {
    /// The defaults, with job work folders under `data_dir/work` and this binary as the child.
    ///
    /// # Errors
    /// When the path of the running binary cannot be found.
    pub fn with_defaults(data_dir: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            concurrency: 1,
            lease: DEFAULT_LEASE,
            heartbeat: DEFAULT_HEARTBEAT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            stop_grace: DEFAULT_STOP_GRACE,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            reap_interval: DEFAULT_HEARTBEAT,
            work_dir: data_dir.join("work"),
            executable: std::env::current_exe()?,
            log_tail_lines: DEFAULT_LOG_TAIL_LINES,
            tracking: crate::tracking::TrackingDefaults::default(),
        })
    }

    /// The settings' worker section, with job work folders under `data_dir/work` and this
    /// binary as the child. Reaper passes run every heartbeat interval.
    ///
    /// # Errors
    /// When the path of the running binary cannot be found.
    pub fn from_settings(settings: &Settings) -> std::io::Result<Self> {
        let secs = Duration::from_secs_f64;
        Ok(Self {
            concurrency: settings.worker_concurrency,
            lease: secs(settings.worker_lease_secs),
            heartbeat: secs(settings.worker_heartbeat_secs),
            poll_interval: secs(settings.worker_poll_interval_secs),
            stop_grace: secs(settings.worker_stop_grace_secs),
            retry_backoff: secs(settings.worker_retry_backoff_secs),
            reap_interval: secs(settings.worker_heartbeat_secs),
            tracking: crate::tracking::TrackingDefaults::from_settings(settings),
            ..Self::with_defaults(&settings.data_dir)?
        })
    }
}

/// What every attempt of one worker shares.
pub struct WorkerContext {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Where registered inputs are read from and job outputs are published to.
    pub artifacts: ArtifactStore,
    /// The process's notification hub.
    pub hub: EventHub,
    /// Settings.
    pub settings: WorkerSettings,
    /// This worker's lease owner id (host, pid and a random part).
    pub owner: String,
    /// Metrics.
    pub metrics: SchedulerMetrics,
}

impl WorkerContext {
    /// A context with a fresh owner id.
    pub fn new(
        store: Arc<dyn Store>,
        artifacts: ArtifactStore,
        hub: EventHub,
        settings: WorkerSettings,
        metrics: SchedulerMetrics,
    ) -> Self {
        Self {
            store,
            artifacts,
            hub,
            settings,
            owner: new_owner_id(),
            metrics,
        }
    }
}

/// Runs one worker and a reaper on `store` until `shutdown`, then waits for running attempts to
/// stop (their jobs go back to the queue).
pub async fn run(
    store: Arc<dyn Store>,
    artifacts: ArtifactStore,
    settings: WorkerSettings,
    metrics: SchedulerMetrics,
    shutdown: CancellationToken,
) {
    let hub = store.hub().clone();
    let ctx = Arc::new(WorkerContext::new(store, artifacts, hub, settings, metrics));
    let reaper = tokio::spawn(reaper::run_reaper(Arc::clone(&ctx), shutdown.clone()));
    worker::run_worker(ctx, shutdown).await;
    // The reaper only stops on shutdown; a join error would mean it panicked, already logged.
    let _ = reaper.await;
}

/// A lease owner id that is unique across hosts, processes and restarts.
pub fn new_owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &random[..8])
}
