//! The attention kernels' tile shapes, and how many thread blocks of each one device runs at
//! once: the wave that [`plan`] fills with query tiles and key splits.
//!
//! On a GPU the number comes from the driver, for the compiled kernel as loaded (its registers
//! and static shared memory on that architecture) and the dynamic shared memory a launch asks
//! for ([`crate::cuda::Device`] asks once per kernel). Without one (the kernel emulator, the
//! host-side benchmarks, tests of the plan), [`Occupancy::modelled`] computes it from an
//! architecture's published limits, as the driver does.

use super::*;

/// Packed query rows per thread block of the decode tile (`DecodeTile::kRows`): a launch whose
/// every sequence has at most this many (`n_rows * group`) runs the decode kernel.
pub const DECODE_ROWS: usize = 16;

/// The attention kernel's three tile shapes (`PrefillTile`, `WideTile`, `DecodeTile` in
/// kernels/segmented_attention.cu), one compiled kernel each per dtype and head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TileShape {
    /// 64 packed query rows per thread block of 4 warps, each warp its own 16 against every key;
    /// two pipeline stages; up to 255 registers (2 blocks per SM).
    Prefill,
    /// 128 packed query rows per thread block of 8 warps, each its own 16: every copied key tile
    /// serves twice the rows. Two pipeline stages, up to 255 registers (1 block per SM).
    Wide,
    /// 16 packed query rows (a decode row's GQA group, a short question), every warp on those
    /// rows and a quarter of each key tile's keys; 2 to 4 pipeline stages, fewer registers (3
    /// blocks per SM at head dim 128, 4 at 64), so more blocks fit an SM.
    Decode,
}

impl TileShape {
    /// Every shape.
    pub const ALL: [Self; 3] = [Self::Prefill, Self::Wide, Self::Decode];

    /// The shape a launch of sequences with these `n_rows` takes on a device where the kernels
    /// have `occupancy` (`shifts`: the launch has RoPE shifts):
    /// - the decode tile when every sequence has at most [`DECODE_ROWS`] packed rows, unless
    ///   `num_splits = Some(1)` asks for one pass over every key (the APE correction inside a
    ///   pass needs each warp to hold its own rows over all the keys, which the decode tile
    ///   does not);
    /// - the wide tile at head dim 64 when every sequence with rows has more than [`BLOCK_M`]
    ///   packed rows and the launch's 128-row tiles alone fill the wide kernel's wave: at head
    ///   dim 64 it issues about a tenth fewer instructions per MMA (at 128, 3%: not chosen;
    ///   docs/KERNEL-STATS.md), and a launch that would split its keys to fill the device, or
    ///   whose short sequences would run on one warp of 8, gains less than it loses;
    /// - the prefill tile otherwise, and wherever the other tile would not fit the device's SMs
    ///   ([`Occupancy::fits`]: on 100 KiB parts, the wide tile at head dim 128 with RoPE shifts).
    pub fn of_launch(
        n_rows: &[usize],
        dims: &AttentionDims,
        num_splits: Option<usize>,
        occupancy: &AttentionOccupancy,
        shifts: bool,
    ) -> Self {
        let group = dims.group_size();
        let packed = |r: usize| r.saturating_mul(group);
        if Self::few_rows(n_rows.iter().copied(), group, num_splits)
            && occupancy.decode.fits(shifts)
        {
            return Self::Decode;
        }
        let tiles: usize = n_rows
            .iter()
            .map(|&r| packed(r).div_ceil(Self::Wide.rows()))
            .fold(0, usize::saturating_add);
        let wide = dims.head_dim == 64
            && occupancy.wide.fits(shifts)
            && n_rows.iter().all(|&r| r == 0 || packed(r) > BLOCK_M)
            && tiles.saturating_mul(dims.n_kv_heads) >= occupancy.wide.wave(shifts);
        if wide {
            Self::Wide
        } else {
            Self::Prefill
        }
    }

