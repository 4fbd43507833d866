//! Storage: the store contract suite and the scheduler's store calls on both backends, and the
//! artifact store (commit, download, S3, sweep); one test binary so CI links it once.

#[path = "../api_models_support/mod.rs"]
mod api_models_support;
#[path = "../common/mod.rs"]
mod common;
#[path = "../scheduler_support/mod.rs"]
mod scheduler_support;

mod access_contract;
mod artifacts_commit;
mod artifacts_download;
mod artifacts_s3;
mod artifacts_sweep;
mod contract;
mod scheduler;
mod webhooks_contract;
