//! RoPE apply and shift on the kernel emulator: `kernels/rope.cu` run on the CPU, launched as
//! [`crate::cuda::rope_apply`] and [`crate::cuda::rope_shift`] launch it (oracle:
//! [`crate::reference::rope`]).

use super::{from_dtype, launch_ptrs, to_dtype, EmulatorOptions};
use crate::cuda::rope::{kernel_name, rope_params};
use crate::cuda::{grid_stride, DType};
use crate::error::Result;
use crate::params::RopeConfig;

fn run(
    dtype: DType,
    x: &mut [f32],
    shape: [usize; 3],
    cfg: &RopeConfig,
    pos: i64,
    per_token: bool,
    emulator: &EmulatorOptions,
) -> Result<()> {
    if x.len() != shape.iter().product::<usize>() {
        return Err(crate::Error::Shape(format!(
            "RoPE input has {} values, expected {shape:?}",
            x.len()
        )));
    }
    let Some((params, pairs)) = rope_params(&shape, cfg, pos, per_token)? else {
        return Ok(());
    };
    let mut buf = to_dtype(x, dtype);
    let mut inv_freq = super::Aligned::from_slice(&cfg.inv_freqs());
    let ptrs = [buf.addr(), inv_freq.addr()];
    let launch_cfg = grid_stride(pairs);
    // SAFETY: rope_*(x, inv_freq, params): x holds n_tokens * n_heads * head_dim values of dtype
    // (checked above and by rope_params), inv_freq head_dim / 2 f64.
    unsafe {
        launch_ptrs(
            kernel_name(dtype),
            launch_cfg.grid_dim,
            launch_cfg.block_dim,
            0,
            &ptrs,
            &params,
            &[&inv_freq],
            emulator,
        )?
    };
    x.copy_from_slice(&from_dtype(&buf, x.len(), dtype));
    Ok(())
}

/// `rope_*` on the emulator, apply: `x` (`[n_tokens, n_heads, head_dim]`, rounded to `dtype`)
/// rotated in place, token `t` to position `pos_offset + t`; the result is `dtype`'s, as f32.
pub fn rope_apply(
    dtype: DType,
    x: &mut [f32],
    shape: [usize; 3],
    cfg: &RopeConfig,
    pos_offset: i64,
    emulator: &EmulatorOptions,
) -> Result<()> {
    run(dtype, x, shape, cfg, pos_offset, true, emulator)
}

/// `rope_*` on the emulator, shift: every token of `x` rotated by `delta` positions.
pub fn rope_shift(
    dtype: DType,
    x: &mut [f32],
    shape: [usize; 3],
    cfg: &RopeConfig,
    delta: i64,
    emulator: &EmulatorOptions,
) -> Result<()> {
    run(dtype, x, shape, cfg, delta, false, emulator)
}