    /// Whether sequences of these `n_rows` (packed in groups of `group`) run the decode tile:
    /// each packs at most [`DECODE_ROWS`] rows, and `num_splits` is not `Some(1)`.
    pub(crate) fn few_rows(
        n_rows: impl IntoIterator<Item = usize>,
        group: usize,
        num_splits: Option<usize>,
    ) -> bool {
        num_splits != Some(1)
            && n_rows
                .into_iter()
                .all(|r| r.checked_mul(group).is_some_and(|p| p <= DECODE_ROWS))
    }

    /// Packed query rows per thread block.
    pub const fn rows(self) -> usize {
        match self {
            Self::Prefill => BLOCK_M,
            Self::Wide => 2 * BLOCK_M,
            Self::Decode => DECODE_ROWS,
        }
    }

    /// Warps per thread block.
    pub const fn warps(self) -> usize {
        match self {
            Self::Wide => 8,
            Self::Prefill | Self::Decode => 4,
        }
    }

    /// Threads per thread block.
    pub const fn threads(self) -> usize {
        32 * self.warps()
    }

    /// The most pipeline stages (K and V tiles in shared memory) the kernel runs with.
    pub const fn max_stages(self) -> usize {
        match self {
            Self::Prefill | Self::Wide => 2,
            Self::Decode => 4,
        }
    }

    /// The most registers a thread may use at `head_dim`: the kernel's `__launch_bounds__`
    /// (2, 3 or 4 blocks of 4 warps, or 1 of 8, per SM) keeps that many blocks' registers within
    /// an SM's 64K, in the units of 8 the compiler allocates.
    pub const fn max_registers(self, head_dim: usize) -> usize {
        match (self, head_dim) {
            (Self::Prefill | Self::Wide, _) => 255,
            (Self::Decode, 64) => 128,
            (Self::Decode, _) => 168,
        }
    }

    /// Static shared memory, bytes (`ptxas -v`, the same on every architecture and dtype;
    /// docs/KERNEL-STATS.md): the sequence's parameters, the walker's state and its tile slots
    /// (one more than the stages).
    pub const fn static_smem(self) -> usize {
        match self {
            Self::Prefill | Self::Wide => 384,
            Self::Decode => 512,
        }
    }

    /// The compiled kernel for `dtype` (bf16 or f16) and `head_dim` (64 or 128).
    pub fn kernel_name(self, dtype: DType, head_dim: usize) -> &'static str {
        match (self, dtype, head_dim) {
            (Self::Prefill, DType::BF16, 64) => "segmented_attention_bf16_d64",
            (Self::Prefill, DType::BF16, _) => "segmented_attention_bf16_d128",
            (Self::Prefill, _, 64) => "segmented_attention_f16_d64",
            (Self::Prefill, _, _) => "segmented_attention_f16_d128",
            (Self::Wide, DType::BF16, 64) => "segmented_attention_wide_bf16_d64",
            (Self::Wide, DType::BF16, _) => "segmented_attention_wide_bf16_d128",
            (Self::Wide, _, 64) => "segmented_attention_wide_f16_d64",
            (Self::Wide, _, _) => "segmented_attention_wide_f16_d128",
            (Self::Decode, DType::BF16, 64) => "segmented_attention_decode_bf16_d64",
            (Self::Decode, DType::BF16, _) => "segmented_attention_decode_bf16_d128",
            (Self::Decode, _, 64) => "segmented_attention_decode_f16_d64",
            (Self::Decode, _, _) => "segmented_attention_decode_f16_d128",
        }
    }

    /// Dynamic shared memory at `head_dim` with `stages` pipeline stages: the Q tile and
    /// `stages` K and V tiles; and with RoPE shifts, 16 more rows per warp for the rotated rows'
    /// lo parts.
    pub const fn smem_bytes(self, head_dim: usize, stages: usize) -> (usize, usize) {
        let plain = (self.rows() + 2 * stages * BLOCK_N) * head_dim * 2;
        (plain, plain + self.warps() * 16 * head_dim * 2)
    }

    /// The pipeline stages to run with, from `blocks_per_sm(stages)` (resident blocks at that
    /// many stages): the most 64-key tiles in flight per SM (blocks x (stages -
    /// 1)) among the counts that keep at least 2 blocks per SM where any does, fewer stages (more
    /// blocks) on a tie. The prefill tile always runs 2.
    pub fn choose_stages(self, mut blocks_per_sm: impl FnMut(usize) -> usize) -> usize {
        let options: Vec<(usize, usize)> = (2..=self.max_stages())
            .map(|s| (s, blocks_per_sm(s)))
            .collect();
        let several = options.iter().any(|&(_, b)| b >= 2);
        let mut best = (2, 0);
        for (s, b) in options {
            if several && b < 2 {
                continue;
            }
            if b * (s - 1) > best.1 {
                best = (s, b * (s - 1));
            }
        }
        best.0
    }
}

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

