//! The launch layout: the kernel's `#[repr(C)]` blocks (descriptors, per-sequence parameters,
//! the by-value launch block), the RoPE table and the upload image, shared by the CUDA launcher
//! and the kernel emulator.

use super::*;

/// Mirrors `ape::SegmentDesc`: the ABI form of a [`SegmentRef`], built in one place
/// ([`launch_layout`]), with the segment's place in its sequence's tile order and RoPE table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub(crate) struct SegmentDesc {
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) len: u32,
    pub(super) pos_offset: u32,
    pub(super) role: u32,
    pub(super) first_tile: u32,
    pub(super) rope_row: i32,
    pub(super) rope_layout: u32,
}
const _: () = assert!(std::mem::size_of::<SegmentDesc>() == 40);

/// Mirrors `ape::SegmentedAttentionParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SegmentedAttentionParams {
    pub(super) n_rows: u32,
    pub(super) n_heads: u32,
    pub(super) n_kv_heads: u32,
    pub(super) group: u32,
    pub(super) q_pos_offset: u32,
    pub(super) n_segments: u32,
    pub(super) n_ctx_tiles: u32,
    pub(super) n_causal_tiles: u32,
    pub(super) n_ctx_splits: u32,
    pub(super) n_causal_splits: u32,
    pub(super) whole: u32,
    pub(super) variant: u32,
    pub(super) ctx_scale_log2: f32,
    pub(super) causal_scale_log2: f32,
    pub(super) temperature: f32,
    pub(super) scale: f32,
    pub(super) q_row0: u32,
    pub(super) seg0: u32,
    pub(super) part0: u32,
    pub(super) work0: u32,
}
const _: () = assert!(std::mem::size_of::<SegmentedAttentionParams>() == 80);

impl SegmentedAttentionParams {
    /// A sequence without rows: a thread block sent to it leaves at once (and, whole, never
    /// touches the workspace).
    pub(super) fn idle() -> Self {
        Self {
            group: 1,
            whole: 1,
            ..Self::zeroed()
        }
    }
}

/// Mirrors `ape::SegmentedAttentionLaunch`: the one sequence's parameters, or (a batch) the count
/// of the `seqs` array's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SegmentedAttentionLaunch {
    pub(super) first: SegmentedAttentionParams,
    pub(super) n_sequences: u32,
    pub(super) stages: u32,
    pub(super) pad: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<SegmentedAttentionLaunch>() == 96);
// SAFETY: #[repr(C)] plain-data struct with the same layout as the kernel's struct.
unsafe impl DeviceRepr for SegmentedAttentionLaunch {}

/// Everything a launch takes besides the buffers: what the CUDA launcher and the kernel emulator
/// both hand the kernels.
#[derive(Clone, Debug)]
pub(crate) struct LaunchLayout {
    /// Descriptors, sequence after sequence, each sequence's in its tile order (one zeroed
    /// descriptor when every segment is empty).
    pub descs: Vec<SegmentDesc>,
    /// RoPE shift table, `head_dim / 2` (cos, sin) pairs per row; empty without shifts.
    pub rope_table: Vec<f32>,
    /// A batch's per-sequence parameters and each thread block's sequence (`blockIdx.x`); both
    /// empty for one sequence, whose parameters travel in `launch`.
    pub seqs: Vec<SegmentedAttentionParams>,
    pub work: Vec<u32>,
    pub launch: SegmentedAttentionLaunch,
    /// The kernel's tile shape and name.
    pub shape: TileShape,
    pub main: &'static str,
    /// The main kernel's grid: (thread blocks of all sequences, KV heads, 1); x may be 0 (no
    /// rows at all: nothing to launch).
    pub grid: (u32, u32, u32),
    /// Dynamic shared memory of this launch, and the most any launch of `main` takes.
    pub smem: usize,
    pub smem_limit: usize,
    /// Split mode's workspace: partial outputs, then partial LSEs (f32 elements).
    pub o_len: usize,
    pub lse_len: usize,
    /// Split mode's counters (u32), zero before the launch and after it: one per thread block
    /// of the grid (`grid.0 * grid.1`), of which each split query tile and KV head uses the one
    /// of its split 0 block; 0 when every sequence runs whole.
    pub counters_len: usize,
}

