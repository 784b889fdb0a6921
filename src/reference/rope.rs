//! Rotary position embedding: apply at positions, and shift cached keys by an offset (mirrors
//! `kernels/rope.cu`).
//!
//! Pair `i` of a head (lanes [`RopeConfig::pair`]) at position `p` is rotated by `p * theta_i`:
//! `(x, y) -> (x cos - y sin, x sin + y cos)`. RoPE is a rotation, so `R(a) R(b) = R(a + b)`: a key
//! cached at position `t` and shifted by `o` equals the key computed at position `o + t`, which is
//! how Block-Attention re-encodes a block prefilled from position 0.

use crate::error::{Error, Result};
use crate::params::RopeConfig;

fn check_shape(x: &[f32], n_tokens: usize, n_heads: usize, cfg: &RopeConfig) -> Result<()> {
    cfg.validate()?;
    if x.len() != n_tokens * n_heads * cfg.head_dim {
        return Err(Error::Shape(format!(
            "RoPE input has {} values, expected n_tokens * n_heads * head_dim = {n_tokens} * {n_heads} * {}",
            x.len(),
            cfg.head_dim
        )));
    }
    Ok(())
}

/// Rotates token `t` of `x` (`[n_tokens, n_heads, head_dim]`) by `angle_pos(t) * theta_i`.
fn rotate(x: &mut [f32], n_heads: usize, cfg: &RopeConfig, angle_pos: impl Fn(usize) -> f64) {
    let d = cfg.head_dim;
    let freqs = cfg.inv_freqs();
    for (t, token) in x.chunks_exact_mut(n_heads * d).enumerate() {
        let p = angle_pos(t);
        for head in token.chunks_exact_mut(d) {
            for (i, &theta) in freqs.iter().enumerate() {
                let (a, b) = cfg.pair(i);
                let (sin, cos) = (p * theta).sin_cos();
                let (x0, x1) = (head[a] as f64, head[b] as f64);
                head[a] = (x0 * cos - x1 * sin) as f32;
                head[b] = (x0 * sin + x1 * cos) as f32;
            }
        }
    }
}

/// Applies RoPE in place to `x` (`[n_tokens, n_heads, head_dim]`), token `t` at position
/// `pos_offset + t`. Angles in f64.
pub fn apply(
    x: &mut [f32],
    n_tokens: usize,
    n_heads: usize,
    cfg: &RopeConfig,
    pos_offset: i64,
) -> Result<()> {
    check_shape(x, n_tokens, n_heads, cfg)?;
    rotate(x, n_heads, cfg, |t| (pos_offset + t as i64) as f64);
    Ok(())
}

/// Shifts already-rotated keys in place by `delta` positions (`R(delta)` applied to every
/// token): the Block-Attention re-encoding of a block cached at position 0 to its offset.
pub fn shift(
    k: &mut [f32],
    n_tokens: usize,
    n_heads: usize,
    cfg: &RopeConfig,
    delta: i64,
) -> Result<()> {
    check_shape(k, n_tokens, n_heads, cfg)?;
    rotate(k, n_heads, cfg, |_| delta as f64);
    Ok(())
}
