//! The GPU forward pass's device operations on the kernel emulator: [`EmulatedOps`] implements
//! [`DeviceOps`] with the crate's kernels run by the emulator and the GEMMs run on the CPU as
//! cuBLAS defines them, so [`crate::gpu::GpuModel`] runs whole on machines without a GPU
//! (mirrors [`crate::gpu::CudaOps`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::GemmConfig;

use crate::device_ops::{check_linear, concat_shape, linear_shape, DeviceOps, DeviceTensor};
use ape_attn::cuda::{
    check_reshape, element_count, row_range, BatchSequence, DType, Query, Segment,
    SegmentedAttentionOptions,
};
use ape_attn::emulator::{self, EmulatorOptions};
use ape_attn::reference;
use ape_attn::{ApeParams, AttentionDims, RopeConfig};
use ape_attn::{Error, Result};

/// A tensor of [`EmulatedOps`], in host memory: its shape, its dtype, and its values (each one of
/// the dtype's, held as f32).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<f32>,
}

impl HostTensor {
    /// `data` rounded to `dtype`, as a tensor of `shape`.
    pub fn new(shape: &[usize], dtype: DType, data: &[f32]) -> Result<Self> {
        let n = element_count(shape)?;
        if data.len() != n {
            return Err(Error::Shape(format!(
                "{} values given for shape {shape:?} ({n} elements)",
                data.len()
            )));
        }
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            data: data.iter().map(|&x| dtype.round(x)).collect(),
        })
    }

    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        &self.data
    }

    /// A kernel's output (values already of `dtype`) under `shape`.
    fn from_kernel(shape: &[usize], dtype: DType, data: Vec<f32>) -> Result<Self> {
        if data.len() != element_count(shape)? {
            return Err(Error::Shape(format!(
                "a kernel returned {} values for shape {shape:?}",
                data.len()
            )));
        }
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            data,
        })
    }
}

impl DeviceTensor for HostTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn reshape(self, shape: &[usize]) -> Result<Self> {
        check_reshape(&self.shape, self.data.len(), shape)?;
        Ok(Self {
            shape: shape.to_vec(),
            ..self
        })
    }

    fn bytes(&self) -> usize {
        self.data.len() * self.dtype.size()
    }
}

/// [`DeviceOps`] on the kernel emulator: each kernel launch runs under the next of the given
/// schedules in turn (see [`EmulatorOptions::schedules`]); GEMMs run on the CPU.
#[derive(Debug)]
pub struct EmulatedOps {
    schedules: Vec<EmulatorOptions>,
    next: AtomicUsize,
}

impl EmulatedOps {
    /// Every launch under `options`.
    pub fn new(options: EmulatorOptions) -> Self {
        Self {
            schedules: vec![options],
            next: AtomicUsize::new(0),
        }
    }

    /// Launches cycle through `options`' four schedules.
    pub fn cycling(options: EmulatorOptions) -> Self {
        Self {
            schedules: options.schedules().to_vec(),
            next: AtomicUsize::new(0),
        }
    }

    fn options(&self) -> EmulatorOptions {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedules[i % self.schedules.len()]
    }
}

