//! Segmented attention on the kernel emulator: `kernels/segmented_attention.cu` run on the CPU,
//! launched exactly as [`crate::cuda::segmented_attention`] launches it (oracle:
//! [`crate::reference::segmented_attention`]).

use std::ffi::c_void;

use super::{from_dtype, launch, to_dtype, Aligned, EmulatorOptions};
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
    let mut params = layout.params;

    let mut q_ptr = q.addr();
    let mut descs_ptr = descs.addr();
    // Without shifts the kernel never reads the table; it gets a valid pointer all the same.
    let mut table_ptr = if layout.rope_table.is_empty() {
        descs_ptr
    } else {
        table.addr()
    };
    let mut out_ptr = out.addr();
    let mut lse_ptr = lse.addr();
    let mut o_part_ptr = o_part.addr();
    let mut lse_part_ptr = lse_part.addr();
    let ptr = |x: &mut u64| x as *mut u64 as *mut c_void;
    let mut args = [
        ptr(&mut q_ptr),
        ptr(&mut descs_ptr),
        ptr(&mut table_ptr),
        ptr(&mut out_ptr),
        ptr(&mut lse_ptr),
        ptr(&mut o_part_ptr),
        ptr(&mut lse_part_ptr),
        &mut params as *mut _ as *mut c_void,
    ];
    // SAFETY: the arguments are segmented_attention_*'s (q, segs, rope_cs, out, lse, o_part,
    // lse_part, params), each a pointer to a value of the parameter's type. The buffers are the
    // sizes the CUDA launcher's are (validate() and check_problem() checked the shapes and
    // limits; launch_layout() sized the workspace and the table), and all outlive the call.
    let mut reads: Vec<&Aligned> = vec![&q, &descs, &table];
    for (k, v) in &kv {
        reads.push(k);
        reads.push(v);
    }
    unsafe {
        launch(
            layout.main,
            layout.grid,
            (THREADS, 1, 1),
            layout.smem,
            &mut args,
            &reads,
            emulator,
        )?;
    }
    if !layout.plan.whole {
        let mut args = [
            ptr(&mut o_part_ptr),
            ptr(&mut lse_part_ptr),
            ptr(&mut out_ptr),
            ptr(&mut lse_ptr),
            &mut params as *mut _ as *mut c_void,
        ];
        // SAFETY: segmented_attention_combine_*'s arguments (o_part, lse_part, out, lse, params),
        // the same buffers as above.
        unsafe {
            launch(
                layout.combine,
                (layout.combine_blocks, 1, 1),
                (COMBINE_THREADS, 1, 1),
                0,
                &mut args,
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
