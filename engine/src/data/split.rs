//! Train / validation / test splits.
//!
//! A row's `split` field wins when present. Otherwise the rule of the shared data sets applies:
//! a row is `test` when the first byte of sha256(utf-8 text) modulo 5 is 0. Validation rows are
//! carved from train by another byte of the same hash, so the choice depends only on the text,
//! never on file order, and is the same on every run.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which part of the data a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Used for training.
    Train,
    /// Held out from training for early stopping and model selection.
    Validation,
    /// Held out for the final report.
    Test,
}

impl Split {
    /// Parses a `split` field value (`train`, `validation`/`valid`/`val`/`dev`, `test`).
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "validation" | "valid" | "val" | "dev" | "eval" => Some(Split::Validation),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// The hash-based split of a row that carries no `split` field.
pub fn hashed_split(text: &str) -> Split {
    if Sha256::digest(text.as_bytes())[0] % 5 == 0 {
        Split::Test
    } else {
        Split::Train
    }
}

/// Whether a train row moves to validation, for a validation fraction in `[0, 1]` of train.
///
/// Uses bytes 1..3 of sha256(text), independent of byte 0 that picked test.
pub fn carve_validation(text: &str, fraction: f64) -> bool {
    let digest = Sha256::digest(text.as_bytes());
    let draw = u16::from_le_bytes([digest[1], digest[2]]) as f64 / 65536.0;
    draw < fraction
}

/// How many rows ended up in each split, and how validation was made (reported to the user).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSummary {
    /// Training rows (after caps).
    pub train: usize,
    /// Validation rows (after caps).
    pub validation: usize,
    /// Test rows (after caps).
    pub test: usize,
    /// Whether validation rows were carved from train (no row said `validation`).
    pub validation_carved_from_train: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_split_follows_the_shared_rule() {
        // sha256("hello")[0] = 0x2c = 44, 44 % 5 = 4 → train; sha256("a")[0] = 0xca = 202 → 2 → train.
        assert_eq!(hashed_split("hello"), Split::Train);
        let test_share = (0..1000)
            .filter(|i| hashed_split(&format!("row {i}")) == Split::Test)
            .count();
        assert!((150..250).contains(&test_share), "{test_share}");
    }

    #[test]
    fn carving_is_deterministic_and_near_the_fraction() {
        let carved = (0..2000)
            .filter(|i| carve_validation(&format!("row {i}"), 0.1))
            .count();
        assert!((150..250).contains(&carved), "{carved}");
        assert_eq!(carve_validation("same", 0.5), carve_validation("same", 0.5));
        assert!(!carve_validation("anything", 0.0));
    }

    #[test]
    fn parses_split_names() {
        assert_eq!(Split::parse(" Dev "), Some(Split::Validation));
        assert_eq!(Split::parse("test"), Some(Split::Test));
        assert_eq!(Split::parse("holdout"), None);
    }
}
