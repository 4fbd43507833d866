//! Live job events: the notification hub, the Postgres listener that feeds it, and the follower
//! that turns a job's `job_events` rows into an exact, resumable stream.
//!
//! The `job_events` table is the source of truth; notifications only say when to read it.

pub mod follow;
pub mod hub;
pub mod listener;
pub mod source;

pub use follow::{follow, EventSource, FollowEnd, FollowLimits, StreamEvent};
pub use hub::{EventHub, Notice};
pub use source::{is_terminal, EventView, StoreEvents};
