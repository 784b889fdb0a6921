//! # ape-attn
//!
//! CUDA attention kernels for context-augmented generation: attend over many independently
//! cached KV blocks in place, with the APE temperature/scaling correction fused in, plus merge of
//! attention states and RoPE apply/shift for Block-Attention re-encoding.
//!
//! - [`reference`](mod@reference): the CPU oracle (f64), the definition of what every kernel
//!   computes.
//! - [`cpu`]: the same kernels for the CPU in f32 (SIMD, threads): what runs without a GPU.
//! - [`cuda`]: the device handle, device tensors and the safe kernel launchers.
//! - `emulator` (feature `emulator`): the same kernels compiled for the CPU and launched the same
//!   way, so that they are tested against the oracle on machines without a GPU.
//! - [`ApeParams`], [`AttentionDims`], [`SegmentRole`], [`RopeConfig`]: parameters shared by all
//!   three, validated on construction.
//!
//! This crate depends only on what the kernels need (cudarc, half, bytemuck, thiserror, and rayon
//! for the CPU kernels' threads). The
//! model built on it (loading, the block KV cache, the CPU and GPU forward passes in the four
//! encoding modes, the evaluation and the `ape` command) is the workspace's `ape-llama` crate.
//!
//! The math is docs/DESIGN.md §2: for a query row, Context keys form group `C` (scale `1/(T*sqrt(d))`),
//! Causal keys group `O` (scale `1/sqrt(d)`, masked by absolute position); with `a = S*T*L_C` and
//! `b = L_O`, `out = sigmoid(a-b) O_C + (1 - sigmoid(a-b)) O_O` and `LSE = ln(e^a + e^b)`.
//!
//! ```
//! use ape_attn::reference::{segmented_attention, Query, Segment};
//! use ape_attn::{ApeParams, AttentionDims, SegmentRole};
//!
//! // One head of width 4; a cached passage of two keys and the question's own key.
//! let dims = AttentionDims::new(1, 1, 4)?;
//! let (ctx_k, ctx_v) = ([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1.0; 8]);
//! let (own_k, own_v) = ([0.5, 0.0, 0.0, 0.0], [3.0; 4]);
//! let segments = [
//!     Segment { k: &ctx_k, v: &ctx_v, len: 2, pos_offset: 0, role: SegmentRole::Context, rope_shift: None },
//!     Segment { k: &own_k, v: &own_v, len: 1, pos_offset: 2, role: SegmentRole::Causal, rope_shift: None },
//! ];
//! let q = [2.0, 0.0, 0.0, 0.0];
//! let query = Query { data: &q, n_rows: 1, pos_offset: 2 };
//! let out = segmented_attention(&query, &segments, &dims, &ApeParams::default())?;
//! // The output is a convex combination of the values 1 and 3.
//! assert!(out.out.iter().all(|&x| x > 1.0 && x < 3.0));
//! assert!(out.lse[0].is_finite());
//!
//! // Invalid parameters are errors, not panics.
//! assert!(ApeParams::new(f32::NAN, 0.9).is_err());
//! # Ok::<(), ape_attn::Error>(())
//! ```

#![deny(missing_docs)]

pub mod cpu;
pub mod cuda;
#[cfg(feature = "emulator")]
pub mod emulator;
mod error;
mod params;
pub mod reference;

pub use error::{Error, Result};
pub use params::{
    check_positive, ApeParams, ApeVariant, AttentionDims, Llama3RopeScaling, RopeConfig,
    RopeLayout, RopeShift, SegmentRole,
};

/// The README's Rust example, compiled by `cargo test --doc` (not run: it needs a GPU).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeExample;
