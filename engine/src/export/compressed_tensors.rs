//! The compressed-tensors layout: the safetensors layout and `quantization_config` that Hugging
//! Face transformers (with the `compressed-tensors` package) and vLLM read.
//!
//! Each quantized linear layer `m` is written as its format stores it:
//! - `pack-quantized` (weight-only int8 per channel, int4 per group): `m.weight_packed` (int32,
//!   `[out, ⌈in · bits / 32⌉]`: element `i` of a row at bit `bits · i` of the row's words, little
//!   endian, as the unsigned value `q + 2^(bits-1)`), `m.weight_scale` (f32, `[out, groups]`),
//!   `m.weight_shape` (int64 `[out, in]`), and for asymmetric int4 `m.weight_zero_point` (int32,
//!   packed the same way along the output dimension: `[⌈out / 8⌉, groups]`);
//! - `int-quantized` (int8 weights with int8 inputs, W8A8: per token at run time, or static with
//!   one calibrated scale per layer): `m.weight` (int8), `m.weight_scale` (f32, `[out, 1]`) and,
//!   static, `m.input_scale` (f32, `[1]`).
//!
//! A pruned model's `quantization_config` also carries a `sparsity_config` (`2:4` or
//! `unstructured`, the share of zeros, the pruned modules as `targets` less `ignore`); its weights
//! are stored dense, as compressed-tensors 0.15 and later store every sparse model (they dropped
//! the compressed sparse formats) and as its readers take them.
//!
//! Which loader reads what (compressed-tensors 0.20.1, transformers 5.25): the int8 folders load
//! with a plain `from_pretrained`; asymmetric int4 loads with
//! `quantization_config=CompressedTensorsConfig(dequantize=True)`, because the default path sizes
//! `weight_zero_point` unpacked (`[out, groups]` int8) while the format packs it, which fails for
//! every asymmetric pack-quantized folder, compressed-tensors' own included. vLLM reads the packed
//! zero points.
//!
//! Dequantized, `w = (q − z) · s`, which is our int4's `(q − z) · s` with both `q` and `z` shifted by
//! 8, and our int8's `q · s`: the values are the ones our kernels run on, bit for bit. Every other
//! tensor (norms, biases, the task head, embedding tables, which compressed-tensors does not
//! quantize) is written dense, as the values our model computes with. Linear layers left in full
//! precision are listed in `ignore`. References: compressed-tensors'
//! `compressors/pack_quantized/{base,helpers}.py`, `compressors/naive_quantized/base.py` and
//! `quantization/quant_{config,args}.py` (0.20).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use serde_json::{json, Value};

use super::hf::export_hf_folder;
use super::transformers::HfArchitecture;
use crate::error::{EngineError, Result};
use crate::quant::layout::dense_bytes;
use crate::quant::st_file::{EntryPlan, SafetensorsWriter};
use crate::quant::{Int4Weight, Int8Weight, QuantScheme, QuantizedWeight};

/// The subfolder of a saved model that holds it in this layout: a second copy of the same model,
/// so the stage's size on disk leaves it out.
pub const COMPRESSED_TENSORS_DIR: &str = "compressed-tensors";

/// The compressed-tensors version whose layout this writes (the one CI loads it with).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.20.1";

/// A quantized model to write in the compressed-tensors layout.
pub struct CompressedTensorsExport<'a> {
    /// The transformers class the folder declares.
    pub arch: HfArchitecture,
    /// The model's config (engine form; the class's fields are added).
    pub config: &'a Value,
    /// Every tensor under the engine's names, with the values the model computes with
    /// (quantized ones dequantized).
    pub tensors: Vec<(String, Tensor)>,
    /// The quantized weights of linear layers, by parameter name (`….weight`), as stored.
    pub linear: &'a BTreeMap<String, Arc<QuantizedWeight>>,
    /// The module paths (engine names) of linear layers kept in full precision.
    pub dense_linear: Vec<String>,
    /// Whether the linear layers' inputs are quantized to int8 per token at run time.
    pub dynamic: bool,
    /// Static W8A8: each quantized module's calibrated input scale, by module path (engine
    /// names); empty otherwise.
    pub input_scales: &'a BTreeMap<String, f32>,
    /// The linear weights pruning masks (engine names): described by `sparsity_config`.
    pub sparse: std::collections::BTreeSet<String>,
}

