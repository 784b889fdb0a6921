//! The segmented-attention cases and sweeps, written once for every backend that runs the
//! kernels: the GPU (`tests/gpu_segmented_attention.rs`, needs a CUDA device), the kernel
//! emulator (`tests/emulated_segmented_attention.rs`, runs anywhere) and the CPU kernels
//! (`tests/cpu_segmented_attention.rs`). Each sweep draws random problems, runs the backend, and
//! checks it against the f64 oracle on the same rounded inputs: relative L2 and LSE error within
//! the backend's [`Backend::tolerance`] (the GPU kernels' 1e-2 and 1e-3 unless it says
//! otherwise), `-inf` rows exactly, no NaN (outputs start as NaN).
#![allow(dead_code)]

use ape_attn::cuda::{BatchCapacity, DType};
use ape_attn::reference::{self, rel_l2};
use ape_attn::{
    ApeParams, ApeVariant, AttentionDims, RopeConfig, RopeLayout, RopeShift, SegmentRole,
};

use crate::common::{seeded, Seeded, LLAMA31};

/// What runs the kernels.
pub trait Backend {
    /// The kernels' `(out [n_rows, n_heads, d], lse [n_rows, n_heads])` on `case`, as f32; the
    /// outputs must start as NaN so that an unwritten value shows.
    fn run(&self, case: &Case) -> (Vec<f32>, Vec<f32>);
    /// Keys `[len, n_kv_heads, d]` rotated by `shift` and rounded to `dtype`, as this backend's
    /// separate RoPE shift computes them (Block-Attention without the fused read). The default
    /// is the oracle's rotation (f64 angles, rounded to f32) rounded to `dtype`: what a backend
    /// that rotates in f32 and rounds once computes, up to the f32 rounding of the rotation.
    fn shift_keys(
        &self,
        k: &[f32],
        shape: [usize; 3],
        dtype: DType,
        shift: &RopeShift,
    ) -> Vec<f32> {
        let mut k = k.to_vec();
        reference::rope::shift(&mut k, shape[0], shape[1], &shift.rope, shift.delta).unwrap();
        round(k, dtype)
    }
    /// Run the reduced sweep.
    fn quick(&self) -> bool;
    /// The sequences of `cases` (same dims and dtype; each with its own rows, segments and APE
    /// parameters) in one batched launch with `splits`: the packed `(out, lse)`, sequence after
    /// sequence, outputs starting as NaN.
    fn run_batch(&self, cases: &[Case], splits: Option<usize>) -> (Vec<f32>, Vec<f32>);
    /// The same sequences prepared and launched by a capturable batch of `capacity` (fixed grids
    /// and buffers; a backend may reuse one batch across calls): `(out, lse)` of all
    /// `capacity.rows` rows, starting as NaN.
    fn run_capturable(
        &self,
        cases: &[Case],
        capacity: &BatchCapacity,
        splits: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>);
    /// The bars the sweeps hold this backend to: relative L2 of the output and largest absolute
    /// LSE error against the oracle. The GPU kernels' (16-bit inputs, f32 accumulation in tiles
    /// of the tensor cores) by default.
    fn tolerance(&self) -> (f64, f32) {
        (1e-2, 1e-3)
    }
}

#[derive(Clone)]
pub struct CaseSegment {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub len: usize,
    pub pos_offset: usize,
    pub role: SegmentRole,
    pub rope_shift: Option<RopeShift>,
}

#[derive(Clone)]
pub struct Case {
    pub dims: AttentionDims,
    pub dtype: DType,
    pub n_rows: usize,
    pub q_pos: usize,
    pub q: Vec<f32>,
    pub segments: Vec<CaseSegment>,
    pub ape: ApeParams,
    pub splits: Option<usize>,
    /// The kernel's tile shape, forced (None: the launcher's choice).
    pub tile: Option<ape_attn::cuda::segmented_attention::TileShape>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lens: Vec<(usize, char, Option<i64>)> = self
            .segments
            .iter()
            .map(|s| {
                (
                    s.len,
                    if s.role == SegmentRole::Context {
                        'C'
                    } else {
                        'O'
                    },
                    s.rope_shift.map(|r| r.delta),
                )
            })
            .collect();
        write!(
            f,
            "{:?} {:?} rows={} q_pos={} T={} S={} {:?} splits={:?} tile={:?} segments={:?}",
            self.dtype,
            self.dims,
            self.n_rows,
            self.q_pos,
            self.ape.temperature(),
            self.ape.scale(),
            self.ape.variant(),
            self.splits,
            self.tile,
            lens
        )
    }
}

