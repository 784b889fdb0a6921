//! The CPU segmented attention kernels (`src/cpu/`) at model shapes: SmolLM2-135M (9 query heads,
//! 3 KV heads, head dim 64) and Llama-3-8B (32, 8, 128). Decode (1 row over 1K, 4K and 16K cached
//! keys in 1 and 16 segments) and prefill (64 and 512 rows over 4K cached keys plus their own
//! causal keys), plain attention against APE (`T = S = 0.9`) and with Block-Attention's RoPE shift
//! of every segment.
//!
//! Each kernel time comes with two references on the same inputs: a plain f32 loop (two-pass
//! softmax per row and head, one thread: what a straightforward port would do) and, at small sizes,
//! the f64 oracle. `kernel` runs on the global rayon pool, `kernel_1t` inside a pool of one thread
//! (the per-core speed against the one-thread loop).
//!
//! `cargo bench -p ape-attn --bench cpu_attention` (add `-- --warm-up-time 0.5
//! --measurement-time 2` for a quick pass).

use ape_attn::reference::{self, Query, Segment};
use ape_attn::{cpu, ApeParams, AttentionDims, RopeConfig, RopeLayout, RopeShift, SegmentRole};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic fill in [-1, 1); benchmarks need no statistical quality.
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            ((x >> 8) as f32 / 8_388_608.0) - 1.0
        })
        .collect()
}

/// A segment's stored `(k, v, len, pos_offset, role)`.
type Stored = (Vec<f32>, Vec<f32>, usize, usize, SegmentRole);

/// One benchmarked problem, owning its buffers.
struct Problem {
    dims: AttentionDims,
    q: Vec<f32>,
    n_rows: usize,
    q_pos: usize,
    /// `(k, v, len, pos_offset, role)`.
    kv: Vec<Stored>,
    shift: Option<RopeConfig>,
}

impl Problem {
    /// `keys` cached keys in `n_segs` Context segments, then (prefill) the rows' own causal keys.
    fn new(dims: AttentionDims, n_rows: usize, keys: usize, n_segs: usize, shift: bool) -> Self {
        let row = dims.n_kv_heads * dims.head_dim;
        let seg_len = keys / n_segs;
        let mut kv: Vec<_> = (0..n_segs)
            .map(|i| {
                let n = seg_len * row;
                let s = 2 * i as u32 + 10;
                (data(n, s), data(n, s + 1), seg_len, 0, SegmentRole::Context)
            })
            .collect();
        if n_rows > 1 {
            let n = n_rows * row;
            kv.push((data(n, 3), data(n, 4), n_rows, keys, SegmentRole::Causal));
        }
        let base = if dims.head_dim == 64 {
            100_000.0
        } else {
            500_000.0
        };
        Self {
            dims,
            q: data(n_rows * dims.n_heads * dims.head_dim, 1),
            n_rows,
            q_pos: keys,
            kv,
            shift: shift.then(|| RopeConfig::new(dims.head_dim, base, RopeLayout::Neox).unwrap()),
        }
    }

    fn query(&self) -> Query<'_> {
        Query {
            data: &self.q,
            n_rows: self.n_rows,
            pos_offset: self.q_pos,
        }
    }

    /// The segments; with a shift, each Context block is read at its offset (Block-Attention).
    fn segments(&self) -> Vec<Segment<'_>> {
        let mut offset = 0;
        self.kv
            .iter()
            .map(|(k, v, len, pos, role)| {
                let rope_shift = match (self.shift, role) {
                    (Some(rope), SegmentRole::Context) => Some(RopeShift {
                        rope,
                        delta: offset as i64,
                    }),
                    _ => None,
                };
                offset += len;
                Segment {
                    k,
                    v,
                    len: *len,
                    pos_offset: *pos,
                    role: *role,
                    rope_shift,
                }
            })
            .collect()
    }

    /// Multiply-adds, about (logits and values, every key seen by every row).
    fn macs(&self) -> u64 {
        let keys: usize = self.kv.iter().map(|s| s.2).sum();
        (2 * self.n_rows * self.dims.n_heads * keys * self.dims.head_dim) as u64
    }
}

