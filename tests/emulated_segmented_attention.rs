//! The segmented attention kernels (`kernels/segmented_attention.cu`) on the kernel emulator,
//! against the CPU oracle: the sweeps of `tests/common/attention.rs`, which the GPU runs in
//! `tests/gpu_segmented_attention.rs`, here on any machine. Consecutive launches cycle through the
//! emulator's four schedules (thread order x cp.async timing). The sweep is the GPU's full one;
//! `APE_EMU_QUICK=1` runs the reduced one (`APE_GPU_QUICK`'s) instead.

#[path = "common/attention.rs"]
mod attention;
mod common;

use ape_attn::cuda::{BatchCapacity, DType, SegmentedAttentionOptions};
use ape_attn::emulator::{self, EmulatorOptions};
use ape_attn::reference;
use ape_attn::{ApeParams, AttentionDims, Error, SegmentRole};
use attention::{make_case, Backend, Case};
use common::{seeded, Emulated};

fn run_with(case: &Case, opts: &EmulatorOptions) -> ape_attn::Result<(Vec<f32>, Vec<f32>)> {
    let out = emulator::segmented_attention(
        case.dtype,
        &case.reference_query(),
        &case.reference_segments(),
        &case.dims,
        &case.ape,
        &SegmentedAttentionOptions {
            num_splits: case.splits,
            tile: case.tile,
        },
        opts,
    )?;
    Ok((out.out, out.lse))
}

impl Backend for Emulated {
    fn run(&self, case: &Case) -> (Vec<f32>, Vec<f32>) {
        let opts = self.next();
        run_with(case, &opts).unwrap_or_else(|e| panic!("{e} ({opts:?}, {case:?})"))
    }

    fn quick(&self) -> bool {
        std::env::var("APE_EMU_QUICK").is_ok_and(|v| v == "1")
    }

    fn run_batch(&self, cases: &[Case], splits: Option<usize>) -> (Vec<f32>, Vec<f32>) {
        let opts = self.next();
        let (q, segments) = host_batch(cases);
        let out = emulator::segmented_attention_batch(
            cases[0].dtype,
            &q,
            &sequences(cases, &segments),
            &cases[0].dims,
            &SegmentedAttentionOptions {
                num_splits: splits,
                tile: None,
            },
            &opts,
        )
        .unwrap_or_else(|e| panic!("{e} ({opts:?}, {cases:?})"));
        (out.out, out.lse)
    }

    fn run_capturable(
        &self,
        cases: &[Case],
        capacity: &BatchCapacity,
        splits: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let opts = self.next();
        let (q, segments) = host_batch(cases);
        let out = emulator::capturable_batch(
            cases[0].dtype,
            &q,
            &sequences(cases, &segments),
            &cases[0].dims,
            capacity,
            &SegmentedAttentionOptions {
                num_splits: splits,
                tile: None,
            },
            &opts,
        )
        .unwrap_or_else(|e| panic!("{e} ({opts:?}, {capacity:?}, {cases:?})"));
        (out.out, out.lse)
    }
}

/// The packed query and each sequence's segments of `cases`, as the oracle takes them.
fn host_batch(cases: &[Case]) -> (Vec<f32>, Vec<Vec<reference::Segment<'_>>>) {
    let q = cases.iter().flat_map(|c| c.q.iter().copied()).collect();
    (q, cases.iter().map(|c| c.reference_segments()).collect())
}

/// `cases` as the sequences of a batch, over their segments from [`host_batch`].
fn sequences<'a>(
    cases: &[Case],
    segments: &'a [Vec<reference::Segment<'a>>],
) -> Vec<reference::BatchSequence<'a>> {
    cases
        .iter()
        .zip(segments)
        .map(|(c, segs)| reference::BatchSequence {
            n_rows: c.n_rows,
            pos_offset: c.q_pos,
            segments: segs,
            ape: c.ape,
        })
        .collect()
}

#[test]
fn lengths_and_split_modes() {
    attention::lengths_and_split_modes(&Emulated::default());
}

#[test]
fn question_lengths_prefill() {
    attention::question_lengths_prefill(&Emulated::default());
}