pub fn round(x: Vec<f32>, dtype: DType) -> Vec<f32> {
    x.into_iter().map(|v| dtype.round(v)).collect()
}

/// An APE-shaped problem: a causal prefix at 0, `ctx_lens` contexts after it (position reuse),
/// optional empty segments, and the question's own keys (causal) at the question's positions.
#[allow(clippy::too_many_arguments)]
pub fn make_case(
    r: &mut Seeded,
    dims: AttentionDims,
    dtype: DType,
    prefix: usize,
    ctx_lens: &[usize],
    n_rows: usize,
    ape: ApeParams,
    splits: Option<usize>,
) -> Case {
    let row = dims.n_kv_heads * dims.head_dim;
    let seg = |r: &mut Seeded, len: usize, pos: usize, role| CaseSegment {
        k: round(r.uniform(len * row, 2.0), dtype),
        v: round(r.uniform(len * row, 1.0), dtype),
        len,
        pos_offset: pos,
        role,
        rope_shift: None,
    };
    let mut segments = vec![seg(r, prefix, 0, SegmentRole::Causal)];
    for &len in ctx_lens {
        segments.push(seg(r, len, prefix, SegmentRole::Context));
    }
    if r.coin() {
        segments.insert(
            r.range(0, segments.len()),
            seg(r, 0, 3, SegmentRole::Context),
        );
    }
    let q_pos = prefix + ctx_lens.iter().copied().max().unwrap_or(0);
    segments.push(seg(r, n_rows, q_pos, SegmentRole::Causal));
    Case {
        dims,
        dtype,
        n_rows,
        q_pos,
        q: round(r.uniform(n_rows * dims.n_heads * dims.head_dim, 2.0), dtype),
        segments,
        ape,
        splits,
        tile: None,
    }
}

/// Runs the backend and the oracle (on at most `max_rows` sampled rows); returns (rel L2, max LSE
/// error) and asserts that -inf rows match and no NaN appears.
pub fn check(b: &dyn Backend, r: &mut Seeded, case: &Case, max_rows: usize) -> (f64, f32) {
    check_against(b, r, case, case, max_rows)
}

/// [`check`] with the backend on `case` and the oracle on `oracle` (same rows, heads and query).
pub fn check_against(
    b: &dyn Backend,
    r: &mut Seeded,
    case: &Case,
    oracle: &Case,
    max_rows: usize,
) -> (f64, f32) {
    let (got_out, got_lse) = b.run(case);
    compare(r, case, oracle, &got_out, &got_lse, max_rows)
}

/// Compares a backend's `(got_out, got_lse)` for `case` with the oracle on `oracle` (at most
/// `max_rows` sampled rows); returns (rel L2, max LSE error) and asserts that -inf rows match and no
/// NaN appears.
pub fn compare(
    r: &mut Seeded,
    case: &Case,
    oracle: &Case,
    got_out: &[f32],
    got_lse: &[f32],
    max_rows: usize,
) -> (f64, f32) {
    let d = case.dims.head_dim;
    let h = case.dims.n_heads;
    if case.n_rows == 0 {
        assert!(got_out.is_empty() && got_lse.is_empty());
        return (0.0, 0.0);
    }
    assert!(
        got_out.iter().all(|x| !x.is_nan()),
        "NaN in output: {case:?}"
    );
    assert!(got_lse.iter().all(|x| !x.is_nan()), "NaN in lse: {case:?}");

    let rows: Vec<usize> = if case.n_rows <= max_rows {
        (0..case.n_rows).collect()
    } else {
        let mut rows: Vec<usize> = (0..max_rows - 2)
            .map(|_| r.range(0, case.n_rows - 1))
            .collect();
        rows.extend([0, case.n_rows - 1]);
        rows
    };
    let host = oracle.reference_segments();
    let (mut got, mut want, mut lse_err) = (Vec::new(), Vec::new(), 0f32);
    for &row in &rows {
        let qr = &case.q[row * h * d..(row + 1) * h * d];
        let query = reference::Query {
            data: qr,
            n_rows: 1,
            pos_offset: case.q_pos + row,
        };
        let exp = reference::segmented_attention(&query, &host, &case.dims, &case.ape).unwrap();
        got.extend_from_slice(&got_out[row * h * d..(row + 1) * h * d]);
        want.extend_from_slice(&exp.out);
        for (i, &l) in exp.lse.iter().enumerate() {
            let g = got_lse[row * h + i];
            if l == f32::NEG_INFINITY {
                assert_eq!(g, l, "row {row} head {i} should see no key: {case:?}");
            } else {
                lse_err = lse_err.max((g - l).abs());
            }
        }
    }
    (rel_l2(&got, &want), lse_err)
}

