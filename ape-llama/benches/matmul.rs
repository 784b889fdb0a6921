//! `QMatrix::matmul` (weights kept quantised, 8-bit activations, integer dot products) against
//! the CPU pass's present approach (weights dequantised to f32 at load: an f32 dot per output for
//! n <= 4, `matrixmultiply::sgemm` above; its code is copied below), at the default model's
//! (SmolLM2-135M) shapes: Q4_1 576x576 (q, o), 1536x576 (gate, up), 576x1536 (down), and Q8_0
//! 49152x576 (the tied output projection), for n = 1, 4, 64, 512 activation rows. `ours` has the
//! weights packed in groups of eight rows (what `QMatrix::from_raw` does for these shapes),
//! `ours-file-layout` keeps them in the file's layout (the path of row counts that are not a
//! multiple of 8), `ours-avx2` is the packed path without VNNI, `ours-sgemm` is `QMatrix`'s
//! other prefill path (tiles dequantised to f32, then sgemm). For n = 1 the throughput is the
//! bytes of weights streamed per product.
//!
//! The weights are random blocks (every quant bit pattern, sane scales), so the benchmark needs
//! no model file. `cargo bench -p ape-llama --bench matmul`.

use std::time::Duration;

use ape_llama::cpu::{Kernels, QMatrix};
use ape_llama::quant::{self, GgmlType};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

// ---- The present approach (ape-llama/src/cpu/mod.rs), copied as the baseline. ----

/// Dot product with eight independent accumulators (vectorises; f32).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y[n, out] = x[n, in] W^T` with `W` `[out, in]` row-major.
fn baseline(x: &[f32], w: &[f32], n: usize, din: usize, dout: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n * dout];
    if n <= 4 {
        let chunk = 64;
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
            for (o, yj) in out.iter_mut().enumerate() {
                let idx = c * chunk + o;
                let (i, j) = (idx / dout, idx % dout);
                *yj = dot(&x[i * din..(i + 1) * din], &w[j * din..(j + 1) * din]);
            }
        });
        return y;
    }
    // SAFETY: x holds n * din, w dout * din and y n * dout f32; the strides describe exactly
    // those row-major layouts (W read transposed).
    unsafe {
        matrixmultiply::sgemm(
            n,
            din,
            dout,
            1.0,
            x.as_ptr(),
            din as isize,
            1,
            w.as_ptr(),
            1,
            din as isize,
            0.0,
            y.as_mut_ptr(),
            dout as isize,
            1,
        );
    }
    y
}

// ---- Random weights. ----

fn put_f16(b: &mut [u8], v: f32) {
    b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

fn random_raw(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let (values, bytes) = ty.block();
    let mut raw = vec![0u8; rows * cols / values * bytes];
    rng.fill(&mut raw[..]);
    for b in raw.chunks_exact_mut(bytes) {
        put_f16(&mut b[..2], rng.gen_range(0.0..0.05));
        if ty == GgmlType::Q4_1 {
            put_f16(&mut b[2..4], rng.gen_range(-0.4..0.0));
        }
    }
    raw
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let shapes = [
        (GgmlType::Q4_1, 576, 576),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q8_0, 1536, 576),
        (GgmlType::Q8_0, 49152, 576),
    ];
    for (ty, rows, cols) in shapes {
        let raw = random_raw(ty, rows, cols, &mut rng);
        let w = quant::dequantize(ty, &raw, rows * cols).unwrap();
        let file = QMatrix::from_raw_unpacked(ty, rows, cols, raw.clone()).unwrap();
        let m = QMatrix::from_raw(ty, rows, cols, raw).unwrap();
        assert!(m.is_packed());
        let mut g = c.benchmark_group(format!("{ty:?} {rows}x{cols}"));
        g.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        for n in [1usize, 4, 64, 512] {
            if rows * n > 49152 * 64 {
                continue; // the output projection is only run on the last rows of a prefill
            }
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut y = vec![0.0f32; n * rows];
            // n = 1: bytes of weights streamed; above: outputs computed.
            g.throughput(if n == 1 {
                Throughput::Bytes(m.bytes() as u64)
            } else {
                Throughput::Elements((n * rows) as u64)
            });
            g.bench_with_input(BenchmarkId::new("ours", n), &n, |b, &n| {
                b.iter(|| m.matmul(&x, n, &mut y))
            });
            if n <= 4 {
                g.bench_with_input(BenchmarkId::new("ours-avx2", n), &n, |b, &n| {
                    b.iter(|| m.matmul_with(Kernels::Avx2, &x, n, &mut y))
                });
            }
            g.bench_with_input(BenchmarkId::new("ours-file-layout", n), &n, |b, &n| {
                b.iter(|| file.matmul(&x, n, &mut y))
            });
            if n >= 64 {
                g.bench_with_input(BenchmarkId::new("ours-sgemm", n), &n, |b, &n| {
                    b.iter(|| m.matmul_with(Kernels::Sgemm, &x, n, &mut y))
                });
            }
            if n == 1 {
                g.throughput(Throughput::Bytes((w.len() * 4) as u64));
            }
            g.bench_with_input(BenchmarkId::new("f32-baseline", n), &n, |b, &n| {
                b.iter(|| baseline(&x, &w, n, cols, rows))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
