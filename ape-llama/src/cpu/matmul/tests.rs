//! `QMatrix::matmul` against an independent oracle (`quant::dequantize` and an f64 dot product
//! with the unquantised x), and the SIMD kernels against the scalar ones.
//!
//! Error bounds:
//! - Against the oracle, relative L2 over all outputs `< 1e-2` for the quantised types. The
//!   activations are rounded to 8 bits per block: with x uniform in [-1, 1] each element is off by
//!   at most `amax / 254` (rms about `amax / 440`, i.e. about 0.4% of x's rms), the errors are
//!   independent, so a dot product with random weights is off by about 0.4% of its size; the
//!   bound leaves a factor of 2.5 (measured: at most 6.2e-3, Q4_K, whose 256-value blocks have
//!   a larger amax). Float weights and the sgemm path multiply x unquantised: `< 1e-5`.
//! - SIMD against scalar, per output: `|a - b| <= 1e-5 * Σ|w x|`; both sum the same exact
//!   per-block integers times the same f32 scales, in a different order.
//! - Exactly representable x: `|y - oracle| <= 2e-6 * Σ|w x|` (only f32 rounding remains).

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ALL: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q6K,
];

fn put_f16(b: &mut [u8], v: f32) {
    b.copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Random raw bytes of a `rows x cols` matrix of `ty`: every quant bit pattern, sane scales.
fn random_raw(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let (values, bytes) = ty.block();
    let nb = rows * cols / values;
    let mut raw = vec![0u8; nb * bytes];
    match ty {
        GgmlType::F32 => {
            for b in raw.chunks_exact_mut(4) {
                b.copy_from_slice(&rng.gen_range(-1.0f32..1.0).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for b in raw.chunks_exact_mut(2) {
                put_f16(b, rng.gen_range(-1.0..1.0));
            }
        }
        GgmlType::BF16 => {
            for b in raw.chunks_exact_mut(2) {
                b.copy_from_slice(&bf16::from_f32(rng.gen_range(-1.0..1.0)).to_le_bytes());
            }
        }
        _ => {
            rng.fill(&mut raw[..]);
            for b in raw.chunks_exact_mut(bytes) {
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q8_0 => {
                        put_f16(&mut b[..2], rng.gen_range(-0.1..0.1))
                    }
                    GgmlType::Q4_1 => {
                        put_f16(&mut b[..2], rng.gen_range(0.0..0.1));
                        put_f16(&mut b[2..4], rng.gen_range(-0.8..0.0));
                    }
                    GgmlType::Q4K => {
                        put_f16(&mut b[..2], rng.gen_range(0.0..0.01));
                        put_f16(&mut b[2..4], rng.gen_range(0.0..0.01));
                    }
                    _ => put_f16(&mut b[208..210], rng.gen_range(-0.01..0.01)),
                }
            }
        }
    }
    raw
}

/// `(y, Σ|w x|)` per output, in f64, from the dequantised weights and the f32 x.
fn oracle(ty: GgmlType, raw: &[u8], rows: usize, cols: usize, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let w = quant::dequantize(ty, raw, rows * cols).unwrap();
    let n = x.len() / cols;
    let (mut y, mut mag) = (vec![0.0; n * rows], vec![0.0; n * rows]);
    for i in 0..n {
        for r in 0..rows {
            let (wr, xr) = (&w[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols]);
            y[i * rows + r] = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
            mag[i * rows + r] = wr
                .iter()
                .zip(xr)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
        }
    }
    (y, mag)
}

fn rel_l2(y: &[f32], want: &[f64]) -> f64 {
    let num: f64 = y
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

fn run(m: &QMatrix, k: Kernels, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n * m.rows()];
    m.matmul_with(k, x, n, &mut y);
    y
}

fn float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Every type and path against the oracle, and SIMD against scalar, for one shape.
fn check(ty: GgmlType, rows: usize, cols: usize, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let raw = random_raw(ty, rows, cols, &mut rng);
    let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let m = QMatrix::from_raw(ty, rows, cols, raw.clone()).unwrap();
    let (want, mag) = oracle(ty, &raw, rows, cols, &x);
    let bound = if float(ty) { 1e-5 } else { 1e-2 };
    let packs =
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) && rows.is_multiple_of(8);
    assert_eq!(m.is_packed(), packs, "{ty:?} {rows}x{cols}");
    for k in [
        Kernels::Auto,
        Kernels::Scalar,
        Kernels::Avx2,
        Kernels::Vnni,
        Kernels::Sgemm,
    ] {
        let y = run(&m, k, &x, n);
        let e = rel_l2(&y, &want);
        let bound = if k == Kernels::Sgemm { 1e-5 } else { bound };
        assert!(
            e < bound,
            "{ty:?} {k:?} {rows}x{cols} n={n}: relative L2 {e:e}"
        );
        if std::env::var_os("APE_MATMUL_ERRORS").is_some() {
            eprintln!("{ty:?} {k:?} {rows}x{cols} n={n}: relative L2 {e:.2e}");
        }
    }
    let scalar = run(&m, Kernels::Scalar, &x, n);
    if packs {
        // The packed kernels against the file layout's: the same exact block sums.
        let file = QMatrix::from_raw_unpacked(ty, rows, cols, raw.clone()).unwrap();
        assert!(!file.is_packed());
        let y = run(&file, Kernels::Scalar, &x, n);
        for (j, ((&a, &b), &s)) in y.iter().zip(&scalar).zip(&mag).enumerate() {
            assert!(
                (a - b).abs() as f64 <= 1e-5 * s + 1e-30,
                "{ty:?} n={n} output {j}: file layout {a} vs packed {b} (Σ|wx| {s})"
            );
        }
    }
    for k in [Kernels::Avx2, Kernels::Vnni] {
        let simd = run(&m, k, &x, n);
        for (j, ((&a, &b), &s)) in simd.iter().zip(&scalar).zip(&mag).enumerate() {
            assert!(
                (a - b).abs() as f64 <= 1e-5 * s + 1e-30,
                "{ty:?} {k:?} n={n} output {j}: {a} vs scalar {b} (Σ|wx| {s})"
            );
        }
    }
}

#[test]
fn every_type_against_the_oracle() {
    for (t, &ty) in ALL.iter().enumerate() {
        for &n in &[1usize, 2, 3, 4, 5, 8, 64] {
            check(ty, 67, 512, n, 100 * t as u64 + n as u64);
        }
    }
}

#[test]
fn packed_groups_of_eight_rows() {
    // Row counts that are multiples of 8 (the packed layout) next to ones that are not.
    for (t, &ty) in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0]
        .iter()
        .enumerate()
    {
        let seed = 1000 * t as u64;
        for &rows in &[8usize, 16, 67, 72] {
            for n in 1..=5 {
                check(ty, rows, 256, n, seed + (rows * 10 + n) as u64);
            }
        }
        check(ty, 64, 512, 64, seed + 1);
        check(ty, 40, 64, 513, seed + 2);
        check(ty, 1000, 768, 1, seed + 3);
        check(ty, 1000, 768, 4, seed + 4);
        check(ty, 1000, 768, 7, seed + 5);
    }
}