#[test]
fn gqa_head_dims_and_ape_parameters() {
    attention::gqa_head_dims_and_ape_parameters(&Emulated::default());
}

#[test]
fn many_segments_including_empty_ones() {
    attention::many_segments_including_empty_ones(&Emulated::default());
}

#[test]
fn plain_attention_and_edge_cases() {
    attention::plain_attention_and_edge_cases(&Emulated::default());
}

#[test]
fn rope_shifted_segments() {
    attention::rope_shifted_segments(&Emulated::default());
}

#[test]
fn fused_shift_against_separate_shift() {
    attention::fused_shift_against_separate_shift(&Emulated::default());
}

#[test]
fn batches_of_sequences() {
    attention::batches_of_sequences(&Emulated::default());
}

#[test]
fn capturable_batches() {
    attention::capturable_batches(&Emulated::default());
}

#[test]
fn many_splits() {
    attention::many_splits(&Emulated::default());
}

#[test]
fn split_launches_in_a_row_give_the_same_bits() {
    attention::split_launches_in_a_row_give_the_same_bits(&Emulated::default());
}

/// Split mode's counters: a second launch on the same workspace (what the CUDA launcher's next
/// launch and a CUDA graph's next replay find) gives the first launch's bits, under every
/// schedule and over several OS threads, for the batched launcher and a capturable batch's fixed
/// grid; the emulator fails a launch that leaves a counter other than zero, or a relaunch that
/// differs. Both launches match the oracle.
#[test]
fn a_relaunch_on_the_same_workspace_gives_the_same_bits() {
    let mut r = seeded("a_relaunch_on_the_same_workspace_gives_the_same_bits");
    let dims = AttentionDims::new(8, 2, 64).unwrap();
    let cases: Vec<Case> = [(1, Some(8)), (1, None), (30, Some(3)), (2, Some(5))]
        .into_iter()
        .map(|(n_rows, splits)| {
            make_case(
                &mut r,
                dims,
                DType::BF16,
                3,
                &[450, 100],
                n_rows,
                ApeParams::default(),
                splits,
            )
        })
        .collect();
    let schedules = EmulatorOptions {
        relaunch: true,
        threads: 2,
        ..EmulatorOptions::default()
    }
    .schedules();
    for (case, opts) in cases.iter().zip(schedules.iter().cycle()) {
        assert!(
            attention::planned_splits(case, &opts.occupancy) > 1,
            "{case:?}"
        );
        let (out, lse) = run_with(case, opts).unwrap_or_else(|e| panic!("{e} ({case:?})"));
        attention::assert_ok(case, attention::compare(&mut r, case, case, &out, &lse, 16));
    }
    // A capturable batch of the four, with forced splits and with chosen ones.
    let (q, segments) = host_batch(&cases);
    let capacity = attention::capacity_of(&cases, [1, 3, 2]);
    for (splits, opts) in [Some(4), None].into_iter().zip(&schedules[2..]) {
        let got = emulator::capturable_batch(
            DType::BF16,
            &q,
            &sequences(&cases, &segments),
            &dims,
            &capacity,
            &SegmentedAttentionOptions {
                num_splits: splits,
                tile: None,
            },
            opts,
        )
        .unwrap_or_else(|e| panic!("{e} (splits {splits:?})"));
        let (mut row, h, d) = (0, dims.n_heads, dims.head_dim);
        for case in &cases {
            let rows = row..row + case.n_rows;
            let out = &got.out[rows.start * h * d..rows.end * h * d];
            let lse = &got.lse[rows.start * h..rows.end * h];
            attention::assert_ok(case, attention::compare(&mut r, case, case, out, lse, 8));
            row = rows.end;
        }
    }
}

