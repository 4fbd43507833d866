//! Datasets, tokenization and batching.
//!
//! Classification rows (JSONL or CSV with text and label) and language-modelling corpora (plain
//! text chunked into fixed-length sequences) are tokenized once, up front, with truncation but no
//! padding; batches are padded only to their own longest row. Shuffling and splits are
//! deterministic so a run can be reproduced and resumed exactly.

mod batch;
pub mod classification;
pub mod lm;
pub mod split;
pub mod tokenize;
pub mod vocabulary;

pub use batch::{epoch_order, Batch, Example};
pub use classification::{ClassificationData, ClassificationSpec, LabelMap};
pub use lm::{LmCorpus, LmSpec};
pub use split::{Split, SplitSummary};
pub use tokenize::TextEncoder;