/// `C = alpha op(A) op(B) + beta C` as cuBLAS defines it for column-major matrices (`op` the
/// identity or the transpose; `C` is `m x n` with leading dim `ldc`, `op(A)` `m x k`, `op(B)`
/// `k x n`), summed in f32 and rounded once to `c_dtype` as `cublasGemmEx` with compute type
/// 32F does. Leading dims and buffer sizes are checked as cuBLAS would need them.
pub(crate) fn gemm_column_major(
    cfg: &GemmConfig<f32>,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    c_dtype: DType,
) -> Result<()> {
    let dim = |v: i32, what: &str| {
        usize::try_from(v).map_err(|_| Error::Shape(format!("GEMM {what} = {v} is negative")))
    };
    let (m, n, k) = (dim(cfg.m, "m")?, dim(cfg.n, "n")?, dim(cfg.k, "k")?);
    let (lda, ldb, ldc) = (
        dim(cfg.lda, "lda")?,
        dim(cfg.ldb, "ldb")?,
        dim(cfg.ldc, "ldc")?,
    );
    let transposed = |op: cublasOperation_t, what: &str| match op {
        cublasOperation_t::CUBLAS_OP_N => Ok(false),
        cublasOperation_t::CUBLAS_OP_T => Ok(true),
        other => Err(Error::Shape(format!(
            "GEMM {what}: {other:?} is not emulated"
        ))),
    };
    let (ta, tb) = (
        transposed(cfg.transa, "transa")?,
        transposed(cfg.transb, "transb")?,
    );
    // op(A)[i, l] is A[i + l*lda] (N: A stored m x k) or A[l + i*lda] (T: stored k x m).
    let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
    let fits = |rows: usize, cols: usize, ld: usize, len: usize| {
        ld >= rows.max(1) && (cols == 0 || rows == 0 || (cols - 1) * ld + rows <= len)
    };
    if !fits(a_rows, a_cols, lda, a.len())
        || !fits(b_rows, b_cols, ldb, b.len())
        || !fits(m, n, ldc, c.len())
    {
        return Err(Error::Shape(format!(
            "GEMM m={m} n={n} k={k} lda={lda} ldb={ldb} ldc={ldc} does not fit buffers of \
             {}, {} and {} values",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (rsa, csa) = if ta { (lda, 1) } else { (1, lda) };
    let (rsb, csb) = if tb { (ldb, 1) } else { (1, ldb) };
    let mut acc = vec![0f32; m * n];
    // SAFETY: the strides address op(A) (m x k), op(B) (k x n) inside `a` and `b` (checked by
    // `fits` above); `acc` is a dense m x n row-major buffer.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            0.0,
            acc.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    let (alpha, beta) = (cfg.alpha, cfg.beta);
    for i in 0..m {
        for j in 0..n {
            let out = &mut c[i + j * ldc];
            let prior = if beta == 0.0 { 0.0 } else { beta * *out };
            *out = c_dtype.round(alpha * acc[i * n + j] + prior);
        }
    }
    Ok(())
}

impl DeviceOps for EmulatedOps {
    type Tensor = HostTensor;

    fn name(&self) -> &'static str {
        "emulator"
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<HostTensor> {
        HostTensor::new(shape, DType::BF16, data)
    }

    fn uniform(&self, shape: &[usize], seed: u32, scale: f32, offset: f32) -> Result<HostTensor> {
        let n = element_count(shape)?;
        let data = emulator::fill_uniform(DType::BF16, n, seed, scale, offset, &self.options())?;
        HostTensor::from_kernel(shape, DType::BF16, data)
    }

    fn download(&self, t: &HostTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn embedding(&self, ids: &[u32], table: &HostTensor) -> Result<HostTensor> {
        if table.shape.len() != 2 {
            return Err(Error::Shape(format!(
                "embedding table has shape {:?}, expected [vocab, d]",
                table.shape
            )));
        }
        let d = table.shape[1];
        let opts = self.options();
        let y = emulator::embedding(table.dtype, DType::F32, ids, &table.data, d, &opts)?;
        HostTensor::from_kernel(&[ids.len(), d], DType::F32, y)
    }

    fn rms_norm(&self, x: &HostTensor, w: &HostTensor, eps: f32) -> Result<HostTensor> {
        if x.shape.last() != Some(&w.data.len()) || w.shape.len() != 1 {
            return Err(Error::Shape(format!(
                "rms_norm: x {:?}, w {:?}",
                x.shape, w.shape
            )));
        }
        let opts = self.options();
        let y = emulator::rms_norm(x.dtype, w.dtype, &x.data, &w.data, eps, &opts)?;
        HostTensor::from_kernel(&x.shape, w.dtype, y)
    }

    fn silu_mul(&self, gate: &HostTensor, up: &HostTensor) -> Result<HostTensor> {
        if gate.shape != up.shape || gate.dtype != up.dtype {
            return Err(Error::Shape(format!(
                "silu_mul: gate {:?} {:?}, up {:?} {:?}",
                gate.shape, gate.dtype, up.shape, up.dtype
            )));
        }
        let y = emulator::silu_mul(gate.dtype, &gate.data, &up.data, &self.options())?;
        HostTensor::from_kernel(&gate.shape, gate.dtype, y)
    }

    fn rope_apply(&self, x: &mut HostTensor, rope: &RopeConfig, pos: i64) -> Result<()> {
        let shape = rope_shape(x)?;
        emulator::rope_apply(x.dtype, &mut x.data, shape, rope, pos, &self.options())
    }

    fn rope_shift(&self, x: &mut HostTensor, rope: &RopeConfig, delta: i64) -> Result<()> {
        let shape = rope_shape(x)?;
        emulator::rope_shift(x.dtype, &mut x.data, shape, rope, delta, &self.options())
    }

    fn linear(&self, x: &HostTensor, w: &HostTensor, dtype: DType) -> Result<HostTensor> {
        let shape = linear_shape(&x.shape, &w.shape)?;
        // NaN: cuBLAS with beta = 0 must not read y.
        let mut y = HostTensor::from_kernel(&shape, dtype, vec![f32::NAN; shape[0] * shape[1]])?;
        gemm(x, w, &mut y, false)?;
        Ok(y)
    }

    fn add_linear(&self, x: &HostTensor, w: &HostTensor, residual: &mut HostTensor) -> Result<()> {
        gemm(x, w, residual, true)
    }

    fn segmented_attention(
        &self,
        query: &Query<'_, HostTensor>,
        segments: &[Segment<'_, HostTensor>],
        dims: &AttentionDims,
        ape: &ApeParams,
    ) -> Result<HostTensor> {
        let qs = query_shape(query.data, dims)?;
        let refs = reference_segments(segments, dims, query.data.dtype, "")?;
        let q = reference::segmented_attention::Query {
            data: &query.data.data,
            n_rows: qs[0],
            pos_offset: query.pos_offset,
        };
        let out = emulator::segmented_attention(
            query.data.dtype,
            &q,
            &refs,
            dims,
            ape,
            &SegmentedAttentionOptions::default(),
            &self.options(),
        )?;
        HostTensor::from_kernel(qs, query.data.dtype, out.out)
    }

    fn segmented_attention_batch(
        &self,
        q: &HostTensor,
        sequences: &[BatchSequence<'_, HostTensor>],
        dims: &AttentionDims,
    ) -> Result<HostTensor> {
        let qs = query_shape(q, dims)?;
        let refs = sequences
            .iter()
            .enumerate()
            .map(|(i, s)| reference_segments(s.segments, dims, q.dtype, &format!("sequence {i}: ")))
            .collect::<Result<Vec<_>>>()?;
        let seqs: Vec<reference::BatchSequence> = sequences
            .iter()
            .zip(&refs)
            .map(|(s, segments)| reference::BatchSequence {
                n_rows: s.n_rows,
                pos_offset: s.pos_offset,
                segments,
                ape: s.ape,
            })
            .collect();
        let out = emulator::segmented_attention_batch(
            q.dtype,
            &q.data,
            &seqs,
            dims,
            &SegmentedAttentionOptions::default(),
            &self.options(),
        )?;
        HostTensor::from_kernel(qs, q.dtype, out.out)
    }

    fn copy_rows(&self, t: &HostTensor, start: usize, count: usize) -> Result<HostTensor> {
        let (shape, row_len) = row_range(&t.shape, t.data.len(), start, count)?;
        HostTensor::from_kernel(
            &shape,
            t.dtype,
            t.data[start * row_len..(start + count) * row_len].to_vec(),
        )
    }

    fn concat(&self, parts: &[&HostTensor]) -> Result<HostTensor> {
        let shape = concat_shape(parts.iter().map(|t| t.shape.as_slice()))?;
        let dtype = parts[0].dtype;
        if let Some(t) = parts.iter().find(|t| t.dtype != dtype) {
            return Err(Error::DType(format!(
                "concat of {dtype:?} and {:?} parts",
                t.dtype
            )));
        }
        let data = parts.iter().flat_map(|t| t.data.iter().copied()).collect();
        HostTensor::from_kernel(&shape, dtype, data)
    }

    fn try_clone(&self, t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }
}

/// The CUDA path's GEMM call for `y (+)= x W^T` (A is W, B is x, C is y: see
/// `linear_gemm_config`), with its checks.
fn gemm(x: &HostTensor, w: &HostTensor, y: &mut HostTensor, accumulate: bool) -> Result<()> {
    let cfg = check_linear(x, w, y, accumulate)?;
    gemm_column_major(&cfg, &w.data, &x.data, &mut y.data, y.dtype)
}

/// The query's shape, checked to be `[n_rows, n_heads, head_dim]`.
fn query_shape<'a>(q: &'a HostTensor, dims: &AttentionDims) -> Result<&'a [usize]> {
    let qs = &q.shape;
    if qs.len() != 3 || qs[1] != dims.n_heads || qs[2] != dims.head_dim {
        return Err(Error::Shape(format!(
            "query has shape {qs:?}, expected [n_rows, {}, {}]",
            dims.n_heads, dims.head_dim
        )));
    }
    Ok(qs)
}

/// The segments as the oracle and the emulator take them, their shapes (`[len, n_kv_heads,
/// head_dim]`, K and V alike) and dtypes (the query's, `dtype`) checked; `prefix` starts the
/// messages (a batch's "sequence i: ").
fn reference_segments<'a>(
    segments: &[Segment<'a, HostTensor>],
    dims: &AttentionDims,
    dtype: DType,
    prefix: &str,
) -> Result<Vec<reference::Segment<'a>>> {
    segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let len = s.k.shape.first().copied().unwrap_or(0);
            let want = [len, dims.n_kv_heads, dims.head_dim];
            if s.k.shape != want || s.v.shape != want {
                return Err(Error::Shape(format!(
                    "{prefix}segment {i}: k {:?}, v {:?}, expected {want:?}",
                    s.k.shape, s.v.shape
                )));
            }
            if s.k.dtype != dtype || s.v.dtype != dtype {
                return Err(Error::DType(format!(
                    "{prefix}segment {i}: k {:?}, v {:?}, the query {dtype:?}",
                    s.k.dtype, s.v.dtype
                )));
            }
            Ok(reference::Segment {
                k: &s.k.data,
                v: &s.v.data,
                len,
                pos_offset: s.pos_offset,
                role: s.role,
                rope_shift: s.rope_shift,
            })
        })
        .collect()
}

fn rope_shape(x: &HostTensor) -> Result<[usize; 3]> {
    <[usize; 3]>::try_from(x.shape.as_slice()).map_err(|_| {
        Error::Shape(format!(
            "RoPE input has shape {:?}, expected [n, heads, head_dim]",
            x.shape
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_ops::linear_gemm_config;

    /// The CUDA path's GEMM call, read as cuBLAS defines it, is `y = x W^T` on row-major data.
    #[test]
    fn the_linear_gemm_call_computes_x_times_w_transposed() {
        let (n, din, dout) = (5, 7, 3);
        let x: Vec<f32> = (0..n * din).map(|i| (i % 5) as f32 - 2.0).collect();
        let w: Vec<f32> = (0..dout * din).map(|i| (i % 3) as f32 * 0.5).collect();
        let y0: Vec<f32> = (0..n * dout).map(|i| i as f32).collect();
        for accumulate in [false, true] {
            let mut y = if accumulate {
                y0.clone()
            } else {
                vec![f32::NAN; n * dout]
            };
            let cfg = linear_gemm_config(n, din, dout, accumulate).unwrap();
            gemm_column_major(&cfg, &w, &x, &mut y, DType::BF16).unwrap();
            for r in 0..n {
                for o in 0..dout {
                    let dot: f32 = (0..din).map(|i| x[r * din + i] * w[o * din + i]).sum();
                    let want = dot + if accumulate { y0[r * dout + o] } else { 0.0 };
                    assert_eq!(
                        y[r * dout + o],
                        want,
                        "row {r} out {o} accumulate {accumulate}"
                    );
                }
            }
        }
        // Sums that are no bf16 value: one rounding of the f32 sum, to nearest.
        let x: Vec<f32> = (0..n * din).map(|i| 0.1 + (i % 7) as f32 * 0.37).collect();
        let w: Vec<f32> = (0..dout * din)
            .map(|i| 0.3 - (i % 5) as f32 * 0.11)
            .collect();
        let mut y = vec![f32::NAN; n * dout];
        let cfg = linear_gemm_config(n, din, dout, false).unwrap();
        gemm_column_major(&cfg, &w, &x, &mut y, DType::BF16).unwrap();
        let mut inexact = 0;
        for r in 0..n {
            for o in 0..dout {
                let dot: f64 = (0..din)
                    .map(|i| x[r * din + i] as f64 * w[o * din + i] as f64)
                    .sum();
                let got = y[r * dout + o];
                assert_eq!(got, DType::BF16.round(got), "a bf16 value");
                // Within half a bf16 unit (2^-8 relative) of the exact sum, plus f32 slack.
                let half_ulp = dot.abs() * 2f64.powi(-8) * 0.5;
                assert!(
                    (got as f64 - dot).abs() <= half_ulp * 1.01 + 1e-6,
                    "{got} vs {dot}"
                );
                inexact += usize::from(got as f64 != dot);
            }
        }
        assert!(inexact > 0, "the case must need rounding");
        // Buffers too small for the call are refused.
        let cfg = linear_gemm_config(n, din, dout, false).unwrap();
        let mut y = vec![0.0; n * dout];
        assert!(gemm_column_major(&cfg, &w[1..], &x, &mut y, DType::BF16).is_err());
        assert!(gemm_column_major(&cfg, &w, &x, &mut y[1..], DType::BF16).is_err());
    }

    /// Bad shapes and dtypes are errors on the emulated device, as on the GPU.
    #[test]
    fn bad_inputs_are_errors() {
        let ops = EmulatedOps::new(EmulatorOptions::default());
        let t = |shape: &[usize]| {
            ops.upload(shape, &vec![0.5; shape.iter().product()])
                .unwrap()
        };
        let (x, w) = (t(&[3, 8]), t(&[4, 8]));
        assert_eq!(ops.linear(&x, &w, DType::BF16).unwrap().shape(), [3, 4]);
        assert!(ops.linear(&x, &t(&[4, 7]), DType::BF16).is_err());
        // The residual stream is f32: a bf16 one is refused.
        let mut bf16_residual = t(&[3, 4]);
        assert!(ops.add_linear(&x, &w, &mut bf16_residual).is_err());
        let mut residual = ops.embedding(&[0, 1, 2], &t(&[5, 4])).unwrap();
        assert_eq!(residual.dtype(), DType::F32);
        ops.add_linear(&x, &w, &mut residual).unwrap();
        assert!(ops.embedding(&[5], &t(&[5, 4])).is_err());
        assert!(ops.rms_norm(&x, &t(&[7]), 1e-5).is_err());
        assert!(ops.silu_mul(&x, &t(&[8, 3])).is_err());
        assert!(ops.concat(&[&x, &t(&[2, 7])]).is_err());
        assert!(ops.concat(&[]).is_err());
        assert_eq!(ops.concat(&[&x, &t(&[2, 8])]).unwrap().shape(), [5, 8]);
        assert!(ops.copy_rows(&x, 2, 2).is_err());
        assert!(x.clone().reshape(&[24]).is_ok() && x.clone().reshape(&[25]).is_err());
        let mut q = t(&[2, 3, 64]);
        let rope = RopeConfig::new(64, 10_000.0, ape_attn::RopeLayout::Neox).unwrap();
        assert!(ops.rope_apply(&mut t(&[2, 192]), &rope, 0).is_err());
        ops.rope_apply(&mut q, &rope, 0).unwrap();
        let dims = AttentionDims::new(3, 1, 64).unwrap();
        let (k, v) = (t(&[5, 1, 64]), t(&[5, 1, 64]));
        let seg = |k, v| Segment {
            k,
            v,
            pos_offset: 0,
            role: ape_attn::SegmentRole::Context,
            rope_shift: None,
        };
        let query = Query {
            data: &q,
            pos_offset: 5,
        };
        let ape = ApeParams::plain();
        let out = ops.segmented_attention(&query, &[seg(&k, &v)], &dims, &ape);
        assert_eq!(out.unwrap().shape(), [2, 3, 64]);
        let bad_v = t(&[4, 1, 64]);
        assert!(ops
            .segmented_attention(&query, &[seg(&k, &bad_v)], &dims, &ape)
            .is_err());
        let wide = AttentionDims::new(3, 1, 128).unwrap();
        assert!(ops
            .segmented_attention(&query, &[seg(&k, &v)], &wide, &ape)
            .is_err());
    }
}
