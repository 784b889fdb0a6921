//! The merge, RoPE and Llama-op kernel cases, written once for every backend that runs the
//! kernels: the GPU (`tests/gpu_{merge_states,rope,llama_ops}.rs`, needs a CUDA device) and the
//! kernel emulator (`tests/emulated_{merge_states,rope,llama_ops}.rs`). Inputs are rounded to the
//! dtype before the oracle sees them; a backend starts its outputs as NaN.
#![allow(dead_code)]

use ape_attn::cuda::DType;
use ape_attn::reference::{self, llama_ops, rel_l2, rope};
use ape_attn::{RopeConfig, RopeLayout};

use crate::common::{max_abs_diff, seeded, Seeded, LLAMA31};

/// What runs the kernels: each method takes f32 host data, rounds it to `dtype`, runs the kernel,
/// and returns the `dtype` results as f32.
pub trait OpsBackend {
    /// `merge_states`: `v [n_states, n, d]`, `s [n_states, n]` -> `(v_out [n, d], s_out [n])`.
    fn merge_states(
        &self,
        dtype: DType,
        v: &[f32],
        s: &[f32],
        n_states: usize,
        d: usize,
    ) -> (Vec<f32>, Vec<f32>);
    /// `merge_state_in_place`: `(va, sa)` merged with `(vb, sb)`, each `[n, d]` and `[n]`.
    fn merge_state_in_place(
        &self,
        dtype: DType,
        va: &[f32],
        sa: &[f32],
        vb: &[f32],
        sb: &[f32],
        d: usize,
    ) -> (Vec<f32>, Vec<f32>);
    /// RoPE apply (`per_token`, at `pos + t`) or shift (by `pos`) of `x [n_tokens, n_heads, d]`.
    fn rope(
        &self,
        dtype: DType,
        x: &[f32],
        shape: [usize; 3],
        cfg: &RopeConfig,
        pos: i64,
        per_token: bool,
    ) -> Vec<f32>;
    /// RMSNorm of `x [n, d]` (in `x_dtype`) with weight `w [d]` (in `dtype`, as is the output).
    fn rms_norm(
        &self,
        x_dtype: DType,
        dtype: DType,
        x: &[f32],
        w: &[f32],
        eps: f32,
    ) -> ape_attn::Result<Vec<f32>>;
    /// `silu(g) * u`.
    fn silu_mul(&self, dtype: DType, g: &[f32], u: &[f32]) -> Vec<f32>;
    /// Rows `ids` of `table [vocab, d]` (in `dtype`), written in `y_dtype`.
    fn embedding(
        &self,
        dtype: DType,
        y_dtype: DType,
        ids: &[u32],
        table: &[f32],
        d: usize,
    ) -> ape_attn::Result<Vec<f32>>;
    /// `n` synthetic weights `offset + scale * u` from `seed`.
    fn fill_uniform(
        &self,
        dtype: DType,
        n: usize,
        seed: u32,
        scale: f32,
        offset: f32,
    ) -> ape_attn::Result<Vec<f32>>;
}

/// Random stacked states, about a quarter empty (LSE -inf, output NaN: an empty state's output
/// must never be read), and row 0 empty in every state.
pub fn random_states(r: &mut Seeded, n_states: usize, n: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
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

fn rounded(x: &[f32], dtype: DType) -> Vec<f32> {
    x.iter().map(|&v| dtype.round(v)).collect()
}

fn tolerance(dtype: DType, f32_tol: f64) -> f64 {
    if dtype == DType::F32 {
        f32_tol
    } else {
        1e-2
    }
}

/// Both access widths (16-byte vectors and scalars: head dims 3 and 80 in f16/bf16), 1 to 33
/// states, rows times heads up to 2400.
pub fn merge_states_matches_the_oracle(b: &dyn OpsBackend) {
    let mut r = seeded("merge_states_matches_the_oracle");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128, 80, 3, 256] {
            for n_states in [1, 2, 7, 33] {
                let n = r.range(1, 300) * r.pick(&[1, 4, 8]);
                let (v, s) = random_states(&mut r, n_states, n, d);
                let v = rounded(&v, dtype);
                let (got_v, got_s) = b.merge_states(dtype, &v, &s, n_states, d);
                let (want_v, want_s) = reference::merge_states(&v, &s, n_states, d).unwrap();
                assert!(got_v.iter().all(|x| !x.is_nan()), "NaN ({dtype:?}, d={d})");
                let err = rel_l2(&got_v, &want_v);
                let tol = tolerance(dtype, 1e-5);
                assert!(
                    err < tol,
                    "{dtype:?} d={d} n_states={n_states}: rel L2 {err}"
                );
                assert!(max_abs_diff(&got_s, &want_s) < 1e-4, "{dtype:?} d={d}: lse");
            }
        }
    }
}