/// How a model's linear layers quantize their inputs when they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inputs {
    /// Not at all (weight-only).
    Float,
    /// int8 per token, computed at run time.
    Dynamic,
    /// int8 with one calibrated scale per layer (`input_scale`).
    Static,
}

/// The one scheme every quantized linear layer of a model must share to be written in this
/// layout, or why the model cannot be.
///
/// # Errors
/// [`EngineError::Unsupported`] for nf4, GGUF block types and a mix of schemes.
pub fn compressed_tensors_scheme(
    linear: &BTreeMap<String, Arc<QuantizedWeight>>,
) -> Result<QuantScheme> {
    let mut schemes = linear.iter().map(|(name, w)| (name, w.scheme()));
    let Some((_, scheme)) = schemes.next() else {
        return Err(EngineError::Unsupported(
            "compressed-tensors: the model has no quantized linear layer".into(),
        ));
    };
    if let Some((name, other)) = schemes.find(|(_, s)| *s != scheme) {
        return Err(EngineError::Unsupported(format!(
            "compressed-tensors: one scheme per model; {name} is {other}, others {scheme}"
        )));
    }
    match scheme {
        QuantScheme::Int8 | QuantScheme::Int4 { .. } => Ok(scheme),
        other => Err(EngineError::Unsupported(format!(
            "compressed-tensors stores int8 per channel and int4 per group, not {other}"
        ))),
    }
}

