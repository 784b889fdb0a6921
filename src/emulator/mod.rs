//! The kernel emulator (feature `emulator`): the crate's CUDA kernels, compiled from the same
//! `kernels/*.cu` source by the host C++ compiler and run on the CPU, so that they are tested
//! against the [`crate::reference`] oracle on machines without a GPU.
//!
//! `emulator/` (at the repository root, beside `kernels/`) holds the two pieces: `cuda.h`, the CUDA language the kernels use
//! (qualifiers, thread coordinates, barriers, shuffles, bf16/f16), and `ptx.cuh`, the inline PTX
//! of `kernels/ptx.cuh` (cp.async, ldmatrix, mma.sync m16n8k16, ex2.approx) implemented from the
//! PTX ISA's definitions. A CTA runs as one fiber per CUDA thread; warp instructions exchange
//! their operands between the warp's 32 fibers. `runtime.cpp` documents the model.
//!
//! What a passing emulated test shows: the kernel's index math, fragment layouts, masking, tile
//! walk, split/combine logic and APE correction compute what the oracle computes, and its
//! barriers and cp.async waits are where a correct schedule needs them ([`EmulatorOptions`] runs
//! the same launch under different legal schedules). What it does not show: speed, register
//! pressure, or anything that depends on one GPU's rounding of tensor-core sums (the emulator sums
//! exact products in f32 in k order). The GPU tests remain the judge of the hardware path.
//!
//! Each launcher here takes host data, lays the launch out with the same code as the CUDA
//! launcher in [`crate::cuda`] (the plan, the descriptors, the RoPE table, the parameters), and
//! runs the emulated kernels on it. The mirrored paths: `src/reference/X.rs` (oracle),
//! `src/cuda/X.rs` (GPU launcher), `src/emulator/X.rs` (emulated launcher).
//!
//! The `ape-llama` crate puts these launchers behind its GPU forward pass's device operations
//! (`EmulatedOps`), so the whole model runs on the emulator too, GEMMs on the CPU.

mod capturable_batch;
mod llama_ops;
mod merge_states;
mod rope;
mod segmented_attention;

pub use capturable_batch::capturable_batch;
pub use llama_ops::{embedding, fill_uniform, rms_norm, silu_mul};
pub use merge_states::{merge_state_in_place, merge_states};
pub use rope::{rope_apply, rope_shift};
pub use segmented_attention::{segmented_attention, segmented_attention_batch};

use std::ffi::{c_char, c_void, CString};

use crate::cuda::segmented_attention::AttentionOccupancy;
use crate::cuda::DType;
use crate::error::{Error, Result};

/// How the emulator runs a launch. Every combination is a schedule a GPU may legally produce; a
/// correct kernel computes the same bits under all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmulatorOptions {
    /// Run each CTA's threads in reverse order between barriers (default: thread order).
    pub reverse: bool,
    /// `cp.async` copies land only at the `cp.async.wait_group` that guarantees them (default:
    /// when issued).
    pub late_copies: bool,
    /// OS threads running CTAs in parallel (0: one per core).
    pub threads: u32,
    /// The device the launch is planned for (the split-KV decision, the decode tile's pipeline
    /// stages): an H100 SXM by default ([`AttentionOccupancy::h100`]).
    pub occupancy: AttentionOccupancy,
    /// Segmented attention only: launch the kernel a second time on the same workspace (its
    /// outputs and partial states poisoned again, the split counters as the first launch left
    /// them), as a CUDA graph's next replay does, and fail unless it gives the same bits.
    pub relaunch: bool,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            reverse: false,
            late_copies: false,
            threads: 0,
            occupancy: AttentionOccupancy::h100(),
            relaunch: false,
        }
    }
}

impl EmulatorOptions {
    /// The four schedules (thread order x copy timing) with the other options as in `self`.
    pub fn schedules(self) -> [Self; 4] {
        [(false, false), (true, false), (false, true), (true, true)].map(
            |(reverse, late_copies)| Self {
                reverse,
                late_copies,
                ..self
            },
        )
    }
}

