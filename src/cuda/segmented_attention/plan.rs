//! Planning a launch: the tile order, whole or split keys, and a batch's share of the GPU.

use super::*;

/// How a launch walks the keys: tiles in order (context first), and how they are split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the caller's segments, non-empty ones only, Context first (stable order).
    pub order: Vec<usize>,
    /// First tile of each segment in `order`.
    pub first_tile: Vec<u32>,
    /// Tiles of the context group (tiles `0..n_ctx_tiles`).
    pub n_ctx_tiles: u32,
    /// Tiles of the causal group (the rest).
    pub n_causal_tiles: u32,
    /// Thread blocks per query tile over the context tiles (split mode).
    pub n_ctx_splits: u32,
    /// Thread blocks per query tile over the causal tiles (split mode).
    pub n_causal_splits: u32,
    /// One pass over every tile with the APE correction fused (no workspace, no combine).
    pub whole: bool,
    /// Query tiles (`ceil(n_rows * group / rows)`, the tile's rows: [`BLOCK_M`] unless planned for
    /// another tile shape).
    pub q_tiles: u32,
}

impl Plan {
    /// Thread blocks per query tile (and KV head): the splits, or 1 in whole mode.
    pub fn n_splits(&self) -> u32 {
        if self.whole {
            1
        } else {
            self.n_ctx_splits + self.n_causal_splits
        }
    }
}

pub(super) fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::OutOfRange(format!("{what} = {x} does not fit in 32 bits")))
}

/// Plans a launch from the segments' lengths and roles (their addresses are not read). Pure: no
/// device needed.
///
/// `wave` is the number of thread blocks the device runs at once ([`Occupancy::wave`]). Whole
/// mode when the query tiles times KV heads already fill one wave, or when asked with
/// `num_splits = Some(1)`; except that a sequence of at most 16 packed rows with both context
/// and causal keys splits in two at the boundary all the same, so that every warp computes.
/// Otherwise the keys are split so that all splits together fill one wave, shared between the
/// groups in proportion to their tiles: each split covers tiles of one group only, and a context
/// split covers at least two tiles where there are enough.
pub fn plan(
    n_rows: usize,
    dims: &AttentionDims,
    segments: &[SegmentRef],
    wave: usize,
    num_splits: Option<usize>,
) -> Result<Plan> {
    plan_splits(n_rows, dims, segments, wave, num_splits, None, BLOCK_M)
}

/// [`plan`] for query tiles of `tile_rows` packed rows, where `chosen` (when `num_splits` is
/// `None`) replaces the splits [`plan`] would choose to fill the wave: a batch's share
/// ([`plan_batch`]).
fn plan_splits(
    n_rows: usize,
    dims: &AttentionDims,
    segments: &[SegmentRef],
    wave: usize,
    num_splits: Option<usize>,
    chosen: Option<usize>,
    tile_rows: usize,
) -> Result<Plan> {
    let mut order: Vec<usize> = Vec::with_capacity(segments.len());
    for role in [SegmentRole::Context, SegmentRole::Causal] {
        order.extend(
            segments
                .iter()
                .enumerate()
                .filter(|(_, s)| s.role == role && s.len > 0)
                .map(|(i, _)| i),
        );
    }
    let mut first_tile = Vec::with_capacity(order.len());
    let (mut n_ctx_tiles, mut n_causal_tiles) = (0u64, 0u64);
    for &i in &order {
        let s = &segments[i];
        let tiles = s.len.div_ceil(BLOCK_N) as u64;
        first_tile.push(u32_of(
            (n_ctx_tiles + n_causal_tiles) as usize,
            "tile index",
        )?);
        match s.role {
            SegmentRole::Context => n_ctx_tiles += tiles,
            SegmentRole::Causal => n_causal_tiles += tiles,
        }
    }
    let n_ctx_tiles = u32_of(n_ctx_tiles as usize, "context tiles")?;
    let n_causal_tiles = u32_of(n_causal_tiles as usize, "causal tiles")?;
    let total_tiles = n_ctx_tiles as usize + n_causal_tiles as usize;
    let packed = n_rows
        .checked_mul(dims.group_size())
        .ok_or_else(|| Error::OutOfRange("n_rows * group overflows".into()))?;
    let q_tiles = u32_of(packed.div_ceil(tile_rows), "query tiles")?;
    let base = q_tiles as usize * dims.n_kv_heads;

    let wave = wave.max(1);
    let wanted = match num_splits {
        Some(0) => {
            return Err(Error::InvalidParameter {
                name: "num_splits",
                value: 0.0,
                requirement: "must be >= 1",
            })
        }
        Some(n) => n.min(total_tiles.max(1)),
        None => match chosen {
            Some(n) => n.max(1),
            None if base >= wave => 1,
            None => (wave / base.max(1)).min(total_tiles.div_ceil(2)).max(1),
        },
    };
    // A query tile of at most 16 packed rows (decode, short questions) has every warp compute
    // those rows over a quarter of each tile's keys, except in one pass that crosses from the
    // context keys to the causal ones (the APE correction there needs the context state over all
    // the keys): one warp would compute while three copy. Two splits, one per group, keep every
    // warp computing; the combine applies the correction.
    let few_rows = packed <= DECODE_ROWS;
    let wanted =
        if num_splits.is_none() && wanted <= 1 && few_rows && n_ctx_tiles > 0 && n_causal_tiles > 0
        {
            2
        } else {
            wanted
        };
    let mut p = Plan {
        order,
        first_tile,
        n_ctx_tiles,
        n_causal_tiles,
        n_ctx_splits: 0,
        n_causal_splits: 0,
        whole: true,
        q_tiles,
    };
    // No rows (a batch's idle sequence) or nothing to split: one pass, which does nothing.
    if wanted <= 1 || total_tiles <= 1 || q_tiles == 0 {
        return Ok(p);
    }
    // Share the splits between the groups in proportion to their tiles: at least one each for a
    // non-empty group, never more splits than tiles, and (wanted >= 2 here) never more than wanted.
    let (tc, to) = (n_ctx_tiles as usize, n_causal_tiles as usize);
    let (ctx, causal) = match (tc, to) {
        (0, to) => (0, wanted.min(to)),
        (tc, 0) => (wanted.min(tc), 0),
        (tc, to) => {
            let causal = ((wanted * to + total_tiles / 2) / total_tiles)
                .clamp(1, wanted - 1)
                .min(to);
            ((wanted - causal).min(tc), causal)
        }
    };
    p.n_ctx_splits = u32_of(ctx, "splits")?;
    p.n_causal_splits = u32_of(causal, "splits")?;
    p.whole = false;
    // Thread blocks share the grid's x (at most 2^31 - 1) with the query tiles and the other
    // sequences of a batch; launch_layout checks the total.
    let splits = u64::from(p.n_ctx_splits) + u64::from(p.n_causal_splits);
    if splits > i32::MAX as u64 {
        return Err(Error::OutOfRange(format!(
            "{splits} splits exceed the grid limit of 2^31 - 1"
        )));
    }
    Ok(p)
}

