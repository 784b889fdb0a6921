//! Segmented attention on the kernel emulator: `kernels/segmented_attention.cu` run on the CPU,
//! launched exactly as [`crate::cuda::segmented_attention`] launches it (oracle:
//! [`crate::reference::segmented_attention`]).

use super::{from_dtype, launch_ptrs, to_dtype, Aligned, EmulatorOptions};
use crate::cuda::segmented_attention::{
    check_batch_rows, check_dtype, check_head_dim, check_problem, launch_layout, sequence_refs,
    BatchCapacity, FixedShape, SegmentRef, SegmentedAttentionOptions, SequenceRef,
};
use crate::cuda::DType;
use crate::error::{Error, Result};
use crate::params::{ApeParams, AttentionDims};
use crate::reference::segmented_attention::{
    validate, AttentionOutput, BatchSequence, Query, Segment,
};

/// The CUDA segmented-attention kernels run on the emulator: the query and the segments (f32, as
/// the oracle takes them) are rounded to `dtype`, laid out and launched as the CUDA launcher does
/// (whole, or split-KV with the last split of each query tile combining), and the `dtype` output
/// is returned as f32. `options` is the CUDA launcher's; the plan fills `emulator.occupancy`'s
/// wave.
///
/// Every output and workspace buffer starts as NaN (the split counters at zero, as the CUDA
/// launchers' are), so a value the kernel fails to write shows; a launch that leaves a split
/// counter other than zero is an error.
pub fn segmented_attention(
    dtype: DType,
    query: &Query,
    segments: &[Segment],
    dims: &AttentionDims,
    ape: &ApeParams,
    options: &SegmentedAttentionOptions,
    emulator: &EmulatorOptions,
) -> Result<AttentionOutput> {
    validate(query, segments, dims)?;
    let seq = BatchSequence {
        n_rows: query.n_rows,
        pos_offset: query.pos_offset,
        segments,
        ape: *ape,
    };
    run(
        dtype,
        query.data,
        &[seq],
        dims,
        options,
        emulator,
        None,
        |_| String::new(),
    )
}

/// [`crate::cuda::segmented_attention_batch_into`] on the emulator: one launch for every sequence
/// of the batch (packed query `q`, as [`crate::reference::segmented_attention_batch`] takes it),
/// rounded to `dtype` and returned as f32, outputs and workspace starting as NaN.
pub fn segmented_attention_batch(
    dtype: DType,
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
    options: &SegmentedAttentionOptions,
    emulator: &EmulatorOptions,
) -> Result<AttentionOutput> {
    validate_batch(q, sequences, dims)?;
    run(dtype, q, sequences, dims, options, emulator, None, |i| {
        format!("sequence {i}: ")
    })
}

/// Checks a batch as the oracle does: a packed query of whole rows owned by the sequences, and
/// each sequence's problem.
pub(super) fn validate_batch(
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
) -> Result<()> {
    dims.validate()?;
    let row = dims.n_heads * dims.head_dim;
    if q.len() % row != 0 {
        return Err(Error::Shape(format!(
            "the query has {} values, not a whole number of rows of n_heads * head_dim = {row}",
            q.len()
        )));
    }
    check_batch_rows(q.len() / row, sequences.iter().map(|s| s.n_rows))?;
    let mut first = 0;
    for (i, s) in sequences.iter().enumerate() {
        let query = Query {
            data: q.get(first * row..(first + s.n_rows) * row).unwrap_or(&[]),
            n_rows: s.n_rows,
            pos_offset: s.pos_offset,
        };
        validate(&query, s.segments, dims).map_err(|e| e.within(&format!("sequence {i}")))?;
        first += s.n_rows;
    }
    Ok(())
}

/// The sequences over their segments' refs (`refs`: every sequence's, in order).
fn seq_refs<'r>(refs: &'r [SegmentRef], sequences: &[BatchSequence]) -> Vec<SequenceRef<'r>> {
    sequence_refs(
        refs,
        sequences
            .iter()
            .map(|s| (s.n_rows, s.pos_offset, s.segments.len(), s.ape)),
    )
}

