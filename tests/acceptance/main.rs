//! Real-data acceptance tests through the HTTP API (MiniLM on BBC News, fine-tuned, compressed and
//! LoRA-adapted; SmolLM2 on Shakespeare).
//! Each is `#[ignore]`d: it needs `../shared` and minutes of CPU; the attribute names the command.

#[path = "../acceptance_support/mod.rs"]
mod acceptance_support;
#[path = "../../engine/tests/gguf_generation/mod.rs"]
mod gguf_generation;

mod lora;
mod minilm;
mod minilm_distill;
mod minilm_dynamic;
mod minilm_loraprune;
mod minilm_qat;
mod minilm_static;
mod minilm_structured;
mod seed_pipeline;
mod smollm;
mod smollm_distill;
mod smollm_qlora;
mod smollm_structured;
mod walkthrough;
