//! Magnitude masks: keep the largest |w|, unstructured (global or per-layer threshold) or N:M.
//!
//! Masks are monotone across iterative steps: a weight pruned by an earlier step scores below every
//! live weight, so it stays pruned and each step only adds zeros.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::{compile_glob, MagnitudeConfig, MaskSet, Pattern, Scope};
use crate::error::{EngineError, Result};

/// Score of a weight pruned by an earlier step: below any |w|.
const PRUNED_SCORE: f32 = -1.0;

/// Computes keep-masks for `weights` (name, 2-D tensor) under `config`; `previous` masks (from
/// earlier steps of an iterative schedule) stay applied.
///
/// # Errors
/// Fails on an invalid config, a non-2-D weight, or an N:M pattern whose group width does not divide
/// a layer's input width (the error names the layer).
pub fn magnitude_masks(
    weights: &[(String, Tensor)],
    config: &MagnitudeConfig,
    previous: Option<&MaskSet>,
) -> Result<MaskSet> {
    config.validate()?;
    let mut scores = Vec::with_capacity(weights.len());
    for (name, w) in weights {
        let (rows, cols) = w.dims2().map_err(|_| {
            EngineError::InvalidSetting(format!(
                "{name}: only 2-D weights can be pruned, got {:?}",
                w.dims()
            ))
        })?;
        scores.push(layer_scores(name, w, previous)?);
        if let Pattern::NM { m, .. } = config.pattern {
            if cols % m != 0 {
                return Err(EngineError::InvalidSetting(format!(
                    "{name}: input width {cols} is not a multiple of {m}, so the N:{m} pattern cannot apply \
                     ({rows}×{cols}); exclude this layer"
                )));
            }
        }
    }
    let keep: Vec<Vec<bool>> = match config.pattern {
        Pattern::NM { n, m } => weights
            .iter()
            .zip(&scores)
            .map(|((_, w), s)| nm_mask(s, w.dim(1).unwrap_or(m), n, m))
            .collect(),
        Pattern::Unstructured => unstructured_keep(weights, &scores, config)?,
    };
    let mut masks = BTreeMap::new();
    for ((name, w), keep) in weights.iter().zip(keep) {
        let values: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(values, w.dims(), w.device())?.to_dtype(w.dtype())?;
        masks.insert(name.clone(), mask);
    }
    Ok(MaskSet::new(masks))
}

/// |w| as f32, with weights masked by `previous` scored [`PRUNED_SCORE`].
fn layer_scores(name: &str, w: &Tensor, previous: Option<&MaskSet>) -> Result<Vec<f32>> {
    let mut scores = w
        .abs()?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if let Some(mask) = previous.and_then(|p| p.get(name)) {
        let mask = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for (s, m) in scores.iter_mut().zip(mask) {
            if m == 0.0 {
                *s = PRUNED_SCORE;
            }
        }
    }
    Ok(scores)
}

/// Groups layers by the sparsity they must reach (overrides per layer; the rest pooled when the
/// scope is global) and prunes each group's smallest scores.
fn unstructured_keep(
    weights: &[(String, Tensor)],
    scores: &[Vec<f32>],
    config: &MagnitudeConfig,
) -> Result<Vec<Vec<bool>>> {
    let overrides = config
        .overrides
        .iter()
        .map(|(g, s)| Ok((compile_glob(g)?, *s)))
        .collect::<Result<Vec<_>>>()?;
    // Each group: the sparsity and the indices of its layers.
    let mut groups: Vec<(f64, Vec<usize>)> = Vec::new();
    let mut pooled = Vec::new();
    for (i, (name, _)) in weights.iter().enumerate() {
        match overrides.iter().find(|(g, _)| g.is_match(name)) {
            Some((_, s)) => groups.push((*s, vec![i])),
            None if config.scope == Scope::Global => pooled.push(i),
            None => groups.push((config.sparsity, vec![i])),
        }
    }
    if !pooled.is_empty() {
        groups.push((config.sparsity, pooled));
    }
    let mut keep: Vec<Vec<bool>> = scores.iter().map(|s| vec![true; s.len()]).collect();
    for (sparsity, layers) in groups {
        let members: Vec<&[f32]> = layers.iter().map(|&i| scores[i].as_slice()).collect();
        for (&i, layer_keep) in layers.iter().zip(prune_smallest(&members, sparsity)) {
            keep[i] = layer_keep;
        }
    }
    Ok(keep)
}

