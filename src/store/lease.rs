//! Worker-side domain types: leases, what an attempt ended with, what the reaper did.
//!
//! Every write a worker makes is conditioned on its [`Lease`]: the job id, the attempt number it
//! claimed and its own owner id. When another worker has reclaimed the job (the lease expired and
//! the attempt moved on), such a write changes nothing and the store answers
//! [`crate::error::Error::LeaseLost`], so a worker that comes back from the dead writes nothing.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use super::types::{Job, JobError, JobStatus};
use super::EVENT_CANCELLED;

/// Event type of a status change that does not end the job (claimed, returned to the queue).
pub const EVENT_STATUS: &str = "status";
/// Terminal event type of a job that succeeded.
pub const EVENT_SUCCEEDED: &str = "succeeded";
/// Terminal event type of a job that failed.
pub const EVENT_FAILED: &str = "failed";

/// One claim on one job: the fence of every worker write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The job.
    pub job_id: Uuid,
    /// The attempt this claim started (1 for the first).
    pub attempt: i32,
    /// The claiming worker's id.
    pub owner: String,
}

/// What a successful heartbeat learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// Someone asked to cancel the job.
    pub cancel_requested: bool,
}

/// How an attempt ended, as the worker records it.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptOutcome {
    /// The job succeeded with this result object.
    Succeeded {
        /// The job's result.
        result: Value,
    },
    /// The job failed because of itself (bad input, unimplemented stage): no retry.
    Failed {
        /// Why.
        error: JobError,
    },
    /// The attempt failed for a reason outside the job (crash, OOM kill, worker shutdown): the
    /// job goes back to the queue after `backoff`, unless it has used all its attempts, in which
    /// case it fails with `error`.
    Retry {
        /// Why this attempt failed.
        error: JobError,
        /// How long the job waits before it can be claimed again.
        backoff: Duration,
    },
    /// The job was stopped on the user's request.
    Cancelled,
}

/// What the reaper did to one job whose lease had expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reaped {
    /// Returned to the queue for another attempt.
    Requeued {
        /// The job.
        job_id: Uuid,
        /// The attempt whose worker was lost.
        attempt: i32,
    },
    /// Failed for good: its attempts were used up.
    Failed {
        /// The job.
        job_id: Uuid,
        /// The last attempt.
        attempt: i32,
    },
    /// Cancelled: a cancel had been requested and its worker is gone.
    Cancelled {
        /// The job.
        job_id: Uuid,
    },
}

impl Reaped {
    /// What the reaper did, from the status it left `job_id` in.
    pub fn from_status(job_id: Uuid, attempt: i32, status: JobStatus) -> Self {
        match status {
            JobStatus::Queued => Self::Requeued { job_id, attempt },
            JobStatus::Cancelled => Self::Cancelled { job_id },
            _ => Self::Failed { job_id, attempt },
        }
    }
}

/// What ending an attempt writes: the job's new state and the event that says so. Both backends
/// apply the same decision, so they cannot disagree on retry rules.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Decision {
    /// The job's new status.
    pub status: JobStatus,
    /// Its result (succeeded only).
    pub result: Option<Value>,
    /// Its error: the cause of a failure, or of the last failed attempt of a requeued job.
    pub error: Option<JobError>,
    /// From now, how long until it may be claimed again (requeued only; zero otherwise).
    pub run_after: Duration,
    /// The event recorded.
    pub event_type: &'static str,
    /// Its payload.
    pub payload: Value,
}

/// Decides how `job` (still `running`, its row locked) moves on after `outcome`.
///
/// A retry becomes a cancel when a cancel was requested, and a failure when the job has used
/// its `max_attempts`.
pub(crate) fn decide(job: &Job, outcome: AttemptOutcome) -> Decision {
    let attempt = job.attempt;
    match outcome {
        AttemptOutcome::Retry { .. } if job.cancel_requested => {
            ended(attempt, JobStatus::Cancelled, None, None)
        }
        AttemptOutcome::Retry { error, .. } if attempt >= job.max_attempts => {
            let message = format!(
                "gave up after {attempt} attempts; the last one failed: {}",
                error.message
            );
            ended(
                attempt,
                JobStatus::Failed,
                None,
                Some(JobError {
                    code: error.code,
                    message,
                }),
            )
        }
        AttemptOutcome::Retry { error, backoff } => {
            let payload = json!({
                "status": "queued", "attempt": attempt, "error": error, "retry_in_seconds": backoff.as_secs_f64()
            });
            Decision {
                status: JobStatus::Queued,
                result: None,
                error: Some(error),
                run_after: backoff,
                event_type: EVENT_STATUS,
                payload,
            }
        }
        final_outcome => {
            final_decision(attempt, final_outcome).expect("every outcome but a retry is final")
        }
    }
}

