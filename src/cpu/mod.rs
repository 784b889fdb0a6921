//! CPU kernels: the product kernels for machines without a GPU, f32 with explicit SIMD and
//! threads, at paths mirroring the CUDA ones (`kernels/X.cu`, `src/cuda/X.rs`,
//! `src/reference/X.rs`, `src/cpu/X.rs`) and checked against the same oracle.
//!
//! They take the oracle's input types ([`crate::reference::Query`], [`crate::reference::Segment`],
//! [`crate::reference::BatchSequence`]) and return its [`crate::reference::AttentionOutput`], so a
//! caller moves between the two by changing the module path. Work is spread over the caller's
//! rayon pool (the model's forward pass shares it); small problems run on the calling thread.

mod kernels;
pub mod rope;
pub mod segmented_attention;

pub use segmented_attention::{
    segmented_attention, segmented_attention_batch, segmented_attention_batch_into,
    segmented_attention_into,
};
