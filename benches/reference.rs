//! CPU reference throughput at small sizes, so `cargo bench` runs on machines without a GPU.
//! One benchmark per kernel-level GPU benchmark of `benches/kernels.rs` (which skips itself
//! without a device): prefill, a short question and a decode row over segments, a batch of decode
//! rows, Block-Attention's shifted read (fused into the attention, and as a separate RoPE shift),
//! RoPE shift, and merge of states. The oracle computes in f64 and is written for clarity, so these
//! numbers measure the oracle, not a fast CPU path; they keep every benchmarked computation
//! runnable and timed everywhere.

use ape_attn::reference::{
    merge_states, rope, segmented_attention, segmented_attention_batch, BatchSequence, Query,
    Segment,
};
use ape_attn::{ApeParams, AttentionDims, RopeConfig, RopeLayout, RopeShift, SegmentRole};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic fill; benchmarks need no statistical quality.
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                - 0.5
        })
        .collect()
}

/// The attention shape of these benchmarks: GQA 4 at head dim 64.
fn dims() -> AttentionDims {
    AttentionDims::new(8, 2, 64).expect("valid dims")
}

/// `n_segs` Context segments of `seg_len` keys each (K, V).
fn cached(seg_len: usize, n_segs: usize, seed: u32) -> Vec<(Vec<f32>, Vec<f32>)> {
    let d = dims();
    (0..n_segs as u32)
        .map(|i| {
            let n = seg_len * d.n_kv_heads * d.head_dim;
            (data(n, seed + 2 * i), data(n, seed + 2 * i + 1))
        })
        .collect()
}

fn segments<'a>(
    kv: &'a [(Vec<f32>, Vec<f32>)],
    seg_len: usize,
    shift: Option<RopeShift>,
) -> Vec<Segment<'a>> {
    kv.iter()
        .enumerate()
        .map(|(i, (k, v))| Segment {
            k,
            v,
            len: seg_len,
            pos_offset: i * seg_len,
            role: SegmentRole::Context,
            rope_shift: shift.map(|s| RopeShift {
                delta: s.delta + (i * seg_len) as i64,
                ..s
            }),
        })
        .collect()
}

fn kv_bytes(keys: usize) -> u64 {
    let d = dims();
    (2 * keys * d.n_kv_heads * d.head_dim * 2) as u64 // as bf16, as the kernels read them
}

fn bench_segmented_attention(c: &mut Criterion) {
    let dims = dims();
    let (rows, seg_len, n_segs) = (16, 256, 4);
    let q = data(rows * dims.n_heads * dims.head_dim, 1);
    let kv = cached(seg_len, n_segs, 10);
    let segments = segments(&kv, seg_len, None);
    let query = Query {
        data: &q,
        n_rows: rows,
        pos_offset: seg_len * n_segs,
    };
    let flops = 4.0 * (rows * dims.n_heads * seg_len * n_segs * dims.head_dim) as f64;
    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("segmented_attention_16x1024_h8_d64", |b| {
        b.iter(|| segmented_attention(&query, &segments, &dims, &ApeParams::default()))
    });
    g.finish();
}

/// The GPU's `short_question_and_decode`: 64 rows and one row over cached keys in 16 segments,
/// APE; throughput is the K+V bytes (as bf16) read.
fn bench_short_and_decode(c: &mut Criterion) {
    let dims = dims();
    let mut g = c.benchmark_group("reference_short_question_and_decode");
    g.sample_size(10);
    for (rows, keys) in [(64, 512), (1, 4096)] {
        let n_segs = 16;
        let kv = cached(keys / n_segs, n_segs, 20);
        let segments = segments(&kv, keys / n_segs, None);
        let q = data(rows * dims.n_heads * dims.head_dim, 2);
        let query = Query {
            data: &q,
            n_rows: rows,
            pos_offset: keys,
        };
        g.throughput(Throughput::Bytes(kv_bytes(keys)));
        let id = BenchmarkId::new(format!("rows{rows}"), format!("k{keys}_s{n_segs}"));
        g.bench_function(id, |b| {
            b.iter(|| segmented_attention(&query, &segments, &dims, &ApeParams::default()))
        });
    }
    g.finish();
}

