//! The CPU oracle's segmented attention, APE combination and merge, checked against identities
//! (docs/DESIGN.md §5.1) on fresh random inputs, and against hand-computed tiny cases.

mod common;

use ape_attn::reference::{
    ape, merge_states, rel_l2, rope, segmented_attention, segmented_attention::group_state,
    segmented_attention_batch, AttentionState, BatchSequence, Query, Segment,
};
use ape_attn::{
    ApeParams, ApeVariant, AttentionDims, Error, RopeConfig, RopeLayout, RopeShift, SegmentRole,
};
use common::{max_abs_diff, random_rope, seeded, Seeded};

/// Owned KV for one segment.
struct Owned {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    pos_offset: usize,
    role: SegmentRole,
    rope_shift: Option<RopeShift>,
}

impl Owned {
    fn view(&self) -> Segment<'_> {
        Segment {
            k: &self.k,
            v: &self.v,
            len: self.len,
            pos_offset: self.pos_offset,
            role: self.role,
            rope_shift: self.rope_shift,
        }
    }
}

fn random_dims(r: &mut Seeded) -> AttentionDims {
    let n_kv = r.range(1, 3);
    let group = r.pick(&[1, 3, 4]);
    let head_dim = r.pick(&[1, 4, 8, 16]);
    AttentionDims::new(n_kv * group, n_kv, head_dim).expect("valid dims")
}

fn random_segment(
    r: &mut Seeded,
    dims: &AttentionDims,
    len: usize,
    pos: usize,
    role: SegmentRole,
) -> Owned {
    let n = len * dims.n_kv_heads * dims.head_dim;
    Owned {
        k: r.uniform(n, 1.5),
        v: r.uniform(n, 1.0),
        len,
        pos_offset: pos,
        role,
        rope_shift: None,
    }
}

/// A random APE-shaped problem: a causal prefix at 0, contexts after it (position reuse), and the
/// question's own keys (causal) at the question's positions.
fn random_problem(r: &mut Seeded, dims: &AttentionDims) -> (Vec<f32>, usize, usize, Vec<Owned>) {
    let prefix = r.range(0, 5);
    let n_ctx = r.range(0, 4);
    let mut segs = vec![random_segment(r, dims, prefix, 0, SegmentRole::Causal)];
    let mut max_len = 0;
    for _ in 0..n_ctx {
        let len = r.range(0, 9);
        max_len = max_len.max(len);
        segs.push(random_segment(r, dims, len, prefix, SegmentRole::Context));
    }
    let q_pos = prefix + max_len;
    let rows = r.range(1, 5);
    segs.push(random_segment(r, dims, rows, q_pos, SegmentRole::Causal));
    let q = r.uniform(rows * dims.n_heads * dims.head_dim, 1.5);
    (q, rows, q_pos, segs)
}

/// Plain softmax attention written independently of the crate: every visible key of every
/// segment in one score list, scale 1/sqrt(d).
fn softmax_over_concatenation(
    q: &[f32],
    rows: usize,
    q_pos: usize,
    segs: &[Owned],
    dims: &AttentionDims,
) -> (Vec<f32>, Vec<f32>) {
    let d = dims.head_dim;
    let group = dims.n_heads / dims.n_kv_heads;
    let mut out = vec![0f32; rows * dims.n_heads * d];
    let mut lse = vec![0f32; rows * dims.n_heads];
    for r in 0..rows {
        for h in 0..dims.n_heads {
            let qh = &q[(r * dims.n_heads + h) * d..][..d];
            let mut scores = Vec::new();
            let mut vals = Vec::new();
            for s in segs {
                for t in 0..s.len {
                    if s.role == SegmentRole::Causal && s.pos_offset + t > q_pos + r {
                        continue;
                    }
                    let at = (t * dims.n_kv_heads + h / group) * d;
                    let dot: f64 = (0..d).map(|i| qh[i] as f64 * s.k[at + i] as f64).sum();
                    scores.push(dot / (d as f64).sqrt());
                    vals.push(&s.v[at..at + d]);
                }
            }
            let idx = r * dims.n_heads + h;
            if scores.is_empty() {
                lse[idx] = f32::NEG_INFINITY;
                continue;
            }
            let total: f64 = scores.iter().map(|x| x.exp()).sum();
            lse[idx] = total.ln() as f32;
            for (x, v) in scores.iter().zip(&vals) {
                for i in 0..d {
                    out[idx * d + i] += (x.exp() / total * v[i] as f64) as f32;
                }
            }
        }
    }
    (out, lse)
}

