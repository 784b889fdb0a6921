//! The Llama-op kernels against the CPU oracle (needs a CUDA device).

mod common;

use ape_attn::cuda::{embedding, rms_norm, silu_mul, DType, Device, Tensor};
use ape_attn::reference::{llama_ops, rel_l2};
use common::seeded;

#[test]
#[ignore = "needs a CUDA device"]
fn llama_ops_match_the_oracle() {
    let dev = Device::new(0).expect("a CUDA device with the kernels built");
    let mut r = seeded("llama_ops_match_the_oracle");
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let round = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| dtype.round(x)).collect() };
        for d in [576, 4096, 100, 1] {
            let n = r.range(1, 70);
            let x = round(r.uniform(n * d, 3.0));
            let w = round(r.uniform(d, 1.5));
            let xt = Tensor::from_f32(&dev, &[n, d], &x, dtype).unwrap();
            let wt = Tensor::from_f32(&dev, &[d], &w, dtype).unwrap();
            let got = rms_norm(&dev, &xt, &wt, 1e-5)
                .unwrap()
                .to_f32(&dev)
                .unwrap();
            let want = llama_ops::rms_norm(&x, &w, 1e-5).unwrap();
            assert!(
                rel_l2(&got, &want) < tol,
                "rms_norm {dtype:?} d={d}: {}",
                rel_l2(&got, &want)
            );

            let g = round(r.uniform(n * d, 6.0));
            let u = round(r.uniform(n * d, 2.0));
            let gt = Tensor::from_f32(&dev, &[n, d], &g, dtype).unwrap();
            let ut = Tensor::from_f32(&dev, &[n, d], &u, dtype).unwrap();
            let got = silu_mul(&dev, &gt, &ut).unwrap().to_f32(&dev).unwrap();
            let want = llama_ops::silu_mul(&g, &u).unwrap();
            assert!(rel_l2(&got, &want) < tol, "silu_mul {dtype:?} d={d}");

            let vocab = r.range(1, 300);
            let table = round(r.uniform(vocab * d, 1.0));
            let tt = Tensor::from_f32(&dev, &[vocab, d], &table, dtype).unwrap();
            let ids: Vec<u32> = (0..n).map(|_| r.range(0, vocab - 1) as u32).collect();
            let got = embedding(&dev, &ids, &tt).unwrap().to_f32(&dev).unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec())
                .collect();
            assert_eq!(got, want, "embedding is an exact copy");
            assert!(embedding(&dev, &[vocab as u32], &tt).is_err());
        }
    }
    let x = Tensor::zeros(&dev, &[2, 8], DType::BF16).unwrap();
    let w = Tensor::zeros(&dev, &[7], DType::BF16).unwrap();
    assert!(rms_norm(&dev, &x, &w, 1e-5).is_err());
    let w = Tensor::zeros(&dev, &[8], DType::BF16).unwrap();
    assert!(rms_norm(&dev, &x, &w, f32::NAN).is_err());
}
