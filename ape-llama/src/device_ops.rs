//! What the GPU forward pass ([`crate::gpu::GpuModel`]) needs from a device: [`DeviceOps`] and its
//! tensor, [`DeviceTensor`], with the shape checks and the cuBLAS call of a linear layer that the
//! implementations share ([`crate::gpu::CudaOps`] on a GPU, `emulated_ops::EmulatedOps` on the
//! kernel emulator). Both are re-exported from [`crate::gpu`].

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::GemmConfig;

use crate::store::Fill;
use ape_attn::cuda::{BatchSequence, DType, Query, Segment, Tensor};
use ape_attn::{ApeParams, AttentionDims, RopeConfig};
use ape_attn::{Error, Result};

/// A tensor of a [`DeviceOps`]: dense, row-major; bf16, but for the residual stream and the
/// logits (f32).
pub trait DeviceTensor: std::fmt::Debug + Sized {
    /// Shape.
    fn shape(&self) -> &[usize];
    /// Element type.
    fn dtype(&self) -> DType;
    /// The same data under another shape with as many elements (no copy).
    fn reshape(self, shape: &[usize]) -> Result<Self>;
    /// Bytes the tensor holds.
    fn bytes(&self) -> usize;
}

impl DeviceTensor for Tensor {
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }

    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }

    fn reshape(self, shape: &[usize]) -> Result<Self> {
        Tensor::reshape(self, shape)
    }

    fn bytes(&self) -> usize {
        self.len() * self.dtype().size()
    }
}

/// The operations the GPU forward pass needs from a device, on bf16 tensors and the f32 residual
/// stream. Each is one of ape-attn's kernels (oracle in [`ape_attn::reference`]) or a GEMM.
/// Implemented by [`crate::gpu::CudaOps`] (a GPU) and, with the `emulator` feature, by
/// `emulated_ops::EmulatedOps` (the kernel emulator).
pub trait DeviceOps {
    /// The device's tensor.
    type Tensor: DeviceTensor;

    /// The device's kind (`cuda`, `emulator`): part of the name of the computation a stored block
    /// comes from.
    fn name(&self) -> &'static str;

