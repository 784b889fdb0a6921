//! Segmented attention for a batch of sequences, launched with fixed grids and fixed buffers so
//! that an engine can capture it in a CUDA graph and replay it every decode step
//! (kernels/segmented_attention.cu; the same kernels and plan as
//! [`super::segmented_attention_batch_into`], whose oracle is
//! [`crate::reference::segmented_attention_batch`]).
//!
//! A graph replays its kernels with the grids, shared memory and argument values it captured.
//! [`super::segmented_attention_batch_into`] cannot be captured: each call plans its own grid,
//! allocates and uploads its descriptors, and grows the device's workspace when it must. A
//! [`CapturableBatch`] splits that call in two:
//! - [`CapturableBatch::prepare`] (host side, outside any capture) validates the sequences, plans
//!   them as the batched launcher does, and copies the plan (descriptors, RoPE shift table,
//!   per-sequence parameters, work list) into the batch's own device buffer, from page-locked
//!   memory, on the device's stream;
//! - [`CapturableBatch::launch`] enqueues the attention kernel with a grid sized once for the
//!   batch's [`BatchCapacity`]. It allocates nothing, copies nothing and never
//!   blocks the host: it is what a capture records. Thread blocks the plan does not need are
//!   sent to an idle sequence and leave at once.
//!
//! The cost of the fixed grids: surplus thread blocks (a few microseconds for a capacity near
//! the batch's size; size one capacity per captured batch-size bucket).
//!
//! Split mode needs no second kernel: the last split of each query tile combines the tile's
//! partial states, found through a counter in the batch's workspace. The counters are zeroed
//! once, when the batch is made, and every launch leaves them at zero
//! (`kernels/segmented_attention.cu`), so a graph's replays, two in a row included, count from
//! zero.

use std::sync::Arc;

use cudarc::driver::{
    sys::{CUevent_flags, CUstreamCaptureStatus},
    CudaEvent, CudaFunction, CudaSlice, CudaStream, PinnedHostSlice,
};

use super::segmented_attention::{
    check_dtype, check_head_dim, device_layout, enqueue, validate_io, validate_sequences,
    AttentionKernel, BatchCapacity, FixedShape, KernelParams, SegmentedAttentionLaunch,
    SplitWorkspace,
};
use super::{BatchSequence, DType, Device, KvTensor, SegmentedAttentionOptions, Tensor};
use crate::error::{Error, Result};
use crate::params::AttentionDims;

/// A batched segmented-attention launch with fixed grids and buffers, for CUDA graphs.
///
/// Every launch of one batch reads the one plan buffer that its last prepare() wrote, so a graph
/// needs one batch per launch it captures: per layer of a decode step (each layer's K/V), and per
/// batch-size bucket (a decode step of up to `capacity.sequences` requests, say). Each step:
///
/// ```no_run
/// # use ape_attn::cuda::{BatchSequence, CapturableBatch, Device, Tensor};
/// # fn step(dev: &Device, batch: &mut CapturableBatch, sequences: &[BatchSequence<'_>],
/// #         q: &Tensor, out: &mut Tensor, lse: &mut Tensor) -> ape_attn::Result<()> {
/// batch.prepare(dev, sequences)?; // outside the capture: plan, copy the plan to the device
/// // The first step captures the launch (with the rest of the step) into a graph:
/// //   dev.stream().begin_capture(..); unsafe { batch.launch(dev, q, out, lse) }?; end_capture(..)
/// // and later steps replay that graph after their prepare(). Without graphs:
/// unsafe { batch.launch(dev, q, out, lse) }?;
/// # Ok(()) }
/// ```
///
/// [`CapturableBatch::run`] does both in one safe call. Each launch computes what
/// [`super::segmented_attention_batch_into`] computes for the prepared sequences with the same
/// options, to the bit: the plan is the same.
pub struct CapturableBatch {
    stream: Arc<CudaStream>,
    dims: AttentionDims,
    dtype: DType,
    options: SegmentedAttentionOptions,
    shape: FixedShape,
    launch: SegmentedAttentionLaunch,
    main: CudaFunction,
    smem: usize,
    /// The plan's image on the device, at the fixed offsets of `shape`.
    params: CudaSlice<u8>,
    /// Partial outputs (`parts * head_dim` f32), then partial LSEs (`parts`).
    workspace: CudaSlice<f32>,
    /// The split counters (`shape.counters`), zeroed here once; every launch leaves them zero.
    split_counters: CudaSlice<u32>,
    /// Page-locked copies of the image, used in turn, and the events recorded after the copy
    /// from each: a prepare() waits only for the copy issued two prepares before it. (The
    /// slices' own events are not recorded when cudarc's event tracking is off, as it is in
    /// `Device::new`'s context.)
    staging: [PinnedHostSlice<u8>; 2],
    copied: [CudaEvent; 2],
    next: usize,
    /// Query rows of the last prepare(); `None` before one, and after one that failed.
    prepared_rows: Option<usize>,
    /// The fewest rows of the `q`, `out` and `lse` of a captured launch: a later prepare() may
    /// not plan more, since the graph's replays read and write those buffers.
    captured_rows: Option<usize>,
}