#[test]
fn many_rows_and_tasks() {
    // Row counts that are not multiples of any chunk size, and enough work for several tasks.
    for &ty in &[
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::F16,
    ] {
        check(ty, 1003, 768, 1, 7);
        check(ty, 1003, 768, 3, 8);
        check(ty, 37, 256, 513, 9);
    }
    for &ty in &[GgmlType::Q4_0, GgmlType::F32, GgmlType::BF16] {
        check(ty, 37, 256, 513, 10);
    }
}

/// x made of blocks `q * 2^e` with integer `|q| <= 127`, one of them ±127 and the block sum
/// exactly representable in f16: the 8-bit quantisation of x is then exact.
fn exact_x(n: usize, cols: usize, block: usize, rng: &mut StdRng) -> Vec<f32> {
    let mut x = Vec::with_capacity(n * cols);
    while x.len() < n * cols {
        let e = rng.gen_range(-8..3);
        let mut q: Vec<i32> = (0..block).map(|_| rng.gen_range(-127..=127)).collect();
        q[rng.gen_range(0..block)] = if rng.gen() { 127 } else { -127 };
        if q.iter().sum::<i32>().abs() > 2048 {
            continue;
        }
        x.extend(q.iter().map(|&q| q as f32 * 2f32.powi(e)));
    }
    x
}

