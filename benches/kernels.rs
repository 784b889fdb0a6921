//! GPU kernel benchmarks (criterion, GPU time from CUDA events). Without a CUDA device they print
//! a line and do nothing; the CPU-side benchmarks are in `benches/reference.rs`.
//!
//! Throughput is reported as criterion "elements" = FLOPs (attention) or "bytes" = bytes moved
//! (decode K+V reads, merge, RoPE, copy), so `estimates.json` + `benchmark.json` give TFLOP/s and
//! GB/s; `scripts/gpu/summarize.py` turns them into the BENCHMARKS.md tables next to the PyTorch
//! peer measured in the same run (`scripts/gpu/peer.py`).

use std::time::Duration;

use ape_attn::cuda::{
    self, merge_states_into, rope_shift, BatchCapacity, CapturableBatch, DType, Device,
    SegmentedAttentionOptions, Tensor,
};
use ape_attn::{ApeParams, AttentionDims, RopeConfig, RopeLayout, RopeShift, SegmentRole};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

/// Which benchmarks run, from the environment. `APE_BENCH_SET=quick`: the GPU session's quick
/// phase (prefill 8K x 8K, a 64-row question over 32K keys and one decode row over 128K keys in
/// 16 segments, a decode batch of 64 sequences x 4K keys, the device copy, and the tile shapes
/// against each other at prefill 8K x 8K at head dim 64 and on the decode row); otherwise all of
/// them. `APE_BENCH_SHRINK=N` divides every key count, prefill row count, batch size (to 2 at
/// least) and the copy by N, for the session's dry run on the emulated device; the ids name the
/// shapes that ran.
#[derive(Clone, Copy)]
struct Plan {
    quick: bool,
    shrink: usize,
}

impl Plan {
    fn from_env() -> Self {
        let shrink = std::env::var("APE_BENCH_SHRINK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(1);
        let quick = std::env::var("APE_BENCH_SET").is_ok_and(|v| v == "quick");
        Plan { quick, shrink }
    }

    /// `n` divided by the shrink factor, at least 1.
    fn s(&self, n: usize) -> usize {
        (n / self.shrink).max(1)
    }
}

/// "1GiB", "16MiB" or "4096B".
fn bytes_label(n: usize) -> String {
    if n >= 1 << 30 && n % (1 << 30) == 0 {
        format!("{}GiB", n >> 30)
    } else if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else {
        format!("{n}B")
    }
}

/// Runs `f` `iters` times on the device's stream and returns the GPU time between two events.
fn gpu_time(dev: &Device, iters: u64, mut f: impl FnMut()) -> Duration {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = dev.stream().record_event(flags).expect("event");
    for _ in 0..iters {
        f();
    }
    let end = dev.stream().record_event(flags).expect("event");
    end.synchronize().expect("sync");
    let ms = start.elapsed_ms(&end).expect("elapsed");
    Duration::from_secs_f64(ms as f64 / 1e3)
}

fn filled(dev: &Device, shape: &[usize], dtype: DType, seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x >> 8) as f32 / 16_777_216.0 - 0.5
        })
        .collect();
    Tensor::from_f32(dev, shape, &data, dtype).expect("upload")
}

struct Problem {
    q: Tensor,
    kv: Vec<(Tensor, Tensor)>,
    dims: AttentionDims,
    q_pos: usize,
}

/// `n_rows` question rows over `keys` cached keys in `n_segments` equal Context segments.
fn problem(dev: &Device, n_rows: usize, keys: usize, n_segments: usize) -> Problem {
    problem_at(dev, 128, n_rows, keys, n_segments)
}

