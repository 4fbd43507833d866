//! Tokenized examples, per-batch padding and deterministic epoch order.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids, special tokens included, already truncated.
    pub input_ids: Vec<u32>,
    /// Class id for classification; `None` for language modelling (the ids are the labels).
    pub label: Option<u32>,
}

/// A padded batch, ready for a forward pass. All tensors are u32 on the target device.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(batch, seq)` token ids, padded with the pad id.
    pub input_ids: Tensor,
    /// `(batch, seq)`: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(batch, seq)` zeros (single-segment inputs).
    pub token_type_ids: Tensor,
    /// `(batch,)` class ids for classification, or `(batch, seq)` token ids for language modelling.
    pub labels: Tensor,
}

impl Batch {
    /// Pads `examples` to the longest one and stacks them.
    ///
    /// Every example must have the same kind of label (all classes or all language modelling).
    ///
    /// # Errors
    /// An empty batch, mixed label kinds, or a tensor creation error.
    pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let Some(first) = examples.first() else {
            return Err(crate::EngineError::InvalidSetting(
                "cannot build an empty batch".into(),
            ));
        };
        let seq = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let n = examples.len();
        let mut ids = vec![pad_id; n * seq];
        let mut mask = vec![0u32; n * seq];
        for (row, e) in examples.iter().enumerate() {
            let base = row * seq;
            ids[base..base + e.input_ids.len()].copy_from_slice(&e.input_ids);
            mask[base..base + e.input_ids.len()]
                .iter_mut()
                .for_each(|m| *m = 1);
        }
        let input_ids = Tensor::from_vec(ids, (n, seq), device)?;
        let labels = if first.label.is_some() {
            let labels = examples
                .iter()
                .map(|e| {
                    e.label.ok_or_else(|| {
                        crate::EngineError::InvalidSetting("mixed label kinds in a batch".into())
                    })
                })
                .collect::<Result<Vec<u32>>>()?;
            Tensor::from_vec(labels, n, device)?
        } else {
            input_ids.clone()
        };
        Ok(Self {
            attention_mask: Tensor::from_vec(mask, (n, seq), device)?,
            token_type_ids: input_ids.zeros_like()?,
            input_ids,
            labels,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The order in which to visit `n` examples in `epoch`: a permutation fixed by `(seed, epoch)`, so a
/// resumed run replays exactly the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    // Mix the epoch into the seed with a large odd constant so neighbouring epochs are unrelated.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_row_only() {
        let a = Example {
            input_ids: vec![5, 6, 7],
            label: Some(1),
        };
        let b = Example {
            input_ids: vec![8],
            label: Some(0),
        };
        let batch = Batch::collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
        assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), vec![1, 0]);
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn language_modelling_labels_are_the_ids() {
        let a = Example {
            input_ids: vec![1, 2],
            label: None,
        };
        let batch = Batch::collate(&[&a], 9, &Device::Cpu).unwrap();
        assert_eq!(batch.labels.to_vec2::<u32>().unwrap(), vec![vec![1, 2]]);
        let c = Example {
            input_ids: vec![1],
            label: Some(3),
        };
        assert!(Batch::collate(&[&c, &a], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 7, 0);
        assert_eq!(a, epoch_order(50, 7, 0));
        assert_ne!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 8, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
}
