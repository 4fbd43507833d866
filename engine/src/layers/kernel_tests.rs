//! What the tests of our CPU kernels ([`super::int8_matmul`], [`super::block_matmul`]) share.

pub(super) use crate::test_values::values;

/// `x · Wᵀ + b` in f64 for the dequantized weight `w` (`n × k`): what a kernel approximates (it
/// only rounds `x` further).
pub(super) fn reference_product(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    bias: &[f32],
) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|row| {
            (0..n).map(move |c| {
                let dot: f64 = row
                    .iter()
                    .zip(&w[c * k..(c + 1) * k])
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                (dot + f64::from(bias[c])) as f32
            })
        })
        .collect()
}
