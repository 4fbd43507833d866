//! `GET /v1/jobs/{id}/events`: a job's events, live as server-sent events or as a JSON page.
//!
//! With `Accept: text/event-stream` the answer is an SSE stream (`id` = seq, `event` = type,
//! `data` = the event as JSON) that replays the events after `Last-Event-ID` (or `?after=`) and
//! then follows the job live until its terminal event (see [`crate::events::follow`]). Otherwise
//! it is a page of events as JSON, cursor-paginated by seq.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;

use crate::api::error::{ApiError, Problem};
use crate::api::extract::{JobId, QueryPairs};
use crate::api::state::AppState;
use crate::auth::Caller;
use crate::events::{follow, EventView, FollowEnd, FollowLimits, StoreEvents, StreamEvent};
use crate::settings::Settings;
use crate::store::MAX_PAGE;

/// How event streams behave.
#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    /// Buffering and slow-client limits of each stream.
    pub limits: FollowLimits,
    /// Time between keep-alive comments on an idle stream.
    pub keepalive: Duration,
}

impl StreamConfig {
    /// The settings' event-stream section.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            limits: FollowLimits::from_settings(settings),
            keepalive: Duration::from_secs_f64(settings.events_keepalive_secs),
        }
    }
}

/// A page of events.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventList {
    /// Oldest first.
    pub events: Vec<EventView>,
    /// Pass as `after` for the next page; `null` when this page is the last.
    pub next: Option<i64>,
}

/// A job's events: an SSE stream that ends after the terminal event, or a JSON page.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = uuid::Uuid, Path, description = "The job"),
        ("after" = Option<i64>, Query, description = "Only events with a larger seq (default 0)"),
        ("limit" = Option<u32>, Query, description = "JSON page size, 1 to 100 (default 100)"),
        ("Last-Event-ID" = Option<i64>, Header, description = "SSE resume point; wins over `after`"),
    ),
    responses(
        (status = 200, description = "SSE stream (text/event-stream) or a page of events", body = EventList),
        (status = 400, description = "Malformed Last-Event-ID, after or limit", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn job_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobId(job_id): JobId,
    headers: HeaderMap,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.only(&["after", "limit"])?;
    let after = resume_point(&headers, &query)?;
    let limit = page_limit(&query)?;
    crate::api::access::owned_job(&state, &caller, job_id).await?;
    if wants_event_stream(&headers) {
        Ok(stream(&state, job_id, after).into_response())
    } else {
        let events = state.store.list_events(job_id, after, limit).await?;
        let next = (events.len() == limit as usize)
            .then(|| events.last().map(|e| e.seq))
            .flatten();
        let events = events.into_iter().map(EventView::from).collect();
        Ok(Json(EventList { events, next }).into_response())
    }
}

/// The seq to resume after: `Last-Event-ID` (what browsers send on reconnect), else `?after=`.
/// Both are validated when both are sent, so a malformed `after` is never silently ignored.
fn resume_point(headers: &HeaderMap, query: &QueryPairs) -> Result<i64, ApiError> {
    let after = match query.one("after")? {
        Some(raw) => Some(parse_seq("after", raw)?),
        None => None,
    };
    match headers.get("last-event-id") {
        Some(value) => parse_seq("Last-Event-ID", value.to_str().unwrap_or("<not text>")),
        None => Ok(after.unwrap_or(0)),
    }
}

fn parse_seq(source: &str, raw: &str) -> Result<i64, ApiError> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|seq| *seq >= 0)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid-last-event-id",
                format!("{source} must be a non-negative integer, got `{raw}`"),
            )
        })
}

fn page_limit(query: &QueryPairs) -> Result<u32, ApiError> {
    match query.one("limit")? {
        None => Ok(MAX_PAGE),
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_PAGE).contains(limit))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid-query",
                    format!("limit must be an integer from 1 to {MAX_PAGE}, got `{raw}`"),
                )
            }),
    }
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|accept| {
            accept
                .split(',')
                .any(|part| part.trim().starts_with("text/event-stream"))
        })
}

/// The SSE response: a follower's events, keep-alive comments, and bookkeeping of open and
/// dropped streams.
fn stream(state: &AppState, job_id: uuid::Uuid, after: i64) -> impl IntoResponse {
    let source = Arc::new(StoreEvents(Arc::clone(&state.store)));
    let (events, follower) = follow(
        source,
        state.store.hub(),
        job_id,
        after,
        state.config.events.limits,
    );
    let metrics = state.metrics.scheduler.clone();
    let open = metrics.stream_opened();
    tokio::spawn(async move {
        if let Ok(FollowEnd::SlowClient) = follower.await {
            tracing::info!(%job_id, "dropped an event stream whose client stopped reading");
            metrics.stream_dropped();
        }
    });
    let frames = ReceiverStream::new(events).map(move |event| {
        let _counted_while_open = &open;
        Ok::<_, Infallible>(frame(event))
    });
    Sse::new(frames).keep_alive(KeepAlive::new().interval(state.config.events.keepalive))
}

fn frame(event: StreamEvent) -> Event {
    Event::default()
        .id(event.seq.to_string())
        .event(event.kind)
        .data(event.data.to_string())
}
