//! Streaming quantization of a safetensors file: tensor by tensor from a memory map to a new file.
//!
//! Only one tensor is resident at a time: its mapped pages (read in place when the data is aligned
//! f32), a converted copy when it is f16/bf16, and its quantized output (int8 and GGUF types write
//! into buffers reused across tensors); pages are released after use. Peak resident memory is therefore about twice the largest tensor plus the program itself,
//! whatever the file size.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::layout::{
    quantized_bytes, quantized_entries, QuantEntry, QuantMetadata, FORMAT, METADATA_KEY,
};
use super::st_file::{EntryPlan, RawEntry, SafetensorsFile, SafetensorsWriter};
use super::{gguf, quantize_values, Int8Weight, QuantScheme, Quantized};
use crate::error::{EngineError, Result};

/// What a streaming run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamReport {
    /// Names of the tensors quantized.
    pub quantized: Vec<String>,
    /// Tensors selected for quantization that the scheme could not take, with the reason.
    pub kept: Vec<(String, String)>,
    /// Bytes of the input tensors that were quantized.
    pub quantized_input_bytes: usize,
    /// Size of the input file's data.
    pub input_bytes: usize,
    /// Size of the output file's data.
    pub output_bytes: usize,
    /// Wall time of the whole run, in seconds.
    pub seconds: f64,
}

impl StreamReport {
    /// Input megabytes (10⁶ bytes) of quantized tensors processed per second.
    pub fn megabytes_per_second(&self) -> f64 {
        self.quantized_input_bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// Quantizes every float tensor of rank ≥ 2 of `input` for which `select(name)` holds and writes
/// the result to `output` in the [`super::layout`] layout; everything else is copied unchanged.
///
/// # Errors
/// Fails when a file cannot be read or written, or the input is not valid safetensors.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    scheme: QuantScheme,
    select: impl Fn(&str) -> bool,
) -> Result<StreamReport> {
    let started = Instant::now();
    let file = SafetensorsFile::open(input)?;
    let mut report = StreamReport::default();
    let mut plan = Vec::new();
    let mut quant = QuantMetadata {
        format: FORMAT.into(),
        tensors: BTreeMap::new(),
    };
    let entries = file.entries_in_file_order();
    let mut to_quantize = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        let is_weight =
            matches!(entry.dtype.as_str(), "F32" | "F16" | "BF16") && entry.shape.len() >= 2;
        let quantize = match (
            is_weight && select(name),
            scheme.unsupported_reason(&entry.shape),
        ) {
            (false, _) => false,
            (true, Some(reason)) => {
                report.kept.push(((*name).clone(), reason));
                false
            }
            (true, None) => true,
        };
        if quantize {
            plan.extend(quantized_entries(name, &entry.shape, scheme));
            quant.tensors.insert(
                (*name).clone(),
                QuantEntry {
                    scheme: scheme.to_string(),
                    shape: entry.shape.clone(),
                },
            );
        } else {
            let bytes = entry.data_offsets[1] - entry.data_offsets[0];
            plan.push(EntryPlan {
                name: (*name).clone(),
                dtype: entry.dtype.clone(),
                shape: entry.shape.clone(),
                bytes,
            });
        }
        to_quantize.push(quantize);
        report.input_bytes += entry.data_offsets[1] - entry.data_offsets[0];
    }
    report.output_bytes = plan.iter().map(|p| p.bytes).sum();
    let mut metadata = file.metadata().clone();
    metadata.insert(
        METADATA_KEY.into(),
        serde_json::to_string(&quant).map_err(|e| EngineError::json(output, e))?,
    );
    let mut writer = SafetensorsWriter::create(output, plan, &metadata)?;
    let mut scratch = Scratch::default();
    for ((name, entry), quantize) in entries.iter().zip(to_quantize) {
        if quantize {
            write_quantized(&file, &mut writer, name, entry, scheme, &mut scratch)?;
            report.quantized.push((*name).clone());
            report.quantized_input_bytes += entry.data_offsets[1] - entry.data_offsets[0];
        } else {
            writer.write_next(file.bytes(entry))?;
        }
        file.release(entry);
    }
    writer.finish()?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Output buffers reused from one tensor to the next, so streaming does not allocate (and have the
/// kernel zero and fault in) fresh memory per tensor.
#[derive(Default)]
struct Scratch {
    values: Vec<u8>,
    scales: Vec<u8>,
}

fn write_quantized(
    file: &SafetensorsFile,
    writer: &mut SafetensorsWriter,
    name: &str,
    entry: &RawEntry,
    scheme: QuantScheme,
    scratch: &mut Scratch,
) -> Result<()> {
    let values = file.f32_values(name, entry)?;
    match scheme {
        QuantScheme::Int8 => {
            Int8Weight::quantize_to_bytes(
                &values,
                &entry.shape,
                &mut scratch.values,
                &mut scratch.scales,
            );
            writer.write_next(&scratch.values)?;
            return writer.write_next(&scratch.scales);
        }
        QuantScheme::Gguf(dtype) => {
            gguf::quantize_into(&values, &entry.shape, dtype, &mut scratch.values)?;
            return writer.write_next(&scratch.values);
        }
        QuantScheme::Int4 { .. } | QuantScheme::Nf4 => {}
    }
    let Quantized::Weight(weight) = quantize_values(&values, &entry.shape, scheme)? else {
        return Err(EngineError::InvalidModel(format!(
            "{name}: planned for quantization but kept"
        )));
    };
    drop(values);
    for bytes in quantized_bytes(&weight)? {
        writer.write_next(&bytes)?;
    }
    Ok(())
}
