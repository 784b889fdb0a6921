//! Segmented attention with the APE correction on the GPU (kernels/segmented_attention.cu;
//! oracle: [`crate::reference::segmented_attention`](mod@crate::reference::segmented_attention)).
//!
//! Query rows `[n_rows, n_heads, d]` attend to a list of KV segments read in place (each
//! `[len, n_kv_heads, d]`), Context segments with scale `1/(T*sqrt(d))`, Causal segments with
//! `1/sqrt(d)` and causal masking by absolute position; the two groups are combined with APE's
//! `a = S*T*L_C` (or `T*L_C + ln S`) and `b = L_O`: `out = sigmoid(a-b) O_C + (1-sigmoid(a-b)) O_O`,
//! `lse = ln(e^a + e^b)`. `ApeParams::plain()` is plain softmax over every key, which makes the same
//! launcher the sequential and the Block-Attention path.
//!
//! One launcher serves prefill (many rows) and decode (one row): when the question alone does not
//! fill the GPU, the keys are split across thread blocks (split-KV) and a second kernel merges the
//! partial states, group by group, before applying the APE correction.
//!
//! A segment with a [`RopeShift`] is read as if its keys were rotated by `delta` positions
//! (Block-Attention), without writing rotated keys anywhere: the kernel rotates its query rows by
//! `-delta` in registers instead (`q . R(delta) k = R(-delta) q . k`), once per segment.

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};

use super::rope_shift_table::rope_table;
use super::{DType, Device, Tensor, TensorRows};
use crate::error::{Error, Result};
use crate::params::{ApeParams, ApeVariant, AttentionDims, RopeShift, SegmentRole};

/// Keys per tile and packed query rows per thread block (kernels/segmented_attention.cu).
pub const BLOCK_N: usize = 64;
/// See [`BLOCK_N`].
pub const BLOCK_M: usize = 64;
pub(crate) const THREADS: u32 = 128;
/// Head dims the kernel is compiled for.
pub const SUPPORTED_HEAD_DIMS: &[usize] = &[64, 128];

/// One KV block on the device, read in place: `k` and `v` are `[len, n_kv_heads, head_dim]`.
///
/// `T` is the tensor type: for the launchers here, a [`Tensor`] or [`TensorRows`] (rows of a
/// larger tensor, such as a KV pool; see [`KvTensor`]); the GPU forward pass
/// ([`crate::llama::gpu::DeviceOps`]) uses the same struct for its other devices.
#[derive(Debug)]
pub struct Segment<'a, T = Tensor> {
    /// Keys, `[len, n_kv_heads, head_dim]`.
    pub k: &'a T,
    /// Values, same shape and dtype as `k`.
    pub v: &'a T,
    /// Absolute position of the first token (causal masking).
    pub pos_offset: usize,
    /// Masking and APE group.
    pub role: SegmentRole,
    /// Read the keys rotated by this many RoPE positions (Block-Attention: a block cached at
    /// position 0 used at its offset); `None` reads them as stored. The cache is not modified.
    pub rope_shift: Option<RopeShift>,
}

impl<T> Clone for Segment<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Segment<'_, T> {}

/// What a [`Segment`]'s K and V can be for the launchers here: a whole [`Tensor`]
/// (`[len, n_kv_heads, head_dim]`), or [`TensorRows`], some rows of a larger one (an engine's KV
/// pool, a preallocated block being filled), read in place.
pub trait KvTensor {
    /// The tensor holding the rows: `[rows, n_kv_heads, head_dim]`.
    fn tensor(&self) -> &Tensor;
    /// `(first row, rows)` the segment reads.
    fn row_span(&self) -> (usize, usize);
}

impl KvTensor for Tensor {
    fn tensor(&self) -> &Tensor {
        self
    }
    fn row_span(&self) -> (usize, usize) {
        (0, self.shape().first().copied().unwrap_or(0))
    }
}

impl KvTensor for TensorRows<'_> {
    fn tensor(&self) -> &Tensor {
        TensorRows::tensor(self)
    }
    fn row_span(&self) -> (usize, usize) {
        (self.start(), self.len())
    }
}

/// Query rows on the device: `data` is `[n_rows, n_heads, head_dim]`, row `r` at position
/// `pos_offset + r`. `T` as for [`Segment`].
#[derive(Debug)]
pub struct Query<'a, T = Tensor> {
    /// The rows.
    pub data: &'a T,
    /// Absolute position of row 0.
    pub pos_offset: usize,
}

impl<T> Clone for Query<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Query<'_, T> {}

/// One sequence of a batched launch ([`segmented_attention_batch_into`]): its rows of the packed
/// query (`n_rows` consecutive rows, after those of the sequences before it; row `r` at position
/// `pos_offset + r`), the segments they attend to, and its APE parameters. Sequences may share
/// segments (two requests over the same cached passage).
#[derive(Debug)]
pub struct BatchSequence<'a, T = Tensor> {
    /// Rows of the packed query this sequence owns (0: none).
    pub n_rows: usize,
    /// Absolute position of the sequence's first row.
    pub pos_offset: usize,
    /// Its KV segments.
    pub segments: &'a [Segment<'a, T>],
    /// Its APE parameters ([`ApeParams::plain`] for sequential and Block-Attention requests).
    pub ape: ApeParams,
}

impl<T> Clone for BatchSequence<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for BatchSequence<'_, T> {}

/// Launch options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentedAttentionOptions {
    /// Split the keys across this many thread blocks per query tile; `None` chooses from the
    /// problem size and the number of SMs. `Some(1)` forces the single-pass (fused) path.
    pub num_splits: Option<usize>,
}

/// Mirrors `ape::SegmentDesc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub(crate) struct SegmentDesc {
    k: u64,
    v: u64,
    len: u32,
    pos_offset: u32,
    role: u32,
    first_tile: u32,
    rope_row: i32,
    rope_layout: u32,
}
const _: () = assert!(std::mem::size_of::<SegmentDesc>() == 40);

/// Mirrors `ape::SegmentedAttentionParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SegmentedAttentionParams {
    n_rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    q_pos_offset: u32,
    n_segments: u32,
    n_ctx_tiles: u32,
    n_causal_tiles: u32,
    n_ctx_splits: u32,
    n_causal_splits: u32,
    whole: u32,
    variant: u32,
    ctx_scale_log2: f32,
    causal_scale_log2: f32,
    temperature: f32,
    scale: f32,
    q_row0: u32,
    seg0: u32,
    part0: u32,
    work0: u32,
}
const _: () = assert!(std::mem::size_of::<SegmentedAttentionParams>() == 80);

impl SegmentedAttentionParams {
    /// A sequence without rows: a thread block sent to it leaves at once, and the combine kernel
    /// skips it (whole).
    fn idle() -> Self {
        Self {
            group: 1,
            whole: 1,
            ..Self::zeroed()
        }
    }
}

/// Mirrors `ape::SegmentedAttentionLaunch`: the one sequence's parameters, or (a batch) the count
/// of the `seqs` array's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SegmentedAttentionLaunch {
    first: SegmentedAttentionParams,
    n_sequences: u32,
    pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<SegmentedAttentionLaunch>() == 96);
// SAFETY: #[repr(C)] plain-data struct with the same layout as the kernel's struct.
unsafe impl DeviceRepr for SegmentedAttentionLaunch {}

/// How a launch walks the keys: tiles in order (context first), and how they are split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the caller's segments, non-empty ones only, Context first (stable order).
    pub order: Vec<usize>,
    /// First tile of each segment in `order`.
    pub first_tile: Vec<u32>,
    /// Tiles of the context group (tiles `0..n_ctx_tiles`).
    pub n_ctx_tiles: u32,
    /// Tiles of the causal group (the rest).
    pub n_causal_tiles: u32,
    /// Thread blocks per query tile over the context tiles (split mode).
    pub n_ctx_splits: u32,
    /// Thread blocks per query tile over the causal tiles (split mode).
    pub n_causal_splits: u32,
    /// One pass over every tile with the APE correction fused (no workspace, no combine).
    pub whole: bool,
    /// Query tiles (`ceil(n_rows * group / BLOCK_M)`).
    pub q_tiles: u32,
}

impl Plan {
    /// Thread blocks per query tile (and KV head): the splits, or 1 in whole mode.
    pub fn n_splits(&self) -> u32 {
        if self.whole {
            1
        } else {
            self.n_ctx_splits + self.n_causal_splits
        }
    }
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::OutOfRange(format!("{what} = {x} does not fit in 32 bits")))
}

/// Resident thread blocks per SM of the attention kernel (80 KiB of shared memory, 96 KiB with
/// RoPE shifts, and up to 255 registers at head dim 128; `__launch_bounds__(128, 2)`).
pub const BLOCKS_PER_SM: usize = 2;