/// [`problem`] at `head_dim` (32 heads over 8 KV heads).
fn problem_at(
    dev: &Device,
    head_dim: usize,
    n_rows: usize,
    keys: usize,
    n_segments: usize,
) -> Problem {
    let dims = AttentionDims::new(32, 8, head_dim).expect("dims");
    let per = keys / n_segments;
    let kv = (0..n_segments)
        .map(|i| {
            let shape = [per, dims.n_kv_heads, dims.head_dim];
            (
                filled(dev, &shape, DType::BF16, 2 * i as u32 + 1),
                filled(dev, &shape, DType::BF16, 2 * i as u32 + 2),
            )
        })
        .collect();
    Problem {
        q: filled(
            dev,
            &[n_rows, dims.n_heads, dims.head_dim],
            DType::BF16,
            999,
        ),
        kv,
        dims,
        q_pos: per,
    }
}

fn run(dev: &Device, p: &Problem, ape: &ApeParams, out: &mut Tensor, lse: &mut Tensor) {
    run_with(dev, p, ape, out, lse, &SegmentedAttentionOptions::default())
}

/// [`run`] with launch options.
fn run_with(
    dev: &Device,
    p: &Problem,
    ape: &ApeParams,
    out: &mut Tensor,
    lse: &mut Tensor,
    options: &SegmentedAttentionOptions,
) {
    let keys: Vec<&Tensor> = p.kv.iter().map(|(k, _)| k).collect();
    run_shifted(dev, p, &keys, None, ape, out, lse, options)
}

/// `p`'s segments (Context, at position 0), segment `i` with its keys from `keys[i]` and its
/// values from `p`, read with Block-Attention's RoPE shift (block `i` at offset `i * len`) when
/// `rope` is given.
fn segments<'a>(
    p: &'a Problem,
    keys: &[&'a Tensor],
    rope: Option<&RopeConfig>,
) -> Vec<cuda::Segment<'a>> {
    keys.iter()
        .zip(&p.kv)
        .enumerate()
        .map(|(i, (&k, (_, v)))| cuda::Segment {
            k,
            v,
            pos_offset: 0,
            role: SegmentRole::Context,
            rope_shift: rope.map(|&rope| RopeShift {
                rope,
                delta: (i * k.shape()[0]) as i64,
            }),
        })
        .collect()
}

/// [`run`] with segment `i`'s keys taken from `keys[i]` (those of `p`, or shifted copies) and its
/// values from `p`, each segment read with the RoPE shift of Block-Attention (block `i` at offset
/// `i * len`) when `rope` is given.
#[allow(clippy::too_many_arguments)]
fn run_shifted(
    dev: &Device,
    p: &Problem,
    keys: &[&Tensor],
    rope: Option<&RopeConfig>,
    ape: &ApeParams,
    out: &mut Tensor,
    lse: &mut Tensor,
    options: &SegmentedAttentionOptions,
) {
    let segs = segments(p, keys, rope);
    let query = cuda::Query {
        data: &p.q,
        pos_offset: p.q_pos,
    };
    cuda::segmented_attention_into(dev, &query, &segs, &p.dims, ape, out, lse, options)
        .expect("launch");
}

fn outputs(dev: &Device, p: &Problem) -> (Tensor, Tensor) {
    let shape = p.q.shape().to_vec();
    (
        Tensor::zeros(dev, &shape, DType::BF16).expect("alloc"),
        Tensor::zeros(dev, &shape[..2], DType::F32).expect("alloc"),
    )
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g
}

/// Prefill: head dim 128, bf16, GQA 4 (32 heads, 8 KV heads); non-causal over the cached keys,
/// 4 * rows * keys * heads * d FLOPs. Plain (T = S = 1, the peer's computation) and APE.
fn bench_prefill(c: &mut Criterion, dev: &Device, plan: Plan) {
    let mut g = configure(c, "prefill");
    let shapes: &[(usize, usize)] = if plan.quick {
        &[(8192, 8192)]
    } else {
        &[(1024, 8192), (1024, 32768), (4096, 32768), (8192, 65536)]
    };
    for &(rows, keys) in shapes {
        let (rows, keys) = (plan.s(rows), plan.s(keys));
        let p = problem(dev, rows, keys, 16);
        let (mut out, mut lse) = outputs(dev, &p);
        let flops = 4 * rows as u64 * keys as u64 * 32 * 128;
        g.throughput(Throughput::Elements(flops));
        for (label, ape) in [("plain", ApeParams::plain()), ("ape", ApeParams::default())] {
            g.bench_with_input(
                BenchmarkId::new(label, format!("q{rows}_k{keys}")),
                &(),
                |b, _| {
                    b.iter_custom(|iters| {
                        gpu_time(dev, iters, || run(dev, &p, &ape, &mut out, &mut lse))
                    })
                },
            );
        }
    }
    g.finish();
}

