//! The segmented attention kernels (prefill, decode, split-KV, APE fused, RoPE shifts) against the
//! CPU oracle on a GPU (needs a CUDA device). The sweeps are in `tests/common/attention.rs`, shared
//! with the kernel emulator's run of the same kernels (`tests/emulated_segmented_attention.rs`).
//! `APE_GPU_QUICK=1` runs a reduced sweep (for compute-sanitizer).

#[path = "common/attention.rs"]
mod attention;
mod common;

use ape_attn::cuda::{self, BatchCapacity, DType, SegmentedAttentionOptions, Tensor};
use ape_attn::{ApeParams, AttentionDims, Error, RopeShift, SegmentRole};
use attention::{assert_ok, check, round, Backend, Case, CaseSegment};
use common::{hash_fill, seeded, Gpu};

/// A case's segments' K and V on the device.
fn upload_kv(gpu: &Gpu, case: &Case) -> Vec<(Tensor, Tensor)> {
    case.segments
        .iter()
        .map(|s| {
            let shape = [s.len, case.dims.n_kv_heads, case.dims.head_dim];
            (
                gpu.upload(&s.k, &shape, case.dtype),
                gpu.upload(&s.v, &shape, case.dtype),
            )
        })
        .collect()
}

/// A case's segments over their device K and V ([`upload_kv`]).
fn segments<'a>(case: &Case, kv: &'a [(Tensor, Tensor)]) -> Vec<cuda::Segment<'a>> {
    case.segments
        .iter()
        .zip(kv)
        .map(|(s, (k, v))| cuda::Segment {
            k,
            v,
            pos_offset: s.pos_offset,
            role: s.role,
            rope_shift: s.rope_shift,
        })
        .collect()
}

impl Backend for Gpu {
    fn run(&self, case: &Case) -> (Vec<f32>, Vec<f32>) {
        let dev = &self.0;
        let d = case.dims.head_dim;
        let h = case.dims.n_heads;
        let kv = upload_kv(self, case);
        let segs = segments(case, &kv);
        let q = self.upload(&case.q, &[case.n_rows, h, d], case.dtype);
        let mut out = self.nan(&[case.n_rows, h, d], case.dtype);
        let mut lse = self.nan(&[case.n_rows, h], DType::F32);
        let query = cuda::Query {
            data: &q,
            pos_offset: case.q_pos,
        };
        let opts = SegmentedAttentionOptions {
            num_splits: case.splits,
            tile: case.tile,
        };
        cuda::segmented_attention_into(
            dev, &query, &segs, &case.dims, &case.ape, &mut out, &mut lse, &opts,
        )
        .unwrap_or_else(|e| panic!("launch failed: {e} ({case:?})"));
        (self.download(&out), self.download(&lse))
    }

    fn shift_keys(
        &self,
        k: &[f32],
        shape: [usize; 3],
        dtype: DType,
        shift: &RopeShift,
    ) -> Vec<f32> {
        let mut t = self.upload(k, &shape, dtype);
        cuda::rope_shift(&self.0, &mut t, &shift.rope, shift.delta).unwrap();
        self.download(&t)
    }

    fn quick(&self) -> bool {
        std::env::var("APE_GPU_QUICK").is_ok_and(|v| v == "1")
    }

    fn run_batch(&self, cases: &[Case], splits: Option<usize>) -> (Vec<f32>, Vec<f32>) {
        let (dims, dtype) = (cases[0].dims, cases[0].dtype);
        let d = dims.head_dim;
        let kv: Vec<Vec<(Tensor, Tensor)>> = cases.iter().map(|c| upload_kv(self, c)).collect();
        let segs: Vec<Vec<cuda::Segment>> = cases
            .iter()
            .zip(&kv)
            .map(|(c, kv)| segments(c, kv))
            .collect();
        let sequences: Vec<cuda::BatchSequence> = cases
            .iter()
            .zip(&segs)
            .map(|(c, segs)| cuda::BatchSequence {
                n_rows: c.n_rows,
                pos_offset: c.q_pos,
                segments: segs,
                ape: c.ape,
            })
            .collect();
        let rows: usize = cases.iter().map(|c| c.n_rows).sum();
        let q: Vec<f32> = cases.iter().flat_map(|c| c.q.iter().copied()).collect();
        let q = self.upload(&q, &[rows, dims.n_heads, d], dtype);
        let mut out = self.nan(&[rows, dims.n_heads, d], dtype);
        let mut lse = self.nan(&[rows, dims.n_heads], DType::F32);
        let opts = SegmentedAttentionOptions {
            num_splits: splits,
            tile: None,
        };
        cuda::segmented_attention_batch_into(
            &self.0, &q, &sequences, &dims, &mut out, &mut lse, &opts,
        )
        .unwrap_or_else(|e| panic!("batched launch failed: {e} ({cases:?})"));
        (self.download(&out), self.download(&lse))
    }

