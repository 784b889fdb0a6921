//! How many thread blocks of the attention kernel one device runs at once: the wave that
//! [`plan`] fills with query tiles and key splits.
//!
//! On a GPU the number comes from the driver, for the compiled kernel as loaded (its registers
//! and static shared memory on that architecture) and the dynamic shared memory a launch asks
//! for ([`crate::cuda::Device`] asks once per kernel). Without one (the kernel emulator, the
//! host-side benchmarks, tests of the plan), [`Occupancy::modelled`] computes it from an
//! architecture's published limits, as the driver does.

use super::*;

/// Threads per thread block of the attention kernel (`ape::kThreads`: 4 warps).
pub const ATTENTION_THREADS: usize = 128;

/// The most registers a thread of the attention kernel may use: its `__launch_bounds__(128, 2)`
/// makes the compiler keep two thread blocks' registers within an SM's 64K.
pub const ATTENTION_MAX_REGISTERS: usize = 255;

/// The attention kernel's static shared memory, bytes (`ptxas -v`: the same on every
/// architecture and variant; docs/KERNEL-STATS.md).
pub const ATTENTION_STATIC_SMEM: usize = 384;

/// The limits of one SM that decide how many thread blocks fit in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmLimits {
    /// Shared memory of one SM available to thread blocks, bytes.
    pub smem_per_sm: usize,
    /// Shared memory the runtime reserves per resident thread block, bytes.
    pub smem_reserved_per_block: usize,
    /// 32-bit registers of one SM.
    pub registers_per_sm: usize,
    /// Resident warps per SM.
    pub max_warps: usize,
    /// Resident thread blocks per SM.
    pub max_blocks: usize,
}

impl SmLimits {
    /// Compute capability 8.0 (A100): 164 KiB of shared memory per SM.
    pub const SM80: Self = Self {
        smem_per_sm: 164 * 1024,
        smem_reserved_per_block: 1024,
        registers_per_sm: 65536,
        max_warps: 64,
        max_blocks: 32,
    };
    /// Compute capability 8.6 and 8.9 (consumer Ampere, Ada): 100 KiB, 48 warps, 16 blocks (8.9
    /// holds 24, which never binds here).
    pub const SM86: Self = Self {
        smem_per_sm: 100 * 1024,
        smem_reserved_per_block: 1024,
        registers_per_sm: 65536,
        max_warps: 48,
        max_blocks: 16,
    };
    /// Compute capability 9.0 (H100, H200): 228 KiB of shared memory per SM.
    pub const SM90: Self = Self {
        smem_per_sm: 228 * 1024,
        smem_reserved_per_block: 1024,
        registers_per_sm: 65536,
        max_warps: 64,
        max_blocks: 32,
    };

    /// The limits of compute capability `(major, minor)`, where this crate knows them.
    pub fn of_compute_capability(major: i32, minor: i32) -> Option<Self> {
        match (major, minor) {
            (8, 0) => Some(Self::SM80),
            (8, 6..=9) => Some(Self::SM86),
            (9, 0) => Some(Self::SM90),
            _ => None,
        }
    }

    /// Thread blocks of `threads` threads with `registers` each and `smem` bytes of shared memory
    /// (static plus dynamic) resident on one SM. Registers are allocated per warp in units of
    /// 256; 0 when one block does not fit.
    pub fn blocks_per_sm(&self, threads: usize, registers: usize, smem: usize) -> usize {
        let warps = threads.div_ceil(32).max(1);
        let per_warp = (registers.max(1) * 32).next_multiple_of(256);
        let by_registers = self.registers_per_sm / (per_warp * warps);
        let by_smem = self.smem_per_sm / (smem + self.smem_reserved_per_block);
        let by_warps = self.max_warps / warps;
        by_registers.min(by_smem).min(by_warps).min(self.max_blocks)
    }
}

/// The attention kernel's residency on one device: its SMs, and thread blocks per SM without and
/// with RoPE shifts (a launch with shifts takes one more 64-row tile of shared memory: 96 KiB
/// instead of 80 at head dim 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// Streaming multiprocessors.
    pub sm_count: usize,
    /// Thread blocks resident per SM for a launch without RoPE shifts.
    pub blocks_per_sm: usize,
    /// Thread blocks resident per SM for a launch with RoPE shifts.
    pub blocks_per_sm_with_shifts: usize,
}

