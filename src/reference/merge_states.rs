//! Attention states and their merge (mirrors `kernels/merge_states.cu`).
//!
//! The state of a group `G` of keys with logit scale `c` is `L_G = LSE_{j in G}(c * s_j)` (natural
//! log) and `O_G = sum_j softmax_j(c * s) v_j`. An empty group has `L = -inf` and `O = 0`.
//! Two states merge as `m = max(L_a, L_b)`, `L = m + ln(exp(L_a - m) + exp(L_b - m))`,
//! `O = exp(L_a - L) O_a + exp(L_b - L) O_b`; N states the same way with a sum. A state with
//! `L = -inf` has weight zero and its `O` is never read, so merging never produces NaN from it.

use crate::error::{Error, Result};

/// The attention state of one query row and head over one group of keys, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionState {
    /// `O_G`, length `head_dim`.
    pub out: Vec<f64>,
    /// `L_G`, natural log; `-inf` for an empty group.
    pub lse: f64,
}

impl AttentionState {
    /// The state of an empty group: `L = -inf`, `O = 0`.
    pub fn empty(head_dim: usize) -> Self {
        Self {
            out: vec![0.0; head_dim],
            lse: f64::NEG_INFINITY,
        }
    }

    /// True for the state of a group with no keys.
    pub fn is_empty(&self) -> bool {
        self.lse == f64::NEG_INFINITY
    }

    /// The two-way merge.
    ///
    /// ```
    /// use ape_attn::reference::AttentionState;
    /// // Masses e^0 = 1 and e^(ln 3) = 3: weights 1/4 and 3/4, merged LSE ln 4.
    /// let a = AttentionState { out: vec![1.0, 0.0], lse: 0.0 };
    /// let b = AttentionState { out: vec![0.0, 1.0], lse: 3f64.ln() };
    /// let m = a.merge(&b);
    /// assert!((m.lse - 4f64.ln()).abs() < 1e-12);
    /// assert!((m.out[1] - 0.75).abs() < 1e-12);
    /// // An empty state changes nothing.
    /// assert_eq!(a.merge(&AttentionState::empty(2)), a);
    /// ```
    pub fn merge(&self, other: &Self) -> Self {
        Self::merge_all([self, other])
    }

    /// The N-way merge: `m = max_i L_i`, `L = m + ln sum_i exp(L_i - m)`,
    /// `O = sum_i exp(L_i - L) O_i`. All states must have the same head dim.
    pub fn merge_all<'a>(states: impl IntoIterator<Item = &'a AttentionState>) -> Self {
        let states: Vec<&AttentionState> = states.into_iter().collect();
        let head_dim = states.first().map_or(0, |s| s.out.len());
        let m = states
            .iter()
            .map(|s| s.lse)
            .fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return Self::empty(head_dim);
        }
        let sum: f64 = states
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| (s.lse - m).exp())
            .sum();
        let lse = m + sum.ln();
        let mut out = vec![0.0; head_dim];
        for s in states.iter().filter(|s| !s.is_empty()) {
            let w = (s.lse - lse).exp();
            for (o, x) in out.iter_mut().zip(&s.out) {
                *o += w * x;
            }
        }
        Self { out, lse }
    }
}

/// Merges `n_states` stacked partial states into one, as the kernel does.
///
/// `v` is `[n_states, n, head_dim]` and `s` is `[n_states, n]` (any `n`: rows times heads);
/// returns `(v_out [n, head_dim], s_out [n])`, computed in f64 and rounded to f32.
pub fn merge_states(
    v: &[f32],
    s: &[f32],
    n_states: usize,
    head_dim: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = check_shapes(v.len(), s.len(), n_states, head_dim)?;
    let mut v_out = Vec::with_capacity(n * head_dim);
    let mut s_out = Vec::with_capacity(n);
    for i in 0..n {
        let states: Vec<AttentionState> = (0..n_states)
            .map(|k| {
                let row = (k * n + i) * head_dim;
                AttentionState {
                    out: v[row..row + head_dim].iter().map(|&x| x as f64).collect(),
                    lse: s[k * n + i] as f64,
                }
            })
            .collect();
        let merged = AttentionState::merge_all(&states);
        v_out.extend(merged.out.iter().map(|&x| x as f32));
        s_out.push(merged.lse as f32);
    }
    Ok((v_out, s_out))
}

/// Checks `v` (`v_len` values) and `s` (`s_len`) as `[n_states, n, head_dim]` and `[n_states, n]`;
/// returns `n`.
pub(crate) fn check_shapes(
    v_len: usize,
    s_len: usize,
    n_states: usize,
    head_dim: usize,
) -> Result<usize> {
    if n_states == 0 || head_dim == 0 {
        return Err(Error::Shape(format!(
            "merge_states needs n_states > 0 and head_dim > 0, got {n_states} and {head_dim}"
        )));
    }
    if s_len % n_states != 0 {
        return Err(Error::Shape(format!(
            "s has {s_len} values, not a multiple of n_states = {n_states}"
        )));
    }
    let n = s_len / n_states;
    if v_len != n_states * n * head_dim {
        return Err(Error::Shape(format!(
            "v has {v_len} values, expected n_states * n * head_dim = {n_states} * {n} * {head_dim}"
        )));
    }
    Ok(n)
}