/// Plans a launch from the segments' lengths and roles. Pure: no device needed.
///
/// Whole mode when the query tiles times KV heads already fill one wave
/// (`BLOCKS_PER_SM * sm_count` thread blocks), or when asked with `num_splits = Some(1)`.
/// Otherwise the keys are split so that all splits together fill one wave, shared between the
/// groups in proportion to their tiles: each split covers tiles of one group only, and a context
/// split covers at least two tiles where there are enough.
pub fn plan(
    n_rows: usize,
    dims: &AttentionDims,
    segments: &[(usize, SegmentRole)],
    sm_count: usize,
    num_splits: Option<usize>,
) -> Result<Plan> {
    let mut order: Vec<usize> = Vec::with_capacity(segments.len());
    for role in [SegmentRole::Context, SegmentRole::Causal] {
        order.extend(
            segments
                .iter()
                .enumerate()
                .filter(|(_, (len, r))| *r == role && *len > 0)
                .map(|(i, _)| i),
        );
    }
    let mut first_tile = Vec::with_capacity(order.len());
    let (mut n_ctx_tiles, mut n_causal_tiles) = (0u64, 0u64);
    for &i in &order {
        let (len, role) = segments[i];
        let tiles = len.div_ceil(BLOCK_N) as u64;
        first_tile.push(u32_of(
            (n_ctx_tiles + n_causal_tiles) as usize,
            "tile index",
        )?);
        match role {
            SegmentRole::Context => n_ctx_tiles += tiles,
            SegmentRole::Causal => n_causal_tiles += tiles,
        }
    }
    let n_ctx_tiles = u32_of(n_ctx_tiles as usize, "context tiles")?;
    let n_causal_tiles = u32_of(n_causal_tiles as usize, "causal tiles")?;
    let total_tiles = n_ctx_tiles as usize + n_causal_tiles as usize;
    let packed = n_rows
        .checked_mul(dims.group_size())
        .ok_or_else(|| Error::OutOfRange("n_rows * group overflows".into()))?;
    let q_tiles = u32_of(packed.div_ceil(BLOCK_M), "query tiles")?;
    let base = q_tiles as usize * dims.n_kv_heads;

    let wave = BLOCKS_PER_SM * sm_count.max(1);
    let wanted = match num_splits {
        Some(0) => {
            return Err(Error::InvalidParameter {
                name: "num_splits",
                value: 0.0,
                requirement: "must be >= 1",
            })
        }
        Some(n) => n.min(total_tiles.max(1)),
        None if base >= wave => 1,
        None => (wave / base.max(1)).min(total_tiles.div_ceil(2)).max(1),
    };
    let mut p = Plan {
        order,
        first_tile,
        n_ctx_tiles,
        n_causal_tiles,
        n_ctx_splits: 0,
        n_causal_splits: 0,
        whole: true,
        q_tiles,
    };
    // No rows (a batch's idle sequence) or nothing to split: one pass, which does nothing.
    if wanted <= 1 || total_tiles <= 1 || q_tiles == 0 {
        return Ok(p);
    }
    // Share the splits between the groups in proportion to their tiles: at least one each for a
    // non-empty group, never more splits than tiles, and (wanted >= 2 here) never more than wanted.
    let (tc, to) = (n_ctx_tiles as usize, n_causal_tiles as usize);
    let (ctx, causal) = match (tc, to) {
        (0, to) => (0, wanted.min(to)),
        (tc, 0) => (wanted.min(tc), 0),
        (tc, to) => {
            let causal = ((wanted * to + total_tiles / 2) / total_tiles)
                .clamp(1, wanted - 1)
                .min(to);
            ((wanted - causal).min(tc), causal)
        }
    };
    p.n_ctx_splits = u32_of(ctx, "splits")?;
    p.n_causal_splits = u32_of(causal, "splits")?;
    p.whole = false;
    // Thread blocks share the grid's x (at most 2^31 - 1) with the query tiles and the other
    // sequences of a batch; launch_layout checks the total.
    let splits = u64::from(p.n_ctx_splits) + u64::from(p.n_causal_splits);
    if splits > i32::MAX as u64 {
        return Err(Error::OutOfRange(format!(
            "{splits} splits exceed the grid limit of 2^31 - 1"
        )));
    }
    Ok(p)
}

/// Plans a batched launch: one [`Plan`] per sequence (`(n_rows, segments)` as for [`plan`]).
///
/// A batch of one is planned as [`plan`] plans it. With `num_splits` set, every sequence gets
/// it. Otherwise, when the sequences' query tiles times KV heads already fill one wave, every
/// sequence runs whole; if not, the wave is shared between the sequences in proportion to their
/// work (query tiles times key tiles), and each splits its keys to fill its share, as [`plan`]
/// does for the whole wave.
pub fn plan_batch(
    sequences: &[(usize, &[(usize, SegmentRole)])],
    dims: &AttentionDims,
    sm_count: usize,
    num_splits: Option<usize>,
) -> Result<Vec<Plan>> {
    if sequences.len() == 1 || num_splits.is_some() {
        return sequences
            .iter()
            .map(|(rows, segs)| plan(*rows, dims, segs, sm_count, num_splits))
            .collect();
    }
    let wave = (BLOCKS_PER_SM * sm_count.max(1)) as u128;
    // (query tiles, key tiles) of each sequence.
    let sizes: Vec<(u128, u128)> = sequences
        .iter()
        .map(|(rows, segs)| {
            let packed = (*rows as u128) * dims.group_size() as u128;
            let tiles: u128 = segs
                .iter()
                .map(|(len, _)| len.div_ceil(BLOCK_N) as u128)
                .sum();
            (packed.div_ceil(BLOCK_M as u128), tiles)
        })
        .collect();
    let n_kv = dims.n_kv_heads as u128;
    let base: u128 = sizes.iter().map(|(qt, _)| qt * n_kv).sum();
    let work: u128 = sizes.iter().map(|(qt, kt)| qt * kt).sum();
    sequences
        .iter()
        .zip(&sizes)
        .map(|((rows, segs), &(qt, kt))| {
            let wanted = if base >= wave || work == 0 || qt == 0 {
                1
            } else {
                let share = wave * qt * kt / work;
                (share / (qt * n_kv)).min(kt.div_ceil(2)).max(1)
            };
            plan(*rows, dims, segs, sm_count, Some(wanted as usize))
        })
        .collect()
}

pub(crate) fn kernel_names(dtype: DType, head_dim: usize) -> (&'static str, &'static str) {
    match (dtype, head_dim) {
        (DType::BF16, 64) => (
            "segmented_attention_bf16_d64",
            "segmented_attention_combine_bf16_d64",
        ),
        (DType::BF16, _) => (
            "segmented_attention_bf16_d128",
            "segmented_attention_combine_bf16_d128",
        ),
        (_, 64) => (
            "segmented_attention_f16_d64",
            "segmented_attention_combine_f16_d64",
        ),
        _ => (
            "segmented_attention_f16_d128",
            "segmented_attention_combine_f16_d128",
        ),
    }
}

/// Checks the packed query, the outputs, the batch's rows and every sequence ([`validate_io`],
/// [`check_batch_rows`], [`validate_sequences`]). `prefix(i)` names sequence `i` in messages.
fn validate<K: KvTensor>(
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
        let extents: Vec<SegmentExtent> = seq
            .segments
            .iter()
            .map(|s| SegmentExtent {
                len: s.k.row_span().1,
                pos_offset: s.pos_offset,
                rope_shift: s.rope_shift,
            })
            .collect();
        check_problem(seq.n_rows, seq.pos_offset, dims, &extents, &prefix(j))?;
    }
    Ok(())
}

/// The most sequences one batched launch takes (the combine kernel's grid has one y per sequence).
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

/// A segment's extent in positions and its shift: what the limits below are about.
pub(crate) struct SegmentExtent {
    pub len: usize,
    pub pos_offset: usize,
    pub rope_shift: Option<RopeShift>,
}

/// The kernel's limits on a problem whose shapes are already consistent: 31-bit positions,
/// 32-bit row counts, the grid's 65535 KV heads, and RoPE shifts that fit the head dim. `prefix`
/// starts the messages (a batch's "sequence i: ").
pub(crate) fn check_problem(
    n_rows: usize,
    q_pos_offset: usize,
    dims: &AttentionDims,
    segments: &[SegmentExtent],
    prefix: &str,
) -> Result<()> {
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
        if let Some(shift) = &s.rope_shift {
            shift.validate_for(dims.head_dim, &format!("{prefix}segment {i}"))?;
        }
    }
    Ok(())
}