    fn run_capturable(
        &self,
        cases: &[Case],
        capacity: &BatchCapacity,
        splits: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (dims, dtype) = (cases[0].dims, cases[0].dtype);
        let d = dims.head_dim;
        let kv: Vec<Vec<(Tensor, Tensor)>> = cases.iter().map(|c| upload_kv(self, c)).collect();
        let segs: Vec<Vec<cuda::Segment>> = cases
            .iter()
            .zip(&kv)
            .map(|(c, kv)| segments(c, kv))
            .collect();
        let sequences = batch_sequences(cases, &segs);
        // The query buffer has the capacity's rows, as a captured graph's would; the rows past
        // the sequences' are NaN and must not be read.
        let mut q: Vec<f32> = cases.iter().flat_map(|c| c.q.iter().copied()).collect();
        q.resize(capacity.rows * dims.n_heads * d, f32::NAN);
        let q = self.upload(&q, &[capacity.rows, dims.n_heads, d], dtype);
        let mut out = self.nan(&[capacity.rows, dims.n_heads, d], dtype);
        let mut lse = self.nan(&[capacity.rows, dims.n_heads], DType::F32);
        let opts = SegmentedAttentionOptions {
            num_splits: splits,
            tile: None,
        };
        let mut batch = cuda::CapturableBatch::new(&self.0, &dims, dtype, capacity, &opts)
            .unwrap_or_else(|e| panic!("capturable batch: {e} ({capacity:?})"));
        batch
            .run(&self.0, &q, &sequences, &mut out, &mut lse)
            .unwrap_or_else(|e| panic!("capturable launch failed: {e} ({cases:?})"));
        (self.download(&out), self.download(&lse))
    }
}

/// `cases` as the sequences of a batch, over their device segments.
fn batch_sequences<'a>(
    cases: &[Case],
    segs: &'a [Vec<cuda::Segment<'a>>],
) -> Vec<cuda::BatchSequence<'a>> {
    cases
        .iter()
        .zip(segs)
        .map(|(c, segs)| cuda::BatchSequence {
            n_rows: c.n_rows,
            pos_offset: c.q_pos,
            segments: segs,
            ape: c.ape,
        })
        .collect()
}

