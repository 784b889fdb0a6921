//! Unit tests of the planning, the layout and the fixed shapes (no device).

use super::*;
use crate::params::{RopeConfig, RopeLayout};

/// One wave of an H100 SXM: 132 SMs, 2 thread blocks each.
const H100_WAVE: usize = 2 * 132;

fn dims(h: usize, kv: usize) -> AttentionDims {
    AttentionDims::new(h, kv, 128).expect("valid")
}

/// A segment of `len` keys at position 0 (fake addresses: planning and layout do not read them).
fn seg(len: usize, role: SegmentRole) -> SegmentRef {
    SegmentRef {
        k: 0x1000,
        v: 0x2000,
        len,
        pos_offset: 0,
        role,
        rope_shift: None,
    }
}

/// A sequence of `n_rows` rows at position 600.
fn seq(n_rows: usize, segments: &[SegmentRef]) -> SequenceRef<'_> {
    SequenceRef {
        n_rows,
        pos_offset: 600,
        segments,
        ape: ApeParams::default(),
    }
}

#[test]
fn context_tiles_come_first_and_empty_segments_are_dropped() {
    let segs = [
        seg(10, SegmentRole::Causal),
        seg(0, SegmentRole::Context),
        seg(130, SegmentRole::Context),
        seg(64, SegmentRole::Causal),
        seg(1, SegmentRole::Context),
    ];
    let p = plan(1000, &dims(32, 8), &segs, H100_WAVE, Some(1)).expect("valid");
    assert_eq!(p.order, vec![2, 4, 0, 3]);
    // 130 keys = 3 tiles, 1 key = 1 tile, 10 = 1, 64 = 1.
    assert_eq!(p.first_tile, vec![0, 3, 4, 5]);
    assert_eq!((p.n_ctx_tiles, p.n_causal_tiles), (4, 2));
    assert!(p.whole);
    assert_eq!(p.q_tiles, (1000usize * 4).div_ceil(64) as u32);
}

#[test]
fn large_prefill_runs_whole_and_decode_splits_within_groups() {
    let segs: Vec<SegmentRef> = (0..16)
        .map(|_| seg(2048, SegmentRole::Context))
        .chain([seg(64, SegmentRole::Causal)])
        .collect();
    // 4096 rows * 4 heads per KV head / 64 = 256 query tiles * 8 KV heads: plenty.
    let p = plan(4096, &dims(32, 8), &segs, H100_WAVE, None).expect("valid");
    assert!(p.whole);
    // One decode row: 1 query tile * 8 KV heads = 8 blocks: split.
    let p = plan(1, &dims(32, 8), &segs, H100_WAVE, None).expect("valid");
    assert!(!p.whole);
    assert!(p.n_ctx_splits >= 1 && p.n_causal_splits == 1);
    assert!(p.n_ctx_splits <= p.n_ctx_tiles);
    // One wave (2 thread blocks on each of 132 SMs), not more.
    assert_eq!(8 * p.n_splits() as usize, H100_WAVE);
}

/// Invariants on many shapes: every non-empty group gets a split, no group gets more splits
/// than tiles, automatic plans never exceed one wave (unless both groups need one each), and
/// the tile numbering is the running sum of the lengths.
#[test]
fn plan_invariants_hold_on_many_shapes() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n) as usize
    };
    for _ in 0..2000 {
        let n_kv = 1 + next(8);
        let dims = AttentionDims::new(n_kv * (1 + next(8)), n_kv, 64).expect("valid");
        let segs: Vec<SegmentRef> = (0..next(20))
            .map(|_| {
                let role = if next(2) == 0 {
                    SegmentRole::Context
                } else {
                    SegmentRole::Causal
                };
                seg(next(3000), role)
            })
            .collect();
        let rows = 1 + next(3000);
        let wave = (1 + next(150)) * (1 + next(3));
        let forced = if next(3) == 0 {
            Some(1 + next(100))
        } else {
            None
        };
        let p = plan(rows, &dims, &segs, wave, forced).expect("valid");
        let mut tile = 0u32;
        for (&i, &first) in p.order.iter().zip(&p.first_tile) {
            assert_eq!(first, tile);
            tile += segs[i].len.div_ceil(BLOCK_N) as u32;
        }
        assert_eq!(tile, p.n_ctx_tiles + p.n_causal_tiles);
        if p.whole {
            continue;
        }
        assert!(p.n_ctx_splits <= p.n_ctx_tiles && p.n_causal_splits <= p.n_causal_tiles);
        assert_eq!(p.n_ctx_splits > 0, p.n_ctx_tiles > 0);
        assert_eq!(p.n_causal_splits > 0, p.n_causal_tiles > 0);
        if forced.is_none() {
            let ctas = p.q_tiles as usize * dims.n_kv_heads * p.n_splits() as usize;
            assert!(ctas <= wave.max(2 * p.q_tiles as usize * dims.n_kv_heads));
        }
    }
}

