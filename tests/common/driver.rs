//! What tests/gpu_driver.rs and tests/gpu_driver_faults.rs share: the crate's fatbin loaded
//! through cudarc directly, and the Llama-ops kernels' parameter block.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, DeviceRepr};

/// The Llama-ops kernels' parameter block (`ape::LlamaOpsParams`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LlamaOpsParams {
    pub n: u64,
    pub width: u32,
    pub eps: f32,
}
// SAFETY: #[repr(C)] plain data with the kernels' layout (16 bytes).
unsafe impl DeviceRepr for LlamaOpsParams {}

/// The crate's kernels, loaded from the fatbin build.rs embedded, into `ctx`.
pub fn kernels(ctx: &Arc<CudaContext>) -> Arc<CudaModule> {
    let image = include_bytes!(env!("APE_ATTN_FATBIN"));
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
        .expect("the crate's fatbin loads")
}
