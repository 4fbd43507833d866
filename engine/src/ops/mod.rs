//! Differentiable building blocks that candle either lacks or only ships without a backward pass.
//!
//! candle 0.11.1's fused `softmax_last_dim`, `layer_norm`/`rms_norm` (contiguous input) and `rope*`
//! silently cut gradients. Each function here picks one of three paths:
//! - a gradient is needed and the tensor is f32/f64 on the CPU: our custom op, a fast CPU kernel with a
//!   hand-written backward;
//! - a gradient is needed elsewhere (CUDA, f16/bf16): the [`composed`] version from basic ops, which
//!   candle differentiates itself;
//! - no gradient is needed (inference, frozen inputs): for GELU and softmax our kernel again (its f32
//!   path is vectorised for the CPU at hand, [`simd`], where candle's calls scalar `erf`/`exp`), for
//!   the norms and rope candle's fused kernel.
//!
//! Attention has a fused CPU kernel of its own, forward and backward ([`fused_attention`]).
//!
//! All three agree within float tolerance (tests below and in `engine/tests/models/grad.rs`).

mod attention;
pub mod bf16_gemm;
pub mod composed;
mod dropout;
mod gelu;
mod kernel;
pub(crate) use kernel::sum_in_order;
mod linear;
pub use linear::Products;
mod norm;
pub mod simd;
mod softmax;

use candle_core::{DType, Result, Tensor};

use norm::{LayerNormOp, RmsNormOp, RowNorm};

/// Whether backward will need a gradient through any of these tensors.
fn needs_grad(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// Whether our CPU kernels handle this tensor.
fn has_cpu_kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether candle's fused (gradient-free) kernel may be used.
fn use_fused(tensors: &[&Tensor]) -> bool {
    !needs_grad(tensors) && tensors[0].dtype() != DType::F64
}

/// Softmax over the last dimension.
///
/// # Errors
/// Fails on a scalar input or an unsupported dtype.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if has_cpu_kernel(x) && !needs_grad(&[x]) {
        x.contiguous()?.apply_op1_no_bwd(&softmax::Softmax)
    } else if use_fused(&[x]) {
        candle_nn::ops::softmax_last_dim(x)
    } else if has_cpu_kernel(x) {
        x.contiguous()?.apply_op1(softmax::Softmax)
    } else {
        composed::softmax_last_dim(x)
    }
}

/// Layer norm over the last dimension with weight `w` and bias `b`.
///
/// # Errors
/// Fails when `w`/`b` do not match the last dimension of `x`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(&[x, w, b]) {
        candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)
    } else if has_cpu_kernel(x) {
        let op = LayerNormOp(RowNorm {
            centered: true,
            eps,
        });
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
    } else {
        composed::layer_norm(x, w, b, eps)
    }
}

/// RMS norm over the last dimension with weight `w`.
///
/// # Errors
/// Fails when `w` does not match the last dimension of `x`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(&[x, w]) {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
    } else if has_cpu_kernel(x) {
        let op = RmsNormOp(RowNorm {
            centered: false,
            eps,
        });
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    } else {
        composed::rms_norm(x, w, eps)
    }
}

/// Exact (erf-based) GELU.
///
/// # Errors
/// Fails on an unsupported dtype.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if has_cpu_kernel(x) && !needs_grad(&[x]) {
        x.contiguous()?.apply_op1_no_bwd(&gelu::Gelu)
    } else if use_fused(&[x]) {
        x.gelu_erf()
    } else if has_cpu_kernel(x) {
        x.contiguous()?.apply_op1(gelu::Gelu)
    } else {
        composed::gelu_erf(x)
    }
}

