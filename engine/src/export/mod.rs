//! Writing models in formats other tools load: a Hugging Face folder (config.json,
//! model.safetensors, tokenizer files, label mapping) that transformers loads as the family's class
//! ([`HfArchitecture`]: the one place with each family's export names), and GGUF for Llama-style
//! models, and LoRA adapters in PEFT's layout.

mod gguf;
mod gguf_tokenizer;
mod hf;
mod peft;
mod transformers;

pub use gguf::{export_llama_gguf, GgufExportOptions};
pub use gguf_tokenizer::{metadata_from_tokenizer_json, tokenizer_metadata};
pub use hf::{export_hf_folder, export_transformers_folder, TOKENIZER_FILES};
pub use peft::{export_peft_adapter, LoraExport};
pub use transformers::HfArchitecture;