/// Writes `model` into `dir`: `config.json` with its `quantization_config`, `model.safetensors`
/// in the layout above, and the tokenizer files found in `tokenizer_dir`.
///
/// # Errors
/// A scheme the layout cannot store ([`compressed_tensors_scheme`]), int8 inputs on a scheme other
/// than int8, a config that is not the family's, or I/O errors.
pub fn export_compressed_tensors(
    dir: &Path,
    model: CompressedTensorsExport<'_>,
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    let scheme = compressed_tensors_scheme(model.linear)?;
    let inputs = match (model.dynamic, model.input_scales.is_empty()) {
        (true, _) => Inputs::Dynamic,
        (false, false) => Inputs::Static,
        (false, true) => Inputs::Float,
    };
    if inputs != Inputs::Float && scheme != QuantScheme::Int8 {
        return Err(EngineError::Unsupported(format!(
            "compressed-tensors: int8 inputs go with int8 weights, not {scheme}"
        )));
    }
    let arch = model.arch;
    let mut config = arch.export_config(model.config)?;
    let ignore = ignored_modules(arch, &model);
    config["quantization_config"] = quantization_config(scheme, inputs, ignore);
    if let Some(sparsity) = sparsity_config(arch, &model)? {
        config["quantization_config"]["sparsity_config"] = sparsity;
    }
    export_hf_folder(dir, &config, &[], tokenizer_dir)?;

    let mut plan = Vec::new();
    let mut data: Vec<Cow<'_, [u8]>> = Vec::new();
    let mut push = |name: String, dtype: &str, shape: Vec<usize>, bytes: Vec<u8>| {
        plan.push(EntryPlan {
            name,
            dtype: dtype.to_string(),
            shape,
            bytes: bytes.len(),
        });
        data.push(Cow::Owned(bytes));
    };
    for (name, tensor) in &model.tensors {
        let exported = arch.export_name(name);
        let Some(weight) = model.linear.get(name) else {
            let (dtype, bytes) = dense_bytes(tensor)?;
            push(exported, dtype, tensor.dims().to_vec(), bytes);
            continue;
        };
        let module = exported.strip_suffix(".weight").unwrap_or(&exported);
        match &**weight {
            QuantizedWeight::Int8(w) if inputs != Inputs::Float => {
                let (rows, cols) = rows_cols(&w.dims)?;
                let values = w.qweight.iter().map(|&q| q.to_le_bytes()[0]).collect();
                push(format!("{module}.weight"), "I8", vec![rows, cols], values);
                let scales = scales(w);
                push(
                    format!("{module}.weight_scale"),
                    "F32",
                    vec![rows, 1],
                    scales,
                );
                if inputs == Inputs::Static {
                    let engine_module = name.strip_suffix(".weight").unwrap_or(name);
                    let scale = model.input_scales.get(engine_module).ok_or_else(|| {
                        EngineError::InvalidModel(format!(
                            "compressed-tensors: {engine_module} has no calibrated input scale"
                        ))
                    })?;
                    let bytes = scale.to_le_bytes().to_vec();
                    push(format!("{module}.input_scale"), "F32", vec![1], bytes);
                }
            }
            QuantizedWeight::Int8(w) => {
                let (rows, cols) = rows_cols(&w.dims)?;
                let unsigned: Vec<u8> = w
                    .qweight
                    .iter()
                    .map(|&q| (i16::from(q) + 128) as u8)
                    .collect();
                let (words, packed) = pack_rows(&unsigned, rows, cols, 8);
                push(
                    format!("{module}.weight_packed"),
                    "I32",
                    vec![rows, words],
                    packed,
                );
                push(
                    format!("{module}.weight_scale"),
                    "F32",
                    vec![rows, 1],
                    scales(w),
                );
                push(
                    format!("{module}.weight_shape"),
                    "I64",
                    vec![2],
                    shape_bytes(rows, cols),
                );
            }
            QuantizedWeight::Int4(w) => {
                let (rows, cols) = rows_cols(&w.dims)?;
                let (packed, zeros) = pack_int4(w, rows, cols);
                let groups = cols / w.group_size;
                let scale_bytes = w
                    .scales
                    .iter()
                    .flat_map(|s| s.to_f32().to_le_bytes())
                    .collect();
                push(
                    format!("{module}.weight_packed"),
                    "I32",
                    vec![rows, cols.div_ceil(8)],
                    packed,
                );
                push(
                    format!("{module}.weight_scale"),
                    "F32",
                    vec![rows, groups],
                    scale_bytes,
                );
                push(
                    format!("{module}.weight_shape"),
                    "I64",
                    vec![2],
                    shape_bytes(rows, cols),
                );
                push(
                    format!("{module}.weight_zero_point"),
                    "I32",
                    vec![rows.div_ceil(8), groups],
                    zeros,
                );
            }
            other => {
                return Err(EngineError::Unsupported(format!(
                    "compressed-tensors: {name} is {}",
                    other.scheme()
                )))
            }
        }
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = SafetensorsWriter::create(&dir.join("model.safetensors"), plan, &metadata)?;
    for bytes in &data {
        writer.write_next(bytes)?;
    }
    writer.finish()
}

/// The `quantization_config` of a model whose linear layers (all but `ignore`) use `scheme`.
fn quantization_config(scheme: QuantScheme, inputs: Inputs, ignore: Vec<String>) -> Value {
    let (weights, format) = match scheme {
        QuantScheme::Int4 { group_size } => (
            json!({"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group",
                   "group_size": group_size, "dynamic": false}),
            "pack-quantized",
        ),
        _ => (
            json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel",
                   "group_size": null, "dynamic": false}),
            if inputs == Inputs::Float {
                "pack-quantized"
            } else {
                "int-quantized"
            },
        ),
    };
    let inputs = match inputs {
        Inputs::Float => None,
        Inputs::Dynamic => Some(json!({"num_bits": 8, "type": "int", "symmetric": true,
            "strategy": "token", "group_size": null, "dynamic": true})),
        Inputs::Static => Some(json!({"num_bits": 8, "type": "int", "symmetric": true,
            "strategy": "tensor", "group_size": null, "dynamic": false})),
    };
    json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "version": COMPRESSED_TENSORS_VERSION,
        "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": weights, "input_activations": inputs,
            "output_activations": null, "format": format
        }},
        "ignore": ignore,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
    })
}

/// The transformers module paths of the `Linear` layers left in full precision: the model's own,
/// and a Llama's `lm_head` when it is tied to the embedding table (a `Linear` in transformers that
/// has no weight of its own here).
fn ignored_modules(arch: HfArchitecture, model: &CompressedTensorsExport<'_>) -> Vec<String> {
    let mut ignore: Vec<String> = model
        .dense_linear
        .iter()
        .map(|module| ignore_entry(arch, module))
        .collect();
    if arch == HfArchitecture::LlamaForCausalLm
        && !model.linear.contains_key("lm_head.weight")
        && !ignore.iter().any(|m| m == "lm_head")
    {
        ignore.push("lm_head".into());
    }
    ignore.sort();
    ignore
}

