//! The RoPE apply and shift kernels (`kernels/rope.cu`) against the CPU oracle on a GPU (needs a CUDA
//! device). The cases are in `tests/common/ops.rs`, shared with the kernel emulator's run of the
//! same kernels (`tests/emulated_rope.rs`).

mod common;
#[path = "common/ops.rs"]
mod ops;

use ape_attn::cuda::{rope_apply, rope_shift, DType, Tensor};
use ape_attn::{RopeConfig, RopeLayout};
use common::Gpu;

#[test]
#[ignore = "needs a CUDA device"]
fn rope_apply_and_shift_match_the_oracle() {
    ops::rope_apply_and_shift_match_the_oracle(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn rope_rejects_bad_shapes() {
    let dev = Gpu::new().0;
    let cfg = RopeConfig::new(64, 10_000.0, RopeLayout::Neox).unwrap();
    let mut wrong = Tensor::zeros(&dev, &[4, 2, 128], DType::BF16).unwrap();
    assert!(rope_apply(&dev, &mut wrong, &cfg, 0).is_err());
    let mut flat = Tensor::zeros(&dev, &[4, 64], DType::BF16).unwrap();
    assert!(rope_shift(&dev, &mut flat, &cfg, 3).is_err());
}
