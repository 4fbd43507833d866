//! GGUF (llama.cpp) block types, quantized with candle's own block code, split across cores.
//!
//! candle's `QTensor::quantize` runs on one thread; rows are independent, so each core quantizes a
//! contiguous range of whole rows into its own blocks and the block bytes are concatenated (blocks
//! never straddle rows because the row length is a multiple of the block size).

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

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
    let (rows, cols) = rows_cols(dims);
    let block = dtype.block_size();
    if cols == 0 || cols % block != 0 || values.len() != rows * cols {
        return Err(EngineError::InvalidSetting(format!(
            "cannot quantize shape {dims:?} to {dtype:?}: the last dimension must be a multiple of {block}"
        )));
    }
    let per_task = rows_per_task(rows, cols);
    let chunks: Vec<candle_core::Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = values
            .chunks(per_task * cols)
            .map(|chunk| s.spawn(move || quantize_chunk(chunk, cols, dtype)))
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
    let mut out = Vec::with_capacity(rows * cols / block * dtype.type_size());
    for chunk in chunks {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
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
    if elems % dtype.block_size() != 0 || bytes.len() != expected {
        return Err(EngineError::InvalidModel(format!(
            "{dtype:?} tensor of shape {dims:?} needs {expected} bytes, found {}",
            bytes.len()
        )));
    }
    let storage = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
    Ok(QTensor::new(storage, dims)?)
}

fn quantize_chunk(values: &[f32], cols: usize, dtype: GgmlDType) -> candle_core::Result<Vec<u8>> {
    let mut blocks = dtype.cpu_zeros(values.len());
    blocks.from_float(values);
    let tensor = QTensor::new(QStorage::Cpu(blocks), (values.len() / cols, cols))?;
    Ok(tensor.data()?.into_owned())
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