pub fn assert_ok(case: &Case, err: (f64, f32)) {
    assert_below(case, err, (1e-2, 1e-3));
}

/// [`assert_ok`] with `b`'s [`Backend::tolerance`].
pub fn assert_within(b: &dyn Backend, case: &Case, err: (f64, f32)) {
    assert_below(case, err, b.tolerance());
}

fn assert_below(case: &Case, err: (f64, f32), (l2, lse): (f64, f32)) {
    println!("rel_l2 {:.2e} lse_err {:.2e} {case:?}", err.0, err.1);
    assert!(err.0 < l2, "relative L2 {} >= {l2:e}: {case:?}", err.0);
    assert!(err.1 < lse, "LSE error {} >= {lse:e}: {case:?}", err.1);
}

impl Case {
    /// The segments as the oracle takes them.
    pub fn reference_segments(&self) -> Vec<reference::Segment<'_>> {
        self.segments
            .iter()
            .map(|s| reference::Segment {
                k: &s.k,
                v: &s.v,
                len: s.len,
                pos_offset: s.pos_offset,
                role: s.role,
                rope_shift: s.rope_shift,
            })
            .collect()
    }

    /// The query as the oracle takes it.
    pub fn reference_query(&self) -> reference::Query<'_> {
        reference::Query {
            data: &self.q,
            n_rows: self.n_rows,
            pos_offset: self.q_pos,
        }
    }
}

pub fn lengths_and_split_modes(b: &dyn Backend) {
    let mut r = seeded("lengths_and_split_modes");
    let lens: &[usize] = if b.quick() {
        &[1, 65]
    } else {
        &[1, 7, 63, 64, 65, 1000, 4097]
    };
    for &len in lens {
        for splits in [Some(1), None, Some(3)] {
            for dtype in [DType::BF16, DType::F16] {
                let dims = AttentionDims::new(8, 2, 128).unwrap();
                let n_rows = r.pick(&[1, 7, 64, 65]).min(len.max(1));
                let case = make_case(
                    &mut r,
                    dims,
                    dtype,
                    5,
                    &[len, len / 2 + 1],
                    n_rows,
                    ApeParams::default(),
                    splits,
                );
                assert_within(b, &case, check(b, &mut r, &case, 48));
            }
        }
    }
}

/// An H100 SXM, as the kernel emulator plans for it by default.
pub fn h100() -> ape_attn::cuda::segmented_attention::AttentionOccupancy {
    ape_attn::cuda::segmented_attention::AttentionOccupancy::h100()
}

/// The splits of a case as the launcher plans them on a device with `occupancy`, for the wave of
/// the kernel it runs (thread blocks per query tile; 1 in whole mode).
pub fn planned_splits(
    case: &Case,
    occupancy: &ape_attn::cuda::segmented_attention::AttentionOccupancy,
) -> u32 {
    use ape_attn::cuda::segmented_attention::TileShape;
    let shifts = case
        .segments
        .iter()
        .any(|s| s.len > 0 && s.rope_shift.is_some_and(|r| r.delta != 0));
    let shape = case.tile.unwrap_or_else(|| {
        TileShape::of_launch(&[case.n_rows], &case.dims, case.splits, occupancy, shifts)
    });
    let wave = occupancy.of(shape).wave(shifts);
    let refs: Vec<ape_attn::cuda::segmented_attention::SegmentRef> = case
        .segments
        .iter()
        .map(|s| ape_attn::cuda::segmented_attention::SegmentRef {
            k: 0,
            v: 0,
            len: s.len,
            pos_offset: s.pos_offset,
            role: s.role,
            rope_shift: s.rope_shift,
        })
        .collect();
    ape_attn::cuda::segmented_attention::plan(case.n_rows, &case.dims, &refs, wave, case.splits)
        .expect("a valid case")
        .n_splits()
}

/// Eight splits of the keys (seven context and one causal, or the other way round) over decode
/// rows, a short question and a question of several query tiles: the last split of each query
/// tile combines eight partial states, with the APE correction, in the attention kernel.
pub fn many_splits(b: &dyn Backend) {
    let mut r = seeded("many_splits");
    for head_dim in [64, 128] {
        for (n_rows, ctx) in [(1, &[700, 300][..]), (9, &[600][..]), (40, &[500, 200][..])] {
            let dims = AttentionDims::new(8, 2, head_dim).unwrap();
            let ape = r.pick(&[ApeParams::default(), ApeParams::plain()]);
            let case = make_case(&mut r, dims, DType::BF16, 5, ctx, n_rows, ape, Some(8));
            assert_eq!(planned_splits(&case, &h100()), 8, "{case:?}");
            assert_within(b, &case, check(b, &mut r, &case, 64));
        }
    }
    // Only causal keys: eight causal splits, no context group.
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    let case = make_case(
        &mut r,
        dims,
        DType::F16,
        900,
        &[],
        3,
        ApeParams::default(),
        Some(8),
    );
    assert_eq!(planned_splits(&case, &h100()), 8, "{case:?}");
    assert_within(b, &case, check(b, &mut r, &case, 24));
}

