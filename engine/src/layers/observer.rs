//! Activation observers for quantization-aware training with per-tensor int8 inputs: each
//! fake-quantized layer keeps a moving average of the largest |x| its training batches bring,
//! quantizes its inputs with `that / 127` as the scale, and stops updating it (freezes) after a set
//! number of training batches, so the last steps train against the grid the exported static model
//! will use. The scales become the static int8 model's input scales.
//!
//! One [`ActivationObservers`] is shared by every layer of a model and by every rebuild of the
//! model during a stage (layers are rebuilt, the ranges must not be).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

/// Weight of a new batch's |x| maximum in the moving average. PyTorch's moving-average observer
/// uses 0.01 over long runs; a QAT stage here is often a hundred steps, so a batch weighs more.
pub const OBSERVER_MOMENTUM: f32 = 0.1;

/// One layer's observed input range.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ObservedRange {
    /// The moving average of the batches' largest |x| (the clip: inputs beyond it saturate).
    pub absmax: f32,
    /// Training batches observed (updates made).
    pub batches: u64,
    /// Whether the range stopped updating (after `freeze_after` batches).
    pub frozen: bool,
}

impl ObservedRange {
    /// The int8 scale of this range: `absmax / 127`, never zero.
    pub fn scale(&self) -> f32 {
        (self.absmax / 127.0).max(f32::MIN_POSITIVE)
    }
}

/// The observed input ranges of a model's fake-quantized layers, by module path.
#[derive(Debug, Default)]
pub struct ActivationObservers {
    /// Training batches after which each range stops updating; `None`: it never does.
    freeze_after: Option<u64>,
    ranges: Mutex<BTreeMap<String, ObservedRange>>,
}

impl ActivationObservers {
    /// Observers whose ranges freeze after `freeze_after` training batches (`None`: never).
    pub fn new(freeze_after: Option<u64>) -> Self {
        Self {
            freeze_after,
            ranges: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records a training batch's largest |x| at `path` (unless its range is frozen) and returns
    /// the scale to quantize the batch with.
    pub fn observe(&self, path: &str, batch_absmax: f32) -> f32 {
        let mut ranges = self.lock();
        let range = ranges
            .entry(path.to_string())
            .or_insert_with(|| ObservedRange {
                absmax: 0.0,
                batches: 0,
                frozen: false,
            });
        if !range.frozen && batch_absmax.is_finite() {
            if range.batches == 0 {
                range.absmax = batch_absmax;
            } else {
                range.absmax += OBSERVER_MOMENTUM * (batch_absmax - range.absmax);
            }
            range.batches += 1;
            range.frozen = self
                .freeze_after
                .is_some_and(|after| range.batches >= after);
        }
        range.scale()
    }

    /// The scale of `path`'s range so far; `None` before its first training batch.
    pub fn scale(&self, path: &str) -> Option<f32> {
        self.lock().get(path).map(ObservedRange::scale)
    }

    /// Every range observed, by module path.
    pub fn ranges(&self) -> BTreeMap<String, ObservedRange> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ObservedRange>> {
        // A panic while holding the lock leaves plain numbers behind: still usable.
        self.ranges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_averages_batches_then_freezes() {
        let observers = ActivationObservers::new(Some(3));
        assert_eq!(observers.scale("l"), None);
        assert_eq!(observers.observe("l", 127.0), 1.0);
        // 127 + 0.1 · (254 − 127) = 139.7
        let second = observers.observe("l", 254.0);
        assert!((second - 139.7 / 127.0).abs() < 1e-6, "{second}");
        let third = observers.observe("l", 127.0);
        let frozen_scale = observers.scale("l").unwrap();
        assert_eq!(third, frozen_scale);
        // Frozen after 3 batches: a larger batch no longer moves it.
        assert_eq!(observers.observe("l", 10_000.0), frozen_scale);
        let range = &observers.ranges()["l"];
        assert_eq!((range.batches, range.frozen), (3, true));
        // A non-finite batch never moves a range.
        let open = ActivationObservers::new(None);
        open.observe("m", f32::NAN);
        open.observe("m", 2.0);
        open.observe("m", f32::NAN);
        assert_eq!(open.ranges()["m"].absmax, 2.0);
        assert!(!open.ranges()["m"].frozen);
    }
}
