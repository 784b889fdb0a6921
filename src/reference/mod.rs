//! The CPU reference: the numerical oracle for every kernel and every model path.
//!
//! Plain code written for clarity, f64 internally, f32 in and out. Each function documents the
//! formula it implements (docs/DESIGN.md §2) and is tested against identities in `tests/reference_*.rs`.
//! A kernel and its oracle live at mirrored paths: `kernels/X.cu`, `src/cuda/X.rs`,
//! `src/reference/X.rs`.
//!
//! Use it to check a kernel: run both on the same inputs (rounded to the kernel's dtype first) and
//! compare with [`rel_l2`] and the largest LSE difference.

pub mod ape;
pub mod llama_ops;
pub mod merge_states;
pub mod rope;
pub mod segmented_attention;

pub use merge_states::{merge_states, AttentionState};
pub use segmented_attention::{
    segmented_attention, segmented_attention_batch, AttentionOutput, BatchSequence, Query, Segment,
};

/// Relative L2 error `||x - reference|| / ||reference||` (0 when both are zero).
pub fn rel_l2(x: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = x
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|&b| (b as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
