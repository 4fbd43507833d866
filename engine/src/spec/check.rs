//! The violation collector every check of a spec writes into, with the range helpers stages share.

use super::Violation;

/// Most passes over the training split any training stage may ask for.
pub const MAX_EPOCHS: u32 = 1000;
/// Largest batch any training stage may ask for.
pub const MAX_BATCH_SIZE: u32 = 4096;

/// Collects violations, each at the JSON pointer of the offending field.
#[derive(Debug, Default)]
pub struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// The violations found, in the order they were found.
    pub fn into_violations(self) -> Vec<Violation> {
        self.violations
    }

    /// Records a violation.
    pub fn fail(&mut self, pointer: impl Into<String>, message: impl Into<String>) {
        self.violations.push(Violation {
            pointer: pointer.into(),
            message: message.into(),
        });
    }

    /// Records `message()` at `pointer` unless `ok`.
    pub fn check(&mut self, ok: bool, pointer: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(pointer, message());
        }
    }

    /// An integer in `min..=max`.
    pub fn range_u32(&mut self, value: u32, min: u32, max: u32, pointer: &str) {
        self.check((min..=max).contains(&value), pointer, || {
            format!("must be between {min} and {max}, got {value}")
        });
    }

    /// A learning rate: positive and at most 1 (anything above diverges for the optimizers we run).
    pub fn learning_rate(&mut self, value: f64, pointer: &str) {
        self.check(value > 0.0 && value <= 1.0, pointer, || {
            format!("must be in (0, 1], got {value}")
        });
    }

    /// A share in `[0, 1]`, or `[0, 1)` when `open_top`.
    pub fn unit_interval(&mut self, value: f64, pointer: &str, open_top: bool) {
        let ok = value >= 0.0 && if open_top { value < 1.0 } else { value <= 1.0 };
        let top = if open_top { ")" } else { "]" };
        self.check(ok, pointer, || {
            format!("must be in [0, 1{top}, got {value}")
        });
    }

    /// Parameter-name globs: none may be blank.
    pub fn globs(&mut self, globs: &[String], pointer: &str) {
        for (i, glob) in globs.iter().enumerate() {
            self.check(!glob.trim().is_empty(), &format!("{pointer}/{i}"), || {
                "must not be empty".to_owned()
            });
        }
    }
}