/// The GPU's `batch_decode`: eight sequences, one row each over their own 1024 keys in 4
/// segments, as one batch.
fn bench_batch_decode(c: &mut Criterion) {
    let dims = dims();
    let (n_seqs, keys, n_segs) = (8, 1024, 4);
    let kvs: Vec<_> = (0..n_seqs as u32)
        .map(|s| cached(keys / n_segs, n_segs, 100 * s))
        .collect();
    let segs: Vec<Vec<Segment>> = kvs
        .iter()
        .map(|kv| segments(kv, keys / n_segs, None))
        .collect();
    let sequences: Vec<BatchSequence> = segs
        .iter()
        .map(|s| BatchSequence {
            n_rows: 1,
            pos_offset: keys,
            segments: s,
            ape: ApeParams::default(),
        })
        .collect();
    let q = data(n_seqs * dims.n_heads * dims.head_dim, 3);
    let mut g = c.benchmark_group("reference_batch_decode");
    g.throughput(Throughput::Bytes(n_seqs as u64 * kv_bytes(keys)));
    g.bench_function(format!("n{n_seqs}_k{keys}_s{n_segs}"), |b| {
        b.iter(|| segmented_attention_batch(&q, &sequences, &dims))
    });
    g.finish();
}

/// The GPU's `block_attention_shift`: 16 rows over 8 blocks cached at position 0 and read at
/// their offsets, with the shift in the attention (`fused`) or as a RoPE shift of copies of the
/// keys first (`separate`), and the same read unshifted.
fn bench_block_attention_shift(c: &mut Criterion) {
    let dims = dims();
    let (rows, seg_len, n_segs) = (16, 128, 8);
    let rope = RopeConfig::new(dims.head_dim, 10_000.0, RopeLayout::Neox).expect("rope");
    let kv = cached(seg_len, n_segs, 30);
    let q = data(rows * dims.n_heads * dims.head_dim, 4);
    let query = Query {
        data: &q,
        n_rows: rows,
        pos_offset: seg_len * n_segs,
    };
    let plain = ApeParams::plain();
    let shape = format!("q{rows}_k{}_s{n_segs}", seg_len * n_segs);
    let mut g = c.benchmark_group("reference_block_attention_shift");
    g.throughput(Throughput::Bytes(kv_bytes(seg_len * n_segs)));
    let fused = segments(&kv, seg_len, Some(RopeShift { rope, delta: 0 }));
    g.bench_function(BenchmarkId::new("fused", &shape), |b| {
        b.iter(|| segmented_attention(&query, &fused, &dims, &plain))
    });
    g.bench_function(BenchmarkId::new("separate", &shape), |b| {
        b.iter(|| {
            let shifted: Vec<(Vec<f32>, Vec<f32>)> = kv
                .iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    let mut k = k.clone();
                    rope::shift(
                        &mut k,
                        seg_len,
                        dims.n_kv_heads,
                        &rope,
                        (i * seg_len) as i64,
                    )
                    .expect("shift");
                    (k, v.clone())
                })
                .collect();
            segmented_attention(&query, &segments(&shifted, seg_len, None), &dims, &plain)
        })
    });
    let unshifted = segments(&kv, seg_len, None);
    g.bench_function(BenchmarkId::new("unshifted", &shape), |b| {
        b.iter(|| segmented_attention(&query, &unshifted, &dims, &plain))
    });
    g.finish();
}

/// The GPU's `rope_shift`: a block's keys re-rotated in place; throughput is the bytes read and
/// written (as bf16).
fn bench_rope_shift(c: &mut Criterion) {
    let dims = dims();
    let n_tokens = 4096;
    let rope = RopeConfig::new(dims.head_dim, 10_000.0, RopeLayout::Neox).expect("rope");
    let mut k = data(n_tokens * dims.n_kv_heads * dims.head_dim, 5);
    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Bytes(
        (2 * n_tokens * dims.n_kv_heads * dims.head_dim * 2) as u64,
    ));
    g.bench_function("rope_shift_4096x2x64", |b| {
        b.iter(|| rope::shift(&mut k, n_tokens, dims.n_kv_heads, &rope, 4096))
    });
    g.finish();
}

fn bench_merge_states(c: &mut Criterion) {
    let (n_states, n, d) = (8, 4096, 128);
    let v = data(n_states * n * d, 3);
    let s = data(n_states * n, 4);
    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Bytes((v.len() * 4) as u64));
    g.bench_function("merge_states_8x4096_d128", |b| {
        b.iter(|| merge_states(&v, &s, n_states, d))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_segmented_attention,
    bench_short_and_decode,
    bench_batch_decode,
    bench_block_attention_shift,
    bench_rope_shift,
    bench_merge_states
);
criterion_main!(benches);