/// The decode tile's kernel at each pipeline depth it runs with (2, 3 and 4 stages, with and
/// without RoPE shifts), as planned for an H100, an A100 and a 100 KiB-per-SM part, against the
/// oracle: decode rows and short questions (up to 16 packed rows), APE across the context/causal
/// boundary, shifted blocks, forced and chosen splits. Copies land late (only at the wait that
/// guarantees them) every other launch, so a stage read before its copy is waited for shows.
#[test]
fn the_decode_tile_at_every_pipeline_depth() {
    use ape_attn::cuda::segmented_attention::{AttentionOccupancy, SmLimits, TileShape};
    let mut r = seeded("the_decode_tile_at_every_pipeline_depth");
    let mut depths = std::collections::BTreeSet::new();
    let devices = [
        (SmLimits::SM90, 132),
        (SmLimits::SM80, 108),
        (SmLimits::SM86, 84),
    ];
    let mut launch = 0;
    // The three devices as modelled, and the H100 once more at 3 stages whatever the launch: no
    // modelled device chooses 3 with RoPE shifts.
    for (limits, sms, forced) in
        devices
            .iter()
            .map(|&(l, s)| (l, s, None))
            .chain([(SmLimits::SM90, 132, Some(3))])
    {
        for head_dim in [64, 128] {
            let mut occupancy = AttentionOccupancy::modelled(&limits, sms, head_dim);
            if let Some(stages) = forced {
                occupancy.decode.stages = stages;
                occupancy.decode.stages_with_shifts = stages;
            }
            let rope = attention::rope_configs(head_dim)[0];
            let gqa4 = AttentionDims::new(8, 2, head_dim).unwrap();
            let gqa8 = AttentionDims::new(16, 2, head_dim).unwrap();
            let cases = [
                make_case(
                    &mut r,
                    gqa4,
                    DType::BF16,
                    5,
                    &[700, 300],
                    1,
                    ApeParams::default(),
                    None,
                ),
                make_case(
                    &mut r,
                    gqa4,
                    DType::F16,
                    70,
                    &[200],
                    4,
                    ApeParams::default(),
                    Some(3),
                ),
                make_case(
                    &mut r,
                    gqa8,
                    DType::BF16,
                    9,
                    &[400],
                    2,
                    ApeParams::plain(),
                    None,
                ),
                attention::block_attention_case(
                    &mut r,
                    gqa4,
                    DType::BF16,
                    rope,
                    &[300, 65, 7, 200],
                    1,
                    ApeParams::default(),
                    None,
                ),
            ];
            for case in &cases {
                let shifts = case
                    .segments
                    .iter()
                    .any(|s| s.rope_shift.is_some_and(|x| x.delta != 0));
                assert_eq!(
                    TileShape::of_launch(
                        &[case.n_rows],
                        &case.dims,
                        case.splits,
                        &occupancy,
                        shifts
                    ),
                    TileShape::Decode
                );
                depths.insert((occupancy.decode.stages(shifts), shifts));
                let opts = EmulatorOptions {
                    occupancy,
                    late_copies: launch % 2 == 1,
                    threads: 2,
                    ..EmulatorOptions::default()
                };
                launch += 1;
                let (out, lse) =
                    run_with(case, &opts).unwrap_or_else(|e| panic!("{e} ({limits:?}, {case:?})"));
                attention::assert_ok(case, attention::compare(&mut r, case, case, &out, &lse, 16));
            }
        }
    }
    for stages in 2..=4 {
        for shifts in [false, true] {
            assert!(
                depths.contains(&(stages, shifts)),
                "{stages} stages, shifts {shifts}: {depths:?}"
            );
        }
    }
}

