//! Following one job's events: replay from the table, then go live, without gaps or duplicates.
//!
//! The order of operations is what makes it exact: subscribe to the hub first, then read the
//! table after the client's last seq, then re-read after the last delivered seq whenever the hub
//! hints at something newer. Every delivered event has a seq greater than the one before, so an
//! event seen both in a read and in a later hint is sent once. This works because a job's events
//! commit in seq order (each writer locks the job's row before inserting its event).
//!
//! Each follower is a task that pushes into a small bounded channel which the HTTP response
//! drains. A client that stops reading fills the channel; after a timeout the follower gives up
//! and the stream ends, so a stuck client costs at most one full channel, and it can resume with
//! `Last-Event-ID`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::hub::{wait_for_job_events, EventHub, Wake};

/// One event as a stream delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// The event's sequence number (the SSE `id`).
    pub seq: i64,
    /// The event's type (the SSE `event`), e.g. `progress`.
    pub kind: String,
    /// The whole event as JSON (the SSE `data`).
    pub data: serde_json::Value,
    /// Whether this event ends the job (`succeeded`, `failed`, `cancelled`).
    pub terminal: bool,
}

/// A boxed future, as returned by [`EventSource`].
pub type SourceFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<StreamEvent>, String>> + Send + 'a>>;

/// Where followers read events from (the store, adapted).
pub trait EventSource: Send + Sync + 'static {
    /// Up to `limit` events of `job_id` with seq greater than `after`, in seq order. The error is
    /// a message for the log: a follower that cannot read ends its stream and the client resumes.
    fn events_after(&self, job_id: Uuid, after: i64, limit: u32) -> SourceFuture<'_>;
}

/// Limits of one follower.
#[derive(Debug, Clone, Copy)]
pub struct FollowLimits {
    /// Rows read per query while catching up.
    pub page_size: u32,
    /// Events buffered between the follower and the HTTP response.
    pub buffer: usize,
    /// How long a full buffer may stay full before the client is dropped.
    pub slow_client_timeout: Duration,
}

impl Default for FollowLimits {
    fn default() -> Self {
        Self {
            page_size: crate::store::MAX_PAGE,
            buffer: 64,
            slow_client_timeout: Duration::from_secs(10),
        }
    }
}

impl FollowLimits {
    /// The limits the settings give.
    pub fn from_settings(settings: &crate::settings::Settings) -> Self {
        Self {
            buffer: settings.events_stream_buffer,
            slow_client_timeout: Duration::from_secs_f64(settings.events_slow_client_timeout_secs),
            ..Self::default()
        }
    }
}

/// Why a follower ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowEnd {
    /// The job's terminal event was delivered.
    Terminal,
    /// The client went away.
    ClientGone,
    /// The client did not read for [`FollowLimits::slow_client_timeout`].
    SlowClient,
    /// Reading the table failed.
    SourceFailed,
    /// The process is shutting down.
    HubClosed,
}

/// Starts following `job_id` after `after_seq` (0 for the beginning). Events arrive on the
/// returned receiver; it closes when the follower ends, whose reason the handle returns.
pub fn follow(
    source: Arc<dyn EventSource>,
    hub: &EventHub,
    job_id: Uuid,
    after_seq: i64,
    limits: FollowLimits,
) -> (
    mpsc::Receiver<StreamEvent>,
    tokio::task::JoinHandle<FollowEnd>,
) {
    // Subscribe here, before the task's first read, so nothing committed in between is missed.
    let mut notices = hub.subscribe();
    let (tx, rx) = mpsc::channel(limits.buffer.max(1));
    let task = tokio::spawn(async move {
        let mut last_seq = after_seq;
        loop {
            if let Some(end) = deliver_new(&*source, job_id, &mut last_seq, &tx, limits).await {
                return end;
            }
            tokio::select! {
                wake = wait_for_job_events(&mut notices, job_id, last_seq) => {
                    if wake == Wake::Closed {
                        return FollowEnd::HubClosed;
                    }
                }
                () = tx.closed() => return FollowEnd::ClientGone,
            }
        }
    });
    (rx, task)
}

