//! The HTTP API driven in-process (and the `compressd` binary as a user runs it): one test
//! binary for every API resource, so CI links it once.

#[path = "../api_models_support/mod.rs"]
mod api_models_support;
#[path = "../common/mod.rs"]
mod common;
#[path = "../scheduler_support/mod.rs"]
mod scheduler_support;

mod access;
mod bad_input;
mod cli;
mod datasets;
mod deployment;
mod distill_models;
mod events_sse;
mod fuzz;
mod jobs;
mod models;
mod models_bad_input;
mod models_hf;
mod openapi;
mod serve;
mod shutdown;
mod webhooks;
