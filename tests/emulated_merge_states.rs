//! The merge kernels (`kernels/merge_states.cu`) on the kernel emulator against the CPU oracle: the
//! cases of `tests/common/ops.rs`, which the GPU runs in `tests/gpu_merge_states.rs`, each launch under
//! the next of the emulator's four schedules.

mod common;
#[path = "common/ops.rs"]
mod ops;

use ape_attn::cuda::DType;
use ape_attn::emulator::{merge_state_in_place, merge_states, EmulatorOptions};
use common::Emulated;

#[test]
fn merge_states_matches_the_oracle() {
    ops::merge_states_matches_the_oracle(&Emulated::default());
}

#[test]
fn merge_state_in_place_matches_the_oracle() {
    ops::merge_state_in_place_matches_the_oracle(&Emulated::default());
}

#[test]
fn merge_rejects_bad_inputs() {
    let emu = EmulatorOptions::default();
    let v = vec![0.0; 2 * 3 * 64];
    assert!(merge_states(DType::BF16, &v, &[0.0; 6], 2, 64, &emu).is_ok());
    assert!(merge_states(DType::BF16, &v, &[0.0; 8], 2, 64, &emu).is_err());
    assert!(merge_states(DType::BF16, &v, &[0.0; 6], 0, 64, &emu).is_err());
    let (mut a, mut s) = (vec![0.0; 3 * 64], vec![0.0; 3]);
    assert!(
        merge_state_in_place(DType::F16, &mut a, &mut s, &v[..64], &[0.0; 3], 64, &emu).is_err()
    );
}
