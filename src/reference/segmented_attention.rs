//! Scaled dot-product attention over a list of KV segments, with the APE correction (mirrors
//! `kernels/segmented_attention.cu`).
//!
//! Query row `r` (position `q_pos_offset + r`) and head `h` read KV head `h / (n_heads/n_kv_heads)`.
//! Key `t` of a segment sits at position `pos_offset + t`. A `Context` key is always visible; a
//! `Causal` key is visible when its position is `<= ` the row's position. With
//! `s_j = q.k_j / sqrt(d)`:
//! - context group `C` (visible Context keys): `L_C = LSE_C(s/T)`, `O_C = softmax(s/T) V`;
//! - causal group `O` (visible Causal keys): `L_O = LSE_O(s)`, `O_O = softmax(s) V`;
//! - output and LSE: [`super::ape::combine`] of the two.
//!
//! A segment with a [`RopeShift`] is read as if its keys had been rotated by `delta` positions
//! first ([`super::rope::shift`] on a copy): that is the definition the kernel's in-register
//! rotation of the query rows must match.
//!
//! Everything is computed in f64 from f32 inputs; outputs are rounded to f32.

use super::merge_states::AttentionState;
use super::{ape, rope};
use crate::error::{Error, Result};
use crate::params::{ApeParams, AttentionDims, RopeShift, SegmentRole};

/// One independently stored KV block, read in place.
///
/// `k` and `v` are `[len, n_kv_heads, head_dim]`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// Keys, `[len, n_kv_heads, head_dim]`.
    pub k: &'a [f32],
    /// Values, `[len, n_kv_heads, head_dim]`.
    pub v: &'a [f32],
    /// Number of tokens.
    pub len: usize,
    /// Absolute position of the first token (used by causal masking).
    pub pos_offset: usize,
    /// Masking and APE group.
    pub role: SegmentRole,
    /// Rotate the keys by this many RoPE positions as they are read (Block-Attention); `None`
    /// reads them as stored.
    pub rope_shift: Option<RopeShift>,
}

/// Query rows: `[n_rows, n_heads, head_dim]`, row `r` at position `pos_offset + r`.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    /// The rows, `[n_rows, n_heads, head_dim]`.
    pub data: &'a [f32],
    /// Number of rows.
    pub n_rows: usize,
    /// Absolute position of row 0.
    pub pos_offset: usize,
}

/// Output of an attention call: `out [n_rows, n_heads, head_dim]`, `lse [n_rows, n_heads]`
/// (natural log, f32; `-inf` for a row that sees no key, whose `out` is 0).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionOutput {
    /// Attention output, `[n_rows, n_heads, head_dim]`.
    pub out: Vec<f32>,
    /// Log-sum-exp of the (corrected) logits, `[n_rows, n_heads]`.
    pub lse: Vec<f32>,
}

/// Checks the query and every segment against `dims`.
pub fn validate(query: &Query, segments: &[Segment], dims: &AttentionDims) -> Result<()> {
    dims.validate()?;
    let q_expected = query.n_rows * dims.n_heads * dims.head_dim;
    if query.data.len() != q_expected {
        return Err(Error::Shape(format!(
            "query has {} values, expected n_rows * n_heads * head_dim = {} * {} * {}",
            query.data.len(),
            query.n_rows,
            dims.n_heads,
            dims.head_dim
        )));
    }
    let row = dims.n_kv_heads * dims.head_dim;
    for (i, seg) in segments.iter().enumerate() {
        for (name, buf) in [("k", seg.k), ("v", seg.v)] {
            if buf.len() != seg.len * row {
                return Err(Error::Shape(format!(
                    "segment {i}: {name} has {} values, expected len * n_kv_heads * head_dim = {} * {} * {}",
                    buf.len(),
                    seg.len,
                    dims.n_kv_heads,
                    dims.head_dim
                )));
            }
        }
        if let Some(shift) = &seg.rope_shift {
            shift.validate_for(dims.head_dim, &format!("segment {i}"))?;
        }
    }
    Ok(())
}

/// The keys of every shifted segment, rotated (`None` for the others).
fn shifted_keys(segments: &[Segment], dims: &AttentionDims) -> Result<Vec<Option<Vec<f32>>>> {
    segments
        .iter()
        .map(|seg| {
            seg.rope_shift
                .map(|shift| {
                    let mut k = seg.k.to_vec();
                    rope::shift(&mut k, seg.len, dims.n_kv_heads, &shift.rope, shift.delta)?;
                    Ok(k)
                })
                .transpose()
        })
        .collect()
}

