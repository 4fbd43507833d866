//! GGUF (llama.cpp) block types, split across cores.
//!
//! Q8_0 and Q4_K use our own quantizers ([`super::blocks`], byte-identical to candle's and much
//! faster), Q4_1 our grid search ([`super::grid_search`]); the other types use candle's block code. Rows are independent and blocks never straddle
//! rows (the row length is a multiple of the block size), so each core quantizes a contiguous range
//! of whole rows straight into its part of the output buffer.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use super::blocks;
use super::grid_search;
use super::parallel::rows_per_task;
use super::rows_cols;
use crate::error::{EngineError, Result};

/// Quantizes row-major f32 values of shape `dims` into a CPU `QTensor` of type `dtype`.
///
/// # Errors
/// Fails when the last dimension is not a multiple of the type's block size.
pub fn quantize(values: &[f32], dims: &[usize], dtype: GgmlDType) -> Result<QTensor> {
    let bytes = quantize_to_bytes(values, dims, dtype)?;
    qtensor_from_bytes(&bytes, dims, dtype, &Device::Cpu)
}

/// Quantizes row-major f32 values of shape `dims` into GGML block bytes of type `dtype`.
///
/// # Errors
/// Fails when the last dimension is not a multiple of the type's block size.
pub fn quantize_to_bytes(values: &[f32], dims: &[usize], dtype: GgmlDType) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    quantize_into(values, dims, dtype, &mut out)?;
    Ok(out)
}

/// Quantizes like [`quantize_to_bytes`] into `out` (resized), reusing its memory: the streaming
/// path keeps one buffer for all tensors of a file.
///
/// # Errors
/// Fails when the last dimension is not a multiple of the type's block size.
pub fn quantize_into(
    values: &[f32],
    dims: &[usize],
    dtype: GgmlDType,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (rows, cols) = rows_cols(dims);
    let block = dtype.block_size();
    if cols == 0 || cols % block != 0 || values.len() != rows * cols {
        return Err(EngineError::InvalidSetting(format!(
            "cannot quantize shape {dims:?} to {dtype:?}: the last dimension must be a multiple of {block}"
        )));
    }
    let row_bytes = cols / block * dtype.type_size();
    let per_task = rows_per_task(rows, cols);
    out.resize(rows * row_bytes, 0);
    let results: Vec<candle_core::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = values
            .chunks(per_task * cols)
            .zip(out.chunks_mut(per_task * row_bytes))
            .map(|(chunk, bytes)| s.spawn(move || quantize_chunk(chunk, cols, dtype, bytes)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(candle_core::Error::Msg(
                        "quantization thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    for result in results {
        result?;
    }
    Ok(())
}

/// Builds a `QTensor` on `device` from GGML block bytes.
///
/// # Errors
/// Fails when the byte count does not match the shape, or the device cannot hold the tensor.
pub fn qtensor_from_bytes(
    bytes: &[u8],
    dims: &[usize],
    dtype: GgmlDType,
    device: &Device,
) -> Result<QTensor> {
    let elems: usize = dims.iter().product();
    let expected = elems / dtype.block_size() * dtype.type_size();
    if !elems.is_multiple_of(dtype.block_size()) || bytes.len() != expected {
        return Err(EngineError::InvalidModel(format!(
            "{dtype:?} tensor of shape {dims:?} needs {expected} bytes, found {}",
            bytes.len()
        )));
    }
    let storage = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
    Ok(QTensor::new(storage, dims)?)
}

/// Quantizes whole rows of `values` into `out` (exactly their block bytes).
fn quantize_chunk(
    values: &[f32],
    cols: usize,
    dtype: GgmlDType,
    out: &mut [u8],
) -> candle_core::Result<()> {
    match dtype {
        GgmlDType::Q8_0 => blocks::quantize_q8_0(values, out),
        GgmlDType::Q4K => blocks::quantize_q4_k(values, out),
        GgmlDType::Q4_1 => grid_search::quantize_q4_1(values, out),
        _ => {
            let mut blocks = dtype.cpu_zeros(values.len());
            blocks.from_float(values);
            let tensor = QTensor::new(QStorage::Cpu(blocks), (values.len() / cols, cols))?;
            out.copy_from_slice(&tensor.data()?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn parallel_blocks_equal_candles_single_threaded_quantization() {
        // 256 rows × 256 columns = 65,536 values: large enough to be split across threads.
        let values: Vec<f32> = (0..256 * 256)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let ours = quantize(&values, &[256, 256], dtype).unwrap();
            let reference = QTensor::quantize(
                &Tensor::from_slice(&values, (256, 256), &Device::Cpu).unwrap(),
                dtype,
            )
            .unwrap();
            assert_eq!(ours.data().unwrap(), reference.data().unwrap(), "{dtype:?}");
        }
    }

    #[test]
    fn a_row_length_off_the_block_size_is_an_error_not_a_panic() {
        let err = quantize_to_bytes(&[0.0; 100], &[2, 50], GgmlDType::Q8_0).unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
        assert!(qtensor_from_bytes(&[0; 10], &[32], GgmlDType::Q8_0, &Device::Cpu).is_err());
    }
}