/// Split launches one after another on the backend (on a device, over the same workspace and
/// split counters) give the same bits: each launch leaves the counters as it found them.
pub fn split_launches_in_a_row_give_the_same_bits(b: &dyn Backend) {
    let mut r = seeded("split_launches_in_a_row_give_the_same_bits");
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    for (n_rows, splits) in [(1, None), (1, Some(8)), (20, Some(3))] {
        let case = make_case(
            &mut r,
            dims,
            DType::BF16,
            7,
            &[400, 130],
            n_rows,
            ApeParams::default(),
            splits,
        );
        assert!(planned_splits(&case, &h100()) > 1, "{case:?}");
        let bits = |(out, lse): (Vec<f32>, Vec<f32>)| -> (Vec<u32>, Vec<u32>) {
            (
                out.into_iter().map(f32::to_bits).collect(),
                lse.into_iter().map(f32::to_bits).collect(),
            )
        };
        let first = bits(b.run(&case));
        for _ in 0..2 {
            assert!(
                bits(b.run(&case)) == first,
                "a later launch differs: {case:?}"
            );
        }
        assert_within(b, &case, check(b, &mut r, &case, 20));
    }
}

pub fn question_lengths_prefill(b: &dyn Backend) {
    let mut r = seeded("question_lengths_prefill");
    let rows: &[usize] = if b.quick() {
        &[65]
    } else {
        &[1, 7, 63, 64, 65, 1000, 4097]
    };
    for &n_rows in rows {
        for head_dim in [64, 128] {
            let dims = AttentionDims::new(12, 3, head_dim).unwrap();
            let case = make_case(
                &mut r,
                dims,
                DType::BF16,
                16,
                &[300, 129],
                n_rows,
                ApeParams::new(0.8, 0.9).unwrap(),
                None,
            );
            assert_within(b, &case, check(b, &mut r, &case, 32));
        }
    }
}

pub fn gqa_head_dims_and_ape_parameters(b: &dyn Backend) {
    let mut r = seeded("gqa_head_dims_and_ape_parameters");
    let params = [
        ApeParams::plain(),
        ApeParams::default(),
        ApeParams::new(0.5, 1.2).unwrap(),
        ApeParams::new(1.3, 0.6)
            .unwrap()
            .with_variant(ApeVariant::ScaledMass),
        ApeParams::new(0.9, 0.9)
            .unwrap()
            .with_variant(ApeVariant::ScaledMass),
    ];
    for group in [1, 3, 4, 8] {
        for head_dim in [64, 128] {
            for ape in params {
                if b.quick() && group != 4 {
                    continue;
                }
                let dims = AttentionDims::new(2 * group, 2, head_dim).unwrap();
                let splits = r.pick(&[Some(1), None, Some(5)]);
                let (prefix, n_rows) = (r.range(0, 40), r.range(1, 40));
                let case = make_case(
                    &mut r,
                    dims,
                    DType::BF16,
                    prefix,
                    &[200, 77, 130],
                    n_rows,
                    ape,
                    splits,
                );
                assert_within(b, &case, check(b, &mut r, &case, 40));
            }
        }
    }
    // A last query tile of 16 packed rows (18 rows of 8 heads), whose thread block splits each
    // key tile between its warps: the question's causal keys fall in more than one warp's share,
    // and each warp masks them by the rows' own positions.
    for head_dim in [64, 128] {
        for splits in [Some(5), None] {
            let dims = AttentionDims::new(16, 2, head_dim).unwrap();
            let case = make_case(
                &mut r,
                dims,
                DType::BF16,
                24,
                &[200, 77, 130],
                18,
                ApeParams::default(),
                splits,
            );
            assert_within(b, &case, check(b, &mut r, &case, 40));
        }
    }
}

pub fn many_segments_including_empty_ones(b: &dyn Backend) {
    let mut r = seeded("many_segments_including_empty_ones");
    let counts: &[usize] = if b.quick() {
        &[17]
    } else {
        &[1, 2, 17, 100, 256]
    };
    for &n in counts {
        let lens: Vec<usize> = (0..n).map(|_| r.pick(&[0, 1, 7, 33, 64, 90])).collect();
        for splits in [Some(1), None] {
            let dims = AttentionDims::new(32, 8, 128).unwrap();
            let n_rows = r.pick(&[1, 16, 64]);
            let case = make_case(
                &mut r,
                dims,
                DType::BF16,
                12,
                &lens,
                n_rows,
                ApeParams::default(),
                splits,
            );
            assert_within(b, &case, check(b, &mut r, &case, 16));
        }
    }
}