#[test]
fn exactly_quantised_x_matches_the_oracle() {
    let mut rng = StdRng::seed_from_u64(42);
    for &ty in &ALL[3..] {
        let block = if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) {
            256
        } else {
            32
        };
        // 45 rows: the file's layout; 48: the packed one (for Q4_0, Q4_1, Q8_0).
        for rows in [45, 48] {
            let cols = 768;
            let raw = random_raw(ty, rows, cols, &mut rng);
            let m = QMatrix::from_raw(ty, rows, cols, raw.clone()).unwrap();
            for &n in &[1usize, 3, 6] {
                let x = exact_x(n, cols, block, &mut rng);
                let (want, mag) = oracle(ty, &raw, rows, cols, &x);
                for k in [Kernels::Auto, Kernels::Scalar, Kernels::Avx2, Kernels::Vnni] {
                    let y = run(&m, k, &x, n);
                    for (j, ((&a, &b), &s)) in y.iter().zip(&want).zip(&mag).enumerate() {
                        assert!(
                            (a as f64 - b).abs() <= 2e-6 * s,
                            "{ty:?} {k:?} {rows} rows n={n} output {j}: {a} vs {b} (Σ|wx| {s})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn simd_activation_quantisation_is_the_scalar_one() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut x: Vec<f32> = (0..32 * 64).map(|_| rng.gen_range(-3.0..3.0)).collect();
    x[..32].fill(0.0); // an all-zero block
    x[32..64].fill(0.0);
    x[40] = -1.0; // a one-hot block
                  // Blocks of half-integers.
    for (i, v) in x[64..128].iter_mut().enumerate() {
        *v = (i as f32 - 32.0) + 0.5;
    }
    let x3 = exact_x(1, 32 * 8, 32, &mut rng);
    x[128..128 + 256].copy_from_slice(&x3);
    let zero = BlockQ8 {
        d: 0.0,
        s: 0.0,
        sum: 0,
        qs: [0; 32],
    };
    let mut want = vec![zero; 64];
    quantize_q8(Isa::Scalar, &x, &mut want);
    for k in [Kernels::Avx2, Kernels::Vnni] {
        let mut got = vec![zero; 64];
        quantize_q8(Isa::detect(k), &x, &mut got);
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                (g.d.to_bits(), g.s.to_bits(), g.sum, g.qs),
                (w.d.to_bits(), w.s.to_bits(), w.sum, w.qs),
                "{k:?} block {b}"
            );
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    for &ty in &ALL {
        let (values, bytes) = ty.block();
        let good = 3 * 256 / values * bytes;
        assert!(QMatrix::from_raw(ty, 3, 256, vec![0; good]).is_ok());
        assert!(QMatrix::from_raw(ty, 3, 256, vec![0; good - 1]).is_err());
        assert!(QMatrix::from_raw(ty, 3, 256, vec![0; good + 1]).is_err());
        if values > 1 {
            assert!(QMatrix::from_raw(ty, 3, 250, vec![0; good]).is_err());
        }
    }
    assert!(QMatrix::from_raw(GgmlType::Q8_0, usize::MAX, 64, vec![]).is_err());
    assert!(QMatrix::from_f32(2, 3, vec![0.0; 5]).is_err());
    let m = QMatrix::from_f32(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    assert_eq!(
        (m.ty(), m.rows(), m.cols(), m.bytes()),
        (GgmlType::F32, 2, 3, 24)
    );
    let mut y = vec![0.0; 4];
    m.matmul(&[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], 2, &mut y);
    assert_eq!(y, vec![4.0, 10.0, 2.0, 5.0]);
}

#[test]
fn row_f32_is_the_dequantised_row() {
    let mut rng = StdRng::seed_from_u64(5);
    for &ty in &ALL {
        // 4 rows: the file's layout; 24: the packed one (for Q4_0, Q4_1, Q8_0).
        for rows in [4, 24] {
            let raw = random_raw(ty, rows, 512, &mut rng);
            let w = quant::dequantize(ty, &raw, rows * 512).unwrap();
            let m = QMatrix::from_raw(ty, rows, 512, raw).unwrap();
            assert_eq!(m.bytes(), rows * 512 / ty.block().0 * ty.block().1);
            let mut out = vec![0.0; 520];
            for r in [0, 2, rows - 1] {
                m.row_f32(r, &mut out);
                assert_eq!(&out[..512], &w[r * 512..(r + 1) * 512], "{ty:?} row {r}");
            }
        }
    }
}

#[test]
fn the_best_kernels_are_chosen() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        assert_eq!(Isa::detect(Kernels::Auto), Isa::Vnni);
        assert_eq!(Isa::detect(Kernels::Avx2), Isa::Avx2);
    }
    assert_eq!(Isa::detect(Kernels::Scalar), Isa::Scalar);
}
