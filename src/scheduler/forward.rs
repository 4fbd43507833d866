//! Turns a child's messages into job events and progress, with fenced writes.
//!
//! Progress messages can come thousands of times a second from a training loop; the database
//! gets at most one progress write per [`PROGRESS_INTERVAL`] per job (the latest one wins, and a
//! pending one is flushed before any other event so the order stays true). Everything else is
//! written as it comes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::protocol::ChildMessage;
use crate::error::{Error, Result};
use crate::store::{JobProgress, Lease, Store};

/// Least time between two progress writes of one job (issue: at most 2 per second).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Writes one attempt's messages.
pub struct Forwarder {
    store: Arc<dyn Store>,
    lease: Lease,
    progress: JobProgress,
    pending_progress: bool,
    last_progress_write: Option<Instant>,
}

impl Forwarder {
    /// A forwarder for the attempt holding `lease`, for a pipeline of `stages` stages.
    pub fn new(store: Arc<dyn Store>, lease: Lease, stages: u32) -> Self {
        let progress = JobProgress {
            stages,
            ..JobProgress::default()
        };
        Self {
            store,
            lease,
            progress,
            pending_progress: false,
            last_progress_write: None,
        }
    }

    /// Records one message. Terminal messages are not written here (the attempt's outcome is).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the job is no longer this attempt's; other store errors.
    pub async fn forward(&mut self, message: ChildMessage) -> Result<()> {
        match message {
            ChildMessage::StageStarted {
                stage,
                index,
                stages,
            } => {
                self.flush().await?;
                self.progress.stage = Some(stage.clone());
                self.progress.stage_index = u32::try_from(index).ok();
                self.progress.stages = u32::try_from(stages).unwrap_or(u32::MAX);
                self.progress.fraction = index as f64 / stages.max(1) as f64;
                self.event(
                    "stage_started",
                    json!({ "stage": stage, "index": index, "stages": stages }),
                )
                .await?;
                self.write_progress().await
            }
            ChildMessage::Progress {
                fraction,
                eta_seconds,
                message,
            } => {
                let index = f64::from(self.progress.stage_index.unwrap_or(0));
                let stages = f64::from(self.progress.stages.max(1));
                self.progress.fraction =
                    ((index + fraction.clamp(0.0, 1.0)) / stages).clamp(0.0, 1.0);
                self.progress.eta_seconds = eta_seconds;
                if message.is_some() {
                    self.progress.message = message;
                }
                self.pending_progress = true;
                if self.progress_due() {
                    self.write_progress().await?;
                }
                Ok(())
            }
            ChildMessage::Metric { name, value, step } => {
                self.flush().await?;
                self.event(
                    "metric",
                    json!({ "name": name, "value": value, "step": step }),
                )
                .await
            }
            ChildMessage::Log { level, message } => {
                self.flush().await?;
                self.event("log", json!({ "level": level, "message": message }))
                    .await
            }
            ChildMessage::StageFinished {
                stage,
                index,
                report,
            } => {
                self.flush().await?;
                self.event(
                    "stage_finished",
                    json!({ "stage": stage, "index": index, "report": report }),
                )
                .await
            }
            ChildMessage::Succeeded { .. } | ChildMessage::Failed { .. } => self.flush().await,
        }
    }

    /// When the pending progress (if any) may be written; `None` when nothing is pending.
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.pending_progress.then(|| {
            self.last_progress_write
                .map_or_else(Instant::now, |t| t + PROGRESS_INTERVAL)
        })
    }

    /// Writes the pending progress, if any.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub async fn flush(&mut self) -> Result<()> {
        if self.pending_progress {
            self.write_progress().await?;
        }
        Ok(())
    }

    fn progress_due(&self) -> bool {
        self.last_progress_write
            .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL)
    }

    async fn write_progress(&mut self) -> Result<()> {
        self.store
            .update_progress(&self.lease, &self.progress)
            .await?;
        self.pending_progress = false;
        self.last_progress_write = Some(Instant::now());
        Ok(())
    }

    async fn event(&self, event_type: &str, payload: serde_json::Value) -> Result<()> {
        self.store
            .append_fenced_event(&self.lease, event_type, payload)
            .await
            .map(drop)
    }
}

/// Whether an error means this worker lost the job.
pub fn is_lease_lost(error: &Error) -> bool {
    matches!(error, Error::LeaseLost { .. })
}
