//! The CUDA launch: the layout over the segments' device addresses, its upload and the kernel.

use super::*;

/// The layout of a launch of validated sequences on a device ([`launch_layout`] over their
/// segments' device addresses, for the kernel of `shape` or the one it chooses), and the guards that record the segments' reads on `stream` when
/// dropped (keep them until the launch is queued).
pub(crate) fn device_layout<'a, K: KvTensor>(
    stream: &'a CudaStream,
    sequences: &[BatchSequence<'a, K>],
    dims: &AttentionDims,
    dtype: DType,
    occupancy: &AttentionOccupancy,
    num_splits: Option<usize>,
    shape: Option<TileShape>,
) -> Result<(LaunchLayout, Vec<SyncOnDrop<'a>>)> {
    let (refs, guards) = device_segment_refs(stream, sequences, dims, dtype);
    let seq_refs = sequence_refs(
        &refs,
        sequences
            .iter()
            .map(|s| (s.n_rows, s.pos_offset, s.segments.len(), s.ape)),
    );
    let layout = launch_layout(&seq_refs, dims, dtype, occupancy, num_splits, shape)?;
    Ok((layout, guards))
}

/// The device addresses of validated sequences' segments, in order, and the guards that record
/// their reads on `stream` when dropped.
pub(super) fn device_segment_refs<'a, K: KvTensor>(
    stream: &'a CudaStream,
    sequences: &[BatchSequence<'a, K>],
    dims: &AttentionDims,
    dtype: DType,
) -> (Vec<SegmentRef>, Vec<SyncOnDrop<'a>>) {
    let n_segments: usize = sequences.iter().map(|s| s.segments.len()).sum();
    let mut guards = Vec::with_capacity(2 * n_segments);
    let mut refs = Vec::with_capacity(n_segments);
    // Bytes per row of K or V; validation checked both tensors' rows against dims.
    let row_bytes = (dims.n_kv_heads * dims.head_dim * dtype.size()) as u64;
    for s in sequences.iter().flat_map(|q| q.segments) {
        let (k_start, v_start) = (s.k.row_span().0, s.v.row_span().0);
        let (k, k_sync) = s.k.tensor().device_buffer().device_ptr(stream);
        let (v, v_sync) = s.v.tensor().device_buffer().device_ptr(stream);
        guards.push(k_sync);
        guards.push(v_sync);
        refs.push(s.at(
            k + k_start as u64 * row_bytes,
            v + v_start as u64 * row_bytes,
        ));
    }
    (refs, guards)
}

/// The attention kernel of a launch, with its grid, threads per block and dynamic shared memory.
pub(crate) struct AttentionKernel<'a> {
    pub main: &'a CudaFunction,
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub smem: usize,
}

/// Split mode's workspace of a launch: partial outputs and LSEs, and the split counters (zero
/// before the launch; the launch leaves them zero).
pub(crate) struct SplitWorkspace<'a, 'b> {
    pub o_part: &'a mut CudaViewMut<'b, f32>,
    pub lse_part: &'a mut CudaViewMut<'b, f32>,
    pub split_counters: &'a mut CudaViewMut<'b, u32>,
}

/// A launch's parameter arrays on the device (descriptors, RoPE table, per-sequence parameters,
/// work list) and its by-value parameters.
pub(crate) struct KernelParams<'a> {
    pub descs: CudaView<'a, u8>,
    pub rope_cs: CudaView<'a, u8>,
    pub seqs: CudaView<'a, u8>,
    pub work: CudaView<'a, u8>,
    pub launch: &'a SegmentedAttentionLaunch,
}

