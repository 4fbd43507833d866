//! Tokenization with truncation and no built-in padding.
//!
//! Some `tokenizer.json` files (MiniLM's among them) pad every input to a fixed length; that wastes
//! compute and, without masked pooling, changes embeddings. The encoder here turns padding off and
//! the batcher pads each batch to its own longest row instead.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::{EngineError, Result};

/// Tokens tried, in order, to find the padding id when the caller gives none.
const PAD_CANDIDATES: [&str; 4] = ["[PAD]", "<pad>", "<|endoftext|>", "</s>"];

/// A tokenizer set up for training data.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl TextEncoder {
    /// Loads `tokenizer.json` and truncates inputs to `max_length` tokens (special tokens included).
    ///
    /// # Errors
    /// An unreadable or invalid file, or `max_length == 0`.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(tokenizer, max_length, None)
    }

    /// Wraps a tokenizer; `pad_id` defaults to the id of the first known padding token, else 0.
    ///
    /// # Errors
    /// `max_length == 0` or a tokenizer that rejects the truncation settings.
    pub fn new(mut tokenizer: Tokenizer, max_length: usize, pad_id: Option<u32>) -> Result<Self> {
        if max_length == 0 {
            return Err(EngineError::InvalidSetting(
                "max_length must be at least 1".into(),
            ));
        }
        let pad_id = pad_id
            .or_else(|| tokenizer.get_padding().map(|p| p.pad_id))
            .or_else(|| PAD_CANDIDATES.iter().find_map(|t| tokenizer.token_to_id(t)))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
        })
    }

    /// The id used to pad batches.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The truncation length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The wrapped tokenizer (padding off, truncation on).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of each text, with special tokens, truncated.
    ///
    /// # Errors
    /// A tokenizer failure on some input.
    pub fn encode_all(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.to_vec();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Token ids of a long text, without special tokens and without truncation (for corpora).
    ///
    /// # Errors
    /// A tokenizer failure.
    pub fn encode_corpus(&self, text: &str) -> Result<Vec<u32>> {
        let mut plain = self.tokenizer.clone();
        plain
            .with_truncation(None)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        // Encode paragraph by paragraph: one multi-megabyte encode is slow and memory-hungry.
        let pieces: Vec<String> = text.split_inclusive("\n\n").map(str::to_owned).collect();
        let encodings = plain
            .encode_batch(pieces, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encodings
            .iter()
            .flat_map(|e| e.get_ids().iter().copied())
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny whitespace word-level tokenizer with BERT-style `[CLS] … [SEP]` wrapping and built-in
    /// fixed padding to 16 (which the encoder must turn off).
    pub(crate) fn tiny_tokenizer() -> Tokenizer {
        let json = r#"{
          "version": "1.0", "truncation": null,
          "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                      "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
          "added_tokens": [], "normalizer": {"type": "Lowercase"},
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
          "decoder": null,
          "model": {"type": "WordLevel", "unk_token": "[UNK]",
            "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5, "movie": 6,
                      "great": 7, "awful": 8, "film": 9, "the": 10, "a": 11, "plot": 12, "was": 13}}
        }"#;
        Tokenizer::from_bytes(json).expect("valid tokenizer json")
    }

    #[test]
    fn truncates_and_does_not_pad() {
        let enc = TextEncoder::new(tiny_tokenizer(), 4, None).unwrap();
        assert_eq!(enc.pad_id(), 0);
        let ids = enc
            .encode_all(&["good movie", "the plot was awful"])
            .unwrap();
        assert_eq!(ids[0], vec![2, 4, 6, 3]);
        assert_eq!(
            ids[1].len(),
            4,
            "truncated to max_length with special tokens"
        );
        assert_eq!(ids[1][0], 2);
        assert_eq!(*ids[1].last().unwrap(), 3);
    }

    #[test]
    fn corpus_encoding_is_not_truncated() {
        let enc = TextEncoder::new(tiny_tokenizer(), 4, None).unwrap();
        let ids = enc
            .encode_corpus("the plot was awful\n\na good film")
            .unwrap();
        assert_eq!(ids, vec![10, 12, 13, 8, 11, 4, 9]);
        assert!(TextEncoder::new(tiny_tokenizer(), 0, None).is_err());
    }
}
