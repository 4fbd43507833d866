//! Training: the optimizer, tiny BERT and Llama runs, and resuming from checkpoints; one test
//! binary so CI links it once.

#[path = "../train_support/mod.rs"]
mod train_support;

mod mixed_precision;
mod optimizer;
mod resume;
mod tiny_bert;
mod tiny_llama;
