//! Test helpers: seeded randomness whose seed is printed when a test fails.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded RNG. The seed comes from `APE_SEED` when set, else from the clock; when the test
/// panics, the seed is printed so the failure can be replayed.
pub struct Seeded {
    pub rng: StdRng,
    seed: u64,
    name: &'static str,
}

impl Drop for Seeded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}: failed with seed {} (replay with APE_SEED={})",
                self.name, self.seed, self.seed
            );
        }
    }
}

pub fn seeded(name: &'static str) -> Seeded {
    let seed = std::env::var("APE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
    Seeded {
        rng: StdRng::seed_from_u64(seed),
        seed,
        name,
    }
}

impl Seeded {
    /// `n` values uniform in `[-scale, scale]`.
    pub fn uniform(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.gen_range(-scale..=scale)).collect()
    }

    pub fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        self.rng.gen_range(lo..=hi_inclusive)
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.rng.gen_range(0..xs.len())]
    }

    pub fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        self.rng.gen_range(lo..hi)
    }

    pub fn coin(&mut self) -> bool {
        self.rng.gen_bool(0.5)
    }
}

/// Largest absolute difference, treating equal infinities as equal.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, f32::max)
}

/// A deterministic fill that scripts/gpu/peer.py reproduces bit for bit (so our kernel and
/// PyTorch SDPA can be compared on identical inputs): element i of a row-major tensor is
/// `scale * (((i * 2654435761 + seed * 40503) mod 2^32 >> 8) / 2^24 - 0.5)`.
pub fn hash_fill(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            scale * ((x >> 8) as f32 / 16_777_216.0 - 0.5)
        })
        .collect()
}

/// Llama 3.1's RoPE frequency scaling.
pub const LLAMA31: ape_attn::Llama3RopeScaling = ape_attn::Llama3RopeScaling {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position: 8192.0,
};

/// A RoPE configuration for heads of width `head_dim`: a random base and layout, with Llama 3.1
/// scaling half the time.
pub fn random_rope(r: &mut Seeded, head_dim: usize) -> ape_attn::RopeConfig {
    use ape_attn::{RopeConfig, RopeLayout};
    let base = r.pick(&[100.0, 10_000.0, 100_000.0, 500_000.0]);
    let layout = r.pick(&[RopeLayout::Neox, RopeLayout::Interleaved]);
    let cfg = RopeConfig::new(head_dim, base, layout).expect("valid");
    if r.coin() {
        cfg.with_llama3_scaling(LLAMA31).expect("valid")
    } else {
        cfg
    }
}

/// The kernels on the kernel emulator, each launch under the next of its four schedules (the
/// backends of `attention.rs` and `ops.rs` are implemented for it).
#[cfg(feature = "emulator")]
#[derive(Default)]
pub struct Emulated {
    launches: std::cell::Cell<usize>,
}

#[cfg(feature = "emulator")]
impl Emulated {
    /// The options of the next launch.
    pub fn next(&self) -> ape_attn::emulator::EmulatorOptions {
        let i = self.launches.get();
        self.launches.set(i + 1);
        ape_attn::emulator::EmulatorOptions::default().schedules()[i % 4]
    }
}

/// The kernels on the GPU, through the crate's launchers.
pub struct Gpu(pub ape_attn::cuda::Device);

impl Gpu {
    /// Device 0; panics without one (the GPU tests are ignored where there is none).
    pub fn new() -> Self {
        Self(ape_attn::cuda::Device::new(0).expect("a CUDA device with the kernels built"))
    }

    /// `x` as a device tensor of `shape` and `dtype`.
    pub fn upload(
        &self,
        x: &[f32],
        shape: &[usize],
        dtype: ape_attn::cuda::DType,
    ) -> ape_attn::cuda::Tensor {
        ape_attn::cuda::Tensor::from_f32(&self.0, shape, x, dtype).unwrap()
    }

    /// A device tensor of NaN: an output, poisoned before the launch.
    pub fn nan(&self, shape: &[usize], dtype: ape_attn::cuda::DType) -> ape_attn::cuda::Tensor {
        self.upload(&vec![f32::NAN; shape.iter().product()], shape, dtype)
    }

    /// A device tensor's values, as f32.
    pub fn download(&self, t: &ape_attn::cuda::Tensor) -> Vec<f32> {
        t.to_f32(&self.0).unwrap()
    }
}