/// How `ignore` names the module at the engine path `module`. compressed-tensors matches names of
/// the class that loads the folder: under `AutoModel` a BERT's modules have no `bert.` prefix, so
/// such an entry matches both spellings.
fn ignore_entry(arch: HfArchitecture, module: &str) -> String {
    let exported = arch.export_name(&format!("{module}.weight"));
    let exported = exported.strip_suffix(".weight").unwrap_or(&exported);
    match exported.strip_prefix("bert.") {
        Some(inner) => format!("re:^(bert\\.)?{}$", regex_escape(inner)),
        None => exported.to_string(),
    }
}

/// The `sparsity_config` of a model whose pruned linear weights are `model.sparse`: `2:4` when every
/// group of four consecutive inputs of each of them holds at most two non-zeros, else
/// `unstructured`, with the share of zeros; the weights are stored dense (`format: "dense"`; the
/// loaders read them as they are). `None` when nothing was pruned.
fn sparsity_config(
    arch: HfArchitecture,
    model: &CompressedTensorsExport<'_>,
) -> Result<Option<Value>> {
    if model.sparse.is_empty() {
        return Ok(None);
    }
    let (mut zeros, mut total, mut two_four) = (0usize, 0usize, true);
    for (_, tensor) in model
        .tensors
        .iter()
        .filter(|(n, _)| model.sparse.contains(n))
    {
        let values = tensor
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        zeros += values.iter().filter(|v| **v == 0.0).count();
        total += values.len();
        let cols = tensor.dims().last().copied().unwrap_or(0);
        two_four &= cols % 4 == 0
            && values
                .chunks(4)
                .all(|group| group.iter().filter(|v| **v != 0.0).count() <= 2);
    }
    // Every linear module, quantized or not; those pruning left whole are not sparse.
    let linear_modules = model
        .linear
        .keys()
        .map(|name| name.strip_suffix(".weight").unwrap_or(name).to_string());
    let mut ignore: Vec<String> = linear_modules
        .chain(model.dense_linear.iter().cloned())
        .filter(|module| !model.sparse.contains(&format!("{module}.weight")))
        .map(|module| ignore_entry(arch, &module))
        .collect();
    if arch == HfArchitecture::LlamaForCausalLm && !model.sparse.contains("lm_head.weight") {
        ignore.push("lm_head".into());
    }
    ignore.sort();
    ignore.dedup();
    Ok(Some(json!({
        "format": "dense",
        "sparsity_structure": if two_four { "2:4" } else { "unstructured" },
        "global_sparsity": zeros as f64 / total.max(1) as f64,
        "targets": ["Linear"],
        "ignore": ignore,
    })))
}

/// `name` with the regex metacharacters a module path can hold escaped.
fn regex_escape(name: &str) -> String {
    name.replace('.', "\\.")
}

fn rows_cols(dims: &[usize]) -> Result<(usize, usize)> {
    match dims {
        [rows, cols] => Ok((*rows, *cols)),
        _ => Err(EngineError::Unsupported(format!(
            "compressed-tensors: a linear weight is 2-D, not {dims:?}"
        ))),
    }
}

fn scales(w: &Int8Weight) -> Vec<u8> {
    w.scales
        .iter()
        .flat_map(|s| s.to_f32().to_le_bytes())
        .collect()
}

fn shape_bytes(rows: usize, cols: usize) -> Vec<u8> {
    [rows as i64, cols as i64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Packs each row of `rows × cols` unsigned `bits`-wide values (4 or 8) into little-endian int32
/// words, element `i` at bit `bits · i`; returns the words per row and the bytes.
fn pack_rows(values: &[u8], rows: usize, cols: usize, bits: usize) -> (usize, Vec<u8>) {
    let per_word = 32 / bits;
    let words = cols.div_ceil(per_word);
    let mut out = Vec::with_capacity(rows * words * 4);
    for row in values.chunks(cols.max(1)).take(rows) {
        for word in row.chunks(per_word) {
            let packed = word
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &v)| acc | (u32::from(v) << (bits * i)));
            out.extend_from_slice(&packed.to_le_bytes());
        }
    }
    (words, out)
}

