//! CPU reference throughput at small sizes, so `cargo bench` runs on machines without a GPU.
//! (The kernel benchmarks, measured on a GPU against PyTorch SDPA, are separate.)

use ape_attn::reference::{merge_states, segmented_attention, Query, Segment};
use ape_attn::{ApeParams, AttentionDims, SegmentRole};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic fill; benchmarks need no statistical quality.
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                - 0.5
        })
        .collect()
}

fn bench_segmented_attention(c: &mut Criterion) {
    let dims = AttentionDims::new(8, 2, 64).expect("valid dims");
    let (rows, seg_len, n_segs) = (16, 256, 4);
    let q = data(rows * dims.n_heads * dims.head_dim, 1);
    let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..n_segs)
        .map(|i| {
            let n = seg_len * dims.n_kv_heads * dims.head_dim;
            (data(n, 10 + i as u32), data(n, 100 + i as u32))
        })
        .collect();
    let segments: Vec<Segment> = kv
        .iter()
        .map(|(k, v)| Segment {
            k,
            v,
            len: seg_len,
            pos_offset: 0,
            role: SegmentRole::Context,
            rope_shift: None,
        })
        .collect();
    let query = Query {
        data: &q,
        n_rows: rows,
        pos_offset: seg_len,
    };
    let flops = 4.0 * (rows * dims.n_heads * seg_len * n_segs * dims.head_dim) as f64;
    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("segmented_attention_16x1024_h8_d64", |b| {
        b.iter(|| segmented_attention(&query, &segments, &dims, &ApeParams::default()))
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

criterion_group!(benches, bench_segmented_attention, bench_merge_states);
criterion_main!(benches);