fn run(
    q: &[f32],
    rows: usize,
    q_pos: usize,
    segs: &[Owned],
    dims: &AttentionDims,
    ape: &ApeParams,
) -> ape_attn::reference::AttentionOutput {
    let views: Vec<Segment> = segs.iter().map(Owned::view).collect();
    let query = Query {
        data: q,
        n_rows: rows,
        pos_offset: q_pos,
    };
    segmented_attention(&query, &views, dims, ape).expect("valid problem")
}

#[test]
fn plain_params_equal_softmax_over_the_concatenation() {
    let mut r = seeded("plain_params_equal_softmax_over_the_concatenation");
    for _ in 0..200 {
        let dims = random_dims(&mut r);
        let (q, rows, q_pos, segs) = random_problem(&mut r, &dims);
        let got = run(&q, rows, q_pos, &segs, &dims, &ApeParams::plain());
        let (out, lse) = softmax_over_concatenation(&q, rows, q_pos, &segs, &dims);
        assert!(max_abs_diff(&got.out, &out) < 1e-5, "out differs");
        assert!(max_abs_diff(&got.lse, &lse) < 1e-5, "lse differs");
    }
}

/// A batch gives each sequence the rows it gets alone (the oracle the batched kernel is judged
/// by), with its own APE parameters; sequences of no rows give no rows; a bad sequence's error
/// names it.
#[test]
fn a_batch_is_its_sequences_run_alone() {
    let mut r = seeded("a_batch_is_its_sequences_run_alone");
    for _ in 0..50 {
        let dims = random_dims(&mut r);
        let n = r.range(1, 5);
        let problems: Vec<_> = (0..n).map(|_| random_problem(&mut r, &dims)).collect();
        let apes: Vec<ApeParams> = (0..n)
            .map(|_| ApeParams::new(r.range(5, 15) as f32 / 10.0, r.range(5, 15) as f32 / 10.0))
            .collect::<Result<_, _>>()
            .expect("valid T and S");
        let views: Vec<Vec<Segment>> = problems
            .iter()
            .map(|(_, _, _, segs)| segs.iter().map(Owned::view).collect())
            .collect();
        // An idle sequence (no rows) between the others.
        let mut seqs = vec![BatchSequence {
            n_rows: 0,
            pos_offset: 0,
            segments: &[],
            ape: ApeParams::plain(),
        }];
        let mut q = Vec::new();
        let (mut out, mut lse) = (Vec::new(), Vec::new());
        for (((pq, rows, q_pos, segs), v), ape) in problems.iter().zip(&views).zip(&apes) {
            seqs.push(BatchSequence {
                n_rows: *rows,
                pos_offset: *q_pos,
                segments: v,
                ape: *ape,
            });
            q.extend_from_slice(pq);
            let alone = run(pq, *rows, *q_pos, segs, &dims, ape);
            out.extend(alone.out);
            lse.extend(alone.lse);
        }
        let got = segmented_attention_batch(&q, &seqs, &dims).expect("valid batch");
        assert_eq!((got.out, got.lse), (out, lse));
    }
    // Errors: rows that do not add up; a bad segment in sequence 1.
    let dims = AttentionDims::new(2, 1, 4).unwrap();
    let kv = vec![0.0; 3 * 4];
    let seg = |len| Segment {
        k: &kv,
        v: &kv,
        len,
        pos_offset: 0,
        role: SegmentRole::Context,
        rope_shift: None,
    };
    let (good, bad) = ([seg(3)], [seg(2)]);
    let q = vec![0.0; 2 * 2 * 4];
    let batch = |rows: usize, second: &[Segment]| {
        let seq = |segments| BatchSequence {
            n_rows: 1,
            pos_offset: 0,
            segments,
            ape: ApeParams::default(),
        };
        let seqs = [
            seq(&good[..]),
            BatchSequence {
                n_rows: rows,
                ..seq(second)
            },
        ];
        segmented_attention_batch(&q, &seqs, &dims)
    };
    assert!(batch(1, &good).is_ok());
    assert!(matches!(batch(2, &good), Err(Error::Shape(_))));
    assert!(
        matches!(batch(1, &bad), Err(Error::Shape(m)) if m.starts_with("sequence 1: segment 0"))
    );
}