/// Reads and sends every event after `last_seq`; `Some` when the follower must end.
async fn deliver_new(
    source: &dyn EventSource,
    job_id: Uuid,
    last_seq: &mut i64,
    tx: &mpsc::Sender<StreamEvent>,
    limits: FollowLimits,
) -> Option<FollowEnd> {
    loop {
        let page = match source
            .events_after(job_id, *last_seq, limits.page_size)
            .await
        {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(%job_id, error, "event stream could not read the job's events");
                return Some(FollowEnd::SourceFailed);
            }
        };
        let full_page = page.len() >= limits.page_size as usize;
        for event in page {
            if event.seq <= *last_seq {
                continue;
            }
            *last_seq = event.seq;
            let terminal = event.terminal;
            match tokio::time::timeout(limits.slow_client_timeout, tx.send(event)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Some(FollowEnd::ClientGone),
                Err(_) => return Some(FollowEnd::SlowClient),
            }
            if terminal {
                return Some(FollowEnd::Terminal);
            }
        }
        if !full_page {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::events::hub::Notice;

    /// An in-memory event table.
    #[derive(Default)]
    struct Table(Mutex<Vec<StreamEvent>>);

    impl Table {
        fn append(&self, hub: &EventHub, job_id: Uuid, seq: i64, kind: &str) {
            let terminal = kind == "succeeded";
            let event = StreamEvent {
                seq,
                kind: kind.into(),
                data: serde_json::json!({ "seq": seq }),
                terminal,
            };
            self.0.lock().unwrap().push(event);
            hub.publish(Notice::Event { job_id, seq });
        }
    }

    impl EventSource for Table {
        fn events_after(&self, _job: Uuid, after: i64, limit: u32) -> SourceFuture<'_> {
            let rows: Vec<_> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.seq > after)
                .take(limit as usize)
                .cloned()
                .collect();
            Box::pin(async move { Ok(rows) })
        }
    }

    fn limits() -> FollowLimits {
        FollowLimits {
            page_size: 3,
            buffer: 4,
            slow_client_timeout: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn replays_then_goes_live_then_ends_after_the_terminal_event() {
        let hub = EventHub::new();
        let table = Arc::new(Table::default());
        let job = Uuid::now_v7();
        for seq in 1..=5 {
            table.append(&hub, job, seq, "log");
        }
        let (mut rx, task) = follow(table.clone(), &hub, job, 2, limits());
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(rx.recv().await.unwrap().seq);
        }
        table.append(&hub, job, 6, "progress");
        table.append(&hub, job, 7, "succeeded");
        while let Some(event) = rx.recv().await {
            seen.push(event.seq);
        }
        assert_eq!(seen, vec![3, 4, 5, 6, 7]);
        assert_eq!(task.await.unwrap(), FollowEnd::Terminal);
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_dropped_with_bounded_buffering() {
        let hub = EventHub::new();
        let table = Arc::new(Table::default());
        let job = Uuid::now_v7();
        for seq in 1..=100 {
            table.append(&hub, job, seq, "log");
        }
        let (rx, task) = follow(table.clone(), &hub, job, 0, limits());
        assert_eq!(task.await.unwrap(), FollowEnd::SlowClient);
        assert_eq!(
            rx.len(),
            limits().buffer,
            "only the buffer's worth was held"
        );
    }

    #[tokio::test]
    async fn a_client_that_leaves_ends_its_follower() {
        let hub = EventHub::new();
        let table = Arc::new(Table::default());
        let (rx, task) = follow(table, &hub, Uuid::now_v7(), 0, limits());
        drop(rx);
        assert_eq!(task.await.unwrap(), FollowEnd::ClientGone);
    }
}
