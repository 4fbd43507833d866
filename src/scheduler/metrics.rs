//! Queue and worker metrics, registered into the process's Prometheus registry.
//!
//! Queue depth by status is not kept here: it is read from the database at scrape time (see
//! [`crate::store::Store::count_jobs_by_status`]), so every replica reports the same truth.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::JobStatus;

type Labels = Vec<(&'static str, &'static str)>;

/// Counters and histograms of the scheduler and the event streams. Cheap to clone (shared cells).
#[derive(Clone, Debug)]
pub struct SchedulerMetrics {
    claims: Counter,
    lease_losses: Counter,
    reaped: Family<Labels, Counter>,
    attempt_seconds: Family<Labels, Histogram>,
    active_streams: Gauge,
    dropped_streams: Counter,
    queue_depth: Family<Labels, Gauge>,
    attempts_running: Gauge,
    stage_seconds: Family<Vec<(&'static str, String)>, Histogram>,
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        Self {
            claims: Counter::default(),
            lease_losses: Counter::default(),
            reaped: Family::default(),
            // 10 ms to about 3 days, ×4 per bucket: dry runs and week-long fine-tunes alike.
            attempt_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 4.0, 14))
            }),
            active_streams: Gauge::default(),
            dropped_streams: Counter::default(),
            queue_depth: Family::default(),
            attempts_running: Gauge::default(),
            stage_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 4.0, 14))
            }),
        }
    }
}

impl SchedulerMetrics {
    /// Registers every metric (the registry adds the `compressd_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "job_claims",
            "Jobs claimed by workers of this process",
            self.claims.clone(),
        );
        registry.register(
            "lease_losses",
            "Attempts that lost their lease to another worker",
            self.lease_losses.clone(),
        );
        registry.register(
            "jobs_reaped",
            "Jobs whose lease expired, by what the reaper did",
            self.reaped.clone(),
        );
        registry.register(
            "job_attempt_duration_seconds",
            "Wall time of job attempts run by this process, by the job's status after them",
            self.attempt_seconds.clone(),
        );
        registry.register(
            "sse_streams_active",
            "Open job event streams",
            self.active_streams.clone(),
        );
        registry.register(
            "sse_streams_dropped",
            "Event streams ended because the client did not read",
            self.dropped_streams.clone(),
        );
        registry.register(
            "jobs",
            "Jobs by status, read from the database at scrape time",
            self.queue_depth.clone(),
        );
        registry.register(
            "job_attempts_running",
            "Job attempts running in this process's workers now (busy worker slots)",
            self.attempts_running.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "Wall time of finished pipeline stages run by this process, by stage type",
            self.stage_seconds.clone(),
        );
    }

    /// Sets the jobs-by-status gauge; statuses missing from `counts` are set to 0.
    pub fn set_queue_depth(&self, counts: &[(JobStatus, i64)]) {
        for status in JobStatus::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            self.queue_depth
                .get_or_create(&vec![("status", status.as_str())])
                .set(n);
        }
    }

    /// A worker claimed a job.
    pub fn claimed(&self) {
        self.claims.inc();
    }

    /// An attempt found that it lost its lease.
    pub fn lease_lost(&self) {
        self.lease_losses.inc();
    }

    /// The reaper acted on a job; `outcome` is `requeued`, `failed` or `cancelled`.
    pub fn reaped(&self, outcome: &'static str) {
        self.reaped.get_or_create(&vec![("outcome", outcome)]).inc();
    }

    /// An attempt ended; `label` is the job's status after it, `lease_lost` or `record_failed`.
    pub fn attempt_finished(&self, label: &'static str, took: Duration) {
        self.attempt_seconds
            .get_or_create(&vec![("status", label)])
            .observe(took.as_secs_f64());
    }

    /// An attempt started; the guard counts it as running until dropped.
    pub fn attempt_started(&self) -> RunningGuard {
        self.attempts_running.inc();
        RunningGuard {
            gauge: self.attempts_running.clone(),
        }
    }

    /// A pipeline stage of type `stage` finished in `seconds`.
    pub fn stage_finished(&self, stage: &str, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.stage_seconds
                .get_or_create(&vec![("stage", stage.to_owned())])
                .observe(seconds);
        }
    }

    /// An event stream opened; the guard counts it until dropped.
    pub fn stream_opened(&self) -> StreamGuard {
        self.active_streams.inc();
        StreamGuard {
            gauge: self.active_streams.clone(),
        }
    }

    /// A stream was dropped for not reading.
    pub fn stream_dropped(&self) {
        self.dropped_streams.inc();
    }

    /// Open streams now (for tests and logs).
    pub fn active_streams(&self) -> i64 {
        self.active_streams.get()
    }

    /// Streams dropped so far for not reading.
    pub fn dropped_streams(&self) -> u64 {
        self.dropped_streams.get()
    }
}

/// Counts one running attempt while alive.
#[derive(Debug)]
pub struct RunningGuard {
    gauge: Gauge,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Counts one open stream while alive.
#[derive(Debug)]
pub struct StreamGuard {
    gauge: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