/// With T = S = 1, contexts and question split into pieces must give the same answer as one causal
/// sequence over the same keys: the sequential and Block-Attention paths.
pub fn plain_attention_and_edge_cases(b: &dyn Backend) {
    let mut r = seeded("plain_attention_and_edge_cases");
    let dims = AttentionDims::new(8, 8, 64).unwrap();
    // Only causal keys (sequential prefill of a whole prompt): rows at 0..n see keys 0..=row.
    for n_rows in [1, 63, 200] {
        let mut case = make_case(
            &mut r,
            dims,
            DType::F16,
            0,
            &[],
            n_rows,
            ApeParams::plain(),
            None,
        );
        case.segments.retain(|s| s.len > 0);
        assert_within(b, &case, check(b, &mut r, &case, 64));
    }
    // No keys at all: every row -inf, output 0.
    let mut case = make_case(
        &mut r,
        dims,
        DType::BF16,
        0,
        &[],
        3,
        ApeParams::default(),
        None,
    );
    case.segments.clear();
    check(b, &mut r, &case, 8);
    // Only contexts (no causal keys: the question's own keys not yet appended).
    let mut case = make_case(
        &mut r,
        dims,
        DType::BF16,
        0,
        &[100, 50],
        4,
        ApeParams::default(),
        Some(1),
    );
    case.segments.retain(|s| s.role == SegmentRole::Context);
    assert_within(b, &case, check(b, &mut r, &case, 8));
    // A question placed before its causal keys: fully masked rows.
    let mut case = make_case(
        &mut r,
        dims,
        DType::BF16,
        0,
        &[],
        4,
        ApeParams::default(),
        None,
    );
    case.q_pos = 0;
    for s in &mut case.segments {
        s.pos_offset += 10;
    }
    check(b, &mut r, &case, 8);
}

pub fn rope_configs(head_dim: usize) -> [RopeConfig; 3] {
    let neox = RopeConfig::new(head_dim, 500_000.0, RopeLayout::Neox).unwrap();
    let llama3 = neox.with_llama3_scaling(LLAMA31).unwrap();
    let interleaved = RopeConfig::new(head_dim, 10_000.0, RopeLayout::Interleaved).unwrap();
    [neox, llama3, interleaved]
}

/// A Block-Attention problem: blocks cached from position 0 and read at their real offsets through
/// a RoPE shift (the first block needs none), then the question's own keys after all blocks.
#[allow(clippy::too_many_arguments)]
pub fn block_attention_case(
    r: &mut Seeded,
    dims: AttentionDims,
    dtype: DType,
    rope: RopeConfig,
    block_lens: &[usize],
    n_rows: usize,
    ape: ApeParams,
    splits: Option<usize>,
) -> Case {
    let row = dims.n_kv_heads * dims.head_dim;
    let mut segments = Vec::new();
    let mut offset = 0usize;
    for &len in block_lens {
        segments.push(CaseSegment {
            k: round(r.uniform(len * row, 2.0), dtype),
            v: round(r.uniform(len * row, 1.0), dtype),
            len,
            pos_offset: offset,
            role: SegmentRole::Context,
            rope_shift: Some(RopeShift {
                rope,
                delta: offset as i64,
            }),
        });
        offset += len;
    }
    segments.push(CaseSegment {
        k: round(r.uniform(n_rows * row, 2.0), dtype),
        v: round(r.uniform(n_rows * row, 1.0), dtype),
        len: n_rows,
        pos_offset: offset,
        role: SegmentRole::Causal,
        rope_shift: None,
    });
    Case {
        dims,
        dtype,
        n_rows,
        q_pos: offset,
        q: round(r.uniform(n_rows * dims.n_heads * dims.head_dim, 2.0), dtype),
        segments,
        ape,
        splits,
        tile: None,
    }
}

