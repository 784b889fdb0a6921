//! The element-wise Llama operations (mirrors `kernels/llama_ops.cu`).
//!
//! - RMSNorm of each row `x` (width `d`): `y_i = x_i / sqrt(mean_j x_j^2 + eps) * w_i`, the mean in
//!   f64.
//! - SwiGLU gate: `y_i = silu(g_i) * u_i`, `silu(z) = z / (1 + e^-z)`.
//! - Synthetic weights: `y_i = offset + scale * u_i`, `u_i` uniform in `[-1, 1)` from the
//!   splitmix64 finaliser of `i * 0x9e3779b97f4a7c15 + seed` (wrapping): its top 24 bits `h` give
//!   `u_i = h / 2^23 - 1`.

use crate::error::{Error, Result};

/// RMSNorm of every row of `x` (`[n, d]`, `d = w.len()`), into a new buffer.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
    let d = w.len();
    if d == 0 || x.len() % d != 0 {
        return Err(Error::Shape(format!(
            "rms_norm: {} values are not rows of width {d}",
            x.len()
        )));
    }
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        y.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| (v as f64 * inv) as f32 * g),
        );
    }
    Ok(y)
}

/// `silu(gate) * up`, element-wise.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
    if gate.len() != up.len() {
        return Err(Error::Shape(format!(
            "silu_mul: gate has {} values, up {}",
            gate.len(),
            up.len()
        )));
    }
    Ok(gate
        .iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect())
}

/// `n` synthetic weights from `seed` (see the module docs). The value is rounded once from the
/// exact `offset + scale * u_i`; a kernel that rounds the product and the sum separately may differ
/// in the last f32 bit.
pub fn fill_uniform(n: usize, seed: u32, scale: f32, offset: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut x = i
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(u64::from(seed));
            x ^= x >> 30;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 27;
            x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^= x >> 31;
            let u = (x >> 40) as f64 / (1u64 << 23) as f64 - 1.0;
            (offset as f64 + scale as f64 * u) as f32
        })
        .collect()
}