/// Plans a batched launch: one [`Plan`] per sequence (its `n_rows` and `segments` as for
/// [`plan`]), `wave` as for [`plan`].
///
/// A batch of one is planned as [`plan`] plans it. With `num_splits` set, every sequence gets
/// it. Otherwise, when the sequences' query tiles times KV heads already fill one wave, every
/// sequence runs whole (a few-row one with context and causal keys in two, as [`plan`] says); if
/// not, the wave is shared between the sequences in proportion to their
/// work (query tiles times key tiles), and each splits its keys to fill its share, as [`plan`]
/// does for the whole wave.
pub fn plan_batch(
    sequences: &[SequenceRef],
    dims: &AttentionDims,
    wave: usize,
    num_splits: Option<usize>,
) -> Result<Vec<Plan>> {
    plan_batch_for(sequences, dims, wave, num_splits, BLOCK_M)
}

/// [`plan_batch`] for query tiles of `tile_rows` packed rows ([`TileShape::rows`]).
pub(crate) fn plan_batch_for(
    sequences: &[SequenceRef],
    dims: &AttentionDims,
    wave: usize,
    num_splits: Option<usize>,
    tile_rows: usize,
) -> Result<Vec<Plan>> {
    if sequences.len() == 1 || num_splits.is_some() {
        return sequences
            .iter()
            .map(|q| {
                plan_splits(
                    q.n_rows, dims, q.segments, wave, num_splits, None, tile_rows,
                )
            })
            .collect();
    }
    let wave = wave.max(1) as u128;
    // (query tiles, key tiles) of each sequence.
    let sizes: Vec<(u128, u128)> = sequences
        .iter()
        .map(|q| {
            let packed = (q.n_rows as u128) * dims.group_size() as u128;
            let tiles: u128 = q
                .segments
                .iter()
                .map(|s| s.len.div_ceil(BLOCK_N) as u128)
                .sum();
            (packed.div_ceil(tile_rows as u128), tiles)
        })
        .collect();
    let n_kv = dims.n_kv_heads as u128;
    let base: u128 = sizes.iter().map(|(qt, _)| qt * n_kv).sum();
    let work: u128 = sizes.iter().map(|(qt, kt)| qt * kt).sum();
    sequences
        .iter()
        .zip(&sizes)
        .map(|(q, &(qt, kt))| {
            let wanted = if base >= wave || work == 0 || qt == 0 {
                1
            } else {
                let share = wave * qt * kt / work;
                (share / (qt * n_kv)).min(kt.div_ceil(2)).max(1)
            };
            plan_splits(
                q.n_rows,
                dims,
                q.segments,
                wave as usize,
                None,
                Some(wanted as usize),
                tile_rows,
            )
        })
        .collect()
}