#[test]
fn batch_plans_share_one_wave() {
    let d = dims(32, 8);
    let long = [seg(32 * 1024, SegmentRole::Context)];
    let short = [seg(1024, SegmentRole::Context)];
    // A batch of one is plan()'s plan.
    for rows in [1, 64, 4096] {
        let one = plan_batch(&[seq(rows, &long)], &d, H100_WAVE, None).expect("valid");
        assert_eq!(
            one,
            vec![plan(rows, &d, &long, H100_WAVE, None).expect("valid")]
        );
    }
    // Forced splits apply to every sequence as they would alone.
    let both = [seq(1, &long), seq(64, &short)];
    let forced = plan_batch(&both, &d, H100_WAVE, Some(5)).expect("valid");
    for (s, p) in both.iter().zip(&forced) {
        assert_eq!(
            p,
            &plan(s.n_rows, &d, s.segments, H100_WAVE, Some(5)).expect("valid")
        );
    }
    // Two decode rows: the wave is shared in proportion to the keys (32:1), within one wave.
    let auto = plan_batch(&[seq(1, &long), seq(1, &short)], &d, H100_WAVE, None).expect("valid");
    let ctas: u32 = auto.iter().map(|p| p.q_tiles * 8 * p.n_splits()).sum();
    assert!(ctas as usize <= H100_WAVE, "{auto:?}");
    assert!(auto[0].n_splits() > 8 * auto[1].n_splits(), "{auto:?}");
    // A sequence of two causal tiles (too short to split) runs whole beside ones that split (with
    // a context tile and a causal one it would split at the boundary: see below).
    let two = [seg(50, SegmentRole::Causal), seg(1, SegmentRole::Causal)];
    let mixed = plan_batch(&[seq(1, &long), seq(1, &two)], &d, H100_WAVE, None).expect("valid");
    assert!(!mixed[0].whole && mixed[1].whole, "{mixed:?}");
    // Enough query tiles for a wave: every sequence runs whole.
    let many: Vec<SequenceRef> = (0..40).map(|_| seq(1, &long)).collect();
    assert!(plan_batch(&many, &d, H100_WAVE, None)
        .expect("valid")
        .iter()
        .all(|p| p.whole));
}

#[test]
fn a_batch_layout_indexes_each_sequence() {
    let d = dims(8, 2);
    let a = [seg(500, SegmentRole::Context), seg(1, SegmentRole::Causal)];
    let b = [seg(0, SegmentRole::Context), seg(70, SegmentRole::Causal)];
    let c = [seg(3000, SegmentRole::Context)];
    let seqs = [
        seq(1, &a[..]),
        seq(0, &b[..]),
        seq(70, &b[..]),
        seq(1, &c[..]),
    ];
    let l = launch_layout(
        &seqs,
        &d,
        DType::BF16,
        &AttentionOccupancy::h100(),
        None,
        None,
    )
    .expect("valid");
    assert_eq!(l.seqs.len(), 4);
    // The empty segment is dropped: 2 + 1 + 1 + 1 descriptors.
    assert_eq!(l.descs.len(), 5);
    let (mut rows, mut segs, mut parts, mut blocks) = (0u32, 0u32, 0u32, 0u32);
    for (i, p) in l.seqs.iter().enumerate() {
        assert_eq!(
            (p.q_row0, p.seg0, p.part0, p.work0),
            (rows, segs, parts, blocks)
        );
        let splits = if p.whole == 1 {
            1
        } else {
            p.n_ctx_splits + p.n_causal_splits
        };
        let n = (p.n_rows * p.group).div_ceil(BLOCK_M as u32) * splits;
        let mine = l.work.iter().filter(|&&w| w == i as u32).count() as u32;
        assert_eq!(mine, n);
        assert!(l.work[blocks as usize..(blocks + n) as usize]
            .iter()
            .all(|&w| w == i as u32));
        rows += p.n_rows;
        segs += p.n_segments;
        if p.whole == 0 {
            parts += splits * p.n_rows * p.n_heads;
        }
        blocks += n;
    }
    assert_eq!(l.grid, (blocks, 2, 1));
    assert_eq!(l.lse_len, parts as usize);
    assert_eq!(l.o_len, parts as usize * 128);
    // Some sequence splits: a split counter per thread block of the grid.
    assert!(l.seqs.iter().any(|p| p.whole == 0));
    assert_eq!(l.counters_len, blocks as usize * 2);
    // One sequence: its parameters travel by value, no arrays.
    let one = launch_layout(
        &seqs[..1],
        &d,
        DType::BF16,
        &AttentionOccupancy::h100(),
        None,
        None,
    )
    .expect("valid");
    assert!(one.seqs.is_empty() && one.work.is_empty());
    assert_eq!(one.launch.n_sequences, 1);
    assert!(launch_layout(
        &[],
        &d,
        DType::BF16,
        &AttentionOccupancy::h100(),
        None,
        None
    )
    .is_err());
    // A sequence without rows never splits, even when splits are forced: beside a whole
    // sequence, nothing is left to combine, and no split counters are needed.
    let long = [seg(200, SegmentRole::Context)];
    let short = [seg(10, SegmentRole::Causal)];
    let l = launch_layout(
        &[seq(1, &short[..]), seq(0, &long[..])],
        &d,
        DType::BF16,
        &AttentionOccupancy::h100(),
        Some(2),
        None,
    )
    .expect("valid");
    assert!(l.seqs.iter().all(|p| p.whole == 1));
    assert_eq!(l.counters_len, 0);
    assert_eq!(l.grid.0, 1);
}

