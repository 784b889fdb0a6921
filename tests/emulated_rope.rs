//! The RoPE kernels (`kernels/rope.cu`) on the kernel emulator against the CPU oracle: the cases
//! of `tests/gpu_rope.rs`, each launch under the next of the emulator's four schedules.

mod common;

use ape_attn::cuda::DType;
use ape_attn::emulator::{rope_apply, rope_shift, EmulatorOptions};
use ape_attn::reference::{rel_l2, rope};
use ape_attn::{RopeConfig, RopeLayout};
use common::{seeded, LLAMA31};

#[test]
fn rope_apply_and_shift_match_the_oracle() {
    let mut r = seeded("emulated_rope_apply_and_shift_match_the_oracle");
    let schedules = EmulatorOptions::default().schedules();
    let mut launches = 0;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
            for head_dim in [64, 128] {
                let mut cfg = RopeConfig::new(head_dim, 500_000.0, layout).unwrap();
                if r.coin() {
                    cfg = cfg.with_llama3_scaling(LLAMA31).unwrap();
                }
                let (n_tokens, n_heads) = (r.range(1, 700), r.pick(&[1, 3, 8]));
                let shape = [n_tokens, n_heads, head_dim];
                let x: Vec<f32> = r
                    .uniform(n_tokens * n_heads * head_dim, 2.0)
                    .into_iter()
                    .map(|v| dtype.round(v))
                    .collect();
                let pos = r.range(0, 130_000) as i64;
                let delta = r.range(0, 130_000) as i64 - 20_000;
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };

                let mut got = x.clone();
                rope_apply(dtype, &mut got, shape, &cfg, pos, &schedules[launches % 4]).unwrap();
                launches += 1;
                let mut want = x.clone();
                rope::apply(&mut want, n_tokens, n_heads, &cfg, pos).unwrap();
                let err = rel_l2(&got, &want);
                assert!(
                    err < tol,
                    "apply {dtype:?} {layout:?} d={head_dim}: {err:.2e}"
                );

                // Shift what the kernel produced, against the oracle shifting the same input.
                let mut want = got.clone();
                rope::shift(&mut want, n_tokens, n_heads, &cfg, delta).unwrap();
                rope_shift(
                    dtype,
                    &mut got,
                    shape,
                    &cfg,
                    delta,
                    &schedules[launches % 4],
                )
                .unwrap();
                launches += 1;
                let err = rel_l2(&got, &want);
                assert!(
                    err < tol,
                    "shift {dtype:?} {layout:?} d={head_dim}: {err:.2e}"
                );
            }
        }
    }
    // Bad shapes are errors.
    let cfg = RopeConfig::new(64, 10_000.0, RopeLayout::Neox).unwrap();
    let emu = EmulatorOptions::default();
    let mut x = vec![0.0; 4 * 2 * 128];
    assert!(rope_apply(DType::BF16, &mut x, [4, 2, 128], &cfg, 0, &emu).is_err());
    assert!(rope_shift(DType::BF16, &mut x, [4, 2, 64], &cfg, 3, &emu).is_err());
}