/// A segment as a launch sees it: the addresses of its K and V (device pointers, or host
/// addresses for the kernel emulator) and how to read them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegmentRef {
    pub k: u64,
    pub v: u64,
    pub len: usize,
    pub pos_offset: usize,
    pub role: SegmentRole,
    pub rope_shift: Option<RopeShift>,
}

/// A sequence as a launch sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SequenceRef<'a> {
    pub n_rows: usize,
    pub pos_offset: usize,
    pub segments: &'a [SegmentRef],
    pub ape: ApeParams,
}

/// The sequences of a launch, `(n_rows, pos_offset, n_segments, ape)` each, over their segments
/// in `refs` (each sequence's `n_segments`, in order).
pub(crate) fn sequence_refs(
    refs: &[SegmentRef],
    sequences: impl IntoIterator<Item = (usize, usize, usize, ApeParams)>,
) -> Vec<SequenceRef<'_>> {
    let mut at = 0;
    sequences
        .into_iter()
        .map(|(n_rows, pos_offset, n_segments, ape)| {
            at += n_segments;
            SequenceRef {
                n_rows,
                pos_offset,
                segments: &refs[at - n_segments..at],
                ape,
            }
        })
        .collect()
}

/// Threads per block of the combine kernel (one warp per (row, head)).
pub(crate) const COMBINE_THREADS: u32 = 256;

/// Everything a launch takes besides the buffers: what the CUDA launcher and the kernel emulator
/// both hand the kernels.
#[derive(Clone, Debug)]
pub(crate) struct LaunchLayout {
    /// Descriptors, sequence after sequence, each sequence's in its tile order (one zeroed
    /// descriptor when every segment is empty).
    pub descs: Vec<SegmentDesc>,
    /// RoPE shift table, `head_dim / 2` (cos, sin) pairs per row; empty without shifts.
    pub rope_table: Vec<f32>,
    /// A batch's per-sequence parameters and each thread block's sequence (`blockIdx.x`); both
    /// empty for one sequence, whose parameters travel in `launch`.
    pub seqs: Vec<SegmentedAttentionParams>,
    pub work: Vec<u32>,
    pub launch: SegmentedAttentionLaunch,
    pub main: &'static str,
    pub combine: &'static str,
    /// The main kernel's grid: (thread blocks of all sequences, KV heads, 1); x may be 0 (no
    /// rows at all: nothing to launch).
    pub grid: (u32, u32, u32),
    /// Dynamic shared memory of this launch, and the most any launch of `main` takes.
    pub smem: usize,
    pub smem_limit: usize,
    /// Split mode's workspace: partial outputs, then partial LSEs (f32 elements).
    pub o_len: usize,
    pub lse_len: usize,
    /// The combine kernel's grid (one y per sequence), when some sequence runs split.
    pub combine_grid: Option<(u32, u32, u32)>,
}

impl LaunchLayout {
    /// The launch's parameter arrays in one upload, each part 16-byte aligned: descriptors, RoPE
    /// table, sequence parameters, work list, written into `bytes` (cleared first; its capacity
    /// is reused); returns the byte offset of each part.
    pub(crate) fn upload_bytes_into(&self, bytes: &mut Vec<u8>) -> [usize; 4] {
        let mut offsets = [0usize; 4];
        let parts: [&[u8]; 4] = [
            bytemuck::cast_slice(&self.descs),
            bytemuck::cast_slice(&self.rope_table),
            bytemuck::cast_slice(&self.seqs),
            bytemuck::cast_slice(&self.work),
        ];
        let total: usize = parts.iter().map(|p| p.len().next_multiple_of(16)).sum();
        bytes.clear();
        bytes.reserve(total);
        for (i, part) in parts.into_iter().enumerate() {
            bytes.resize(bytes.len().next_multiple_of(16), 0);
            offsets[i] = bytes.len();
            bytes.extend_from_slice(part);
        }
        offsets
    }

    /// Hands the layout's RoPE table back for the thread's next launch (a large batch's is
    /// megabytes, faulted in page by page when allocated anew).
    pub(crate) fn recycle(self) {
        super::rope_shift_table::recycle(self.rope_table);
    }
}

thread_local! {
    /// The upload image buffer of the thread's last launch, reused by its next.
    static SPARE_UPLOAD: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An upload image buffer, empty, with the capacity of the thread's last launch's.
pub(crate) fn spare_upload() -> Vec<u8> {
    SPARE_UPLOAD.take()
}

/// Hands an upload image back (once its copy has been queued) for the thread's next launch.
pub(crate) fn recycle_upload(bytes: Vec<u8>) {
    keep_larger(&SPARE_UPLOAD, bytes);
}

/// Puts the larger of `buffer` and the thread's spare back as the spare (a launch may hand back a
/// smaller buffer than the spare it did not take: a table of a launch without shifts).
pub(crate) fn keep_larger<T: 'static>(
    spare: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    buffer: Vec<T>,
) {
    let kept = spare.take();
    spare.set(if buffer.capacity() >= kept.capacity() {
        buffer
    } else {
        kept
    });
}

/// Dynamic shared memory of the attention kernel at `head_dim`: Q, two K and two V tiles; and
/// with RoPE shifts, one more tile for the rotated rows' lo parts (the function's limit).
pub(crate) fn smem_bytes(head_dim: usize) -> (usize, usize) {
    let plain = (BLOCK_M + 4 * BLOCK_N) * head_dim * 2;
    (plain, plain + BLOCK_M * head_dim * 2)
}

/// Plans a launch of one or more sequences and lays out its descriptors, RoPE table and
/// parameters. Pure: the inputs are already validated ([`check_problem`] for each sequence).
pub(crate) fn launch_layout(
    sequences: &[SequenceRef],
    dims: &AttentionDims,
    dtype: DType,
    sm_count: usize,
    num_splits: Option<usize>,
) -> Result<LaunchLayout> {
    if sequences.is_empty() {
        return Err(Error::Shape("a launch needs at least one sequence".into()));
    }
    let lens: Vec<Vec<(usize, SegmentRole)>> = sequences
        .iter()
        .map(|q| q.segments.iter().map(|s| (s.len, s.role)).collect())
        .collect();
    let shapes: Vec<(usize, &[(usize, SegmentRole)])> = sequences
        .iter()
        .zip(&lens)
        .map(|(q, l)| (q.n_rows, l.as_slice()))
        .collect();
    let plans = plan_batch(&shapes, dims, sm_count, num_splits)?;
    let ordered: Vec<&SegmentRef> = sequences
        .iter()
        .zip(&plans)
        .flat_map(|(q, p)| p.order.iter().map(|&i| &q.segments[i]))
        .collect();
    let shifts: Vec<Option<RopeShift>> = ordered.iter().map(|s| s.rope_shift).collect();
    let (table, rope_rows) = rope_table(&shifts);
    let first_tiles = plans.iter().flat_map(|p| p.first_tile.iter().copied());
    let mut descs: Vec<SegmentDesc> = ordered
        .iter()
        .zip(first_tiles)
        .zip(&rope_rows)
        .map(|((s, first_tile), &rope_row)| SegmentDesc {
            k: s.k,
            v: s.v,
            len: s.len as u32,
            pos_offset: s.pos_offset as u32,
            role: s.role as u32,
            first_tile,
            rope_row,
            rope_layout: s.rope_shift.map_or(0, |r| r.rope.layout as u32),
        })
        .collect();
    if descs.is_empty() {
        descs.push(SegmentDesc::zeroed());
    }

    let inv_sqrt_d = 1.0 / (dims.head_dim as f64).sqrt();
    let log2e = std::f64::consts::LOG2_E;
    // The grid's x: every sequence's thread blocks, at most 2^31 - 1 (checked before the work
    // list is built: it holds one entry per thread block).
    let n_work = plans.iter().try_fold(0u64, |sum, p| {
        sum.checked_add(u64::from(p.q_tiles) * u64::from(p.n_splits()))
    });
    let n_work = match n_work {
        Some(n) if n <= i32::MAX as u64 => n as u32,
        _ => {
            return Err(Error::OutOfRange(
                "the launch needs more than 2^31 - 1 thread blocks".into(),
            ))
        }
    };
    let (mut q_row0, mut seg0, mut part0, mut work0) = (0usize, 0usize, 0usize, 0usize);
    let mut seqs = Vec::with_capacity(sequences.len());
    let mut work: Vec<u32> = Vec::new();
    for (i, (q, plan)) in sequences.iter().zip(&plans).enumerate() {
        let n = q.n_rows * dims.n_heads;
        let blocks = plan.q_tiles as usize * plan.n_splits() as usize;
        let ape = &q.ape;
        seqs.push(SegmentedAttentionParams {
            n_rows: q.n_rows as u32,
            n_heads: dims.n_heads as u32,
            n_kv_heads: dims.n_kv_heads as u32,
            group: dims.group_size() as u32,
            q_pos_offset: q.pos_offset as u32,
            n_segments: plan.order.len() as u32,
            n_ctx_tiles: plan.n_ctx_tiles,
            n_causal_tiles: plan.n_causal_tiles,
            n_ctx_splits: plan.n_ctx_splits,
            n_causal_splits: plan.n_causal_splits,
            whole: plan.whole as u32,
            variant: match ape.variant() {
                ApeVariant::Released => 0,
                ApeVariant::ScaledMass => 1,
            },
            ctx_scale_log2: (log2e * inv_sqrt_d / ape.temperature() as f64) as f32,
            causal_scale_log2: (log2e * inv_sqrt_d) as f32,
            temperature: ape.temperature(),
            scale: ape.scale(),
            q_row0: u32_of(q_row0, "query rows before a sequence")?,
            seg0: u32_of(seg0, "segments before a sequence")?,
            part0: u32_of(part0, "partial states before a sequence")?,
            work0: u32_of(work0, "thread blocks before a sequence")?,
        });
        if sequences.len() > 1 {
            work.extend(std::iter::repeat_n(i as u32, blocks));
        }
        q_row0 += q.n_rows;
        seg0 += plan.order.len();
        if !plan.whole {
            part0 += plan.n_splits() as usize * n;
        }
        work0 += blocks;
    }
    debug_assert_eq!(work0, n_work as usize);
    // Partial states: O [part0, head_dim] then LSE [part0] (whole mode reads neither, but the
    // kernel takes valid pointers).
    let o_len = (part0 * dims.head_dim).max(1);
    let lse_len = part0.max(1);

    let (main, combine) = kernel_names(dtype, dims.head_dim);
    // The function's limit is set once, to the larger size (with RoPE shifts).
    let (smem_plain, smem_limit) = smem_bytes(dims.head_dim);
    let smem = if table.is_empty() {
        smem_plain
    } else {
        smem_limit
    };
    let grid = (n_work, dims.n_kv_heads as u32, 1);
    // Sequences without rows always run whole (plan), so a split sequence has rows.
    let combine_grid = if plans.iter().all(|p| p.whole) {
        None
    } else {
        let most = sequences
            .iter()
            .zip(&plans)
            .filter(|(_, p)| !p.whole)
            .map(|(q, _)| q.n_rows * dims.n_heads)
            .max()
            .unwrap_or(0);
        let blocks = u32_of(
            (most * 32).div_ceil(COMBINE_THREADS as usize),
            "combine blocks",
        )?;
        (blocks > 0).then_some((blocks, sequences.len() as u32, 1))
    };
    let launch = SegmentedAttentionLaunch {
        first: seqs[0],
        n_sequences: sequences.len() as u32,
        pad: [0; 3],
    };
    if sequences.len() == 1 {
        seqs.clear();
    }
    Ok(LaunchLayout {
        descs,
        rope_table: table,
        seqs,
        work,
        launch,
        main,
        combine,
        grid,
        smem,
        smem_limit,
        o_len,
        lse_len,
        combine_grid,
    })
}

