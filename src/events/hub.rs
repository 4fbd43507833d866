//! The process's notification hub: one broadcast channel that tells event streams and workers
//! that something changed in the database.
//!
//! Notices are hints, never data: a stream that hears "job X has an event with seq N" reads the
//! rows from the `job_events` table, which stays the single source of truth. A hint that is lost
//! (a slow receiver lags, the Postgres listener reconnects) therefore costs a re-read, never an
//! event: [`Notice::Resync`] and a lagged receiver both mean "re-read everything you follow".
//!
//! Who feeds the hub: on Postgres, one `LISTEN` connection per process (see [`super::listener`])
//! relays the `NOTIFY`s that database triggers send on commit, so an API replica that did not run
//! a job still hears about it. On SQLite (one process), the store publishes after each commit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;
use uuid::Uuid;

/// How many notices the hub holds for its slowest receiver before that receiver lags (and
/// re-reads from the table). Notices are small (a few dozen bytes), so this bounds memory at a
/// fraction of a megabyte whatever the number of streams.
pub const HUB_CAPACITY: usize = 4096;

/// Something that changed in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A job event was committed.
    Event {
        /// The job it belongs to.
        job_id: Uuid,
        /// Its sequence number.
        seq: i64,
    },
    /// A job became claimable (created, or returned to the queue).
    Queued,
    /// Someone asked to cancel a running job.
    CancelRequested {
        /// The job.
        job_id: Uuid,
    },
    /// Notices may have been lost; every follower must re-read its state.
    Resync,
}

/// The hub: cheap to clone, shared by the store, the API's streams and the workers.
#[derive(Debug, Clone)]
pub struct EventHub {
    sender: broadcast::Sender<Notice>,
    keys: Arc<KeyChanges>,
}

/// What the hub knows of API key changes, for the API's key cache (`crate::api::access`): a
/// counter bumped whenever a key may have changed (a revocation heard, or notifications possibly
/// missed), and whether changes made by other processes are heard at all (the Postgres listener
/// is connected). A cache may only serve an entry read under the current count, and only while
/// changes are heard.
#[derive(Debug, Default)]
struct KeyChanges {
    epoch: AtomicU64,
    heard: AtomicBool,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    /// A hub with [`HUB_CAPACITY`].
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(HUB_CAPACITY);
        Self {
            sender,
            keys: Arc::default(),
        }
    }

    /// The count of possible API key changes so far (see [`EventHub::key_changed`]).
    pub fn keys_epoch(&self) -> u64 {
        self.keys.epoch.load(Ordering::SeqCst)
    }

    /// Says that an API key may have changed (revoked here or elsewhere): cached keys read before
    /// are stale.
    pub fn key_changed(&self) {
        self.keys.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether key changes made by other processes reach this one (the Postgres listener is
    /// connected). False on SQLite, where another process (`compressd keys revoke`) may change
    /// the file unheard.
    pub fn key_changes_heard(&self) -> bool {
        self.keys.heard.load(Ordering::SeqCst)
    }

    /// Records whether key changes made elsewhere are heard; either way what was cached before
    /// may be stale (changes may have been missed while not listening).
    pub fn set_key_changes_heard(&self, heard: bool) {
        self.key_changed();
        self.keys.heard.store(heard, Ordering::SeqCst);
        self.key_changed();
    }

    /// Sends a notice to every current subscriber. Having none is normal (no stream open).
    pub fn publish(&self, notice: Notice) {
        let _ = self.sender.send(notice);
    }

    /// Starts receiving notices published from now on. Subscribe *before* reading the table, so
    /// that nothing committed in between is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.sender.subscribe()
    }

    /// How many receivers are subscribed (streams plus workers).
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// What a follower should do after waiting on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Re-read from the table: there is (or may be) something new.
    Reread,
    /// The hub is gone (process shutting down).
    Closed,
}

