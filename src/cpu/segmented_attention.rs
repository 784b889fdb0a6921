//! Segmented attention on the CPU in f32: the math of [`crate::reference::segmented_attention()`]
//! (docs/DESIGN.md §2.1-§2.6), at product speed.
//!
//! Query row `r` sits at position `q_pos_offset + r`; query head `h` reads KV head
//! `h / (n_heads / n_kv_heads)`. Every visible key lands in one of two running states per row and
//! head (§2.3): group `C` (the keys of `Context` segments, logits `s_j / T`) and group `O` (the
//! keys of `Causal` segments at positions `<=` the row's, logits `s_j`), where
//! `s_j = q.k_j / sqrt(d)`. Each state is kept in the online form of §2.2, `(m, l, acc)` with
//! `L = m + ln l` and `O = acc / l`, and takes the keys in tiles that stay in L1/L2. At the end
//! the two are combined as [`crate::reference::ape::combine`] does: `a = S T L_C` (or
//! `T L_C + ln S`), `b = L_O`, `out = w O_C + (1 - w) O_O` with `w = sigmoid(a - b)`, and
//! `LSE = ln(e^a + e^b)` (natural log; `-inf` and `out = 0` for a row that sees no key).
//!
//! How it is laid out:
//! - GQA (§2.6): the `n_heads / n_kv_heads` query heads of a KV head, for a block of query rows,
//!   go through each key tile together, so a key or value row is loaded once for all of them.
//! - RoPE shift (§2.5): for a segment with a [`crate::RopeShift`], `q . R(delta) k = R(-delta) q . k`,
//!   so the query vectors are rotated by `-delta` once per segment (angles in f64) and the stored
//!   keys are read as they are.
//! - Threads (rayon, the caller's pool): blocks of rows, each over every KV head; when there are
//!   too few blocks (decode), blocks times KV heads times splits of the keys, whose partial states
//!   are merged as §2.2 (`reference::merge_states`) before the APE combination. A problem below
//!   about two million multiply-adds runs inline on the calling thread. The plan depends only on
//!   the problem and the pool's size, so a sequence gives the same bits alone and in a batch.
//! - Arithmetic: AVX2 + FMA where the CPU has them and `head_dim % 8 == 0`, plain loops otherwise.

use std::cell::Cell;
use std::ops::Range;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::kernels::Avx2;
use super::kernels::{Kernel, Scalar};
use crate::error::{Error, Result};
use crate::params::{ApeParams, AttentionDims, SegmentRole};
use crate::reference::segmented_attention::{validate, validate_batch};
use crate::reference::{ape, AttentionOutput, BatchSequence, Query, Segment};

#[cfg(test)]
mod tests;

/// Attention of every query row over all segments, APE fused in: what
/// [`crate::reference::segmented_attention()`] computes, in f32. Inputs are validated the same way
/// (errors, never panics). `ApeParams::plain()` gives softmax attention over the concatenation of
/// the segments.
pub fn segmented_attention(
    query: &Query,
    segments: &[Segment],
    dims: &AttentionDims,
    ape: &ApeParams,
) -> Result<AttentionOutput> {
    validate(query, segments, dims)?;
    let mut out = vec![0.0; query.n_rows * dims.n_heads * dims.head_dim];
    let mut lse = vec![0.0; query.n_rows * dims.n_heads];
    segmented_attention_into(query, segments, dims, ape, &mut out, Some(&mut lse))?;
    Ok(AttentionOutput { out, lse })
}

/// [`segmented_attention`] into the caller's buffers: `out` `[n_rows, n_heads, head_dim]` and,
/// if given, `lse` `[n_rows, n_heads]`; every value of both is written. Nothing is allocated per
/// call beyond buffers each thread keeps for the next call (and the shift angles of shifted
/// segments), so a forward pass can call it once per layer.
pub fn segmented_attention_into(
    query: &Query,
    segments: &[Segment],
    dims: &AttentionDims,
    ape: &ApeParams,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    validate(query, segments, dims)?;
    check_outputs(query.n_rows, dims, out, lse.as_deref())?;
    let plan = Plan::new(query.n_rows, total_keys(segments), dims);
    run(
        Isa::detect(dims),
        &plan,
        query,
        segments,
        dims,
        ape,
        out,
        lse,
    );
    Ok(())
}

