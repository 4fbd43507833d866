//! The module map: what each parameter of a model is, so stages pick weights by role (every query
//! projection, every FFN input bank, the task head) instead of by name patterns.

use std::collections::BTreeMap;

/// What a module does in its model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleRole {
    /// Attention query projection (`hidden → heads × head size`).
    Query,
    /// Attention key projection (`hidden → kv heads × head size`).
    Key,
    /// Attention value projection (`hidden → kv heads × head size`).
    Value,
    /// Attention output projection (`heads × head size → hidden`).
    AttentionOutput,
    /// FFN input projection whose rows are the FFN neurons (BERT `intermediate`, Llama `up_proj`).
    FfnUp,
    /// FFN gate projection, also one row per neuron (Llama `gate_proj`).
    FfnGate,
    /// FFN output projection, one column per neuron.
    FfnDown,
    /// A lookup table (tokens, positions, token types).
    Embedding,
    /// BERT's pooler (dense + tanh on `[CLS]`).
    Pooler,
    /// The task head: the classifier, or a decoder's `lm_head`.
    TaskHead,
    /// A layer norm or RMS norm.
    Norm,
}

impl ModuleRole {
    /// Whether the module is a linear layer built through [`crate::layers::LinearFactory`].
    pub fn is_linear(self) -> bool {
        !matches!(self, ModuleRole::Embedding | ModuleRole::Norm)
    }
}

/// One module: its path (a parameter name without `.weight` / `.bias`), role and layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// The module path, e.g. `encoder.layer.3.attention.self.query`.
    pub path: String,
    /// What it does.
    pub role: ModuleRole,
    /// Its transformer layer, `None` outside the layer stack.
    pub layer: Option<usize>,
}

/// Every known module of one model, with the attention geometry stages need.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleMap {
    modules: BTreeMap<String, ModuleInfo>,
    /// Size of one attention head.
    pub head_dim: usize,
    /// Query heads per key/value head (1 without grouped-query attention).
    pub kv_groups: usize,
    /// The weight that projects hidden states onto the vocabulary (a decoder's `lm_head.weight`, or
    /// the token embedding when the two are tied); `None` for classifiers.
    pub output_matrix: Option<String>,
}

impl ModuleMap {
    /// A map of `modules`.
    pub fn new(
        modules: impl IntoIterator<Item = ModuleInfo>,
        head_dim: usize,
        kv_groups: usize,
        output_matrix: Option<String>,
    ) -> Self {
        Self {
            modules: modules.into_iter().map(|m| (m.path.clone(), m)).collect(),
            head_dim,
            kv_groups,
            output_matrix,
        }
    }

    /// The module a parameter (`….weight`, `….bias`) belongs to.
    pub fn of_param(&self, name: &str) -> Option<&ModuleInfo> {
        let (path, _) = name.rsplit_once('.')?;
        self.modules.get(path)
    }

    /// The role of a parameter's module.
    pub fn role_of(&self, name: &str) -> Option<ModuleRole> {
        self.of_param(name).map(|m| m.role)
    }

    /// Whether `name` is the weight of a linear layer (not an embedding table or a norm).
    pub fn is_linear_weight(&self, name: &str) -> bool {
        name.ends_with(".weight") && self.role_of(name).is_some_and(ModuleRole::is_linear)
    }

    /// The modules with `role`, in path order.
    pub fn with_role(&self, role: ModuleRole) -> impl Iterator<Item = &ModuleInfo> {
        self.modules.values().filter(move |m| m.role == role)
    }

    /// The module of `role` in `layer`, if there is one.
    pub fn in_layer(&self, layer: usize, role: ModuleRole) -> Option<&ModuleInfo> {
        self.with_role(role).find(|m| m.layer == Some(layer))
    }

    /// Every module, in path order.
    pub fn iter(&self) -> impl Iterator<Item = &ModuleInfo> {
        self.modules.values()
    }
}

/// Classifies parameter names: `top` maps module paths outside the layers to roles; `in_layer`
/// maps paths after `<layer prefix><index>.` to roles. Unknown names are left out.
pub(super) fn classify<'n>(
    names: impl IntoIterator<Item = &'n String>,
    layer_prefixes: &[&str],
    top: &[(&str, ModuleRole)],
    in_layer: &[(&str, ModuleRole)],
) -> Vec<ModuleInfo> {
    let mut found = BTreeMap::new();
    for name in names {
        let Some((path, _)) = name.rsplit_once('.') else {
            continue;
        };
        if let Some(info) = classify_path(path, layer_prefixes, top, in_layer) {
            found.insert(info.path.clone(), info);
        }
    }
    found.into_values().collect()
}

fn classify_path(
    path: &str,
    layer_prefixes: &[&str],
    top: &[(&str, ModuleRole)],
    in_layer: &[(&str, ModuleRole)],
) -> Option<ModuleInfo> {
    let info = |role, layer| ModuleInfo {
        path: path.to_owned(),
        role,
        layer,
    };
    for prefix in layer_prefixes {
        if let Some(rest) = path.strip_prefix(prefix) {
            let (index, inner) = rest.split_once('.')?;
            let layer = index.parse().ok()?;
            let role = in_layer.iter().find(|(p, _)| *p == inner)?.1;
            return Some(info(role, Some(layer)));
        }
    }
    let role = top.iter().find(|(p, _)| *p == path)?.1;
    Some(info(role, None))
}