impl LaunchLayout {
    /// The launch's parameter arrays in one upload, each part 16-byte aligned: descriptors, RoPE
    /// table, sequence parameters, work list, written into `bytes` (cleared first; its capacity
    /// is reused); returns the byte offset of each part.
    pub(crate) fn upload_bytes_into(&self, bytes: &mut Vec<u8>) -> [usize; 4] {
        let mut offsets = [0usize; 4];
        let parts: [&[u8]; 4] = [
            bytemuck::cast_slice(&self.descs),
            bytemuck::cast_slice(&self.rope_table),
            bytemuck::cast_slice(&self.seqs),
            bytemuck::cast_slice(&self.work),
        ];
        let total: usize = parts.iter().map(|p| p.len().next_multiple_of(16)).sum();
        bytes.clear();
        bytes.reserve(total);
        for (i, part) in parts.into_iter().enumerate() {
            bytes.resize(bytes.len().next_multiple_of(16), 0);
            offsets[i] = bytes.len();
            bytes.extend_from_slice(part);
        }
        offsets
    }

    /// Hands the layout's RoPE table back for the thread's next launch (a large batch's is
    /// megabytes, faulted in page by page when allocated anew).
    pub(crate) fn recycle(self) {
        crate::cuda::rope_shift_table::recycle(self.rope_table);
    }
}

thread_local! {
    /// The upload image buffer of the thread's last launch, reused by its next.
    static SPARE_UPLOAD: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An upload image buffer, empty, with the capacity of the thread's last launch's.
pub(crate) fn spare_upload() -> Vec<u8> {
    SPARE_UPLOAD.take()
}

/// Hands an upload image back (once its copy has been queued) for the thread's next launch.
pub(crate) fn recycle_upload(bytes: Vec<u8>) {
    keep_larger(&SPARE_UPLOAD, bytes);
}

/// Puts the larger of `buffer` and the thread's spare back as the spare (a launch may hand back a
/// smaller buffer than the spare it did not take: a table of a launch without shifts).
pub(crate) fn keep_larger<T: 'static>(
    spare: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    buffer: Vec<T>,
) {
    let kept = spare.take();
    spare.set(if buffer.capacity() >= kept.capacity() {
        buffer
    } else {
        kept
    });
}