/// The decision for an outcome that ends the job whatever else its row says (anything but a
/// retry), so a backend can write it without reading the row first. `None` for a retry.
pub(crate) fn final_decision(attempt: i32, outcome: AttemptOutcome) -> Option<Decision> {
    match outcome {
        AttemptOutcome::Succeeded { result } => {
            Some(ended(attempt, JobStatus::Succeeded, Some(result), None))
        }
        AttemptOutcome::Failed { error } => {
            Some(ended(attempt, JobStatus::Failed, None, Some(error)))
        }
        AttemptOutcome::Cancelled => Some(ended(attempt, JobStatus::Cancelled, None, None)),
        AttemptOutcome::Retry { .. } => None,
    }
}

/// A decision that finishes the job with `status` and its terminal event.
fn ended(
    attempt: i32,
    status: JobStatus,
    result: Option<Value>,
    error: Option<JobError>,
) -> Decision {
    let event_type = match status {
        JobStatus::Succeeded => EVENT_SUCCEEDED,
        JobStatus::Cancelled => EVENT_CANCELLED,
        _ => EVENT_FAILED,
    };
    let payload =
        json!({ "status": status.as_str(), "attempt": attempt, "result": result, "error": error });
    Decision {
        status,
        result,
        error,
        run_after: Duration::ZERO,
        event_type,
        payload,
    }
}

/// The back-off before attempt `next_attempt`: `base` doubled for each earlier retry, at most
/// 64 × `base`. Attempt 2 waits `base`.
pub fn retry_backoff(base: Duration, next_attempt: i32) -> Duration {
    let doublings = u32::try_from(next_attempt.saturating_sub(2))
        .unwrap_or(0)
        .min(6);
    base.saturating_mul(1 << doublings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_retry_and_is_capped() {
        let base = Duration::from_secs(5);
        assert_eq!(retry_backoff(base, 1), base);
        assert_eq!(retry_backoff(base, 2), base);
        assert_eq!(retry_backoff(base, 3), base * 2);
        assert_eq!(retry_backoff(base, 4), base * 4);
        assert_eq!(retry_backoff(base, 100), base * 64);
    }

    fn running_job(attempt: i32, max_attempts: i32, cancel_requested: bool) -> Job {
        let now = chrono::Utc::now();
        Job {
            id: Uuid::now_v7(),
            tenant: "default".into(),
            name: "j".into(),
            status: JobStatus::Running,
            spec: json!({}),
            model_id: None,
            dataset_id: None,
            priority: 0,
            attempt,
            max_attempts,
            run_after: now,
            lease_owner: Some("w".into()),
            lease_expires_at: Some(now),
            cancel_requested,
            idempotency_key: None,
            progress: None,
            result: None,
            error: None,
            created_at: now,
            started_at: Some(now),
            finished_at: None,
            updated_at: now,
        }
    }

    fn crash() -> AttemptOutcome {
        AttemptOutcome::Retry {
            error: JobError {
                code: "child_killed".into(),
                message: "killed".into(),
            },
            backoff: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_retry_requeues_with_backoff_while_attempts_remain() {
        let decision = decide(&running_job(1, 3, false), crash());
        assert_eq!(decision.status, JobStatus::Queued);
        assert_eq!(decision.run_after, Duration::from_secs(5));
        assert_eq!(decision.event_type, EVENT_STATUS);
        assert_eq!(decision.error.unwrap().code, "child_killed");
    }

    #[test]
    fn a_retry_on_the_last_attempt_fails_the_job_for_good() {
        let decision = decide(&running_job(3, 3, false), crash());
        assert_eq!(decision.status, JobStatus::Failed);
        assert_eq!(decision.event_type, EVENT_FAILED);
        assert!(decision
            .error
            .unwrap()
            .message
            .starts_with("gave up after 3 attempts"));
    }

    #[test]
    fn a_retry_of_a_job_with_a_cancel_request_cancels_it() {
        let decision = decide(&running_job(1, 3, true), crash());
        assert_eq!(decision.status, JobStatus::Cancelled);
        assert_eq!(decision.event_type, EVENT_CANCELLED);
    }

    #[test]
    fn success_keeps_the_result_and_clears_the_error() {
        let decision = decide(
            &running_job(2, 3, false),
            AttemptOutcome::Succeeded {
                result: json!({"metrics": {}}),
            },
        );
        assert_eq!(decision.status, JobStatus::Succeeded);
        assert_eq!(decision.result, Some(json!({"metrics": {}})));
        assert_eq!(decision.error, None);
        assert_eq!(decision.payload["attempt"], 2);
    }
}
