//! The element-wise Llama operations (mirrors the future `kernels/llama_ops.cu`).
//!
//! - RMSNorm of each row `x` (width `d`): `y_i = x_i / sqrt(mean_j x_j^2 + eps) * w_i`, the mean in
//!   f64.
//! - SwiGLU gate: `y_i = silu(g_i) * u_i`, `silu(z) = z / (1 + e^-z)`.

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
