//! Validation of a launch's inputs before anything runs: shapes, dtypes, head dims, positions,
//! shifts and the batch's limits.

use super::*;

/// Checks the packed query, the outputs, the batch's rows and every sequence ([`validate_io`],
/// [`check_batch_rows`], [`validate_sequences`]). `prefix(i)` names sequence `i` in messages.
pub(super) fn validate<K: KvTensor>(
    device: &Device,
    q: &Tensor,
    sequences: &[BatchSequence<'_, K>],
    dims: &AttentionDims,
    out: &Tensor,
    lse: &Tensor,
    prefix: impl Fn(usize) -> String,
) -> Result<()> {
    validate_io(device, q, dims, out, lse)?;
    check_batch_rows(q.shape()[0], sequences.iter().map(|s| s.n_rows))?;
    validate_sequences(device, sequences, dims, q.dtype(), prefix)
}

/// Checks the dims and the packed query and outputs: q `[n_rows, n_heads, head_dim]` in bf16 or
/// f16, out the same, lse `[n_rows, n_heads]` f32, all on `device`.
pub(crate) fn validate_io(
    device: &Device,
    q: &Tensor,
    dims: &AttentionDims,
    out: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    dims.validate()?;
    check_head_dim(dims.head_dim)?;
    let dtype = q.dtype();
    check_dtype(dtype)?;
    let qs = q.shape();
    if qs.len() != 3 || qs[1] != dims.n_heads || qs[2] != dims.head_dim {
        return Err(Error::Shape(format!(
            "query has shape {qs:?}, expected [n_rows, {}, {}]",
            dims.n_heads, dims.head_dim
        )));
    }
    q.check_device(device, "query")?;
    out.check_shape(qs, "out")?;
    out.check_dtype(dtype, "out")?;
    out.check_device(device, "out")?;
    lse.check_shape(&qs[..2], "lse")?;
    lse.check_dtype(DType::F32, "lse")?;
    lse.check_device(device, "lse")
}

/// Checks every sequence's segments (shapes, `dtype`, devices) and problem ([`check_problem`]).
/// `prefix(i)` names sequence `i` in messages.
pub(crate) fn validate_sequences<K: KvTensor>(
    device: &Device,
    sequences: &[BatchSequence<'_, K>],
    dims: &AttentionDims,
    dtype: DType,
    prefix: impl Fn(usize) -> String,
) -> Result<()> {
    for (j, seq) in sequences.iter().enumerate() {
        for (i, s) in seq.segments.iter().enumerate() {
            let name = |t: &str| format!("{}segment {i} {t}", prefix(j));
            let len = s.k.row_span().1;
            for (x, what) in [(s.k.tensor(), "k"), (s.v.tensor(), "v")] {
                let shape = x.shape();
                if shape.len() != 3 || shape[1] != dims.n_kv_heads || shape[2] != dims.head_dim {
                    return Err(Error::Shape(format!(
                        "{} has shape {shape:?}, expected [rows, {}, {}]",
                        name(what),
                        dims.n_kv_heads,
                        dims.head_dim
                    )));
                }
                x.check_dtype(dtype, &name(what))?;
                x.check_device(device, &name(what))?;
            }
            if s.v.row_span().1 != len {
                return Err(Error::Shape(format!(
                    "{} reads {len} rows of K but {} of V",
                    name("k"),
                    s.v.row_span().1
                )));
            }
        }
        // The addresses are read after validation (launch.rs: reading them queues waits on the
        // stream when cudarc tracks events), and the checks do not use them.
        let refs: Vec<SegmentRef> = seq.segments.iter().map(|s| s.at(0, 0)).collect();
        let seq_ref = SequenceRef {
            n_rows: seq.n_rows,
            pos_offset: seq.pos_offset,
            segments: &refs,
            ape: seq.ape,
        };
        check_problem(&seq_ref, dims, &prefix(j))?;
    }
    Ok(())
}

/// The most sequences one batched launch takes. (It was the limit of a second, combine kernel's
/// grid y, one per sequence; split mode now combines in the attention kernel, and the limit is
/// kept so that the API's bound does not change.)
pub const MAX_BATCH_SEQUENCES: usize = 65_535;

/// A batch's row counts must add up to the packed query's rows, and it must have at most
/// [`MAX_BATCH_SEQUENCES`] sequences.
pub(crate) fn check_batch_rows(
    total_rows: usize,
    rows: impl ExactSizeIterator<Item = usize>,
) -> Result<()> {
    let n = rows.len();
    if n > MAX_BATCH_SEQUENCES {
        return Err(Error::OutOfRange(format!(
            "{n} sequences exceed the batch limit of {MAX_BATCH_SEQUENCES}"
        )));
    }
    let mut sum = 0usize;
    for r in rows {
        sum = sum
            .checked_add(r)
            .ok_or_else(|| Error::OutOfRange("the sequences' rows overflow".into()))?;
    }
    if sum != total_rows {
        return Err(Error::Shape(format!(
            "the sequences own {sum} rows, the query has {total_rows}"
        )));
    }
    Ok(())
}

pub(crate) fn check_head_dim(head_dim: usize) -> Result<()> {
    if SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        Ok(())
    } else {
        Err(Error::UnsupportedHeadDim {
            op: "segmented_attention",
            head_dim,
            supported: SUPPORTED_HEAD_DIMS,
        })
    }
}

pub(crate) fn check_dtype(dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        Err(Error::DType(
            "segmented_attention takes bf16 or f16 inputs, got f32".into(),
        ))
    } else {
        Ok(())
    }
}

