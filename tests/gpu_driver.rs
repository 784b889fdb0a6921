//! The CUDA driver's rules for the crate's kernels, checked through the raw driver calls cudarc
//! makes: launch limits (threads per block, grid y and z, the 48 KB default and the opt-in limit
//! of dynamic shared memory, `__launch_bounds__`), the function attributes `ptxas` gave the
//! kernels, and kernel arguments arriving intact. On a real GPU this checks the driver and the
//! fatbin; on the emulated device (scripts/test-emulated-gpu.sh) it checks that the stand-in
//! refuses what the driver refuses, so a launch that only an H100 would reject fails here first.
//! tests/gpu_driver_faults.rs holds the checks that only the emulated device makes.

use std::sync::Arc;

use cudarc::driver::sys::{CUfunction_attribute as Attr, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
};

#[path = "common/driver.rs"]
mod driver;
use driver::{kernels, LlamaOpsParams};

/// The attention kernels' launch block (`ape::SegmentedAttentionLaunch`, 96 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct LaunchBlock([u32; 24]);
// SAFETY: #[repr(C)] plain data of the kernel parameter's size.
unsafe impl DeviceRepr for LaunchBlock {}

/// An H100's limits (an H200's are the same).
const DEFAULT_SMEM: u32 = 48 * 1024;
const OPTIN_SMEM: i32 = 227 * 1024;

/// `fill_uniform_f32(y, seed, scale, offset, params)` over `n` elements of `y` with `cfg`.
fn fill(
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    y: &mut cudarc::driver::CudaSlice<f32>,
    n: u64,
    cfg: LaunchConfig,
) -> Result<(), DriverError> {
    let p = LlamaOpsParams {
        n,
        width: 0,
        eps: 0.0,
    };
    let (seed, scale, offset) = (7u32, 0.5f32, 0.25f32);
    let mut l = stream.launch_builder(f);
    l.arg(y).arg(&seed).arg(&scale).arg(&offset).arg(&p);
    // SAFETY: the arguments are fill_uniform_f32's; it writes y[i] for i < n, and every caller
    // passes n <= y.len().
    unsafe { l.launch(cfg) }.map(|_| ())
}

/// What fill_uniform_f32 writes at `i` (its hash, written out again here from its definition in
/// kernels/llama_ops.cu), for seed 7, scale 0.5, offset 0.25.
fn fill_value(i: u64) -> f32 {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(7);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let u = (x >> 40) as f32 * (2.0 / 16_777_216.0) - 1.0;
    0.25 + 0.5 * u
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: smem,
    }
}

