//! Time and id sources, injected so tests can make rows deterministic.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, TimeZone, Utc};
use rand::{RngCore, SeedableRng};
use uuid::Uuid;

/// Where the service gets the current time and new row ids.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
    /// A new UUID v7: ids made later sort after ids made earlier.
    fn new_id(&self) -> Uuid;
}

/// The real clock and UUID v7 generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn new_id(&self) -> Uuid {
        // uuid's generator keeps a counter, so ids made within one millisecond still sort in order.
        Uuid::now_v7()
    }
}

/// A clock for tests: starts at a fixed instant and moves one millisecond per call, with ids from a
/// seeded generator.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicI64,
    rng: Mutex<rand::rngs::StdRng>,
}

impl ManualClock {
    /// A clock starting at `start`, with ids drawn from `seed`.
    pub fn new(start: DateTime<Utc>, seed: u64) -> Self {
        Self {
            millis: AtomicI64::new(start.timestamp_millis()),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: chrono::Duration) {
        self.millis
            .fetch_add(by.num_milliseconds(), Ordering::SeqCst);
    }

    fn tick(&self) -> i64 {
        self.millis.fetch_add(1, Ordering::SeqCst)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new(
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
                .single()
                .expect("valid date"),
            7,
        )
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        let millis = self.tick();
        Utc.timestamp_millis_opt(millis)
            .single()
            .expect("clock stays in chrono's range")
    }

    fn new_id(&self) -> Uuid {
        let millis = u64::try_from(self.tick()).expect("manual clock is after 1970");
        let mut random = [0u8; 10];
        // A poisoned lock only means another test thread panicked; the generator is still usable.
        self.rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fill_bytes(&mut random);
        uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
    }
}