/// A batch of sequences, each attending to its own segments with its own APE parameters: the
/// packed query `q` `[sum of n_rows, n_heads, head_dim]` gives each sequence its rows in order,
/// and the output holds each sequence's [`segmented_attention`] in the same rows (the contract
/// of [`crate::reference::segmented_attention_batch()`]). Sequences run in parallel; each one
/// gives the bits it gives alone.
pub fn segmented_attention_batch(
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
) -> Result<AttentionOutput> {
    let rows = validate_batch(q, sequences, dims)?;
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; rows * dims.n_heads];
    segmented_attention_batch_into(q, sequences, dims, &mut out, Some(&mut lse))?;
    Ok(AttentionOutput { out, lse })
}

/// [`segmented_attention_batch`] into the caller's buffers: `out` as long as `q`, `lse` (if
/// given) `[sum of n_rows, n_heads]`.
pub fn segmented_attention_batch_into(
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let rows = validate_batch(q, sequences, dims)?;
    check_outputs(rows, dims, out, lse.as_deref())?;
    let isa = Isa::detect(dims);
    let work: usize = sequences
        .iter()
        .map(|s| work_of(s.n_rows, total_keys(s.segments), dims))
        .fold(0, usize::saturating_add);
    let parallel = work >= INLINE_WORK && rayon::current_num_threads() > 1;
    batch_range(isa, q, sequences, dims, out, lse, parallel);
    Ok(())
}

