//! The RoPE kernels against the CPU oracle (needs a CUDA device).

mod common;

use ape_attn::cuda::{rope_apply, rope_shift, DType, Device, Tensor};
use ape_attn::reference::{rel_l2, rope};
use ape_attn::{Llama3RopeScaling, RopeConfig, RopeLayout};
use common::seeded;

#[test]
#[ignore = "needs a CUDA device"]
fn rope_apply_and_shift_match_the_oracle() {
    let dev = Device::new(0).expect("a CUDA device with the kernels built");
    let mut r = seeded("rope_apply_and_shift_match_the_oracle");
    let llama31 = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192.0,
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
            for head_dim in [64, 128] {
                let mut cfg = RopeConfig::new(head_dim, 500_000.0, layout).unwrap();
                if r.coin() {
                    cfg = cfg.with_llama3_scaling(llama31).unwrap();
                }
                let (n_tokens, n_heads) = (r.range(1, 700), r.pick(&[1, 3, 8]));
                let x: Vec<f32> = r
                    .uniform(n_tokens * n_heads * head_dim, 2.0)
                    .into_iter()
                    .map(|v| dtype.round(v))
                    .collect();
                let pos = r.range(0, 130_000) as i64;
                let delta = r.range(0, 130_000) as i64 - 20_000;

                let mut t =
                    Tensor::from_f32(&dev, &[n_tokens, n_heads, head_dim], &x, dtype).unwrap();
                rope_apply(&dev, &mut t, &cfg, pos).unwrap();
                let mut want = x.clone();
                rope::apply(&mut want, n_tokens, n_heads, &cfg, pos).unwrap();
                let got = t.to_f32(&dev).unwrap();
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                let err = rel_l2(&got, &want);
                println!("apply {dtype:?} {layout:?} d={head_dim} pos={pos}: rel L2 {err:.2e}");
                assert!(err < tol);

                // Shift what the kernel produced, against the oracle shifting the same input.
                rope_shift(&dev, &mut t, &cfg, delta).unwrap();
                let mut want = got.clone();
                rope::shift(&mut want, n_tokens, n_heads, &cfg, delta).unwrap();
                let err = rel_l2(&t.to_f32(&dev).unwrap(), &want);
                println!("shift {dtype:?} {layout:?} d={head_dim} delta={delta}: rel L2 {err:.2e}");
                assert!(err < tol);
            }
        }
    }
    // Bad shapes are errors.
    let cfg = RopeConfig::new(64, 10_000.0, RopeLayout::Neox).unwrap();
    let mut wrong = Tensor::zeros(&dev, &[4, 2, 128], DType::BF16).unwrap();
    assert!(rope_apply(&dev, &mut wrong, &cfg, 0).is_err());
    let mut flat = Tensor::zeros(&dev, &[4, 64], DType::BF16).unwrap();
    assert!(rope_shift(&dev, &mut flat, &cfg, 3).is_err());
}
