//! Memory faults the emulated device (scripts/test-emulated-gpu.sh) must catch, each one a bug a
//! real GPU may hide or report only as a corrupt context later: copies and memsets past a live
//! allocation, the use of a freed buffer, and a kernel writing one element past its buffer. One
//! test, in this order, because the last fault leaves the context unusable, as a real driver's
//! sticky error does. On a real device it only says it did not run: there the outcome of an
//! out-of-bounds access is undefined, not a check.

use cudarc::driver::result;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, DriverError, LaunchConfig, PushKernelArg};

#[path = "common/driver.rs"]
mod driver;
use driver::{kernels, LlamaOpsParams};

fn code(r: Result<(), DriverError>) -> Option<CUresult> {
    r.err().map(|DriverError(c)| c)
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_emulated_device_catches_accesses_outside_live_allocations() {
    let ctx = CudaContext::new(0).expect("device 0");
    let name = ctx.name().expect("name");
    if !name.contains("(emulated)") {
        println!("{name}: not the emulated device; out-of-bounds accesses are not checked here");
        return;
    }
    ctx.bind_to_thread().expect("context");
    let invalid = Some(CUresult::CUDA_ERROR_INVALID_VALUE);
    let n = 1000usize;
    let host = vec![1.5f32; n + 1];
    let mut back = vec![0f32; n + 1];
    // SAFETY: raw driver calls on buffers this test allocates; the ones past the end or after
    // the free are what the emulated device must refuse (it checks before touching memory).
    unsafe {
        let buf = result::malloc_sync(n * 4).expect("alloc");
        assert_eq!(code(result::memcpy_htod_sync(buf, &host[..n])), None);
        assert_eq!(
            code(result::memcpy_htod_sync(buf, &host)),
            invalid,
            "an upload one element past the buffer"
        );
        assert_eq!(
            code(result::memcpy_dtoh_sync(&mut back, buf)),
            invalid,
            "a download one element past the buffer"
        );
        assert_eq!(
            code(result::memcpy_htod_sync(buf + 4, &host[..n])),
            invalid,
            "an upload starting one element in, of the buffer's length"
        );
        assert_eq!(
            code(result::memset_d8_sync(buf, 0, n * 4 + 1)),
            invalid,
            "a memset one byte past the buffer"
        );
        let other = result::malloc_sync(n * 4).expect("alloc");
        assert_eq!(
            code(result::memcpy_dtod_sync(other, buf, n * 4 + 4)),
            invalid,
            "a device copy one element past both buffers"
        );
        result::free_sync(other).expect("free");
        assert_eq!(
            code(result::memcpy_htod_sync(other, &host[..n])),
            invalid,
            "an upload into a freed buffer"
        );
        assert_eq!(
            code(result::memcpy_dtoh_sync(&mut back[..n], buf)),
            None,
            "the refused calls left the context working"
        );
        assert_eq!(back[..n], host[..n]);

        // A kernel told its buffer has one element more than it has: the write past the end is
        // an illegal address, and the context's error is sticky from then on.
        let stream = ctx.new_stream().expect("stream");
        let module = kernels(&ctx);
        let f = module.load_function("fill_uniform_f32").expect("kernel");
        let p = LlamaOpsParams {
            n: n as u64 + 1,
            width: 0,
            eps: 0.0,
        };
        let (seed, scale, offset) = (1u32, 1f32, 0f32);
        let mut l = stream.launch_builder(&f);
        l.arg(&buf).arg(&seed).arg(&scale).arg(&offset).arg(&p);
        l.launch(LaunchConfig::for_num_elems(n as u32 + 1))
            .expect("the launch itself is valid");
        let illegal = Some(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS);
        assert_eq!(
            code(stream.synchronize()),
            illegal,
            "the write past the end"
        );
        assert_eq!(
            code(result::memcpy_dtoh_sync(&mut back[..n], buf)),
            illegal,
            "the error is sticky"
        );
    }
}