/// An int4 weight's values (`[rows, ⌈cols / 8⌉]` words) and zero points (packed along the rows:
/// `[⌈rows / 8⌉, groups]` words), both as compressed-tensors packs them.
fn pack_int4(w: &Int4Weight, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    // Our nibbles are already the unsigned `q + 8` compressed-tensors packs, two per byte with the
    // even column low: with `cols` a multiple of 8, four bytes are one word as it expects.
    let values: Vec<u8> = (0..rows * cols)
        .map(|i| {
            let byte = w.packed[i / 2];
            if i % 2 == 0 {
                byte & 0x0F
            } else {
                byte >> 4
            }
        })
        .collect();
    let (_, packed) = pack_rows(&values, rows, cols, 4);
    let groups = cols / w.group_size;
    // Transposed, packed along what were the rows, transposed back.
    let mut zeros_t = vec![0u8; groups * rows];
    for r in 0..rows {
        for g in 0..groups {
            zeros_t[g * rows + r] = w.zeros[r * groups + g];
        }
    }
    let (words, packed_t) = pack_rows(&zeros_t, groups, rows, 4);
    let mut zeros = vec![0u8; words * groups * 4];
    for g in 0..groups {
        for k in 0..words {
            let from = (g * words + k) * 4;
            let to = (k * groups + g) * 4;
            zeros[to..to + 4].copy_from_slice(&packed_t[from..from + 4]);
        }
    }
    (packed, zeros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack(words: &[u8], bits: usize, count: usize) -> Vec<u32> {
        let words: Vec<u32> = words
            .chunks(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (0..count)
            .map(|i| (words[i * bits / 32] >> ((i * bits) % 32)) & ((1 << bits) - 1))
            .collect()
    }

    #[test]
    fn rows_pack_element_i_at_bit_bits_times_i() {
        // 3 rows of 10 four-bit values: two words per row, the second one half used.
        let values: Vec<u8> = (0..30).map(|i| (i * 7 % 16) as u8).collect();
        let (words, packed) = pack_rows(&values, 3, 10, 4);
        assert_eq!(words, 2);
        for (r, row) in packed.chunks(8).enumerate() {
            let got = unpack(row, 4, 10);
            let want: Vec<u32> = values[r * 10..r * 10 + 10]
                .iter()
                .map(|&v| u32::from(v))
                .collect();
            assert_eq!(got, want, "row {r}");
        }
        let bytes: Vec<u8> = (0..6).map(|i| (i * 40) as u8).collect();
        let (words, packed) = pack_rows(&bytes, 1, 6, 8);
        assert_eq!(words, 2);
        assert_eq!(
            unpack(&packed, 8, 6),
            bytes.iter().map(|&b| u32::from(b)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn int4_values_and_zero_points_pack_as_compressed_tensors_expects() {
        let (rows, cols, group) = (9, 64, 32);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.3 + (i / cols) as f32 * 0.05)
            .collect();
        let w = Int4Weight::quantize(&values, &[rows, cols], group);
        let (packed, zeros) = pack_int4(&w, rows, cols);
        assert_eq!(packed.len(), rows * cols / 8 * 4);
        let groups = cols / group;
        assert_eq!(zeros.len(), rows.div_ceil(8) * groups * 4);
        // Unpacked as compressed-tensors does, `(q - z) · s` is our dequantized weight.
        let dequantized = w.dequantize();
        let zero_words: Vec<u32> = zeros
            .chunks(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for r in 0..rows {
            let q = unpack(&packed[r * cols / 2..(r + 1) * cols / 2], 4, cols);
            for c in 0..cols {
                let g = c / group;
                let z = (zero_words[(r / 8) * groups + g] >> (4 * (r % 8))) & 0xF;
                let (q, z) = (q[c] as i32 - 8, z as i32 - 8);
                let value = w.scales[r * groups + g].to_f32() * (q - z) as f32;
                assert_eq!(value, dequantized[r * cols + c], "[{r}, {c}]");
            }
        }
    }
}
