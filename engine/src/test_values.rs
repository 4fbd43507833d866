//! Deterministic test inputs shared by the unit tests of kernels and quantizers.

/// `count` values in [-1, 1) from a xorshift generator seeded with `seed`, so tests need no
/// tensor library and no random-number crate.
pub(crate) fn values(count: usize, seed: u64) -> Vec<f32> {
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