/// The state of one query row and head over the visible keys of the segments whose role is
/// `role` (keys read as stored: `rope_shift` is resolved by [`segmented_attention`]), logits
/// scaled by `logit_scale`: `L = LSE_j(logit_scale * q.k_j)`,
/// `O = sum_j softmax_j(logit_scale * q.k) v_j`.
pub fn group_state(
    query: &Query,
    row: usize,
    head: usize,
    segments: &[Segment],
    dims: &AttentionDims,
    role: SegmentRole,
    logit_scale: f64,
) -> AttentionState {
    let d = dims.head_dim;
    let kvh = dims.kv_head(head);
    let q_pos = query.pos_offset + row;
    let q_at = (row * dims.n_heads + head) * d;
    let q = &query.data[q_at..q_at + d];

    // Visible keys as (logit, value row) pairs.
    let mut logits = Vec::new();
    let mut values = Vec::new();
    for seg in segments.iter().filter(|s| s.role == role) {
        for t in 0..seg.len {
            let visible = match seg.role {
                SegmentRole::Context => true,
                SegmentRole::Causal => seg.pos_offset + t <= q_pos,
            };
            if !visible {
                continue;
            }
            let at = (t * dims.n_kv_heads + kvh) * d;
            let dot: f64 = q
                .iter()
                .zip(&seg.k[at..at + d])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            logits.push(logit_scale * dot);
            values.push(&seg.v[at..at + d]);
        }
    }
    if logits.is_empty() {
        return AttentionState::empty(d);
    }
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|x| (x - m).exp()).sum();
    let mut out = vec![0.0; d];
    for (x, v) in logits.iter().zip(&values) {
        let p = (x - m).exp() / sum;
        for (o, &vi) in out.iter_mut().zip(v.iter()) {
            *o += p * vi as f64;
        }
    }
    AttentionState {
        out,
        lse: m + sum.ln(),
    }
}

/// Attention of every query row over all segments with the APE correction fused in: the oracle
/// for the segmented attention kernels (prefill and decode). `ApeParams::plain()` gives plain
/// softmax attention over the concatenation of all segments.
pub fn segmented_attention(
    query: &Query,
    segments: &[Segment],
    dims: &AttentionDims,
    ape: &ApeParams,
) -> Result<AttentionOutput> {
    validate(query, segments, dims)?;
    let rotated = shifted_keys(segments, dims)?;
    let segments: Vec<Segment> = segments
        .iter()
        .zip(&rotated)
        .map(|(seg, k)| Segment {
            k: k.as_deref().unwrap_or(seg.k),
            rope_shift: None,
            ..*seg
        })
        .collect();
    let segments = &segments[..];
    let d = dims.head_dim;
    let inv_sqrt_d = 1.0 / (d as f64).sqrt();
    let context_scale = inv_sqrt_d / ape.temperature() as f64;
    let mut out = Vec::with_capacity(query.n_rows * dims.n_heads * d);
    let mut lse = Vec::with_capacity(query.n_rows * dims.n_heads);
    for row in 0..query.n_rows {
        for head in 0..dims.n_heads {
            let state = |role, scale| group_state(query, row, head, segments, dims, role, scale);
            let context = state(SegmentRole::Context, context_scale);
            let causal = state(SegmentRole::Causal, inv_sqrt_d);
            let combined = ape::combine(&context, &causal, ape);
            out.extend(combined.out.iter().map(|&x| x as f32));
            lse.push(combined.lse as f32);
        }
    }
    Ok(AttentionOutput { out, lse })
}

/// One sequence of a batch: its rows of the packed query, its segments and its APE parameters
/// (mirrors [`crate::cuda::BatchSequence`]).
#[derive(Clone, Copy, Debug)]
pub struct BatchSequence<'a> {
    /// Rows of the packed query this sequence owns, after those of the sequences before it.
    pub n_rows: usize,
    /// Absolute position of its first row.
    pub pos_offset: usize,
    /// Its KV segments.
    pub segments: &'a [Segment<'a>],
    /// Its APE parameters.
    pub ape: ApeParams,
}

/// A batch of sequences, each attending to its own segments: the packed query `q`
/// `[sum of n_rows, n_heads, head_dim]` gives each sequence its rows in order, and the output
/// holds each sequence's [`segmented_attention`] in the same rows. The oracle for the batched
/// kernel launch.
pub fn segmented_attention_batch(
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
) -> Result<AttentionOutput> {
    let rows = validate_batch(q, sequences, dims)?;
    let row = dims.n_heads * dims.head_dim;
    let mut out = AttentionOutput {
        out: Vec::with_capacity(q.len()),
        lse: Vec::with_capacity(rows * dims.n_heads),
    };
    let mut first = 0;
    for (i, s) in sequences.iter().enumerate() {
        let query = Query {
            data: &q[first * row..(first + s.n_rows) * row],
            n_rows: s.n_rows,
            pos_offset: s.pos_offset,
        };
        let one = segmented_attention(&query, s.segments, dims, &s.ape)
            .map_err(|e| e.within(&format!("sequence {i}")))?;
        out.out.extend(one.out);
        out.lse.extend(one.lse);
        first += s.n_rows;
    }
    Ok(out)
}

/// Checks a batch before any work: `dims`, that the packed query holds the sequences' rows, and
/// each sequence's query and segments ([`validate`], errors naming the sequence). Returns the
/// number of rows.
pub fn validate_batch(
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
) -> Result<usize> {
    dims.validate()?;
    let row = dims.n_heads * dims.head_dim;
    let rows = sequences
        .iter()
        .try_fold(0usize, |sum, s| sum.checked_add(s.n_rows))
        .ok_or_else(|| Error::OutOfRange("the sequences' rows overflow".into()))?;
    if rows.checked_mul(row) != Some(q.len()) {
        return Err(Error::Shape(format!(
            "the query has {} values, the sequences own {rows} rows of {row}",
            q.len()
        )));
    }
    let mut first = 0;
    for (i, s) in sequences.iter().enumerate() {
        let query = Query {
            data: &q[first * row..(first + s.n_rows) * row],
            n_rows: s.n_rows,
            pos_offset: s.pos_offset,
        };
        validate(&query, s.segments, dims).map_err(|e| e.within(&format!("sequence {i}")))?;
        first += s.n_rows;
    }
    Ok(rows)
}
