//! Stages and pipelines: spec validation, pruning, the pipeline runner, and tiny and real-data
//! pipelines end to end; one test binary so CI links it once.

#[path = "../gguf_generation/mod.rs"]
mod gguf_generation;
#[path = "../tiny_task/mod.rs"]
mod tiny_task;

mod minilm;
mod runner;
mod smollm;
mod stages_prune;
mod stages_spec;
mod tiny;