/// The most elements of K (and of V) one segment may hold, `len * n_kv_heads * head_dim`: the
/// kernel addresses the keys inside a segment with 32-bit offsets (kernels/tile_walk.cuh).
pub const MAX_SEGMENT_ELEMENTS: usize = i32::MAX as usize;

/// The kernel's limits on a sequence whose shapes are already consistent: 31-bit positions,
/// 32-bit row counts, the grid's 65535 KV heads, segments of at most [`MAX_SEGMENT_ELEMENTS`], and
/// RoPE shifts that fit the head dim (the segments' addresses are not read). `prefix` starts the messages (a batch's "sequence i: ").
pub(crate) fn check_problem(seq: &SequenceRef, dims: &AttentionDims, prefix: &str) -> Result<()> {
    let (n_rows, q_pos_offset, segments) = (seq.n_rows, seq.pos_offset, seq.segments);
    if dims.n_kv_heads > 65_535 {
        return Err(Error::OutOfRange(format!(
            "{} KV heads exceed the grid limit of 65535",
            dims.n_kv_heads
        )));
    }
    let fits = |end: usize, what: String| -> Result<()> {
        if end > i32::MAX as usize {
            Err(Error::OutOfRange(format!(
                "{what}: position {end} exceeds the kernel's 31-bit positions"
            )))
        } else {
            Ok(())
        }
    };
    // The kernel also forms positions of padding rows up to one tile past the last row.
    fits(
        q_pos_offset.saturating_add(n_rows + BLOCK_M),
        format!("{prefix}query rows"),
    )?;
    u32_of(n_rows.saturating_mul(dims.n_heads), "n_rows * n_heads")?;
    u32_of(
        n_rows
            .saturating_mul(dims.group_size())
            .saturating_add(BLOCK_M),
        "n_rows * group",
    )?;
    for (i, s) in segments.iter().enumerate() {
        fits(
            s.pos_offset.saturating_add(s.len),
            format!("{prefix}segment {i}"),
        )?;
        let elements = s
            .len
            .saturating_mul(dims.n_kv_heads)
            .saturating_mul(dims.head_dim);
        if elements > MAX_SEGMENT_ELEMENTS {
            return Err(Error::OutOfRange(format!(
                "{prefix}segment {i}: {} rows x {} KV heads x head dim {} = {elements} elements \
                 of K (and of V) exceed the kernel's {MAX_SEGMENT_ELEMENTS} per segment (it \
                 addresses a segment's keys with 32-bit offsets); split it into several segments",
                s.len, dims.n_kv_heads, dims.head_dim
            )));
        }
        if let Some(shift) = &s.rope_shift {
            shift.validate_for(dims.head_dim, &format!("{prefix}segment {i}"))?;
        }
    }
    Ok(())
}