/// Asserts that `(out, lse)` (at least `rows` rows) holds the bits the batched launcher gives for
/// `sequences` over the first `rows` rows of `q`, with `opts`.
#[allow(clippy::too_many_arguments)]
fn assert_batched_bits<K: cuda::KvTensor>(
    gpu: &Gpu,
    q: &Tensor,
    rows: usize,
    sequences: &[cuda::BatchSequence<'_, K>],
    dims: &AttentionDims,
    opts: &SegmentedAttentionOptions,
    (out, lse): (&[f32], &[f32]),
    what: &str,
) {
    let dev = &gpu.0;
    let (h, d) = (dims.n_heads, dims.head_dim);
    let q = q.copy_rows(dev, 0, rows).unwrap();
    let mut want_out = gpu.nan(&[rows, h, d], q.dtype());
    let mut want_lse = gpu.nan(&[rows, h], DType::F32);
    cuda::segmented_attention_batch_into(
        dev,
        &q,
        sequences,
        dims,
        &mut want_out,
        &mut want_lse,
        opts,
    )
    .unwrap();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let (want_out, want_lse) = (gpu.download(&want_out), gpu.download(&want_lse));
    assert!(want_lse.iter().all(|x| !x.is_nan()), "{what}: NaN");
    assert!(
        bits(&out[..rows * h * d]) == bits(&want_out) && bits(&lse[..rows * h]) == bits(&want_lse),
        "{what}: differs from the batched launch"
    );
}

/// The plan fills the wave the driver counts for each compiled kernel: at head dim 128 that is
/// what the architecture's shared memory allows, at the pipeline stages the model chooses from
/// the same limits; the decode tile's kernel fits at least as many blocks per SM as the prefill
/// tile's.
#[test]
#[ignore = "needs a CUDA device"]
fn the_plan_fills_the_devices_wave() {
    use ape_attn::cuda::segmented_attention::{AttentionOccupancy, SmLimits};
    let gpu = Gpu::new();
    let dev = &gpu.0;
    let (major, minor) = dev.compute_capability().expect("capability");
    for dtype in [DType::BF16, DType::F16] {
        let got = dev.attention_occupancy(dtype, 128).expect("occupancy");
        for o in [got.prefill, got.wide, got.decode] {
            assert_eq!(o.sm_count, dev.sm_count());
            assert!(o.fits(false), "{o:?}");
            assert!((2..=4).contains(&o.stages), "{o:?}");
        }
        // With RoPE shifts the wide tile may not fit a 100 KiB SM at head dim 128; the others do.
        assert!(got.prefill.fits(true) && got.decode.fits(true), "{got:?}");
        assert!(got.prefill.blocks_per_sm >= got.prefill.blocks_per_sm_with_shifts);
        assert_eq!((got.prefill.stages, got.prefill.stages_with_shifts), (2, 2));
        assert!(
            got.decode.blocks_per_sm >= got.prefill.blocks_per_sm,
            "{got:?}"
        );
        match SmLimits::of_compute_capability(major, minor) {
            Some(limits) => assert_eq!(
                got,
                AttentionOccupancy::modelled(&limits, dev.sm_count(), 128),
                "compute capability {major}.{minor}"
            ),
            None => eprintln!("compute capability {major}.{minor}: no model to compare with"),
        }
        // Asked twice: the same answer (cached).
        assert_eq!(dev.attention_occupancy(dtype, 128).expect("occupancy"), got);
        let small = dev.attention_occupancy(dtype, 64).expect("occupancy");
        assert!(
            small.prefill.blocks_per_sm >= got.prefill.blocks_per_sm,
            "{small:?} vs {got:?}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn capturable_batches() {
    attention::capturable_batches(&Gpu::new());
}

/// Prepares queued back to back while the GPU is busy (a 1 GiB copy first), each with its own
/// batch and outputs: each launch reads its own plan, not one a later prepare() wrote into the
/// staging memory its copy had not yet read.
#[test]
#[ignore = "needs a CUDA device"]
fn back_to_back_prepares_keep_each_plan() {
    let gpu = Gpu::new();
    let dev = &gpu.0;
    let mut r = seeded("back_to_back_prepares_keep_each_plan");
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    let batches: Vec<Vec<Case>> = (0..6)
        .map(|i| {
            (0..1 + i % 3)
                .map(|_| {
                    let lens = [r.range(1, 900)];
                    let ape = ApeParams::new(r.f32_in(0.5, 1.5), r.f32_in(0.5, 1.5)).unwrap();
                    attention::make_case(&mut r, dims, DType::BF16, 3, &lens, 1 + i, ape, None)
                })
                .collect()
        })
        .collect();
    let capacity = BatchCapacity {
        sequences: 3,
        rows: 3 * 6,
        segments: 3 * 4,
        rows_per_sequence: 0,
    };
    let opts = SegmentedAttentionOptions::default();
    let mut batch = cuda::CapturableBatch::new(dev, &dims, DType::BF16, &capacity, &opts).unwrap();
    let kv: Vec<Vec<Vec<(Tensor, Tensor)>>> = batches
        .iter()
        .map(|cases| cases.iter().map(|c| upload_kv(&gpu, c)).collect())
        .collect();
    let segs: Vec<Vec<Vec<cuda::Segment>>> = batches
        .iter()
        .zip(&kv)
        .map(|(cases, kv)| {
            cases
                .iter()
                .zip(kv)
                .map(|(c, kv)| segments(c, kv))
                .collect()
        })
        .collect();
    let sequences: Vec<Vec<cuda::BatchSequence>> = batches
        .iter()
        .zip(&segs)
        .map(|(cases, segs)| batch_sequences(cases, segs))
        .collect();
    let queries: Vec<Tensor> = batches
        .iter()
        .map(|cases| {
            let mut q: Vec<f32> = cases.iter().flat_map(|c| c.q.iter().copied()).collect();
            q.resize(capacity.rows * 8 * 128, 0.0);
            gpu.upload(&q, &[capacity.rows, 8, 128], DType::BF16)
        })
        .collect();
    let mut outs: Vec<(Tensor, Tensor)> = (0..6)
        .map(|_| {
            (
                gpu.nan(&[capacity.rows, 8, 128], DType::BF16),
                gpu.nan(&[capacity.rows, 8], DType::F32),
            )
        })
        .collect();
    let hog_src = Tensor::zeros(dev, &[1 << 28], DType::F32).unwrap();
    let mut hog_dst = Tensor::zeros(dev, &[1 << 28], DType::F32).unwrap();
    dev.synchronize().unwrap();
    hog_dst.copy_from(dev, &hog_src).unwrap();
    for ((seqs, q), (out, lse)) in sequences.iter().zip(&queries).zip(&mut outs) {
        batch.run(dev, q, seqs, out, lse).unwrap();
    }
    for (i, ((cases, seqs), (out, lse))) in batches.iter().zip(&sequences).zip(&outs).enumerate() {
        let rows: usize = cases.iter().map(|c| c.n_rows).sum();
        let got = (gpu.download(out), gpu.download(lse));
        let what = format!("launch {i} (its own plan?)");
        assert_batched_bits(
            &gpu,
            &queries[i],
            rows,
            seqs,
            &dims,
            &opts,
            (&got.0, &got.1),
            &what,
        );
    }
}

/// Decode steps replayed from one CUDA graph: the launch is captured once (three sequences,
/// APE, plain and Block-Attention), and each later step writes its query rows, prepares the
/// batch for keys one longer (and, one step, for one sequence fewer) and replays the graph. Every
/// step gives the bits of the batched launcher on the same inputs, and the first step's graph
/// replayed twice in a row gives the same bits twice (split mode's counters are reset). prepare() during a capture is
/// an error, and after a failed prepare() launch() is too.
#[test]
#[ignore = "needs a CUDA device"]
fn capturable_decode_replays_in_a_cuda_graph() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let gpu = Gpu::new();
    let dev = &gpu.0;
    let mut r = seeded("capturable_decode_replays_in_a_cuda_graph");
    let dims = AttentionDims::new(32, 8, 128).unwrap();
    let dtype = DType::BF16;
    let rope = attention::rope_configs(128)[0];
    let row = 8 * 128;
    let kv = |r: &mut common::Seeded, n: usize| {
        let shape = [n, 8, 128];
        (
            gpu.upload(&round(r.uniform(n * row, 2.0), dtype), &shape, dtype),
            gpu.upload(&round(r.uniform(n * row, 1.0), dtype), &shape, dtype),
        )
    };
    // Per sequence: a cached context (Context, shifted for the Block-Attention one) and its own
    // generated tokens' K/V, a preallocated block read through a growing row view.
    let contexts: Vec<(Tensor, Tensor)> =
        [3000, 700, 1500].iter().map(|&n| kv(&mut r, n)).collect();
    let own: Vec<(Tensor, Tensor)> = (0..3).map(|_| kv(&mut r, 16)).collect();
    let apes = [ApeParams::default(), ApeParams::plain(), ApeParams::plain()];
    let capacity = BatchCapacity {
        sequences: 3,
        rows: 3,
        segments: 6,
        // Decode rows: the decode tile's kernel.
        rows_per_sequence: 1,
    };
    let opts = SegmentedAttentionOptions::default();
    let mut batch = cuda::CapturableBatch::new(dev, &dims, dtype, &capacity, &opts).unwrap();
    let q = |r: &mut common::Seeded, q: &mut Tensor| {
        q.copy_from_f32(dev, &round(r.uniform(3 * 32 * 128, 2.0), dtype))
            .unwrap();
    };
    let mut q_buf = gpu.nan(&[3, 32, 128], dtype);
    let mut out = gpu.nan(&[3, 32, 128], dtype);
    let mut lse = gpu.nan(&[3, 32], DType::F32);
    let mut graph = None;
    for step in 0..6 {
        let n_seqs = if step == 3 { 2 } else { 3 };
        let len = 4 + step;
        let views: Vec<_> = own
            .iter()
            .map(|(k, v)| (k.rows(0..len).unwrap(), v.rows(0..len).unwrap()))
            .collect();
        let ctx_views: Vec<_> = contexts
            .iter()
            .map(|(k, v)| {
                (
                    k.rows(0..k.shape()[0]).unwrap(),
                    v.rows(0..v.shape()[0]).unwrap(),
                )
            })
            .collect();
        let ctx_len = [3000, 700, 1500];
        let segs: Vec<Vec<cuda::Segment<'_, cuda::TensorRows<'_>>>> = (0..3)
            .map(|i| {
                vec![
                    cuda::Segment {
                        k: &ctx_views[i].0,
                        v: &ctx_views[i].1,
                        pos_offset: 0,
                        role: if i == 0 {
                            SegmentRole::Context
                        } else {
                            SegmentRole::Causal
                        },
                        rope_shift: (i == 2).then_some(RopeShift { rope, delta: 37 }),
                    },
                    cuda::Segment {
                        k: &views[i].0,
                        v: &views[i].1,
                        pos_offset: ctx_len[i],
                        role: SegmentRole::Causal,
                        rope_shift: None,
                    },
                ]
            })
            .collect();
        let sequences: Vec<cuda::BatchSequence<'_, cuda::TensorRows<'_>>> = (0..n_seqs)
            .map(|i| cuda::BatchSequence {
                n_rows: 1,
                pos_offset: ctx_len[i] + len - 1,
                segments: &segs[i],
                ape: apes[i],
            })
            .collect();
        q(&mut r, &mut q_buf);
        batch.prepare(dev, &sequences).unwrap();
        if graph.is_none() {
            let stream = dev.stream();
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .unwrap();
            // SAFETY: the segments prepared are alive until the end of this step, after the
            // replay is synchronised below.
            let launched = unsafe { batch.launch(dev, &q_buf, &mut out, &mut lse) };
            // After the launch: a refused prepare() leaves the batch without a plan to launch
            // (the graph's replays read the plan copied before).
            let during = batch.prepare(dev, &sequences);
            let captured = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap();
            assert!(
                during.is_err(),
                "prepare() during a capture must be refused"
            );
            launched.unwrap();
            graph = Some(captured.expect("a graph"));
        }
        graph.as_ref().unwrap().launch().unwrap();
        let got = (gpu.download(&out), gpu.download(&lse));
        let what = format!("step {step}: the replay");
        assert_batched_bits(
            &gpu,
            &q_buf,
            n_seqs,
            &sequences,
            &dims,
            &opts,
            (&got.0, &got.1),
            &what,
        );
        assert!(got.1[..n_seqs * 32].iter().all(|x| x.is_finite()));
        if step == 0 {
            // The same graph replayed again at once, its outputs poisoned first: its split
            // launch found its counters where the first replay left them (at zero), so it gives
            // the same bits.
            out.copy_from_f32(dev, &vec![f32::NAN; 3 * 32 * 128])
                .unwrap();
            lse.copy_from_f32(dev, &vec![f32::NAN; 3 * 32]).unwrap();
            graph.as_ref().unwrap().launch().unwrap();
            let again = (gpu.download(&out), gpu.download(&lse));
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            assert!(
                bits(&again.0) == bits(&got.0) && bits(&again.1) == bits(&got.1),
                "step 0: a second replay in a row gives other bits"
            );
        }
    }
    // A failed prepare leaves no plan to launch.
    let none: [cuda::BatchSequence<'_, Tensor>; 0] = [];
    assert!(batch.prepare(dev, &none).is_err());
    // SAFETY: nothing is launched: the batch has no prepared plan.
    assert!(unsafe { batch.launch(dev, &q_buf, &mut out, &mut lse) }.is_err());
}

#[test]
#[ignore = "needs a CUDA device"]
fn batches_of_sequences() {
    attention::batches_of_sequences(&Gpu::new());
}

/// Segments read through row views of one pool tensor (an engine's KV pool) give the very bits of
/// the same rows copied into tensors of their own, in whole and split mode, with a RoPE shift on
/// one; views past the pool's rows, or K and V views of different lengths, are errors. A pool
/// written piece by piece with `write_rows` holds the same bits; writes that do not fit are errors.
#[test]
#[ignore = "needs a CUDA device"]
fn segments_read_through_row_views_of_a_pool() {
    let gpu = Gpu::new();
    let dev = &gpu.0;
    let mut r = seeded("segments_read_through_row_views_of_a_pool");
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    let (row, pool_rows) = (2 * 128, 700);
    let shape = |n| [n, 2, 128];
    let k_host = round(r.uniform(pool_rows * row, 2.0), DType::BF16);
    let v_host = round(r.uniform(pool_rows * row, 1.0), DType::BF16);
    let k_pool = gpu.upload(&k_host, &shape(pool_rows), DType::BF16);
    let v_pool = gpu.upload(&v_host, &shape(pool_rows), DType::BF16);
    let rope = attention::rope_configs(128)[0];
    // (rows of the pool, position, role, shift)
    let spans = [
        (0..100, 0, SegmentRole::Causal, None),
        (130..400, 100, SegmentRole::Context, Some(100)),
        (400..401, 100, SegmentRole::Context, None),
        (650..700, 370, SegmentRole::Causal, None),
    ];
    let views: Vec<_> = spans
        .iter()
        .map(|(rows, ..)| {
            let k = k_pool.rows(rows.clone()).unwrap();
            let v = v_pool.rows(rows.clone()).unwrap();
            (k, v)
        })
        .collect();
    let copies: Vec<(Tensor, Tensor)> = spans
        .iter()
        .map(|(rows, ..)| {
            let (a, b) = (rows.start * row, rows.end * row);
            let n = rows.len();
            (
                gpu.upload(&k_host[a..b], &shape(n), DType::BF16),
                gpu.upload(&v_host[a..b], &shape(n), DType::BF16),
            )
        })
        .collect();
    fn span_segments<'a, K>(
        kv: &'a [(K, K)],
        spans: &[(std::ops::Range<usize>, usize, SegmentRole, Option<i64>)],
        rope: ape_attn::RopeConfig,
    ) -> Vec<cuda::Segment<'a, K>> {
        kv.iter()
            .zip(spans)
            .map(|((k, v), (_, pos, role, shift))| cuda::Segment {
                k,
                v,
                pos_offset: *pos,
                role: *role,
                rope_shift: shift.map(|delta| RopeShift { rope, delta }),
            })
            .collect()
    }
    let q = gpu.upload(
        &round(r.uniform(20 * 8 * 128, 2.0), DType::BF16),
        &[20, 8, 128],
        DType::BF16,
    );
    let query = cuda::Query {
        data: &q,
        pos_offset: 400,
    };
    let ape = ApeParams::default();
    for splits in [Some(1), None] {
        let opts = SegmentedAttentionOptions {
            num_splits: splits,
            tile: None,
        };
        let run = |out: &mut Tensor, lse: &mut Tensor, viewed: bool| {
            let res = if viewed {
                let segs = span_segments(&views, &spans, rope);
                cuda::segmented_attention_into(dev, &query, &segs, &dims, &ape, out, lse, &opts)
            } else {
                let segs = span_segments(&copies, &spans, rope);
                cuda::segmented_attention_into(dev, &query, &segs, &dims, &ape, out, lse, &opts)
            };
            res.expect("launch");
            (gpu.download(out), gpu.download(lse))
        };
        let (mut out, mut lse) = (
            gpu.nan(&[20, 8, 128], DType::BF16),
            gpu.nan(&[20, 8], DType::F32),
        );
        let viewed = run(&mut out, &mut lse, true);
        let (mut out, mut lse) = (
            gpu.nan(&[20, 8, 128], DType::BF16),
            gpu.nan(&[20, 8], DType::F32),
        );
        let copied = run(&mut out, &mut lse, false);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(&viewed.0) == bits(&copied.0) && bits(&viewed.1) == bits(&copied.1));
        assert!(viewed.0.iter().all(|x| x.is_finite()));
    }
    assert!(matches!(k_pool.rows(600..701), Err(Error::Shape(_))));
    // An engine fills its pool token by token or block by block: write_rows gives the same bits.
    let mut written = gpu.nan(&shape(pool_rows), DType::BF16);
    for (a, b) in [(0, 1), (1, 130), (130, 699), (699, 700), (700, 700)] {
        let chunk = gpu.upload(&k_host[a * row..b * row], &shape(b - a), DType::BF16);
        written.write_rows(dev, a, &chunk).expect("rows that fit");
    }
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(bits(&gpu.download(&written)) == bits(&k_host));
    let one = gpu.upload(&k_host[..row], &shape(1), DType::BF16);
    assert!(matches!(
        written.write_rows(dev, 700, &one),
        Err(Error::Shape(_))
    ));
    let wide = gpu.upload(&[0.0; 3 * 128], &[1, 3, 128], DType::BF16);
    assert!(matches!(
        written.write_rows(dev, 0, &wide),
        Err(Error::Shape(_))
    ));
    let f32_row = gpu.upload(&k_host[..row], &shape(1), DType::F32);
    assert!(matches!(
        written.write_rows(dev, 0, &f32_row),
        Err(Error::DType(_))
    ));
    let short = v_pool.rows(0..99).unwrap();
    let bad = [cuda::Segment {
        k: &views[0].0,
        v: &short,
        pos_offset: 0,
        role: SegmentRole::Causal,
        rope_shift: None,
    }];
    assert!(matches!(
        cuda::segmented_attention(dev, &query, &bad, &dims, &ape),
        Err(Error::Shape(_))
    ));
}

