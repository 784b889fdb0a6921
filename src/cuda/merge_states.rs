//! Merge of attention states on the GPU (kernels/merge_states.cu; oracle:
//! [`crate::reference::merge_states`](mod@crate::reference::merge_states)).
//!
//! `merge_states`: `v [n_states, ..., d]`, `s [n_states, ...]` (f32) into `v_out [..., d]`,
//! `s_out [...]`: `L = m + ln sum_k exp(L_k - m)`, `O = sum_k exp(L_k - L) O_k`, with `-inf`
//! states ignored (an all-`-inf` row gives `L = -inf`, `O = 0`, never NaN).
//! `merge_state_in_place`: `(v, s) <- merge((v, s), (v_other, s_other))`.

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::{DType, Device, Tensor};
use crate::error::{Error, Result};

/// Mirrors `ape::MergeStatesParams` in kernels/merge_states.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct MergeStatesParams {
    n: u64,
    n_states: u32,
    head_dim: u32,
    group: u32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<MergeStatesParams>() == 24);
// SAFETY: a plain #[repr(C)] struct of integers with the same layout as the kernel's struct.
unsafe impl DeviceRepr for MergeStatesParams {}

const BLOCK: u32 = 256;
const MAX_BLOCKS: u64 = 1 << 16;

/// Kernel name suffix, elements per access, and lanes per row for this dtype and head dim.
fn plan(dtype: DType, head_dim: usize) -> (&'static str, &'static str, u32) {
    let vec = 16 / dtype.size();
    let (access, width) = if head_dim % vec == 0 {
        ("vec", vec)
    } else {
        ("scalar", 1)
    };
    let chunks = head_dim / width;
    let group = chunks.next_power_of_two().min(32) as u32;
    (dtype.name(), access, group)
}

fn to_u32(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::OutOfRange(format!("{what} = {x} exceeds u32")))
}

fn launch_config(n: u64, group: u32) -> LaunchConfig {
    let rows_per_block = (BLOCK / 32 * (32 / group)) as u64;
    let blocks = n.div_ceil(rows_per_block).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Kernel function names are static strings; this maps (op, dtype, access) onto them.
fn kernel_name(op: &str, dtype: &str, access: &str) -> &'static str {
    match (op, dtype, access) {
        ("merge", "f32", "vec") => "merge_states_f32_vec",
        ("merge", "f16", "vec") => "merge_states_f16_vec",
        ("merge", "bf16", "vec") => "merge_states_bf16_vec",
        ("merge", "f32", _) => "merge_states_f32_scalar",
        ("merge", "f16", _) => "merge_states_f16_scalar",
        ("merge", "bf16", _) => "merge_states_bf16_scalar",
        (_, "f32", "vec") => "merge_state_in_place_f32_vec",
        (_, "f16", "vec") => "merge_state_in_place_f16_vec",
        (_, "bf16", "vec") => "merge_state_in_place_bf16_vec",
        (_, "f32", _) => "merge_state_in_place_f32_scalar",
        (_, "f16", _) => "merge_state_in_place_f16_scalar",
        _ => "merge_state_in_place_bf16_scalar",
    }
}

/// Merges `n_states` stacked states: `v [n_states, ..., head_dim]` (f32, f16 or bf16) and
/// `s [n_states, ...]` (f32) into new tensors `(v_out [..., head_dim], s_out [...])`.
pub fn merge_states(device: &Device, v: &Tensor, s: &Tensor) -> Result<(Tensor, Tensor)> {
    let shape = v.shape();
    if shape.len() < 2 {
        return Err(Error::Shape(format!(
            "v must be [n_states, ..., head_dim], got shape {shape:?}"
        )));
    }
    let mut v_out = Tensor::zeros(device, &shape[1..], v.dtype())?;
    let mut s_out = Tensor::zeros(device, &shape[1..shape.len() - 1], DType::F32)?;
    merge_states_into(device, v, s, &mut v_out, &mut s_out)?;
    Ok((v_out, s_out))
}

