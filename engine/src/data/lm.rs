//! Language-modelling corpora: plain text tokenized once and cut into fixed-length sequences.
//!
//! Sequences do not overlap; the trailing partial one is dropped so every sequence has the same
//! length (no padding, so every position is a real prediction). The last `validation_fraction` of
//! the sequences is held out: a contiguous tail of the text, so validation text is never seen in
//! training, even partly.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::{Example, TextEncoder};
use crate::{EngineError, Result};

/// How to chunk a corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmSpec {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Share of sequences (from the end of the text) held out for validation.
    pub validation_fraction: f64,
    /// Keep at most this many training sequences.
    pub max_train_samples: Option<usize>,
    /// Keep at most this many validation sequences.
    pub max_eval_samples: Option<usize>,
}

impl Default for LmSpec {
    fn default() -> Self {
        Self {
            seq_len: 256,
            validation_fraction: 0.05,
            max_train_samples: None,
            max_eval_samples: None,
        }
    }
}

/// A chunked corpus.
#[derive(Clone, Debug)]
pub struct LmCorpus {
    /// Training sequences.
    pub train: Vec<Example>,
    /// Held-out sequences.
    pub validation: Vec<Example>,
    /// Tokens in the whole text.
    pub total_tokens: usize,
}

impl LmCorpus {
    /// Reads a UTF-8 text file and chunks it.
    ///
    /// # Errors
    /// An I/O or tokenizer error, a bad spec, or a text too short for one sequence.
    pub fn load(path: &Path, spec: &LmSpec, encoder: &TextEncoder) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        Self::from_text(&text, spec, encoder).map_err(|e| match e {
            EngineError::InvalidSetting(m) if m.starts_with("corpus") => EngineError::Data {
                path: path.to_path_buf(),
                line: 0,
                message: m,
            },
            other => other,
        })
    }

    /// Tokenizes and chunks `text`.
    ///
    /// # Errors
    /// A tokenizer error, a bad spec, or a text too short for one sequence.
    pub fn from_text(text: &str, spec: &LmSpec, encoder: &TextEncoder) -> Result<Self> {
        if spec.seq_len < 2 {
            return Err(EngineError::InvalidSetting(
                "seq_len must be at least 2".into(),
            ));
        }
        if !(0.0..1.0).contains(&spec.validation_fraction) {
            return Err(EngineError::InvalidSetting(
                "validation_fraction must be in [0, 1)".into(),
            ));
        }
        let ids = encoder.encode_corpus(text)?;
        let chunks: Vec<Example> = ids
            .chunks_exact(spec.seq_len)
            .map(|c| Example {
                input_ids: c.to_vec(),
                label: None,
            })
            .collect();
        if chunks.is_empty() {
            return Err(EngineError::InvalidSetting(format!(
                "corpus has {} tokens, fewer than one sequence of {}",
                ids.len(),
                spec.seq_len
            )));
        }
        let held_out = (chunks.len() as f64 * spec.validation_fraction).round() as usize;
        let split_at = chunks.len() - held_out.min(chunks.len() - 1);
        let mut train = chunks;
        let mut validation = train.split_off(split_at);
        train.truncate(spec.max_train_samples.unwrap_or(usize::MAX));
        validation.truncate(spec.max_eval_samples.unwrap_or(usize::MAX));
        Ok(Self {
            train,
            validation,
            total_tokens: ids.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenize::tests::tiny_tokenizer;

    #[test]
    fn chunks_without_overlap_and_holds_out_the_tail() {
        let enc = TextEncoder::new(tiny_tokenizer(), 4, None).unwrap();
        // 11 tokens → two sequences of 5, one token dropped.
        let text = "the plot was awful a good film the movie was great";
        let spec = LmSpec {
            seq_len: 5,
            validation_fraction: 0.5,
            ..Default::default()
        };
        let corpus = LmCorpus::from_text(text, &spec, &enc).unwrap();
        assert_eq!(corpus.total_tokens, 11);
        assert_eq!(corpus.train.len(), 1);
        assert_eq!(corpus.train[0].input_ids, vec![10, 12, 13, 8, 11]);
        assert_eq!(corpus.validation[0].input_ids, vec![4, 9, 10, 6, 13]);
        assert!(corpus.train[0].label.is_none());
    }

    #[test]
    fn too_short_or_bad_spec_is_an_error() {
        let enc = TextEncoder::new(tiny_tokenizer(), 4, None).unwrap();
        let spec = LmSpec {
            seq_len: 50,
            ..Default::default()
        };
        assert!(LmCorpus::from_text("good film", &spec, &enc).is_err());
        let spec = LmSpec {
            seq_len: 1,
            ..Default::default()
        };
        assert!(LmCorpus::from_text("good film", &spec, &enc).is_err());
    }
}
