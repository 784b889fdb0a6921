//! The device handle: a CUDA context, the stream every launch goes to, and the crate's kernels
//! loaded from the fatbin that `build.rs` embedded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};

use super::segmented_attention::{AttentionOccupancy, Occupancy, TileShape};
use super::DType;
use crate::error::{Error, Result};

/// How this copy of the crate's kernels was built: the nvcc version and architectures, or why
/// they were not built.
pub fn kernel_build_info() -> &'static str {
    env!("APE_ATTN_KERNEL_BUILD")
}

/// True when this copy of the crate holds compiled CUDA kernels.
pub fn kernels_built() -> bool {
    kernel_image().is_ok()
}

#[cfg(ape_kernels)]
fn kernel_image() -> Result<&'static [u8]> {
    Ok(include_bytes!(env!("APE_ATTN_FATBIN")))
}

#[cfg(not(ape_kernels))]
fn kernel_image() -> Result<&'static [u8]> {
    let info = kernel_build_info();
    Err(Error::KernelsNotBuilt(
        info.strip_prefix("not built: ").unwrap_or(info),
    ))
}

/// One CUDA device with the crate's kernels loaded. All launches through one `Device` are
/// ordered on its stream.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    sm_count: usize,
    /// Shared memory one thread block may use (static plus dynamic, opted in), bytes.
    smem_per_block: usize,
    /// The attention kernels' residency, by kernel name (asked of the driver once).
    occupancy: Mutex<HashMap<&'static str, Occupancy>>,
    workspace: Mutex<Workspace>,
    /// RoPE frequency tables on the device, by the bits of their values.
    rope_freqs: Mutex<HashMap<Vec<u64>, Arc<CudaSlice<f64>>>>,
}

/// The split-KV attention's scratch memory, kept between launches (kernels/segmented_attention.cu):
/// the partial states (f32) and the split counters (u32, one per query tile and KV head).
///
/// Two allocations, each grown on its own and zero-filled when allocated: a launch needs its
/// counters at 0, and every launch leaves the counters it used at 0 again (the last split of a
/// tile resets its own), so the counters stay all zero between launches, provided nothing else
/// ever writes them. The partial states' extent changes from launch to launch: in one buffer, one
/// launch's partial states would land where a later launch's counters are.
#[derive(Default)]
struct Workspace {
    parts: Option<CudaSlice<f32>>,
    split_counters: Option<CudaSlice<u32>>,
}

/// Distinct RoPE frequency tables kept on a device (a model has one or two); past this many the
/// cache starts over.
const MAX_ROPE_TABLES: usize = 16;