/// Runs `sequences` (whose rows are `q`, `out` and `lse`), halving the list over `rayon::join`.
fn batch_range(
    isa: Isa,
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    parallel: bool,
) {
    let row = dims.n_heads * dims.head_dim;
    if parallel && sequences.len() > 1 {
        let (first, second) = sequences.split_at(sequences.len() / 2);
        let rows: usize = first.iter().map(|s| s.n_rows).sum();
        let (q0, q1) = q.split_at(rows * row);
        let (o0, o1) = out.split_at_mut(rows * row);
        let (l0, l1) = match lse {
            Some(l) => {
                let (a, b) = l.split_at_mut(rows * dims.n_heads);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        rayon::join(
            || batch_range(isa, q0, first, dims, o0, l0, parallel),
            || batch_range(isa, q1, second, dims, o1, l1, parallel),
        );
        return;
    }
    let (mut q, mut out, mut lse) = (q, out, lse);
    for s in sequences {
        let (q_s, q_rest) = q.split_at(s.n_rows * row);
        let (o_s, o_rest) = std::mem::take(&mut out).split_at_mut(s.n_rows * row);
        let (l_s, l_rest) = match lse.take() {
            Some(l) => {
                let (a, b) = l.split_at_mut(s.n_rows * dims.n_heads);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let query = Query {
            data: q_s,
            n_rows: s.n_rows,
            pos_offset: s.pos_offset,
        };
        let plan = Plan::new(s.n_rows, total_keys(s.segments), dims);
        run(isa, &plan, &query, s.segments, dims, &s.ape, o_s, l_s);
        (q, out, lse) = (q_rest, o_rest, l_rest);
    }
}

/// `out` must hold `n_rows * n_heads * head_dim` values and `lse` `n_rows * n_heads`.
fn check_outputs(
    n_rows: usize,
    dims: &AttentionDims,
    out: &[f32],
    lse: Option<&[f32]>,
) -> Result<()> {
    let want = n_rows * dims.n_heads * dims.head_dim;
    if out.len() != want {
        return Err(Error::Shape(format!(
            "out has {} values, expected n_rows * n_heads * head_dim = {want}",
            out.len()
        )));
    }
    if let Some(lse) = lse {
        if lse.len() != n_rows * dims.n_heads {
            return Err(Error::Shape(format!(
                "lse has {} values, expected n_rows * n_heads = {}",
                lse.len(),
                n_rows * dims.n_heads
            )));
        }
    }
    Ok(())
}

fn total_keys(segments: &[Segment]) -> usize {
    segments.iter().map(|s| s.len).sum()
}

/// Multiply-adds of a problem, about: `rows * heads * keys * d` for the logits and as many for
/// the values.
fn work_of(n_rows: usize, keys: usize, dims: &AttentionDims) -> usize {
    n_rows
        .saturating_mul(dims.n_heads)
        .saturating_mul(keys)
        .saturating_mul(dims.head_dim)
        .saturating_mul(2)
}

/// Below this many multiply-adds (about 100-200 microseconds on one core) a problem runs on the
/// calling thread: handing it to the pool would cost more than it saves.
const INLINE_WORK: usize = 1 << 21;
/// The fewest keys a split of the keys gets: fewer would spend more on merging than on keys.
const MIN_SPLIT_KEYS: usize = 512;
/// Query vectors (rows times heads of a KV head) a block of rows aims at: enough to reuse each
/// key tile many times, few enough that their states stay in L2.
const BLOCK_VECTORS: usize = 32;

/// Which arithmetic runs the tiles.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Isa {
    /// Plain loops.
    Scalar,
    /// AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
}

impl Isa {
    /// AVX2 + FMA if this CPU has them and the head dim is a multiple of 8, else scalar.
    pub(crate) fn detect(dims: &AttentionDims) -> Self {
        #[cfg(target_arch = "x86_64")]
        if dims.head_dim % 8 == 0 {
            if let Some(k) = Avx2::detect() {
                return Isa::Avx2(k);
            }
        }
        let _ = dims;
        Isa::Scalar
    }
}

/// How one sequence's work is cut.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Plan {
    /// Query rows per block.
    pub(crate) block_rows: usize,
    /// Splits of the keys (1: none); more than one implies `per_head`.
    pub(crate) splits: usize,
    /// One task per block, KV head and split, partial states merged after (else one task per
    /// block, over every KV head).
    pub(crate) per_head: bool,
    /// Spread the tasks over the rayon pool (else run them on the calling thread).
    pub(crate) parallel: bool,
}

impl Plan {
    /// The plan for `n_rows` rows over `keys` keys (every segment's, masked or not).
    pub(crate) fn new(n_rows: usize, keys: usize, dims: &AttentionDims) -> Self {
        let group = dims.group_size();
        let mut block_rows = BLOCK_VECTORS.div_ceil(group);
        if block_rows > 1 && block_rows * group % 2 == 1 {
            block_rows += 1; // vectors go through the tiles in pairs
        }
        let block_rows = block_rows.min(n_rows).max(1);
        let threads = rayon::current_num_threads();
        let inline = Self {
            block_rows,
            splits: 1,
            per_head: false,
            parallel: false,
        };
        if work_of(n_rows, keys, dims) < INLINE_WORK || threads == 1 {
            return inline;
        }
        let blocks = n_rows.div_ceil(block_rows);
        if blocks >= 2 * threads {
            return Self {
                parallel: true,
                ..inline
            };
        }
        let tasks = blocks * dims.n_kv_heads;
        let splits = (4 * threads)
            .div_ceil(tasks)
            .min(keys / MIN_SPLIT_KEYS)
            .max(1);
        Self {
            block_rows,
            splits,
            per_head: true,
            parallel: true,
        }
    }
}

/// What every task of one sequence reads.
struct Ctx<'a> {
    query: &'a Query<'a>,
    segments: &'a [Segment<'a>],
    dims: AttentionDims,
    ape: ApeParams,
    /// Logit scales of group C (`1/(T sqrt(d))`) and group O (`1/sqrt(d)`).
    scales: [f32; 2],
    /// For each shifted segment in order, `d` values: `(cos, sin)` of `delta * theta_i` for each
    /// pair `i`.
    shift_table: &'a [f64],
    /// Keys per tile.
    tile: usize,
}

/// Keys per tile: a tile of K and one of V together about 32 KiB (a multiple of 8, 16 to 128).
fn tile_keys(head_dim: usize) -> usize {
    (4096 / head_dim).clamp(16, 128) / 8 * 8
}

