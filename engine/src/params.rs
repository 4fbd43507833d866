//! Named model parameters: trainable variables and frozen tensors in one store.
//!
//! Every model is built from a [`ParamStore`] through a candle [`VarBuilder`] (see
//! [`ParamStore::var_builder`]), so `vb.pp("encoder").get(..)` resolves the same dotted names as the
//! checkpoint. Whether a name becomes a trainable [`Var`] or a plain frozen [`Tensor`] is decided once,
//! when the store is made, by a predicate on the name: frozen weights never enter the autograd graph,
//! so backward does no work for them (the trainer's "frozen groups").
//!
//! A store can also create parameters a model asks for but the checkpoint lacks (a new
//! classification head, or a whole tiny random model in tests): see [`ParamStore::set_init_missing`].
//! They are drawn from a seeded RNG with the model's initialisation hint, so runs are reproducible.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One named parameter.
#[derive(Clone, Debug)]
pub enum Param {
    /// Updated by the optimizer; gradients flow to it.
    Trainable(Var),
    /// Used as is; no gradient is computed for it.
    Frozen(Tensor),
}

impl Param {
    /// The tensor to compute with (for a [`Var`], the tracked tensor).
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Trainable(v) => v.as_tensor(),
            Param::Frozen(t) => t,
        }
    }

    /// Whether the optimizer updates this parameter.
    pub fn is_trainable(&self) -> bool {
        matches!(self, Param::Trainable(_))
    }
}

/// A shared, ordered map from dotted parameter names to parameters.
///
/// Cloning is cheap (an `Arc`); clones see the same parameters.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    inner: Arc<RwLock<BTreeMap<String, Param>>>,
    /// When set, missing parameters are created (as trainable) from this RNG instead of failing.
    init_rng: Arc<Mutex<Option<ChaCha8Rng>>>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a store from loaded tensors; names for which `trainable` is true become [`Var`]s.
    ///
    /// # Errors
    /// Fails when a tensor cannot be turned into a variable (e.g. a non-float dtype).
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        trainable: impl Fn(&str) -> bool,
    ) -> candle_core::Result<Self> {
        let store = Self::new();
        for (name, tensor) in tensors {
            let param = if trainable(&name) {
                Param::Trainable(Var::from_tensor(&tensor)?)
            } else {
                Param::Frozen(tensor)
            };
            store.insert(name, param);
        }
        Ok(store)
    }

    /// Inserts or replaces a parameter.
    pub fn insert(&self, name: impl Into<String>, param: Param) {
        self.write().insert(name.into(), param);
    }

    /// Removes a parameter, returning it.
    pub fn remove(&self, name: &str) -> Option<Param> {
        self.write().remove(name)
    }

    /// The parameter with this name, if any.
    pub fn get(&self, name: &str) -> Option<Param> {
        self.read().get(name).cloned()
    }

    /// Whether a parameter with this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Names of all parameters, in sorted order.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// All trainable variables with their names, in sorted name order.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.read()
            .iter()
            .filter_map(|(n, p)| match p {
                Param::Trainable(v) => Some((n.clone(), v.clone())),
                Param::Frozen(_) => None,
            })
            .collect()
    }

    /// An independent copy: trainable parameters get new variables holding copies of their
    /// values, so training either store never changes the other (a teacher beside its student).
    /// Frozen tensors are shared: candle tensors are immutable and only variables change in place.
    ///
    /// # Errors
    /// Fails when a variable's values cannot be copied.
    pub fn deep_clone(&self) -> candle_core::Result<Self> {
        let params = self
            .read()
            .iter()
            .map(|(name, param)| {
                let copy = match param {
                    Param::Trainable(var) => {
                        Param::Trainable(Var::from_tensor(&var.as_tensor().copy()?)?)
                    }
                    Param::Frozen(tensor) => Param::Frozen(tensor.clone()),
                };
                Ok((name.clone(), copy))
            })
            .collect::<candle_core::Result<BTreeMap<_, _>>>()?;
        Ok(Self {
            inner: Arc::new(RwLock::new(params)),
            init_rng: Arc::new(Mutex::new(None)),
        })
    }

    /// All parameters as tensors (current values), in sorted name order; used for export.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.read()
            .iter()
            .map(|(n, p)| (n.clone(), p.tensor().clone()))
            .collect()
    }

    /// Freezes (`trainable = false`) or unfreezes the named parameters, keeping their values.
    ///
    /// # Errors
    /// Fails when a tensor cannot be turned into a variable.
    pub fn set_trainable(
        &self,
        pred: impl Fn(&str) -> bool,
        trainable: bool,
    ) -> candle_core::Result<()> {
        let mut map = self.write();
        for (name, param) in map.iter_mut() {
            if !pred(name) || param.is_trainable() == trainable {
                continue;
            }
            *param = if trainable {
                Param::Trainable(Var::from_tensor(param.tensor())?)
            } else {
                Param::Frozen(param.tensor().detach())
            };
        }
        Ok(())
    }

    /// Total number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.read().values().map(|p| p.tensor().elem_count()).sum()
    }

    /// With `Some(seed)`, parameters a model asks for but the store lacks are created as trainable
    /// variables, drawn with the model's initialisation hint from an RNG seeded with `seed`; with
    /// `None` (the default), a missing parameter is an error.
    pub fn set_init_missing(&self, seed: Option<u64>) {
        *self.init_rng.lock().unwrap_or_else(|e| e.into_inner()) =
            seed.map(ChaCha8Rng::seed_from_u64);
    }

    /// Creates `name` from `init` when missing-parameter creation is on; `None` when it is off.
    fn init_missing(
        &self,
        name: &str,
        shape: &Shape,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut guard = self.init_rng.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rng) = guard.as_mut() else {
            return Ok(None);
        };
        let values = sample_init(rng, shape, init);
        let tensor = Tensor::from_vec(values, shape.clone(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&tensor)?;
        self.insert(name, Param::Trainable(var.clone()));
        Ok(Some(var.as_tensor().clone()))
    }

    /// A candle `VarBuilder` that reads from this store (dtype and device of the stored tensors are
    /// converted to the requested ones only when they differ).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Param>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Param>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Values for a new parameter following candle's initialisation hint.
