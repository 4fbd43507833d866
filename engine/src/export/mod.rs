//! Writing models in formats other tools load: a Hugging Face folder (config.json,
//! model.safetensors, tokenizer files, label mapping) and GGUF for Llama-style models.

mod gguf;
mod gguf_tokenizer;
mod hf;

pub use gguf::{export_llama_gguf, GgufExportOptions};
pub use gguf_tokenizer::{metadata_from_tokenizer_json, tokenizer_metadata};
pub use hf::{bert_classifier_tensor_names, export_bert_folder, export_hf_folder};
