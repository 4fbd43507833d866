//! GGUF loading (see the Llama model).
