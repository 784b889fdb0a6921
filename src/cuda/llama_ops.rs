//! The element-wise Llama operations on the GPU (kernels/llama_ops.cu; oracle:
//! [`crate::reference::llama_ops`]): RMSNorm, `silu(gate) * up`, and the embedding gather.

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

pub(crate) fn name(op: &str, dtype: DType) -> &'static str {
    match (op, dtype) {
        ("rms_norm", DType::F32) => "rms_norm_f32",
        ("rms_norm", DType::F16) => "rms_norm_f16",
        ("rms_norm", DType::BF16) => "rms_norm_bf16",
        ("silu_mul", DType::F32) => "silu_mul_f32",
        ("silu_mul", DType::F16) => "silu_mul_f16",
        ("silu_mul", DType::BF16) => "silu_mul_bf16",
        ("fill", DType::F32) => "fill_uniform_f32",
        ("fill", DType::F16) => "fill_uniform_f16",
        ("fill", DType::BF16) => "fill_uniform_bf16",
        (_, DType::F32) => "embedding_f32",
        (_, DType::F16) => "embedding_f16",
        (_, DType::BF16) => "embedding_bf16",
    }
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

/// RMSNorm of every row of `x` (`[..., d]`) with weight `w` (`[d]`, same dtype) into `y`.
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
    w.check_dtype(x.dtype(), "w")?;
    y.check_shape(x.shape(), "y")?;
    y.check_dtype(x.dtype(), "y")?;
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
    let f = device.function(name("rms_norm", x.dtype()))?;
    let mut l = device.stream().launch_builder(&f);
    l.arg(x.buf()).arg(w.buf()).arg(y.buf_mut()).arg(&p);
    // SAFETY: arguments match rms_norm_* (x, w, y, params); x and y hold n * d elements and w
    // holds d, all of the same dtype (checked above).
    unsafe { l.launch(rows(n)) }?;
    Ok(())
}

/// [`rms_norm_into`] into a new tensor.
pub fn rms_norm(device: &Device, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let mut y = Tensor::zeros(device, x.shape(), x.dtype())?;
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
    let f = device.function(name("silu_mul", gate.dtype()))?;
    let mut l = device.stream().launch_builder(&f);
    l.arg(gate.buf()).arg(up.buf()).arg(y.buf_mut()).arg(&p);
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

/// Rows `ids` of `table` (`[vocab, d]`) as a new `[ids.len(), d]` tensor. Ids are checked
/// against the vocabulary before anything is read.
pub fn embedding(device: &Device, ids: &[u32], table: &Tensor) -> Result<Tensor> {
    let ts = table.shape();
    if ts.len() != 2 {
        return Err(Error::Shape(format!(
            "embedding table has shape {ts:?}, expected [vocab, d]"
        )));
    }
    table.check_device(device, "table")?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= ts[0]) {
        return Err(Error::OutOfRange(format!(
            "token id {bad} is outside the vocabulary of {}",
            ts[0]
        )));
    }
    let d = width_of(table, "table")?;
    let mut y = Tensor::zeros(device, &[ids.len(), d], table.dtype())?;
    if ids.is_empty() {
        return Ok(y);
    }
    let ids_dev = device.stream().clone_htod(ids)?;
    let p = LlamaOpsParams {
        n: ids.len() as u64,
        width: d as u32,
        eps: 0.0,
    };
    let f = device.function(name("embedding", table.dtype()))?;
    let mut l = device.stream().launch_builder(&f);
    l.arg(&ids_dev).arg(table.buf()).arg(y.buf_mut()).arg(&p);
    // SAFETY: arguments match embedding_* (ids, table, y, params); every id is < vocab (checked),
    // the table holds vocab * d elements and y holds ids.len() * d, in the table's dtype.
    unsafe { l.launch(rows(ids.len() as u64)) }?;
    Ok(y)
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
    if !scale.is_finite() || !offset.is_finite() {
        return Err(Error::InvalidParameter {
            name: "fill scale/offset",
            value: scale as f64,
            requirement: "must be finite",
        });
    }
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
    let f = device.function(name("fill", y.dtype()))?;
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
