//! Webhook domain types: subscriptions, the outbox's deliveries and their attempts.
//!
//! Deliveries are written by the database itself, in the transaction that records the job event
//! (a trigger on `job_events`, in both backends' `*_webhooks.sql` migration), so no code path
//! that records an event can forget them. Delivery loops claim them with a lease, like workers
//! claim jobs (`crate::webhooks::delivery`).

use std::fmt;

use chrono::{DateTime, Utc};
use compressd_engine::spec::WebhookEvent;
use uuid::Uuid;

use crate::error::{Error, Result};

/// A subscription: a tenant's (`job_id` unset) or one job's own (from its spec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    /// UUID v7.
    pub id: Uuid,
    /// The owning tenant.
    pub tenant: String,
    /// The job whose spec named it; `None` for a tenant's webhook, which gets every job's events.
    pub job_id: Option<Uuid>,
    /// Where deliveries are posted.
    pub url: String,
    /// The events sent.
    pub events: Vec<WebhookEvent>,
    /// The signing secret, `whsec_` + base64.
    pub secret: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Where a delivery is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not delivered yet; due again at `next_attempt_at`.
    Pending,
    /// A 2xx answered.
    Delivered,
    /// Every attempt of the budget failed.
    Failed,
}

impl DeliveryStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// The status stored as `text`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for an unknown name.
    pub fn parse(text: &str) -> Result<Self> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| Error::Corrupt(format!("unknown delivery status `{text}`")))
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event to one webhook, as the outbox holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// Outbox row id; the `webhook-id` header is `msg_<id>`, the same on every attempt.
    pub id: i64,
    /// The subscription it came from.
    pub webhook_id: Uuid,
    /// The job's tenant.
    pub tenant: String,
    /// The job.
    pub job_id: Uuid,
    /// The job event it reports.
    pub event_seq: i64,
    /// The webhook event name, e.g. `job.succeeded`.
    pub event_type: String,
    /// Where it goes.
    pub url: String,
    /// The signing secret (never shown by the API after creation).
    pub secret: String,
    /// The exact JSON body that is signed and sent.
    pub body: String,
    /// Where it is.
    pub status: DeliveryStatus,
    /// Claims so far (the current attempt's number while claimed).
    pub attempts: i32,
    /// When it is due (while pending): the retry time, or the end of the current claim's lease.
    pub next_attempt_at: DateTime<Utc>,
    /// The delivery loop that holds the current claim.
    pub lease_owner: Option<String>,
    /// When the event was recorded.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl WebhookDelivery {
    /// The Standard Webhooks message id: stable across attempts, so receivers can deduplicate.
    pub fn message_id(&self) -> String {
        format!("msg_{}", self.id)
    }
}

/// One try at posting a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// The delivery.
    pub delivery_id: i64,
    /// Its number (the claim it was made under), from 1.
    pub attempt: i32,
    /// When the request started.
    pub started_at: DateTime<Utc>,
    /// When the answer (or the error) came.
    pub finished_at: DateTime<Utc>,
    /// The HTTP status; `None` when no response came.
    pub status_code: Option<i32>,
    /// What went wrong; `None` on a 2xx.
    pub error: Option<String>,
}

/// What becomes of a delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryNext {
    /// It was delivered.
    Delivered,
    /// Try again at this time.
    RetryAt(DateTime<Utc>),
    /// The budget is spent: failed for good.
    GiveUp,
}

impl DeliveryNext {
    /// The status this leaves the delivery in.
    pub fn status(self) -> DeliveryStatus {
        match self {
            DeliveryNext::Delivered => DeliveryStatus::Delivered,
            DeliveryNext::RetryAt(_) => DeliveryStatus::Pending,
            DeliveryNext::GiveUp => DeliveryStatus::Failed,
        }
    }
}

/// Which deliveries to list: a tenant's, of one job or one webhook, oldest first after `after`.
#[derive(Clone, Debug, Default)]
pub struct DeliveryFilter {
    /// Only this tenant's.
    pub tenant: String,
    /// Only this job's.
    pub job_id: Option<Uuid>,
    /// Only this webhook's.
    pub webhook_id: Option<Uuid>,
    /// The cursor: the id of the last delivery of the previous page.
    pub after: Option<i64>,
    /// Most rows returned.
    pub limit: u32,
}

/// A delivery with its attempts, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryLog {
    /// The delivery.
    pub delivery: WebhookDelivery,
    /// Its recorded attempts (an attempt whose process died before it answered has none).
    pub attempts: Vec<DeliveryAttempt>,
}

/// Events as stored: comma-wrapped (`,job.succeeded,job.failed,`) so a substring test matches
/// one name exactly.
pub fn events_to_text(events: &[WebhookEvent]) -> String {
    let names: Vec<&str> = events.iter().map(|e| e.as_str()).collect();
    format!(",{},", names.join(","))
}

/// The events of their stored text.
///
/// # Errors
/// [`Error::Corrupt`] for an unknown name.
pub fn events_from_text(text: &str) -> Result<Vec<WebhookEvent>> {
    text.split(',')
        .filter(|n| !n.is_empty())
        .map(|n| {
            WebhookEvent::parse(n)
                .ok_or_else(|| Error::Corrupt(format!("unknown webhook event `{n}`")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_text() {
        let events = WebhookEvent::ALL.to_vec();
        let text = events_to_text(&events);
        assert_eq!(
            text,
            ",job.started,stage.completed,job.succeeded,job.failed,job.cancelled,"
        );
        assert_eq!(events_from_text(&text).unwrap(), events);
        assert!(events_from_text(",job.exploded,").is_err());
    }
}