/// A segment as [`launch_host_bytes`] takes it: `(len, pos_offset, role, rope_shift)`.
#[doc(hidden)]
pub type HostSegment = (usize, usize, SegmentRole, Option<RopeShift>);

/// The host half of a batched launch without a device, for `benches/host.rs`: the segments'
/// references (fake addresses), the plan, the descriptors, the RoPE table, the sequences'
/// parameters and the upload image, as the launcher builds them; returns the upload's size in
/// bytes. `sequences` are `(n_rows, pos_offset, segments, ape)`, assumed valid. Not a stable API.
#[doc(hidden)]
pub fn launch_host_bytes(
    sequences: &[(usize, usize, &[HostSegment], ApeParams)],
    dims: &AttentionDims,
    dtype: DType,
    sm_count: usize,
) -> Result<usize> {
    let refs: Vec<SegmentRef> = sequences
        .iter()
        .flat_map(|(_, _, segments, _)| segments.iter())
        .enumerate()
        .map(|(i, &(len, pos_offset, role, rope_shift))| SegmentRef {
            k: 0x1000_0000 + (i as u64) * 0x10_0000,
            v: 0x8000_0000 + (i as u64) * 0x10_0000,
            len,
            pos_offset,
            role,
            rope_shift,
        })
        .collect();
    let seq_refs = sequence_refs(
        &refs,
        sequences
            .iter()
            .map(|&(n_rows, pos, segments, ape)| (n_rows, pos, segments.len(), ape)),
    );
    let layout = launch_layout(&seq_refs, dims, dtype, sm_count, None)?;
    let mut bytes = spare_upload();
    layout.upload_bytes_into(&mut bytes);
    let size = bytes.len();
    layout.recycle();
    recycle_upload(bytes);
    Ok(size)
}

/// The most a [`super::CapturableBatch`] launch takes: every launch's grids, parameter arrays and
/// workspace are sized from it once, so that they never change between launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchCapacity {
    /// Sequences per launch (at least 1, at most [`MAX_BATCH_SEQUENCES`] - 1).
    pub sequences: usize,
    /// Query rows of all the sequences together (at least 1).
    pub rows: usize,
    /// Segments of all the sequences together, empty ones included (at least 1).
    pub segments: usize,
}

impl BatchCapacity {
    /// Errors unless sequences of these `(n_rows, n_segments)` fit the capacity; returns their
    /// rows.
    pub(crate) fn check_fits(
        &self,
        sequences: impl ExactSizeIterator<Item = (usize, usize)>,
    ) -> Result<usize> {
        let n = sequences.len();
        let over = |what: &str, n: String, cap: usize| {
            Error::OutOfRange(format!("{n} {what} exceed the batch's capacity of {cap}"))
        };
        if n == 0 {
            return Err(Error::Shape("a launch needs at least one sequence".into()));
        }
        if n > self.sequences {
            return Err(over("sequences", n.to_string(), self.sequences));
        }
        let (mut rows, mut segments) = (0usize, 0usize);
        for (r, s) in sequences {
            rows = rows.saturating_add(r);
            segments = segments.saturating_add(s);
        }
        if rows > self.rows {
            return Err(over("query rows", rows.to_string(), self.rows));
        }
        if segments > self.segments {
            return Err(over("segments", segments.to_string(), self.segments));
        }
        Ok(rows)
    }
}

/// The fixed shape of a capturable launch: sizes derived from a [`BatchCapacity`] that bound
/// every launch [`launch_layout`] can plan within it, and the parameter image's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FixedShape {
    pub capacity: BatchCapacity,
    /// Descriptor slots, and f32 values of the RoPE shift table (a row per shifted segment).
    pub desc_slots: usize,
    pub rope_len: usize,
    /// Entries of the `seqs` array: the capacity's sequences and one idle sequence, which the
    /// thread blocks a launch does not need are sent to.
    pub seq_slots: usize,
    /// The main kernel's grid x (thread blocks per KV head), and the combine kernel's.
    pub blocks: u32,
    pub combine_blocks: u32,
    /// Partial states of the workspace ((row, head) entries of every split).
    pub parts: usize,
    /// Byte offsets of the image's four parts (as [`LaunchLayout::upload_bytes_into`]) and its size.
    pub offsets: [usize; 4],
    pub bytes: usize,
    pub head_dim: usize,
    pub n_heads: usize,
}