/// Segments read through a RoPE shift (the kernel rotates the query rows, split hi + lo) against
/// the oracle, which rotates the keys in f64: both layouts, Llama 3 scaling, head dims 64 and 128,
/// bf16 and f16, whole and split walks, one block to 150, offsets up to 200K positions, shifts of
/// 0 and negative ones, and APE parameters on shifted contexts.
pub fn rope_shifted_segments(b: &dyn Backend) {
    let mut r = seeded("rope_shifted_segments");
    for head_dim in [64, 128] {
        for rope in rope_configs(head_dim) {
            for dtype in [DType::BF16, DType::F16] {
                for splits in [Some(1), None, Some(3)] {
                    if b.quick() && (dtype == DType::F16 || splits == Some(3)) {
                        continue;
                    }
                    let dims = AttentionDims::new(8, 2, head_dim).unwrap();
                    let lens: Vec<usize> = (0..r.pick(&[1, 2, 5, 16]))
                        .map(|_| r.pick(&[1, 7, 63, 64, 65, 300]))
                        .collect();
                    let n_rows = r.pick(&[1, 7, 64, 65]);
                    let case = block_attention_case(
                        &mut r,
                        dims,
                        dtype,
                        rope,
                        &lens,
                        n_rows,
                        ApeParams::plain(),
                        splits,
                    );
                    assert_within(b, &case, check(b, &mut r, &case, 32));
                }
            }
        }
    }
    // Many blocks, APE on shifted contexts, a causal prefix without a shift, far offsets, and
    // shifts of 0 and negative ones (one row of the table each, deduplicated).
    let dims = AttentionDims::new(32, 8, 128).unwrap();
    let rope = rope_configs(128)[1];
    let n_blocks = if b.quick() { 20 } else { 150 };
    let lens: Vec<usize> = (0..n_blocks).map(|_| r.pick(&[0, 1, 33, 64, 90])).collect();
    for (ape, n_rows) in [(ApeParams::plain(), 16), (ApeParams::default(), 1)] {
        let mut case =
            block_attention_case(&mut r, dims, DType::BF16, rope, &lens, n_rows, ape, None);
        let far = 200_000 - case.q_pos;
        for (i, s) in case.segments.iter_mut().enumerate() {
            s.pos_offset += far;
            if let Some(shift) = &mut s.rope_shift {
                shift.delta = match i % 4 {
                    0 => 0,
                    1 => -(shift.delta + 1),
                    _ => shift.delta + far as i64,
                };
            }
        }
        case.q_pos += far;
        case.segments[0].role = SegmentRole::Causal;
        case.segments[0].pos_offset = 0;
        assert_within(b, &case, check(b, &mut r, &case, 16));
    }
}

/// The fused shift against the separate one (the backend's RoPE shift of copies of the keys, then
/// plain attention), both judged by the oracle on the exact rotation of the same bf16 keys. Rounding
/// shifted keys to bf16 can miss the 1e-3 LSE bar on short blocks; the fused kernel's hi + lo split
/// of the rotated query rows exists for that, so the fused path must meet the bar and be no worse.
pub fn fused_shift_against_separate_shift(b: &dyn Backend) {
    let mut r = seeded("fused_shift_against_separate_shift");
    let dims = AttentionDims::new(32, 8, 128).unwrap();
    let rope = rope_configs(128)[0];
    let long = if b.quick() { 128 } else { 512 };
    for lens in [vec![1; 8], vec![long; 16]] {
        let case = block_attention_case(
            &mut r,
            dims,
            DType::BF16,
            rope,
            &lens,
            64,
            ApeParams::plain(),
            None,
        );
        let fused = check(b, &mut r, &case, 64);
        let shape = |s: &CaseSegment| [s.len, dims.n_kv_heads, dims.head_dim];
        let separate = Case {
            segments: case
                .segments
                .iter()
                .map(|s| {
                    let k = match s.rope_shift {
                        Some(shift) => b.shift_keys(&s.k, shape(s), DType::BF16, &shift),
                        None => s.k.clone(),
                    };
                    CaseSegment {
                        k,
                        v: s.v.clone(),
                        len: s.len,
                        pos_offset: s.pos_offset,
                        role: s.role,
                        rope_shift: None,
                    }
                })
                .collect(),
            q: case.q.clone(),
            ..case
        };
        let sep = check_against(b, &mut r, &separate, &case, 64);
        println!(
            "{} blocks of {}: vs the exact rotation, fused rel_l2 {:.2e} lse {:.2e}, separate \
             rel_l2 {:.2e} lse {:.2e}",
            lens.len(),
            lens[0],
            fused.0,
            fused.1,
            sep.0,
            sep.1
        );
        assert_within(b, &case, fused);
        assert!(
            fused.1 <= sep.1,
            "fused LSE error {} above the separate shift's {}: {case:?}",
            fused.1,
            sep.1
        );
    }
}

/// The APE parameters the batch sweeps draw each sequence's from: APE's defaults, plain attention
/// (sequential and Block-Attention requests) and the scaled-mass variant at other values.
fn batch_apes() -> [ApeParams; 3] {
    [
        ApeParams::default(),
        ApeParams::plain(),
        ApeParams::new(0.7, 1.3)
            .unwrap()
            .with_variant(ApeVariant::ScaledMass),
    ]
}

