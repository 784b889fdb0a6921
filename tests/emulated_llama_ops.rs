//! The Llama-op kernels (`kernels/llama_ops.cu`) on the kernel emulator against the CPU oracle:
//! the cases of `tests/gpu_llama_ops.rs`, each launch under the next of the four schedules.

mod common;

use ape_attn::cuda::DType;
use ape_attn::emulator::{embedding, rms_norm, silu_mul, EmulatorOptions};
use ape_attn::reference::{llama_ops, rel_l2};
use common::seeded;

#[test]
fn llama_ops_match_the_oracle() {
    let mut r = seeded("emulated_llama_ops_match_the_oracle");
    let schedules = EmulatorOptions::default().schedules();
    let mut launches = 0;
    let mut next = || {
        launches += 1;
        schedules[launches % 4]
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let round = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| dtype.round(x)).collect() };
        for d in [576, 4096, 100, 1] {
            let n = r.range(1, 70);
            let x = round(r.uniform(n * d, 3.0));
            let w = round(r.uniform(d, 1.5));
            let got = rms_norm(dtype, &x, &w, 1e-5, &next()).unwrap();
            let want = llama_ops::rms_norm(&x, &w, 1e-5).unwrap();
            let err = rel_l2(&got, &want);
            assert!(err < tol, "rms_norm {dtype:?} d={d}: {err}");

            let g = round(r.uniform(n * d, 6.0));
            let u = round(r.uniform(n * d, 2.0));
            let got = silu_mul(dtype, &g, &u, &next()).unwrap();
            let want = llama_ops::silu_mul(&g, &u).unwrap();
            assert!(rel_l2(&got, &want) < tol, "silu_mul {dtype:?} d={d}");

            let vocab = r.range(1, 300);
            let table = round(r.uniform(vocab * d, 1.0));
            let ids: Vec<u32> = (0..n).map(|_| r.range(0, vocab - 1) as u32).collect();
            let got = embedding(dtype, &ids, &table, d, &next()).unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec())
                .collect();
            assert_eq!(got, want, "embedding is an exact copy");
            assert!(embedding(dtype, &[vocab as u32], &table, d, &next()).is_err());
        }
    }
    let emu = EmulatorOptions::default();
    assert!(rms_norm(DType::BF16, &[0.0; 16], &[0.0; 7], 1e-5, &emu).is_err());
    assert!(rms_norm(DType::BF16, &[0.0; 16], &[0.0; 8], f32::NAN, &emu).is_err());
}
