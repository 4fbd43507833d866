//! compressd: an HTTP service that makes transformer models smaller and faster.
//!
//! This crate is the service shell around the `compressd-engine` crate: settings, storage, the
//! HTTP API, the CLI and (later) the scheduler. The binary in `main.rs` only parses arguments,
//! loads settings, starts logging and dispatches to [`cli`].

#![forbid(unsafe_code)]

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod error;
pub mod events;
pub mod inputs;
pub mod job_spec;
pub mod net_guard;
pub mod scheduler;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod tracking;
pub mod webhooks;

pub use error::{Error, Result};