/// One attention kernel's residency on one device: its SMs, the pipeline stages it runs with
/// there, and thread blocks per SM without and with RoPE shifts (a launch with shifts takes 64
/// more rows of shared memory: 96 KiB instead of 80 for the prefill tile at head dim 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// Streaming multiprocessors.
    pub sm_count: usize,
    /// Thread blocks resident per SM for a launch without RoPE shifts.
    pub blocks_per_sm: usize,
    /// Thread blocks resident per SM for a launch with RoPE shifts.
    pub blocks_per_sm_with_shifts: usize,
    /// Pipeline stages of a launch without RoPE shifts ([`TileShape::choose_stages`]; 2 for
    /// the prefill tile).
    pub stages: usize,
    /// Pipeline stages of a launch with RoPE shifts (chosen for their larger shared memory).
    pub stages_with_shifts: usize,
}

impl Occupancy {
    /// Whether one thread block of a launch with or without RoPE shifts fits an SM.
    pub fn fits(&self, shifts: bool) -> bool {
        if shifts {
            self.blocks_per_sm_with_shifts > 0
        } else {
            self.blocks_per_sm > 0
        }
    }

    /// Thread blocks resident at once, with or without RoPE shifts in the launch (at least one
    /// per SM: a launch that fits no block is refused before it is planned, [`Occupancy::fits`]).
    pub fn wave(&self, shifts: bool) -> usize {
        let per_sm = if shifts {
            self.blocks_per_sm_with_shifts
        } else {
            self.blocks_per_sm
        };
        self.sm_count.max(1) * per_sm.max(1)
    }

    /// Pipeline stages of a launch with or without RoPE shifts.
    pub fn stages(&self, shifts: bool) -> usize {
        if shifts {
            self.stages_with_shifts
        } else {
            self.stages
        }
    }

    /// The residency of the `shape` kernel at `head_dim` on `sm_count` SMs with `limits`,
    /// computed from its threads, its register bound ([`TileShape::max_registers`]; the
    /// compiled kernel may use fewer, so on a GPU the driver's count can be higher at head dim
    /// 64) and its shared memory at the stages it would choose.
    pub fn modelled(limits: &SmLimits, sm_count: usize, shape: TileShape, head_dim: usize) -> Self {
        let per_sm = |dynamic: usize| {
            limits.blocks_per_sm(
                shape.threads(),
                shape.max_registers(head_dim),
                shape.static_smem() + dynamic,
            )
        };
        let stages = shape.choose_stages(|s| per_sm(shape.smem_bytes(head_dim, s).0));
        let stages_with_shifts = shape.choose_stages(|s| per_sm(shape.smem_bytes(head_dim, s).1));
        Self {
            sm_count,
            blocks_per_sm: per_sm(shape.smem_bytes(head_dim, stages).0),
            blocks_per_sm_with_shifts: per_sm(shape.smem_bytes(head_dim, stages_with_shifts).1),
            stages,
            stages_with_shifts,
        }
    }

