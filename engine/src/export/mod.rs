//! Writing models in formats other tools load: a Hugging Face folder (config.json,
//! model.safetensors, tokenizer files, label mapping) that transformers loads as the family's class
//! ([`HfArchitecture`]: the one place with each family's export names), and GGUF for Llama-style
//! models, LoRA adapters in PEFT's layout, and int8/int4 models in the compressed-tensors layout
//! (transformers, vLLM).

mod compressed_tensors;
mod gguf;
mod gguf_tokenizer;
mod hf;
mod peft;
mod transformers;

pub use compressed_tensors::{
    compressed_tensors_scheme, export_compressed_tensors, CompressedTensorsExport,
    COMPRESSED_TENSORS_DIR, COMPRESSED_TENSORS_VERSION,
};
pub use gguf::{export_llama_gguf, GgufExportOptions};
pub use gguf_tokenizer::{metadata_from_tokenizer_json, tokenizer_metadata};
pub use hf::{export_hf_folder, export_transformers_folder, TOKENIZER_FILES};
pub use peft::{export_peft_adapter, LoraExport};
pub use transformers::HfArchitecture;
