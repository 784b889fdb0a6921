//! [`CudaOps`]: the GPU forward pass's [`DeviceOps`] on a GPU, the crate's CUDA kernels and
//! cuBLAS GEMMs on the device's stream.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device_ops::{check_linear, concat_shape, elements, linear_shape, DeviceOps};
use crate::store::Fill;
use ape_attn::cuda::{self, llama_ops, BatchSequence, DType, Device, Query, Segment, Tensor};
use ape_attn::{ApeParams, AttentionDims, RopeConfig};
use ape_attn::{Error, Result};

/// [`DeviceOps`] on a GPU: the crate's CUDA kernels and cuBLAS GEMMs (bf16 in, f32 accumulation),
/// all on the device's stream.
pub struct CudaOps {
    dev: Arc<Device>,
    blas: CudaBlas,
}

impl std::fmt::Debug for CudaOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaOps")
            .field("device", &self.dev)
            .finish_non_exhaustive()
    }
}

impl CudaOps {
    /// The operations on `dev` (creates a cuBLAS handle on its stream).
    pub fn new(dev: Arc<Device>) -> Result<Self> {
        // SAFETY: only tries to open the cuBLAS library by its usual names. Without it, cudarc
        // would panic on the first cuBLAS call.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::NoDevice(
                "the cuBLAS library (libcublas) is not on the library path".into(),
            ));
        }
        let blas = CudaBlas::new(dev.stream().clone())?;
        Ok(Self { dev, blas })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// `y (+)= x W^T` (see [`linear_gemm_config`]): `x` and `W` bf16, `y` bf16 or f32, f32
    /// accumulation (`cublasGemmEx`, compute type 32F).
    fn gemm(&self, x: &Tensor, w: &Tensor, y: &mut Tensor, accumulate: bool) -> Result<()> {
        let cfg = check_linear(x, w, y, accumulate)?;
        for (t, what) in [(x, "linear x"), (w, "linear W"), (&*y, "linear y")] {
            t.check_device(&self.dev, what)?;
        }
        let c_type = match y.dtype() {
            DType::F32 => cudaDataType_t::CUDA_R_32F,
            _ => cudaDataType_t::CUDA_R_16BF, // check_linear allows only these two
        };
        if cfg.m == 0 || cfg.n == 0 {
            return Ok(());
        }
        let stream = self.dev.stream();
        // The raw call uses the thread's current context: make it the device's.
        stream.context().bind_to_thread()?;
        let (a, _a_sync) = w.device_buffer().device_ptr(stream);
        let (b, _b_sync) = x.device_buffer().device_ptr(stream);
        let (c, _c_sync) = y.buf_mut().device_ptr_mut(stream);
        // SAFETY: the shapes and dtypes were checked above, and linear_gemm_config's dims and
        // leading dims read exactly W (dout x din bf16) and x (n x din bf16) and write y
        // (n x dout of c_type). alpha and beta are f32, as compute type 32F takes them; the
        // handle runs on the device's stream, where the buffers' guards record the use.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                (&cfg.alpha as *const f32).cast(),
                a as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                cfg.lda,
                b as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                cfg.ldb,
                (&cfg.beta as *const f32).cast(),
                c as *mut c_void,
                c_type,
                cfg.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}

