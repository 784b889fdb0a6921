//! ape-attn as an engine's attention backend: one decode step of two requests that share cached
//! passages kept in one preallocated KV pool, in a single batched launch, checked against the CPU
//! oracle. Needs a CUDA GPU (`cargo run --release --example kv_pool_decode`); without one it says
//! why and exits with status 1.
//!
//! The engine's side, in miniature, for one layer at Llama-3-8B's attention shape (32 query
//! heads, 8 KV heads, head dim 128, bf16):
//! - K and V live in a pool `[capacity, 8, 128]`; cached passages and each request's own tokens
//!   are row ranges of it, written once with `Tensor::write_rows` and read in place through
//!   `Tensor::rows` (no copy, no concatenation);
//! - request A uses APE (shared prefix, passages after it at the same positions, T = S = 0.9);
//! - request B uses Block-Attention over passages cached at position 0: each is read with a RoPE
//!   shift to its real offset, and nothing is rotated or copied in memory;
//! - both attend in one `segmented_attention_batch` launch (one, too, when a request splits its
//!   keys to fill the GPU: the last split of each query tile combines them).

use std::ops::Range;
use std::process::ExitCode;

use ape_attn::cuda::{self, DType, Device, Tensor};
use ape_attn::reference::{self, rel_l2};
use ape_attn::{ApeParams, AttentionDims, RopeConfig, RopeLayout, RopeShift, SegmentRole};

const N_HEADS: usize = 32;
const N_KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const ROW: usize = N_KV_HEADS * HEAD_DIM;

/// A reproducible fill in [-scale, scale), rounded to bf16 as the device stores it.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            DType::BF16.round((2.0 * u - 1.0) * scale)
        })
        .collect()
}

/// Where a span of tokens sits: rows of the pool, absolute position, role, RoPE shift.
struct Span {
    rows: Range<usize>,
    pos: usize,
    role: SegmentRole,
    shift: Option<i64>,
}