    /// `data` (f32, row-major) rounded to bf16, on the device.
    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Self::Tensor>;
    /// Synthetic weights generated on the device: `offset + scale * u`, `u` uniform in `[-1, 1)`
    /// from `seed` (`fill_uniform`).
    fn uniform(&self, shape: &[usize], seed: u32, scale: f32, offset: f32) -> Result<Self::Tensor>;
    /// The tensor's values, as f32.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// `count` bf16 tensors of `shape` from their raw bytes (little-endian, one tensor after the
    /// other), which `fill` writes into one host buffer: page-locked on a GPU, then one copy per
    /// tensor, no conversion (a stored block read from the block store).
    fn upload_bf16_bytes(
        &self,
        shape: &[usize],
        count: usize,
        fill: &mut Fill<'_>,
    ) -> Result<Vec<Self::Tensor>> {
        let n = elements(shape)?;
        let total = n
            .checked_mul(count)
            .ok_or_else(|| Error::OutOfRange(format!("{count} tensors of {shape:?}")))?;
        let mut raw = vec![0u16; total];
        fill(bytemuck::cast_slice_mut(&mut raw))?;
        raw.chunks_exact(n.max(1))
            .take(count)
            .map(|t| {
                let values: Vec<f32> = t
                    .iter()
                    .map(|&b| half::bf16::from_bits(u16::from_le(b)).to_f32())
                    .collect();
                self.upload(shape, &values)
            })
            .collect()
    }
    /// Rows `ids` of `table` (`[vocab, d]`) as a new residual stream (f32, exact).
    fn embedding(&self, ids: &[u32], table: &Self::Tensor) -> Result<Self::Tensor>;
    /// RMSNorm of every row of `x` (the f32 residual stream, or bf16) with weight `w`, as bf16.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// `silu(gate) * up`, element-wise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// RoPE of `x` (`[n, heads, head_dim]`) in place, row `t` to position `pos + t`.
    fn rope_apply(&self, x: &mut Self::Tensor, rope: &RopeConfig, pos: i64) -> Result<()>;
    /// Rotates `x` (`[n, heads, head_dim]`, already at its positions) by `delta` more positions.
    fn rope_shift(&self, x: &mut Self::Tensor, rope: &RopeConfig, delta: i64) -> Result<()>;
    /// `x[n, in] W^T` with `W` `[out, in]`, a new `[n, out]` of `dtype` (bf16 for activations,
    /// f32 for the logits): f32 accumulation, one rounding.
    fn linear(&self, x: &Self::Tensor, w: &Self::Tensor, dtype: DType) -> Result<Self::Tensor>;
    /// `residual[n, out] += x[n, in] W^T`, the residual stream f32: no rounding to bf16.
    fn add_linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        residual: &mut Self::Tensor,
    ) -> Result<()>;
    /// The segmented attention's output (`[n_rows, n_heads, head_dim]`).
    fn segmented_attention(
        &self,
        query: &Query<'_, Self::Tensor>,
        segments: &[Segment<'_, Self::Tensor>],
        dims: &AttentionDims,
        ape: &ApeParams,
    ) -> Result<Self::Tensor>;
    /// The segmented attention of a batch of sequences in one launch
    /// ([`ape_attn::cuda::segmented_attention_batch`]): sequence `i` owns `sequences[i].n_rows`
    /// consecutive rows of the packed query `q` (`[rows, n_heads, head_dim]`, after the rows of
    /// the sequences before it) and attends to its own segments with its own APE parameters. The
    /// output has `q`'s shape, each sequence's rows as [`DeviceOps::segmented_attention`] gives
    /// them for that sequence alone (up to rounding: a batch may split a sequence's keys
    /// differently).
    fn segmented_attention_batch(
        &self,
        q: &Self::Tensor,
        sequences: &[BatchSequence<'_, Self::Tensor>],
        dims: &AttentionDims,
    ) -> Result<Self::Tensor>;
    /// Rows `start..start + count` of the first dim, copied.
    fn copy_rows(&self, t: &Self::Tensor, start: usize, count: usize) -> Result<Self::Tensor>;
    /// Rows `[a; b; ...]` of tensors alike but for their first dim, in one new tensor.
    fn concat(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;
    /// A copy.
    fn try_clone(&self, t: &Self::Tensor) -> Result<Self::Tensor>;
}

/// Elements of a tensor of `shape`, checked for overflow.
pub(crate) fn elements(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::OutOfRange(format!("a tensor of {shape:?} has too many elements")))
}

/// Checks `y[n, out] = x[n, in] W^T` shapes; returns `(n, in, out)`.
pub(crate) fn linear_dims(x: &[usize], w: &[usize], y: &[usize]) -> Result<(usize, usize, usize)> {
    if x.len() != 2 || w.len() != 2 || x[1] != w[1] || y != [x[0], w[0]] {
        return Err(Error::Shape(format!("linear: x {x:?}, W {w:?}, y {y:?}")));
    }
    Ok((x[0], x[1], w[0]))
}

/// The output shape `[n, out]` of `x[n, in] W^T`, the shapes checked.
pub(crate) fn linear_shape(x: &[usize], w: &[usize]) -> Result<[usize; 2]> {
    let (Some(&n), Some(&dout)) = (x.first(), w.first()) else {
        return Err(Error::Shape(format!("linear: x {x:?}, W {w:?}")));
    };
    linear_dims(x, w, &[n, dout])?;
    Ok([n, dout])
}

/// Checks `y (+)= x W^T` (shapes; `x` and `W` bf16; `y` bf16 or f32, and f32 when accumulating:
/// the residual stream) and returns the cuBLAS call ([`linear_gemm_config`]).
pub(crate) fn check_linear<T: DeviceTensor>(
    x: &T,
    w: &T,
    y: &T,
    accumulate: bool,
) -> Result<GemmConfig<f32>> {
    let (n, din, dout) = linear_dims(x.shape(), w.shape(), y.shape())?;
    if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
        return Err(Error::DType(format!(
            "linear: x is {:?} and W {:?}, expected BF16",
            x.dtype(),
            w.dtype()
        )));
    }
    match (y.dtype(), accumulate) {
        (DType::F32, _) | (DType::BF16, false) => {}
        (other, true) => {
            return Err(Error::DType(format!(
                "the residual is {other:?}, expected F32"
            )))
        }
        (other, false) => {
            return Err(Error::DType(format!(
                "linear y is {other:?}, not BF16 or F32"
            )))
        }
    }
    linear_gemm_config(n, din, dout, accumulate)
}

/// The shape of the concatenation of `parts` along their first dim.
pub(crate) fn concat_shape<'a>(parts: impl IntoIterator<Item = &'a [usize]>) -> Result<Vec<usize>> {
    let mut out: Option<Vec<usize>> = None;
    for s in parts {
        match &mut out {
            None if !s.is_empty() => out = Some(s.to_vec()),
            Some(o) if s.len() == o.len() && s[1..] == o[1..] => o[0] += s[0],
            _ => {
                return Err(Error::Shape(format!(
                    "concat: a part of shape {s:?} does not stack with {out:?}"
                )))
            }
        }
    }
    out.ok_or_else(|| Error::Shape("concat of no tensors".into()))
}

/// The cuBLAS call for `y[n, out] (+)= x[n, in] W^T` on row-major data (alpha and beta as the
/// f32 compute type takes them). cuBLAS is column-major, so the row-major `y` is the column-major
/// `C = Y^T` (`out x n`, ld `out`), and `C = op_T(A) B` with `A` = `W` seen column-major
/// (`in x out`, ld `in`) and `B` = `x` seen column-major (`in x n`, ld `in`).
pub(crate) fn linear_gemm_config(
    n: usize,
    din: usize,
    dout: usize,
    accumulate: bool,
) -> Result<GemmConfig<f32>> {
    let to_i32 = |v: usize| {
        i32::try_from(v).map_err(|_| Error::OutOfRange(format!("GEMM dim {v} exceeds i32")))
    };
    let (n, din, dout) = (to_i32(n)?, to_i32(din)?, to_i32(dout)?);
    Ok(GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: dout,
        n,
        k: din,
        alpha: 1.0,
        lda: din,
        ldb: din,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: dout,
    })
}