thread_local! {
    /// Each thread's working buffers, taken for a task and put back after it (a task that finds
    /// them taken, re-entered through the pool, allocates its own).
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
    /// The calling thread's shift angles and partial states, kept the same way.
    static CALL_BUFFERS: Cell<(Vec<f64>, Vec<f32>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

/// The states of a block's query vectors and the buffers that feed them.
#[derive(Default)]
pub(crate) struct Scratch {
    /// `[vectors, tile]`: logits, then their weights.
    scores: Vec<f32>,
    /// `[2 groups, vectors, d]`: `acc`.
    acc: Vec<f32>,
    /// `[2 groups, vectors]`: running maximum `m`.
    mx: Vec<f32>,
    /// `[2 groups, vectors]`: running sum `l`, in f64 (it adds one term per tile).
    sum: Vec<f64>,
    /// `[vectors, d]`: the query vectors rotated for the current segment.
    qrot: Vec<f32>,
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut scratch = SCRATCH.with(Cell::take);
    let r = f(&mut scratch);
    SCRATCH.with(|c| c.set(scratch));
    r
}

/// One sequence, validated, by `plan`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    isa: Isa,
    plan: &Plan,
    query: &Query,
    segments: &[Segment],
    dims: &AttentionDims,
    ape: &ApeParams,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    if query.n_rows == 0 {
        return;
    }
    let (mut table, mut partials) = CALL_BUFFERS.with(Cell::take);
    table.clear();
    for shift in segments.iter().filter_map(|s| s.rope_shift) {
        for (c, s) in shift.cos_sin() {
            table.extend([c, s]);
        }
    }
    let inv_sqrt_d = 1.0 / (dims.head_dim as f64).sqrt();
    let cx = Ctx {
        query,
        segments,
        dims: *dims,
        ape: *ape,
        scales: [
            (inv_sqrt_d / ape.temperature() as f64) as f32,
            inv_sqrt_d as f32,
        ],
        shift_table: &table,
        tile: tile_keys(dims.head_dim),
    };
    match isa {
        Isa::Scalar => run_with(Scalar, &cx, plan, out, lse, &mut partials),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(k) => run_with(k, &cx, plan, out, lse, &mut partials),
    }
    CALL_BUFFERS.with(|c| c.set((table, partials)));
}

fn run_with<K: Kernel>(
    kernel: K,
    cx: &Ctx,
    plan: &Plan,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    partials: &mut Vec<f32>,
) {
    let (d, nkv) = (cx.dims.head_dim, cx.dims.n_kv_heads);
    let n_rows = cx.query.n_rows;
    let keys = 0..total_keys(cx.segments);
    if !plan.per_head {
        for_each_block(plan, out, lse, cx, |rows, out, mut lse| {
            with_scratch(|sc| {
                for g in 0..nkv {
                    attend(kernel, cx, rows.clone(), g, keys.clone(), sc);
                    finish(cx, rows.clone(), g, sc, out, lse.as_deref_mut());
                }
            })
        });
        return;
    }
    // Per block, KV head and split: partial states `[vectors, 2 groups, d + 1]` (O, then L).
    let region = plan.block_rows * cx.dims.group_size() * 2 * (d + 1);
    let tasks = n_rows.div_ceil(plan.block_rows) * nkv * plan.splits;
    partials.clear();
    partials.resize(tasks * region, 0.0);
    let task = |t: usize, part: &mut [f32]| {
        let (block, g, split) = (
            t / (nkv * plan.splits),
            t / plan.splits % nkv,
            t % plan.splits,
        );
        let rows = block * plan.block_rows..((block + 1) * plan.block_rows).min(n_rows);
        let keys = keys.end * split / plan.splits..keys.end * (split + 1) / plan.splits;
        with_scratch(|sc| {
            attend(kernel, cx, rows.clone(), g, keys, sc);
            write_partial(cx, rows.len(), sc, part);
        })
    };
    if plan.parallel {
        partials
            .par_chunks_mut(region)
            .enumerate()
            .for_each(|(t, p)| task(t, p));
    } else {
        partials
            .chunks_mut(region)
            .enumerate()
            .for_each(|(t, p)| task(t, p));
    }
    let partials = &partials[..];
    for_each_block(plan, out, lse, cx, |rows, out, lse| {
        merge_partials(cx, plan, rows, partials, region, out, lse)
    });
}

/// Calls `f(rows, out, lse)` for each block of rows with the block's part of the outputs, in
/// parallel if the plan says so.
fn for_each_block(
    plan: &Plan,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    cx: &Ctx,
    f: impl Fn(Range<usize>, &mut [f32], Option<&mut [f32]>) + Sync,
) {
    let (rb, h) = (plan.block_rows, cx.dims.n_heads);
    let n_rows = cx.query.n_rows;
    let rows = |b: usize| b * rb..((b + 1) * rb).min(n_rows);
    let out_chunk = rb * h * cx.dims.head_dim;
    match (lse, plan.parallel) {
        (Some(lse), true) => out
            .par_chunks_mut(out_chunk)
            .zip(lse.par_chunks_mut(rb * h))
            .enumerate()
            .for_each(|(b, (o, l))| f(rows(b), o, Some(l))),
        (None, true) => out
            .par_chunks_mut(out_chunk)
            .enumerate()
            .for_each(|(b, o)| f(rows(b), o, None)),
        (Some(lse), false) => out
            .chunks_mut(out_chunk)
            .zip(lse.chunks_mut(rb * h))
            .enumerate()
            .for_each(|(b, (o, l))| f(rows(b), o, Some(l))),
        (None, false) => out
            .chunks_mut(out_chunk)
            .enumerate()
            .for_each(|(b, o)| f(rows(b), o, None)),
    }
}

/// The query vector `m` of a block (row `rows.start + m / group`, head `g * group + m % group`).
fn query_vector<'a>(cx: &Ctx<'a>, rows: &Range<usize>, g: usize, m: usize) -> &'a [f32] {
    let (d, group) = (cx.dims.head_dim, cx.dims.group_size());
    let at = ((rows.start + m / group) * cx.dims.n_heads + g * group + m % group) * d;
    &cx.query.data[at..at + d]
}

