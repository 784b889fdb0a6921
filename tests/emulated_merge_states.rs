//! The merge kernels (`kernels/merge_states.cu`) on the kernel emulator against the CPU oracle:
//! the cases of `tests/gpu_merge_states.rs`, both access widths (16-byte vectors and scalars), each
//! launch under the next of the emulator's four schedules.

mod common;

use ape_attn::cuda::DType;
use ape_attn::emulator::{merge_state_in_place, merge_states, EmulatorOptions};
use ape_attn::reference;
use common::{max_abs_diff, seeded, Seeded};

/// Random stacked states, about a quarter empty (LSE -inf, output NaN: never to be read), and one
/// row with every state empty.
fn random_states(r: &mut Seeded, n_states: usize, n: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut v = r.uniform(n_states * n * d, 2.0);
    let mut s = r.uniform(n_states * n, 20.0);
    for k in 0..n_states {
        for i in 0..n {
            if i == 0 || r.range(0, 3) == 0 {
                s[k * n + i] = f32::NEG_INFINITY;
                v[(k * n + i) * d..][..d].fill(f32::NAN);
            }
        }
    }
    (v, s)
}

fn schedule(i: usize) -> EmulatorOptions {
    EmulatorOptions::default().schedules()[i % 4]
}

#[test]
fn merge_states_matches_the_oracle() {
    let mut r = seeded("emulated_merge_states_matches_the_oracle");
    let mut launches = 0;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128, 80, 3, 256] {
            for n_states in [1, 2, 7, 33] {
                let n = r.range(1, 300) * r.pick(&[1, 4, 8]);
                let (v, s) = random_states(&mut r, n_states, n, d);
                let v: Vec<f32> = v.iter().map(|&x| dtype.round(x)).collect();
                let (got_v, got_s) =
                    merge_states(dtype, &v, &s, n_states, d, &schedule(launches)).unwrap();
                launches += 1;
                let (want_v, want_s) = reference::merge_states(&v, &s, n_states, d).unwrap();
                assert!(got_v.iter().all(|x| !x.is_nan()), "NaN ({dtype:?}, d={d})");
                let err = reference::rel_l2(&got_v, &want_v);
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(
                    err < tol,
                    "{dtype:?} d={d} n_states={n_states}: rel L2 {err}"
                );
                assert!(max_abs_diff(&got_s, &want_s) < 1e-4, "{dtype:?} d={d}: lse");
            }
        }
    }
}

#[test]
fn merge_state_in_place_matches_the_oracle() {
    let mut r = seeded("emulated_merge_state_in_place_matches_the_oracle");
    let mut launches = 0;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128, 5] {
            let n = r.range(1, 2000);
            let (v, s) = random_states(&mut r, 2, n, d);
            let v: Vec<f32> = v.iter().map(|&x| dtype.round(x)).collect();
            let (mut va, vb) = (v[..n * d].to_vec(), &v[n * d..]);
            let (mut sa, sb) = (s[..n].to_vec(), &s[n..]);
            merge_state_in_place(dtype, &mut va, &mut sa, vb, sb, d, &schedule(launches)).unwrap();
            launches += 1;
            let (want_v, want_s) = reference::merge_states(&v, &s, 2, d).unwrap();
            assert!(va.iter().all(|x| !x.is_nan()));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(reference::rel_l2(&va, &want_v) < tol, "{dtype:?} d={d}");
            assert!(max_abs_diff(&sa, &want_s) < 1e-4);
        }
    }
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
