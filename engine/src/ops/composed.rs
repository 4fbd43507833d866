//! The same operations built only from candle's basic differentiable ops.
//!
//! They are the reference the custom kernels are tested against, and the differentiable path on
//! devices and dtypes the kernels do not cover (CUDA, f16/bf16): slower, but autograd-correct.

use candle_core::{Result, Tensor, D};

/// Softmax over the last dimension.
///
/// # Errors
/// Fails on a scalar input.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    // Subtracting the (detached) row max changes nothing mathematically and avoids overflow.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Layer norm over the last dimension: `(x − mean) / √(var + eps) · w + b`.
///
/// # Errors
/// Fails when `w`/`b` do not match the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// RMS norm over the last dimension: `x / √(mean(x²) + eps) · w`.
///
/// # Errors
/// Fails when `w` does not match the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Exact GELU: `x · ½ (1 + erf(x / √2))`.
///
/// # Errors
/// Fails only on unsupported dtypes.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    x * cdf?
}

/// Rotary embedding, "rotate half" convention (Hugging Face Llama), for `x` of shape
/// `(batch, heads, seq, head_dim)` and `cos`/`sin` of shape `(seq, head_dim / 2)`.
///
/// # Errors
/// Fails when the shapes disagree.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}