pub fn merge_state_in_place_matches_the_oracle(b: &dyn OpsBackend) {
    let mut r = seeded("merge_state_in_place_matches_the_oracle");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128, 5] {
            let n = r.range(1, 2000);
            let (v, s) = random_states(&mut r, 2, n, d);
            let v = rounded(&v, dtype);
            let (va, vb) = v.split_at(n * d);
            let (sa, sb) = s.split_at(n);
            let (got_v, got_s) = b.merge_state_in_place(dtype, va, sa, vb, sb, d);
            let (want_v, want_s) = reference::merge_states(&v, &s, 2, d).unwrap();
            assert!(got_v.iter().all(|x| !x.is_nan()));
            assert!(
                rel_l2(&got_v, &want_v) < tolerance(dtype, 1e-5),
                "{dtype:?} d={d}"
            );
            assert!(max_abs_diff(&got_s, &want_s) < 1e-4);
        }
    }
}

/// Both layouts, Llama 3 scaling at random, positions to 130K, shifts from -20K to 110K.
pub fn rope_apply_and_shift_match_the_oracle(b: &dyn OpsBackend) {
    let mut r = seeded("rope_apply_and_shift_match_the_oracle");
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
            for head_dim in [64, 128] {
                let mut cfg = RopeConfig::new(head_dim, 500_000.0, layout).unwrap();
                if r.coin() {
                    cfg = cfg.with_llama3_scaling(LLAMA31).unwrap();
                }
                let (n_tokens, n_heads) = (r.range(1, 700), r.pick(&[1, 3, 8]));
                let shape = [n_tokens, n_heads, head_dim];
                let x = rounded(&r.uniform(n_tokens * n_heads * head_dim, 2.0), dtype);
                let pos = r.range(0, 130_000) as i64;
                let delta = r.range(0, 130_000) as i64 - 20_000;
                let tol = tolerance(dtype, 1e-6);

                let got = b.rope(dtype, &x, shape, &cfg, pos, true);
                let mut want = x.clone();
                rope::apply(&mut want, n_tokens, n_heads, &cfg, pos).unwrap();
                let err = rel_l2(&got, &want);
                println!("apply {dtype:?} {layout:?} d={head_dim} pos={pos}: rel L2 {err:.2e}");
                assert!(err < tol);

                // Shift what the kernel produced, against the oracle shifting the same input.
                let shifted = b.rope(dtype, &got, shape, &cfg, delta, false);
                let mut want = got.clone();
                rope::shift(&mut want, n_tokens, n_heads, &cfg, delta).unwrap();
                let err = rel_l2(&shifted, &want);
                println!("shift {dtype:?} {layout:?} d={head_dim} delta={delta}: rel L2 {err:.2e}");
                assert!(err < tol);
            }
        }
    }
}

/// Widths 576 (the default model), 4096, 100 and 1; the embedding is an exact copy. RMSNorm also
/// reads an f32 `x` and the embedding also writes f32 (the forward pass's f32 residual stream).
pub fn llama_ops_match_the_oracle(b: &dyn OpsBackend) {
    let mut r = seeded("llama_ops_match_the_oracle");
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tol = tolerance(dtype, 1e-5);
        let round = |v: Vec<f32>| rounded(&v, dtype);
        for d in [576, 4096, 100, 1] {
            let n = r.range(1, 70);
            for x_dtype in [dtype, DType::F32] {
                let x = rounded(&r.uniform(n * d, 3.0), x_dtype);
                let w = round(r.uniform(d, 1.5));
                let got = b.rms_norm(x_dtype, dtype, &x, &w, 1e-5).unwrap();
                let want = llama_ops::rms_norm(&x, &w, 1e-5).unwrap();
                let err = rel_l2(&got, &want);
                assert!(err < tol, "rms_norm {x_dtype:?} -> {dtype:?} d={d}: {err}");
            }

            let g = round(r.uniform(n * d, 6.0));
            let u = round(r.uniform(n * d, 2.0));
            let got = b.silu_mul(dtype, &g, &u);
            let want = llama_ops::silu_mul(&g, &u).unwrap();
            assert!(rel_l2(&got, &want) < tol, "silu_mul {dtype:?} d={d}");

            let vocab = r.range(1, 300);
            let table = round(r.uniform(vocab * d, 1.0));
            let ids: Vec<u32> = (0..n).map(|_| r.range(0, vocab - 1) as u32).collect();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec())
                .collect();
            for y_dtype in [dtype, DType::F32] {
                let got = b.embedding(dtype, y_dtype, &ids, &table, d).unwrap();
                assert_eq!(
                    got, want,
                    "embedding {dtype:?} -> {y_dtype:?} is an exact copy"
                );
                assert!(b
                    .embedding(dtype, y_dtype, &[vocab as u32], &table, d)
                    .is_err());
            }
        }
    }
    let bf16 = DType::BF16;
    assert!(b.rms_norm(bf16, bf16, &[0.0; 16], &[0.0; 7], 1e-5).is_err());
    assert!(b
        .rms_norm(bf16, bf16, &[0.0; 16], &[0.0; 8], f32::NAN)
        .is_err());
    // Mixed dtypes other than an f32 x (RMSNorm) or an f32 y (embedding) are refused.
    assert!(b
        .rms_norm(bf16, DType::F16, &[1.0; 16], &[1.0; 8], 1e-5)
        .is_err());
    assert!(b
        .rms_norm(bf16, DType::F32, &[1.0; 16], &[1.0; 8], 1e-5)
        .is_err());
    assert!(b.embedding(DType::F32, bf16, &[0], &[1.0; 8], 8).is_err());
    assert!(b.embedding(bf16, DType::F16, &[0], &[1.0; 8], 8).is_err());
}

