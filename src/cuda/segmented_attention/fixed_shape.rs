//! The fixed shape of a capturable batch: grids, parameter arrays and workspace sized once from a
//! [`BatchCapacity`].

use super::*;

/// The most a [`crate::cuda::CapturableBatch`] launch takes: every launch's grids, parameter arrays and
/// workspace are sized from it once, so that they never change between launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchCapacity {
    /// Sequences per launch (at least 1, at most [`MAX_BATCH_SEQUENCES`] - 1).
    pub sequences: usize,
    /// Query rows of all the sequences together (at least 1).
    pub rows: usize,
    /// Segments of all the sequences together, empty ones included (at least 1).
    pub segments: usize,
    /// Query rows of any one sequence, at most; 0: no bound but `rows`. A capacity whose
    /// sequences pack at most 16 rows each (`rows_per_sequence * group <= DECODE_ROWS`: a decode
    /// step) runs the decode tile's kernel, as the batched launcher does for such sequences
    /// ([`TileShape::of_launch`]); any other runs the prefill tile's (never the wide tile's,
    /// which the batched launcher runs only where a launch fills the device with 128-row tiles).
    pub rows_per_sequence: usize,
}

impl BatchCapacity {
    /// Errors unless sequences of these `(n_rows, n_segments)` fit the capacity; returns their
    /// rows.
    pub(crate) fn check_fits(
        &self,
        sequences: impl ExactSizeIterator<Item = (usize, usize)>,
    ) -> Result<usize> {
        let n = sequences.len();
        let over = |what: &str, n: String, cap: usize| {
            Error::OutOfRange(format!("{n} {what} exceed the batch's capacity of {cap}"))
        };
        if n == 0 {
            return Err(Error::Shape("a launch needs at least one sequence".into()));
        }
        if n > self.sequences {
            return Err(over("sequences", n.to_string(), self.sequences));
        }
        let (mut rows, mut segments) = (0usize, 0usize);
        for (i, (r, s)) in sequences.enumerate() {
            if self.rows_per_sequence > 0 && r > self.rows_per_sequence {
                return Err(Error::OutOfRange(format!(
                    "sequence {i}: {r} query rows exceed the batch's capacity of {} per sequence",
                    self.rows_per_sequence
                )));
            }
            rows = rows.saturating_add(r);
            segments = segments.saturating_add(s);
        }
        if rows > self.rows {
            return Err(over("query rows", rows.to_string(), self.rows));
        }
        if segments > self.segments {
            return Err(over("segments", segments.to_string(), self.segments));
        }
        Ok(rows)
    }

    /// The tile shape of every launch within this capacity ([`BatchCapacity::rows_per_sequence`]),
    /// for query heads in groups of `group` per KV head, planned with `num_splits`.
    pub fn tile_shape(&self, group: usize, num_splits: Option<usize>) -> TileShape {
        if self.rows_per_sequence > 0
            && TileShape::few_rows([self.rows_per_sequence], group, num_splits)
        {
            TileShape::Decode
        } else {
            TileShape::Prefill
        }
    }
}

/// The fixed shape of a capturable launch: sizes derived from a [`BatchCapacity`] that bound
/// every launch [`launch_layout`] can plan within it, and the parameter image's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FixedShape {
    pub capacity: BatchCapacity,
    /// The kernel's tile shape, its pipeline stages in every launch (the depth a launch with
    /// RoPE shifts takes on the device), and its dynamic shared memory (room for shifts).
    pub tile: TileShape,
    pub stages: usize,
    pub smem: usize,
    /// Descriptor slots, and f32 values of the RoPE shift table (a row per shifted segment).
    pub desc_slots: usize,
    pub rope_len: usize,
    /// Entries of the `seqs` array: the capacity's sequences and one idle sequence, which the
    /// thread blocks a launch does not need are sent to.
    pub seq_slots: usize,
    /// The kernel's grid x (thread blocks per KV head).
    pub blocks: u32,
    /// Split counters of the workspace: one per thread block of the grid (`blocks * n_kv_heads`).
    pub counters: usize,
    /// Partial states of the workspace ((row, head) entries of every split).
    pub parts: usize,
    /// Byte offsets of the image's four parts (as [`LaunchLayout::upload_bytes_into`]) and its size.
    pub offsets: [usize; 4],
    pub bytes: usize,
    pub head_dim: usize,
    pub n_heads: usize,
}