impl DeviceOps for CudaOps {
    type Tensor = Tensor;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Tensor::from_f32(&self.dev, shape, data, DType::BF16)
    }

    fn uniform(&self, shape: &[usize], seed: u32, scale: f32, offset: f32) -> Result<Tensor> {
        let mut t = Tensor::uninit(&self.dev, shape, DType::BF16)?;
        llama_ops::fill_uniform(&self.dev, &mut t, seed, scale, offset)?;
        Ok(t)
    }

    fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        t.to_f32(&self.dev)
    }

    fn upload_bf16_bytes(
        &self,
        shape: &[usize],
        count: usize,
        fill: &mut Fill<'_>,
    ) -> Result<Vec<Tensor>> {
        let bytes = elements(shape)? * DType::BF16.size();
        let total = bytes
            .checked_mul(count)
            .ok_or_else(|| Error::OutOfRange(format!("{count} tensors of {shape:?}")))?;
        let stream = self.dev.stream();
        // SAFETY: every byte is written by `fill` below before anything reads it, and an
        // error drops the buffer unread.
        let mut staging = unsafe { stream.context().alloc_pinned::<u8>(total.max(1)) }?;
        fill(&mut staging.as_mut_slice()?[..total])?;
        let tensors = (|| {
            let host = staging.as_slice()?;
            (0..count)
                .map(|i| {
                    let mut t = Tensor::uninit(&self.dev, shape, DType::BF16)?;
                    stream.memcpy_htod(&host[i * bytes..(i + 1) * bytes], t.buf_mut())?;
                    Ok(t)
                })
                .collect::<Result<Vec<_>>>()
        })();
        // The copies read the staging memory until they finish: wait before it is freed.
        stream.synchronize()?;
        tensors
    }

    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        let d = table.shape().last().copied().unwrap_or(0);
        let mut x = Tensor::uninit(&self.dev, &[ids.len(), d], DType::F32)?;
        llama_ops::embedding_into(&self.dev, ids, table, &mut x)?;
        Ok(x)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        llama_ops::rms_norm(&self.dev, x, w, eps)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        llama_ops::silu_mul(&self.dev, gate, up)
    }

    fn rope_apply(&self, x: &mut Tensor, rope: &RopeConfig, pos: i64) -> Result<()> {
        cuda::rope_apply(&self.dev, x, rope, pos)
    }

    fn rope_shift(&self, x: &mut Tensor, rope: &RopeConfig, delta: i64) -> Result<()> {
        cuda::rope_shift(&self.dev, x, rope, delta)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, dtype: DType) -> Result<Tensor> {
        let shape = linear_shape(x.shape(), w.shape())?;
        // cuBLAS with beta = 0 writes all of y and never reads it: no zero fill needed.
        let mut y = Tensor::uninit(&self.dev, &shape, dtype)?;
        self.gemm(x, w, &mut y, false)?;
        Ok(y)
    }

    fn add_linear(&self, x: &Tensor, w: &Tensor, residual: &mut Tensor) -> Result<()> {
        self.gemm(x, w, residual, true)
    }

    fn segmented_attention(
        &self,
        query: &Query<'_, Tensor>,
        segments: &[Segment<'_, Tensor>],
        dims: &AttentionDims,
        ape: &ApeParams,
    ) -> Result<Tensor> {
        Ok(cuda::segmented_attention(&self.dev, query, segments, dims, ape)?.0)
    }

    fn segmented_attention_batch(
        &self,
        q: &Tensor,
        sequences: &[BatchSequence<'_, Tensor>],
        dims: &AttentionDims,
    ) -> Result<Tensor> {
        Ok(cuda::segmented_attention_batch(&self.dev, q, sequences, dims)?.0)
    }

    fn copy_rows(&self, t: &Tensor, start: usize, count: usize) -> Result<Tensor> {
        t.copy_rows(&self.dev, start, count)
    }

    fn concat(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let shape = concat_shape(parts.iter().map(|t| t.shape()))?;
        let dtype = parts[0].dtype();
        let mut out = Tensor::uninit(&self.dev, &shape, dtype)?;
        let mut at = 0;
        for t in parts {
            t.check_dtype(dtype, "concat part")?;
            t.check_device(&self.dev, "concat part")?;
            let bytes = t.len() * dtype.size();
            if bytes > 0 {
                let mut dst = out.buf_mut().slice_mut(at..at + bytes);
                self.dev.stream().memcpy_dtod(&t.data(), &mut dst)?;
            }
            at += bytes;
        }
        Ok(out)
    }

    fn try_clone(&self, t: &Tensor) -> Result<Tensor> {
        t.try_clone(&self.dev)
    }
}