/// `m` locked; a lock poisoned by a panic elsewhere is an error naming `what`.
fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> Result<MutexGuard<'a, T>> {
    m.lock()
        .map_err(|_| Error::NoDevice(format!("{what} poisoned by a panic")))
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens device `ordinal` and loads the kernels. Errors (never panics) when the kernels were
    /// not built, when there is no NVIDIA driver, or when the device does not exist.
    ///
    /// The device's context and [`Device::stream`] are its own, and every launch and copy runs on
    /// that stream, so buffers need no cross-stream tracking and get none (cudarc's event
    /// tracking is off in this context). A caller who uses its tensors on another stream orders
    /// that use itself, as with any raw CUDA buffer; an engine with its own streams uses
    /// [`Device::with_stream`], which leaves the caller's context as it is.
    pub fn new(ordinal: usize) -> Result<Self> {
        let image = kernel_image()?;
        // SAFETY: only tries to open the driver library by its usual names; touches no state.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDevice(
                "the NVIDIA driver library (libcuda) is not present on this machine".into(),
            ));
        }
        let count = CudaContext::device_count()?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: nothing has been allocated in this new context yet. Everything the crate does
        // runs on the one stream below, where the CUDA stream order already orders every use and
        // every (stream-ordered) free; cudarc's cross-stream events would only add two driver
        // calls per buffer per launch (hundreds per launch over many segments). The docs above
        // state what a caller that uses these buffers on another stream must do.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Self::load(image, stream)
    }

    /// The crate's kernels on the caller's `stream` (and its context): an engine that runs its own
    /// work on cudarc keeps one stream, and every launch through this `Device` is ordered with that
    /// work. Tensors for it can wrap the engine's own buffers ([`super::Tensor::from_device_buffer`]).
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        Self::load(kernel_image()?, stream)
    }

    fn load(image: &[u8], stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))?;
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?;
        let smem_per_block = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        Ok(Self {
            ctx,
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
            sm_count: sm_count.max(1) as usize,
            smem_per_block: smem_per_block.max(0) as usize,
            occupancy: Mutex::new(HashMap::new()),
            workspace: Mutex::new(Workspace::default()),
            rope_freqs: Mutex::new(HashMap::new()),
        })
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok(self.ctx.compute_capability()?)
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// Waits until every launch so far has finished, and reports any asynchronous kernel error.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// The stream launches go to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The attention kernels' residency on this device for `dtype` and `head_dim`
    /// ([`Device::attention_occupancy_of`] for each tile shape). An error only where the prefill
    /// tile's kernel fits no SM at all; a launch that needs more than a kernel fits is refused
    /// when it is planned, and the launcher never chooses such a kernel.
    pub fn attention_occupancy(&self, dtype: DType, head_dim: usize) -> Result<AttentionOccupancy> {
        let o = AttentionOccupancy {
            prefill: self.attention_occupancy_of(TileShape::Prefill, dtype, head_dim)?,
            wide: self.attention_occupancy_of(TileShape::Wide, dtype, head_dim)?,
            decode: self.attention_occupancy_of(TileShape::Decode, dtype, head_dim)?,
        };
        if !o.prefill.fits(false) {
            return Err(Error::NoDevice(format!(
                "{} does not fit on this device's SMs ({} bytes of shared memory)",
                TileShape::Prefill.kernel_name(dtype, head_dim),
                TileShape::Prefill.smem_bytes(head_dim, 2).0
            )));
        }
        Ok(o)
    }

    /// The residency of the `shape` attention kernel for `dtype` and `head_dim`, as the driver
    /// counts it for the compiled kernel (its registers and static shared memory on this
    /// architecture) with the dynamic shared memory of each pipeline depth it may run: the
    /// stages it runs with here ([`TileShape::choose_stages`]), and thread blocks per SM for a
    /// launch without and with RoPE shifts at those stages (0 where one block does not fit).
    /// Asked once per kernel, which also sets the kernel's shared-memory limit to the largest
    /// size it may run with on this device; the plan fills the wave it gives.
    pub fn attention_occupancy_of(
        &self,
        shape: TileShape,
        dtype: DType,
        head_dim: usize,
    ) -> Result<Occupancy> {
        let name = shape.kernel_name(dtype, head_dim);
        if let Some(o) = lock(&self.occupancy, "occupancy cache")?.get(name) {
            return Ok(*o);
        }
        // Sizes past what one block may use fit no block; the driver is asked about the rest.
        let fits = |dynamic: usize| shape.static_smem() + dynamic <= self.smem_per_block;
        let (stages, plain, shifts) = {
            // The function's limit: the largest size that fits (0 where none does, and the
            // kernel fits nothing).
            let largest = (2..=shape.max_stages())
                .flat_map(|s| {
                    let (plain, shifts) = shape.smem_bytes(head_dim, s);
                    [plain, shifts]
                })
                .filter(|&b| fits(b))
                .max()
                .unwrap_or(0);
            let f = self.function_with_smem(name, largest as u32)?;
            let threads = shape.threads() as u32;
            let per_sm = |smem: usize| -> Result<usize> {
                if !fits(smem) || smem > largest {
                    return Ok(0);
                }
                Ok(f.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)? as usize)
            };
            let mut err = None;
            let mut choose = |with_shifts: bool| {
                shape.choose_stages(|s| {
                    let (plain, shifts) = shape.smem_bytes(head_dim, s);
                    per_sm(if with_shifts { shifts } else { plain }).unwrap_or_else(|e| {
                        err = Some(e);
                        0
                    })
                })
            };
            let stages = (choose(false), choose(true));
            if let Some(e) = err {
                return Err(e);
            }
            (
                stages,
                per_sm(shape.smem_bytes(head_dim, stages.0).0)?,
                per_sm(shape.smem_bytes(head_dim, stages.1).1)?,
            )
        };
        let o = Occupancy {
            sm_count: self.sm_count,
            blocks_per_sm: plain,
            blocks_per_sm_with_shifts: shifts,
            stages: stages.0,
            stages_with_shifts: stages.1,
        };
        lock(&self.occupancy, "occupancy cache")?.insert(name, o);
        Ok(o)
    }

    /// Runs `f` with the split-KV workspace ([`Workspace`]): at least `parts` f32 of partial
    /// states and `counters` split counters, all zero before a launch's first use. Each buffer is
    /// kept between calls and grown when too small (a new one, zero-filled; the old one is freed
    /// in stream order). Reuse is safe because every launch goes to this device's one stream, in
    /// order, and every launch leaves the counters at zero.
    pub(crate) fn with_workspace<R>(
        &self,
        parts: usize,
        counters: usize,
        f: impl FnOnce(&mut CudaSlice<f32>, &mut CudaSlice<u32>) -> Result<R>,
    ) -> Result<R> {
        let mut guard = lock(&self.workspace, "workspace")?;
        let ws = &mut *guard;
        if ws.parts.as_ref().is_none_or(|w| w.len() < parts) {
            ws.parts = None;
            ws.parts = Some(self.stream.alloc_zeros::<f32>(parts.max(1))?);
        }
        if ws
            .split_counters
            .as_ref()
            .is_none_or(|w| w.len() < counters)
        {
            ws.split_counters = None;
            ws.split_counters = Some(self.stream.alloc_zeros::<u32>(counters.max(1))?);
        }
        match (ws.parts.as_mut(), ws.split_counters.as_mut()) {
            (Some(p), Some(c)) => f(p, c),
            _ => Err(Error::NoDevice("workspace allocation vanished".into())),
        }
    }

    /// `freqs` (a RoPE frequency table, [`crate::RopeConfig::inv_freqs`]) on the device, uploaded
    /// on first use and kept: a forward pass rotates Q and K in every layer, and each launch would
    /// otherwise allocate and upload the same table from pageable memory.
    pub(crate) fn rope_freqs(&self, freqs: &[f64]) -> Result<Arc<CudaSlice<f64>>> {
        let key: Vec<u64> = freqs.iter().map(|f| f.to_bits()).collect();
        let mut cache = lock(&self.rope_freqs, "RoPE table cache")?;
        if let Some(t) = cache.get(&key) {
            return Ok(t.clone());
        }
        if cache.len() >= MAX_ROPE_TABLES {
            // Tables still held by a queued launch's caller stay alive through their Arc.
            cache.clear();
        }
        let table = Arc::new(self.stream.clone_htod(freqs)?);
        cache.insert(key, table.clone());
        Ok(table)
    }

    /// A kernel of the embedded module, by its `extern "C"` name.
    pub(crate) fn function(&self, name: &'static str) -> Result<CudaFunction> {
        self.function_with_smem(name, 0)
    }

    /// A kernel that needs `dynamic_smem` bytes of dynamic shared memory: the opt-in attribute is
    /// set to it once, when the function is first loaded. Set whenever the kernel takes dynamic
    /// shared memory, not only above 48 KiB: without it, static plus dynamic shared memory must fit
    /// in 48 KiB, and the attention kernel at head dim 64 with RoPE shifts takes exactly 48 KiB
    /// dynamic plus its static parameters.
    pub(crate) fn function_with_smem(
        &self,
        name: &'static str,
        dynamic_smem: u32,
    ) -> Result<CudaFunction> {
        let mut cache = lock(&self.functions, "kernel cache")?;
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let f = self.module.load_function(name)?;
        if dynamic_smem > 0 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_smem as i32,
            )?;
        }
        cache.insert(name, f.clone());
        Ok(f)
    }
}