/// Plans a launch of one or more sequences and lays out its descriptors, RoPE table and
/// parameters, for a device where the kernels have `occupancy`. The kernel is the one of `shape`,
/// or (`None`) the one [`TileShape::of_launch`] chooses. Pure: the inputs are already validated
/// ([`check_problem`] for each sequence).
pub(crate) fn launch_layout(
    sequences: &[SequenceRef],
    dims: &AttentionDims,
    dtype: DType,
    occupancy: &AttentionOccupancy,
    num_splits: Option<usize>,
    shape: Option<TileShape>,
) -> Result<LaunchLayout> {
    if sequences.is_empty() {
        return Err(Error::Shape("a launch needs at least one sequence".into()));
    }
    // A launch with any RoPE shift (a row of the table below) takes the larger shared memory,
    // so fewer blocks may fit.
    let any_shift = sequences.iter().any(|q| {
        q.segments
            .iter()
            .any(|s| s.len > 0 && s.rope_shift.is_some_and(|r| r.delta != 0))
    });
    let shape = shape.unwrap_or_else(|| {
        let rows: Vec<usize> = sequences.iter().map(|s| s.n_rows).collect();
        TileShape::of_launch(&rows, dims, num_splits, occupancy, any_shift)
    });
    let occupancy = occupancy.of(shape);
    if !occupancy.fits(any_shift) {
        let (plain, shifts) = shape.smem_bytes(dims.head_dim, occupancy.stages(any_shift));
        return Err(Error::NoDevice(format!(
            "{} does not fit this device's SMs ({} bytes of shared memory{})",
            shape.kernel_name(dtype, dims.head_dim),
            if any_shift { shifts } else { plain },
            if any_shift { ", with RoPE shifts" } else { "" }
        )));
    }
    let plans = plan_batch_for(
        sequences,
        dims,
        occupancy.wave(any_shift),
        num_splits,
        shape.rows(),
    )?;
    if shape == TileShape::Decode {
        // The decode tile computes its rows with every warp on a quarter of the keys: it cannot
        // run a pass that crosses from the context keys to the causal ones (TileShape::of_launch
        // and the plan's split at the boundary keep such passes from it).
        let packed = |q: &SequenceRef| q.n_rows.saturating_mul(dims.group_size());
        if let Some(i) = sequences.iter().zip(&plans).position(|(q, p)| {
            packed(q) > DECODE_ROWS
                || (p.whole && p.q_tiles > 0 && p.n_ctx_tiles > 0 && p.n_causal_tiles > 0)
        }) {
            return Err(Error::InvalidParameter {
                name: "tile shape",
                value: i as f64,
                requirement: "the decode tile takes sequences of at most 16 packed rows, each \
                              split at its context/causal boundary",
            });
        }
    }
    let ordered: Vec<&SegmentRef> = sequences
        .iter()
        .zip(&plans)
        .flat_map(|(q, p)| p.order.iter().map(|&i| &q.segments[i]))
        .collect();
    let shifts: Vec<Option<RopeShift>> = ordered.iter().map(|s| s.rope_shift).collect();
    let (table, rope_rows) = rope_table(&shifts);
    let first_tiles = plans.iter().flat_map(|p| p.first_tile.iter().copied());
    let mut descs: Vec<SegmentDesc> = ordered
        .iter()
        .zip(first_tiles)
        .zip(&rope_rows)
        .map(|((s, first_tile), &rope_row)| SegmentDesc {
            k: s.k,
            v: s.v,
            len: s.len as u32,
            pos_offset: s.pos_offset as u32,
            role: s.role as u32,
            first_tile,
            rope_row,
            rope_layout: s.rope_shift.map_or(0, |r| r.rope.layout as u32),
        })
        .collect();
    if descs.is_empty() {
        descs.push(SegmentDesc::zeroed());
    }

    let inv_sqrt_d = 1.0 / (dims.head_dim as f64).sqrt();
    let log2e = std::f64::consts::LOG2_E;
    // The grid's x: every sequence's thread blocks, at most 2^31 - 1 (checked before the work
    // list is built: it holds one entry per thread block).
    let n_work = plans.iter().try_fold(0u64, |sum, p| {
        sum.checked_add(u64::from(p.q_tiles) * u64::from(p.n_splits()))
    });
    let n_work = match n_work {
        Some(n) if n <= i32::MAX as u64 => n as u32,
        _ => {
            return Err(Error::OutOfRange(
                "the launch needs more than 2^31 - 1 thread blocks".into(),
            ))
        }
    };
    let (mut q_row0, mut seg0, mut part0, mut work0) = (0usize, 0usize, 0usize, 0usize);
    let mut seqs = Vec::with_capacity(sequences.len());
    let mut work: Vec<u32> = Vec::new();
    for (i, (q, plan)) in sequences.iter().zip(&plans).enumerate() {
        let n = q.n_rows * dims.n_heads;
        let blocks = plan.q_tiles as usize * plan.n_splits() as usize;
        let ape = &q.ape;
        seqs.push(SegmentedAttentionParams {
            n_rows: q.n_rows as u32,
            n_heads: dims.n_heads as u32,
            n_kv_heads: dims.n_kv_heads as u32,
            group: dims.group_size() as u32,
            q_pos_offset: q.pos_offset as u32,
            n_segments: plan.order.len() as u32,
            n_ctx_tiles: plan.n_ctx_tiles,
            n_causal_tiles: plan.n_causal_tiles,
            n_ctx_splits: plan.n_ctx_splits,
            n_causal_splits: plan.n_causal_splits,
            whole: plan.whole as u32,
            variant: match ape.variant() {
                ApeVariant::Released => 0,
                ApeVariant::ScaledMass => 1,
            },
            ctx_scale_log2: (log2e * inv_sqrt_d / ape.temperature() as f64) as f32,
            causal_scale_log2: (log2e * inv_sqrt_d) as f32,
            temperature: ape.temperature(),
            scale: ape.scale(),
            q_row0: u32_of(q_row0, "query rows before a sequence")?,
            seg0: u32_of(seg0, "segments before a sequence")?,
            part0: u32_of(part0, "partial states before a sequence")?,
            work0: u32_of(work0, "thread blocks before a sequence")?,
        });
        if sequences.len() > 1 {
            work.extend(std::iter::repeat_n(i as u32, blocks));
        }
        q_row0 += q.n_rows;
        seg0 += plan.order.len();
        if !plan.whole {
            part0 += plan.n_splits() as usize * n;
        }
        work0 += blocks;
    }
    debug_assert_eq!(work0, n_work as usize);
    // Partial states: O [part0, head_dim] then LSE [part0] (whole mode reads neither, but the
    // kernel takes valid pointers).
    let o_len = (part0 * dims.head_dim).max(1);
    let lse_len = part0.max(1);

    let main = shape.kernel_name(dtype, dims.head_dim);
    // The function's limit is set once, to the larger size (with RoPE shifts).
    let smem_limit = shape.smem_bytes(dims.head_dim, occupancy.stages).0.max(
        shape
            .smem_bytes(dims.head_dim, occupancy.stages_with_shifts)
            .1,
    );
    debug_assert_eq!(any_shift, !table.is_empty());
    let stages = occupancy.stages(any_shift);
    let smem = if any_shift {
        shape.smem_bytes(dims.head_dim, stages).1
    } else {
        shape.smem_bytes(dims.head_dim, stages).0
    };
    let grid = (n_work, dims.n_kv_heads as u32, 1);
    let counters_len = if plans.iter().all(|p| p.whole) {
        0
    } else {
        n_work as usize * dims.n_kv_heads
    };
    let launch = SegmentedAttentionLaunch {
        first: seqs[0],
        n_sequences: sequences.len() as u32,
        stages: stages as u32,
        pad: [0; 2],
    };
    if sequences.len() == 1 {
        seqs.clear();
    }
    Ok(LaunchLayout {
        descs,
        rope_table: table,
        seqs,
        work,
        launch,
        shape,
        main,
        grid,
        smem,
        smem_limit,
        o_len,
        lse_len,
        counters_len,
    })
}

/// The host half of a batched launch without a device, for `benches/host.rs`: the plan, the
/// descriptors, the RoPE table, the sequences' parameters and the upload image, as the launcher
/// builds them from its [`SequenceRef`]s (whose addresses may be fake: nothing reads them);
/// returns the upload's size in bytes. `sequences` are assumed valid. Not a stable API.
#[doc(hidden)]
pub fn launch_host_bytes(
    sequences: &[SequenceRef],
    dims: &AttentionDims,
    dtype: DType,
    occupancy: &AttentionOccupancy,
) -> Result<usize> {
    let layout = launch_layout(sequences, dims, dtype, occupancy, None, None)?;
    let mut bytes = spare_upload();
    layout.upload_bytes_into(&mut bytes);
    let size = bytes.len();
    layout.recycle();
    recycle_upload(bytes);
    Ok(size)
}
