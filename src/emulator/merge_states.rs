//! Merge of attention states on the kernel emulator: `kernels/merge_states.cu` run on the CPU,
//! launched as [`crate::cuda::merge_states`] launches it (oracle:
//! [`crate::reference::merge_states`]).

use super::{from_dtype, launch_ptrs, to_dtype, EmulatorOptions};
use crate::cuda::merge_states::{merge_launch, MergeOp};
use crate::cuda::DType;
use crate::error::{Error, Result};

/// `merge_states_*` on the emulator: `v` `[n_states, n, head_dim]` (rounded to `dtype`) and `s`
/// `[n_states, n]` (f32) merged into `(v_out [n, head_dim], s_out [n])`, outputs started as NaN.
pub fn merge_states(
    dtype: DType,
    v: &[f32],
    s: &[f32],
    n_states: usize,
    head_dim: usize,
    emulator: &EmulatorOptions,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = crate::reference::merge_states::check_shapes(v.len(), s.len(), n_states, head_dim)?;
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let (name, params, cfg) = merge_launch(MergeOp::Stacked, dtype, head_dim, n_states, n as u64)?;
    let mut v_in = to_dtype(v, dtype);
    let mut s_in = to_dtype(s, DType::F32);
    let mut v_out = to_dtype(&vec![f32::NAN; n * head_dim], dtype);
    let mut s_out = to_dtype(&vec![f32::NAN; n], DType::F32);
    let ptrs = [v_in.addr(), s_in.addr(), v_out.addr(), s_out.addr()];
    // SAFETY: merge_states_*(v, s, v_out, s_out, params): v holds n_states * n * head_dim values
    // of dtype, s n_states * n f32, the outputs n * head_dim and n (check_shapes, above).
    unsafe {
        launch_ptrs(
            name,
            cfg.grid_dim,
            cfg.block_dim,
            0,
            &ptrs,
            &params,
            &[],
            emulator,
        )?
    };
    Ok((
        from_dtype(&v_out, n * head_dim, dtype),
        s_out.as_slice::<f32>(n).to_vec(),
    ))
}

/// `merge_state_in_place_*` on the emulator: `(v, s)` (`[n, head_dim]` rounded to `dtype`, `[n]`)
/// becomes its merge with `(v_other, s_other)`.
pub fn merge_state_in_place(
    dtype: DType,
    v: &mut [f32],
    s: &mut [f32],
    v_other: &[f32],
    s_other: &[f32],
    head_dim: usize,
    emulator: &EmulatorOptions,
) -> Result<()> {
    let n = s.len();
    if head_dim == 0 || v.len() != n * head_dim || v_other.len() != v.len() || s_other.len() != n {
        return Err(Error::Shape(format!(
            "merge_state_in_place: v {} and v_other {} values, s {} and s_other {}, head_dim \
             {head_dim}: expected [n, head_dim] and [n]",
            v.len(),
            v_other.len(),
            n,
            s_other.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (name, params, cfg) = merge_launch(MergeOp::InPlace, dtype, head_dim, 2, n as u64)?;
    let mut v_buf = to_dtype(v, dtype);
    let mut s_buf = to_dtype(s, DType::F32);
    let mut vo = to_dtype(v_other, dtype);
    let mut so = to_dtype(s_other, DType::F32);
    let ptrs = [v_buf.addr(), s_buf.addr(), vo.addr(), so.addr()];
    // SAFETY: merge_state_in_place_*(v, s, v_other, s_other, params): v and v_other hold
    // n * head_dim values of dtype, s and s_other n f32 (checked above).
    unsafe {
        launch_ptrs(
            name,
            cfg.grid_dim,
            cfg.block_dim,
            0,
            &ptrs,
            &params,
            &[],
            emulator,
        )?
    };
    v.copy_from_slice(&from_dtype(&v_buf, n * head_dim, dtype));
    s.copy_from_slice(s_buf.as_slice::<f32>(n));
    Ok(())
}