/// The synthetic-weight fill against the oracle's hash: every value is the oracle's rounded to the
/// dtype, up to one last-bit difference where the kernel rounds the product and the sum apart.
pub fn fill_uniform_matches_the_oracle(b: &dyn OpsBackend) {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Relative spacing, and the absolute spacing of the smallest (subnormal) values.
        let (eps, tiny) = match dtype {
            DType::F32 => (f32::EPSILON, f32::MIN_POSITIVE),
            DType::F16 => (1.0 / 1024.0, 1.0 / 16_777_216.0),
            DType::BF16 => (1.0 / 128.0, f32::MIN_POSITIVE),
        };
        for (n, seed, scale, offset) in [
            (100_003, 7, 0.05, 0.0),
            (4096, 123_456_789, 1.0, 1.0),
            (1, u32::MAX, 3.0, -0.5),
        ] {
            let got = b.fill_uniform(dtype, n, seed, scale, offset).unwrap();
            let want = llama_ops::fill_uniform(n, seed, scale, offset);
            assert_eq!(got.len(), n);
            let mut exact = 0;
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                exact += usize::from(g == dtype.round(w));
                assert!(
                    (g - w).abs() <= w.abs() * eps + tiny,
                    "fill {dtype:?} seed {seed}: element {i} is {g}, the oracle's {w}"
                );
                // Rounding is monotone: the range is the rounded ends'.
                assert!(g >= dtype.round(offset - scale) && g <= dtype.round(offset + scale));
            }
            println!("fill {dtype:?} n={n} seed={seed}: {exact} of {n} exact");
            assert!(exact as f64 >= 0.999 * n as f64, "{exact} of {n} exact");
        }
        let a = b.fill_uniform(dtype, 1000, 1, 1.0, 0.0).unwrap();
        let c = b.fill_uniform(dtype, 1000, 2, 1.0, 0.0).unwrap();
        assert_ne!(a, c, "the seed changes the values");
        assert!(b.fill_uniform(dtype, 10, 1, f32::NAN, 0.0).is_err());
        assert!(b.fill_uniform(dtype, 10, 1, 1.0, f32::INFINITY).is_err());
    }
}

impl OpsBackend for crate::common::Gpu {
    fn merge_states(
        &self,
        dtype: DType,
        v: &[f32],
        s: &[f32],
        n_states: usize,
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        use ape_attn::cuda::{merge_states, merge_states_into};
        let n = s.len() / n_states;
        let vt = self.upload(v, &[n_states, n, d], dtype);
        let st = self.upload(s, &[n_states, n], DType::F32);
        let (mut vo, mut so) = (self.nan(&[n, d], dtype), self.nan(&[n], DType::F32));
        merge_states_into(&self.0, &vt, &st, &mut vo, &mut so).unwrap();
        let got = (self.download(&vo), self.download(&so));
        // The allocating form agrees with the _into form.
        let (v2, s2) = merge_states(&self.0, &vt, &st).unwrap();
        assert_eq!(self.download(&v2), got.0);
        assert_eq!(self.download(&s2), got.1);
        got
    }

    fn merge_state_in_place(
        &self,
        dtype: DType,
        va: &[f32],
        sa: &[f32],
        vb: &[f32],
        sb: &[f32],
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = sa.len();
        let mut vt = self.upload(va, &[n, d], dtype);
        let mut st = self.upload(sa, &[n], DType::F32);
        let vo = self.upload(vb, &[n, d], dtype);
        let so = self.upload(sb, &[n], DType::F32);
        ape_attn::cuda::merge_state_in_place(&self.0, &mut vt, &mut st, &vo, &so).unwrap();
        (self.download(&vt), self.download(&st))
    }

