//! The device layer on any machine: opening a device never panics, and the kernels are in the
//! build when the test command says they must be.

use ape_attn::cuda::{kernel_build_info, kernels_built, Device};
use ape_attn::Error;

/// The README's test command sets APE_ATTN_REQUIRE_KERNELS=1: there a CPU-only build is a failure,
/// not a silent pass.
#[test]
fn kernels_are_built_when_required() {
    println!("kernels: {}", kernel_build_info());
    if std::env::var("APE_ATTN_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        assert!(
            kernels_built(),
            "kernels required but not built: {}",
            kernel_build_info()
        );
        assert!(
            kernel_build_info().starts_with("nvcc "),
            "{}",
            kernel_build_info()
        );
    }
}

#[test]
fn opening_a_device_reports_why_it_cannot_instead_of_panicking() {
    match Device::new(0) {
        Ok(dev) => println!("device 0: {}", dev.name().unwrap_or_default()),
        Err(Error::KernelsNotBuilt(why)) => {
            assert!(!kernels_built());
            println!("no kernels: {why}");
        }
        Err(Error::NoDevice(why)) => println!("no device: {why}"),
        Err(e) => panic!("unexpected error opening device 0: {e}"),
    }
    // A device that surely does not exist is an error on every machine.
    assert!(Device::new(1 << 20).is_err());
}

/// An engine's own stream and buffers: `Device::with_stream` launches on the caller's stream, and
/// a tensor wrapping a longer caller buffer reads, copies and clones only its own bytes.
#[test]
#[ignore = "needs a CUDA device"]
fn the_callers_stream_and_buffers_work_as_the_crates_own() {
    use ape_attn::cuda::{rms_norm, DType, Tensor};
    let ctx = cudarc::driver::CudaContext::new(0).expect("device 0");
    let stream = ctx.new_stream().expect("stream");
    let dev = Device::with_stream(stream.clone()).expect("kernels on the caller's stream");
    assert!(std::sync::Arc::ptr_eq(dev.stream(), &stream));
    let (rows, d) = (3, 64);
    let x: Vec<f32> = (0..rows * d).map(|i| (i % 7) as f32 - 3.0).collect();
    // A caller buffer one row longer than the tensor, its tail poisoned.
    let mut host = vec![0xffu8; (rows + 1) * d * 4];
    host[..rows * d * 4].copy_from_slice(bytemuck::cast_slice(&x));
    let buf = stream.clone_htod(&host).expect("upload");
    let xt = Tensor::from_device_buffer(&dev, buf, &[rows, d], DType::F32).expect("wrap");
    assert_eq!(xt.to_f32(&dev).expect("download"), x);
    let copy = xt.try_clone(&dev).expect("clone");
    assert_eq!(copy.to_f32(&dev).expect("download"), x);
    let w = Tensor::from_f32(&dev, &[d], &vec![1.0; d], DType::F32).expect("w");
    let y = rms_norm(&dev, &xt, &w, 1e-5)
        .expect("rms_norm")
        .to_f32(&dev)
        .expect("y");
    let want = ape_attn::reference::llama_ops::rms_norm(&x, &vec![1.0; d], 1e-5).expect("oracle");
    assert!(ape_attn::reference::rel_l2(&y, &want) < 1e-5);
    let back = xt.into_device_buffer();
    assert_eq!(back.len(), (rows + 1) * d * 4);
    // A refused buffer comes back, not freed.
    let too_small = stream.alloc_zeros::<u8>(8).expect("alloc");
    let rejected =
        Tensor::from_device_buffer(&dev, too_small, &[rows, d], DType::F32).expect_err("too small");
    assert_eq!(rejected.buffer.len(), 8);
}