/// APE written from its "unnormalised weight" form: the context group carries weight
/// `(sum_C exp(s/T))^(S*T)` (released) or `S * (sum_C exp(s/T))^T` (scaled mass) against
/// `sum_O exp(s)`, and within each group the weights are the group's own softmax.
#[test]
fn ape_equals_its_unnormalised_weight_form() {
    let mut r = seeded("ape_equals_its_unnormalised_weight_form");
    for _ in 0..200 {
        let dims = random_dims(&mut r);
        let (q, rows, q_pos, segs) = random_problem(&mut r, &dims);
        let (t, s) = (r.f32_in(0.5, 1.5), r.f32_in(0.5, 1.5));
        let variant = if r.coin() {
            ApeVariant::Released
        } else {
            ApeVariant::ScaledMass
        };
        let params = ApeParams::new(t, s).expect("valid").with_variant(variant);
        let got = run(&q, rows, q_pos, &segs, &dims, &params);

        let d = dims.head_dim;
        let (t, s) = (t as f64, s as f64);
        for row in 0..rows {
            for h in 0..dims.n_heads {
                let qh = &q[(row * dims.n_heads + h) * d..][..d];
                // (mass, weighted value sum) per group, from raw logits s_j = q.k_j / sqrt(d).
                let mut ctx = (0.0f64, vec![0.0f64; d]);
                let mut cau = (0.0f64, vec![0.0f64; d]);
                for seg in &segs {
                    for j in 0..seg.len {
                        let at = (j * dims.n_kv_heads + dims.kv_head(h)) * d;
                        let logit = (0..d)
                            .map(|i| qh[i] as f64 * seg.k[at + i] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt();
                        let (acc, e) = match seg.role {
                            SegmentRole::Context => (&mut ctx, (logit / t).exp()),
                            SegmentRole::Causal if seg.pos_offset + j <= q_pos + row => {
                                (&mut cau, logit.exp())
                            }
                            SegmentRole::Causal => continue,
                        };
                        acc.0 += e;
                        for i in 0..d {
                            acc.1[i] += e * seg.v[at + i] as f64;
                        }
                    }
                }
                let w_ctx = match variant {
                    ApeVariant::Released => ctx.0.powf(s * t),
                    ApeVariant::ScaledMass => s * ctx.0.powf(t),
                };
                let total = w_ctx + cau.0;
                let idx = row * dims.n_heads + h;
                if total == 0.0 {
                    assert_eq!(got.lse[idx], f32::NEG_INFINITY);
                    continue;
                }
                assert!((got.lse[idx] as f64 - total.ln()).abs() < 1e-5, "lse");
                for i in 0..d {
                    let mut want = cau.1[i] / total;
                    if ctx.0 > 0.0 {
                        want += w_ctx / total * ctx.1[i] / ctx.0;
                    }
                    assert!((got.out[idx * d + i] as f64 - want).abs() < 1e-5, "out");
                }
            }
        }
    }
}

#[test]
fn splitting_a_segment_changes_nothing() {
    let mut r = seeded("splitting_a_segment_changes_nothing");
    for _ in 0..200 {
        let dims = random_dims(&mut r);
        let (q, rows, q_pos, segs) = random_problem(&mut r, &dims);
        let params = ApeParams::new(r.f32_in(0.5, 1.5), r.f32_in(0.5, 1.5)).expect("valid");
        let whole = run(&q, rows, q_pos, &segs, &dims, &params);

        let which = r.range(0, segs.len() - 1);
        let s = &segs[which];
        let at = r.range(0, s.len);
        let row = dims.n_kv_heads * dims.head_dim;
        let head = Owned {
            k: s.k[..at * row].to_vec(),
            v: s.v[..at * row].to_vec(),
            len: at,
            pos_offset: s.pos_offset,
            role: s.role,
            rope_shift: s.rope_shift,
        };
        let tail = Owned {
            k: s.k[at * row..].to_vec(),
            v: s.v[at * row..].to_vec(),
            len: s.len - at,
            pos_offset: s.pos_offset + at,
            role: s.role,
            rope_shift: s.rope_shift,
        };
        let mut split: Vec<Owned> = Vec::new();
        for (i, seg) in segs.into_iter().enumerate() {
            if i == which {
                split.push(Owned {
                    k: head.k.clone(),
                    v: head.v.clone(),
                    ..head
                });
                split.push(Owned {
                    k: tail.k.clone(),
                    v: tail.v.clone(),
                    ..tail
                });
            } else {
                split.push(seg);
            }
        }
        let parts = run(&q, rows, q_pos, &split, &dims, &params);
        assert!(max_abs_diff(&whole.out, &parts.out) < 1e-6);
        assert!(max_abs_diff(&whole.lse, &parts.lse) < 1e-6);
    }
}

#[test]
fn empty_segments_change_nothing_and_all_empty_gives_minus_inf() {
    let mut r = seeded("empty_segments_change_nothing_and_all_empty_gives_minus_inf");
    for _ in 0..100 {
        let dims = random_dims(&mut r);
        let (q, rows, q_pos, mut segs) = random_problem(&mut r, &dims);
        let params = ApeParams::default();
        let before = run(&q, rows, q_pos, &segs, &dims, &params);
        for _ in 0..r.range(1, 4) {
            let role = if r.coin() {
                SegmentRole::Context
            } else {
                SegmentRole::Causal
            };
            let at = r.range(0, segs.len());
            segs.insert(
                at,
                Owned {
                    k: vec![],
                    v: vec![],
                    len: 0,
                    pos_offset: r.range(0, 50),
                    role,
                    rope_shift: None,
                },
            );
        }
        let after = run(&q, rows, q_pos, &segs, &dims, &params);
        assert_eq!(before, after);
    }
    let dims = AttentionDims::new(4, 2, 8).expect("valid");
    let q = r.uniform(3 * 4 * 8, 1.0);
    let empty: Vec<Owned> = [SegmentRole::Context, SegmentRole::Causal]
        .into_iter()
        .map(|role| Owned {
            k: vec![],
            v: vec![],
            len: 0,
            pos_offset: 0,
            role,
            rope_shift: None,
        })
        .collect();
    for segs in [&empty[..], &[]] {
        let got = run(&q, 3, 0, segs, &dims, &ApeParams::default());
        assert!(got.lse.iter().all(|&x| x == f32::NEG_INFINITY));
        assert!(got.out.iter().all(|&x| x == 0.0));
    }
}

#[test]
fn fully_masked_row_gives_minus_inf_or_the_context_alone() {
    let mut r = seeded("fully_masked_row_gives_minus_inf_or_the_context_alone");
    let dims = AttentionDims::new(6, 2, 8).expect("valid");
    // Causal keys all after the query rows (positions 10.., rows at 3 and 4): nothing visible.
    let future = random_segment(&mut r, &dims, 5, 10, SegmentRole::Causal);
    let q = r.uniform(2 * 6 * 8, 1.0);
    let got = run(
        &q,
        2,
        3,
        std::slice::from_ref(&future),
        &dims,
        &ApeParams::default(),
    );
    assert!(got.lse.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(got.out.iter().all(|&x| x == 0.0));

    // With a context segment too: the output is the context group's own, and the LSE is its
    // corrected mass a = S*T*L_C.
    let ctx = random_segment(&mut r, &dims, 4, 0, SegmentRole::Context);
    let params = ApeParams::new(0.8, 0.7).expect("valid");
    let ctx_scale = 1.0 / (8f64.sqrt() * 0.8f32 as f64);
    let query = Query {
        data: &q,
        n_rows: 2,
        pos_offset: 3,
    };
    let c_state = |row, h| {
        group_state(
            &query,
            row,
            h,
            &[ctx.view()],
            &dims,
            SegmentRole::Context,
            ctx_scale,
        )
    };
    let both = run(&q, 2, 3, &[ctx_copy(&ctx), future], &dims, &params);
    for row in 0..2 {
        for h in 0..6 {
            let idx = row * 6 + h;
            let c = c_state(row, h);
            let a = 0.7f32 as f64 * 0.8f32 as f64 * c.lse;
            assert!((both.lse[idx] as f64 - a).abs() < 1e-5);
            for i in 0..8 {
                assert!((both.out[idx * 8 + i] as f64 - c.out[i]).abs() < 1e-6);
            }
        }
    }
}

fn ctx_copy(s: &Owned) -> Owned {
    Owned {
        k: s.k.clone(),
        v: s.v.clone(),
        ..*s
    }
}

#[test]
fn attention_over_a_union_is_the_merge_of_the_parts() {
    let mut r = seeded("attention_over_a_union_is_the_merge_of_the_parts");
    for _ in 0..100 {
        let dims = random_dims(&mut r);
        let (len_a, len_b) = (r.range(0, 6), r.range(0, 6));
        let a = random_segment(&mut r, &dims, len_a, 0, SegmentRole::Context);
        let b = random_segment(&mut r, &dims, len_b, 0, SegmentRole::Context);
        let q = r.uniform(dims.n_heads * dims.head_dim, 1.5);
        let query = Query {
            data: &q,
            n_rows: 1,
            pos_offset: 0,
        };
        let scale = 1.0 / (dims.head_dim as f64).sqrt();
        for h in 0..dims.n_heads {
            let state = |segs: &[Segment]| {
                group_state(&query, 0, h, segs, &dims, SegmentRole::Context, scale)
            };
            let union = state(&[a.view(), b.view()]);
            let merged = state(&[a.view()]).merge(&state(&[b.view()]));
            assert_states_close(&union, &merged, 1e-12);
        }
    }
}

fn assert_states_close(a: &AttentionState, b: &AttentionState, tol: f64) {
    if a.lse == f64::NEG_INFINITY || b.lse == f64::NEG_INFINITY {
        assert_eq!(a.lse, b.lse);
    } else {
        assert!((a.lse - b.lse).abs() < tol, "lse {} vs {}", a.lse, b.lse);
    }
    for (x, y) in a.out.iter().zip(&b.out) {
        assert!((x - y).abs() < tol, "out {x} vs {y}");
        assert!(!x.is_nan());
    }
}

fn random_state(r: &mut Seeded, d: usize) -> AttentionState {
    if r.range(0, 4) == 0 {
        return AttentionState::empty(d);
    }
    AttentionState {
        out: r.uniform(d, 2.0).into_iter().map(f64::from).collect(),
        lse: r.f32_in(-20.0, 20.0) as f64,
    }
}

#[test]
fn merge_is_associative_and_commutative() {
    let mut r = seeded("merge_is_associative_and_commutative");
    for _ in 0..500 {
        let d = r.range(1, 8);
        let (a, b, c) = (
            random_state(&mut r, d),
            random_state(&mut r, d),
            random_state(&mut r, d),
        );
        assert_states_close(&a.merge(&b.merge(&c)), &a.merge(&b).merge(&c), 1e-12);
        assert_states_close(&a.merge(&b), &b.merge(&a), 1e-12);
        assert_states_close(
            &AttentionState::merge_all([&c, &a, &b]),
            &a.merge(&b).merge(&c),
            1e-12,
        );
    }
}

#[test]
fn merge_states_tensor_form_matches_state_merges_and_ignores_empty_states() {
    let mut r = seeded("merge_states_tensor_form_matches_state_merges_and_ignores_empty_states");
    for _ in 0..50 {
        let (n_states, n, d) = (r.range(1, 6), r.range(1, 7), r.range(1, 9));
        let mut v = r.uniform(n_states * n * d, 2.0);
        let mut s = r.uniform(n_states * n, 10.0);
        for k in 0..n_states {
            for i in 0..n {
                if r.range(0, 3) == 0 {
                    s[k * n + i] = f32::NEG_INFINITY;
                    // An empty state's output must never be read: poison it.
                    v[(k * n + i) * d..][..d].fill(f32::NAN);
                }
            }
        }
        let (v_out, s_out) = merge_states(&v, &s, n_states, d).expect("valid");
        assert!(v_out.iter().all(|x| !x.is_nan()));
        for i in 0..n {
            let states: Vec<AttentionState> = (0..n_states)
                .map(|k| AttentionState {
                    out: v[(k * n + i) * d..][..d]
                        .iter()
                        .map(|&x| x as f64)
                        .collect(),
                    lse: s[k * n + i] as f64,
                })
                .collect();
            let mut want = AttentionState::empty(d);
            for st in &states {
                want = want.merge(st);
            }
            let got = AttentionState {
                out: v_out[i * d..][..d].iter().map(|&x| x as f64).collect(),
                lse: s_out[i] as f64,
            };
            assert_states_close(&got, &want, 1e-5);
        }
    }
}

#[test]
fn gqa_equals_repeated_kv() {
    let mut r = seeded("gqa_equals_repeated_kv");
    for _ in 0..50 {
        let dims = random_dims(&mut r);
        let (q, rows, q_pos, segs) = random_problem(&mut r, &dims);
        let mha = AttentionDims::new(dims.n_heads, dims.n_heads, dims.head_dim).expect("valid");
        let d = dims.head_dim;
        let repeat = |x: &[f32], len: usize| -> Vec<f32> {
            let mut y = Vec::with_capacity(len * dims.n_heads * d);
            for t in 0..len {
                for h in 0..dims.n_heads {
                    y.extend_from_slice(&x[(t * dims.n_kv_heads + dims.kv_head(h)) * d..][..d]);
                }
            }
            y
        };
        let repeated: Vec<Owned> = segs
            .iter()
            .map(|s| Owned {
                k: repeat(&s.k, s.len),
                v: repeat(&s.v, s.len),
                len: s.len,
                pos_offset: s.pos_offset,
                role: s.role,
                rope_shift: s.rope_shift,
            })
            .collect();
        let params = ApeParams::default();
        let a = run(&q, rows, q_pos, &segs, &dims, &params);
        let b = run(&q, rows, q_pos, &repeated, &mha, &params);
        assert_eq!(a, b);
    }
}

// ---- hand-computed cases: expected numbers from the formulas, not from the code ----

#[test]
fn hand_computed_attention() {
    // d = 4, so logits are q.k / 2; q = [2, 0, 0, 0] makes the logits k[0]: 0 and ln 3.
    // softmax = [1/4, 3/4]; out = 1/4 * 1 + 3/4 * 5 = 4; lse = ln(1 + 3) = ln 4.
    let dims = AttentionDims::new(1, 1, 4).expect("valid");
    let k = [0.0, 0.0, 0.0, 0.0, 3f32.ln(), 0.0, 0.0, 0.0];
    let v = [1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0];
    let seg = Segment {
        k: &k,
        v: &v,
        len: 2,
        pos_offset: 0,
        role: SegmentRole::Context,
        rope_shift: None,
    };
    let q = [2.0, 0.0, 0.0, 0.0];
    let got = segmented_attention(
        &Query {
            data: &q,
            n_rows: 1,
            pos_offset: 0,
        },
        &[seg],
        &dims,
        &ApeParams::plain(),
    )
    .expect("valid");
    assert!((got.out[0] - 4.0).abs() < 1e-6);
    assert_eq!(&got.out[1..], &[0.0, 0.0, 0.0]);
    assert!((got.lse[0] - 1.386_294_4).abs() < 1e-6);
}

#[test]
fn hand_computed_ape() {
    // T = S = 0.5. Context: two keys with raw logit 1 (values [1,0], [3,0]) so L_C = ln(2 e^2),
    // O_C = [2, 0]. Causal: one key with logit 0 (value [0, 8]) so L_O = 0, O_O = [0, 8].
    // Released: a = S*T*L_C = 0.6732867951399863, w = sigmoid(a) = 0.6622387364943773,
    //   out = [1.3244774729887545, 2.702090108044982], lse = ln(e^a + 1) = 1.0854159540505912.
    // Scaled mass: a = T*L_C + ln S = 0.6534264097200274, w = 0.6577821803478596,
    //   out = [1.3155643606957192, 2.737742557217123], lse = 1.072307845086323.
    let dims = AttentionDims::new(1, 1, 4).expect("valid");
    // q = [2,0,0,0]: raw logit = k[0] (d = 4).
    let kc = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    let vc = [1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0];
    let ko = [0.0f32; 4];
    let vo = [0.0, 8.0, 0.0, 0.0];
    let segs = [
        Segment {
            k: &kc,
            v: &vc,
            len: 2,
            pos_offset: 0,
            role: SegmentRole::Context,
            rope_shift: None,
        },
        Segment {
            k: &ko,
            v: &vo,
            len: 1,
            pos_offset: 2,
            role: SegmentRole::Causal,
            rope_shift: None,
        },
    ];
    let q = [2.0, 0.0, 0.0, 0.0];
    let query = Query {
        data: &q,
        n_rows: 1,
        pos_offset: 2,
    };
    let params = ApeParams::new(0.5, 0.5).expect("valid");
    for (variant, out, lse) in [
        (
            ApeVariant::Released,
            [1.324_477_472_988_754_5, 2.702_090_108_044_982],
            1.085_415_954_050_591_2,
        ),
        (
            ApeVariant::ScaledMass,
            [1.315_564_360_695_719_2, 2.737_742_557_217_123],
            1.072_307_845_086_323,
        ),
    ] {
        let got = segmented_attention(&query, &segs, &dims, &params.with_variant(variant))
            .expect("valid");
        assert!(
            (got.out[0] as f64 - out[0]).abs() < 1e-6,
            "{variant:?} {:?}",
            got.out
        );
        assert!(
            (got.out[1] as f64 - out[1]).abs() < 1e-6,
            "{variant:?} {:?}",
            got.out
        );
        assert!(
            (got.lse[0] as f64 - lse).abs() < 1e-6,
            "{variant:?} {}",
            got.lse[0]
        );
    }
    // The combination on its own: a = S*T*L_C.
    assert!((ape::context_log_mass(2.0, &params) - 0.5).abs() < 1e-12);
}

#[test]
fn hand_computed_merge() {
    // (L = 0, O = [1, 0]) and (L = ln 3, O = [0, 1]): weights 1/4 and 3/4, L = ln 4.
    let a = AttentionState {
        out: vec![1.0, 0.0],
        lse: 0.0,
    };
    let b = AttentionState {
        out: vec![0.0, 1.0],
        lse: 3f64.ln(),
    };
    let m = a.merge(&b);
    assert!((m.lse - 1.386_294_361_119_890_6).abs() < 1e-12);
    assert!((m.out[0] - 0.25).abs() < 1e-12 && (m.out[1] - 0.75).abs() < 1e-12);
    assert_eq!(a.merge(&AttentionState::empty(2)), a);
    assert!(AttentionState::empty(2)
        .merge(&AttentionState::empty(2))
        .is_empty());
}

// ---- validation: errors, never panics ----

#[test]
fn invalid_parameters_are_errors() {
    for (t, s) in [
        (0.0, 1.0),
        (-1.0, 1.0),
        (f32::NAN, 1.0),
        (1.0, f32::INFINITY),
        (1.0, 0.0),
        (f32::INFINITY, 1.0),
    ] {
        assert!(
            matches!(ApeParams::new(t, s), Err(Error::InvalidParameter { .. })),
            "T={t} S={s}"
        );
    }
    assert!(matches!(
        AttentionDims::new(9, 4, 64),
        Err(Error::Gqa { .. })
    ));
    assert!(matches!(
        AttentionDims::new(8, 0, 64),
        Err(Error::Gqa { .. })
    ));
    assert!(matches!(
        AttentionDims::new(0, 1, 64),
        Err(Error::Gqa { .. })
    ));
    assert!(matches!(AttentionDims::new(8, 2, 0), Err(Error::Shape(_))));

    let dims = AttentionDims::new(2, 1, 4).expect("valid");
    let q = [0.0f32; 8];
    let k = [0.0f32; 8];
    let short = [0.0f32; 7];
    let query = Query {
        data: &q,
        n_rows: 1,
        pos_offset: 0,
    };
    let ok = Segment {
        k: &k,
        v: &k,
        len: 2,
        pos_offset: 0,
        role: SegmentRole::Context,
        rope_shift: None,
    };
    let bad_v = Segment { v: &short, ..ok };
    assert!(segmented_attention(&query, &[ok], &dims, &ApeParams::default()).is_ok());
    assert!(matches!(
        segmented_attention(&query, &[ok, bad_v], &dims, &ApeParams::default()),
        Err(Error::Shape(_))
    ));
    let bad_q = Query { n_rows: 2, ..query };
    assert!(matches!(
        segmented_attention(&bad_q, &[ok], &dims, &ApeParams::default()),
        Err(Error::Shape(_))
    ));
    let bad_dims = AttentionDims {
        n_heads: 3,
        n_kv_heads: 2,
        head_dim: 4,
    };
    assert!(matches!(
        segmented_attention(&query, &[ok], &bad_dims, &ApeParams::default()),
        Err(Error::Gqa { .. })
    ));

    assert!(merge_states(&[0.0; 8], &[0.0; 3], 2, 4).is_err());
    assert!(merge_states(&[0.0; 7], &[0.0; 2], 2, 4).is_err());
    assert!(merge_states(&[], &[], 0, 4).is_err());
}

#[test]
fn relative_l2_is_what_it_says() {
    assert_eq!(rel_l2(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
    // ||(0.3, 0.4)|| / ||(3, 4)|| = 0.5 / 5.
    assert!((rel_l2(&[3.3, 4.4], &[3.0, 4.0]) - 0.1).abs() < 1e-6);
}

// ---- RoPE shifts (Block-Attention: keys cached at position 0, read at their offset) ----

/// A block whose keys were rotated at positions `0..len` and are read with a shift by `o` gives the
/// same attention as the same block with its keys rotated at `o..o + len` (`R(o) R(t) = R(o + t)`).
#[test]
fn rope_shift_equals_keys_computed_at_the_real_offset() {
    let mut r = seeded("rope_shift_equals_keys_computed_at_the_real_offset");
    for _ in 0..200 {
        let n_kv = r.range(1, 2);
        let dims = AttentionDims::new(n_kv * r.pick(&[1, 3]), n_kv, r.pick(&[2, 4, 8, 16]))
            .expect("valid dims");
        let rope = random_rope(&mut r, dims.head_dim);
        let (q, rows, q_pos, segs) = random_problem(&mut r, &dims);
        let (mut cached, mut real) = (Vec::new(), Vec::new());
        for s in segs {
            let offset = r.range(0, 5000);
            let (mut at_zero, mut at_offset) = (s.k.clone(), s.k.clone());
            rope::apply(&mut at_zero, s.len, n_kv, &rope, 0).expect("rope");
            rope::apply(&mut at_offset, s.len, n_kv, &rope, offset as i64).expect("rope");
            cached.push(Owned {
                k: at_zero,
                rope_shift: Some(RopeShift {
                    rope,
                    delta: offset as i64,
                }),
                v: s.v.clone(),
                ..s
            });
            real.push(Owned {
                k: at_offset,
                v: cached.last().expect("pushed").v.clone(),
                rope_shift: None,
                ..*cached.last().expect("pushed")
            });
        }
        let ape = ApeParams::new(r.f32_in(0.5, 1.5), r.f32_in(0.5, 1.5)).expect("valid");
        let a = run(&q, rows, q_pos, &cached, &dims, &ape);
        let b = run(&q, rows, q_pos, &real, &dims, &ape);
        assert!(max_abs_diff(&a.out, &b.out) < 1e-4, "out differs");
        assert!(max_abs_diff(&a.lse, &b.lse) < 1e-4, "lse differs");
    }
}

/// The identity the kernel relies on: keys rotated by `delta` give the same logits as the query
/// rotated by `-delta` (`q . R(d) k = R(-d) q . k`), so attention over segments that all carry the
/// same shift equals attention of the counter-rotated query over the keys as stored.
#[test]
fn rope_shift_of_the_keys_equals_the_opposite_rotation_of_the_query() {
    let mut r = seeded("rope_shift_of_the_keys_equals_the_opposite_rotation_of_the_query");
    let mut changed = 0;
    for _ in 0..200 {
        let n_kv = r.range(1, 2);
        let dims = AttentionDims::new(n_kv * r.pick(&[1, 4]), n_kv, r.pick(&[2, 4, 8, 16]))
            .expect("valid dims");
        let rope = random_rope(&mut r, dims.head_dim);
        let delta = r.range(1, 200_000) as i64 - 100_000;
        let (mut q, rows, q_pos, mut segs) = random_problem(&mut r, &dims);
        let ape = ApeParams::new(r.f32_in(0.5, 1.5), r.f32_in(0.5, 1.5)).expect("valid");
        let stored = run(&q, rows, q_pos, &segs, &dims, &ape);
        for s in &mut segs {
            s.rope_shift = Some(RopeShift { rope, delta });
        }
        let shifted = run(&q, rows, q_pos, &segs, &dims, &ape);
        rope::shift(&mut q, rows, dims.n_heads, &rope, -delta).expect("rope");
        for s in &mut segs {
            s.rope_shift = None;
        }
        let counter_rotated = run(&q, rows, q_pos, &segs, &dims, &ape);
        assert!(
            max_abs_diff(&shifted.out, &counter_rotated.out) < 1e-5,
            "out differs"
        );
        assert!(
            max_abs_diff(&shifted.lse, &counter_rotated.lse) < 1e-5,
            "lse differs"
        );
        if max_abs_diff(&shifted.out, &stored.out) > 1e-3 {
            changed += 1;
        }
    }
    // The shift is not a no-op (a problem may have no visible key, so not every time).
    assert!(
        changed > 100,
        "the shift changed the output in only {changed} of 200 problems"
    );
}

#[test]
fn rope_shift_errors() {
    let dims = AttentionDims::new(2, 1, 4).expect("valid");
    let (q, k) = ([0.5f32; 8], [0.25f32; 8]);
    let query = Query {
        data: &q,
        n_rows: 1,
        pos_offset: 0,
    };
    let rope8 = RopeConfig::new(8, 10_000.0, RopeLayout::Neox).expect("valid");
    let seg = |rope: RopeConfig| Segment {
        k: &k,
        v: &k,
        len: 2,
        pos_offset: 0,
        role: SegmentRole::Context,
        rope_shift: Some(RopeShift { rope, delta: 3 }),
    };
    assert!(matches!(
        segmented_attention(&query, &[seg(rope8)], &dims, &ApeParams::plain()),
        Err(Error::Shape(_))
    ));
    let nan_base = RopeConfig {
        base: f64::NAN,
        ..RopeConfig::new(4, 10_000.0, RopeLayout::Neox).expect("valid")
    };
    assert!(matches!(
        segmented_attention(&query, &[seg(nan_base)], &dims, &ApeParams::plain()),
        Err(Error::InvalidParameter { .. })
    ));
    let rope4 = RopeConfig::new(4, 10_000.0, RopeLayout::Neox).expect("valid");
    assert!(segmented_attention(&query, &[seg(rope4)], &dims, &ApeParams::plain()).is_ok());
}