/// [`merge_states`] into caller-provided outputs (so an engine can reuse memory).
pub fn merge_states_into(
    device: &Device,
    v: &Tensor,
    s: &Tensor,
    v_out: &mut Tensor,
    s_out: &mut Tensor,
) -> Result<()> {
    let shape = v.shape();
    if shape.len() < 2 || shape[0] == 0 || shape[shape.len() - 1] == 0 {
        return Err(Error::Shape(format!(
            "v must be [n_states > 0, ..., head_dim > 0], got shape {shape:?}"
        )));
    }
    let head_dim = shape[shape.len() - 1];
    let n_states = shape[0];
    s.check_shape(&shape[..shape.len() - 1], "s")?;
    s.check_dtype(DType::F32, "s")?;
    v_out.check_shape(&shape[1..], "v_out")?;
    v_out.check_dtype(v.dtype(), "v_out")?;
    s_out.check_shape(&shape[1..shape.len() - 1], "s_out")?;
    s_out.check_dtype(DType::F32, "s_out")?;
    for (t, what) in [(v, "v"), (s, "s"), (&*v_out, "v_out"), (&*s_out, "s_out")] {
        t.check_device(device, what)?;
    }
    let n = (s.len() / n_states) as u64;
    if n == 0 {
        return Ok(());
    }
    let (name, params, cfg) = merge_launch(MergeOp::Stacked, v.dtype(), head_dim, n_states, n)?;
    let f = device.function(name)?;
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(v.device_buffer())
        .arg(s.device_buffer())
        .arg(v_out.buf_mut())
        .arg(s_out.buf_mut())
        .arg(&params);
    // SAFETY: the argument list matches merge_states_* (v, s, v_out, s_out, params); every buffer
    // was checked above to hold exactly the elements the kernel indexes (n_states * n * head_dim,
    // n_states * n, n * head_dim, n) in the dtype the kernel reads, on this device.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// `(v, s) <- merge((v, s), (v_other, s_other))`: `v`, `v_other` are `[..., head_dim]`, `s`,
/// `s_other` are `[...]` (f32).
pub fn merge_state_in_place(
    device: &Device,
    v: &mut Tensor,
    s: &mut Tensor,
    v_other: &Tensor,
    s_other: &Tensor,
) -> Result<()> {
    let shape = v.shape().to_vec();
    if shape.is_empty() || shape[shape.len() - 1] == 0 {
        return Err(Error::Shape(format!(
            "v must be [..., head_dim > 0], got shape {shape:?}"
        )));
    }
    let head_dim = shape[shape.len() - 1];
    v_other.check_shape(&shape, "v_other")?;
    v_other.check_dtype(v.dtype(), "v_other")?;
    s.check_shape(&shape[..shape.len() - 1], "s")?;
    s_other.check_shape(&shape[..shape.len() - 1], "s_other")?;
    s.check_dtype(DType::F32, "s")?;
    s_other.check_dtype(DType::F32, "s_other")?;
    for (t, what) in [
        (&*v, "v"),
        (&*s, "s"),
        (v_other, "v_other"),
        (s_other, "s_other"),
    ] {
        t.check_device(device, what)?;
    }
    let n = s.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let (name, params, cfg) = merge_launch(MergeOp::InPlace, v.dtype(), head_dim, 2, n)?;
    let f = device.function(name)?;
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(v.buf_mut())
        .arg(s.buf_mut())
        .arg(v_other.device_buffer())
        .arg(s_other.device_buffer())
        .arg(&params);
    // SAFETY: the argument list matches merge_state_in_place_* (v, s, v_other, s_other, params);
    // v and v_other hold n * head_dim elements of the same dtype, s and s_other n f32, all checked
    // above; each lane reads a chunk of v before writing that same chunk, and the LSE is written
    // after the whole row group has read it.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// Which merge kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MergeOp {
    /// `merge_states_*`: `[n_states, n, head_dim]` into `[n, head_dim]`.
    Stacked,
    /// `merge_state_in_place_*`: a second state into the first.
    InPlace,
}

/// The kernel, parameters and launch shape of a merge of `n_states` states of `n` rows. Pure:
/// shared with the kernel emulator.
pub(crate) fn merge_launch(
    op: MergeOp,
    dtype: DType,
    head_dim: usize,
    n_states: usize,
    n: u64,
) -> Result<(&'static str, MergeStatesParams, LaunchConfig)> {
    let (dtype, access, group) = plan(dtype, head_dim);
    let params = MergeStatesParams {
        n,
        n_states: to_u32(n_states, "n_states")?,
        head_dim: to_u32(head_dim, "head_dim")?,
        group,
        _pad: 0,
    };
    let op = match op {
        MergeOp::Stacked => "merge",
        MergeOp::InPlace => "in_place",
    };
    Ok((
        kernel_name(op, dtype, access),
        params,
        launch_config(n, group),
    ))
}
