//! Rotary position embedding on the CPU (mirrors `src/reference/rope.rs`): the same rotation of
//! lane pairs, with the angles' cosines and sines formed once per run of positions (in f64, as the
//! oracle forms them, then rounded to f32) and reused by every head and every layer, and the
//! rotation itself in f32.

use crate::error::{Error, Result};
use crate::params::RopeConfig;

/// The `(cos, sin)` of every pair's angle at `n_tokens` consecutive positions: what RoPE needs for
/// a forward pass over those positions, in all its layers.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeAngles {
    cfg: RopeConfig,
    n_tokens: usize,
    /// `[n_tokens, head_dim / 2]`.
    cos: Vec<f32>,
    /// `[n_tokens, head_dim / 2]`.
    sin: Vec<f32>,
}

impl RopeAngles {
    /// The angles of positions `pos_offset..pos_offset + n_tokens` (a negative offset rotates
    /// backwards, as a shift does).
    pub fn new(cfg: &RopeConfig, pos_offset: i64, n_tokens: usize) -> Result<Self> {
        cfg.validate()?;
        let freqs = cfg.inv_freqs();
        let half = freqs.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(n_tokens * half),
            Vec::with_capacity(n_tokens * half),
        );
        for t in 0..n_tokens {
            let p = (pos_offset + t as i64) as f64;
            for &theta in &freqs {
                let (s, c) = (p * theta).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Ok(Self {
            cfg: *cfg,
            n_tokens,
            cos,
            sin,
        })
    }

    /// Number of positions.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Rotates `x` (`[n_tokens, n_heads, head_dim]`) in place, token `t` by the angles of
    /// position `t`.
    pub fn apply(&self, x: &mut [f32], n_heads: usize) -> Result<()> {
        let d = self.cfg.head_dim;
        if x.len() != self.n_tokens * n_heads * d {
            return Err(Error::Shape(format!(
                "RoPE input has {} values, expected n_tokens * n_heads * head_dim = {} * {n_heads} * {d}",
                x.len(),
                self.n_tokens
            )));
        }
        let half = d / 2;
        for (t, token) in x.chunks_exact_mut(n_heads * d).enumerate() {
            let (cos, sin) = (
                &self.cos[t * half..(t + 1) * half],
                &self.sin[t * half..(t + 1) * half],
            );
            for head in token.chunks_exact_mut(d) {
                match self.cfg.layout {
                    // Pairs (i, i + d/2): two contiguous halves, which vectorise.
                    crate::params::RopeLayout::Neox => {
                        let (a, b) = head.split_at_mut(half);
                        for i in 0..half {
                            let (x0, x1) = (a[i], b[i]);
                            a[i] = x0 * cos[i] - x1 * sin[i];
                            b[i] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                    crate::params::RopeLayout::Interleaved => {
                        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                            let (x0, x1) = (pair[0], pair[1]);
                            pair[0] = x0 * cos[i] - x1 * sin[i];
                            pair[1] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Applies RoPE in place to `x` (`[n_tokens, n_heads, head_dim]`), token `t` at position
/// `pos_offset + t`: [`crate::reference::rope::apply`] in f32.
pub fn apply(
    x: &mut [f32],
    n_tokens: usize,
    n_heads: usize,
    cfg: &RopeConfig,
    pos_offset: i64,
) -> Result<()> {
    RopeAngles::new(cfg, pos_offset, n_tokens)?.apply(x, n_heads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{Llama3RopeScaling, RopeLayout};
    use crate::reference;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        reference::llama_ops::fill_uniform(n, seed, 2.0, 0.0)
    }

    #[test]
    fn matches_the_oracle_in_both_layouts_with_and_without_scaling() {
        let scaling = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        };
        for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
            for d in [64, 128] {
                let plain = RopeConfig::new(d, 500_000.0, layout).expect("config");
                for cfg in [plain, plain.with_llama3_scaling(scaling).expect("scaled")] {
                    for (pos, n, heads) in
                        [(0i64, 5, 3), (4091, 3, 9), (-17, 2, 1), (100_000, 1, 2)]
                    {
                        let x = values(n * heads * d, 7 + n as u32);
                        let (mut ours, mut want) = (x.clone(), x.clone());
                        apply(&mut ours, n, heads, &cfg, pos).expect("cpu");
                        reference::rope::apply(&mut want, n, heads, &cfg, pos).expect("oracle");
                        let err = reference::rel_l2(&ours, &want);
                        assert!(err < 1e-6, "{layout:?} d={d} pos={pos}: {err}");
                        assert_ne!(ours, x, "nothing rotated");
                    }
                }
            }
        }
    }

    #[test]
    fn one_set_of_angles_serves_queries_and_keys() {
        let cfg = RopeConfig::new(64, 100_000.0, RopeLayout::Neox).expect("config");
        let angles = RopeAngles::new(&cfg, 30, 4).expect("angles");
        for heads in [9, 3] {
            let x = values(4 * heads * 64, heads as u32);
            let (mut ours, mut want) = (x.clone(), x);
            angles.apply(&mut ours, heads).expect("apply");
            reference::rope::apply(&mut want, 4, heads, &cfg, 30).expect("oracle");
            assert!(reference::rel_l2(&ours, &want) < 1e-6);
        }
        let mut wrong = vec![0.0; 5 * 9 * 64];
        assert!(matches!(angles.apply(&mut wrong, 9), Err(Error::Shape(_))));
    }
}
