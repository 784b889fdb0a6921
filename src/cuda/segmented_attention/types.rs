//! The public types of a launch: segments read in place, the query, a batch's sequences,
//! the launch options; and the one host-side description of a launch's segments and sequences
//! ([`SegmentRef`], [`SequenceRef`]) that validation, planning and the layout share.

use super::*;

/// One KV block on the device, read in place: `k` and `v` are `[len, n_kv_heads, head_dim]`.
///
/// `T` is the tensor type: for the launchers here, a [`Tensor`] or [`TensorRows`] (rows of a
/// larger tensor, such as a KV pool; see [`KvTensor`]); the GPU forward pass
/// (`DeviceOps` in the ape-llama crate) uses the same struct for its other devices.
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

impl<'a, T> Segment<'a, T> {
    /// `k` and `v` as a segment starting at absolute position `pos_offset`, read as stored.
    pub fn new(k: &'a T, v: &'a T, pos_offset: usize, role: SegmentRole) -> Self {
        Self {
            k,
            v,
            pos_offset,
            role,
            rope_shift: None,
        }
    }

    /// The same segment with its keys read rotated by `rope_shift` (Block-Attention: a block
    /// cached at position 0, read at its offset).
    pub fn with_rope_shift(self, rope_shift: RopeShift) -> Self {
        Self {
            rope_shift: Some(rope_shift),
            ..self
        }
    }
}

impl<T> Clone for Segment<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Segment<'_, T> {}

impl<K: KvTensor> Segment<'_, K> {
    /// The segment as a launch sees it, its K and V read from `k` and `v` (device addresses of
    /// its first rows; 0 for the checks, which do not read them).
    pub(crate) fn at(&self, k: u64, v: u64) -> SegmentRef {
        SegmentRef {
            k,
            v,
            len: self.k.row_span().1,
            pos_offset: self.pos_offset,
            role: self.role,
            rope_shift: self.rope_shift,
        }
    }
}

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
    /// Run the kernel of this tile shape; `None` chooses ([`TileShape::of_launch`]). Any launch
    /// may take the prefill or the wide tile; the decode tile only sequences of at most 16 packed
    /// rows, without `num_splits = Some(1)` (otherwise an error). For measuring one against
    /// another.
    pub tile: Option<TileShape>,
}

/// A segment as a launch sees it: the addresses of its K and V and how to read them. The one
/// host-side description of a segment: the launchers build it from a [`Segment`] (the CUDA
/// launcher from its tensors' device pointers, the kernel emulator from host buffers), the
/// launch's limits are checked on it, [`plan`] and [`plan_batch`] plan from it, and the launch
/// layout turns it into the kernel's descriptor (`SegmentDesc`, its ABI form).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SegmentRef {
    /// Address of the keys' first row (`len` rows of `n_kv_heads * head_dim` elements,
    /// contiguous): a device pointer, or a host address on the kernel emulator.
    pub k: u64,
    /// Address of the values' first row, as `k`.
    pub v: u64,
    /// Rows (tokens) of K and V.
    pub len: usize,
    /// Absolute position of the first token (causal masking).
    pub pos_offset: usize,
    /// Masking and APE group.
    pub role: SegmentRole,
    /// Read the keys rotated by this many RoPE positions; `None` reads them as stored.
    pub rope_shift: Option<RopeShift>,
}

/// A sequence as a launch sees it: a [`BatchSequence`] over [`SegmentRef`]s.
#[derive(Clone, Copy, Debug)]
pub struct SequenceRef<'a> {
    /// Rows of the packed query this sequence owns (0: none).
    pub n_rows: usize,
    /// Absolute position of the sequence's first row.
    pub pos_offset: usize,
    /// Its segments.
    pub segments: &'a [SegmentRef],
    /// Its APE parameters.
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
