//! What the tests of our CPU kernels ([`super::int8_matmul`], [`super::q4_1_matmul`]) share.

/// Deterministic values in [-1, 1) (xorshift), so the tests need no tensor library.
pub(super) fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

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