impl Occupancy {
    /// Thread blocks resident at once, with or without RoPE shifts in the launch (at least one:
    /// a launch that fits no block fails at the launch, not in the plan).
    pub fn wave(&self, shifts: bool) -> usize {
        let per_sm = if shifts {
            self.blocks_per_sm_with_shifts
        } else {
            self.blocks_per_sm
        };
        self.sm_count.max(1) * per_sm.max(1)
    }

    /// The residency of the attention kernel at `head_dim` on `sm_count` SMs with `limits`,
    /// computed from its threads, its register bound ([`ATTENTION_MAX_REGISTERS`]; the compiled
    /// kernel may use fewer, so on a GPU the driver's count can be higher at head dim 64) and
    /// its shared memory.
    pub fn modelled(limits: &SmLimits, sm_count: usize, head_dim: usize) -> Self {
        let (plain, shifts) = smem_bytes(head_dim);
        let per_sm = |dynamic: usize| {
            limits.blocks_per_sm(
                ATTENTION_THREADS,
                ATTENTION_MAX_REGISTERS,
                ATTENTION_STATIC_SMEM + dynamic,
            )
        };
        Self {
            sm_count,
            blocks_per_sm: per_sm(plain),
            blocks_per_sm_with_shifts: per_sm(shifts),
        }
    }

    /// An H100 SXM (132 SMs) at head dim 128: what the kernel emulator plans for by default.
    pub fn h100() -> Self {
        Self::modelled(&SmLimits::SM90, 132, 128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The residency the plan assumes where it has no driver to ask is the one the compiled code
    /// allows: `docs/KERNEL-STATS.md` records each attention kernel's registers, shared memory
    /// and CTAs per SM per architecture from `ptxas -v` (scripts/kernel-stats.sh keeps it
    /// current), and the model must give the same CTAs per SM from the same limits.
    #[test]
    fn the_model_agrees_with_the_compiled_kernels() {
        let table = include_str!("../../../docs/KERNEL-STATS.md");
        let mut rows = 0;
        for line in table.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | `segmented_attention_<dtype>_d<D>` | arch | registers | ... | CTAs per SM | ...
            let Some(name) = cells
                .get(1)
                .and_then(|c| c.strip_prefix("`segmented_attention_"))
            else {
                continue;
            };
            if name.starts_with("combine") || cells.len() < 9 {
                continue;
            }
            let head_dim: usize = name
                .rsplit_once("_d")
                .and_then(|(_, d)| d.trim_end_matches('`').parse().ok())
                .expect("head dim");
            let limits = match cells[2] {
                "sm_80" => SmLimits::SM80,
                "sm_90a" => SmLimits::SM90,
                arch => panic!("an architecture the model does not know: {arch}"),
            };
            let registers: usize = cells[3].parse().expect("registers");
            let static_smem: usize = cells[6].parse().expect("static smem");
            assert!(registers <= ATTENTION_MAX_REGISTERS, "{line}");
            assert_eq!(static_smem, ATTENTION_STATIC_SMEM, "{line}");
            let (plain, shifts) = cells[8].split_once('/').expect("plain/shifts");
            let recorded = (
                plain.parse::<usize>().expect("CTAs"),
                shifts.parse::<usize>().expect("CTAs"),
            );
            let o = Occupancy::modelled(&limits, 1, head_dim);
            assert_eq!(
                (o.blocks_per_sm, o.blocks_per_sm_with_shifts),
                recorded,
                "{line}"
            );
            // And from the kernel's own registers, not only their bound.
            let (dyn_plain, dyn_shifts) = smem_bytes(head_dim);
            let own =
                |dynamic| limits.blocks_per_sm(ATTENTION_THREADS, registers, static_smem + dynamic);
            assert_eq!((own(dyn_plain), own(dyn_shifts)), recorded, "{line}");
            rows += 1;
        }
        assert_eq!(
            rows, 8,
            "4 attention kernels x 2 architectures in the table"
        );
    }
}
