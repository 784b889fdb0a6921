//! [`crate::cuda::CapturableBatch`] on the kernel emulator: the batched segmented-attention
//! kernels launched with the fixed grids, parameter image and workspace of a capacity (oracle:
//! [`crate::reference::segmented_attention_batch`]).

use super::segmented_attention::{run, validate_batch};
use super::EmulatorOptions;
use crate::cuda::segmented_attention::{BatchCapacity, SegmentedAttentionOptions};
use crate::cuda::DType;
use crate::error::Result;
use crate::params::AttentionDims;
use crate::reference::segmented_attention::{AttentionOutput, BatchSequence};

/// A prepare and a launch of a [`crate::cuda::CapturableBatch`] of `capacity`, emulated: the
/// sequences (packed query `q`) are planned as [`super::segmented_attention_batch`] plans them
/// and launched with the batch's fixed grids, parameter image and workspace.
///
/// The outputs have `capacity.rows` rows, all starting as NaN (so does the workspace): the
/// sequences' rows come first, and the rows past them must still be NaN after the launch.
pub fn capturable_batch(
    dtype: DType,
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
    capacity: &BatchCapacity,
    options: &SegmentedAttentionOptions,
    emulator: &EmulatorOptions,
) -> Result<AttentionOutput> {
    validate_batch(q, sequences, dims)?;
    run(
        dtype,
        q,
        sequences,
        dims,
        options,
        emulator,
        Some(capacity),
        |i| format!("sequence {i}: "),
    )
}