    fn rope(
        &self,
        dtype: DType,
        x: &[f32],
        shape: [usize; 3],
        cfg: &RopeConfig,
        pos: i64,
        per_token: bool,
    ) -> Vec<f32> {
        let mut t = self.upload(x, &shape, dtype);
        if per_token {
            ape_attn::cuda::rope_apply(&self.0, &mut t, cfg, pos).unwrap();
        } else {
            ape_attn::cuda::rope_shift(&self.0, &mut t, cfg, pos).unwrap();
        }
        self.download(&t)
    }

    fn rms_norm(
        &self,
        x_dtype: DType,
        dtype: DType,
        x: &[f32],
        w: &[f32],
        eps: f32,
    ) -> ape_attn::Result<Vec<f32>> {
        let d = w.len();
        // A width w does not divide is the launcher's error to report: x goes up as one row.
        let shape = if d > 0 && x.len() % d == 0 {
            [x.len() / d, d]
        } else {
            [1, x.len()]
        };
        let xt = self.upload(x, &shape, x_dtype);
        let wt = self.upload(w, &[d], dtype);
        Ok(self.download(&ape_attn::cuda::rms_norm(&self.0, &xt, &wt, eps)?))
    }

    fn silu_mul(&self, dtype: DType, g: &[f32], u: &[f32]) -> Vec<f32> {
        let gt = self.upload(g, &[g.len()], dtype);
        let ut = self.upload(u, &[u.len()], dtype);
        self.download(&ape_attn::cuda::silu_mul(&self.0, &gt, &ut).unwrap())
    }

    fn embedding(
        &self,
        dtype: DType,
        y_dtype: DType,
        ids: &[u32],
        table: &[f32],
        d: usize,
    ) -> ape_attn::Result<Vec<f32>> {
        let tt = self.upload(table, &[table.len() / d, d], dtype);
        let mut y = self.nan(&[ids.len(), d], y_dtype);
        ape_attn::cuda::llama_ops::embedding_into(&self.0, ids, &tt, &mut y)?;
        Ok(self.download(&y))
    }

    fn fill_uniform(
        &self,
        dtype: DType,
        n: usize,
        seed: u32,
        scale: f32,
        offset: f32,
    ) -> ape_attn::Result<Vec<f32>> {
        let mut t = self.nan(&[n], dtype);
        ape_attn::cuda::llama_ops::fill_uniform(&self.0, &mut t, seed, scale, offset)?;
        Ok(self.download(&t))
    }
}

#[cfg(feature = "emulator")]
impl OpsBackend for crate::common::Emulated {
    fn merge_states(
        &self,
        dtype: DType,
        v: &[f32],
        s: &[f32],
        n_states: usize,
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        ape_attn::emulator::merge_states(dtype, v, s, n_states, d, &self.next()).unwrap()
    }

    fn merge_state_in_place(
        &self,
        dtype: DType,
        va: &[f32],
        sa: &[f32],
        vb: &[f32],
        sb: &[f32],
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut v, mut s) = (va.to_vec(), sa.to_vec());
        ape_attn::emulator::merge_state_in_place(dtype, &mut v, &mut s, vb, sb, d, &self.next())
            .unwrap();
        (v, s)
    }

    fn rope(
        &self,
        dtype: DType,
        x: &[f32],
        shape: [usize; 3],
        cfg: &RopeConfig,
        pos: i64,
        per_token: bool,
    ) -> Vec<f32> {
        let mut x = x.to_vec();
        let opts = self.next();
        if per_token {
            ape_attn::emulator::rope_apply(dtype, &mut x, shape, cfg, pos, &opts).unwrap();
        } else {
            ape_attn::emulator::rope_shift(dtype, &mut x, shape, cfg, pos, &opts).unwrap();
        }
        x
    }

    fn rms_norm(
        &self,
        x_dtype: DType,
        dtype: DType,
        x: &[f32],
        w: &[f32],
        eps: f32,
    ) -> ape_attn::Result<Vec<f32>> {
        ape_attn::emulator::rms_norm(x_dtype, dtype, x, w, eps, &self.next())
    }

    fn silu_mul(&self, dtype: DType, g: &[f32], u: &[f32]) -> Vec<f32> {
        ape_attn::emulator::silu_mul(dtype, g, u, &self.next()).unwrap()
    }

    fn embedding(
        &self,
        dtype: DType,
        y_dtype: DType,
        ids: &[u32],
        table: &[f32],
        d: usize,
    ) -> ape_attn::Result<Vec<f32>> {
        ape_attn::emulator::embedding(dtype, y_dtype, ids, table, d, &self.next())
    }

    fn fill_uniform(
        &self,
        dtype: DType,
        n: usize,
        seed: u32,
        scale: f32,
        offset: f32,
    ) -> ape_attn::Result<Vec<f32>> {
        ape_attn::emulator::fill_uniform(dtype, n, seed, scale, offset, &self.next())
    }
}
