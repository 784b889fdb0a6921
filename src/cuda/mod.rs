//! The GPU side: a device handle, device tensors, and one safe launcher per kernel.
//!
//! Every launcher validates shapes, dtypes, devices and parameters before it launches and returns
//! [`crate::Error`] instead of panicking. Each launcher's oracle is the function of the same name
//! in [`crate::reference`]; the GPU tests (`tests/gpu_*.rs`, ignored without a device) compare them.

mod capturable_batch;
mod device;
pub mod llama_ops;
pub mod merge_states;
pub mod rope;
mod rope_shift_table;
pub mod segmented_attention;
mod tensor;

pub use capturable_batch::CapturableBatch;
pub use device::{kernel_build_info, kernels_built, Device};
pub use llama_ops::{embedding, rms_norm, rms_norm_into, silu_mul, silu_mul_into};
pub use merge_states::{merge_state_in_place, merge_states, merge_states_into};
pub use rope::{rope_apply, rope_shift};
pub use segmented_attention::{
    segmented_attention, segmented_attention_batch, segmented_attention_batch_into,
    segmented_attention_into, BatchCapacity, BatchSequence, KvTensor, Query, Segment,
    SegmentedAttentionOptions,
};
#[cfg(feature = "emulator")]
pub use tensor::{check_reshape, element_count, row_range};
pub use tensor::{BufferRejected, DType, Tensor, TensorRows};

/// Launch shape of the grid-stride kernels: one thread per item, 256 per block, at most 2^16
/// blocks (the kernels loop over the rest).
pub(crate) fn grid_stride(items: u64) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (items.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