/// Keep-flags that drop exactly `round(sparsity · n)` of the smallest scores over all `layers`
/// together (ties broken by position, so the result is deterministic).
fn prune_smallest(layers: &[&[f32]], sparsity: f64) -> Vec<Vec<bool>> {
    let total: usize = layers.iter().map(|l| l.len()).sum();
    let to_prune = ((sparsity * total as f64).round() as usize).min(total);
    let mut out: Vec<Vec<bool>> = layers.iter().map(|l| vec![true; l.len()]).collect();
    if to_prune == 0 {
        return out;
    }
    let mut all: Vec<f32> = layers.iter().flat_map(|l| l.iter().copied()).collect();
    let (_, &mut threshold, _) = all.select_nth_unstable_by(to_prune - 1, f32::total_cmp);
    let below = layers
        .iter()
        .flat_map(|l| l.iter())
        .filter(|&&s| s < threshold)
        .count();
    let mut ties_left = to_prune - below;
    for (layer, keep) in layers.iter().zip(out.iter_mut()) {
        for (&s, k) in layer.iter().zip(keep.iter_mut()) {
            if s < threshold {
                *k = false;
            } else if s == threshold && ties_left > 0 {
                *k = false;
                ties_left -= 1;
            }
        }
    }
    out
}

/// Keep-flags keeping the `n` largest scores of every `m` consecutive values of each row of width
/// `cols` (`cols` a multiple of `m`).
pub fn nm_mask(scores: &[f32], cols: usize, n: usize, m: usize) -> Vec<bool> {
    let mut keep = vec![false; scores.len()];
    let mut order: Vec<usize> = Vec::with_capacity(m);
    for (g, group) in scores.chunks(m).enumerate() {
        debug_assert!(cols.is_multiple_of(m));
        order.clear();
        order.extend(0..group.len());
        // Largest first; ties keep the earlier weight.
        order.sort_by(|&a, &b| group[b].total_cmp(&group[a]).then(a.cmp(&b)));
        for &j in order.iter().take(n) {
            keep[g * m + j] = group[j] > PRUNED_SCORE;
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(pattern: Pattern, scope: Scope, sparsity: f64) -> MagnitudeConfig {
        MagnitudeConfig {
            pattern,
            scope,
            sparsity,
            overrides: vec![],
        }
    }

    fn zeros_of(mask: &Tensor) -> usize {
        mask.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .filter(|&&v| v == 0.0)
            .count()
    }

    #[test]
    fn global_threshold_prunes_the_smaller_layer_more() {
        let dev = Device::Cpu;
        let small = Tensor::arange(1f32, 17., &dev)
            .unwrap()
            .reshape((4, 4))
            .unwrap();
        let large = (small.clone() * 100.0).unwrap();
        let weights = vec![
            ("a.weight".to_string(), small),
            ("b.weight".to_string(), large),
        ];
        let masks = magnitude_masks(
            &weights,
            &config(Pattern::Unstructured, Scope::Global, 0.5),
            None,
        )
        .unwrap();
        assert_eq!(zeros_of(masks.get("a.weight").unwrap()), 16);
        assert_eq!(zeros_of(masks.get("b.weight").unwrap()), 0);
        let masks = magnitude_masks(
            &weights,
            &config(Pattern::Unstructured, Scope::PerLayer, 0.5),
            None,
        )
        .unwrap();
        assert_eq!(zeros_of(masks.get("a.weight").unwrap()), 8);
        assert_eq!(zeros_of(masks.get("b.weight").unwrap()), 8);
    }

    #[test]
    fn overrides_and_iterative_steps_are_monotone() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (8, 16), &dev).unwrap();
        let weights = vec![
            ("a.weight".to_string(), w.clone()),
            ("b.weight".to_string(), w),
        ];
        let mut cfg = config(Pattern::Unstructured, Scope::Global, 0.25);
        cfg.overrides = vec![("b.*".to_string(), 0.75)];
        let first = magnitude_masks(&weights, &cfg, None).unwrap();
        assert_eq!(zeros_of(first.get("a.weight").unwrap()), 32);
        assert_eq!(zeros_of(first.get("b.weight").unwrap()), 96);
        cfg.sparsity = 0.5;
        let second = magnitude_masks(&weights, &cfg, Some(&first)).unwrap();
        assert_eq!(zeros_of(second.get("a.weight").unwrap()), 64);
        let (m1, m2) = (
            first.get("a.weight").unwrap(),
            second.get("a.weight").unwrap(),
        );
        let still_kept_after_pruned = (m2 - m1)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            still_kept_after_pruned, 0.0,
            "a weight pruned in step 1 came back"
        );
    }

    #[test]
    fn two_four_keeps_two_largest_per_group_and_names_bad_layers() {
        let scores = [0.1f32, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(
            nm_mask(&scores, 8, 2, 4),
            vec![false, false, true, true, true, true, false, false]
        );
        let w = Tensor::ones((2, 6), DType::F32, &Device::Cpu).unwrap();
        let err = magnitude_masks(
            &[("odd.weight".into(), w)],
            &config(Pattern::NM { n: 2, m: 4 }, Scope::Global, 0.5),
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("odd.weight") && err.to_string().contains("multiple of 4"),
            "{err}"
        );
    }
}
