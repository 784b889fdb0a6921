//! The RoPE apply and shift kernels (`kernels/rope.cu`) on the kernel emulator against the CPU oracle: the
//! cases of `tests/common/ops.rs`, which the GPU runs in `tests/gpu_rope.rs`, each launch under
//! the next of the emulator's four schedules.

mod common;
#[path = "common/ops.rs"]
mod ops;

use ape_attn::cuda::DType;
use ape_attn::emulator::{rope_apply, rope_shift, EmulatorOptions};
use ape_attn::{RopeConfig, RopeLayout};
use common::Emulated;

#[test]
fn rope_apply_and_shift_match_the_oracle() {
    ops::rope_apply_and_shift_match_the_oracle(&Emulated::default());
}

#[test]
fn rope_rejects_bad_shapes() {
    let cfg = RopeConfig::new(64, 10_000.0, RopeLayout::Neox).unwrap();
    let emu = EmulatorOptions::default();
    let mut x = vec![0.0; 4 * 2 * 128];
    assert!(rope_apply(DType::BF16, &mut x, [4, 2, 128], &cfg, 0, &emu).is_err());
    assert!(rope_shift(DType::BF16, &mut x, [4, 2, 64], &cfg, 3, &emu).is_err());
}