/// The straightforward f32 loop: per row and head, every visible logit, its maximum, the
/// exponentials and their sum, then the weighted sum of the values (plain softmax over the
/// concatenation of the segments, keys as stored; one thread).
fn naive(p: &Problem, segments: &[Segment], out: &mut [f32], scores: &mut Vec<f32>) {
    let AttentionDims {
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: d,
    } = p.dims;
    let scale = 1.0 / (d as f32).sqrt();
    for r in 0..p.n_rows {
        for head in 0..h {
            let g = head / (h / kvh);
            let q = &p.q[(r * h + head) * d..(r * h + head + 1) * d];
            scores.clear();
            for s in segments {
                for t in 0..s.len {
                    if s.role == SegmentRole::Causal && s.pos_offset + t > p.q_pos + r {
                        break;
                    }
                    let k = &s.k[(t * kvh + g) * d..(t * kvh + g + 1) * d];
                    scores.push(scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>());
                }
            }
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in scores.iter_mut() {
                *x = (*x - m).exp();
                sum += *x;
            }
            let o = &mut out[(r * h + head) * d..(r * h + head + 1) * d];
            o.fill(0.0);
            let mut j = 0;
            for s in segments {
                for t in 0..s.len {
                    if s.role == SegmentRole::Causal && s.pos_offset + t > p.q_pos + r {
                        break;
                    }
                    let v = &s.v[(t * kvh + g) * d..(t * kvh + g + 1) * d];
                    let w = scores[j] / sum;
                    o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
                    j += 1;
                }
            }
        }
    }
}

fn bench_cpu_attention(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a pool of one thread");
    let models = [
        ("smollm2", AttentionDims::new(9, 3, 64).unwrap()),
        ("llama3", AttentionDims::new(32, 8, 128).unwrap()),
    ];
    // (rows, cached keys, segments)
    let shapes: [(usize, usize, usize); 8] = [
        (1, 1024, 1),
        (1, 1024, 16),
        (1, 4096, 1),
        (1, 4096, 16),
        (1, 16384, 1),
        (1, 16384, 16),
        (64, 4096, 16),
        (512, 4096, 16),
    ];
    for (model, dims) in models {
        let mut g = c.benchmark_group(format!("cpu_attention/{model}"));
        g.sample_size(10);
        for (rows, keys, n_segs) in shapes {
            // APE and shifted variants on one decode shape and one prefill shape.
            let variants: &[(bool, bool)] = if (rows, keys, n_segs) == (1, 4096, 16) || rows == 64 {
                &[(false, false), (true, false), (false, true), (true, true)]
            } else {
                &[(false, false)]
            };
            for &(ape_on, shift) in variants {
                let p = Problem::new(dims, rows, keys, n_segs, shift);
                let segments = p.segments();
                let query = p.query();
                let ape = if ape_on {
                    ApeParams::new(0.9, 0.9).unwrap()
                } else {
                    ApeParams::plain()
                };
                let name = format!(
                    "{rows}x{keys}/{n_segs}seg/{}{}",
                    if ape_on { "ape" } else { "plain" },
                    if shift { "+shift" } else { "" }
                );
                g.throughput(Throughput::Elements(p.macs()));
                let mut out = vec![0.0; rows * dims.n_heads * dims.head_dim];
                let mut lse = vec![0.0; rows * dims.n_heads];
                g.bench_function(BenchmarkId::new("kernel", &name), |b| {
                    b.iter(|| {
                        cpu::segmented_attention_into(
                            &query,
                            &segments,
                            &dims,
                            &ape,
                            &mut out,
                            Some(&mut lse),
                        )
                        .unwrap()
                    })
                });
                g.bench_function(BenchmarkId::new("kernel_1t", &name), |b| {
                    one_thread.install(|| {
                        b.iter(|| {
                            cpu::segmented_attention_into(
                                &query,
                                &segments,
                                &dims,
                                &ape,
                                &mut out,
                                Some(&mut lse),
                            )
                            .unwrap()
                        })
                    })
                });
                // The references: the plain loop without shifts or APE (it has neither) and below
                // 512 rows (seconds per call); the oracle at the smallest sizes only.
                if !ape_on && !shift && rows < 512 {
                    let mut scores = Vec::new();
                    g.bench_function(BenchmarkId::new("naive", &name), |b| {
                        b.iter(|| naive(&p, &segments, &mut out, &mut scores))
                    });
                }
                if rows == 1 && keys <= 1024 || (rows == 1 && keys == 4096 && dims.head_dim == 64) {
                    g.bench_function(BenchmarkId::new("oracle", &name), |b| {
                        b.iter(|| {
                            reference::segmented_attention(&query, &segments, &dims, &ape).unwrap()
                        })
                    });
                }
            }
        }
        g.finish();
    }
}

/// The plain loop computes what the kernel computes (plain attention, no shift): checked once
/// before timing, so the comparison is between two correct programs.
fn check_naive() {
    let dims = AttentionDims::new(9, 3, 64).unwrap();
    let p = Problem::new(dims, 5, 1024, 4, false);
    let segments = p.segments();
    let mut out = vec![0.0; 5 * 9 * 64];
    naive(&p, &segments, &mut out, &mut Vec::new());
    let want = cpu::segmented_attention(&p.query(), &segments, &dims, &ApeParams::plain()).unwrap();
    let err = reference::rel_l2(&out, &want.out);
    assert!(err < 1e-4, "the plain loop is off by {err:e}");
}

fn benches(c: &mut Criterion) {
    check_naive();
    bench_cpu_attention(c);
}

criterion_group!(cpu_attention, benches);
criterion_main!(cpu_attention);