/// Enqueues the attention kernel on `stream`: the one place that knows its argument list
/// (kernels/segmented_attention.cu). Split mode is the same one launch: the last split of each
/// query tile combines the tile's partial states.
///
/// # Safety
/// The arguments must form a valid launch: `params` and the workspace (`o_part`, `lse_part`,
/// `split_counters`) laid out for the grid by [`launch_layout`] (or a [`FixedShape`] and its
/// image), the split counters all zero, every sequence's rows within `q`, `out` and `lse`, and
/// every descriptor pointing at live K/V of its length.
pub(crate) unsafe fn enqueue(
    stream: &CudaStream,
    kernel: &AttentionKernel,
    q: &Tensor,
    out: &mut Tensor,
    lse: &mut Tensor,
    params: &KernelParams,
    ws: SplitWorkspace<'_, '_>,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: kernel.grid,
        block_dim: (kernel.threads, 1, 1),
        shared_mem_bytes: kernel.smem as u32,
    };
    let mut launch = stream.launch_builder(kernel.main);
    launch
        .arg(q.device_buffer())
        .arg(&params.descs)
        .arg(&params.rope_cs)
        .arg(out.buf_mut())
        .arg(lse.buf_mut())
        .arg(ws.o_part)
        .arg(ws.lse_part)
        .arg(ws.split_counters)
        .arg(&params.seqs)
        .arg(&params.work)
        .arg(params.launch);
    // SAFETY: the arguments match segmented_attention_* (q, segs, rope_cs, out, lse, o_part,
    // lse_part, split_counters, seqs, work, launch); the caller vouches for their sizes and
    // contents.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// Launches validated sequences.
pub(super) fn launch<K: KvTensor>(
    device: &Device,
    q: &Tensor,
    sequences: &[BatchSequence<'_, K>],
    dims: &AttentionDims,
    out: &mut Tensor,
    lse: &mut Tensor,
    options: &SegmentedAttentionOptions,
) -> Result<()> {
    if q.shape()[0] == 0 {
        return Ok(());
    }
    let stream = device.stream();
    // The guards record the segments' reads on the stream when dropped: keep them until the
    // launch is queued.
    let (layout, read_guards) = device_layout(
        stream,
        sequences,
        dims,
        q.dtype(),
        &device.attention_occupancy(q.dtype(), dims.head_dim)?,
        options.num_splits,
        options.tile,
    )?;

    // One upload: descriptors, RoPE table, sequence parameters, work list (upload_bytes_into). Parts a
    // launch does not read (no shifts; one sequence) get a valid pointer all the same.
    let mut bytes = spare_upload();
    let offsets = layout.upload_bytes_into(&mut bytes);
    // From pageable memory, the copy has left `bytes` when the call returns.
    let upload = stream.clone_htod(&bytes)?;
    let part = |i: usize, non_empty: bool| {
        if non_empty {
            upload.slice(offsets[i]..)
        } else {
            upload.slice(..)
        }
    };
    let descs = upload.slice(..);
    let rope_cs = part(1, !layout.rope_table.is_empty());
    let seqs = part(2, !layout.seqs.is_empty());
    let work = part(3, !layout.work.is_empty());

    let f = device.function_with_smem(layout.main, layout.smem_limit as u32)?;
    let counters_len = layout.counters_len;
    device.with_workspace(
        layout.o_len + layout.lse_len,
        counters_len,
        |ws, counters| {
            let (mut o_part, mut lse_part) = ws.split_at_mut(layout.o_len);
            let mut split_counters = counters.slice_mut(..counters_len.max(1));
            let kernel = AttentionKernel {
                main: &f,
                grid: layout.grid,
                threads: layout.shape.threads() as u32,
                smem: layout.smem,
            };
            let params = KernelParams {
                descs,
                rope_cs,
                seqs,
                work,
                launch: &layout.launch,
            };
            // SAFETY: validate() checked every tensor's shape, dtype and device against `dims`, and
            // that the sequences' rows add up to q's; each sequence's parameters (q_row0, seg0,
            // part0, work0) index within those rows, the descriptors, the workspace and the grid
            // (launch_layout); the descriptors point at the segments' K/V buffers, which hold len *
            // n_kv_heads * head_dim elements each, and their rope_row is -1 or a row of rope_cs,
            // which holds head_dim / 2 (cos, sin) pairs per row (validate() checked the shifts'
            // head_dim); a batch's work list has one entry per thread block; the split counters
            // (one per thread block of the grid) are zero (with_workspace). The segment buffers are
            // freed stream-ordered, so they outlive the launch even if dropped now.
            unsafe {
                enqueue(
                    stream,
                    &kernel,
                    q,
                    out,
                    lse,
                    &params,
                    SplitWorkspace {
                        o_part: &mut o_part,
                        lse_part: &mut lse_part,
                        split_counters: &mut split_counters,
                    },
                )
            }
        },
    )?;
    drop(read_guards);
    layout.recycle();
    recycle_upload(bytes);
    Ok(())
}