/// Multi-head attention `softmax(scale · q kᵀ + bias) v` on the projections as they come out of
/// their linear layers: `q` `(batch, seq_q, heads · head_dim)`, `k` and `v` `(batch, seq_k, heads ·
/// head_dim)`; `bias` is the additive padding mask `(batch, 1, 1, seq_k)` of
/// [`crate::models::common::padding_bias`]; `dropout` is `(p, seed)` for dropout on the
/// probabilities (the seed drawn from the model's dropout generator). The result has `q`'s shape,
/// heads side by side, and is differentiable with respect to `q`, `k` and `v`.
///
/// `None` when the fused CPU kernel does not apply (the tensors are not f32 on the CPU, or the bias
/// has another shape); the caller then composes the attention itself.
///
/// # Errors
/// Fails when the shapes do not fit together.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    num_heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> Result<Option<Tensor>> {
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if ![q, k, v].into_iter().all(on_cpu_f32) {
        return Ok(None);
    }
    let Some(op) = attention_op(bias, (k.dim(0)?, k.dim(1)?), num_heads, scale, dropout)? else {
        return Ok(None);
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(Some(if needs_grad(&[&q, &k, &v]) {
        q.apply_op3(&k, &v, op)?
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)?
    }))
}

/// Self-attention as [`fused_attention`], on one packed projection `qkv` `(batch, seq, 3 · heads
/// · head_dim)` holding `[q | k | v]` side by side (the output of one linear layer with the three
/// weights stacked). Differentiable with respect to `qkv`; `None` where the fused CPU kernel does
/// not apply.
///
/// # Errors
/// Fails when the last dimension is not three whole sets of heads.
pub fn fused_self_attention(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    num_heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> Result<Option<Tensor>> {
    if !(qkv.device().is_cpu() && qkv.dtype() == DType::F32) {
        return Ok(None);
    }
    let Some(op) = attention_op(bias, (qkv.dim(0)?, qkv.dim(1)?), num_heads, scale, dropout)?
    else {
        return Ok(None);
    };
    let qkv = qkv.contiguous()?;
    Ok(Some(if needs_grad(&[&qkv]) {
        qkv.apply_op1(attention::PackedAttention(op))?
    } else {
        qkv.apply_op1_no_bwd(&attention::PackedAttention(op))?
    }))
}

/// The fused attention op for keys of `(batch, seq_k)`; `None` when the bias is not the
/// `(batch, 1, 1, seq_k)` f32 padding mask the kernel reads.
fn attention_op(
    bias: Option<&Tensor>,
    (b, s_k): (usize, usize),
    num_heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> Result<Option<attention::FusedAttention>> {
    let bias = match bias {
        None => None,
        Some(bias) => {
            if bias.dims() != [b, 1, 1, s_k] || bias.dtype() != DType::F32 {
                return Ok(None);
            }
            Some(std::sync::Arc::new(bias.flatten_all()?.to_vec1::<f32>()?))
        }
    };
    let dropout = match dropout {
        Some((p, _)) if !(0.0..1.0).contains(&p) => {
            candle_core::bail!("dropout probability {p} is not in [0, 1)")
        }
        Some((p, seed)) if p > 0.0 => Some(attention::AttentionDropout { p: p as f32, seed }),
        _ => None,
    };
    Ok(Some(attention::FusedAttention {
        num_heads,
        scale: scale as f32,
        bias,
        dropout,
    }))
}

/// The inverted-dropout multiplier of element `index` of the mask drawn with `seed`: 0 with
/// probability `p`, else `1 / (1 − p)`.
///
/// A counter-based generator (splitmix64's finaliser of `seed` and the index): any element is
/// drawn on its own, so masks are filled in parallel, the fused attention's backward regenerates
/// its forward's mask, and every device and code path that draws with the same seed drops the same
/// elements.
pub fn dropout_factor(seed: u64, p: f32, index: u64) -> f32 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let uniform = (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
    if uniform < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// The dropout mask of `dims` drawn with `seed` ([`dropout_factor`] of each row-major index), in
/// `dtype` on `device`: filled on the CPU's threads and copied over once.
///
/// # Errors
/// Fails when `p` is not in `[0, 1)` or the copy fails.
pub fn dropout_factors(
    seed: u64,
    p: f64,
    dims: &[usize],
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    use rayon::prelude::*;
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is not in [0, 1)");
    }
    let n: usize = dims.iter().product();
    let mut factors = vec![0f32; n];
    const CHUNK: usize = 1 << 14;
    factors
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let first = (chunk * CHUNK) as u64;
            for (i, v) in values.iter_mut().enumerate() {
                *v = dropout_factor(seed, p as f32, first + i as u64);
            }
        });
    Tensor::from_vec(factors, dims, &candle_core::Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// Inverted dropout of `x` with the mask drawn from `seed` ([`dropout_factors`]): on the CPU in
/// f32 one node that never stores the mask and gives only `x` a gradient, elsewhere the product
/// with the mask.
///
/// # Errors
/// Fails when `p` is not in `[0, 1)`.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is not in [0, 1)");
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = dropout::Dropout { seed, p: p as f32 };
        let x = x.contiguous()?;
        return if needs_grad(&[&x]) {
            x.apply_op1(op)
        } else {
            x.apply_op1_no_bwd(&op)
        };
    }
    x.mul(&dropout_factors(seed, p, x.dims(), x.dtype(), x.device())?)
}

