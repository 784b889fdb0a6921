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
