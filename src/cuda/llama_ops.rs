//! The element-wise Llama operations on the GPU (kernels/llama_ops.cu; oracle:
//! [`crate::reference::llama_ops`]): RMSNorm, `silu(gate) * up`, the embedding gather, and the
//! synthetic-weight fill. RMSNorm's input and the embedding's output may be f32 while the rest is
//! bf16 or f16: the forward pass keeps its residual stream in f32.

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::{DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::params::check_positive;

/// Mirrors `ape::LlamaOpsParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct LlamaOpsParams {
    pub n: u64,
    pub width: u32,
    pub eps: f32,
}
const _: () = assert!(std::mem::size_of::<LlamaOpsParams>() == 16);
// SAFETY: a #[repr(C)] plain-data struct with the kernel's layout.
unsafe impl DeviceRepr for LlamaOpsParams {}

/// The one-dtype element-wise kernels (RMSNorm and the embedding have their own, with mixed forms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ElementOp {
    /// `silu_mul_*`.
    SiluMul,
    /// `fill_uniform_*`.
    Fill,
}

/// The kernel for `op` on tensors of `dtype`.
pub(crate) fn name(op: ElementOp, dtype: DType) -> &'static str {
    match (op, dtype) {
        (ElementOp::SiluMul, DType::F32) => "silu_mul_f32",
        (ElementOp::SiluMul, DType::F16) => "silu_mul_f16",
        (ElementOp::SiluMul, DType::BF16) => "silu_mul_bf16",
        (ElementOp::Fill, DType::F32) => "fill_uniform_f32",
        (ElementOp::Fill, DType::F16) => "fill_uniform_f16",
        (ElementOp::Fill, DType::BF16) => "fill_uniform_bf16",
    }
}

/// The synthetic fill's `scale` and `offset` must be finite.
pub(crate) fn check_fill_params(scale: f32, offset: f32) -> Result<()> {
    for (name, value) in [("fill scale", scale), ("fill offset", offset)] {
        if !value.is_finite() {
            return Err(Error::InvalidParameter {
                name,
                value: value as f64,
                requirement: "must be finite",
            });
        }
    }
    Ok(())
}

/// The RMSNorm kernel for an `x` of `x_dtype` and `w`, `y` of `dtype`: one dtype throughout, or
/// an f32 `x` (the forward pass's residual stream).
pub(crate) fn rms_norm_name(x_dtype: DType, dtype: DType) -> Result<&'static str> {
    Ok(match (x_dtype, dtype) {
        (DType::F32, DType::F32) => "rms_norm_f32",
        (DType::F16, DType::F16) => "rms_norm_f16",
        (DType::BF16, DType::BF16) => "rms_norm_bf16",
        (DType::F32, DType::F16) => "rms_norm_f32_to_f16",
        (DType::F32, DType::BF16) => "rms_norm_f32_to_bf16",
        _ => {
            return Err(Error::DType(format!(
                "rms_norm: x is {x_dtype:?} and w, y {dtype:?}; x must be theirs or F32"
            )))
        }
    })
}

/// The embedding kernel for a table of `dtype` and an output of `y_dtype`: the table's, or f32
/// (the forward pass's residual stream).
pub(crate) fn embedding_name(dtype: DType, y_dtype: DType) -> Result<&'static str> {
    Ok(match (dtype, y_dtype) {
        (DType::F32, DType::F32) => "embedding_f32",
        (DType::F16, DType::F16) => "embedding_f16",
        (DType::BF16, DType::BF16) => "embedding_bf16",
        (DType::F16, DType::F32) => "embedding_f16_to_f32",
        (DType::BF16, DType::F32) => "embedding_bf16_to_f32",
        _ => {
            return Err(Error::DType(format!(
                "embedding: the table is {dtype:?} and y {y_dtype:?}; y must be the table's or F32"
            )))
        }
    })
}

