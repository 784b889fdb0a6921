//! The CPU segmented attention kernels (`src/cpu/segmented_attention.rs`) against the f64 oracle:
//! every sweep of `tests/common/attention.rs` that the GPU and the kernel emulator run, here with
//! the CPU's own bars (f32 throughout, no 16-bit rounding inside): relative L2 below 1e-5, LSE
//! within 1e-5. The cases' inputs are rounded to bf16 or f16 as the sweeps draw them; the CPU
//! kernel takes those values as f32. The GPU's split count (`Case::splits`) does not apply: the
//! CPU plans its own splits of the keys.

#[path = "common/attention.rs"]
mod attention;
mod common;

use ape_attn::cpu;
use ape_attn::cuda::{BatchCapacity, DType};
use ape_attn::reference;
use attention::{Backend, Case};

/// The CPU kernels as a backend of the shared sweeps.
struct Cpu;

impl Backend for Cpu {
    fn run(&self, case: &Case) -> (Vec<f32>, Vec<f32>) {
        let (h, d) = (case.dims.n_heads, case.dims.head_dim);
        let mut out = vec![f32::NAN; case.n_rows * h * d];
        let mut lse = vec![f32::NAN; case.n_rows * h];
        cpu::segmented_attention_into(
            &case.reference_query(),
            &case.reference_segments(),
            &case.dims,
            &case.ape,
            &mut out,
            Some(&mut lse),
        )
        .unwrap_or_else(|e| panic!("{e}: {case:?}"));
        (out, lse)
    }

    fn quick(&self) -> bool {
        false
    }

    fn run_batch(&self, cases: &[Case], _splits: Option<usize>) -> (Vec<f32>, Vec<f32>) {
        let rows: usize = cases.iter().map(|c| c.n_rows).sum();
        let dims = cases[0].dims;
        let mut out = vec![f32::NAN; rows * dims.n_heads * dims.head_dim];
        let mut lse = vec![f32::NAN; rows * dims.n_heads];
        run_batch_into(cases, &mut out, &mut lse);
        (out, lse)
    }

    /// The CPU has no graphs to capture: a capturable batch is the batched call writing the
    /// sequences' rows of buffers sized for `capacity`, the rest left as they are (NaN). The
    /// sweep still checks that it gives the bits of [`Cpu::run_batch`] (the CPU kernels are
    /// deterministic) and writes no row past the sequences'.
    fn run_capturable(
        &self,
        cases: &[Case],
        capacity: &BatchCapacity,
        _splits: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let rows: usize = cases.iter().map(|c| c.n_rows).sum();
        assert!(rows <= capacity.rows && cases.len() <= capacity.sequences);
        let dims = cases[0].dims;
        let (h, d) = (dims.n_heads, dims.head_dim);
        let mut out = vec![f32::NAN; capacity.rows * h * d];
        let mut lse = vec![f32::NAN; capacity.rows * h];
        run_batch_into(cases, &mut out[..rows * h * d], &mut lse[..rows * h]);
        (out, lse)
    }

    fn tolerance(&self) -> (f64, f32) {
        (1e-5, 1e-5)
    }
}

fn run_batch_into(cases: &[Case], out: &mut [f32], lse: &mut [f32]) {
    let q: Vec<f32> = cases.iter().flat_map(|c| c.q.iter().copied()).collect();
    let segments: Vec<Vec<reference::Segment>> =
        cases.iter().map(|c| c.reference_segments()).collect();
    let sequences: Vec<reference::BatchSequence> = cases
        .iter()
        .zip(&segments)
        .map(|(c, segs)| reference::BatchSequence {
            n_rows: c.n_rows,
            pos_offset: c.q_pos,
            segments: segs,
            ape: c.ape,
        })
        .collect();
    cpu::segmented_attention_batch_into(&q, &sequences, &cases[0].dims, out, Some(lse))
        .unwrap_or_else(|e| panic!("{e}: {cases:?}"));
}

#[test]
fn lengths_and_split_modes() {
    attention::lengths_and_split_modes(&Cpu);
}

#[test]
fn question_lengths_prefill() {
    attention::question_lengths_prefill(&Cpu);
}

#[test]
fn gqa_head_dims_and_ape_parameters() {
    attention::gqa_head_dims_and_ape_parameters(&Cpu);
}

#[test]
fn many_segments_including_empty_ones() {
    attention::many_segments_including_empty_ones(&Cpu);
}

#[test]
fn plain_attention_and_edge_cases() {
    attention::plain_attention_and_edge_cases(&Cpu);
}

#[test]
fn rope_shifted_segments() {
    attention::rope_shifted_segments(&Cpu);
}

#[test]
fn fused_shift_against_separate_shift() {
    attention::fused_shift_against_separate_shift(&Cpu);
}

#[test]
fn batches_of_sequences() {
    attention::batches_of_sequences(&Cpu);
}

#[test]
fn capturable_batches() {
    attention::capturable_batches(&Cpu);
}

/// The allocating forms give what the `_into` forms write.
#[test]
fn allocating_forms_match_the_into_forms() {
    let mut r = common::seeded("allocating_forms_match_the_into_forms");
    let dims = ape_attn::AttentionDims::new(9, 3, 64).unwrap();
    let case = attention::make_case(
        &mut r,
        dims,
        DType::BF16,
        7,
        &[300, 90],
        5,
        ape_attn::ApeParams::default(),
        None,
    );
    let (out, lse) = Cpu.run(&case);
    let got = cpu::segmented_attention(
        &case.reference_query(),
        &case.reference_segments(),
        &case.dims,
        &case.ape,
    )
    .unwrap();
    assert_eq!((got.out, got.lse), (out.clone(), lse.clone()));
    let segments = case.reference_segments();
    let seq = [reference::BatchSequence {
        n_rows: case.n_rows,
        pos_offset: case.q_pos,
        segments: &segments,
        ape: case.ape,
    }];
    let got = cpu::segmented_attention_batch(&case.q, &seq, &dims).unwrap();
    assert_eq!((got.out, got.lse), (out, lse));
}