/// Waits until the hub says that `job_id` may have events after `last_seq`.
pub async fn wait_for_job_events(
    rx: &mut broadcast::Receiver<Notice>,
    job_id: Uuid,
    last_seq: i64,
) -> Wake {
    loop {
        match rx.recv().await {
            Ok(Notice::Event { job_id: id, seq }) if id == job_id && seq > last_seq => {
                return Wake::Reread
            }
            Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                return Wake::Reread
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Closed) => return Wake::Closed,
        }
    }
}

/// Parses a `NOTIFY` from the database triggers into a notice; `None` for one we do not know.
///
/// Channels and payloads (see the migration that creates the triggers):
/// `compressd_events` with `"<job uuid>:<seq>"`, `compressd_queue` with any payload, and
/// `compressd_cancel` with `"<job uuid>"`.
pub fn parse_notification(channel: &str, payload: &str) -> Option<Notice> {
    match channel {
        EVENTS_CHANNEL => {
            let (job, seq) = payload.split_once(':')?;
            Some(Notice::Event {
                job_id: job.parse().ok()?,
                seq: seq.parse().ok()?,
            })
        }
        QUEUE_CHANNEL => Some(Notice::Queued),
        CANCEL_CHANNEL => Some(Notice::CancelRequested {
            job_id: payload.parse().ok()?,
        }),
        _ => None,
    }
}

/// Postgres channel announcing committed job events.
pub const EVENTS_CHANNEL: &str = "compressd_events";
/// Postgres channel announcing claimable jobs.
pub const QUEUE_CHANNEL: &str = "compressd_queue";
/// Postgres channel announcing cancel requests.
pub const CANCEL_CHANNEL: &str = "compressd_cancel";
/// Postgres channel announcing that an API key was revoked (payload: its id).
pub const KEYS_CHANNEL: &str = "compressd_keys";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse_and_bad_payloads_are_ignored() {
        let job = Uuid::now_v7();
        assert_eq!(
            parse_notification(EVENTS_CHANNEL, &format!("{job}:42")),
            Some(Notice::Event {
                job_id: job,
                seq: 42
            })
        );
        assert_eq!(parse_notification(QUEUE_CHANNEL, ""), Some(Notice::Queued));
        assert_eq!(
            parse_notification(CANCEL_CHANNEL, &job.to_string()),
            Some(Notice::CancelRequested { job_id: job })
        );
        assert_eq!(parse_notification(EVENTS_CHANNEL, "nonsense"), None);
        assert_eq!(
            parse_notification(EVENTS_CHANNEL, &format!("{job}:x")),
            None
        );
        assert_eq!(parse_notification("other", ""), None);
    }

    #[tokio::test]
    async fn a_waiter_wakes_only_for_newer_events_of_its_job_or_on_resync() {
        let hub = EventHub::new();
        let mut rx = hub.subscribe();
        let job = Uuid::now_v7();
        hub.publish(Notice::Event {
            job_id: Uuid::now_v7(),
            seq: 9,
        });
        hub.publish(Notice::Event {
            job_id: job,
            seq: 3,
        });
        hub.publish(Notice::Queued);
        hub.publish(Notice::Event {
            job_id: job,
            seq: 7,
        });
        assert_eq!(wait_for_job_events(&mut rx, job, 5).await, Wake::Reread);
        assert!(
            rx.is_empty(),
            "the newer event was consumed, the others skipped"
        );
        hub.publish(Notice::Resync);
        assert_eq!(wait_for_job_events(&mut rx, job, 100).await, Wake::Reread);
    }

    #[tokio::test]
    async fn a_lagging_waiter_rereads_instead_of_losing_events() {
        let hub = EventHub::new();
        let mut rx = hub.subscribe();
        let job = Uuid::now_v7();
        for seq in 0..(HUB_CAPACITY as i64 + 10) {
            hub.publish(Notice::Event {
                job_id: Uuid::now_v7(),
                seq,
            });
        }
        assert_eq!(wait_for_job_events(&mut rx, job, 0).await, Wake::Reread);
    }
}