extern "C" {
    fn ape_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        params: *mut *mut c_void,
        flags: u32,
        threads: u32,
        regions: *const u64,
        n_regions: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Runs kernel `name` on the emulator. `reads` names the global buffers the kernel may read
/// through `cp.async` and `__ldg` (the emulator fails a launch that reads outside them); empty:
/// unchecked.
///
/// # Safety
/// `args` must point at values of exactly the kernel's parameter types, in order, and every
/// pointer among them must be valid for what the kernel reads and writes through it.
pub(crate) unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: usize,
    args: &mut [*mut c_void],
    reads: &[&Aligned],
    options: &EmulatorOptions,
) -> Result<()> {
    let c_name =
        CString::new(name).map_err(|_| Error::Emulator(format!("kernel name {name:?}")))?;
    let grid = [grid.0, grid.1, grid.2];
    let block = [block.0, block.1, block.2];
    let flags = u32::from(options.reverse) | (u32::from(options.late_copies) << 1);
    let regions: Vec<u64> = reads
        .iter()
        .flat_map(|b| [b.words.as_ptr() as u64, b.bytes as u64])
        .collect();
    let mut err = vec![0u8; 1024];
    // SAFETY: the strings and arrays outlive the call; the caller vouches for `args`.
    let rc = unsafe {
        ape_emu_launch(
            c_name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            smem,
            args.as_mut_ptr(),
            flags,
            options.threads,
            regions.as_ptr(),
            reads.len(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(Error::Emulator(
        String::from_utf8_lossy(&err[..end]).into_owned(),
    ))
}

/// [`launch`] of a kernel whose parameters are pointers followed by one parameter struct, the
/// shape of every kernel the emulated launchers run: `ptrs` holds the pointers' values.
///
/// # Safety
/// As for [`launch`]: `ptrs` and `P` must be the kernel's parameters, in order, and every pointer
/// valid for what the kernel reads and writes through it.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_ptrs<P: bytemuck::Pod>(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: usize,
    ptrs: &[u64],
    params: &P,
    reads: &[&Aligned],
    options: &EmulatorOptions,
) -> Result<()> {
    let mut ptrs = ptrs.to_vec();
    let mut params = *params;
    let mut args: Vec<*mut c_void> = ptrs
        .iter_mut()
        .map(|p| p as *mut u64 as *mut c_void)
        .collect();
    args.push(&mut params as *mut P as *mut c_void);
    // SAFETY: the caller vouches for the pointers and the parameters; `args` points at copies
    // that outlive the call.
    unsafe { launch(name, grid, block, smem, &mut args, reads, options) }
}

/// A zero-initialised host buffer aligned to 16 bytes, as device allocations are (the kernels'
/// 16-byte vector and cp.async accesses need it).
pub(crate) struct Aligned {
    words: Vec<u128>,
    /// The bytes in use (the rest of the last word is padding).
    bytes: usize,
}

impl Aligned {
    pub fn new(bytes: usize) -> Self {
        Self {
            words: vec![0; bytes.div_ceil(16).max(1)],
            bytes,
        }
    }

    /// A buffer holding `values`.
    pub fn from_slice<T: bytemuck::Pod>(values: &[T]) -> Self {
        let mut b = Self::new(std::mem::size_of_val(values));
        b.as_mut_slice::<T>(values.len()).copy_from_slice(values);
        b
    }

    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self, len: usize) -> &mut [T] {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.words);
        bytemuck::cast_slice_mut(&mut bytes[..len * std::mem::size_of::<T>()])
    }

    pub fn as_slice<T: bytemuck::Pod>(&self, len: usize) -> &[T] {
        let bytes: &[u8] = bytemuck::cast_slice(&self.words);
        bytemuck::cast_slice(&bytes[..len * std::mem::size_of::<T>()])
    }

    pub fn addr(&mut self) -> u64 {
        self.words.as_mut_ptr() as u64
    }
}

/// `values` rounded to `dtype`, in a buffer laid out as a device tensor of that dtype.
pub(crate) fn to_dtype(values: &[f32], dtype: DType) -> Aligned {
    match dtype {
        DType::F32 => Aligned::from_slice(values),
        DType::F16 => Aligned::from_slice(
            &values
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect::<Vec<u16>>(),
        ),
        DType::BF16 => Aligned::from_slice(
            &values
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect::<Vec<u16>>(),
        ),
    }
}

/// The first `len` values of a buffer of `dtype`, as f32.
pub(crate) fn from_dtype(buf: &Aligned, len: usize, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => buf.as_slice::<f32>(len).to_vec(),
        DType::F16 => buf
            .as_slice::<u16>(len)
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect(),
        DType::BF16 => buf
            .as_slice::<u16>(len)
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: usize) -> Result<()> {
        // A fill_uniform_f32 launch over 64 floats: y, seed, scale, offset, params {n, width, eps}.
        let mut y = Aligned::new(64 * 4);
        let mut y_ptr = y.addr();
        let (mut seed, mut scale, mut offset) = (7u32, 1.0f32, 0.0f32);
        let mut params = [0u8; 16];
        params[..8].copy_from_slice(&64u64.to_le_bytes());
        let mut args = [
            &mut y_ptr as *mut u64 as *mut c_void,
            &mut seed as *mut u32 as *mut c_void,
            &mut scale as *mut f32 as *mut c_void,
            &mut offset as *mut f32 as *mut c_void,
            params.as_mut_ptr() as *mut c_void,
        ];
        // SAFETY: fill_uniform_f32(T* y, uint32_t seed, float scale, float offset, LlamaOpsParams
        // p) with y holding 64 floats (p.n = 64); the other names are refused before any launch.
        unsafe {
            launch(
                name,
                grid,
                block,
                smem,
                &mut args,
                &[],
                &EmulatorOptions::default(),
            )
        }
    }

    #[test]
    fn a_valid_launch_runs_and_bad_launches_are_errors() {
        run("fill_uniform_f32", (2, 1, 1), (32, 1, 1), 0).unwrap();
        let err = |r: Result<()>| match r {
            Err(Error::Emulator(msg)) => msg,
            other => panic!("expected an emulator error, got {other:?}"),
        };
        assert!(err(run("no_such_kernel", (1, 1, 1), (32, 1, 1), 0)).contains("no kernel named"));
        assert!(err(run("fill_uniform_f32", (0, 1, 1), (32, 1, 1), 0)).contains("grid"));
        assert!(err(run("fill_uniform_f32", (1, 1, 1), (2048, 1, 1), 0)).contains("block"));
        assert!(err(run("fill_uniform_f32", (1, 1, 1), (32, 1, 1), 1 << 20)).contains("shared"));
    }
}