impl FixedShape {
    /// The shape for `capacity` on a device of `sm_count` SMs, planned as [`launch_layout`] plans
    /// with `num_splits`.
    ///
    /// The bounds: a sequence of `r` rows has `ceil(r * group / 64)` query tiles, at most
    /// `r * ceil(group / 64)` and at most `r * group / 64 + 1`. With `num_splits = Some(n)`, each
    /// query tile has at most `n` thread blocks and each (row, head) at most `n` partial states.
    /// Chosen splits ([`plan_batch`]) happen only when the query tiles times KV heads (`base`)
    /// are under one wave (`W = BLOCKS_PER_SM * sm_count`); a sequence then has
    /// `s <= max(1, share / (q_tiles * n_kv_heads))` splits with shares adding up to at most `W`,
    /// so the thread blocks number at most `q_tiles + W / n_kv_heads`, every `s` is at most
    /// `W / n_kv_heads`, and the partial states number at most `64 * (base + W) < 128 W`.
    pub fn new(
        capacity: &BatchCapacity,
        dims: &AttentionDims,
        sm_count: usize,
        num_splits: Option<usize>,
    ) -> Result<Self> {
        dims.validate()?;
        check_head_dim(dims.head_dim)?;
        let BatchCapacity {
            sequences,
            rows,
            segments,
        } = *capacity;
        if sequences == 0 || rows == 0 || segments == 0 {
            return Err(Error::InvalidParameter {
                name: "capacity",
                value: 0.0,
                requirement: "sequences, rows and segments must each be at least 1",
            });
        }
        if sequences >= MAX_BATCH_SEQUENCES {
            return Err(Error::OutOfRange(format!(
                "a capacity of {sequences} sequences: at most {} (the combine grid's y holds \
                 one more, an idle sequence)",
                MAX_BATCH_SEQUENCES - 1
            )));
        }
        if num_splits == Some(0) {
            return Err(Error::InvalidParameter {
                name: "num_splits",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        let too_big = || Error::OutOfRange(format!("capacity {capacity:?} is too large"));
        let group = dims.group_size();
        let n_kv = dims.n_kv_heads;
        let wave = BLOCKS_PER_SM * sm_count.max(1);
        let q_tiles = rows
            .checked_mul(group.div_ceil(BLOCK_M))
            .ok_or_else(too_big)?
            .min((rows.saturating_mul(group) / BLOCK_M).saturating_add(sequences));
        let heads_rows = rows.checked_mul(dims.n_heads).ok_or_else(too_big)?;
        let (blocks, parts) = match num_splits {
            Some(n) => (
                q_tiles.checked_mul(n),
                n.checked_mul(heads_rows).ok_or_else(too_big)?,
            ),
            None => (
                q_tiles.checked_add(wave.div_ceil(n_kv)),
                (2 * BLOCK_M * wave).min(wave.div_ceil(n_kv).saturating_mul(heads_rows)),
            ),
        };
        let blocks = blocks
            .filter(|&b| b <= i32::MAX as usize)
            .ok_or_else(too_big)? as u32;
        let combine_blocks = u32_of(
            heads_rows
                .checked_mul(32)
                .ok_or_else(too_big)?
                .div_ceil(COMBINE_THREADS as usize),
            "combine blocks",
        )?;
        parts.checked_mul(dims.head_dim).ok_or_else(too_big)?;
        let rope_len = segments.checked_mul(dims.head_dim).ok_or_else(too_big)?;
        let seq_slots = sequences + 1;
        let sizes = [
            segments.checked_mul(std::mem::size_of::<SegmentDesc>()),
            rope_len.checked_mul(4),
            Some(seq_slots * std::mem::size_of::<SegmentedAttentionParams>()),
            (blocks as usize).checked_mul(4),
        ];
        let mut offsets = [0usize; 4];
        let mut bytes = 0usize;
        for (i, size) in sizes.into_iter().enumerate() {
            offsets[i] = bytes.next_multiple_of(16);
            bytes = size
                .and_then(|s| offsets[i].checked_add(s))
                .ok_or_else(too_big)?;
        }
        Ok(Self {
            capacity: *capacity,
            desc_slots: segments,
            rope_len,
            seq_slots,
            blocks,
            combine_blocks,
            parts,
            offsets,
            bytes,
            head_dim: dims.head_dim,
            n_heads: dims.n_heads,
        })
    }

    /// `layout` (planned for at most this shape's capacity) as the parameter image of a fixed
    /// launch: every part at its fixed offset and padded, a `seqs` array and work list even for
    /// one sequence, the idle sequence after the real ones and the work list's surplus thread
    /// blocks sent to it. Its launches take [`FixedShape::launch_params`].
    ///
    /// The bytes [`Self::image_into`] leaves are poisoned (all ones: NaN table values, descriptors
    /// pointing nowhere), so that the kernel emulator, which launches this image, catches a
    /// launch that reads them.
    #[cfg(any(test, feature = "emulator"))]
    pub fn image(&self, layout: &LaunchLayout) -> Result<Vec<u8>> {
        let mut bytes = vec![0xffu8; self.bytes];
        self.image_into(layout, &mut bytes)?;
        Ok(bytes)
    }

    /// [`Self::image`] written into `bytes` (this shape's size), which is left untouched on an
    /// error. Bytes outside the parts' used extents keep what they held: the launch reads none of
    /// them (descriptors and table rows past the sequences', padding).
    pub fn image_into(&self, layout: &LaunchLayout, bytes: &mut [u8]) -> Result<()> {
        if bytes.len() != self.bytes {
            return Err(Error::Shape(format!(
                "a fixed launch's image is {} bytes, not {}",
                self.bytes,
                bytes.len()
            )));
        }
        let mut seqs = if layout.seqs.is_empty() {
            vec![layout.launch.first]
        } else {
            layout.seqs.clone()
        };
        let n_seqs = seqs.len();
        let mut work = if layout.work.is_empty() {
            vec![0u32; layout.grid.0 as usize]
        } else {
            layout.work.clone()
        };
        // The capacity's checks come first (CapturableBatch::prepare); past them, these hold by
        // the bounds of FixedShape::new.
        let fits = layout.descs.len() <= self.desc_slots
            && layout.rope_table.len() <= self.rope_len
            && n_seqs < self.seq_slots
            && work.len() <= self.blocks as usize
            && layout.o_len <= (self.parts * self.head_dim).max(1)
            && layout
                .combine_grid
                .is_none_or(|g| g.0 <= self.combine_blocks);
        if !fits {
            return Err(Error::OutOfRange(format!(
                "the launch ({} sequences, {} descriptors, {} thread blocks, {} partial states) \
                 does not fit the fixed shape planned for {:?}",
                n_seqs,
                layout.descs.len(),
                work.len(),
                layout.lse_len,
                self.capacity
            )));
        }
        seqs.resize(self.seq_slots, SegmentedAttentionParams::idle());
        work.resize(self.blocks as usize, n_seqs as u32);
        let parts: [&[u8]; 4] = [
            bytemuck::cast_slice(&layout.descs),
            bytemuck::cast_slice(&layout.rope_table),
            bytemuck::cast_slice(&seqs),
            bytemuck::cast_slice(&work),
        ];
        for (part, at) in parts.into_iter().zip(self.offsets) {
            bytes[at..at + part.len()].copy_from_slice(part);
        }
        Ok(())
    }

    /// The by-value parameters of every launch of this shape: the sequences are in the `seqs`
    /// array, all `seq_slots` of them.
    pub fn launch_params(&self) -> SegmentedAttentionLaunch {
        SegmentedAttentionLaunch {
            first: SegmentedAttentionParams::idle(),
            n_sequences: self.seq_slots as u32,
            pad: [0; 3],
        }
    }
}

/// Attention of the query over all segments with the APE correction; returns new
/// `(out [n_rows, n_heads, head_dim], lse [n_rows, n_heads] f32)`.
pub fn segmented_attention<K: KvTensor>(
    device: &Device,
    query: &Query,
    segments: &[Segment<'_, K>],
    dims: &AttentionDims,
    ape: &ApeParams,
) -> Result<(Tensor, Tensor)> {
    let (mut out, mut lse) = new_outputs(device, query.data)?;
    segmented_attention_into(
        device,
        query,
        segments,
        dims,
        ape,
        &mut out,
        &mut lse,
        &SegmentedAttentionOptions::default(),
    )?;
    Ok((out, lse))
}

fn new_outputs(device: &Device, q: &Tensor) -> Result<(Tensor, Tensor)> {
    let shape = q.shape();
    if shape.len() != 3 {
        return Err(Error::Shape(format!(
            "query has shape {shape:?}, expected [n_rows, n_heads, head_dim]"
        )));
    }
    Ok((
        Tensor::zeros(device, shape, q.dtype())?,
        Tensor::zeros(device, &shape[..2], DType::F32)?,
    ))
}

/// [`segmented_attention`] into caller-provided outputs, with launch options.
#[allow(clippy::too_many_arguments)]
pub fn segmented_attention_into<K: KvTensor>(
    device: &Device,
    query: &Query,
    segments: &[Segment<'_, K>],
    dims: &AttentionDims,
    ape: &ApeParams,
    out: &mut Tensor,
    lse: &mut Tensor,
    options: &SegmentedAttentionOptions,
) -> Result<()> {
    let seq = BatchSequence {
        n_rows: query.data.shape().first().copied().unwrap_or(0),
        pos_offset: query.pos_offset,
        segments,
        ape: *ape,
    };
    validate(device, query.data, &[seq], dims, out, lse, |_| {
        String::new()
    })?;
    launch(device, query.data, &[seq], dims, out, lse, options)
}

/// Segmented attention for a batch of sequences in one launch (and at most one combine launch):
/// sequence `i` owns `sequences[i].n_rows` consecutive rows of the packed query `q`
/// `[total_rows, n_heads, head_dim]`, attends to its own segments with its own APE parameters,
/// and gets the rows of `out` and `lse` that [`segmented_attention`] would give it alone (up to
/// rounding: a batch may split a sequence's keys differently; with a fixed `num_splits`, the same
/// bits).
/// Returns new `(out, lse)`.
///
/// This is how an engine runs one decode step (or a mixed prefill and decode step) of many
/// requests: the thread blocks of all sequences share one grid, and short sequences split their
/// keys to fill what the others leave ([`plan_batch`]).
pub fn segmented_attention_batch<K: KvTensor>(
    device: &Device,
    q: &Tensor,
    sequences: &[BatchSequence<'_, K>],
    dims: &AttentionDims,
) -> Result<(Tensor, Tensor)> {
    let (mut out, mut lse) = new_outputs(device, q)?;
    segmented_attention_batch_into(
        device,
        q,
        sequences,
        dims,
        &mut out,
        &mut lse,
        &SegmentedAttentionOptions::default(),
    )?;
    Ok((out, lse))
}

/// [`segmented_attention_batch`] into caller-provided outputs, with launch options
/// (`num_splits` applies to every sequence).
pub fn segmented_attention_batch_into<K: KvTensor>(
    device: &Device,
    q: &Tensor,
    sequences: &[BatchSequence<'_, K>],
    dims: &AttentionDims,
    out: &mut Tensor,
    lse: &mut Tensor,
    options: &SegmentedAttentionOptions,
) -> Result<()> {
    validate(device, q, sequences, dims, out, lse, |i| {
        format!("sequence {i}: ")
    })?;
    launch(device, q, sequences, dims, out, lse, options)
}

/// The layout of a launch of validated sequences on a device ([`launch_layout`] over their
/// segments' device addresses), and the guards that record the segments' reads on `stream` when
/// dropped (keep them until the launch is queued).
pub(crate) fn device_layout<'a, K: KvTensor>(
    stream: &'a CudaStream,
    sequences: &[BatchSequence<'a, K>],
    dims: &AttentionDims,
    dtype: DType,
    sm_count: usize,
    num_splits: Option<usize>,
) -> Result<(LaunchLayout, Vec<SyncOnDrop<'a>>)> {
    let (refs, guards) = device_segment_refs(stream, sequences, dims, dtype);
    let seq_refs = sequence_refs(
        &refs,
        sequences
            .iter()
            .map(|s| (s.n_rows, s.pos_offset, s.segments.len(), s.ape)),
    );
    let layout = launch_layout(&seq_refs, dims, dtype, sm_count, num_splits)?;
    Ok((layout, guards))
}

/// The device addresses of validated sequences' segments, in order, and the guards that record
/// their reads on `stream` when dropped.
fn device_segment_refs<'a, K: KvTensor>(
    stream: &'a CudaStream,
    sequences: &[BatchSequence<'a, K>],
    dims: &AttentionDims,
    dtype: DType,
) -> (Vec<SegmentRef>, Vec<SyncOnDrop<'a>>) {
    let n_segments: usize = sequences.iter().map(|s| s.segments.len()).sum();
    let mut guards = Vec::with_capacity(2 * n_segments);
    let mut refs = Vec::with_capacity(n_segments);
    // Bytes per row of K or V; validation checked both tensors' rows against dims.
    let row_bytes = (dims.n_kv_heads * dims.head_dim * dtype.size()) as u64;
    for s in sequences.iter().flat_map(|q| q.segments) {
        let ((k_start, len), (v_start, _)) = (s.k.row_span(), s.v.row_span());
        let (k, k_sync) = s.k.tensor().device_buffer().device_ptr(stream);
        let (v, v_sync) = s.v.tensor().device_buffer().device_ptr(stream);
        guards.push(k_sync);
        guards.push(v_sync);
        refs.push(SegmentRef {
            k: k + k_start as u64 * row_bytes,
            v: v + v_start as u64 * row_bytes,
            len,
            pos_offset: s.pos_offset,
            role: s.role,
            rope_shift: s.rope_shift,
        });
    }
    (refs, guards)
}

/// The two kernels of a launch: the attention kernel with its grid and dynamic shared memory,
/// and the combine kernel with its grid when the launch has one.
pub(crate) struct AttentionKernels<'a> {
    pub main: &'a CudaFunction,
    pub grid: (u32, u32, u32),
    pub smem: usize,
    pub combine: Option<(&'a CudaFunction, (u32, u32, u32))>,
}

/// A launch's parameter arrays on the device (descriptors, RoPE table, per-sequence parameters,
/// work list) and its by-value parameters.
pub(crate) struct KernelParams<'a> {
    pub descs: CudaView<'a, u8>,
    pub rope_cs: CudaView<'a, u8>,
    pub seqs: CudaView<'a, u8>,
    pub work: CudaView<'a, u8>,
    pub launch: &'a SegmentedAttentionLaunch,
}

/// Enqueues the attention kernel and then, if any, the combine kernel on `stream`: the one place
/// that knows their argument lists (kernels/segmented_attention.cu).
///
/// # Safety
/// The arguments must form a valid launch: `params` and the workspace (`o_part`, `lse_part`)
/// laid out for the grids by [`launch_layout`] (or a [`FixedShape`] and its image), every
/// sequence's rows within `q`, `out` and `lse`, and every descriptor pointing at live K/V of its
/// length.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn enqueue(
    stream: &CudaStream,
    kernels: &AttentionKernels,
    q: &Tensor,
    out: &mut Tensor,
    lse: &mut Tensor,
    params: &KernelParams,
    o_part: &mut CudaViewMut<'_, f32>,
    lse_part: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: kernels.grid,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: kernels.smem as u32,
    };
    let mut launch = stream.launch_builder(kernels.main);
    launch
        .arg(q.device_buffer())
        .arg(&params.descs)
        .arg(&params.rope_cs)
        .arg(out.buf_mut())
        .arg(lse.buf_mut())
        .arg(&mut *o_part)
        .arg(&mut *lse_part)
        .arg(&params.seqs)
        .arg(&params.work)
        .arg(params.launch);
    // SAFETY: the arguments match segmented_attention_* (q, segs, rope_cs, out, lse, o_part,
    // lse_part, seqs, work, launch); the caller vouches for their sizes and contents.
    unsafe { launch.launch(cfg) }?;
    if let Some((combine, grid)) = kernels.combine {
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (COMBINE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(combine);
        launch
            .arg(o_part)
            .arg(lse_part)
            .arg(out.buf_mut())
            .arg(lse.buf_mut())
            .arg(&params.seqs)
            .arg(params.launch);
        // SAFETY: the arguments match segmented_attention_combine_* (o_part, lse_part, out, lse,
        // seqs, launch): the workspace the launch above wrote for every split sequence (every
        // split writes every valid row), and the grid's y within the sequences (caller).
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}

/// Launches validated sequences.
fn launch<K: KvTensor>(
    device: &Device,
    q: &Tensor,
    sequences: &[BatchSequence<'_, K>],
    dims: &AttentionDims,
    out: &mut Tensor,
    lse: &mut Tensor,
    options: &SegmentedAttentionOptions,
) -> Result<()> {
    if q.shape()[0] == 0 {
        return Ok(());
    }
    let stream = device.stream();
    // The guards record the segments' reads on the stream when dropped: keep them until the
    // launch is queued.
    let (layout, read_guards) = device_layout(
        stream,
        sequences,
        dims,
        q.dtype(),
        device.sm_count(),
        options.num_splits,
    )?;

    // One upload: descriptors, RoPE table, sequence parameters, work list (upload_bytes_into). Parts a
    // launch does not read (no shifts; one sequence) get a valid pointer all the same.
    let mut bytes = spare_upload();
    let offsets = layout.upload_bytes_into(&mut bytes);
    // From pageable memory, the copy has left `bytes` when the call returns.
    let upload = stream.clone_htod(&bytes)?;
    let part = |i: usize, non_empty: bool| {
        if non_empty {
            upload.slice(offsets[i]..)
        } else {
            upload.slice(..)
        }
    };
    let descs = upload.slice(..);
    let rope_cs = part(1, !layout.rope_table.is_empty());
    let seqs = part(2, !layout.seqs.is_empty());
    let work = part(3, !layout.work.is_empty());

    let f = device.function_with_smem(layout.main, layout.smem_limit as u32)?;
    let combine_fn = match layout.combine_grid {
        Some(_) => Some(device.function(layout.combine)?),
        None => None,
    };
    device.with_workspace(layout.o_len + layout.lse_len, |ws| {
        let (mut o_part, mut lse_part) = ws.split_at_mut(layout.o_len);
        let kernels = AttentionKernels {
            main: &f,
            grid: layout.grid,
            smem: layout.smem,
            combine: combine_fn.as_ref().zip(layout.combine_grid),
        };
        let params = KernelParams {
            descs,
            rope_cs,
            seqs,
            work,
            launch: &layout.launch,
        };
        // SAFETY: validate() checked every tensor's shape, dtype and device against `dims`, and
        // that the sequences' rows add up to q's; each sequence's parameters (q_row0, seg0,
        // part0, work0) index within those rows, the descriptors, the workspace and the grid
        // (launch_layout); the descriptors point at the segments' K/V buffers, which hold len *
        // n_kv_heads * head_dim elements each, and their rope_row is -1 or a row of rope_cs,
        // which holds head_dim / 2 (cos, sin) pairs per row (validate() checked the shifts'
        // head_dim); a batch's work list has one entry per thread block, and the combine grid's
        // y is the number of sequences. The segment buffers are freed stream-ordered, so they
        // outlive the launch even if dropped now.
        unsafe {
            enqueue(
                stream,
                &kernels,
                q,
                out,
                lse,
                &params,
                &mut o_part,
                &mut lse_part,
            )
        }
    })?;
    drop(read_guards);
    layout.recycle();
    recycle_upload(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{RopeConfig, RopeLayout};

    fn dims(h: usize, kv: usize) -> AttentionDims {
        AttentionDims::new(h, kv, 128).expect("valid")
    }

    #[test]
    fn context_tiles_come_first_and_empty_segments_are_dropped() {
        let segs = [
            (10, SegmentRole::Causal),
            (0, SegmentRole::Context),
            (130, SegmentRole::Context),
            (64, SegmentRole::Causal),
            (1, SegmentRole::Context),
        ];
        let p = plan(1000, &dims(32, 8), &segs, 132, Some(1)).expect("valid");
        assert_eq!(p.order, vec![2, 4, 0, 3]);
        // 130 keys = 3 tiles, 1 key = 1 tile, 10 = 1, 64 = 1.
        assert_eq!(p.first_tile, vec![0, 3, 4, 5]);
        assert_eq!((p.n_ctx_tiles, p.n_causal_tiles), (4, 2));
        assert!(p.whole);
        assert_eq!(p.q_tiles, (1000usize * 4).div_ceil(64) as u32);
    }

    #[test]
    fn large_prefill_runs_whole_and_decode_splits_within_groups() {
        let segs: Vec<(usize, SegmentRole)> = (0..16)
            .map(|_| (2048, SegmentRole::Context))
            .chain([(64, SegmentRole::Causal)])
            .collect();
        // 4096 rows * 4 heads per KV head / 64 = 256 query tiles * 8 KV heads: plenty.
        let p = plan(4096, &dims(32, 8), &segs, 132, None).expect("valid");
        assert!(p.whole);
        // One decode row: 1 query tile * 8 KV heads = 8 blocks: split.
        let p = plan(1, &dims(32, 8), &segs, 132, None).expect("valid");
        assert!(!p.whole);
        assert!(p.n_ctx_splits >= 1 && p.n_causal_splits == 1);
        assert!(p.n_ctx_splits <= p.n_ctx_tiles);
        // One wave at BLOCKS_PER_SM blocks per SM, not more.
        assert_eq!(8 * p.n_splits() as usize, BLOCKS_PER_SM * 132);
    }

    /// Invariants on many shapes: every non-empty group gets a split, no group gets more splits
    /// than tiles, automatic plans never exceed one wave (unless both groups need one each), and
    /// the tile numbering is the running sum of the lengths.
    #[test]
    fn plan_invariants_hold_on_many_shapes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as usize
        };
        for _ in 0..2000 {
            let n_kv = 1 + next(8);
            let dims = AttentionDims::new(n_kv * (1 + next(8)), n_kv, 64).expect("valid");
            let segs: Vec<(usize, SegmentRole)> = (0..next(20))
                .map(|_| {
                    let role = if next(2) == 0 {
                        SegmentRole::Context
                    } else {
                        SegmentRole::Causal
                    };
                    (next(3000), role)
                })
                .collect();
            let rows = 1 + next(3000);
            let sms = 1 + next(150);
            let forced = if next(3) == 0 {
                Some(1 + next(100))
            } else {
                None
            };
            let p = plan(rows, &dims, &segs, sms, forced).expect("valid");
            let mut tile = 0u32;
            for (&i, &first) in p.order.iter().zip(&p.first_tile) {
                assert_eq!(first, tile);
                tile += segs[i].0.div_ceil(BLOCK_N) as u32;
            }
            assert_eq!(tile, p.n_ctx_tiles + p.n_causal_tiles);
            if p.whole {
                continue;
            }
            assert!(p.n_ctx_splits <= p.n_ctx_tiles && p.n_causal_splits <= p.n_causal_tiles);
            assert_eq!(p.n_ctx_splits > 0, p.n_ctx_tiles > 0);
            assert_eq!(p.n_causal_splits > 0, p.n_causal_tiles > 0);
            if forced.is_none() {
                let ctas = p.q_tiles as usize * dims.n_kv_heads * p.n_splits() as usize;
                assert!(
                    ctas <= (BLOCKS_PER_SM * sms).max(2 * p.q_tiles as usize * dims.n_kv_heads)
                );
            }
        }
    }

    #[test]
    fn batch_plans_share_one_wave() {
        let d = dims(32, 8);
        let long: Vec<(usize, SegmentRole)> = vec![(32 * 1024, SegmentRole::Context)];
        let short: Vec<(usize, SegmentRole)> = vec![(1024, SegmentRole::Context)];
        // A batch of one is plan()'s plan.
        for rows in [1, 64, 4096] {
            let one = plan_batch(&[(rows, &long[..])], &d, 132, None).expect("valid");
            assert_eq!(one, vec![plan(rows, &d, &long, 132, None).expect("valid")]);
        }
        // Forced splits apply to every sequence as they would alone.
        let both = [(1, &long[..]), (64, &short[..])];
        let forced = plan_batch(&both, &d, 132, Some(5)).expect("valid");
        for ((rows, segs), p) in both.iter().zip(&forced) {
            assert_eq!(p, &plan(*rows, &d, segs, 132, Some(5)).expect("valid"));
        }
        // Two decode rows: the wave is shared in proportion to the keys (32:1), within one wave.
        let auto = plan_batch(&[(1, &long[..]), (1, &short[..])], &d, 132, None).expect("valid");
        let ctas: u32 = auto.iter().map(|p| p.q_tiles * 8 * p.n_splits()).sum();
        assert!(ctas as usize <= BLOCKS_PER_SM * 132, "{auto:?}");
        assert!(auto[0].n_splits() > 8 * auto[1].n_splits(), "{auto:?}");
        // A sequence of two tiles (too short to split) runs whole beside ones that split.
        let two: Vec<(usize, SegmentRole)> =
            vec![(50, SegmentRole::Context), (1, SegmentRole::Causal)];
        let mixed = plan_batch(&[(1, &long[..]), (1, &two[..])], &d, 132, None).expect("valid");
        assert!(!mixed[0].whole && mixed[1].whole, "{mixed:?}");
        // Enough query tiles for a wave: every sequence runs whole.
        let many: Vec<(usize, &[(usize, SegmentRole)])> = (0..40).map(|_| (1, &long[..])).collect();
        assert!(plan_batch(&many, &d, 132, None)
            .expect("valid")
            .iter()
            .all(|p| p.whole));
    }

    #[test]
    fn a_batch_layout_indexes_each_sequence() {
        let d = dims(8, 2);
        let seg = |len, role| SegmentRef {
            k: 0x1000,
            v: 0x2000,
            len,
            pos_offset: 0,
            role,
            rope_shift: None,
        };
        let a = [seg(500, SegmentRole::Context), seg(1, SegmentRole::Causal)];
        let b = [seg(0, SegmentRole::Context), seg(70, SegmentRole::Causal)];
        let c = [seg(3000, SegmentRole::Context)];
        let seq = |n_rows, segments| SequenceRef {
            n_rows,
            pos_offset: 600,
            segments,
            ape: ApeParams::default(),
        };
        let seqs = [
            seq(1, &a[..]),
            seq(0, &b[..]),
            seq(70, &b[..]),
            seq(1, &c[..]),
        ];
        let l = launch_layout(&seqs, &d, DType::BF16, 132, None).expect("valid");
        assert_eq!(l.seqs.len(), 4);
        // The empty segment is dropped: 2 + 1 + 1 + 1 descriptors.
        assert_eq!(l.descs.len(), 5);
        let (mut rows, mut segs, mut parts, mut blocks) = (0u32, 0u32, 0u32, 0u32);
        for (i, p) in l.seqs.iter().enumerate() {
            assert_eq!(
                (p.q_row0, p.seg0, p.part0, p.work0),
                (rows, segs, parts, blocks)
            );
            let splits = if p.whole == 1 {
                1
            } else {
                p.n_ctx_splits + p.n_causal_splits
            };
            let n = (p.n_rows * p.group).div_ceil(BLOCK_M as u32) * splits;
            let mine = l.work.iter().filter(|&&w| w == i as u32).count() as u32;
            assert_eq!(mine, n);
            assert!(l.work[blocks as usize..(blocks + n) as usize]
                .iter()
                .all(|&w| w == i as u32));
            rows += p.n_rows;
            segs += p.n_segments;
            if p.whole == 0 {
                parts += splits * p.n_rows * p.n_heads;
            }
            blocks += n;
        }
        assert_eq!(l.grid, (blocks, 2, 1));
        assert_eq!(l.lse_len, parts as usize);
        assert_eq!(l.o_len, parts as usize * 128);
        assert_eq!(l.combine_grid.map(|g| g.1), Some(4));
        // One sequence: its parameters travel by value, no arrays.
        let one = launch_layout(&seqs[..1], &d, DType::BF16, 132, None).expect("valid");
        assert!(one.seqs.is_empty() && one.work.is_empty());
        assert_eq!(one.launch.n_sequences, 1);
        assert!(launch_layout(&[], &d, DType::BF16, 132, None).is_err());
        // A sequence without rows never splits, even when splits are forced: beside a whole
        // sequence, nothing is left to combine (a combine grid of x = 0 would be refused).
        let long = [seg(200, SegmentRole::Context)];
        let short = [seg(10, SegmentRole::Causal)];
        let l = launch_layout(
            &[seq(1, &short[..]), seq(0, &long[..])],
            &d,
            DType::BF16,
            132,
            Some(2),
        )
        .expect("valid");
        assert!(l.seqs.iter().all(|p| p.whole == 1));
        assert_eq!(l.combine_grid, None);
        assert_eq!(l.grid.0, 1);
    }

    /// The capacity bounds of FixedShape::new: on many random batches within a capacity (and on
    /// batches that fill it), with chosen and forced splits, the plan always fits the fixed
    /// shape, and its image puts every part at the shape's offsets, the idle sequence after the
    /// real ones and the surplus thread blocks on it. Slack is measured too: a capacity an engine
    /// sizes for its decode batch does not launch many times the thread blocks it needs.
    #[test]
    fn every_batch_within_a_capacity_fits_its_fixed_shape() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n.max(1)) as usize
        };
        let shift = RopeShift {
            rope: RopeConfig::new(64, 10_000.0, RopeLayout::Neox).expect("valid"),
            delta: 5,
        };
        for case in 0..3000 {
            let n_kv = 1 + next(8);
            let dims =
                AttentionDims::new(n_kv * [1, 2, 4, 8, 80][next(5)], n_kv, 64).expect("valid");
            let sms = 1 + next(150);
            let forced = (next(3) == 0).then(|| 1 + next(12));
            let most_rows = if next(2) == 0 { 64 } else { 3000 };
            let cap = BatchCapacity {
                sequences: 1 + next(40),
                rows: 1 + next(most_rows),
                segments: 1 + next(60),
            };
            let shape = FixedShape::new(&cap, &dims, sms, forced).expect("valid capacity");
            // A batch within the capacity; every other one fills it.
            let full = case % 2 == 0;
            let n_seqs = if full {
                cap.sequences
            } else {
                1 + next(cap.sequences as u64)
            };
            let mut rows = vec![0usize; n_seqs];
            let total_rows = if full {
                cap.rows
            } else {
                next(cap.rows as u64 + 1)
            };
            for _ in 0..total_rows {
                rows[next(n_seqs as u64)] += 1;
            }
            let mut n_segs = vec![0usize; n_seqs];
            let total_segs = if full {
                cap.segments
            } else {
                next(cap.segments as u64 + 1)
            };
            for _ in 0..total_segs {
                n_segs[next(n_seqs as u64)] += 1;
            }
            let refs: Vec<Vec<SegmentRef>> = n_segs
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| SegmentRef {
                            k: 0x1000,
                            v: 0x2000,
                            len: next(2000),
                            pos_offset: 0,
                            role: if next(2) == 0 {
                                SegmentRole::Context
                            } else {
                                SegmentRole::Causal
                            },
                            rope_shift: (next(4) == 0).then_some(shift),
                        })
                        .collect()
                })
                .collect();
            let seqs: Vec<SequenceRef> = rows
                .iter()
                .zip(&refs)
                .map(|(&n_rows, segments)| SequenceRef {
                    n_rows,
                    pos_offset: 3000,
                    segments,
                    ape: ApeParams::default(),
                })
                .collect();
            cap.check_fits(rows.iter().copied().zip(n_segs.iter().copied()))
                .expect("within the capacity");
            let layout = launch_layout(&seqs, &dims, DType::BF16, sms, forced).expect("valid");
            let image = shape
                .image(&layout)
                .unwrap_or_else(|e| panic!("{e}: {cap:?} {dims:?} sms {sms} {forced:?}"));
            assert_eq!(image.len(), shape.bytes);
            let at = |i: usize, len: usize| &image[shape.offsets[i]..shape.offsets[i] + len];
            let size = std::mem::size_of::<SegmentDesc>();
            assert_eq!(
                at(0, layout.descs.len() * size),
                bytemuck::cast_slice::<_, u8>(&layout.descs)
            );
            let params: &[SegmentedAttentionParams] =
                bytemuck::cast_slice(at(2, shape.seq_slots * 80));
            let work: &[u32] = bytemuck::cast_slice(at(3, shape.blocks as usize * 4));
            let real = work.iter().filter(|&&w| (w as usize) < n_seqs).count();
            assert_eq!(real, layout.grid.0 as usize);
            assert!(work[real..].iter().all(|&w| w as usize == n_seqs));
            assert!(params[n_seqs..]
                .iter()
                .all(|p| p.whole == 1 && p.n_rows == 0));
            assert_eq!(shape.launch_params().n_sequences as usize, shape.seq_slots);
            if forced.is_none() && cap.rows <= 64 && full {
                // A decode-sized capacity, full: at most one wave of surplus.
                assert!(
                    shape.blocks as usize - real
                        <= (BLOCKS_PER_SM * sms).div_ceil(n_kv) + cap.sequences,
                    "{} blocks for {real}: {cap:?}",
                    shape.blocks
                );
            }
        }
        let d = dims(8, 2);
        let cap = |sequences, rows, segments| BatchCapacity {
            sequences,
            rows,
            segments,
        };
        assert!(FixedShape::new(&cap(0, 1, 1), &d, 132, None).is_err());
        assert!(FixedShape::new(&cap(1, 0, 1), &d, 132, None).is_err());
        assert!(FixedShape::new(&cap(1, 1, 0), &d, 132, None).is_err());
        assert!(FixedShape::new(&cap(MAX_BATCH_SEQUENCES, 1, 1), &d, 132, None).is_err());
        assert!(FixedShape::new(&cap(1, 1, 1), &d, 132, Some(0)).is_err());
        assert!(FixedShape::new(&cap(1, usize::MAX / 2, 1), &d, 132, None).is_err());
        let c = cap(2, 10, 3);
        assert!(c.check_fits([(5, 1), (5, 2)].into_iter()).is_ok());
        assert!(matches!(
            c.check_fits([(5, 1), (6, 2)].into_iter()),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            c.check_fits([(5, 2), (5, 2)].into_iter()),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            c.check_fits([(1, 0); 3].into_iter()),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            c.check_fits(std::iter::empty()),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn forced_splits_are_clamped_to_the_tiles_and_zero_is_an_error() {
        let segs = [(64, SegmentRole::Context), (64, SegmentRole::Causal)];
        let p = plan(1, &dims(8, 8), &segs, 132, Some(50)).expect("valid");
        assert_eq!((p.n_ctx_splits, p.n_causal_splits), (1, 1));
        assert!(plan(1, &dims(8, 8), &segs, 132, Some(0)).is_err());
        // Only one group: its splits take everything.
        let segs = [(640, SegmentRole::Context)];
        let p = plan(1, &dims(8, 8), &segs, 132, Some(4)).expect("valid");
        assert_eq!((p.n_ctx_splits, p.n_causal_splits), (4, 0));
        // No keys at all: a whole pass that writes -inf and zeros.
        let p = plan(3, &dims(8, 8), &[], 132, None).expect("valid");
        assert!(p.whole && p.n_ctx_tiles == 0 && p.n_causal_tiles == 0);
    }
}