/// The wide tile's kernel (128 rows, 8 warps) against the oracle, forced on cases the launcher
/// would give the other tiles too: a tail tile of few rows (on one warp), several query tiles,
/// GQA 1 and 4, head dims 64 and 128, bf16 and f16, whole (APE across the context/causal
/// boundary in one pass) and split, RoPE-shifted blocks; and chosen by the launcher itself on a
/// device of one SM, whose wave a 65-row question already fills.
#[test]
fn the_wide_tile() {
    use ape_attn::cuda::segmented_attention::{AttentionOccupancy, SmLimits, TileShape};
    let mut r = seeded("the_wide_tile");
    let schedules = EmulatorOptions {
        threads: 2,
        ..EmulatorOptions::default()
    }
    .schedules();
    let run = |r: &mut common::Seeded, case: &Case, opts: &EmulatorOptions| {
        let (out, lse) =
            run_with(case, opts).unwrap_or_else(|e| panic!("{e} ({opts:?}, {case:?})"));
        attention::assert_ok(case, attention::compare(r, case, case, &out, &lse, 24));
    };
    let mut launch = 0;
    for head_dim in [64, 128] {
        for (n_heads, n_rows, splits) in [
            (8, 1, None),
            (8, 7, Some(1)),
            (8, 40, None),
            (2, 130, Some(3)),
            (8, 65, Some(1)),
        ] {
            let dims = AttentionDims::new(n_heads, 2, head_dim).unwrap();
            let dtype = r.pick(&[DType::BF16, DType::F16]);
            let ape = r.pick(&[ApeParams::default(), ApeParams::plain()]);
            let mut case = make_case(&mut r, dims, dtype, 9, &[300, 70], n_rows, ape, splits);
            case.tile = Some(TileShape::Wide);
            run(&mut r, &case, &schedules[launch % 4]);
            launch += 1;
        }
        let rope = attention::rope_configs(head_dim)[2];
        let dims = AttentionDims::new(8, 2, head_dim).unwrap();
        for splits in [Some(1), None] {
            let mut case = attention::block_attention_case(
                &mut r,
                dims,
                DType::BF16,
                rope,
                &[65, 7, 200],
                50,
                ApeParams::default(),
                splits,
            );
            case.tile = Some(TileShape::Wide);
            run(&mut r, &case, &schedules[launch % 4]);
            launch += 1;
        }
    }
    // The launcher's own choice, on one SM (a wave of one wide block) at head dim 64.
    let small = AttentionOccupancy::modelled(&SmLimits::SM90, 1, 64);
    let dims = AttentionDims::new(8, 2, 64).unwrap();
    let case = make_case(
        &mut r,
        dims,
        DType::BF16,
        20,
        &[500],
        17,
        ApeParams::default(),
        None,
    );
    assert_eq!(
        TileShape::of_launch(&[case.n_rows], &case.dims, None, &small, false),
        TileShape::Wide
    );
    let opts = EmulatorOptions {
        occupancy: small,
        ..schedules[3]
    };
    run(&mut r, &case, &opts);
}

/// Every schedule is one a GPU may produce, and each thread's arithmetic is the same under all of
/// them: a kernel without races gives the same bits under the four.
#[test]
fn the_four_schedules_give_the_same_bits() {
    let mut r = seeded("the_four_schedules_give_the_same_bits");
    for (head_dim, splits) in [(64, Some(1)), (128, None), (128, Some(3))] {
        let dims = AttentionDims::new(8, 2, head_dim).unwrap();
        let case = make_case(
            &mut r,
            dims,
            DType::BF16,
            9,
            &[150, 64],
            33,
            ApeParams::default(),
            splits,
        );
        let runs: Vec<(Vec<u32>, Vec<u32>)> = EmulatorOptions::default()
            .schedules()
            .iter()
            .map(|opts| {
                let (out, lse) = run_with(&case, opts).unwrap();
                let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect();
                (bits(out), bits(lse))
            })
            .collect();
        for run in &runs[1..] {
            assert!(run == &runs[0], "schedules disagree: {case:?}");
        }
    }
}