    /// An H100 SXM (132 SMs), the prefill tile at head dim 128.
    pub fn h100() -> Self {
        Self::modelled(&SmLimits::SM90, 132, TileShape::Prefill, 128)
    }
}

/// The attention kernels' residency on one device, for one dtype and head dim: a launch plans
/// for the wave of the kernel it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionOccupancy {
    /// The prefill tile's kernel.
    pub prefill: Occupancy,
    /// The wide tile's kernel.
    pub wide: Occupancy,
    /// The decode tile's kernel.
    pub decode: Occupancy,
}

impl AttentionOccupancy {
    /// The kernel of `shape`.
    pub fn of(&self, shape: TileShape) -> &Occupancy {
        match shape {
            TileShape::Prefill => &self.prefill,
            TileShape::Wide => &self.wide,
            TileShape::Decode => &self.decode,
        }
    }

    /// Every kernel at `head_dim` on `sm_count` SMs with `limits` ([`Occupancy::modelled`]).
    pub fn modelled(limits: &SmLimits, sm_count: usize, head_dim: usize) -> Self {
        let of = |shape| Occupancy::modelled(limits, sm_count, shape, head_dim);
        Self {
            prefill: of(TileShape::Prefill),
            wide: of(TileShape::Wide),
            decode: of(TileShape::Decode),
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
            // | `segmented_attention_[decode_]<dtype>_d<D>` | arch | registers | ... | CTAs per SM |
            // ... | stages |
            let Some(name) = cells
                .get(1)
                .and_then(|c| c.strip_prefix("`segmented_attention_"))
            else {
                continue;
            };
            if cells.len() < 18 {
                continue;
            }
            let (shape, name) = match (name.strip_prefix("decode_"), name.strip_prefix("wide_")) {
                (Some(rest), _) => (TileShape::Decode, rest),
                (_, Some(rest)) => (TileShape::Wide, rest),
                _ => (TileShape::Prefill, name),
            };
            assert_eq!(
                shape.kernel_name(
                    if name.starts_with("bf16") {
                        DType::BF16
                    } else {
                        DType::F16
                    },
                    if name.ends_with("d64`") { 64 } else { 128 }
                ),
                cells[1].trim_matches('`'),
                "{line}"
            );
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
            assert!(registers <= shape.max_registers(head_dim), "{line}");
            assert_eq!(static_smem, shape.static_smem(), "{line}");
            let (plain, shifts) = cells[8].split_once('/').expect("plain/shifts");
            let recorded = (
                plain.parse::<usize>().expect("CTAs"),
                shifts.parse::<usize>().expect("CTAs"),
            );
            let (plain, shifts) = cells[16].split_once('/').expect("plain/shifts");
            let stages = (
                plain.parse::<usize>().expect("stages"),
                shifts.parse::<usize>().expect("stages"),
            );
            let o = Occupancy::modelled(&limits, 1, shape, head_dim);
            assert_eq!(
                (o.blocks_per_sm, o.blocks_per_sm_with_shifts),
                recorded,
                "{line}"
            );
            assert_eq!((o.stages, o.stages_with_shifts), stages, "{line}");
            // And from the kernel's own registers, not only their bound.
            let own =
                |dynamic| limits.blocks_per_sm(shape.threads(), registers, static_smem + dynamic);
            let own_stages = (
                shape.choose_stages(|s| own(shape.smem_bytes(head_dim, s).0)),
                shape.choose_stages(|s| own(shape.smem_bytes(head_dim, s).1)),
            );
            assert_eq!(own_stages, stages, "{line}");
            assert_eq!(
                (
                    own(shape.smem_bytes(head_dim, stages.0).0),
                    own(shape.smem_bytes(head_dim, stages.1).1)
                ),
                recorded,
                "{line}"
            );
            rows += 1;
        }
        assert_eq!(
            rows, 24,
            "4 attention kernels x 3 tile shapes x 2 architectures in the table"
        );
    }
}
