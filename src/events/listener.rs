//! The Postgres side of the hub: one `LISTEN` connection per process, relayed to its [`EventHub`].
//!
//! Database triggers `NOTIFY` on commit whenever a job event is inserted, a job becomes claimable
//! or a cancel is requested (see the `worker_notifications` migration), so every process hears
//! about every job whichever process wrote it. When the connection drops, notifications sent in
//! the meantime are lost; the listener reconnects and publishes [`Notice::Resync`] so that every
//! stream re-reads from the table and every idle worker polls. Key revocations (`compressd_keys`)
//! make the API's key cache drop what it holds; while the connection is down it holds nothing.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::task::JoinHandle;

use super::hub::{
    parse_notification, EventHub, Notice, CANCEL_CHANNEL, EVENTS_CHANNEL, KEYS_CHANNEL,
    QUEUE_CHANNEL,
};

/// Wait before reconnecting after the listener's connection failed.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// The running listener; it stops when the last clone of its owner drops this.
#[derive(Debug)]
pub struct ListenerTask(JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts relaying notifications from `pool`'s database into `hub` until the returned task is
/// dropped.
pub fn spawn_listener(pool: PgPool, hub: EventHub) -> ListenerTask {
    ListenerTask(tokio::spawn(async move {
        loop {
            match listen(&pool, &hub).await {
                Ok(()) => tracing::warn!("postgres notification connection closed; reconnecting"),
                Err(error) => {
                    tracing::warn!(%error, "postgres notification listener failed; reconnecting")
                }
            }
            // Key revocations are not heard until LISTEN is back: no cached key is trusted.
            hub.set_key_changes_heard(false);
            hub.publish(Notice::Resync);
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    }))
}

/// Listens until the connection is lost (`Ok`) or cannot be made (`Err`).
async fn listen(pool: &PgPool, hub: &EventHub) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([EVENTS_CHANNEL, QUEUE_CHANNEL, CANCEL_CHANNEL, KEYS_CHANNEL])
        .await?;
    // Anything committed before LISTEN took effect was not heard: make followers catch up.
    hub.set_key_changes_heard(true);
    hub.publish(Notice::Resync);
    // try_recv returns None when the connection was lost, instead of silently reconnecting, so a
    // gap in notifications always leads to a Resync.
    while let Some(notification) = listener.try_recv().await? {
        if notification.channel() == KEYS_CHANNEL {
            hub.key_changed();
            continue;
        }
        match parse_notification(notification.channel(), notification.payload()) {
            Some(notice) => hub.publish(notice),
            None => tracing::debug!(channel = notification.channel(), "ignored notification"),
        }
    }
    Ok(())
}
