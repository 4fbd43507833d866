//! Workers: real `compressd exec` children claimed, cancelled, killed and loaded, and a tiny
//! pipeline run end to end; one test binary so CI links it once.

#[path = "../api_models_support/mod.rs"]
mod api_models_support;
#[path = "../common/mod.rs"]
mod common;
#[path = "../scheduler_support/mod.rs"]
mod scheduler_support;
#[path = "../../engine/tests/tiny_task/mod.rs"]
mod tiny_task;

mod cancel;
mod client;
mod dashboard;
mod disk_full;
mod inputs;
mod kill;
mod load;
mod logs;
mod mlflow;
mod object_faults;
mod oom;
mod pg_restart;
mod pipeline;
mod python_client;
mod served;
mod tiny_jobs;
