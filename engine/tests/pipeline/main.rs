//! Stages and pipelines: spec validation, pruning, the pipeline runner, the session's seams
//! (resume, gradients, teachers), exports checked in transformers, and tiny and real-data
//! pipelines end to end; one test binary so CI links it once.

#[path = "../gguf_generation/mod.rs"]
mod gguf_generation;
#[path = "../interop/mod.rs"]
mod interop;
#[path = "../tiny_task/mod.rs"]
mod tiny_task;

mod distill;
mod export_interop;
mod lora;
mod loraprune;
mod minilm;
mod runner;
mod session_seams;
mod smollm;
mod stages_prune;
mod stages_spec;
mod stages_structured;
mod tiny;
mod vocabulary;