fn span(rows: Range<usize>, pos: usize, role: SegmentRole, shift: Option<i64>) -> Span {
    Span {
        rows,
        pos,
        role,
        shift,
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv_pool_decode: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::new(0)?;
    println!("device: {}", dev.name()?);
    let dims = AttentionDims::new(N_HEADS, N_KV_HEADS, HEAD_DIM)?;
    let rope = RopeConfig::new(HEAD_DIM, 500_000.0, RopeLayout::Neox)?;

    // The pool, and what the engine has written into it (host copies kept for the oracle).
    let capacity = 8192;
    let mut k_pool = Tensor::zeros(&dev, &[capacity, N_KV_HEADS, HEAD_DIM], DType::BF16)?;
    let mut v_pool = Tensor::zeros(&dev, &[capacity, N_KV_HEADS, HEAD_DIM], DType::BF16)?;
    let (mut k_host, mut v_host) = (vec![0.0; capacity * ROW], vec![0.0; capacity * ROW]);
    let mut write = |rows: Range<usize>, seed: u64| -> ape_attn::Result<()> {
        let n = rows.len();
        let (k, v) = (values(n * ROW, seed, 2.0), values(n * ROW, seed + 1, 1.0));
        let shape = [n, N_KV_HEADS, HEAD_DIM];
        k_pool.write_rows(
            &dev,
            rows.start,
            &Tensor::from_f32(&dev, &shape, &k, DType::BF16)?,
        )?;
        v_pool.write_rows(
            &dev,
            rows.start,
            &Tensor::from_f32(&dev, &shape, &v, DType::BF16)?,
        )?;
        k_host[rows.start * ROW..rows.end * ROW].copy_from_slice(&k);
        v_host[rows.start * ROW..rows.end * ROW].copy_from_slice(&v);
        Ok(())
    };
    let prefix = 0..32; // the shared system prompt, at positions 0..32
    let ape_passages = [32..1032, 1032..2532]; // encoded after the prefix (APE), at 32..
    let alone_passages = [2532..3532, 3532..5032]; // encoded alone, from position 0
    let a_tail = 5032..5097; // request A: question (64 tokens) and the decode token so far
    let b_tail = 5100..5165; // request B: the same
    for (i, rows) in [
        prefix.clone(),
        ape_passages[0].clone(),
        ape_passages[1].clone(),
    ]
    .into_iter()
    .chain(alone_passages.iter().cloned())
    .chain([a_tail.clone(), b_tail.clone()])
    .enumerate()
    {
        write(rows, 10 * i as u64 + 1)?;
    }

    // Request A (APE): prefix causal, passages as Context at 32.., its own tokens causal after the
    // longest passage. Request B (Block-Attention): the passages in order, each shifted to its
    // offset, then its own tokens.
    let a_pos = 32 + 1500;
    let a_spans = [
        span(prefix.clone(), 0, SegmentRole::Causal, None),
        span(ape_passages[0].clone(), 32, SegmentRole::Context, None),
        span(ape_passages[1].clone(), 32, SegmentRole::Context, None),
        span(a_tail.clone(), a_pos, SegmentRole::Causal, None),
    ];
    let b_pos = 32 + 1000 + 1500;
    let b_spans = [
        span(prefix, 0, SegmentRole::Causal, None),
        span(
            alone_passages[0].clone(),
            32,
            SegmentRole::Context,
            Some(32),
        ),
        span(
            alone_passages[1].clone(),
            1032,
            SegmentRole::Context,
            Some(1032),
        ),
        span(b_tail.clone(), b_pos, SegmentRole::Causal, None),
    ];
    // The decode row of each request: its last token's position.
    let requests = [
        (a_spans, a_pos + a_tail.len() - 1, ApeParams::new(0.9, 0.9)?),
        (b_spans, b_pos + b_tail.len() - 1, ApeParams::plain()),
    ];

    // Device segments: row views of the pool.
    let views: Vec<Vec<_>> = requests
        .iter()
        .map(|(spans, ..)| {
            spans
                .iter()
                .map(|s| Ok((k_pool.rows(s.rows.clone())?, v_pool.rows(s.rows.clone())?)))
                .collect::<ape_attn::Result<Vec<_>>>()
        })
        .collect::<ape_attn::Result<_>>()?;
    let shift = |s: &Span| s.shift.map(|delta| RopeShift { rope, delta });
    let segments: Vec<Vec<cuda::Segment<'_, _>>> = requests
        .iter()
        .zip(&views)
        .map(|((spans, ..), kv)| {
            spans
                .iter()
                .zip(kv)
                .map(|(s, (k, v))| cuda::Segment {
                    k,
                    v,
                    pos_offset: s.pos,
                    role: s.role,
                    rope_shift: shift(s),
                })
                .collect()
        })
        .collect();
    let batch: Vec<cuda::BatchSequence<'_, _>> = requests
        .iter()
        .zip(&segments)
        .map(|((_, pos, ape), segs)| cuda::BatchSequence {
            n_rows: 1,
            pos_offset: *pos,
            segments: segs,
            ape: *ape,
        })
        .collect();
    let q_host = values(requests.len() * N_HEADS * HEAD_DIM, 99, 2.0);
    let q = Tensor::from_f32(
        &dev,
        &[requests.len(), N_HEADS, HEAD_DIM],
        &q_host,
        DType::BF16,
    )?;
    let (out, lse) = cuda::segmented_attention_batch(&dev, &q, &batch, &dims)?;
    let (out, lse) = (out.to_f32(&dev)?, lse.to_f32(&dev)?);

    // The oracle on the same rows.
    let host_segments: Vec<Vec<reference::Segment<'_>>> = requests
        .iter()
        .map(|(spans, ..)| {
            spans
                .iter()
                .map(|s| reference::Segment {
                    k: &k_host[s.rows.start * ROW..s.rows.end * ROW],
                    v: &v_host[s.rows.start * ROW..s.rows.end * ROW],
                    len: s.rows.len(),
                    pos_offset: s.pos,
                    role: s.role,
                    rope_shift: shift(s),
                })
                .collect()
        })
        .collect();
    let host_batch: Vec<reference::BatchSequence<'_>> = requests
        .iter()
        .zip(&host_segments)
        .map(|((_, pos, ape), segs)| reference::BatchSequence {
            n_rows: 1,
            pos_offset: *pos,
            segments: segs,
            ape: *ape,
        })
        .collect();
    let want = reference::segmented_attention_batch(&q_host, &host_batch, &dims)?;
    let lse_err = lse
        .iter()
        .zip(&want.lse)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let out_err = rel_l2(&out, &want.out);
    println!(
        "one batched decode step, 2 requests over {} pool rows: output relative L2 error \
         {out_err:.2e}, LSE max error {lse_err:.2e} against the CPU oracle",
        b_tail.end
    );
    if out_err < 1e-2 && lse_err < 1e-3 {
        Ok(())
    } else {
        Err("the GPU disagrees with the oracle (bars: 1e-2 and 1e-3)".into())
    }
}
