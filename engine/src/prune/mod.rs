//! Tensor-level magnitude pruning: which weights to prune, the masks, and what was achieved.
//!
//! The stage (`stages::prune`) decides when to prune; this module decides what: it picks the
//! prunable 2-D weights by name ([`select_targets`], with `exclude` globs), computes magnitude masks
//! for a target sparsity ([`magnitude_masks`]: unstructured with a global or per-layer threshold and
//! per-layer overrides, or N:M such as 2:4), applies them to a parameter store ([`MaskSet::apply`],
//! also called after every optimizer step of a recovery fine-tune so pruned weights stay zero), and
//! measures the result ([`sparsity_report`], [`verify_n_m`]).

mod magnitude;
mod masks;
pub mod structured;

pub use magnitude::{magnitude_masks, nm_mask};
pub use masks::{sparsity_report, verify_n_m, LayerSparsity, MaskSet, SparsityReport};

use globset::{Glob, GlobMatcher};

use crate::error::{EngineError, Result};
use crate::family::{ModuleMap, ModuleRole};

/// The highest sparsity accepted for unstructured pruning.
pub const MAX_SPARSITY: f64 = 0.95;

/// The module roles pruning leaves alone when a spec gives no `exclude`: embeddings, norms, the
/// pooler and the task head.
pub const DEFAULT_EXCLUDED_ROLES: &[ModuleRole] = &[
    ModuleRole::Embedding,
    ModuleRole::Norm,
    ModuleRole::Pooler,
    ModuleRole::TaskHead,
];

/// Which weights a stage leaves alone.
#[derive(Clone, Copy, Debug)]
pub enum Exclusion<'a> {
    /// The user's name globs.
    Globs(&'a [String]),
    /// The stage's default: weights of these roles in the model's module map.
    Roles(&'a ModuleMap, &'a [ModuleRole]),
}

/// Which weights may be removed together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Any weight.
    Unstructured,
    /// At most `n` non-zero weights in every `m` consecutive input weights of a row (2:4).
    NM {
        /// Weights kept per group.
        n: usize,
        /// Group width; the input width must be a multiple of it.
        m: usize,
    },
}

/// Whether the magnitude threshold is shared across layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One threshold over all targets: layers with smaller weights lose more.
    Global,
    /// Every layer reaches its own target.
    PerLayer,
}

/// A magnitude-pruning request for one step.
#[derive(Clone, Debug)]
pub struct MagnitudeConfig {
    /// The pattern.
    pub pattern: Pattern,
    /// The scope of the threshold (unstructured only).
    pub scope: Scope,
    /// Target share of zeros in `[0, MAX_SPARSITY]` (unstructured only).
    pub sparsity: f64,
    /// Per-layer targets overriding `sparsity` for names matching a glob (first match wins); the
    /// layers they match get their own threshold even with a global scope.
    pub overrides: Vec<(String, f64)>,
}

impl MagnitudeConfig {
    /// Checks the sparsity values.
    ///
    /// # Errors
    /// Fails when a sparsity lies outside `[0, MAX_SPARSITY]` or an override glob is invalid.
    pub fn validate(&self) -> Result<()> {
        let targets = std::iter::once(("sparsity", self.sparsity))
            .chain(self.overrides.iter().map(|(g, s)| (g.as_str(), *s)));
        for (what, sparsity) in targets {
            if !(0.0..=MAX_SPARSITY).contains(&sparsity) {
                return Err(EngineError::InvalidSetting(format!(
                    "{what}: sparsity {sparsity} is outside [0, {MAX_SPARSITY}]"
                )));
            }
        }
        for (glob, _) in &self.overrides {
            compile_glob(glob)?;
        }
        Ok(())
    }
}

/// The outcome of choosing prunable weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    /// Names of the weights to prune, sorted.
    pub names: Vec<String>,
    /// User globs that matched no parameter (to be reported as warning events).
    pub unmatched_globs: Vec<String>,
}