/// A short question (64 rows) and decode (1 row) over 32K-128K cached keys in 16-256 segments:
/// throughput is the K+V bytes read.
fn bench_short_and_decode(c: &mut Criterion, dev: &Device, plan: Plan) {
    let mut g = configure(c, "short_question_and_decode");
    let cases: Vec<(usize, usize, usize)> = if plan.quick {
        vec![(64, 32768, 16), (1, 131072, 16)]
    } else {
        let mut v = Vec::new();
        for keys in [32768, 131072] {
            for n_segments in [16, 256] {
                for rows in [64, 1] {
                    v.push((rows, keys, n_segments));
                }
            }
        }
        v
    };
    for (rows, keys, n_segments) in cases {
        let keys = plan.s(keys);
        let p = problem(dev, rows, keys, n_segments);
        let (mut out, mut lse) = outputs(dev, &p);
        let bytes = 2 * keys as u64 * 8 * 128 * 2;
        g.throughput(Throughput::Bytes(bytes));
        let ape = ApeParams::default();
        let id = BenchmarkId::new(format!("rows{rows}"), format!("k{keys}_s{n_segments}"));
        g.bench_with_input(id, &(), |b, _| {
            b.iter_custom(|iters| gpu_time(dev, iters, || run(dev, &p, &ape, &mut out, &mut lse)))
        });
    }
    g.finish();
}

/// The tile shapes against each other on the same problems (`SegmentedAttentionOptions::tile`):
/// prefill over cached keys (plain) on the prefill and the wide tile, at head dims 64 and 128;
/// one decode row over 128K keys in 16 segments (APE) on the decode and the prefill tile. The
/// measurement that says where the launcher's choice (`TileShape::of_launch`) is right. Ids:
/// `tile_shapes/d{head dim}_q{rows}_k{keys}/{prefill|wide}`,
/// `tile_shapes/d128_rows1_k{keys}_s16/{decode|prefill}`.
fn bench_tile_shapes(c: &mut Criterion, dev: &Device, plan: Plan) {
    use ape_attn::cuda::segmented_attention::TileShape;
    let mut g = configure(c, "tile_shapes");
    let prefill: &[(usize, usize, usize)] = if plan.quick {
        &[(64, 8192, 8192)]
    } else {
        &[(64, 8192, 8192), (128, 8192, 8192), (64, 2048, 32768)]
    };
    let timed = |g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
                 p: &Problem,
                 ape: ApeParams,
                 shape: String,
                 tiles: [TileShape; 2]| {
        let (mut out, mut lse) = outputs(dev, p);
        for tile in tiles {
            let options = SegmentedAttentionOptions {
                num_splits: None,
                tile: Some(tile),
            };
            let name = format!("{tile:?}").to_lowercase();
            g.bench_with_input(BenchmarkId::new(&shape, name), &(), |b, _| {
                b.iter_custom(|iters| {
                    gpu_time(dev, iters, || {
                        run_with(dev, p, &ape, &mut out, &mut lse, &options)
                    })
                })
            });
        }
    };
    for &(head_dim, rows, keys) in prefill {
        let (rows, keys) = (plan.s(rows), plan.s(keys));
        let p = problem_at(dev, head_dim, rows, keys, 16);
        g.throughput(Throughput::Elements(
            4 * rows as u64 * keys as u64 * 32 * head_dim as u64,
        ));
        let shape = format!("d{head_dim}_q{rows}_k{keys}");
        timed(
            &mut g,
            &p,
            ApeParams::plain(),
            shape,
            [TileShape::Prefill, TileShape::Wide],
        );
    }
    let keys = plan.s(131072);
    let p = problem(dev, 1, keys, 16);
    g.throughput(Throughput::Bytes(2 * keys as u64 * 8 * 128 * 2));
    let shape = format!("d128_rows1_k{keys}_s16");
    timed(
        &mut g,
        &p,
        ApeParams::default(),
        shape,
        [TileShape::Decode, TileShape::Prefill],
    );
    g.finish();
}