/// Batched launches: sequences with their own rows (decode, prefill, none), segments, positions,
/// APE parameters and RoPE shifts in one launch; each sequence's rows must be what the oracle gives
/// it alone, and with a forced split count (every sequence then has the plan it has alone) the very
/// bits of its own launch.
pub fn batches_of_sequences(b: &dyn Backend) {
    let mut r = seeded("batches_of_sequences");
    let apes = batch_apes();
    for head_dim in [64, 128] {
        let dims = AttentionDims::new(8, 2, head_dim).unwrap();
        let dtype = r.pick(&[DType::BF16, DType::F16]);
        let rope = rope_configs(head_dim)[r.range(0, 2)];
        let rows: &[usize] = if b.quick() {
            &[1, 0, 65, 1]
        } else {
            &[1, 7, 0, 65, 1, 300, 1]
        };
        let cases: Vec<Case> = rows
            .iter()
            .map(|&n_rows| {
                let ape = r.pick(&apes);
                let lens: Vec<usize> = (0..r.range(1, 4)).map(|_| r.range(0, 400)).collect();
                let prefix = r.range(0, 20);
                if r.coin() {
                    block_attention_case(&mut r, dims, dtype, rope, &lens, n_rows, ape, None)
                } else {
                    make_case(&mut r, dims, dtype, prefix, &lens, n_rows, ape, None)
                }
            })
            .collect();
        for splits in [None, Some(1), Some(3)] {
            let (out, lse) = b.run_batch(&cases, splits);
            let (mut row0, row) = (0, dims.n_heads * head_dim);
            for case in &cases {
                let n = case.n_rows;
                let got_out = &out[row0 * row..(row0 + n) * row];
                let got_lse = &lse[row0 * dims.n_heads..(row0 + n) * dims.n_heads];
                let err = compare(&mut r, case, case, got_out, got_lse, 24);
                assert_within(b, case, err);
                if splits.is_some() && n > 0 {
                    let alone = Case {
                        splits,
                        ..case.clone()
                    };
                    let (o, l) = b.run(&alone);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert!(
                        bits(&o) == bits(got_out) && bits(&l) == bits(got_lse),
                        "batched rows differ from the sequence's own launch: {case:?}"
                    );
                }
                row0 += n;
            }
            assert_eq!(row0 * row, out.len());
        }
    }
    // A decode step of many sequences: enough query tiles to fill a wave (every sequence runs
    // whole), then few enough that the sequences split their keys, with one of two key tiles
    // (too short to split) among them: one launch with both modes.
    let dims = AttentionDims::new(8, 8, 64).unwrap();
    // 34 sequences x 8 KV heads: more thread blocks than one wave of an H100 (264).
    let many = if b.quick() { 34 } else { 70 };
    for n_seqs in [many, 3] {
        let mut cases: Vec<Case> = (0..n_seqs)
            .map(|_| {
                let lens = [r.range(1, 300), r.range(0, 200)];
                let ape = r.pick(&apes);
                make_case(&mut r, dims, DType::BF16, 4, &lens, 1, ape, None)
            })
            .collect();
        if n_seqs == 3 {
            let len = r.range(1, 64);
            let mut short = make_case(&mut r, dims, DType::BF16, 0, &[len], 1, apes[0], None);
            short.segments.retain(|s| s.len > 0);
            cases.insert(1, short);
        }
        let (out, lse) = b.run_batch(&cases, None);
        let row = dims.n_heads * dims.head_dim;
        for (i, case) in cases.iter().enumerate() {
            let got_out = &out[i * row..(i + 1) * row];
            let got_lse = &lse[i * dims.n_heads..(i + 1) * dims.n_heads];
            assert_within(b, case, compare(&mut r, case, case, got_out, got_lse, 1));
        }
    }
    // A sequence without rows beside one that runs whole, splits forced: nothing to combine.
    let dims = AttentionDims::new(8, 2, 64).unwrap();
    let mut idle = make_case(&mut r, dims, DType::BF16, 0, &[200], 0, apes[0], None);
    idle.segments.retain(|s| s.len > 0);
    let mut one = make_case(&mut r, dims, DType::BF16, 0, &[], 1, apes[1], None);
    one.segments.retain(|s| s.len > 0);
    let (out, lse) = b.run_batch(&[one.clone(), idle], Some(2));
    assert_within(b, &one, compare(&mut r, &one, &one, &out, &lse, 1));
}