impl std::fmt::Debug for CapturableBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturableBatch")
            .field("dims", &self.dims)
            .field("dtype", &self.dtype)
            .field("capacity", &self.shape.capacity)
            .field("blocks", &self.shape.blocks)
            .field("prepared_rows", &self.prepared_rows)
            .finish_non_exhaustive()
    }
}

impl CapturableBatch {
    /// A batch for launches on `device`'s stream of up to `capacity` (sequences, query rows,
    /// segments) with `dims` and `dtype` (bf16 or f16), planned with `options` as
    /// [`super::segmented_attention_batch_into`] plans. Allocates the parameter buffer, the
    /// workspace (at most `128 *` one wave's thread blocks of partial states of `head_dim + 1`
    /// f32 with chosen splits, and a u32 split counter per thread block of the grid) and two
    /// page-locked staging buffers.
    pub fn new(
        device: &Device,
        dims: &AttentionDims,
        dtype: DType,
        capacity: &BatchCapacity,
        options: &SegmentedAttentionOptions,
    ) -> Result<Self> {
        check_dtype(dtype)?;
        check_head_dim(dims.head_dim)?;
        let occupancy = device.attention_occupancy(dtype, dims.head_dim)?;
        let shape = FixedShape::new(capacity, dims, &occupancy, options)?;
        let stream = device.stream().clone();
        let smem = shape.smem;
        let main =
            device.function_with_smem(shape.tile.kernel_name(dtype, dims.head_dim), smem as u32)?;
        let params = stream.alloc_zeros::<u8>(shape.bytes)?;
        let workspace = stream.alloc_zeros::<f32>((shape.parts * (dims.head_dim + 1)).max(1))?;
        // Zeroed once: no launch or replay re-zeroes them (see the module's comment).
        let split_counters = stream.alloc_zeros::<u32>(shape.counters.max(1))?;
        let staging = [
            new_staging(&stream, shape.bytes)?,
            new_staging(&stream, shape.bytes)?,
        ];
        let event = || {
            stream
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
        };
        let copied = [event()?, event()?];
        Ok(Self {
            stream,
            dims: *dims,
            dtype,
            options: *options,
            launch: shape.launch_params(),
            shape,
            main,
            smem,
            params,
            workspace,
            split_counters,
            staging,
            copied,
            next: 0,
            prepared_rows: None,
            captured_rows: None,
        })
    }

    /// The capacity the batch was made for.
    pub fn capacity(&self) -> BatchCapacity {
        self.shape.capacity
    }

    /// Thread blocks per KV head of every launch (the main kernel's grid x).
    pub fn grid_blocks(&self) -> u32 {
        self.shape.blocks
    }

