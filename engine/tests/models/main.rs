//! Model definitions: gradients, golden outputs against PyTorch, quantized layouts and exports;
//! one test binary so CI links it once.

mod export_bert;
mod export_gguf;
mod golden_minilm;
mod golden_smollm2;
mod grad;
mod quant_layout;