/// The emulated launcher validates as the CUDA one does.
#[test]
fn bad_inputs_are_errors() {
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    let q = vec![0.0; 4 * 8 * 128];
    let k = vec![0.0; 10 * 2 * 128];
    let query = ape_attn::reference::Query {
        data: &q,
        n_rows: 4,
        pos_offset: 0,
    };
    let seg = |k: &'static [f32], len| ape_attn::reference::Segment {
        k,
        v: k,
        len,
        pos_offset: 0,
        role: SegmentRole::Context,
        rope_shift: None,
    };
    let k: &'static [f32] = Box::leak(k.into_boxed_slice());
    let ape = ApeParams::default();
    let opts = SegmentedAttentionOptions::default();
    let emu = EmulatorOptions::default();
    let run = |dtype, query: &ape_attn::reference::Query, segs: &[_], dims: &AttentionDims| {
        emulator::segmented_attention(dtype, query, segs, dims, &ape, &opts, &emu)
    };
    assert!(run(DType::BF16, &query, &[seg(k, 10)], &dims).is_ok());
    assert!(matches!(
        run(DType::F32, &query, &[seg(k, 10)], &dims),
        Err(Error::DType(_))
    ));
    assert!(matches!(
        run(DType::BF16, &query, &[seg(k, 9)], &dims),
        Err(Error::Shape(_))
    ));
    let d96 = AttentionDims::new(8, 2, 96).unwrap();
    let q96 = vec![0.0; 4 * 8 * 96];
    let query96 = ape_attn::reference::Query {
        data: &q96,
        n_rows: 4,
        pos_offset: 0,
    };
    assert!(matches!(
        run(DType::BF16, &query96, &[], &d96),
        Err(Error::UnsupportedHeadDim { .. })
    ));
    let far = ape_attn::reference::Query {
        pos_offset: i32::MAX as usize,
        ..query
    };
    assert!(matches!(
        run(DType::BF16, &far, &[], &dims),
        Err(Error::OutOfRange(_))
    ));
    // Batches: the rows must add up to the query's, and limit errors name the sequence.
    let good = [seg(k, 10)];
    let bad = [seg(k, 9)];
    let batch = |rows: [usize; 2], second_pos: usize, second: &[reference::Segment]| {
        let seqs = [
            reference::BatchSequence {
                n_rows: rows[0],
                pos_offset: 0,
                segments: &good,
                ape,
            },
            reference::BatchSequence {
                n_rows: rows[1],
                pos_offset: second_pos,
                segments: second,
                ape: ApeParams::plain(),
            },
        ];
        emulator::segmented_attention_batch(DType::BF16, &q, &seqs, &dims, &opts, &emu)
    };
    assert!(batch([1, 3], 10, &good).is_ok());
    assert!(matches!(batch([1, 2], 10, &good), Err(Error::Shape(_))));
    assert!(matches!(batch([1, 3], i32::MAX as usize, &good),
        Err(Error::OutOfRange(m)) if m.starts_with("sequence 1: ")));
    assert!(matches!(batch([1, 3], 10, &bad),
        Err(Error::Shape(m)) if m.starts_with("sequence 1: segment 0")));
    // A capturable batch validates the same way, and refuses what exceeds its capacity.
    let seqs = |second: &'static [reference::Segment<'static>]| {
        [
            reference::BatchSequence {
                n_rows: 1,
                pos_offset: 0,
                segments: Box::leak(Box::new(good)),
                ape,
            },
            reference::BatchSequence {
                n_rows: 3,
                pos_offset: 10,
                segments: second,
                ape: ApeParams::plain(),
            },
        ]
    };
    let good: &'static [reference::Segment] = Box::leak(Box::new([seg(k, 10)]));
    let bad: &'static [reference::Segment] = Box::leak(Box::new([seg(k, 9)]));
    let fixed = |capacity: [usize; 3], second| {
        let capacity = BatchCapacity {
            sequences: capacity[0],
            rows: capacity[1],
            segments: capacity[2],
            rows_per_sequence: 0,
        };
        emulator::capturable_batch(
            DType::BF16,
            &q,
            &seqs(second),
            &dims,
            &capacity,
            &opts,
            &emu,
        )
    };
    assert!(fixed([2, 4, 2], good).is_ok());
    assert!(matches!(fixed([2, 4, 2], bad),
        Err(Error::Shape(m)) if m.starts_with("sequence 1: segment 0")));
    for capacity in [[1, 4, 2], [2, 3, 2], [2, 4, 1]] {
        assert!(
            matches!(fixed(capacity, good), Err(Error::OutOfRange(ref m)) if m.contains("capacity")),
            "{capacity:?}"
        );
    }
    assert!(matches!(
        fixed([0, 4, 2], good),
        Err(Error::InvalidParameter { .. })
    ));
}