/// Launches validated sequences (`prefix` names one in messages): as the batched CUDA launcher
/// does, or with `fixed`, as a [`crate::cuda::CapturableBatch`] of that capacity does (fixed
/// grids, parameter image and workspace; outputs of `fixed.rows` rows, the rows past the
/// sequences' left as NaN).
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    dtype: DType,
    q: &[f32],
    sequences: &[BatchSequence],
    dims: &AttentionDims,
    options: &SegmentedAttentionOptions,
    emulator: &EmulatorOptions,
    fixed: Option<&BatchCapacity>,
    prefix: impl Fn(usize) -> String,
) -> Result<AttentionOutput> {
    check_head_dim(dims.head_dim)?;
    check_dtype(dtype)?;
    // The segments as a launch sees them: checked first, before anything is converted; their
    // addresses are filled in below.
    let mut refs: Vec<SegmentRef> = sequences
        .iter()
        .flat_map(|q| q.segments)
        .map(|s| SegmentRef {
            k: 0,
            v: 0,
            len: s.len,
            pos_offset: s.pos_offset,
            role: s.role,
            rope_shift: s.rope_shift,
        })
        .collect();
    for (i, s) in seq_refs(&refs, sequences).iter().enumerate() {
        check_problem(s, dims, &prefix(i))?;
    }
    let fixed = match fixed {
        Some(c) => {
            // As CapturableBatch: new(), then prepare().
            let shape = FixedShape::new(c, dims, &emulator.occupancy, options)?;
            c.check_fits(sequences.iter().map(|s| (s.n_rows, s.segments.len())))?;
            Some(shape)
        }
        None => None,
    };
    let n_rows: usize = match &fixed {
        Some(shape) => shape.capacity.rows,
        None => sequences.iter().map(|s| s.n_rows).sum(),
    };
    let n = n_rows * dims.n_heads;
    if n_rows == 0 {
        return Ok(AttentionOutput {
            out: Vec::new(),
            lse: Vec::new(),
        });
    }

    // K and V as the kernels read them: rounded to `dtype`, at the host addresses the
    // descriptors hold.
    let mut q = to_dtype(q, dtype);
    let mut kv: Vec<(Aligned, Aligned)> = sequences
        .iter()
        .flat_map(|q| q.segments)
        .map(|s| (to_dtype(s.k, dtype), to_dtype(s.v, dtype)))
        .collect();
    for (r, (k, v)) in refs.iter_mut().zip(kv.iter_mut()) {
        (r.k, r.v) = (k.addr(), v.addr());
    }
    let seq_refs = seq_refs(&refs, sequences);
    let layout = launch_layout(
        &seq_refs,
        dims,
        dtype,
        &emulator.occupancy,
        options.num_splits,
        // A fixed launch runs its capacity's kernel, as CapturableBatch does.
        fixed.as_ref().map(|f| Some(f.tile)).unwrap_or(options.tile),
    )?;

    // The parameter arrays as the CUDA launcher uploads them (one buffer: upload_bytes_into, or a
    // fixed launch's image), so that the emulator sees the same offsets and alignment. Parts a
    // launch does not read get a valid pointer all the same.
    let (bytes, offsets, used) = match &fixed {
        Some(shape) => (shape.image(&layout)?, shape.offsets, [true; 4]),
        None => {
            let mut bytes = Vec::new();
            let offsets = layout.upload_bytes_into(&mut bytes);
            let used = [
                true,
                !layout.rope_table.is_empty(),
                !layout.seqs.is_empty(),
                !layout.work.is_empty(),
            ];
            (bytes, offsets, used)
        }
    };
    let mut upload = Aligned::from_slice(&bytes);
    let base = upload.addr();
    let part = |i: usize| {
        if used[i] {
            base + offsets[i] as u64
        } else {
            base
        }
    };
    let (table_ptr, seqs_ptr, work_ptr) = (part(1), part(2), part(3));
    // What the launch takes besides the buffers (the CUDA launchers choose the same).
    let (grid, smem, launch, o_len, lse_len, counters_len) = match &fixed {
        Some(shape) => (
            (shape.blocks, dims.n_kv_heads as u32, 1),
            shape.smem,
            shape.launch_params(),
            (shape.parts * dims.head_dim).max(1),
            shape.parts.max(1),
            shape.counters.max(1),
        ),
        None => (
            layout.grid,
            layout.smem,
            layout.launch,
            layout.o_len,
            layout.lse_len,
            layout.counters_len.max(1),
        ),
    };
    let poisoned = |len: usize| Aligned::from_slice(&vec![f32::NAN; len]);
    // Attention outputs are bf16 or f16 (check_dtype): 16-bit elements.
    let out_len = n * dims.head_dim;
    let out_poison = to_dtype(&vec![f32::NAN; out_len], dtype);
    let mut out = to_dtype(&vec![f32::NAN; out_len], dtype);
    let mut lse = poisoned(n);
    let mut o_part = poisoned(o_len);
    let mut lse_part = poisoned(lse_len);
    // Zero, as the CUDA launchers' counters are before a launch (and after one).
    let mut counters = Aligned::new(counters_len * 4);
    let (out_ptr, lse_ptr) = (out.addr(), lse.addr());
    let (o_part_ptr, lse_part_ptr, counters_ptr) =
        (o_part.addr(), lse_part.addr(), counters.addr());
    let ptrs = [
        q.addr(),
        base,
        table_ptr,
        out_ptr,
        lse_ptr,
        o_part_ptr,
        lse_part_ptr,
        counters_ptr,
        seqs_ptr,
        work_ptr,
    ];
    let mut first: Option<(Vec<u16>, Vec<u32>)> = None;
    for _ in 0..1 + usize::from(emulator.relaunch) {
        if first.is_some() {
            // The next launch on the same workspace: outputs and partial states poisoned again,
            // the counters as the last launch left them.
            out.as_mut_slice::<u16>(out_len)
                .copy_from_slice(out_poison.as_slice::<u16>(out_len));
            lse.as_mut_slice::<f32>(n).fill(f32::NAN);
            o_part.as_mut_slice::<f32>(o_len).fill(f32::NAN);
            lse_part.as_mut_slice::<f32>(lse_len).fill(f32::NAN);
        }
        // The buffers the kernel reads (the emulator fails a read outside them): the partial
        // states and counters too, which the last split of a tile reads.
        let mut reads: Vec<&Aligned> = vec![&q, &upload, &o_part, &lse_part, &counters];
        for (k, v) in &kv {
            reads.push(k);
            reads.push(v);
        }
        // SAFETY: the arguments are segmented_attention_*'s (q, segs, rope_cs, out, lse,
        // o_part, lse_part, split_counters, seqs, work, launch). The buffers are the sizes the
        // CUDA launcher's are (the shapes and limits were checked above; launch_layout() sized
        // the workspace, the counters, the table and the parameter arrays, or a fixed launch's
        // FixedShape, which image() checked the plan against, after check_fits() checked the
        // rows), the counters are zero, and all outlive the call.
        unsafe {
            launch_ptrs(
                layout.main,
                grid,
                (layout.shape.threads() as u32, 1, 1),
                smem,
                &ptrs,
                &launch,
                &reads,
                emulator,
            )?;
        }
        if let Some(at) = counters
            .as_slice::<u32>(counters_len)
            .iter()
            .position(|&c| c != 0)
        {
            return Err(Error::Emulator(format!(
                "{}: split counter {at} is {} after the launch, not 0",
                layout.main,
                counters.as_slice::<u32>(counters_len)[at]
            )));
        }
        if !emulator.relaunch {
            break;
        }
        let got = (
            out.as_slice::<u16>(out_len).to_vec(),
            lse.as_slice::<u32>(n).to_vec(),
        );
        match &first {
            None => first = Some(got),
            Some(want) if *want != got => {
                return Err(Error::Emulator(format!(
                    "{}: a second launch on the same workspace gave other bits than the first",
                    layout.main
                )))
            }
            Some(_) => {}
        }
    }
    Ok(AttentionOutput {
        out: from_dtype(&out, out_len, dtype),
        lse: lse.as_slice::<f32>(n).to_vec(),
    })
}
