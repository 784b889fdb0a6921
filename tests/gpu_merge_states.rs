//! The merge kernels (`kernels/merge_states.cu`) against the CPU oracle on a GPU (needs a CUDA
//! device). The cases are in `tests/common/ops.rs`, shared with the kernel emulator's run of the
//! same kernels (`tests/emulated_merge_states.rs`).

mod common;
#[path = "common/ops.rs"]
mod ops;

use ape_attn::cuda::{merge_states, merge_states_into, DType, Tensor};
use common::Gpu;

#[test]
#[ignore = "needs a CUDA device"]
fn merge_states_matches_the_oracle() {
    ops::merge_states_matches_the_oracle(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn merge_state_in_place_matches_the_oracle() {
    ops::merge_state_in_place_matches_the_oracle(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn merge_rejects_bad_inputs() {
    let dev = Gpu::new().0;
    let v = Tensor::zeros(&dev, &[2, 3, 64], DType::BF16).unwrap();
    let s = Tensor::zeros(&dev, &[2, 3], DType::F32).unwrap();
    let s_bad = Tensor::zeros(&dev, &[2, 4], DType::F32).unwrap();
    let s_f16 = Tensor::zeros(&dev, &[2, 3], DType::F16).unwrap();
    assert!(merge_states(&dev, &v, &s_bad).is_err());
    assert!(merge_states(&dev, &v, &s_f16).is_err());
    let mut vo = Tensor::zeros(&dev, &[3, 64], DType::F16).unwrap();
    let mut so = Tensor::zeros(&dev, &[3], DType::F32).unwrap();
    assert!(merge_states_into(&dev, &v, &s, &mut vo, &mut so).is_err());
    assert!(merge_states(&dev, &v, &s).is_ok());
}