impl FixedShape {
    /// The shape for `capacity` on a device where the kernels have `occupancy`, planned as
    /// [`launch_layout`] plans with `options.num_splits`, for the kernel of
    /// [`BatchCapacity::tile_shape`] (`options.tile`, if set, must be that one). Its wave `W` is
    /// the larger of that kernel's waves without and with RoPE shifts, so that it bounds the plan
    /// of either launch.
    ///
    /// The bounds: a sequence of `r` rows has `ceil(r * group / 64)` query tiles, at most
    /// `r * ceil(group / 64)` and at most `r * group / 64 + 1`. With `num_splits = Some(n)`, each
    /// query tile has at most `n` thread blocks and each (row, head) at most `n` partial states.
    /// Chosen splits ([`plan_batch`]) happen only when the query tiles times KV heads (`base`)
    /// are under one wave (`W = wave`); a sequence then has
    /// `s <= max(1, share / (q_tiles * n_kv_heads))` splits with shares adding up to at most `W`,
    /// so the thread blocks number at most `q_tiles + W / n_kv_heads`, every `s` is at most
    /// `W / n_kv_heads`, and the partial states number at most `64 * (base + W) < 128 W`. A
    /// sequence of at most 16 packed rows with context and causal keys that would run whole
    /// splits in two instead ([`plan`]): one thread block and `2 * 16 * n_kv_heads` partial
    /// states more per sequence, at most.
    pub fn new(
        capacity: &BatchCapacity,
        dims: &AttentionDims,
        occupancy: &AttentionOccupancy,
        options: &SegmentedAttentionOptions,
    ) -> Result<Self> {
        dims.validate()?;
        check_head_dim(dims.head_dim)?;
        let num_splits = options.num_splits;
        let BatchCapacity {
            sequences,
            rows,
            segments,
            rows_per_sequence: _,
        } = *capacity;
        let tile = capacity.tile_shape(dims.group_size(), num_splits);
        if options.tile.is_some_and(|t| t != tile) {
            return Err(Error::InvalidParameter {
                name: "tile",
                value: f64::NAN,
                requirement: "a capturable batch runs its capacity's tile (the decode tile for \
                              sequences of at most 16 packed rows, rows_per_sequence; else the \
                              prefill tile)",
            });
        }
        let o = occupancy.of(tile);
        let wave = o.wave(false).max(o.wave(true));
        let stages = o.stages_with_shifts;
        let smem = tile.smem_bytes(dims.head_dim, stages).1;
        if sequences == 0 || rows == 0 || segments == 0 {
            return Err(Error::InvalidParameter {
                name: "capacity",
                value: 0.0,
                requirement: "sequences, rows and segments must each be at least 1",
            });
        }
        if sequences >= MAX_BATCH_SEQUENCES {
            return Err(Error::OutOfRange(format!(
                "a capacity of {sequences} sequences: at most {} (the batch's sequences \
                 array holds one more, an idle sequence)",
                MAX_BATCH_SEQUENCES - 1
            )));
        }
        if num_splits == Some(0) {
            return Err(Error::InvalidParameter {
                name: "num_splits",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        let too_big = || Error::OutOfRange(format!("capacity {capacity:?} is too large"));
        let group = dims.group_size();
        let n_kv = dims.n_kv_heads;
        let wave = wave.max(1);
        let q_tiles = rows
            .checked_mul(group.div_ceil(BLOCK_M))
            .ok_or_else(too_big)?
            .min((rows.saturating_mul(group) / BLOCK_M).saturating_add(sequences));
        let heads_rows = rows.checked_mul(dims.n_heads).ok_or_else(too_big)?;
        let (blocks, parts) = match num_splits {
            Some(n) => (
                q_tiles.checked_mul(n),
                n.checked_mul(heads_rows).ok_or_else(too_big)?,
            ),
            None => {
                // Few-row sequences split in two at the context/causal boundary: one more
                // thread block each (one query tile), and two partial states per (row, head) of
                // at most 16 packed rows.
                let few = sequences.min(q_tiles);
                let few_parts = (2 * (BLOCK_M / 4) * n_kv)
                    .saturating_mul(sequences)
                    .min(heads_rows.saturating_mul(2));
                (
                    q_tiles
                        .checked_add(wave.div_ceil(n_kv))
                        .and_then(|b| b.checked_add(few)),
                    (2 * BLOCK_M * wave)
                        .min(wave.div_ceil(n_kv).saturating_mul(heads_rows))
                        .checked_add(few_parts)
                        .ok_or_else(too_big)?,
                )
            }
        };
        let blocks = blocks
            .filter(|&b| b <= i32::MAX as usize)
            .ok_or_else(too_big)? as u32;
        let counters = (blocks as usize).checked_mul(n_kv).ok_or_else(too_big)?;
        parts.checked_mul(dims.head_dim).ok_or_else(too_big)?;
        let rope_len = segments.checked_mul(dims.head_dim).ok_or_else(too_big)?;
        let seq_slots = sequences + 1;
        let sizes = [
            segments.checked_mul(std::mem::size_of::<SegmentDesc>()),
            rope_len.checked_mul(4),
            Some(seq_slots * std::mem::size_of::<SegmentedAttentionParams>()),
            (blocks as usize).checked_mul(4),
        ];
        let mut offsets = [0usize; 4];
        let mut bytes = 0usize;
        for (i, size) in sizes.into_iter().enumerate() {
            offsets[i] = bytes.next_multiple_of(16);
            bytes = size
                .and_then(|s| offsets[i].checked_add(s))
                .ok_or_else(too_big)?;
        }
        Ok(Self {
            capacity: *capacity,
            tile,
            stages,
            smem,
            desc_slots: segments,
            rope_len,
            seq_slots,
            blocks,
            counters,
            parts,
            offsets,
            bytes,
            head_dim: dims.head_dim,
            n_heads: dims.n_heads,
        })
    }

    /// `layout` (planned for at most this shape's capacity) as the parameter image of a fixed
    /// launch: every part at its fixed offset and padded, a `seqs` array and work list even for
    /// one sequence, the idle sequence after the real ones and the work list's surplus thread
    /// blocks sent to it. Its launches take [`FixedShape::launch_params`].
    ///
    /// The bytes [`Self::image_into`] leaves are poisoned (all ones: NaN table values, descriptors
    /// pointing nowhere), so that the kernel emulator, which launches this image, catches a
    /// launch that reads them.
    #[cfg(any(test, feature = "emulator"))]
    pub fn image(&self, layout: &LaunchLayout) -> Result<Vec<u8>> {
        let mut bytes = vec![0xffu8; self.bytes];
        self.image_into(layout, &mut bytes)?;
        Ok(bytes)
    }

    /// [`Self::image`] written into `bytes` (this shape's size), which is left untouched on an
    /// error. Bytes outside the parts' used extents keep what they held: the launch reads none of
    /// them (descriptors and table rows past the sequences', padding).
    pub fn image_into(&self, layout: &LaunchLayout, bytes: &mut [u8]) -> Result<()> {
        if layout.shape != self.tile {
            return Err(Error::Shape(format!(
                "a fixed launch runs the {:?} tile's kernel, not {}",
                self.tile, layout.main
            )));
        }
        if bytes.len() != self.bytes {
            return Err(Error::Shape(format!(
                "a fixed launch's image is {} bytes, not {}",
                self.bytes,
                bytes.len()
            )));
        }
        let mut seqs = if layout.seqs.is_empty() {
            vec![layout.launch.first]
        } else {
            layout.seqs.clone()
        };
        let n_seqs = seqs.len();
        let mut work = if layout.work.is_empty() {
            vec![0u32; layout.grid.0 as usize]
        } else {
            layout.work.clone()
        };
        // The capacity's checks come first (CapturableBatch::prepare); past them, these hold by
        // the bounds of FixedShape::new.
        let fits = layout.descs.len() <= self.desc_slots
            && layout.rope_table.len() <= self.rope_len
            && n_seqs < self.seq_slots
            && work.len() <= self.blocks as usize
            && layout.o_len <= (self.parts * self.head_dim).max(1);
        if !fits {
            return Err(Error::OutOfRange(format!(
                "the launch ({} sequences, {} descriptors, {} thread blocks, {} partial states) \
                 does not fit the fixed shape planned for {:?}",
                n_seqs,
                layout.descs.len(),
                work.len(),
                layout.lse_len,
                self.capacity
            )));
        }
        seqs.resize(self.seq_slots, SegmentedAttentionParams::idle());
        work.resize(self.blocks as usize, n_seqs as u32);
        let parts: [&[u8]; 4] = [
            bytemuck::cast_slice(&layout.descs),
            bytemuck::cast_slice(&layout.rope_table),
            bytemuck::cast_slice(&seqs),
            bytemuck::cast_slice(&work),
        ];
        for (part, at) in parts.into_iter().zip(self.offsets) {
            bytes[at..at + part.len()].copy_from_slice(part);
        }
        Ok(())
    }

    /// The by-value parameters of every launch of this shape: the sequences are in the `seqs`
    /// array, all `seq_slots` of them.
    pub fn launch_params(&self) -> SegmentedAttentionLaunch {
        SegmentedAttentionLaunch {
            first: SegmentedAttentionParams::idle(),
            n_sequences: self.seq_slots as u32,
            stages: self.stages as u32,
            pad: [0; 2],
        }
    }
}
