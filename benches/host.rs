//! Host cost of a segmented-attention launch: what the CPU does before the kernels are queued
//! (plan, descriptors, RoPE table, sequence parameters, upload image), measured without a device.
//! An engine pays it once per layer per step (`segmented_attention_batch_into`, or
//! `CapturableBatch::prepare`), so at large batches over short contexts it can outlast the GPU
//! work. The shapes are an H100's (132 SMs) at Llama-3-8B's attention (32 query heads, 8 KV heads,
//! head dim 128): one sequence with 16 or 256 segments, and decode batches of 64 and 256
//! sequences, plain (APE) and with every cached block read shifted (Block-Attention, each
//! sequence at its own offsets, so the shifts are distinct: 4095 of them, sequence 0's first
//! block sitting at position 0). The segments' references are built once, with fake addresses
//! (nothing reads them); what is timed is the layout built from them and its upload image.

use ape_attn::cuda::segmented_attention::{
    launch_host_bytes, AttentionOccupancy, SegmentRef, SequenceRef, SmLimits,
};
use ape_attn::cuda::DType;
use ape_attn::{ApeParams, AttentionDims, RopeConfig, RopeLayout, RopeShift, SegmentRole};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SMS: usize = 132;

/// `n_blocks` cached blocks of `block_len` keys (shifted by their offset when `shift`), then the
/// sequence's own `own` keys; the sequence starts at `base`. Addresses are 0 (see `fake_addresses`).
fn sequence(
    n_blocks: usize,
    block_len: usize,
    own: usize,
    base: usize,
    shift: Option<RopeConfig>,
) -> Vec<SegmentRef> {
    let seg = |len, pos_offset, role, rope_shift| SegmentRef {
        k: 0,
        v: 0,
        len,
        pos_offset,
        role,
        rope_shift,
    };
    let mut segs: Vec<SegmentRef> = (0..n_blocks)
        .map(|i| {
            let pos = base + i * block_len;
            let rope_shift = shift.map(|rope| RopeShift {
                rope,
                delta: pos as i64,
            });
            seg(block_len, pos, SegmentRole::Context, rope_shift)
        })
        .collect();
    segs.push(seg(
        own,
        base + n_blocks * block_len,
        SegmentRole::Causal,
        None,
    ));
    segs
}

/// Gives every segment of the launch its own fake K and V addresses, 1 MiB apart.
fn fake_addresses(segs: &mut [Vec<SegmentRef>]) {
    for (i, s) in segs.iter_mut().flatten().enumerate() {
        s.k = 0x1000_0000 + (i as u64) * 0x10_0000;
        s.v = 0x8000_0000 + (i as u64) * 0x10_0000;
    }
}

fn bench_host(c: &mut Criterion) {
    let dims = AttentionDims::new(32, 8, 128).expect("valid dims");
    let rope = RopeConfig::new(128, 500_000.0, RopeLayout::Neox).expect("valid rope");
    let ape = ApeParams::default();
    let mut g = c.benchmark_group("launch_host");
    // (name, sequences, query rows each, cached blocks each, block length, shifted)
    let cases = [
        ("seq1_seg17_rows1", 1, 1, 16, 512, false),
        ("seq1_seg257_rows64", 1, 64, 256, 256, false),
        ("seq64_seg33_rows1", 64, 1, 32, 256, false),
        ("seq256_seg17_rows1", 256, 1, 16, 256, false),
        ("seq256_seg17_rows1_shifted", 256, 1, 16, 256, true),
    ];
    for (name, n_seqs, rows, n_blocks, block_len, shifted) in cases {
        // Each sequence starts at its own offset (a different system prompt length), so a
        // shifted batch has n_seqs * n_blocks - 1 distinct nonzero shifts.
        let mut segs: Vec<Vec<SegmentRef>> = (0..n_seqs)
            .map(|i| sequence(n_blocks, block_len, 40, 7 * i, shifted.then_some(rope)))
            .collect();
        fake_addresses(&mut segs);
        let sequences: Vec<SequenceRef> = segs
            .iter()
            .map(|s| {
                let own = s.last().expect("own keys");
                SequenceRef {
                    n_rows: rows,
                    pos_offset: own.pos_offset + own.len - rows,
                    segments: s,
                    ape,
                }
            })
            .collect();
        g.throughput(Throughput::Elements(n_seqs as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                launch_host_bytes(
                    std::hint::black_box(&sequences),
                    &dims,
                    DType::BF16,
                    &AttentionOccupancy::modelled(&SmLimits::SM90, SMS, 128),
                )
                .expect("valid launch")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_host);
criterion_main!(benches);
