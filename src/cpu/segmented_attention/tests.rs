//! The CPU kernel's own cases against the f64 oracle (computed independently, keys rotated on a
//! copy): the SIMD path against the scalar one, every plan (inline, blocks of rows, splits of the
//! keys), head dims the SIMD path cannot take, segment counts, GQA groups, long decode rows, RoPE
//! shifts, and bad input. The shared sweeps are in `tests/cpu_segmented_attention.rs`.

use super::*;
use crate::params::{Llama3RopeScaling, RopeConfig, RopeLayout, RopeShift};
use crate::reference::{self, rel_l2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `(k, v, len, pos_offset, role, shift)`.
type OwnedSegment = (
    Vec<f32>,
    Vec<f32>,
    usize,
    usize,
    SegmentRole,
    Option<RopeShift>,
);

/// A problem that owns its buffers.
struct Problem {
    dims: AttentionDims,
    q: Vec<f32>,
    n_rows: usize,
    q_pos: usize,
    segs: Vec<OwnedSegment>,
    ape: ApeParams,
}

impl Problem {
    /// A prefix at 0, `ctx` contexts after it, the rows' own causal keys after the longest.
    fn new(
        r: &mut StdRng,
        dims: AttentionDims,
        prefix: usize,
        ctx: &[usize],
        n_rows: usize,
    ) -> Self {
        let row = dims.n_kv_heads * dims.head_dim;
        let mut seg = |len: usize, pos: usize, role| {
            let k = (0..len * row).map(|_| r.gen_range(-2.0..2.0)).collect();
            let v = (0..len * row).map(|_| r.gen_range(-1.0..1.0)).collect();
            (k, v, len, pos, role, None)
        };
        let mut segs = vec![seg(prefix, 0, SegmentRole::Causal)];
        for &len in ctx {
            segs.push(seg(len, prefix, SegmentRole::Context));
        }
        let q_pos = prefix + ctx.iter().copied().max().unwrap_or(0);
        segs.push(seg(n_rows, q_pos, SegmentRole::Causal));
        let q = (0..n_rows * dims.n_heads * dims.head_dim)
            .map(|_| r.gen_range(-2.0..2.0))
            .collect();
        Self {
            dims,
            q,
            n_rows,
            q_pos,
            segs,
            ape: ApeParams::default(),
        }
    }

    fn query(&self) -> Query<'_> {
        Query {
            data: &self.q,
            n_rows: self.n_rows,
            pos_offset: self.q_pos,
        }
    }

    fn segments(&self) -> Vec<Segment<'_>> {
        self.segs
            .iter()
            .map(|(k, v, len, pos_offset, role, rope_shift)| Segment {
                k,
                v,
                len: *len,
                pos_offset: *pos_offset,
                role: *role,
                rope_shift: *rope_shift,
            })
            .collect()
    }

    fn keys(&self) -> usize {
        self.segs.iter().map(|s| s.2).sum()
    }

    /// The kernel by `isa` and `plan` (`None`: its own), outputs starting as NaN.
    fn run(&self, isa: Isa, plan: Option<Plan>) -> (Vec<f32>, Vec<f32>) {
        let (segments, query) = (self.segments(), self.query());
        validate(&query, &segments, &self.dims).unwrap();
        let plan = plan.unwrap_or_else(|| Plan::new(self.n_rows, self.keys(), &self.dims));
        let h = self.dims.n_heads;
        let mut out = vec![f32::NAN; self.n_rows * h * self.dims.head_dim];
        let mut lse = vec![f32::NAN; self.n_rows * h];
        super::run(
            isa,
            &plan,
            &query,
            &segments,
            &self.dims,
            &self.ape,
            &mut out,
            Some(&mut lse),
        );
        (out, lse)
    }

    /// Asserts `(out, lse)` within 1e-5 of the oracle (relative L2; LSE relative where above 1),
    /// `-inf` rows exact with output 0, no NaN; returns (rel L2, LSE error).
    fn check(&self, (out, lse): &(Vec<f32>, Vec<f32>), what: &str) -> (f64, f64) {
        let want =
            reference::segmented_attention(&self.query(), &self.segments(), &self.dims, &self.ape)
                .unwrap();
        assert!(out.iter().chain(lse).all(|x| !x.is_nan()), "NaN: {what}");
        let mut lse_err = 0f64;
        let d = self.dims.head_dim;
        for (i, (&g, &w)) in lse.iter().zip(&want.lse).enumerate() {
            if w == f32::NEG_INFINITY {
                assert_eq!(g, w, "{what}: row/head {i} sees no key");
                assert!(out[i * d..(i + 1) * d].iter().all(|&x| x == 0.0), "{what}");
            } else {
                lse_err = lse_err.max((g - w).abs() as f64 / (w.abs() as f64).max(1.0));
            }
        }
        let l2 = rel_l2(out, &want.out);
        assert!(l2 < 1e-5, "{what}: relative L2 {l2:e}");
        assert!(lse_err < 1e-5, "{what}: LSE error {lse_err:e}");
        (l2, lse_err)
    }
}

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Every plan shape worth trying on `p`.
fn plans(p: &Problem) -> Vec<Plan> {
    let auto = Plan::new(p.n_rows, p.keys(), &p.dims);
    let mut plans = vec![auto];
    for (block_rows, splits, per_head, parallel) in [
        (auto.block_rows, 1, false, false),
        (1, 1, false, true),
        (3, 1, true, true),
        (auto.block_rows, 2, true, false),
        (auto.block_rows, 7, true, true),
    ] {
        plans.push(Plan {
            block_rows,
            splits,
            per_head,
            parallel,
        });
    }
    plans
}