/// The capacity that `cases` fill exactly, plus `extra` sequences, rows and segments.
pub fn capacity_of(cases: &[Case], extra: [usize; 3]) -> BatchCapacity {
    BatchCapacity {
        sequences: cases.len() + extra[0],
        rows: cases.iter().map(|c| c.n_rows).sum::<usize>() + extra[1],
        segments: cases.iter().map(|c| c.segments.len()).sum::<usize>() + extra[2],
        // Bounded by the longest sequence: a batch of decode-sized sequences runs the decode
        // tile's kernel, as the batched launcher does.
        rows_per_sequence: cases.iter().map(|c| c.n_rows).max().unwrap_or(0).max(1),
    }
}

/// Capturable batches (fixed grids and buffers, for CUDA graphs): for each batch and capacity
/// (exactly full, and with room to spare), the same bits as the batched launcher with the same
/// options on every sequence's rows, and the rows past them untouched (still NaN). The batches:
/// mixed prefill, decode and Block-Attention sequences with an idle one; decode steps that
/// split their keys, with surplus thread blocks; one sequence alone.
pub fn capturable_batches(b: &dyn Backend) {
    let mut r = seeded("capturable_batches");
    let apes = batch_apes();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let mut batches: Vec<Vec<Case>> = Vec::new();
    for head_dim in [64, 128] {
        let dims = AttentionDims::new(8, 2, head_dim).unwrap();
        let dtype = r.pick(&[DType::BF16, DType::F16]);
        let rope = rope_configs(head_dim)[r.range(0, 2)];
        let rows: &[usize] = if b.quick() {
            &[1, 0, 65]
        } else {
            &[1, 7, 0, 65, 1]
        };
        batches.push(
            rows.iter()
                .map(|&n_rows| {
                    let ape = r.pick(&apes);
                    let lens: Vec<usize> = (0..r.range(1, 3)).map(|_| r.range(0, 300)).collect();
                    let prefix = r.range(0, 20);
                    if r.coin() {
                        block_attention_case(&mut r, dims, dtype, rope, &lens, n_rows, ape, None)
                    } else {
                        make_case(&mut r, dims, dtype, prefix, &lens, n_rows, ape, None)
                    }
                })
                .collect(),
        );
    }
    // Decode: a few one-row sequences over long contexts split their keys.
    let dims = AttentionDims::new(8, 8, 64).unwrap();
    batches.push(
        (0..3)
            .map(|_| {
                let lens = [r.range(200, 700), r.range(0, 200)];
                let ape = r.pick(&apes);
                make_case(&mut r, dims, DType::BF16, 4, &lens, 1, ape, None)
            })
            .collect(),
    );
    // One sequence alone (its parameters go through the arrays all the same).
    let dims = AttentionDims::new(4, 1, 128).unwrap();
    let (len, n_rows) = (r.range(100, 500), r.range(1, 20));
    let alone = make_case(&mut r, dims, DType::BF16, 3, &[len], n_rows, apes[0], None);
    batches.push(vec![alone]);

    for cases in &batches {
        let (dims, rows) = (cases[0].dims, cases.iter().map(|c| c.n_rows).sum::<usize>());
        let (h, d) = (dims.n_heads, dims.head_dim);
        for splits in [None, Some(1), Some(3)] {
            let (want_out, want_lse) = b.run_batch(cases, splits);
            for extra in [[0, 0, 0], [r.range(1, 5), r.range(1, 90), r.range(1, 9)]] {
                let capacity = capacity_of(cases, extra);
                let (out, lse) = b.run_capturable(cases, &capacity, splits);
                assert_eq!(out.len(), capacity.rows * h * d);
                assert_eq!(lse.len(), capacity.rows * h);
                assert!(
                    bits(&out[..rows * h * d]) == bits(&want_out)
                        && bits(&lse[..rows * h]) == bits(&want_lse),
                    "capturable rows differ from the batched launch: {capacity:?} \
                     splits={splits:?} {cases:?}"
                );
                assert!(
                    out[rows * h * d..].iter().all(|x| x.is_nan())
                        && lse[rows * h..].iter().all(|x| x.is_nan()),
                    "rows past the sequences were written: {capacity:?} {cases:?}"
                );
            }
            // And the oracle, on the sequences' rows (the batched launcher's own sweep covers
            // more; this catches a capturable launch and a batched one that agree on a mistake).
            let mut row0 = 0;
            for case in cases {
                let n = case.n_rows;
                let (o, l) = (
                    &want_out[row0 * h * d..(row0 + n) * h * d],
                    &want_lse[row0 * h..(row0 + n) * h],
                );
                assert_within(b, case, compare(&mut r, case, case, o, l, 8));
                row0 += n;
            }
        }
    }
}