/// The states of the block `rows` of KV head `g` over the keys `keys` (indices into the
/// concatenation of all segments), left in `sc` (`[2 groups, vectors]`, vectors padded to even).
fn attend<K: Kernel>(
    kernel: K,
    cx: &Ctx,
    rows: Range<usize>,
    g: usize,
    keys: Range<usize>,
    sc: &mut Scratch,
) {
    let (d, group, nkv) = (cx.dims.head_dim, cx.dims.group_size(), cx.dims.n_kv_heads);
    let (tile, stride) = (cx.tile, nkv * d);
    let m = rows.len() * group;
    let mp = m + m % 2;
    let Scratch {
        scores,
        acc,
        mx,
        sum,
        qrot,
    } = sc;
    scores.resize(mp * tile, 0.0);
    acc.clear();
    acc.resize(2 * mp * d, 0.0);
    mx.clear();
    mx.resize(2 * mp, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(2 * mp, 0.0);
    qrot.resize(m * d, 0.0);

    let (mut base, mut table_at) = (0usize, 0usize);
    for seg in cx.segments {
        let seg_keys = base..base + seg.len;
        base += seg.len;
        let table = seg.rope_shift.map(|shift| {
            table_at += d;
            (shift, &cx.shift_table[table_at - d..table_at])
        });
        let (lo, hi) = (keys.start.max(seg_keys.start), keys.end.min(seg_keys.end));
        if lo >= hi {
            continue;
        }
        let (lo, hi) = (lo - seg_keys.start, hi - seg_keys.start);
        if let Some((shift, table)) = table {
            for i in 0..m {
                rotate_back(query_vector(cx, &rows, g, i), &shift.rope, table, qrot, i);
            }
        }
        let q = |i: usize| match table {
            Some(_) => &qrot[i * d..(i + 1) * d],
            None => query_vector(cx, &rows, g, i),
        };
        let r = match seg.role {
            SegmentRole::Context => 0,
            SegmentRole::Causal => 1,
        };
        let mut t0 = lo;
        while t0 < hi {
            let n = tile.min(hi - t0);
            // Keys of a tile sit at consecutive positions: each row sees a prefix of them.
            let key_pos = seg.pos_offset as u128 + t0 as u128;
            let visible = |i: usize| -> usize {
                let i = i.min(m - 1);
                match seg.role {
                    SegmentRole::Context => n,
                    SegmentRole::Causal => {
                        let end =
                            cx.query.pos_offset as u128 + (rows.start + i / group) as u128 + 1;
                        end.saturating_sub(key_pos).min(n as u128) as usize
                    }
                }
            };
            if visible(m - 1) == 0 {
                break; // later rows come last; later tiles are later still
            }
            let kt = &seg.k[(t0 * nkv + g) * d..];
            let vt = &seg.v[(t0 * nkv + g) * d..];
            for a in (0..mp).step_by(2) {
                let (na, nb) = (visible(a), visible(a + 1));
                let np = na.max(nb);
                if np == 0 {
                    continue;
                }
                let (sa, sb) = scores[a * tile..(a + 2) * tile].split_at_mut(tile);
                let s = r * mp + a;
                let (acc_a, acc_b) = acc[s * d..(s + 2) * d].split_at_mut(d);
                let (mx_a, mx_b) = mx[s..s + 2].split_at_mut(1);
                let (sum_a, sum_b) = sum[s..s + 2].split_at_mut(1);
                let (qa, qb) = (q(a), q((a + 1).min(m - 1)));
                kernel.qk(qa, qb, kt, stride, np, cx.scales[r], sa, sb);
                kernel.softmax(sa, na, np, &mut mx_a[0], &mut sum_a[0], acc_a);
                kernel.softmax(sb, nb, np, &mut mx_b[0], &mut sum_b[0], acc_b);
                kernel.pv(sa, sb, vt, stride, np, acc_a, acc_b);
            }
            t0 += n;
        }
    }
}

/// Writes `R(-delta) q` (pairs of `rope`, angles from `table`, rotated in f64) as vector `i` of
/// `qrot`: the query that, against the stored keys, gives the logits of the shifted ones.
fn rotate_back(q: &[f32], rope: &crate::RopeConfig, table: &[f64], qrot: &mut [f32], i: usize) {
    let d = q.len();
    let dst = &mut qrot[i * d..(i + 1) * d];
    for (p, cs) in table.chunks_exact(2).enumerate() {
        let (a, b) = rope.pair(p);
        let (x, y) = (q[a] as f64, q[b] as f64);
        dst[a] = (x * cs[0] + y * cs[1]) as f32;
        dst[b] = (y * cs[0] - x * cs[1]) as f32;
    }
}

/// `L = m + ln l` of vector state `s` (`-inf` for an empty group).
fn state_lse(sc: &Scratch, s: usize) -> f64 {
    if sc.sum[s] > 0.0 {
        sc.mx[s] as f64 + sc.sum[s].ln()
    } else {
        f64::NEG_INFINITY
    }
}

/// The APE combination's weights of the two groups and its LSE, from `L_C` and `L_O`
/// (`reference::ape::combine`: the two-way merge of `(a, O_C)` and `(b, O_O)`).
fn combine(l_context: f64, l_causal: f64, ape: &ApeParams) -> (f64, f64, f64) {
    let a = ape::context_log_mass(l_context, ape);
    let m = a.max(l_causal);
    if m == f64::NEG_INFINITY {
        return (0.0, 0.0, m);
    }
    let lse = m + ((a - m).exp() + (l_causal - m).exp()).ln();
    ((a - lse).exp(), (l_causal - lse).exp(), lse)
}

/// Writes the block's outputs for KV head `g` from the states in `sc`.
fn finish(
    cx: &Ctx,
    rows: Range<usize>,
    g: usize,
    sc: &Scratch,
    out: &mut [f32],
    mut lse: Option<&mut [f32]>,
) {
    let (d, group, h) = (cx.dims.head_dim, cx.dims.group_size(), cx.dims.n_heads);
    let m = rows.len() * group;
    let mp = m + m % 2;
    for i in 0..m {
        let (c, o) = (i, mp + i);
        let (w_c, w_o, l) = combine(state_lse(sc, c), state_lse(sc, o), &cx.ape);
        let coef = |w: f64, s: usize| if w > 0.0 { (w / sc.sum[s]) as f32 } else { 0.0 };
        let (k_c, k_o) = (coef(w_c, c), coef(w_o, o));
        let at = (i / group) * h + g * group + i % group;
        let dst = &mut out[at * d..(at + 1) * d];
        let (acc_c, acc_o) = (&sc.acc[c * d..(c + 1) * d], &sc.acc[o * d..(o + 1) * d]);
        for ((y, &x_c), &x_o) in dst.iter_mut().zip(acc_c).zip(acc_o) {
            *y = k_c * x_c + k_o * x_o;
        }
        if let Some(lse) = lse.as_deref_mut() {
            lse[at] = l as f32;
        }
    }
}

/// Writes the states in `sc` of a block of `n_rows` rows as partial states `[vectors, 2, d + 1]`:
/// `O = acc / l`, then `L` (f32, as `reference::merge_states` takes them).
fn write_partial(cx: &Ctx, n_rows: usize, sc: &Scratch, part: &mut [f32]) {
    let d = cx.dims.head_dim;
    let m = n_rows * cx.dims.group_size();
    let mp = m + m % 2;
    for i in 0..m {
        for r in 0..2 {
            let s = r * mp + i;
            let dst = &mut part[(i * 2 + r) * (d + 1)..(i * 2 + r + 1) * (d + 1)];
            let l = state_lse(sc, s);
            dst[d] = l as f32;
            let inv = if l > f64::NEG_INFINITY {
                (1.0 / sc.sum[s]) as f32
            } else {
                0.0
            };
            for (y, &x) in dst[..d].iter_mut().zip(&sc.acc[s * d..(s + 1) * d]) {
                *y = x * inv;
            }
        }
    }
}

/// The outputs of the block `rows` from the partial states of its tasks: per group, the merge of
/// §2.2 over the splits (`L = m + ln sum_s exp(L_s - m)`, weights `exp(L_s - L)`), then the APE
/// combination, folded into one weight per partial state.
fn merge_partials(
    cx: &Ctx,
    plan: &Plan,
    rows: Range<usize>,
    partials: &[f32],
    region: usize,
    out: &mut [f32],
    mut lse: Option<&mut [f32]>,
) {
    let (d, group, h, nkv) = (
        cx.dims.head_dim,
        cx.dims.group_size(),
        cx.dims.n_heads,
        cx.dims.n_kv_heads,
    );
    let block = rows.start / plan.block_rows;
    for g in 0..nkv {
        let tasks = (block * nkv + g) * plan.splits..(block * nkv + g + 1) * plan.splits;
        let state = |t: usize, i: usize, r: usize| {
            let at = t * region + (i * 2 + r) * (d + 1);
            &partials[at..at + d + 1]
        };
        for i in 0..rows.len() * group {
            let group_lse = |r: usize| {
                let mx = tasks
                    .clone()
                    .map(|t| state(t, i, r)[d])
                    .fold(f32::NEG_INFINITY, f32::max) as f64;
                if mx == f64::NEG_INFINITY {
                    return mx;
                }
                let sum: f64 = tasks
                    .clone()
                    .map(|t| (state(t, i, r)[d] as f64 - mx).exp())
                    .sum();
                mx + sum.ln()
            };
            let (l_c, l_o) = (group_lse(0), group_lse(1));
            let (w_c, w_o, l) = combine(l_c, l_o, &cx.ape);
            let at = (i / group) * h + g * group + i % group;
            let dst = &mut out[at * d..(at + 1) * d];
            dst.fill(0.0);
            for (r, w, lr) in [(0, w_c, l_c), (1, w_o, l_o)] {
                if w == 0.0 {
                    continue;
                }
                for t in tasks.clone() {
                    let s = state(t, i, r);
                    if s[d] == f32::NEG_INFINITY {
                        continue;
                    }
                    let k = (w * (s[d] as f64 - lr).exp()) as f32;
                    for (y, &x) in dst.iter_mut().zip(&s[..d]) {
                        *y += k * x;
                    }
                }
            }
            if let Some(lse) = lse.as_deref_mut() {
                lse[at] = l as f32;
            }
        }
    }
}