fn simd(dims: &AttentionDims) -> Isa {
    Isa::detect(dims)
}

#[test]
fn simd_and_scalar_agree_with_the_oracle_and_each_other() {
    let mut r = rng(1);
    for (h, kv, d) in [(9, 3, 64), (32, 8, 128), (4, 4, 64), (8, 1, 128)] {
        let dims = AttentionDims::new(h, kv, d).unwrap();
        for n_rows in [1, 5, 40] {
            let mut p = Problem::new(&mut r, dims, 13, &[150, 97], n_rows);
            p.ape = ApeParams::new(0.7, 1.2).unwrap();
            let fast = p.run(simd(&dims), None);
            let slow = p.run(Isa::Scalar, None);
            p.check(&fast, "simd");
            p.check(&slow, "scalar");
            let diff = rel_l2(&fast.0, &slow.0);
            assert!(diff < 2e-6, "simd vs scalar {diff:e}");
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        let dims = AttentionDims::new(2, 1, 64).unwrap();
        assert!(
            matches!(Isa::detect(&dims), Isa::Avx2(_)),
            "AVX2 not chosen"
        );
    }
}

#[test]
fn every_plan_agrees_with_the_oracle() {
    let mut r = rng(2);
    for (h, kv, d, n_rows) in [
        (9, 3, 64, 1),
        (9, 3, 64, 33),
        (32, 8, 128, 7),
        (6, 2, 64, 70),
    ] {
        let dims = AttentionDims::new(h, kv, d).unwrap();
        let mut p = Problem::new(&mut r, dims, 30, &[600, 1, 0, 257], n_rows);
        p.ape = ApeParams::new(1.3, 0.6)
            .unwrap()
            .with_variant(crate::ApeVariant::ScaledMass);
        for plan in plans(&p) {
            for isa in [simd(&dims), Isa::Scalar] {
                p.check(
                    &p.run(isa, Some(plan)),
                    &format!("{plan:?} {isa:?} rows={n_rows}"),
                );
            }
        }
    }
}

/// Head dims that are not multiples of 8 (the scalar path), and small and large ones.
#[test]
fn head_dims() {
    let mut r = rng(3);
    for d in [1, 2, 7, 12, 40, 64, 96, 128, 256] {
        let dims = AttentionDims::new(6, 2, d).unwrap();
        let p = Problem::new(&mut r, dims, 5, &[70, 33], 9);
        if d % 8 != 0 {
            assert!(matches!(Isa::detect(&dims), Isa::Scalar), "d = {d}");
        }
        for plan in plans(&p) {
            p.check(&p.run(simd(&dims), Some(plan)), &format!("d={d} {plan:?}"));
        }
    }
}

#[test]
fn segment_counts_with_empty_segments() {
    let mut r = rng(4);
    let dims = AttentionDims::new(8, 2, 64).unwrap();
    for n in [1, 2, 17, 100, 256] {
        let lens: Vec<usize> = (0..n)
            .map(|i| [0, 1, 7, 33, 64, 90][(i * 7 + n) % 6])
            .collect();
        for n_rows in [1, 16] {
            let mut p = Problem::new(&mut r, dims, 12, &lens, n_rows);
            // Some contexts become causal segments at later positions, some all masked.
            for (i, s) in p.segs.iter_mut().enumerate().skip(1) {
                if i % 5 == 0 {
                    s.4 = SegmentRole::Causal;
                    s.3 += i;
                }
            }
            for plan in plans(&p) {
                p.check(
                    &p.run(simd(&dims), Some(plan)),
                    &format!("{n} segments {plan:?}"),
                );
            }
        }
    }
    // No segments, only empty ones, and rows before every causal key: -inf rows, output 0.
    let mut p = Problem::new(&mut r, dims, 0, &[0, 0], 3);
    p.check(&p.run(simd(&dims), None), "empty segments");
    p.segs.clear();
    p.check(&p.run(simd(&dims), None), "no segments");
    let mut p = Problem::new(&mut r, dims, 9, &[], 4);
    p.q_pos = 0;
    for s in &mut p.segs {
        s.3 += 100;
    }
    p.check(&p.run(simd(&dims), None), "masked rows");
    // No rows.
    let p = Problem::new(&mut r, dims, 9, &[20], 0);
    let (out, lse) = p.run(simd(&dims), None);
    assert!(out.is_empty() && lse.is_empty());
}

#[test]
fn gqa_groups() {
    let mut r = rng(5);
    for group in 1..=8 {
        for d in [64, 128] {
            let dims = AttentionDims::new(2 * group, 2, d).unwrap();
            let p = Problem::new(&mut r, dims, 21, &[130, 64], 11);
            for plan in plans(&p) {
                for isa in [simd(&dims), Isa::Scalar] {
                    p.check(
                        &p.run(isa, Some(plan)),
                        &format!("group {group} d={d} {plan:?}"),
                    );
                }
            }
        }
    }
}

/// One decode row over 64K keys: split over the keys (the plan's choice when the pool has more
/// threads than the KV heads can keep busy), against the whole walk and the oracle.
#[test]
fn split_kv_decode_over_long_keys() {
    let mut r = rng(6);
    for (h, kv, d) in [(9, 3, 64), (32, 8, 128)] {
        let dims = AttentionDims::new(h, kv, d).unwrap();
        let mut p = Problem::new(&mut r, dims, 1000, &[40_000, 24_000], 1);
        p.ape = ApeParams::default();
        let auto = Plan::new(1, p.keys(), &dims);
        let threads = rayon::current_num_threads();
        if threads > 1 {
            // Tasks per KV head (and split) as soon as there are fewer blocks than threads, and
            // splits of the keys until there are enough tasks to go round.
            assert!(auto.per_head && auto.parallel, "{auto:?}");
            assert_eq!(auto.splits > 1, kv < 4 * threads, "{auto:?}");
        }
        let whole = p.run(
            simd(&dims),
            Some(Plan {
                splits: 1,
                per_head: false,
                parallel: false,
                ..auto
            }),
        );
        let (l2, lse) = p.check(&whole, "whole");
        println!("{dims:?} 65K keys, whole: rel_l2 {l2:.2e} lse {lse:.2e}");
        for splits in [2, 16, 61] {
            let plan = Plan {
                splits,
                per_head: true,
                parallel: true,
                ..auto
            };
            let split = p.run(simd(&dims), Some(plan));
            let (l2, lse) = p.check(&split, &format!("{splits} splits"));
            println!("{dims:?} 65K keys, {splits} splits: rel_l2 {l2:.2e} lse {lse:.2e}");
            // Both carry f32 rounding over 65K keys (a few 1e-6 of an output that averages out).
            assert!(rel_l2(&split.0, &whole.0) < 1e-5);
        }
    }
}

fn llama31() -> Llama3RopeScaling {
    Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192.0,
    }
}