/// `x Wᵀ + b` as one autograd node with a hand-written backward ([`linear`]'s module comment says
/// why), for `x (…, in)`, `W (out, in)`, `b (out)`; `None` when not every tensor is f32 on the CPU.
/// With `transposed`, `w` holds `Wᵀ (in, out)` (a frozen layer's contiguous copy). `products`
/// says what the GEMMs multiply, forward and backward ([`Products::Bf16`] only where
/// [`bf16_gemm::available`]).
///
/// # Errors
/// Fails when the shapes do not fit, or `Bf16` products are asked for on a CPU without the kernel.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
    products: Products,
) -> Result<Option<Tensor>> {
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !on_cpu_f32(x) || !on_cpu_f32(w) || !b.is_none_or(on_cpu_f32) {
        return Ok(None);
    }
    check_products(products)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let op = linear::Linear {
        transposed,
        products,
    };
    Ok(Some(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op)?,
        None => x.apply_op2(&w, op)?,
    }))
}

/// `gelu(x Wᵀ + b)` with exact GELU as one autograd node ([`linear`]'s `LinearGelu`), for a `W
/// (out, in)` being trained and `b (out)`; `None` when not every tensor is f32 on the CPU or the
/// weight is not trained (a frozen layer runs [`linear`] on its transposed copy, then
/// [`gelu_erf`]).
///
/// # Errors
/// Fails when the shapes do not fit.
pub fn linear_gelu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    products: Products,
) -> Result<Option<Tensor>> {
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if ![x, w, b].into_iter().all(on_cpu_f32) || !w.track_op() {
        return Ok(None);
    }
    check_products(products)?;
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        linear::LinearGelu::new(products),
    )?))
}

/// Refuses bf16 products on a CPU without AVX-512 BF16 (the layers only ask where it is).
fn check_products(products: Products) -> Result<()> {
    if products == Products::Bf16 && !bf16_gemm::available() {
        candle_core::bail!("bf16 products need AVX-512 BF16, which this CPU lacks");
    }
    Ok(())
}

/// Rotary position embedding ("rotate half", as Hugging Face Llama) for `x` of shape
/// `(batch, heads, seq, head_dim)`; `cos`/`sin` have shape `(seq, head_dim / 2)`.
///
/// The differentiable path is the composition (rope is a handful of cheap element-wise ops next to
/// the attention matmuls, so a custom kernel would not pay for itself).
///
/// # Errors
/// Fails when the shapes disagree.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if use_fused(&[x, cos, sin]) {
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
    } else {
        composed::rope(x, cos, sin)
    }
}

#[cfg(test)]
mod tests;
