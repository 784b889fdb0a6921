//! RoPE apply and shift on the GPU (kernels/rope.cu; oracle: [`crate::reference::rope`]).
//!
//! `x` is `[n_tokens, n_heads, head_dim]` (f32, f16 or bf16), rotated in place: pair `i` of each
//! head at token `t` by `angle(t) * theta_i`, `angle(t) = pos_offset + t` for [`rope_apply`] and
//! `delta` for [`rope_shift`] (`R(a) R(b) = R(a+b)`: a block cached at position 0 shifted by its
//! offset `o` equals the block computed at `o`). Angles are formed in f64.

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{DeviceRepr, PushKernelArg};

use super::{DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::params::{RopeConfig, RopeLayout};

/// Mirrors `ape::RopeParams` in kernels/rope.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct RopeParams {
    pos_offset: i64,
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    layout: u32,
    per_token: u32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<RopeParams>() == 32);
// SAFETY: a #[repr(C)] plain-data struct with the kernel's layout.
unsafe impl DeviceRepr for RopeParams {}

/// Rotates every token of `x` (`[n_tokens, n_heads, head_dim]`) to position `pos_offset + t`.
pub fn rope_apply(
    device: &Device,
    x: &mut Tensor,
    cfg: &RopeConfig,
    pos_offset: i64,
) -> Result<()> {
    launch(device, x, cfg, pos_offset, true)
}

/// Rotates every token of `x` by `delta` positions (Block-Attention re-encoding).
pub fn rope_shift(device: &Device, x: &mut Tensor, cfg: &RopeConfig, delta: i64) -> Result<()> {
    launch(device, x, cfg, delta, false)
}

fn launch(
    device: &Device,
    x: &mut Tensor,
    cfg: &RopeConfig,
    pos: i64,
    per_token: bool,
) -> Result<()> {
    x.check_device(device, "x")?;
    let Some((params, pairs)) = rope_params(x.shape(), cfg, pos, per_token)? else {
        return Ok(());
    };
    let inv_freq = device.rope_freqs(&cfg.inv_freqs())?;
    let f = device.function(kernel_name(x.dtype()))?;
    let cfg = super::grid_stride(pairs);
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(x.buf_mut()).arg(inv_freq.as_ref()).arg(&params);
    // SAFETY: arguments match rope_* (x, inv_freq, params); x holds n_tokens * n_heads * head_dim
    // elements of its dtype (checked above), inv_freq holds head_dim / 2 f64.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

pub(crate) fn kernel_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "rope_f32",
        DType::F16 => "rope_f16",
        DType::BF16 => "rope_bf16",
    }
}

/// Checks a RoPE launch on `x` of shape `shape` and returns its parameters and the number of
/// (token, pair) items, or `None` when there is nothing to rotate. Pure: shared with the kernel
/// emulator.
pub(crate) fn rope_params(
    shape: &[usize],
    cfg: &RopeConfig,
    pos: i64,
    per_token: bool,
) -> Result<Option<(RopeParams, u64)>> {
    cfg.validate()?;
    if shape.len() != 3 || shape[2] != cfg.head_dim {
        return Err(Error::Shape(format!(
            "RoPE input has shape {shape:?}, expected [n_tokens, n_heads, {}]",
            cfg.head_dim
        )));
    }
    let (n_tokens, n_heads) = (shape[0], shape[1]);
    if per_token && pos.checked_add(n_tokens as i64).is_none() {
        return Err(Error::OutOfRange(format!(
            "position {pos} + {n_tokens} tokens overflows"
        )));
    }
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::OutOfRange(format!("{what} = {v} exceeds u32")))
    };
    let params = RopeParams {
        pos_offset: pos,
        n_tokens: to_u32(n_tokens, "n_tokens")?,
        n_heads: to_u32(n_heads, "n_heads")?,
        head_dim: to_u32(cfg.head_dim, "head_dim")?,
        layout: match cfg.layout {
            RopeLayout::Neox => 0,
            RopeLayout::Interleaved => 1,
        },
        per_token: per_token as u32,
        _pad: 0,
    };
    let pairs = (n_tokens * cfg.head_dim / 2) as u64;
    if pairs == 0 || n_heads == 0 {
        return Ok(None);
    }
    Ok(Some((params, pairs)))
}