/// Shifted segments (the query rotated back once per segment) against the oracle's rotation of
/// the keys: both layouts, Llama 3 scaling, far, zero and negative shifts, APE on top.
#[test]
fn rope_shifts() {
    let mut r = rng(7);
    for d in [64, 128] {
        let neox = RopeConfig::new(d, 500_000.0, RopeLayout::Neox).unwrap();
        for rope in [
            neox,
            neox.with_llama3_scaling(llama31()).unwrap(),
            RopeConfig::new(d, 10_000.0, RopeLayout::Interleaved).unwrap(),
        ] {
            let dims = AttentionDims::new(8, 2, d).unwrap();
            let mut p = Problem::new(&mut r, dims, 3, &[90, 1, 300, 64], 9);
            for (i, s) in p.segs.iter_mut().enumerate() {
                let delta = [0, 77, -5, 200_000, 123_456_789][i % 5];
                s.5 = Some(RopeShift { rope, delta });
            }
            for plan in plans(&p) {
                for isa in [simd(&dims), Isa::Scalar] {
                    p.check(
                        &p.run(isa, Some(plan)),
                        &format!("{rope:?} {plan:?} {isa:?}"),
                    );
                }
            }
        }
    }
}

/// Calls from inside the pool, many at once (the model runs layers and sequences in its own
/// tasks): each thread's buffers are taken and put back, never shared.
#[test]
fn concurrent_calls_from_the_pool() {
    let mut r = rng(8);
    let dims = AttentionDims::new(9, 3, 64).unwrap();
    let problems: Vec<Problem> = (0..12)
        .map(|i| Problem::new(&mut r, dims, 10 + i, &[500 + 37 * i, 100], 1 + 5 * (i % 3)))
        .collect();
    problems.par_iter().for_each(|p| {
        let got = segmented_attention(&p.query(), &p.segments(), &dims, &p.ape).unwrap();
        p.check(&(got.out, got.lse), "concurrent");
    });
}

