//! A job's own webhooks: where the service posts signed notices of the job's events.
//!
//! The engine only carries them (a job's spec is one document); the service checks each URL
//! against its network policy, signs and delivers.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The most webhooks one job may name.
pub const MAX_WEBHOOKS: usize = 8;

/// One webhook target of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// An `http` or `https` URL; loopback, link-local and private addresses are refused unless
    /// the operator allowed them (`allowed_private_networks`).
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// The events to send; by default the terminal ones (`job.succeeded`, `job.failed`,
    /// `job.cancelled`).
    #[serde(default = "WebhookEvent::terminal")]
    #[schemars(length(min = 1))]
    pub events: Vec<WebhookEvent>,
}

/// An event a webhook can subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum WebhookEvent {
    /// An attempt of the job started on a worker (once per attempt).
    #[serde(rename = "job.started")]
    JobStarted,
    /// A stage of the pipeline finished; the payload has its report.
    #[serde(rename = "stage.completed")]
    StageCompleted,
    /// The job succeeded.
    #[serde(rename = "job.succeeded")]
    JobSucceeded,
    /// The job failed for good.
    #[serde(rename = "job.failed")]
    JobFailed,
    /// The job was cancelled.
    #[serde(rename = "job.cancelled")]
    JobCancelled,
}

impl WebhookEvent {
    /// Every event, in the order they happen.
    pub const ALL: [WebhookEvent; 5] = [
        WebhookEvent::JobStarted,
        WebhookEvent::StageCompleted,
        WebhookEvent::JobSucceeded,
        WebhookEvent::JobFailed,
        WebhookEvent::JobCancelled,
    ];

    /// The events a webhook gets when it names none: the job's end, whichever it is.
    pub fn terminal() -> Vec<WebhookEvent> {
        vec![
            WebhookEvent::JobSucceeded,
            WebhookEvent::JobFailed,
            WebhookEvent::JobCancelled,
        ]
    }

    /// The name on the wire (the payload's `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::JobStarted => "job.started",
            WebhookEvent::StageCompleted => "stage.completed",
            WebhookEvent::JobSucceeded => "job.succeeded",
            WebhookEvent::JobFailed => "job.failed",
            WebhookEvent::JobCancelled => "job.cancelled",
        }
    }

    /// The event named `name`, if any.
    pub fn parse(name: &str) -> Option<WebhookEvent> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }
}
