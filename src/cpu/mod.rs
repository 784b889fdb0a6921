//! The CPU kernels: what the CUDA kernels compute, in f32 with explicit SIMD where it pays, for
//! the CPU forward pass. Each mirrors its oracle in [`crate::reference`] and is tested against it.

pub mod rope;