/// A decode step of many sequences, each one row over its own cached keys (Llama-3-8B attention
/// shapes, APE): one batched launch (`batched`) against one launch per sequence (`per_sequence`,
/// what an engine does without batches), and through a `CapturableBatch` (`capturable`: prepare
/// and launch; `graph`: prepare and the replay of a captured CUDA graph). Throughput: the K+V
/// bytes of all sequences. Ids:
/// `batch_decode/{batched|per_sequence|capturable|graph}/n{sequences}_k{keys per sequence}_s{segments}`.
fn bench_batch_decode(c: &mut Criterion, dev: &Device, plan: Plan) {
    let mut g = configure(c, "batch_decode");
    let shapes: &[(usize, usize, usize)] = if plan.quick {
        &[(64, 4096, 4)]
    } else {
        &[(64, 4096, 4), (16, 16384, 4)]
    };
    for &(n_seqs, keys, n_segments) in shapes {
        let (n_seqs, keys) = (plan.s(n_seqs).max(2), plan.s(keys));
        let problems: Vec<Problem> = (0..n_seqs)
            .map(|_| problem(dev, 1, keys, n_segments))
            .collect();
        let dims = problems[0].dims;
        let q = filled(dev, &[n_seqs, dims.n_heads, dims.head_dim], DType::BF16, 77);
        let mut out = Tensor::zeros(dev, q.shape(), DType::BF16).expect("alloc");
        let mut lse = Tensor::zeros(dev, &q.shape()[..2], DType::F32).expect("alloc");
        let mut outs: Vec<(Tensor, Tensor)> = problems.iter().map(|p| outputs(dev, p)).collect();
        let ape = ApeParams::default();
        let cached_keys: Vec<Vec<&Tensor>> = problems
            .iter()
            .map(|p| p.kv.iter().map(|(k, _)| k).collect())
            .collect();
        let segs: Vec<Vec<cuda::Segment>> = problems
            .iter()
            .zip(&cached_keys)
            .map(|(p, keys)| segments(p, keys, None))
            .collect();
        let sequences: Vec<cuda::BatchSequence> = problems
            .iter()
            .zip(&segs)
            .map(|(p, segs)| cuda::BatchSequence {
                n_rows: 1,
                pos_offset: p.q_pos,
                segments: segs,
                ape,
            })
            .collect();
        g.throughput(Throughput::Bytes(
            n_seqs as u64 * 2 * keys as u64 * 8 * 128 * 2,
        ));
        let shape = format!("n{n_seqs}_k{keys}_s{n_segments}");
        let opts = SegmentedAttentionOptions::default();
        g.bench_with_input(BenchmarkId::new("batched", &shape), &(), |b, _| {
            b.iter_custom(|iters| {
                gpu_time(dev, iters, || {
                    cuda::segmented_attention_batch_into(
                        dev, &q, &sequences, &dims, &mut out, &mut lse, &opts,
                    )
                    .expect("launch")
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("per_sequence", &shape), &(), |b, _| {
            b.iter_custom(|iters| {
                gpu_time(dev, iters, || {
                    for (p, (o, l)) in problems.iter().zip(&mut outs) {
                        run(dev, p, &ape, o, l)
                    }
                })
            })
        });
        // The same step through a CapturableBatch sized for it: prepare + launch per step, and
        // prepare + the replay of a graph that captured the launch.
        let capacity = BatchCapacity {
            sequences: n_seqs,
            rows: n_seqs,
            segments: sequences.iter().map(|s| s.segments.len()).sum(),
            // One row each: a decode step, on the decode tile's kernel.
            rows_per_sequence: 1,
        };
        let mut batch =
            CapturableBatch::new(dev, &dims, DType::BF16, &capacity, &opts).expect("batch");
        g.bench_with_input(BenchmarkId::new("capturable", &shape), &(), |b, _| {
            b.iter_custom(|iters| {
                gpu_time(dev, iters, || {
                    batch
                        .run(dev, &q, &sequences, &mut out, &mut lse)
                        .expect("launch")
                })
            })
        });
        match capture(dev, &mut batch, &sequences, &q, &mut out, &mut lse) {
            Ok(graph) => {
                g.bench_with_input(BenchmarkId::new("graph", &shape), &(), |b, _| {
                    b.iter_custom(|iters| {
                        gpu_time(dev, iters, || {
                            batch.prepare(dev, &sequences).expect("prepare");
                            graph.launch().expect("replay")
                        })
                    })
                });
            }
            Err(e) => eprintln!("batch_decode/graph/{shape}: capture failed: {e}"),
        }
    }
    g.finish();
}

/// A graph that replays `batch`'s launch over `q`, `out` and `lse`, captured after preparing
/// `sequences`.
fn capture(
    dev: &Device,
    batch: &mut CapturableBatch,
    sequences: &[cuda::BatchSequence],
    q: &Tensor,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<CudaGraph, String> {
    batch.prepare(dev, sequences).map_err(|e| e.to_string())?;
    let stream = dev.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| e.to_string())?;
    // SAFETY: the sequences' K/V live as long as the benchmark that replays the graph.
    let launched = unsafe { batch.launch(dev, q, out, lse) };
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    launched.map_err(|e| e.to_string())?;
    graph
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the capture recorded nothing".into())
}

/// The split-KV plan's choice against fixed split counts, for the memory-bound cases (64 rows and
/// one decode row over 32K keys in 16 segments, APE): data for tuning `plan`'s heuristic.
/// Throughput: the cached K+V bytes. Ids: `split_sweep/rows{r}_k32768_s16/{splits|auto}`.
fn bench_split_sweep(c: &mut Criterion, dev: &Device) {
    let mut g = configure(c, "split_sweep");
    let (keys, n_segments) = (32768, 16);
    for rows in [64, 1] {
        let p = problem(dev, rows, keys, n_segments);
        let (mut out, mut lse) = outputs(dev, &p);
        g.throughput(Throughput::Bytes(2 * keys as u64 * 8 * 128 * 2));
        let ape = ApeParams::default();
        let shape = format!("rows{rows}_k{keys}_s{n_segments}");
        for splits in [
            None,
            Some(1),
            Some(4),
            Some(16),
            Some(33),
            Some(66),
            Some(132),
            Some(264),
        ] {
            let name = splits.map_or("auto".to_string(), |n| n.to_string());
            let options = SegmentedAttentionOptions {
                num_splits: splits,
                tile: None,
            };
            g.bench_with_input(BenchmarkId::new(&shape, name), &(), |b, _| {
                b.iter_custom(|iters| {
                    gpu_time(dev, iters, || {
                        run_with(dev, &p, &ape, &mut out, &mut lse, &options)
                    })
                })
            });
        }
    }
    g.finish();
}

/// Block-Attention's read of 16 blocks cached at position 0 (32K keys), each at its offset, for a
/// 64-row question (split-KV, memory-bound) and a 4096-row prefill (one pass, compute-bound):
/// `fused` reads the keys in place through RoPE shifts; `separate` copies and shifts every
/// block's K first (cuda::rope_shift), then attends as stored, as the GPU model did before;
/// `unshifted` is the same attention with no shift, the cost floor of both. Throughput: the
/// cached K+V bytes, for all three.
fn bench_block_attention_shift(c: &mut Criterion, dev: &Device) {
    let mut g = configure(c, "block_attention_shift");
    let rope = RopeConfig::new(128, 500_000.0, RopeLayout::Neox).expect("rope");
    let (keys, n_segments) = (32768, 16);
    for rows in [64, 4096] {
        let p = problem(dev, rows, keys, n_segments);
        let (mut out, mut lse) = outputs(dev, &p);
        let cached: Vec<&Tensor> = p.kv.iter().map(|(k, _)| k).collect();
        // The separate path's shifted keys; the values are read as cached.
        let mut shifted: Vec<Tensor> = cached
            .iter()
            .map(|k| k.try_clone(dev).expect("alloc"))
            .collect();
        g.throughput(Throughput::Bytes(2 * keys as u64 * 8 * 128 * 2));
        let shape = format!("rows{rows}_k{keys}_s{n_segments}");
        let plain = ApeParams::plain();
        let opts = SegmentedAttentionOptions::default();
        g.bench_with_input(BenchmarkId::new("fused", &shape), &(), |b, _| {
            b.iter_custom(|iters| {
                gpu_time(dev, iters, || {
                    run_shifted(
                        dev,
                        &p,
                        &cached,
                        Some(&rope),
                        &plain,
                        &mut out,
                        &mut lse,
                        &opts,
                    )
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("separate", &shape), &(), |b, _| {
            b.iter_custom(|iters| {
                gpu_time(dev, iters, || {
                    for (i, (k, copy)) in cached.iter().zip(&mut shifted).enumerate() {
                        copy.copy_from(dev, k).expect("copy");
                        rope_shift(dev, copy, &rope, (i * k.shape()[0]) as i64).expect("rope");
                    }
                    let keys: Vec<&Tensor> = shifted.iter().collect();
                    run_shifted(dev, &p, &keys, None, &plain, &mut out, &mut lse, &opts)
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("unshifted", &shape), &(), |b, _| {
            b.iter_custom(|iters| gpu_time(dev, iters, || run(dev, &p, &plain, &mut out, &mut lse)))
        });
    }
    g.finish();
}

/// Merge of 8 states of [4096, 32, 128] bf16 (bytes = read + written), RoPE shift of 32K keys
/// x 8 heads x 128 (read + write), and a device-to-device copy of 1 GiB (read + write), the
/// bandwidth peer measured in the same run (the quick set: the copy alone).
fn bench_memory_bound(c: &mut Criterion, dev: &Device, plan: Plan) {
    let mut g = configure(c, "memory_bound");
    if !plan.quick {
        bench_merge_and_rope(&mut g, dev);
    }
    let n = plan.s(1 << 30);
    let src = dev.stream().alloc_zeros::<u8>(n).expect("alloc");
    let mut dst = dev.stream().alloc_zeros::<u8>(n).expect("alloc");
    g.throughput(Throughput::Bytes(2 * n as u64));
    g.bench_function(format!("copy_d2d_{}", bytes_label(n)), |b| {
        b.iter_custom(|iters| {
            gpu_time(dev, iters, || {
                dev.stream().memcpy_dtod(&src, &mut dst).expect("copy")
            })
        })
    });
    g.finish();
}

fn bench_merge_and_rope(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
) {
    let (n_states, rows, heads, d) = (8, 4096, 32, 128);
    let v = filled(dev, &[n_states, rows, heads, d], DType::BF16, 1);
    let s = filled(dev, &[n_states, rows, heads], DType::F32, 2);
    let mut vo = Tensor::zeros(dev, &[rows, heads, d], DType::BF16).expect("alloc");
    let mut so = Tensor::zeros(dev, &[rows, heads], DType::F32).expect("alloc");
    let bytes = ((n_states + 1) * rows * heads * (d * 2 + 4)) as u64;
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("merge_states_8x4096x32x128_bf16", |b| {
        b.iter_custom(|iters| {
            gpu_time(dev, iters, || {
                merge_states_into(dev, &v, &s, &mut vo, &mut so).expect("merge")
            })
        })
    });

    let cfg = RopeConfig::new(128, 500_000.0, RopeLayout::Neox).expect("rope");
    let mut k = filled(dev, &[32768, 8, 128], DType::BF16, 3);
    g.throughput(Throughput::Bytes(2 * k.len() as u64 * 2));
    g.bench_function("rope_shift_32768x8x128_bf16", |b| {
        b.iter_custom(|iters| {
            gpu_time(dev, iters, || {
                rope_shift(dev, &mut k, &cfg, 4096).expect("rope")
            })
        })
    });
}

/// Does a launch make the host wait for the stream? Each iteration queues a 64 MiB
/// device-to-device copy (about 40 us of GPU work) and then one small call: an RMSNorm (a plain
/// launch), a one-row attention over 64 keys (which uploads its segment descriptors from pageable
/// memory first), or that upload alone (1 KiB). If the call returns at once, the host queues the
/// next copy while the GPU works, and the iteration costs about one copy; if it waits for the
/// stream, the host's launch time adds to every iteration. Ids: `host_sync/copy64MiB_then_{...}`.
fn bench_host_sync(c: &mut Criterion, dev: &Device) {
    let mut g = configure(c, "host_sync");
    let n = 64usize << 20;
    let src = dev.stream().alloc_zeros::<u8>(n).expect("alloc");
    let mut dst = dev.stream().alloc_zeros::<u8>(n).expect("alloc");
    let x = filled(dev, &[1, 4096], DType::BF16, 5);
    let w = filled(dev, &[4096], DType::BF16, 6);
    let mut y = Tensor::zeros(dev, &[1, 4096], DType::BF16).expect("alloc");
    let p = problem(dev, 1, 64, 1);
    let (mut out, mut lse) = outputs(dev, &p);
    let ape = ApeParams::default();
    let host = vec![0u8; 1024];
    let mut copy = || dev.stream().memcpy_dtod(&src, &mut dst).expect("copy");
    g.bench_function("copy64MiB_then_nothing", |b| {
        b.iter_custom(|iters| gpu_time(dev, iters, &mut copy))
    });
    g.bench_function("copy64MiB_then_rms_norm", |b| {
        b.iter_custom(|iters| {
            gpu_time(dev, iters, || {
                copy();
                cuda::rms_norm_into(dev, &x, &w, 1e-5, &mut y).expect("rms_norm")
            })
        })
    });
    g.bench_function("copy64MiB_then_attention", |b| {
        b.iter_custom(|iters| {
            gpu_time(dev, iters, || {
                copy();
                run(dev, &p, &ape, &mut out, &mut lse)
            })
        })
    });
    g.bench_function("copy64MiB_then_upload", |b| {
        b.iter_custom(|iters| {
            gpu_time(dev, iters, || {
                copy();
                drop(dev.stream().clone_htod(&host).expect("upload"))
            })
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("GPU kernel benchmarks skipped: {e}");
            return;
        }
    };
    println!("device: {}", dev.name().unwrap_or_default());
    let plan = Plan::from_env();
    bench_memory_bound(c, &dev, plan);
    if !plan.quick {
        bench_host_sync(c, &dev);
    }
    bench_short_and_decode(c, &dev, plan);
    if !plan.quick {
        bench_split_sweep(c, &dev);
    }
    bench_batch_decode(c, &dev, plan);
    if !plan.quick {
        bench_block_attention_shift(c, &dev);
    }
    bench_prefill(c, &dev, plan);
    bench_tile_shapes(c, &dev, plan);
}

criterion_group!(kernel_benches, benches);
criterion_main!(kernel_benches);