    /// Validates `sequences` (as [`super::segmented_attention_batch_into`] does, and against the
    /// capacity), plans them, and copies the plan into the batch's device buffer on the device's
    /// stream. The launches queued after it (a captured graph's replays included) read it.
    ///
    /// Runs outside a stream capture (an error during one): the copy reads page-locked memory
    /// that the next prepare() reuses. It blocks the host only when the copy issued two prepares
    /// before has not run yet. After a launch was captured, a prepare() of more query rows than
    /// the captured `q`, `out` and `lse` hold is an error. After an error, the batch has no
    /// prepared plan: [`CapturableBatch::launch`] refuses to run until the next prepare()
    /// succeeds (a graph's replay would still read the last plan copied).
    pub fn prepare<K: KvTensor>(
        &mut self,
        device: &Device,
        sequences: &[BatchSequence<'_, K>],
    ) -> Result<()> {
        self.prepared_rows = None;
        self.check_stream(device)?;
        if self.capturing()? {
            return Err(Error::InvalidParameter {
                name: "prepare",
                value: f64::NAN,
                requirement: "runs outside a stream capture (before the graph's replay)",
            });
        }
        let rows = self
            .shape
            .capacity
            .check_fits(sequences.iter().map(|s| (s.n_rows, s.segments.len())))?;
        if let Some(captured) = self.captured_rows.filter(|&c| rows > c) {
            return Err(Error::Shape(format!(
                "the sequences own {rows} rows, the captured launch's query and outputs have \
                 {captured}"
            )));
        }
        validate_sequences(device, sequences, &self.dims, self.dtype, |i| {
            format!("sequence {i}: ")
        })?;
        let (layout, guards) = device_layout(
            &self.stream,
            sequences,
            &self.dims,
            self.dtype,
            &device.attention_occupancy(self.dtype, self.dims.head_dim)?,
            self.options.num_splits,
            Some(self.shape.tile),
        )?;
        drop(guards);
        // The copy from this slot two prepares ago must have run before the slot is rewritten.
        let (slot, copied) = (&mut self.staging[self.next], &self.copied[self.next]);
        copied.synchronize()?;
        // Written in place: the image is the capacity's size, megabytes for a large one.
        self.shape.image_into(&layout, slot.as_mut_slice()?)?;
        layout.recycle();
        self.stream.memcpy_htod(slot, &mut self.params)?;
        copied.record(&self.stream)?;
        self.next ^= 1;
        self.prepared_rows = Some(rows);
        Ok(())
    }

    /// Enqueues the attention kernel over the prepared sequences: `q` packs their
    /// rows (`[rows, n_heads, head_dim]` with at least the prepared rows; rows past them are not
    /// read), `out` and `lse` take the results (`out` like `q`, `lse` `[rows, n_heads]` f32).
    /// Allocates nothing and copies nothing, so a stream capture can record it.
    ///
    /// A captured launch replays with the `q`, `out` and `lse` it was captured with, and reads
    /// the plan of the last successful [`CapturableBatch::prepare`] before the replay: give it
    /// buffers of `capacity().rows` rows (a later prepare() of more rows than they hold is
    /// refused). Capturing needs cudarc's cross-stream event tracking off in the context
    /// (`Device::new` turns it off; a [`Device::with_stream`] context with several streams
    /// may have it on, and then a launch during a capture is an error): with it on, the launch
    /// would wait on events recorded outside the capture.
    ///
    /// # Safety
    /// The plan holds the addresses of the segments' K and V, and a captured graph those of the
    /// batch's buffers and of `q`, `out` and `lse`. So the K and V tensors of the segments passed
    /// to the last successful [`CapturableBatch::prepare`] must not be dropped (their memory freed
    /// or reused) before this launch runs on the stream; and when the launch is captured, that
    /// holds for every replay of the graph, and neither this batch nor `q`, `out` and `lse` may be
    /// dropped while the graph can still be replayed. The segments' reads are ordered by the
    /// stream alone: order other streams' writes to them yourself.
    pub unsafe fn launch(
        &mut self,
        device: &Device,
        q: &Tensor,
        out: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        self.check_stream(device)?;
        let Some(rows) = self.prepared_rows else {
            return Err(Error::InvalidParameter {
                name: "launch",
                value: f64::NAN,
                requirement: "needs a prepare() first",
            });
        };
        validate_io(device, q, &self.dims, out, lse)?;
        q.check_dtype(self.dtype, "query")?;
        if q.shape()[0] < rows {
            return Err(Error::Shape(format!(
                "the query has {} rows, the prepared sequences own {rows}",
                q.shape()[0]
            )));
        }
        if self.capturing()? {
            if self.stream.context().is_managing_stream_synchronization() {
                return Err(Error::InvalidParameter {
                    name: "launch",
                    value: f64::NAN,
                    requirement: "is captured only in a context with cudarc's event tracking \
                                  off (CudaContext::disable_event_tracking)",
                });
            }
            let rows = q.shape()[0];
            self.captured_rows = Some(self.captured_rows.map_or(rows, |c| c.min(rows)));
        }
        let shape = &self.shape;
        let part = |i: usize| self.params.slice(shape.offsets[i]..);
        let (mut o_part, mut lse_part) = self
            .workspace
            .split_at_mut((shape.parts * self.dims.head_dim).max(1));
        let mut split_counters = self.split_counters.slice_mut(..);
        let kernel = AttentionKernel {
            main: &self.main,
            grid: (shape.blocks, self.dims.n_kv_heads as u32, 1),
            threads: shape.tile.threads() as u32,
            smem: self.smem,
        };
        let params = KernelParams {
            descs: part(0),
            rope_cs: part(1),
            seqs: part(2),
            work: part(3),
            launch: &self.launch,
        };
        // SAFETY: the parameter buffer holds, at the offsets of `shape`, the image of a plan of
        // validated sequences within the capacity (prepare(), which checked its descriptors,
        // table, sequences, thread blocks and partial states against the shape); `launch` names
        // its seq_slots sequences, so every thread block reads seqs[work[blockIdx.x]], and those
        // past the plan's leave at once (the idle sequence has no rows). q, out and lse hold at
        // least the prepared rows (checked above); the workspace holds `parts` partial states
        // and a zero split counter per thread block of the grid (zeroed in new(), left zero by
        // every launch). The segments' K/V are alive (the caller's contract).
        unsafe {
            enqueue(
                &self.stream,
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
    }

    /// [`CapturableBatch::prepare`] and [`CapturableBatch::launch`] in one safe call: the
    /// segments are borrowed until both are queued, and the device frees memory in stream order.
    pub fn run<K: KvTensor>(
        &mut self,
        device: &Device,
        q: &Tensor,
        sequences: &[BatchSequence<'_, K>],
        out: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        validate_io(device, q, &self.dims, out, lse)?;
        self.prepare(device, sequences)?;
        // SAFETY: the segments just prepared are borrowed for this whole call; buffers dropped
        // after it are freed in stream order, after the launch.
        unsafe { self.launch(device, q, out, lse) }
    }

    /// Whether the batch's stream is capturing.
    fn capturing(&self) -> Result<bool> {
        Ok(self.stream.capture_status()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    fn check_stream(&self, device: &Device) -> Result<()> {
        if Arc::ptr_eq(device.stream(), &self.stream) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch(
                "the batch was made for another device or stream".into(),
            ))
        }
    }
}

impl Drop for CapturableBatch {
    /// Waits for the copies from the staging memory before it is freed (its own events are not
    /// recorded with cudarc's event tracking off).
    fn drop(&mut self) {
        for event in &self.copied {
            // Nothing to do about an error here: the context reports it on its next call.
            let _ = event.synchronize();
        }
    }
}

/// Page-locked host memory of `bytes` bytes, zeroed.
fn new_staging(stream: &Arc<CudaStream>, bytes: usize) -> Result<PinnedHostSlice<u8>> {
    // SAFETY: the memory is zeroed below, before anything reads it.
    let mut slot = unsafe { stream.context().alloc_pinned::<u8>(bytes.max(1)) }?;
    let ptr = slot.as_mut_ptr()?;
    // SAFETY: `ptr` points to the slot's `bytes.max(1)` bytes, which nothing else uses yet.
    unsafe { std::ptr::write_bytes(ptr, 0, bytes.max(1)) };
    Ok(slot)
}