#[test]
#[ignore = "needs a CUDA device"]
fn lengths_and_split_modes() {
    attention::lengths_and_split_modes(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn question_lengths_prefill() {
    attention::question_lengths_prefill(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn gqa_head_dims_and_ape_parameters() {
    attention::gqa_head_dims_and_ape_parameters(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn many_segments_including_empty_ones() {
    attention::many_segments_including_empty_ones(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn many_splits() {
    attention::many_splits(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn split_launches_in_a_row_give_the_same_bits() {
    attention::split_launches_in_a_row_give_the_same_bits(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn plain_attention_and_edge_cases() {
    attention::plain_attention_and_edge_cases(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn rope_shifted_segments() {
    attention::rope_shifted_segments(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_shift_against_separate_shift() {
    attention::fused_shift_against_separate_shift(&Gpu::new());
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_inputs_are_errors() {
    let dev = Gpu::new().0;
    let z = |shape: &[usize], dtype| Tensor::zeros(&dev, shape, dtype).unwrap();
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    let q = z(&[4, 8, 128], DType::BF16);
    let k = z(&[10, 2, 128], DType::BF16);
    let k_f16 = z(&[10, 2, 128], DType::F16);
    let k_bad = z(&[10, 4, 128], DType::BF16);
    let query = cuda::Query {
        data: &q,
        pos_offset: 0,
    };
    fn seg(k: &Tensor) -> cuda::Segment<'_> {
        cuda::Segment {
            k,
            v: k,
            pos_offset: 0,
            role: SegmentRole::Context,
            rope_shift: None,
        }
    }
    let ape = ApeParams::default();
    assert!(cuda::segmented_attention(&dev, &query, &[seg(&k)], &dims, &ape).is_ok());
    assert!(matches!(
        cuda::segmented_attention(&dev, &query, &[seg(&k_f16)], &dims, &ape),
        Err(Error::DType(_))
    ));
    assert!(matches!(
        cuda::segmented_attention(&dev, &query, &[seg(&k_bad)], &dims, &ape),
        Err(Error::Shape(_))
    ));
    let d96 = AttentionDims::new(8, 2, 96).unwrap();
    let q96 = z(&[4, 8, 96], DType::BF16);
    let query96 = cuda::Query {
        data: &q96,
        pos_offset: 0,
    };
    assert!(matches!(
        cuda::segmented_attention(&dev, &query96, &[] as &[cuda::Segment], &d96, &ape),
        Err(Error::UnsupportedHeadDim { .. })
    ));
    let far = cuda::Query {
        data: &q,
        pos_offset: i32::MAX as usize,
    };
    assert!(matches!(
        cuda::segmented_attention(&dev, &far, &[] as &[cuda::Segment], &dims, &ape),
        Err(Error::OutOfRange(_))
    ));
    // Batches: the rows must add up to the query's, and errors name the sequence.
    let good = [seg(&k)];
    let bad = [seg(&k_bad)];
    let batch = |rows: [usize; 2], second: &'static str| {
        let segs: &[cuda::Segment] = if second == "bad" { &bad } else { &good };
        let seqs = [
            cuda::BatchSequence {
                n_rows: rows[0],
                pos_offset: 0,
                segments: &good,
                ape,
            },
            cuda::BatchSequence {
                n_rows: rows[1],
                pos_offset: 10,
                segments: segs,
                ape: ApeParams::plain(),
            },
        ];
        cuda::segmented_attention_batch(&dev, &q, &seqs, &dims)
    };
    assert!(batch([1, 3], "good").is_ok());
    assert!(matches!(batch([1, 2], "good"), Err(Error::Shape(_))));
    assert!(
        matches!(batch([1, 3], "bad"), Err(Error::Shape(m)) if m.contains("sequence 1: segment 0 k"))
    );
}

/// Our error on the inputs scripts/gpu/peer.py gives PyTorch SDPA (same hash fill): heads 8,
/// KV heads 2, d 128, q = 8 * fill(11), k = 4 * fill(21), v = fill(22), T = S = 1. Prints
/// `SDPA-CASE name rel_l2=...` for scripts/gpu/summarize.py, which puts SDPA's error beside it.
#[test]
#[ignore = "needs a CUDA device"]
fn sdpa_comparison_cases() {
    let gpu = Gpu::new();
    let mut r = seeded("sdpa_comparison_cases");
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    for (name, rows, keys, causal) in [
        ("ctx_256x4096", 256, 4096, false),
        ("causal_1024", 1024, 1024, true),
        ("decode_1x8192", 1, 8192, false),
    ] {
        let dtype = DType::BF16;
        let row = dims.n_kv_heads * dims.head_dim;
        let k = round(hash_fill(keys * row, 21, 4.0), dtype);
        let v = round(hash_fill(keys * row, 22, 1.0), dtype);
        // Contexts: 4 segments over the keys; causal: one segment at the query's positions.
        let n_segs = if causal { 1 } else { 4 };
        let per = keys / n_segs;
        let segments = (0..n_segs)
            .map(|i| CaseSegment {
                k: k[i * per * row..(i + 1) * per * row].to_vec(),
                v: v[i * per * row..(i + 1) * per * row].to_vec(),
                len: per,
                pos_offset: 0,
                role: if causal {
                    SegmentRole::Causal
                } else {
                    SegmentRole::Context
                },
                rope_shift: None,
            })
            .collect();
        let case = Case {
            dims,
            dtype,
            n_rows: rows,
            q_pos: 0,
            q: round(
                hash_fill(rows * dims.n_heads * dims.head_dim, 11, 8.0),
                dtype,
            ),
            segments,
            ape: ApeParams::plain(),
            splits: None,
            tile: None,
        };
        let err = check(&gpu, &mut r, &case, usize::MAX);
        println!("SDPA-CASE {name} rel_l2={:.6e}", err.0);
        assert_ok(&case, err);
    }
}