#[test]
fn bad_inputs_are_errors() {
    let dims = AttentionDims::new(8, 2, 64).unwrap();
    let q = vec![0.0; 4 * 8 * 64];
    let k = vec![0.0; 10 * 2 * 64];
    let query = Query {
        data: &q,
        n_rows: 4,
        pos_offset: 0,
    };
    let seg = |len| Segment {
        k: &k,
        v: &k,
        len,
        pos_offset: 0,
        role: SegmentRole::Context,
        rope_shift: None,
    };
    let ape = ApeParams::default();
    let run = |query: &Query, segs: &[Segment], dims: &AttentionDims| {
        segmented_attention(query, segs, dims, &ape)
    };
    assert!(run(&query, &[seg(10)], &dims).is_ok());
    assert!(matches!(
        run(&query, &[seg(9)], &dims),
        Err(Error::Shape(_))
    ));
    let short = Query { n_rows: 3, ..query };
    assert!(matches!(
        run(&short, &[seg(10)], &dims),
        Err(Error::Shape(_))
    ));
    for bad in [
        AttentionDims {
            n_heads: 8,
            n_kv_heads: 3,
            head_dim: 64,
        },
        AttentionDims {
            n_heads: 8,
            n_kv_heads: 0,
            head_dim: 64,
        },
    ] {
        assert!(matches!(run(&query, &[], &bad), Err(Error::Gqa { .. })));
    }
    let zero = AttentionDims {
        head_dim: 0,
        ..dims
    };
    assert!(matches!(run(&query, &[], &zero), Err(Error::Shape(_))));
    let rope = RopeConfig::new(128, 10_000.0, RopeLayout::Neox).unwrap();
    let shifted = Segment {
        rope_shift: Some(RopeShift { rope, delta: 3 }),
        ..seg(10)
    };
    assert!(matches!(
        run(&query, &[shifted], &dims),
        Err(Error::Shape(_))
    ));
    // The caller's buffers must fit.
    let mut out = vec![0.0; 4 * 8 * 64];
    let mut lse = vec![0.0; 4 * 8];
    let into = |out: &mut [f32], lse: Option<&mut [f32]>| {
        segmented_attention_into(&query, &[seg(10)], &dims, &ape, out, lse)
    };
    assert!(into(&mut out, Some(&mut lse)).is_ok());
    assert!(into(&mut out, None).is_ok());
    assert!(matches!(into(&mut out[1..], None), Err(Error::Shape(_))));
    assert!(matches!(
        into(&mut out, Some(&mut lse[1..])),
        Err(Error::Shape(_))
    ));
    // Batches: the rows must add up to the query's, and errors name the sequence.
    let (good, bad) = ([seg(10)], [seg(9)]);
    let batch = |rows: [usize; 2], second: &[Segment]| {
        let seqs = [
            BatchSequence {
                n_rows: rows[0],
                pos_offset: 0,
                segments: &good,
                ape,
            },
            BatchSequence {
                n_rows: rows[1],
                pos_offset: 10,
                segments: second,
                ape: ApeParams::plain(),
            },
        ];
        segmented_attention_batch(&q, &seqs, &dims)
    };
    assert!(batch([1, 3], &good).is_ok());
    assert!(matches!(batch([1, 2], &good), Err(Error::Shape(_))));
    assert!(matches!(
        batch([usize::MAX, 3], &good),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(batch([1, 3], &bad),
        Err(Error::Shape(m)) if m.starts_with("sequence 1: segment 0")));
    let seqs = [BatchSequence {
        n_rows: 4,
        pos_offset: 0,
        segments: &good,
        ape,
    }];
    assert!(matches!(
        segmented_attention_batch_into(&q, &seqs, &dims, &mut out, Some(&mut lse[..3])),
        Err(Error::Shape(_))
    ));
    // Far positions do not overflow the mask.
    let far = Query {
        pos_offset: usize::MAX - 4,
        ..query
    };
    let causal = Segment {
        role: SegmentRole::Causal,
        pos_offset: usize::MAX - 9,
        ..seg(10)
    };
    let got = run(&far, &[causal], &dims).unwrap();
    assert!(got.lse.iter().all(|x| x.is_finite()));
}