pub(crate) fn rows(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn width_of(t: &Tensor, what: &str) -> Result<usize> {
    match t.shape().last() {
        Some(&w) if w > 0 && w <= u32::MAX as usize => Ok(w),
        _ => Err(Error::Shape(format!(
            "{what} has shape {:?}: needs a last dim in 1..2^32",
            t.shape()
        ))),
    }
}

/// RMSNorm of every row of `x` (`[..., d]`) with weight `w` (`[d]`) into `y` (`x`'s shape, `w`'s
/// dtype). `x` has `w`'s dtype or is f32 (a residual stream kept in f32).
pub fn rms_norm_into(
    device: &Device,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    y: &mut Tensor,
) -> Result<()> {
    check_positive("RMSNorm epsilon", eps as f64)?;
    let d = width_of(x, "x")?;
    w.check_shape(&[d], "w")?;
    y.check_shape(x.shape(), "y")?;
    y.check_dtype(w.dtype(), "y")?;
    let kernel = rms_norm_name(x.dtype(), w.dtype())?;
    for (t, what) in [(x, "x"), (w, "w"), (&*y, "y")] {
        t.check_device(device, what)?;
    }
    let n = (x.len() / d) as u64;
    if n == 0 {
        return Ok(());
    }
    let p = LlamaOpsParams {
        n,
        width: d as u32,
        eps,
    };
    let f = device.function(kernel)?;
    let mut l = device.stream().launch_builder(&f);
    l.arg(x.device_buffer())
        .arg(w.device_buffer())
        .arg(y.buf_mut())
        .arg(&p);
    // SAFETY: arguments match rms_norm_* (x, w, y, params); x and y hold n * d elements and w
    // holds d; the kernel is the one for x's dtype and w's (= y's), checked above.
    unsafe { l.launch(rows(n)) }?;
    Ok(())
}

/// [`rms_norm_into`] into a new tensor of `w`'s dtype.
pub fn rms_norm(device: &Device, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let mut y = Tensor::zeros(device, x.shape(), w.dtype())?;
    rms_norm_into(device, x, w, eps, &mut y)?;
    Ok(y)
}

/// `y = silu(gate) * up`, element-wise (same shapes and dtypes).
pub fn silu_mul_into(device: &Device, gate: &Tensor, up: &Tensor, y: &mut Tensor) -> Result<()> {
    up.check_shape(gate.shape(), "up")?;
    y.check_shape(gate.shape(), "y")?;
    up.check_dtype(gate.dtype(), "up")?;
    y.check_dtype(gate.dtype(), "y")?;
    for (t, what) in [(gate, "gate"), (up, "up"), (&*y, "y")] {
        t.check_device(device, what)?;
    }
    let n = gate.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let p = LlamaOpsParams {
        n,
        width: 0,
        eps: 0.0,
    };
    let f = device.function(name(ElementOp::SiluMul, gate.dtype()))?;
    let mut l = device.stream().launch_builder(&f);
    l.arg(gate.device_buffer())
        .arg(up.device_buffer())
        .arg(y.buf_mut())
        .arg(&p);
    let cfg = super::grid_stride(n);
    // SAFETY: arguments match silu_mul_* (g, u, y, params); all three hold n elements of one dtype.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// [`silu_mul_into`] into a new tensor.
pub fn silu_mul(device: &Device, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let mut y = Tensor::zeros(device, gate.shape(), gate.dtype())?;
    silu_mul_into(device, gate, up, &mut y)?;
    Ok(y)
}

/// Rows `ids` of `table` (`[vocab, d]`) as a new `[ids.len(), d]` tensor of the table's dtype.
/// Ids are checked against the vocabulary before anything is read.
pub fn embedding(device: &Device, ids: &[u32], table: &Tensor) -> Result<Tensor> {
    let d = table.shape().last().copied().unwrap_or(0);
    let mut y = Tensor::zeros(device, &[ids.len(), d], table.dtype())?;
    embedding_into(device, ids, table, &mut y)?;
    Ok(y)
}

/// Rows `ids` of `table` (`[vocab, d]`) into `y` (`[ids.len(), d]`, the table's dtype or f32,
/// exact either way). Ids are checked against the vocabulary before anything is read.
pub fn embedding_into(device: &Device, ids: &[u32], table: &Tensor, y: &mut Tensor) -> Result<()> {
    let ts = table.shape();
    if ts.len() != 2 {
        return Err(Error::Shape(format!(
            "embedding table has shape {ts:?}, expected [vocab, d]"
        )));
    }
    table.check_device(device, "table")?;
    y.check_device(device, "y")?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= ts[0]) {
        return Err(Error::OutOfRange(format!(
            "token id {bad} is outside the vocabulary of {}",
            ts[0]
        )));
    }
    let d = width_of(table, "table")?;
    y.check_shape(&[ids.len(), d], "y")?;
    let kernel = embedding_name(table.dtype(), y.dtype())?;
    if ids.is_empty() {
        return Ok(());
    }
    let ids_dev = device.stream().clone_htod(ids)?;
    let p = LlamaOpsParams {
        n: ids.len() as u64,
        width: d as u32,
        eps: 0.0,
    };
    let f = device.function(kernel)?;
    let mut l = device.stream().launch_builder(&f);
    l.arg(&ids_dev)
        .arg(table.device_buffer())
        .arg(y.buf_mut())
        .arg(&p);
    // SAFETY: arguments match embedding_* (ids, table, y, params); every id is < vocab (checked),
    // the table holds vocab * d elements and y holds ids.len() * d; the kernel is the one for the
    // table's dtype and y's, checked above.
    unsafe { l.launch(rows(ids.len() as u64)) }?;
    Ok(())
}

/// Fills `y` with `offset + scale * u`, `u` uniform in `[-1, 1)` from a hash of the element index
/// and `seed` (synthetic weights of any shape, generated on the device).
pub fn fill_uniform(
    device: &Device,
    y: &mut Tensor,
    seed: u32,
    scale: f32,
    offset: f32,
) -> Result<()> {
    check_fill_params(scale, offset)?;
    y.check_device(device, "y")?;
    let n = y.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let p = LlamaOpsParams {
        n,
        width: 0,
        eps: 0.0,
    };
    let f = device.function(name(ElementOp::Fill, y.dtype()))?;
    let mut l = device.stream().launch_builder(&f);
    l.arg(y.buf_mut())
        .arg(&seed)
        .arg(&scale)
        .arg(&offset)
        .arg(&p);
    let cfg = super::grid_stride(n);
    // SAFETY: arguments match fill_uniform_* (y, seed, scale, offset, params); y holds n elements.
    unsafe { l.launch(cfg) }?;
    Ok(())
}
