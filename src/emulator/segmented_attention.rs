//! Segmented attention on the kernel emulator: `kernels/segmented_attention.cu` run on the CPU,
//! launched exactly as [`crate::cuda::segmented_attention`] launches it (oracle:
//! [`crate::reference::segmented_attention`]).

use super::{from_dtype, launch_ptrs, to_dtype, Aligned, EmulatorOptions};
use crate::cuda::segmented_attention::{
    check_problem, launch_layout, SegmentExtent, SegmentRef, SegmentedAttentionOptions,
    COMBINE_THREADS, THREADS,
};
use crate::cuda::DType;
use crate::error::Result;
use crate::params::{ApeParams, AttentionDims};
use crate::reference::segmented_attention::{validate, AttentionOutput, Query, Segment};

/// The CUDA segmented-attention kernels run on the emulator: the query and the segments (f32, as
/// the oracle takes them) are rounded to `dtype`, laid out and launched as the CUDA launcher does
/// (whole or split-KV with the combine kernel), and the `dtype` output is returned as f32.
/// `options` is the CUDA launcher's; the plan uses `emulator.sm_count` SMs.
///
/// Every output and workspace buffer starts as NaN, so a value the kernels fail to write shows.
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
    crate::cuda::segmented_attention::check_head_dim(dims.head_dim)?;
    crate::cuda::segmented_attention::check_dtype(dtype)?;
    let extents: Vec<SegmentExtent> = segments
        .iter()
        .map(|s| SegmentExtent {
            len: s.len,
            pos_offset: s.pos_offset,
            rope_shift: s.rope_shift,
        })
        .collect();
    let n_rows = query.n_rows;
    check_problem(n_rows, query.pos_offset, dims, &extents)?;
    let n = n_rows * dims.n_heads;
    if n_rows == 0 {
        return Ok(AttentionOutput {
            out: Vec::new(),
            lse: Vec::new(),
        });
    }

    let mut q = to_dtype(query.data, dtype);
    let mut kv: Vec<(Aligned, Aligned)> = segments
        .iter()
        .map(|s| (to_dtype(s.k, dtype), to_dtype(s.v, dtype)))
        .collect();
    let refs: Vec<SegmentRef> = segments
        .iter()
        .zip(kv.iter_mut())
        .map(|(s, (k, v))| SegmentRef {
            k: k.addr(),
            v: v.addr(),
            len: s.len,
            pos_offset: s.pos_offset,
            role: s.role,
            rope_shift: s.rope_shift,
        })
        .collect();
    let layout = launch_layout(
        n_rows,
        query.pos_offset,
        dims,
        ape,
        dtype,
        &refs,
        emulator.sm_count,
        options.num_splits,
    )?;

    let mut descs = Aligned::from_slice(&layout.descs);
    let mut table = Aligned::from_slice(&layout.rope_table);
    let mut out = to_dtype(&vec![f32::NAN; n * dims.head_dim], dtype);
    let mut lse = Aligned::from_slice(&vec![f32::NAN; n]);
    let mut o_part = Aligned::from_slice(&vec![f32::NAN; layout.o_len]);
    let mut lse_part = Aligned::from_slice(&vec![f32::NAN; layout.lse_len]);
    // Without shifts the kernel never reads the table; it gets a valid pointer all the same.
    let table_ptr = if layout.rope_table.is_empty() {
        descs.addr()
    } else {
        table.addr()
    };
    let (out_ptr, lse_ptr) = (out.addr(), lse.addr());
    let (o_part_ptr, lse_part_ptr) = (o_part.addr(), lse_part.addr());
    let ptrs = [
        q.addr(),
        descs.addr(),
        table_ptr,
        out_ptr,
        lse_ptr,
        o_part_ptr,
        lse_part_ptr,
    ];
    let mut reads: Vec<&Aligned> = vec![&q, &descs, &table];
    for (k, v) in &kv {
        reads.push(k);
        reads.push(v);
    }
    // SAFETY: the arguments are segmented_attention_*'s (q, segs, rope_cs, out, lse, o_part,
    // lse_part, params). The buffers are the sizes the CUDA launcher's are (validate() and
    // check_problem() checked the shapes and limits; launch_layout() sized the workspace and the
    // table), and all outlive the call.
    unsafe {
        launch_ptrs(
            layout.main,
            layout.grid,
            (THREADS, 1, 1),
            layout.smem,
            &ptrs,
            &layout.params,
            &reads,
            emulator,
        )?;
    }
    if !layout.plan.whole {
        // SAFETY: segmented_attention_combine_*'s arguments (o_part, lse_part, out, lse, params),
        // the same buffers as above.
        unsafe {
            launch_ptrs(
                layout.combine,
                (layout.combine_blocks, 1, 1),
                (COMBINE_THREADS, 1, 1),
                0,
                &[o_part_ptr, lse_part_ptr, out_ptr, lse_ptr],
                &layout.params,
                &[],
                emulator,
            )?;
        }
    }
    Ok(AttentionOutput {
        out: from_dtype(&out, n * dims.head_dim, dtype),
        lse: lse.as_slice::<f32>(n).to_vec(),
    })
}