/// Picks the 2-D `*.weight` parameters not excluded by `exclude`.
///
/// `params` are `(name, shape)` pairs. A user glob that matches no parameter at all is reported in
/// [`Targets::unmatched_globs`].
///
/// # Errors
/// Fails when a glob is invalid.
pub fn select_targets<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    exclude: Exclusion<'_>,
) -> Result<Targets> {
    let globs: Vec<String> = match exclude {
        Exclusion::Globs(user) => user.to_vec(),
        Exclusion::Roles(..) => Vec::new(),
    };
    let by_role = |name: &str| match exclude {
        Exclusion::Roles(map, roles) => map.role_of(name).is_some_and(|r| roles.contains(&r)),
        Exclusion::Globs(_) => false,
    };
    let matchers = globs
        .iter()
        .map(|g| compile_glob(g))
        .collect::<Result<Vec<_>>>()?;
    let mut used = vec![false; matchers.len()];
    let mut names = Vec::new();
    for (name, shape) in params {
        let mut excluded = by_role(name);
        for (matcher, used) in matchers.iter().zip(used.iter_mut()) {
            if matcher.is_match(name) {
                *used = true;
                excluded = true;
            }
        }
        if !excluded && shape.len() == 2 && name.ends_with(".weight") {
            names.push(name.to_string());
        }
    }
    names.sort();
    let unmatched_globs = globs
        .into_iter()
        .zip(used)
        .filter(|(_, u)| !u)
        .map(|(g, _)| g)
        .collect();
    Ok(Targets {
        names,
        unmatched_globs,
    })
}

/// Compiles a name glob (`*` crosses dots: `encoder.*.query` matches every layer).
///
/// # Errors
/// Fails when the glob is malformed.
pub fn compile_glob(glob: &str) -> Result<GlobMatcher> {
    Glob::new(glob)
        .map(|g| g.compile_matcher())
        .map_err(|e| EngineError::InvalidSetting(format!("glob {glob:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_skip_embeddings_norms_heads_and_vectors() {
        use crate::family::{BertFamily, ModelFamily};
        let shapes: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![10, 4]),
            (
                "encoder.layer.0.attention.self.query.weight".into(),
                vec![4, 4],
            ),
            ("encoder.layer.0.attention.self.query.bias".into(), vec![4]),
            ("encoder.layer.0.output.LayerNorm.weight".into(), vec![4]),
            ("pooler.dense.weight".into(), vec![4, 4]),
            ("classifier.weight".into(), vec![2, 4]),
        ];
        let config = serde_json::json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 4,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
            "max_position_embeddings": 6});
        let names: Vec<String> = shapes.iter().map(|(n, _)| n.clone()).collect();
        let map = BertFamily.modules(&config, &names).unwrap();
        let params = shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
        let t = select_targets(params, Exclusion::Roles(&map, DEFAULT_EXCLUDED_ROLES)).unwrap();
        assert_eq!(t.names, vec!["encoder.layer.0.attention.self.query.weight"]);
        assert!(t.unmatched_globs.is_empty());
    }

    #[test]
    fn a_user_glob_matching_nothing_is_reported() {
        let shape = [4usize, 4];
        let params = [("a.weight", &shape[..]), ("b.weight", &shape[..])];
        let exclude = vec!["a.*".to_string(), "nothing.here.*".to_string()];
        let t = select_targets(params, Exclusion::Globs(&exclude)).unwrap();
        assert_eq!(t.names, vec!["b.weight"]);
        assert_eq!(t.unmatched_globs, vec!["nothing.here.*"]);
        assert!(select_targets(params, Exclusion::Globs(&["a[".to_string()])).is_err());
    }

    #[test]
    fn sparsity_is_bounded() {
        let config = |s| MagnitudeConfig {
            pattern: Pattern::Unstructured,
            scope: Scope::Global,
            sparsity: s,
            overrides: vec![],
        };
        assert!(config(0.95).validate().is_ok());
        assert!(config(0.96).validate().is_err());
        assert!(config(-0.1).validate().is_err());
    }
}
