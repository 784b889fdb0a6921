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
//! fill the GPU, the keys are split across thread blocks (split-KV) and the last split of each
//! query tile merges the partial states, group by group, before applying the APE correction, in
//! the same launch. A launch whose every sequence packs at most 16 query rows (`n_rows * group`:
//! decode rows, short questions) runs the decode tile's kernel, which has more thread blocks per
//! SM and a deeper copy pipeline; a long prefill at head dim 64 runs the wide tile's (128 rows
//! over 8 warps); others run the prefill tile's ([`TileShape`]).
//!
//! A segment with a [`RopeShift`] is read as if its keys were rotated by `delta` positions
//! (Block-Attention), without writing rotated keys anywhere: the kernel rotates its query rows by
//! `-delta` in registers instead (`q . R(delta) k = R(-delta) q . k`), once per segment.

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};

use super::{DType, Device, Tensor, TensorRows};
use crate::cuda::rope_shift_table::rope_table;
use crate::error::{Error, Result};
use crate::params::{ApeParams, ApeVariant, AttentionDims, RopeShift, SegmentRole};

/// Keys per tile (kBlockN in kernels/tile_walk.cuh).
pub const BLOCK_N: usize = 64;
/// Packed query rows per thread block of the prefill tile (`PrefillTile::kRows` in
/// kernels/segmented_attention.cu; [`TileShape::rows`]).
pub const BLOCK_M: usize = 64;
/// Head dims the kernel is compiled for.
pub const SUPPORTED_HEAD_DIMS: &[usize] = &[64, 128];

mod fixed_shape;
mod launch;
mod layout;
mod occupancy;
mod plan;
#[cfg(test)]
mod tests;
mod types;
mod validate;

pub use fixed_shape::*;
pub(crate) use launch::*;
pub use layout::*;
pub use occupancy::*;
pub use plan::*;
pub use types::*;
pub use validate::*;

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

/// Segmented attention for a batch of sequences in one launch (split keys included):
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
