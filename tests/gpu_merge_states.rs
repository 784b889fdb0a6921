//! The merge kernels against the CPU oracle (needs a CUDA device).

mod common;

use ape_attn::cuda::{
    merge_state_in_place, merge_states, merge_states_into, DType, Device, Tensor,
};
use ape_attn::reference;
use common::{max_abs_diff, seeded, Seeded};

fn device() -> Device {
    Device::new(0).expect("a CUDA device with the kernels built")
}

/// Random stacked states with about a quarter of them empty (LSE -inf, output poisoned with NaN:
/// an empty state's output must never be read).
fn random_states(r: &mut Seeded, n_states: usize, n: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut v = r.uniform(n_states * n * d, 2.0);
    let mut s = r.uniform(n_states * n, 20.0);
    for k in 0..n_states {
        for i in 0..n {
            if r.range(0, 3) == 0 {
                s[k * n + i] = f32::NEG_INFINITY;
                v[(k * n + i) * d..][..d].fill(f32::NAN);
            }
        }
    }
    // One row with every state empty.
    for k in 0..n_states {
        s[k * n] = f32::NEG_INFINITY;
        v[k * n * d..][..d].fill(f32::NAN);
    }
    (v, s)
}

fn rounded(x: &[f32], dtype: DType) -> Vec<f32> {
    x.iter().map(|&v| dtype.round(v)).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn merge_states_matches_the_oracle() {
    let dev = device();
    let mut r = seeded("merge_states_matches_the_oracle");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128, 80, 3, 256] {
            for n_states in [1, 2, 7, 33] {
                let (n_rows, n_heads) = (r.range(1, 300), r.pick(&[1, 4, 8]));
                let n = n_rows * n_heads;
                let (v, s) = random_states(&mut r, n_states, n, d);
                let v = rounded(&v, dtype);
                let vt =
                    Tensor::from_f32(&dev, &[n_states, n_rows, n_heads, d], &v, dtype).unwrap();
                let st =
                    Tensor::from_f32(&dev, &[n_states, n_rows, n_heads], &s, DType::F32).unwrap();
                // Poison the outputs before the launch.
                let mut vo =
                    Tensor::from_f32(&dev, &[n_rows, n_heads, d], &vec![f32::NAN; n * d], dtype)
                        .unwrap();
                let mut so =
                    Tensor::from_f32(&dev, &[n_rows, n_heads], &vec![f32::NAN; n], DType::F32)
                        .unwrap();
                merge_states_into(&dev, &vt, &st, &mut vo, &mut so).unwrap();
                let (want_v, want_s) = reference::merge_states(&v, &s, n_states, d).unwrap();
                let (got_v, got_s) = (vo.to_f32(&dev).unwrap(), so.to_f32(&dev).unwrap());
                assert!(
                    got_v.iter().all(|x| !x.is_nan()),
                    "NaN in output ({dtype:?}, d={d})"
                );
                let err = reference::rel_l2(&got_v, &want_v);
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(
                    err < tol,
                    "{dtype:?} d={d} n_states={n_states}: rel L2 {err}"
                );
                assert!(max_abs_diff(&got_s, &want_s) < 1e-4, "{dtype:?} d={d}: lse");
                // The allocating form agrees with the _into form.
                let (v2, s2) = merge_states(&dev, &vt, &st).unwrap();
                assert_eq!(v2.to_f32(&dev).unwrap(), got_v);
                assert_eq!(s2.to_f32(&dev).unwrap(), got_s);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn merge_state_in_place_matches_the_oracle() {
    let dev = device();
    let mut r = seeded("merge_state_in_place_matches_the_oracle");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128, 5] {
            let n = r.range(1, 2000);
            let (v, s) = random_states(&mut r, 2, n, d);
            let v = rounded(&v, dtype);
            let (va, vb) = v.split_at(n * d);
            let (sa, sb) = s.split_at(n);
            let mut vt = Tensor::from_f32(&dev, &[n, d], va, dtype).unwrap();
            let mut st = Tensor::from_f32(&dev, &[n], sa, DType::F32).unwrap();
            let vo = Tensor::from_f32(&dev, &[n, d], vb, dtype).unwrap();
            let so = Tensor::from_f32(&dev, &[n], sb, DType::F32).unwrap();
            merge_state_in_place(&dev, &mut vt, &mut st, &vo, &so).unwrap();
            let (want_v, want_s) = reference::merge_states(&v, &s, 2, d).unwrap();
            let (got_v, got_s) = (vt.to_f32(&dev).unwrap(), st.to_f32(&dev).unwrap());
            assert!(got_v.iter().all(|x| !x.is_nan()));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(reference::rel_l2(&got_v, &want_v) < tol, "{dtype:?} d={d}");
            assert!(max_abs_diff(&got_s, &want_s) < 1e-4);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn merge_rejects_bad_inputs() {
    let dev = device();
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