fn assert_code(r: Result<(), DriverError>, want: CUresult, what: &str) {
    match r {
        Err(DriverError(code)) => assert_eq!(code, want, "{what}"),
        Ok(()) => panic!("{what}: the launch was accepted; the driver refuses it"),
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn launches_follow_the_drivers_limits() {
    let ctx = CudaContext::new(0).expect("device 0");
    let stream = ctx.new_stream().expect("stream");
    let module = kernels(&ctx);
    let f = module.load_function("fill_uniform_f32").expect("kernel");
    let n = 5000u64;
    let mut y = stream.alloc_zeros::<f32>(n as usize).expect("alloc");

    // An accepted launch writes what the kernel computes from its arguments: they arrived whole.
    fill(&stream, &f, &mut y, n, cfg((3, 1, 1), (256, 1, 1), 0)).expect("launch");
    let got = stream.clone_dtoh(&y).expect("download");
    for (i, &v) in got.iter().enumerate() {
        assert_eq!(v, fill_value(i as u64), "y[{i}]");
    }

    let invalid = CUresult::CUDA_ERROR_INVALID_VALUE;
    let grid = (2, 1, 1);
    assert_code(
        fill(&stream, &f, &mut y, n, cfg(grid, (1025, 1, 1), 0)),
        invalid,
        "1025 threads per block",
    );
    assert_code(
        fill(&stream, &f, &mut y, n, cfg(grid, (32, 32, 2), 0)),
        invalid,
        "2048 threads per block (32 x 32 x 2)",
    );
    assert_code(
        fill(&stream, &f, &mut y, n, cfg((1, 65536, 1), (32, 1, 1), 0)),
        invalid,
        "grid y 65536",
    );
    assert_code(
        fill(&stream, &f, &mut y, n, cfg((1, 1, 65536), (32, 1, 1), 0)),
        invalid,
        "grid z 65536",
    );
    fill(&stream, &f, &mut y, n, cfg((1, 65535, 1), (32, 1, 1), 0)).expect("grid y 65535");

    // Dynamic shared memory: 48 KB by default; more only once the attribute allows it, and the
    // attribute at most 227 KB less the static shared memory (none in this kernel).
    let dyn_smem = Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    assert_eq!(
        f.get_attribute(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .unwrap(),
        0
    );
    fill(&stream, &f, &mut y, n, cfg(grid, (128, 1, 1), DEFAULT_SMEM)).expect("48 KB");
    assert_code(
        fill(
            &stream,
            &f,
            &mut y,
            n,
            cfg(grid, (128, 1, 1), DEFAULT_SMEM + 1),
        ),
        invalid,
        "48 KB + 1 of dynamic shared memory without the attribute",
    );
    f.set_attribute(dyn_smem, 64 * 1024)
        .expect("attribute 64 KB");
    assert_eq!(f.get_attribute(dyn_smem).unwrap(), 64 * 1024);
    fill(&stream, &f, &mut y, n, cfg(grid, (128, 1, 1), 64 * 1024)).expect("64 KB, raised");
    assert_code(
        fill(
            &stream,
            &f,
            &mut y,
            n,
            cfg(grid, (128, 1, 1), 64 * 1024 + 1),
        ),
        invalid,
        "64 KB + 1 with the attribute at 64 KB",
    );
    assert!(
        f.set_attribute(dyn_smem, OPTIN_SMEM + 1).is_err(),
        "the attribute above 227 KB"
    );
    f.set_attribute(dyn_smem, OPTIN_SMEM)
        .expect("attribute 227 KB");
    fill(
        &stream,
        &f,
        &mut y,
        n,
        cfg(grid, (128, 1, 1), OPTIN_SMEM as u32),
    )
    .expect("227 KB");
    stream.synchronize().expect("the accepted launches ran");
}

/// The attention kernels as ptxas built them: 128 threads per block at most
/// (`__launch_bounds__`), registers and static shared memory within what one block may have,
/// and a launch past the bounds refused.
#[test]
#[ignore = "needs a CUDA device"]
fn attention_kernels_carry_their_launch_bounds() {
    let ctx = CudaContext::new(0).expect("device 0");
    let stream = ctx.new_stream().expect("stream");
    let module = kernels(&ctx);
    for name in [
        "segmented_attention_bf16_d128",
        "segmented_attention_f16_d128",
        "segmented_attention_bf16_d64",
        "segmented_attention_f16_d64",
    ] {
        let f = module.load_function(name).expect("kernel");
        let max = f
            .get_attribute(Attr::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
            .unwrap();
        let regs = f.get_attribute(Attr::CU_FUNC_ATTRIBUTE_NUM_REGS).unwrap();
        let smem = f
            .get_attribute(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .unwrap();
        println!("{name}: {regs} registers, {smem} bytes static shared memory, {max} threads");
        assert_eq!(max, 128, "{name}");
        assert!((1..=255).contains(&regs), "{name}: {regs} registers");
        assert!(smem < DEFAULT_SMEM as i32, "{name}");
        // 256 threads: past the bounds. Arguments of the kernel's shape (nine pointers, all null,
        // and its 96-byte launch block zeroed): the launch must be refused before it runs.
        let null = 0u64;
        let launch = LaunchBlock([0; 24]);
        let mut l = stream.launch_builder(&f);
        for _ in 0..9 {
            l.arg(&null);
        }
        l.arg(&launch);
        // SAFETY: a driver refuses this launch (past the kernel's launch bounds) before it runs;
        // one that accepted it would fault on the null pointers, and the test fails either way.
        let r = unsafe { l.launch(cfg((1, 1, 1), (256, 1, 1), 0)) }.map(|_| ());
        assert!(
            matches!(
                r,
                Err(DriverError(
                    CUresult::CUDA_ERROR_INVALID_VALUE
                        | CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
                ))
            ),
            "{name}: 256 threads per block: {r:?}"
        );
    }
}