fn sample_init(rng: &mut ChaCha8Rng, shape: &Shape, init: Init) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n)
            .map(|_| rng.gen_range(lo..up.max(lo + f64::EPSILON)) as f32)
            .collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * standard_normal(rng)) as f32)
            .collect(),
        Init::Kaiming { .. } => {
            // Kaiming-uniform with unit gain, as PyTorch's nn.Linear default: bound = 1/sqrt(fan_in).
            let fan_in: usize = shape.dims().iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| rng.gen_range(-bound..bound) as f32)
                .collect()
        }
    }
}

/// One standard normal draw (Box–Muller; `1 - u` keeps the logarithm finite).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.contains(name) {
            if let Some(tensor) = self.init_missing(name, &shape, init, dtype, dev)? {
                return Ok(tensor);
            }
        }
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "parameter {name} has shape {:?}, the model expects {:?}",
                tensor.dims(),
                shape.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let param = ParamStore::get(self, name)
            .ok_or_else(|| candle_core::Error::Msg(format!("parameter {name} is missing")))?;
        let tensor = param.tensor().clone();
        // Converting would detach a Var from its storage; only do it when really needed.
        let tensor = if tensor.dtype() != dtype {
            tensor.to_dtype(dtype)?
        } else {
            tensor
        };
        if !tensor.device().same_device(dev) {
            return tensor.to_device(dev);
        }
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_predicate_decides_var_or_frozen() {
        let dev = Device::Cpu;
        let t = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let store = ParamStore::from_tensors(
            [
                ("a.weight".to_string(), t.clone()),
                ("emb.weight".to_string(), t),
            ],
            |n| !n.starts_with("emb"),
        )
        .unwrap();
        let names: Vec<_> = store.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["a.weight"]);
        assert_eq!(store.parameter_count(), 12);
        let vb = store.var_builder(DType::F32, &dev);
        assert_eq!(vb.pp("a").get((2, 3), "weight").unwrap().dims(), &[2, 3]);
        assert!(vb.pp("a").get((3, 2), "weight").is_err());
    }

    #[test]
    fn missing_parameters_are_created_only_when_asked_and_reproducibly() {
        let dev = Device::Cpu;
        let make = || {
            let store = ParamStore::new();
            let vb = store.var_builder(DType::F32, &dev);
            assert!(
                vb.get((2, 2), "head.weight").is_err(),
                "creation is off by default"
            );
            store.set_init_missing(Some(7));
            let init = Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            };
            let w = vb.get_with_hints((64, 8), "head.weight", init).unwrap();
            let b = vb
                .get_with_hints(64, "head.bias", Init::Const(0.0))
                .unwrap();
            assert_eq!(b.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            assert!(store.get("head.weight").unwrap().is_trainable());
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (make(), make());
        assert_eq!(a, b, "same seed, same values");
        let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        assert!((0.015..0.025).contains(&std), "std {std}");
    }

    #[test]
    fn a_deep_clone_does_not_see_the_originals_updates() {
        let dev = Device::Cpu;
        let t = Tensor::ones((2, 2), DType::F32, &dev).unwrap();
        let store = ParamStore::from_tensors(
            [("w".to_string(), t.clone()), ("frozen".to_string(), t)],
            |n| n == "w",
        )
        .unwrap();
        let shallow = store.clone();
        let deep = store.deep_clone().unwrap();
        let (_, var) = store.trainable_vars().remove(0);
        var.set(&Tensor::zeros((2, 2), DType::F32, &dev).unwrap())
            .unwrap();
        let sum = |s: &ParamStore, n: &str| {
            s.get(n)
                .unwrap()
                .tensor()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(sum(&shallow, "w"), 0.0, "a plain clone shares the variable");
        assert_eq!(sum(&deep, "w"), 4.0, "a deep clone keeps its own values");
        assert!(deep.get("w").unwrap().is_trainable());
        assert_eq!(sum(&deep, "frozen"), 4.0);
    }
}
