//! The element-wise Llama operations on the kernel emulator: `kernels/llama_ops.cu` run on the
//! CPU, launched as [`crate::cuda::llama_ops`] launches them (oracle:
//! [`crate::reference::llama_ops`]). Inputs are rounded to their dtypes (`dtype`, or f32 for
//! RMSNorm's `x` and the embedding's output where asked) and outputs come back as f32.

use std::ffi::c_void;

use super::{from_dtype, launch, launch_ptrs, to_dtype, Aligned, EmulatorOptions};
use crate::cuda::llama_ops::{
    check_fill_params, embedding_name, name, rms_norm_name, rows, ElementOp, LlamaOpsParams,
};
use crate::cuda::{grid_stride, DType};
use crate::error::{Error, Result};
use crate::params::check_positive;

/// `rms_norm_*` on the emulator: `x` `[n, width]` rounded to `x_dtype` (`dtype` or f32), `w`
/// `[width]` and the output in `dtype`.
pub fn rms_norm(
    x_dtype: DType,
    dtype: DType,
    x: &[f32],
    w: &[f32],
    eps: f32,
    emulator: &EmulatorOptions,
) -> Result<Vec<f32>> {
    check_positive("RMSNorm epsilon", eps as f64)?;
    let d = w.len();
    if d == 0 || d > u32::MAX as usize || x.len() % d != 0 {
        return Err(Error::Shape(format!(
            "rms_norm: x has {} values, w {d}: expected [n, width] and [width]",
            x.len()
        )));
    }
    let n = (x.len() / d) as u64;
    if n == 0 {
        return Ok(Vec::new());
    }
    let kernel = rms_norm_name(x_dtype, dtype)?;
    let (mut xb, mut wb) = (to_dtype(x, x_dtype), to_dtype(w, dtype));
    let mut y = to_dtype(&vec![f32::NAN; x.len()], dtype);
    let p = LlamaOpsParams {
        n,
        width: d as u32,
        eps,
    };
    let ptrs = [xb.addr(), wb.addr(), y.addr()];
    let cfg = rows(n);
    // SAFETY: rms_norm_*(x, w, y, params), the kernel for x_dtype and dtype: x holds n * d values
    // of x_dtype, y n * d of dtype, w d of dtype.
    unsafe {
        launch_ptrs(
            kernel,
            cfg.grid_dim,
            cfg.block_dim,
            0,
            &ptrs,
            &p,
            &[],
            emulator,
        )?
    };
    Ok(from_dtype(&y, x.len(), dtype))
}

/// `silu_mul_*` on the emulator: `silu(gate) * up`, element-wise.
pub fn silu_mul(
    dtype: DType,
    gate: &[f32],
    up: &[f32],
    emulator: &EmulatorOptions,
) -> Result<Vec<f32>> {
    if gate.len() != up.len() {
        return Err(Error::Shape(format!(
            "silu_mul: gate has {} values, up {}",
            gate.len(),
            up.len()
        )));
    }
    let n = gate.len() as u64;
    if n == 0 {
        return Ok(Vec::new());
    }
    let (mut g, mut u) = (to_dtype(gate, dtype), to_dtype(up, dtype));
    let mut y = to_dtype(&vec![f32::NAN; gate.len()], dtype);
    let p = LlamaOpsParams {
        n,
        width: 0,
        eps: 0.0,
    };
    let ptrs = [g.addr(), u.addr(), y.addr()];
    let cfg = grid_stride(n);
    // SAFETY: silu_mul_*(g, u, y, params): all three hold n values of dtype.
    unsafe {
        launch_ptrs(
            name(ElementOp::SiluMul, dtype),
            cfg.grid_dim,
            cfg.block_dim,
            0,
            &ptrs,
            &p,
            &[],
            emulator,
        )?
    };
    Ok(from_dtype(&y, gate.len(), dtype))
}

/// `embedding_*` on the emulator: rows `ids` of `table` (`[vocab, width]`, rounded to `dtype`),
/// written in `y_dtype` (`dtype` or f32).
pub fn embedding(
    dtype: DType,
    y_dtype: DType,
    ids: &[u32],
    table: &[f32],
    width: usize,
    emulator: &EmulatorOptions,
) -> Result<Vec<f32>> {
    if width == 0 || width > u32::MAX as usize || table.len() % width != 0 {
        return Err(Error::Shape(format!(
            "embedding: table has {} values, not [vocab, {width}]",
            table.len()
        )));
    }
    let vocab = table.len() / width;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::OutOfRange(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let kernel = embedding_name(dtype, y_dtype)?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let (mut idb, mut tb) = (Aligned::from_slice(ids), to_dtype(table, dtype));
    let mut y = to_dtype(&vec![f32::NAN; ids.len() * width], y_dtype);
    let p = LlamaOpsParams {
        n: ids.len() as u64,
        width: width as u32,
        eps: 0.0,
    };
    let ptrs = [idb.addr(), tb.addr(), y.addr()];
    let cfg = rows(ids.len() as u64);
    // SAFETY: embedding_*(ids, table, y, params), the kernel for dtype and y_dtype: every id <
    // vocab (checked), the table holds vocab * width values of dtype and y ids.len() * width of
    // y_dtype.
    unsafe {
        launch_ptrs(
            kernel,
            cfg.grid_dim,
            cfg.block_dim,
            0,
            &ptrs,
            &p,
            &[],
            emulator,
        )?
    };
    Ok(from_dtype(&y, ids.len() * width, y_dtype))
}

/// `fill_uniform_*` on the emulator: `n` synthetic weights from `seed`, `offset + scale * u` with
/// `u` uniform in `[-1, 1)` (oracle: [`crate::reference::llama_ops::fill_uniform`]).
pub fn fill_uniform(
    dtype: DType,
    n: usize,
    seed: u32,
    scale: f32,
    offset: f32,
    emulator: &EmulatorOptions,
) -> Result<Vec<f32>> {
    check_fill_params(scale, offset)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut y = to_dtype(&vec![f32::NAN; n], dtype);
    let mut y_ptr = y.addr();
    let (mut seed, mut scale, mut offset) = (seed, scale, offset);
    let mut p = LlamaOpsParams {
        n: n as u64,
        width: 0,
        eps: 0.0,
    };
    let mut args = [
        &mut y_ptr as *mut u64 as *mut c_void,
        &mut seed as *mut u32 as *mut c_void,
        &mut scale as *mut f32 as *mut c_void,
        &mut offset as *mut f32 as *mut c_void,
        &mut p as *mut LlamaOpsParams as *mut c_void,
    ];
    let cfg = grid_stride(n as u64);
    // SAFETY: fill_uniform_*(y, seed, scale, offset, params): y holds n values of dtype; the
    // arguments point at locals that outlive the call.
    unsafe {
        launch(
            name(ElementOp::Fill, dtype),
            cfg.grid_dim,
            cfg.block_dim,
            0,
            &mut args,
            &[],
            emulator,
        )?
    };
    Ok(from_dtype(&y, n, dtype))
}
