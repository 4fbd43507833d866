//! Masks applied to a parameter store, and the sparsity they achieve.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::params::{Param, ParamStore};

/// Keep-masks (1 keep, 0 pruned) by parameter name, same shape, dtype and device as the weights.
#[derive(Clone, Debug, Default)]
pub struct MaskSet {
    masks: BTreeMap<String, Tensor>,
}

impl MaskSet {
    /// Wraps masks by name.
    pub fn new(masks: BTreeMap<String, Tensor>) -> Self {
        Self { masks }
    }

    /// The mask of a parameter, if it has one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.masks.get(name)
    }

    /// Masked parameter names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.masks.keys().cloned().collect()
    }

    /// Zeroes the pruned weights in `store`, in place for trainable variables (so an optimizer
    /// holding them sees the change). Call it after pruning and after every optimizer step of a
    /// recovery fine-tune: the update moves pruned weights, this puts them back to zero.
    ///
    /// # Errors
    /// Fails when a masked parameter is missing or its shape differs from the mask.
    pub fn apply(&self, store: &ParamStore) -> Result<()> {
        for (name, mask) in &self.masks {
            let param = store.get(name).ok_or_else(|| {
                EngineError::InvalidModel(format!("masked parameter {name} is missing"))
            })?;
            match param {
                Param::Trainable(var) => {
                    let masked = var.as_tensor().mul(&mask.to_dtype(var.dtype())?)?;
                    var.set(&masked)?;
                }
                Param::Frozen(t) => {
                    let masked = t.mul(&mask.to_dtype(t.dtype())?)?;
                    store.insert(name.clone(), Param::Frozen(masked));
                }
            }
        }
        Ok(())
    }
}

/// Zeros in one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSparsity {
    /// Weights that are exactly zero.
    pub zeros: usize,
    /// All weights.
    pub total: usize,
    /// `zeros / total`.
    pub sparsity: f64,
}

/// Achieved sparsity per layer and over all the layers measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SparsityReport {
    /// By parameter name.
    pub layers: BTreeMap<String, LayerSparsity>,
    /// Over all measured layers together.
    pub overall: f64,
}

/// Counts exact zeros in the named parameters of `store`.
///
/// # Errors
/// Fails when a named parameter is missing.
pub fn sparsity_report(store: &ParamStore, names: &[String]) -> Result<SparsityReport> {
    let mut report = SparsityReport::default();
    let (mut zeros_all, mut total_all) = (0usize, 0usize);
    for name in names {
        let param = store
            .get(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("parameter {name} is missing")))?;
        let t = param.tensor();
        let zeros = t
            .eq(0f64)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as usize;
        let total = t.elem_count();
        zeros_all += zeros;
        total_all += total;
        let sparsity = if total == 0 {
            0.0
        } else {
            zeros as f64 / total as f64
        };
        report.layers.insert(
            name.clone(),
            LayerSparsity {
                zeros,
                total,
                sparsity,
            },
        );
    }
    report.overall = if total_all == 0 {
        0.0
    } else {
        zeros_all as f64 / total_all as f64
    };
    Ok(report)
}

/// Whether every group of `m` consecutive weights of each row of the 2-D `weight` has at most `n`
/// non-zeros (false when the width is not a multiple of `m`).
///
/// # Errors
/// Fails when `weight` is not 2-D.
pub fn verify_n_m(weight: &Tensor, n: usize, m: usize) -> Result<bool> {
    let (rows, cols) = weight.dims2()?;
    if m == 0 || cols % m != 0 {
        return Ok(false);
    }
    let nonzero = weight
        .ne(0f64)?
        .to_dtype(DType::F32)?
        .reshape((rows, cols / m, m))?
        .sum(2)?;
    let most = nonzero.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(most as usize <= n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn apply_zeroes_vars_in_place_and_the_report_counts_them() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], &dev).unwrap();
        let store = ParamStore::new();
        let var = Var::from_tensor(&w).unwrap();
        store.insert("l.weight", Param::Trainable(var.clone()));
        store.insert("f.weight", Param::Frozen(w.clone()));
        let mask = Tensor::new(&[[0f32, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]], &dev).unwrap();
        let masks = MaskSet::new(BTreeMap::from([
            ("l.weight".to_string(), mask.clone()),
            ("f.weight".to_string(), mask),
        ]));
        masks.apply(&store).unwrap();
        assert_eq!(
            var.as_tensor().to_vec2::<f32>().unwrap()[0],
            vec![0.0, 0.0, 3.0, 4.0]
        );
        let names = vec!["f.weight".to_string(), "l.weight".to_string()];
        let report = sparsity_report(&store, &names).unwrap();
        assert_eq!(report.layers["l.weight"].zeros, 4);
        assert!((report.overall - 0.5).abs() < 1e-12);
        assert!(verify_n_m(var.as_tensor(), 2, 4).unwrap());
        assert!(!verify_n_m(&w, 2, 4).unwrap());
        assert!(masks.apply(&ParamStore::new()).is_err());
    }
}
