//! The store as an [`EventSource`], and the JSON shape of an event that streams and lists share.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::follow::{EventSource, SourceFuture, StreamEvent};
use crate::store::{JobEvent, Store, EVENT_CANCELLED, EVENT_FAILED, EVENT_SUCCEEDED};

/// A job event as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventView {
    /// Sequence number: increasing, unique across all jobs; resume after it with `Last-Event-ID`.
    pub seq: i64,
    /// The job.
    pub job_id: Uuid,
    /// The attempt it belongs to (0 before the first claim).
    pub attempt: i32,
    /// `status`, `stage_started`, `progress`, `metric`, `log`, `artifact`, `stage_finished`,
    /// `queued`, `cancel_requested`, or a terminal `succeeded`, `failed`, `cancelled`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Details, by type.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

impl From<JobEvent> for EventView {
    fn from(event: JobEvent) -> Self {
        Self {
            seq: event.seq,
            job_id: event.job_id,
            attempt: event.attempt,
            event_type: event.event_type,
            payload: event.payload,
            created_at: event.created_at,
        }
    }
}

/// Whether an event of this type ends its job.
pub fn is_terminal(event_type: &str) -> bool {
    [EVENT_SUCCEEDED, EVENT_FAILED, EVENT_CANCELLED].contains(&event_type)
}

impl From<JobEvent> for StreamEvent {
    fn from(event: JobEvent) -> Self {
        let view = EventView::from(event);
        Self {
            seq: view.seq,
            kind: view.event_type.clone(),
            terminal: is_terminal(&view.event_type),
            // Serializing a plain struct of JSON-able fields cannot fail.
            data: serde_json::to_value(&view).unwrap_or_default(),
        }
    }
}

/// Reads events from the store.
#[derive(Debug, Clone)]
pub struct StoreEvents(pub Arc<dyn Store>);

impl EventSource for StoreEvents {
    fn events_after(&self, job_id: Uuid, after: i64, limit: u32) -> SourceFuture<'_> {
        Box::pin(async move {
            let events = self
                .0
                .list_events(job_id, after, limit)
                .await
                .map_err(|e| e.to_string())?;
            Ok(events.into_iter().map(StreamEvent::from).collect())
        })
    }
}