/// The capacity bounds of FixedShape::new: on many random batches within a capacity (and on
/// batches that fill it), with chosen and forced splits, the plan always fits the fixed
/// shape, and its image puts every part at the shape's offsets, the idle sequence after the
/// real ones and the surplus thread blocks on it. Slack is measured too: a capacity an engine
/// sizes for its decode batch does not launch many times the thread blocks it needs.
#[test]
fn every_batch_within_a_capacity_fits_its_fixed_shape() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1)) as usize
    };
    let shift = RopeShift {
        rope: RopeConfig::new(64, 10_000.0, RopeLayout::Neox).expect("valid"),
        delta: 5,
    };
    for case in 0..3000 {
        let n_kv = 1 + next(8);
        let dims = AttentionDims::new(n_kv * [1, 2, 4, 8, 80][next(5)], n_kv, 64).expect("valid");
        let sms = 1 + next(150);
        let blocks_per_sm = 1 + next(3);
        let prefill = Occupancy {
            sm_count: sms,
            blocks_per_sm,
            blocks_per_sm_with_shifts: 1 + next(blocks_per_sm as u64),
            stages: 2,
            stages_with_shifts: 2,
        };
        // A fixed launch runs the prefill tile whatever the decode tile's residency.
        let occupancy = AttentionOccupancy {
            prefill,
            wide: prefill,
            decode: Occupancy {
                blocks_per_sm: 4,
                stages: 4,
                ..prefill
            },
        };
        let forced = (next(3) == 0).then(|| 1 + next(12));
        let most_rows = if next(2) == 0 { 64 } else { 3000 };
        let mut cap = BatchCapacity {
            sequences: 1 + next(40),
            rows: 1 + next(most_rows),
            segments: 1 + next(60),
            rows_per_sequence: 0,
        };
        // A batch within the capacity; every other one fills it.
        let full = case % 2 == 0;
        let n_seqs = if full {
            cap.sequences
        } else {
            1 + next(cap.sequences as u64)
        };
        let mut rows = vec![0usize; n_seqs];
        let total_rows = if full {
            cap.rows
        } else {
            next(cap.rows as u64 + 1)
        };
        for _ in 0..total_rows {
            rows[next(n_seqs as u64)] += 1;
        }
        // Every other capacity bounds each sequence's rows (the fewest that hold these, or a few
        // more): a bound of up to 16 packed rows runs the decode tile's kernel.
        if next(2) == 0 {
            cap.rows_per_sequence = rows.iter().copied().max().unwrap_or(0).max(1) + next(3);
        }
        let options = SegmentedAttentionOptions {
            num_splits: forced,
            tile: None,
        };
        let shape = FixedShape::new(&cap, &dims, &occupancy, &options).expect("valid capacity");
        assert_eq!(
            shape.tile,
            cap.tile_shape(dims.group_size(), forced),
            "{cap:?}"
        );
        let mut n_segs = vec![0usize; n_seqs];
        let total_segs = if full {
            cap.segments
        } else {
            next(cap.segments as u64 + 1)
        };
        for _ in 0..total_segs {
            n_segs[next(n_seqs as u64)] += 1;
        }
        let refs: Vec<Vec<SegmentRef>> = n_segs
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| SegmentRef {
                        k: 0x1000,
                        v: 0x2000,
                        len: next(2000),
                        pos_offset: 0,
                        role: if next(2) == 0 {
                            SegmentRole::Context
                        } else {
                            SegmentRole::Causal
                        },
                        rope_shift: (next(4) == 0).then_some(shift),
                    })
                    .collect()
            })
            .collect();
        let seqs: Vec<SequenceRef> = rows
            .iter()
            .zip(&refs)
            .map(|(&n_rows, segments)| SequenceRef {
                n_rows,
                pos_offset: 3000,
                segments,
                ape: ApeParams::default(),
            })
            .collect();
        cap.check_fits(rows.iter().copied().zip(n_segs.iter().copied()))
            .expect("within the capacity");
        let layout = launch_layout(
            &seqs,
            &dims,
            DType::BF16,
            &occupancy,
            forced,
            Some(shape.tile),
        )
        .expect("valid");
        let image = shape
            .image(&layout)
            .unwrap_or_else(|e| panic!("{e}: {cap:?} {dims:?} {occupancy:?} {forced:?}"));
        assert_eq!(image.len(), shape.bytes);
        let at = |i: usize, len: usize| &image[shape.offsets[i]..shape.offsets[i] + len];
        let size = std::mem::size_of::<SegmentDesc>();
        assert_eq!(
            at(0, layout.descs.len() * size),
            bytemuck::cast_slice::<_, u8>(&layout.descs)
        );
        let params: &[SegmentedAttentionParams] = bytemuck::cast_slice(at(2, shape.seq_slots * 80));
        let work: &[u32] = bytemuck::cast_slice(at(3, shape.blocks as usize * 4));
        let real = work.iter().filter(|&&w| (w as usize) < n_seqs).count();
        assert_eq!(real, layout.grid.0 as usize);
        assert!(work[real..].iter().all(|&w| w as usize == n_seqs));
        assert!(params[n_seqs..]
            .iter()
            .all(|p| p.whole == 1 && p.n_rows == 0));
        assert_eq!(shape.launch_params().n_sequences as usize, shape.seq_slots);
        if forced.is_none() && cap.rows <= 64 && full {
            // A decode-sized capacity, full: at most one wave of surplus (and a block per
            // few-row sequence split at the boundary).
            assert!(
                shape.blocks as usize - real
                    <= occupancy.of(shape.tile).wave(false).div_ceil(n_kv) + 2 * cap.sequences,
                "{} blocks for {real}: {cap:?}",
                shape.blocks
            );
        }
    }
    let d = dims(8, 2);
    let cap = |sequences, rows, segments| BatchCapacity {
        sequences,
        rows,
        segments,
        rows_per_sequence: 0,
    };
    let h100 = AttentionOccupancy::h100();
    let opts = |num_splits, tile| SegmentedAttentionOptions { num_splits, tile };
    let none = opts(None, None);
    assert!(FixedShape::new(&cap(0, 1, 1), &d, &h100, &none).is_err());
    assert!(FixedShape::new(&cap(1, 0, 1), &d, &h100, &none).is_err());
    assert!(FixedShape::new(&cap(1, 1, 0), &d, &h100, &none).is_err());
    assert!(FixedShape::new(&cap(MAX_BATCH_SEQUENCES, 1, 1), &d, &h100, &none).is_err());
    assert!(FixedShape::new(&cap(1, 1, 1), &d, &h100, &opts(Some(0), None)).is_err());
    assert!(FixedShape::new(&cap(1, usize::MAX / 2, 1), &d, &h100, &none).is_err());
    // A capturable batch runs its capacity's tile: asked for another, an error.
    assert!(FixedShape::new(
        &cap(1, 1, 1),
        &d,
        &h100,
        &opts(None, Some(TileShape::Prefill))
    )
    .is_ok());
    assert!(FixedShape::new(&cap(1, 1, 1), &d, &h100, &opts(None, Some(TileShape::Wide))).is_err());
    assert!(FixedShape::new(
        &cap(1, 1, 1),
        &d,
        &h100,
        &opts(None, Some(TileShape::Decode))
    )
    .is_err());
    // A bound of 4 rows per sequence (16 packed at group 4) runs the decode tile, past it the
    // prefill tile; a sequence over the bound does not fit.
    let per = |n| BatchCapacity {
        rows_per_sequence: n,
        ..cap(2, 10, 3)
    };
    assert_eq!(per(4).tile_shape(4, None), TileShape::Decode);
    assert_eq!(per(4).tile_shape(4, Some(1)), TileShape::Prefill);
    assert_eq!(per(5).tile_shape(4, None), TileShape::Prefill);
    assert_eq!(per(0).tile_shape(4, None), TileShape::Prefill);
    let fixed = FixedShape::new(&per(4), &d, &h100, &none).expect("valid");
    assert_eq!(
        (fixed.tile, fixed.stages, fixed.launch_params().stages),
        (TileShape::Decode, h100.decode.stages_with_shifts, 2)
    );
    assert!(per(4).check_fits([(4, 1), (4, 2)].into_iter()).is_ok());
    assert!(matches!(
        per(4).check_fits([(4, 1), (5, 2)].into_iter()),
        Err(Error::OutOfRange(m)) if m.contains("sequence 1") && m.contains("per sequence")
    ));
    let c = cap(2, 10, 3);
    assert!(c.check_fits([(5, 1), (5, 2)].into_iter()).is_ok());
    assert!(matches!(
        c.check_fits([(5, 1), (6, 2)].into_iter()),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(
        c.check_fits([(5, 2), (5, 2)].into_iter()),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(
        c.check_fits([(1, 0); 3].into_iter()),
        Err(Error::OutOfRange(_))
    ));
    assert!(matches!(
        c.check_fits(std::iter::empty()),
        Err(Error::Shape(_))
    ));
}

#[test]
fn forced_splits_are_clamped_to_the_tiles_and_zero_is_an_error() {
    let segs = [seg(64, SegmentRole::Context), seg(64, SegmentRole::Causal)];
    let p = plan(1, &dims(8, 8), &segs, H100_WAVE, Some(50)).expect("valid");
    assert_eq!((p.n_ctx_splits, p.n_causal_splits), (1, 1));
    assert!(plan(1, &dims(8, 8), &segs, H100_WAVE, Some(0)).is_err());
    // Only one group: its splits take everything.
    let segs = [seg(640, SegmentRole::Context)];
    let p = plan(1, &dims(8, 8), &segs, H100_WAVE, Some(4)).expect("valid");
    assert_eq!((p.n_ctx_splits, p.n_causal_splits), (4, 0));
    // No keys at all: a whole pass that writes -inf and zeros.
    let p = plan(3, &dims(8, 8), &[], H100_WAVE, None).expect("valid");
    assert!(p.whole && p.n_ctx_tiles == 0 && p.n_causal_tiles == 0);
}

#[test]
fn a_segment_past_32_bit_offsets_is_an_error_naming_it() {
    // 8 KV heads of 128: 2^21 rows is 2^31 elements, one past the limit.
    let d = dims(32, 8);
    let ok = seg((1 << 21) - 1, SegmentRole::Context);
    assert!(check_problem(&seq(1, std::slice::from_ref(&ok)), &d, "").is_ok());
    let segments = [
        seg(5, SegmentRole::Context),
        seg(1 << 21, SegmentRole::Causal),
    ];
    let err = check_problem(&seq(1, &segments), &d, "sequence 3: ")
        .expect_err("a segment of 2^31 elements")
        .to_string();
    assert!(err.contains("sequence 3: segment 1"), "{err}");
    assert!(err.contains("32-bit offsets"), "{err}");
    assert!(err.contains("split it"), "{err}");
}

#[test]
fn occupancy_follows_each_architectures_shared_memory() {
    // Head dim 128: 80 KiB of dynamic shared memory, 96 KiB with RoPE shifts, plus 384 bytes
    // static and the 1 KiB the runtime reserves per block. Registers (255 x 128 threads) allow 2.
    let h100 = Occupancy::modelled(&SmLimits::SM90, 132, TileShape::Prefill, 128);
    assert_eq!((h100.blocks_per_sm, h100.blocks_per_sm_with_shifts), (2, 2));
    assert_eq!(h100, Occupancy::h100());
    assert_eq!(h100.wave(false), H100_WAVE);
    // An A100's 164 KiB holds two plain blocks (162.75 KiB) but one with shifts (194.75 KiB).
    let a100 = Occupancy::modelled(&SmLimits::SM80, 108, TileShape::Prefill, 128);
    assert_eq!((a100.blocks_per_sm, a100.blocks_per_sm_with_shifts), (2, 1));
    assert_eq!((a100.wave(false), a100.wave(true)), (216, 108));
    // An L40S (compute capability 8.9) has 100 KiB: one block either way.
    let l40 = Occupancy::modelled(
        &SmLimits::of_compute_capability(8, 9).expect("known"),
        142,
        TileShape::Prefill,
        128,
    );
    assert_eq!((l40.blocks_per_sm, l40.blocks_per_sm_with_shifts), (1, 1));
    // Head dim 64 (40 and 48 KiB): registers, not shared memory, bind everywhere.
    for limits in [SmLimits::SM80, SmLimits::SM86, SmLimits::SM90] {
        let o = Occupancy::modelled(&limits, 100, TileShape::Prefill, 64);
        assert_eq!(
            (o.blocks_per_sm, o.blocks_per_sm_with_shifts),
            (2, 2),
            "{limits:?}"
        );
    }
    assert_eq!(SmLimits::of_compute_capability(7, 5), None);
    // Fewer registers let more blocks in; a block larger than the SM fits none.
    assert_eq!(SmLimits::SM90.blocks_per_sm(128, 96, 0), 5);
    assert_eq!(SmLimits::SM90.blocks_per_sm(128, 32, 200 * 1024), 1);
    assert_eq!(SmLimits::SM80.blocks_per_sm(128, 32, 200 * 1024), 0);
    // A wave never counts fewer than one block per SM.
    let none = Occupancy {
        sm_count: 10,
        blocks_per_sm: 0,
        blocks_per_sm_with_shifts: 0,
        stages: 2,
        stages_with_shifts: 2,
    };
    assert_eq!(none.wave(true), 10);
}

#[test]
fn a_launch_with_shifts_plans_for_the_smaller_wave() {
    // On an A100 a launch with RoPE shifts fits one block per SM, of either kernel: a decode row
    // splits its keys over half as many blocks as the same launch without shifts, and the prefill
    // tile's 16 query rows likewise.
    let a100 = AttentionOccupancy::modelled(&SmLimits::SM80, 108, 128);
    let d = dims(8, 8);
    let plain = [seg(64 * 1000, SegmentRole::Context)];
    let mut shifted = plain;
    shifted[0].rope_shift = Some(RopeShift {
        rope: RopeConfig::new(128, 10_000.0, RopeLayout::Neox).expect("valid"),
        delta: 3,
    });
    let launch = |rows: usize, segs: &[SegmentRef]| {
        let l =
            launch_layout(&[seq(rows, segs)], &d, DType::BF16, &a100, None, None).expect("valid");
        (l.shape, l.grid.0, l.launch.stages)
    };
    // Thread blocks per KV head (the grid's x), 8 heads of one query tile: 216 / 8 = 27 splits,
    // 108 / 8 = 13. The decode tile runs 2 stages at 2 blocks per SM without shifts; with them
    // it fits one block at any depth, and so takes the deepest, 4.
    assert_eq!(launch(1, &plain), (TileShape::Decode, 27, 2));
    assert_eq!(launch(1, &shifted), (TileShape::Decode, 13, 4));
    assert_eq!(launch(17, &plain), (TileShape::Prefill, 27, 2));
    assert_eq!(launch(17, &shifted), (TileShape::Prefill, 13, 2));
    // A shift by 0 reads the keys as stored: no table, the full wave.
    shifted[0].rope_shift.as_mut().expect("set").delta = 0;
    assert_eq!(launch(1, &shifted), (TileShape::Decode, 27, 2));
}

#[test]
fn the_decode_tile_takes_few_rows_and_the_stages_each_device_holds() {
    let d = AttentionDims::new(32, 8, 128).expect("valid");
    let both = [seg(640, SegmentRole::Context), seg(70, SegmentRole::Causal)];
    let shape = |rows: &[usize], splits| {
        let seqs: Vec<SequenceRef> = rows.iter().map(|&r| seq(r, &both)).collect();
        launch_layout(
            &seqs,
            &d,
            DType::BF16,
            &AttentionOccupancy::h100(),
            splits,
            None,
        )
        .expect("valid")
        .main
    };
    // Group 4: up to 4 rows per sequence pack into the decode tile's 16, in every sequence of a
    // batch (a sequence without rows included); one pass over every key asks for the prefill
    // tile, as does a fifth row.
    assert_eq!(shape(&[1], None), "segmented_attention_decode_bf16_d128");
    assert_eq!(
        shape(&[4, 1, 0], Some(3)),
        "segmented_attention_decode_bf16_d128"
    );
    assert_eq!(shape(&[1], Some(1)), "segmented_attention_bf16_d128");
    assert_eq!(shape(&[1, 5], None), "segmented_attention_bf16_d128");
    // Asked for the decode tile where it cannot run: an error, not a wrong answer.
    let forced = |rows: usize, splits| {
        launch_layout(
            &[seq(rows, &both)],
            &d,
            DType::BF16,
            &AttentionOccupancy::h100(),
            splits,
            Some(TileShape::Decode),
        )
    };
    assert!(forced(1, None).is_ok());
    assert!(forced(5, None).is_err());
    assert!(forced(1, Some(1)).is_err());
    // Stages per device (modelled): the most 64-key tiles in flight per SM with at least two
    // blocks per SM where that is possible. Head dim 128 (168 registers: 3 blocks at most):
    // 68, 100, 132 KiB at 2, 3, 4 stages; 16 KiB more with shifts.
    let decode = |limits: &SmLimits, head_dim| {
        let o = Occupancy::modelled(limits, 1, TileShape::Decode, head_dim);
        (
            o.stages,
            o.blocks_per_sm,
            o.stages_with_shifts,
            o.blocks_per_sm_with_shifts,
        )
    };
    assert_eq!(decode(&SmLimits::SM90, 128), (3, 2, 2, 2));
    assert_eq!(decode(&SmLimits::SM80, 128), (2, 2, 4, 1));
    assert_eq!(decode(&SmLimits::SM86, 128), (2, 1, 2, 1));
    // Head dim 64 (128 registers: 4 blocks at most): 34, 50, 66 KiB.
    assert_eq!(decode(&SmLimits::SM90, 64), (4, 3, 4, 3));
    assert_eq!(decode(&SmLimits::SM80, 64), (3, 3, 4, 2));
    assert_eq!(decode(&SmLimits::SM86, 64), (2, 2, 2, 2));
    // The prefill tile always runs 2 stages.
    for limits in [SmLimits::SM80, SmLimits::SM86, SmLimits::SM90] {
        let o = Occupancy::modelled(&limits, 1, TileShape::Prefill, 128);
        assert_eq!((o.stages, o.stages_with_shifts), (2, 2));
    }
}

#[test]
fn few_rows_across_the_boundary_split_there_so_every_warp_computes() {
    // 8 query heads over 2 KV heads (group 4): one decode row packs 4 rows.
    let d = AttentionDims::new(8, 2, 128).expect("valid");
    let both = [seg(640, SegmentRole::Context), seg(70, SegmentRole::Causal)];
    // A wave the query tiles already fill (2 blocks: one query tile x 2 KV heads).
    let p = plan(1, &d, &both, 2, None).expect("valid");
    assert!(!p.whole);
    assert_eq!((p.n_ctx_splits, p.n_causal_splits), (1, 1));
    // Up to 16 packed rows (4 rows of group 4), not 17.
    assert!(!plan(4, &d, &both, 2, None).expect("valid").whole);
    assert!(plan(5, &d, &both, 2, None).expect("valid").whole);
    // Asked for one pass, or no boundary to cross: whole.
    assert!(plan(1, &d, &both, 2, Some(1)).expect("valid").whole);
    assert!(plan(1, &d, &both[1..], 2, None).expect("valid").whole);
    assert!(plan(1, &d, &both[..1], 2, None).expect("valid").whole);
    // Two tiles in all, under a large wave, would also have run whole.
    let short = [seg(64, SegmentRole::Context), seg(5, SegmentRole::Causal)];
    let p = plan(1, &d, &short, H100_WAVE, None).expect("valid");
    assert_eq!((p.whole, p.n_ctx_splits, p.n_causal_splits), (false, 1, 1));
    // A batch that fills the wave: each decode row still splits at its boundary, and its rows'
    // partial states fit the fixed shape of a capturable batch of that capacity.
    let seqs = [seq(1, &both), seq(1, &short), seq(6, &both)];
    let plans = plan_batch(&seqs, &d, 2, None).expect("valid");
    let shape: Vec<_> = plans
        .iter()
        .map(|p| (p.whole, p.n_ctx_splits, p.n_causal_splits))
        .collect();
    assert_eq!(shape, vec![(false, 1, 1), (false, 1, 1), (true, 0, 0)]);
    let cap = BatchCapacity {
        sequences: 3,
        rows: 8,
        segments: 6,
        rows_per_sequence: 0,
    };
    let occupancy = Occupancy {
        sm_count: 1,
        blocks_per_sm: 2,
        blocks_per_sm_with_shifts: 2,
        stages: 2,
        stages_with_shifts: 2,
    };
    let occupancy = AttentionOccupancy {
        prefill: occupancy,
        wide: occupancy,
        decode: occupancy,
    };
    let fixed = FixedShape::new(&cap, &d, &occupancy, &SegmentedAttentionOptions::default())
        .expect("valid");
    let layout = launch_layout(
        &seqs,
        &d,
        DType::BF16,
        &occupancy,
        None,
        Some(TileShape::Prefill),
    )
    .expect("valid");
    fixed.image(&layout).expect("fits the fixed shape");
}

#[test]
fn the_wide_tile_takes_long_prefills_at_head_dim_64() {
    let h100 = AttentionOccupancy::h100();
    let d64 = AttentionDims::new(32, 8, 64).expect("valid");
    let d128 = AttentionDims::new(32, 8, 128).expect("valid");
    let ctx = [
        seg(3000, SegmentRole::Context),
        seg(700, SegmentRole::Causal),
    ];
    let launch = |d: &AttentionDims, rows: &[usize], splits, tile| {
        let seqs: Vec<SequenceRef> = rows.iter().map(|&r| seq(r, &ctx)).collect();
        launch_layout(&seqs, d, DType::BF16, &h100, splits, tile)
    };
    // One block of 8 warps per SM: a wave of 132. 600 rows of group 4 pack into 19 tiles of 128
    // rows, times 8 KV heads: 152 blocks fill it; 200 rows (7 tiles, 56 blocks) would split.
    assert_eq!(h100.wide.wave(false), 132);
    let l = launch(&d64, &[600], None, None).expect("valid");
    assert_eq!((l.shape, l.grid.0), (TileShape::Wide, 19));
    assert_eq!(l.main, "segmented_attention_wide_bf16_d64");
    assert_eq!(
        launch(&d64, &[600], Some(1), None).expect("valid").shape,
        TileShape::Wide
    );
    assert_eq!(
        launch(&d64, &[200], None, None).expect("valid").shape,
        TileShape::Prefill
    );
    // Not at head dim 128, nor beside a short sequence (it would run on one warp of 8); a
    // sequence without rows does not count.
    assert_eq!(
        launch(&d128, &[600], None, None).expect("valid").shape,
        TileShape::Prefill
    );
    assert_eq!(
        launch(&d64, &[600, 10], None, None).expect("valid").shape,
        TileShape::Prefill
    );
    assert_eq!(
        launch(&d64, &[600, 0], None, None).expect("valid").shape,
        TileShape::Wide
    );
    // Asked for: the wide tile takes anything, the decode tile only few rows.
    let forced = launch(&d128, &[1, 70], Some(3), Some(TileShape::Wide)).expect("valid");
    assert_eq!((forced.shape, forced.launch.stages), (TileShape::Wide, 2));
    assert_eq!(forced.main, "segmented_attention_wide_bf16_d128");
    assert!(launch(&d64, &[600], None, Some(TileShape::Decode)).is_err());
    // Its shared memory: 128 query rows, two K and two V tiles; 128 more rows with shifts.
    assert_eq!(TileShape::Wide.smem_bytes(64, 2), (48 * 1024, 64 * 1024));
    assert_eq!(TileShape::Wide.threads(), 256);
}

#[test]
fn a_tile_that_does_not_fit_the_device_is_never_chosen_and_refused_when_asked_for() {
    // 100 KiB per SM (an L40S, compute capability 8.9): the wide tile at head dim 128 takes
    // 96 KiB, and 128 with RoPE shifts, which no block can have.
    let l40 = AttentionOccupancy::modelled(
        &SmLimits::of_compute_capability(8, 9).expect("known"),
        142,
        128,
    );
    assert!(l40.wide.fits(false) && !l40.wide.fits(true));
    assert!(l40.prefill.fits(true) && l40.decode.fits(true));
    let d = AttentionDims::new(32, 8, 128).expect("valid");
    let mut shifted = [
        seg(3000, SegmentRole::Context),
        seg(700, SegmentRole::Causal),
    ];
    shifted[0].rope_shift = Some(RopeShift {
        rope: RopeConfig::new(128, 10_000.0, RopeLayout::Neox).expect("valid"),
        delta: 3,
    });
    let launch = |tile| launch_layout(&[seq(600, &shifted)], &d, DType::BF16, &l40, None, tile);
    assert_eq!(launch(None).expect("valid").shape, TileShape::Prefill);
    let err = launch(Some(TileShape::Wide)).expect_err("does not fit");
    assert!(
        matches!(&err, Error::NoDevice(m) if m.contains("segmented_attention_wide_bf16_d128")),
        "{err}"
    );
    // Without shifts it fits (one block per SM), and runs when asked for.
    let plain = [
        seg(3000, SegmentRole::Context),
        seg(700, SegmentRole::Causal),
    ];
    let l = launch_layout(
        &[seq(600, &plain)],
        &d,
        DType::BF16,
        &l40,
        None,
        Some(TileShape::Wide),
    )
    .expect("fits");
    assert_eq!(l.shape, TileShape::Wide);
}
