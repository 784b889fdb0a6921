//! The RoPE shift table of a segmented-attention launch: one row of `head_dim / 2` `(cos, sin)`
//! f32 pairs per distinct shift of the launch's segments, which the kernel reads to rotate its
//! query rows by `-delta` (`q . R(delta) k = R(-delta) q . k`).
//!
//! A batch of Block-Attention requests has a shift per cached block per request, nearly all
//! distinct (each block sits at its own offset in each request): 256 sequences of 16 blocks make
//! 4096 rows. The table is built on the host for every launch (every layer of every step), so a
//! row must cost little. Evaluating `sin` and `cos` of `delta * theta_i` for every pair costs
//! about 20 ns each, 5 ms for those 4096 rows. Instead, `R(delta) = R(d_0) R(d_1 256) R(d_2 256^2)
//! R(d_3 256^3)` over the base-256 digits of `|delta|`, and the rotations of every digit value are
//! tabulated once per RoPE configuration ([`DigitRotations`], cached for the process): a row is
//! then one table read per pair for `|delta| < 256`, and one complex product more per further
//! digit, in f64. A shift by a single digit reads the very value the direct evaluation computes.
//! Otherwise the two differ by their f64 angle roundings, about `2^-53 |delta| theta_i` each:
//! below about `|delta| = 2^24` that is far under an f32 ulp and the f32 rows are equal but for
//! rare ties; toward `2^32` both carry up to ~5e-7 of angle error, and differ by as much.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::params::{RopeConfig, RopeShift};

/// Digits of `|delta|` in base [`DIGIT_BASE`] the tables cover; larger shifts are evaluated
/// directly (positions past 2^32 do not occur in a launch, whose positions are 32-bit).
const DIGITS: usize = 4;
const DIGIT_BITS: u32 = 8;
const DIGIT_BASE: usize = 1 << DIGIT_BITS;

/// The rotations `R(j * 256^k)` of one RoPE configuration, for every digit position `k` and value
/// `j`: `(cos, sin)` of `(j * 256^k) * theta_i` (the integer exact in f64, one product rounding)
/// for every pair `i`.
#[derive(Debug)]
struct DigitRotations {
    rope: RopeConfig,
    pairs: usize,
    /// `[k][j * pairs + i]`.
    digits: Vec<Vec<(f64, f64)>>,
}

impl DigitRotations {
    fn new(rope: RopeConfig) -> Self {
        let inv_freqs = rope.inv_freqs();
        let pairs = inv_freqs.len();
        let digits = (0..DIGITS)
            .map(|k| {
                let unit = (DIGIT_BASE as f64).powi(k as i32);
                (0..DIGIT_BASE)
                    .flat_map(|j| {
                        let steps = j as f64 * unit;
                        inv_freqs.iter().map(move |theta| {
                            let (s, c) = (steps * theta).sin_cos();
                            (c, s)
                        })
                    })
                    .collect()
            })
            .collect();
        Self {
            rope,
            pairs,
            digits,
        }
    }

    /// Appends the row of `delta` (`delta != 0`) to `table` as f32 `(cos, sin)` pairs; `scratch`
    /// is working space (any contents).
    fn push_row(&self, delta: i64, table: &mut Vec<f32>, scratch: &mut Vec<(f64, f64)>) {
        let magnitude = delta.unsigned_abs();
        let sign = if delta < 0 { -1.0 } else { 1.0 };
        if magnitude >> (DIGIT_BITS as usize * DIGITS) != 0 {
            let shift = RopeShift {
                rope: self.rope,
                delta,
            };
            table.extend(
                shift
                    .cos_sin()
                    .into_iter()
                    .flat_map(|(c, s)| [c as f32, s as f32]),
            );
            return;
        }
        // The rotations of the nonzero digits, lowest first; the row is their product.
        let mut rows = (0..DIGITS).filter_map(|k| {
            let j = ((magnitude >> (DIGIT_BITS as usize * k)) as usize) & (DIGIT_BASE - 1);
            (j != 0).then(|| &self.digits[k][j * self.pairs..(j + 1) * self.pairs])
        });
        let first = rows.next().expect("delta != 0 has a nonzero digit");
        scratch.clear();
        scratch.extend_from_slice(first);
        for row in rows {
            for ((c, s), &(c2, s2)) in scratch.iter_mut().zip(row) {
                (*c, *s) = (*c * c2 - *s * s2, *c * s2 + *s * c2);
            }
        }
        let at = table.len();
        table.resize(at + 2 * self.pairs, 0.0);
        for (out, &(c, s)) in table[at..].chunks_exact_mut(2).zip(scratch.iter()) {
            out[0] = c as f32;
            out[1] = (sign * s) as f32;
        }
    }
}

/// RoPE configurations whose digit rotations have been built (a few per process: one per model).
static DIGIT_ROTATIONS: Mutex<Vec<Arc<DigitRotations>>> = Mutex::new(Vec::new());
/// Configurations kept at most; past that the oldest is dropped (and rebuilt if used again).
const KEPT_CONFIGS: usize = 8;

fn digit_rotations(rope: &RopeConfig) -> Arc<DigitRotations> {
    // A poisoned lock only means another thread panicked while pushing: the list is still valid.
    let mut cache = DIGIT_ROTATIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(t) = cache.iter().find(|t| t.rope == *rope) {
        return t.clone();
    }
    let t = Arc::new(DigitRotations::new(*rope));
    if cache.len() == KEPT_CONFIGS {
        cache.remove(0);
    }
    cache.push(t.clone());
    t
}

thread_local! {
    /// A table buffer handed back by a finished launch ([`recycle`]), reused by the thread's next
    /// table: a large batch's table is megabytes, and a fresh allocation of that size is faulted
    /// in page by page on every launch.
    static SPARE_TABLE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Hands a launch's table back for the thread's next launch to fill.
pub(crate) fn recycle(table: Vec<f32>) {
    super::segmented_attention::keep_larger(&SPARE_TABLE, table);
}

/// The RoPE shift table of a launch's segments (in descriptor order): one row of `head_dim / 2`
/// `(cos, sin)` f32 pairs per distinct nonzero shift (rows in order of first use; a shift by 0
/// reads the keys as stored), and each segment's row (`-1`: read as stored).
pub(crate) fn rope_table(segment_shifts: &[Option<RopeShift>]) -> (Vec<f32>, Vec<i32>) {
    // The launch's distinct configurations (nearly always one), and each one's rows by delta.
    let mut configs: Vec<(Arc<DigitRotations>, HashMap<i64, i32>)> = Vec::new();
    // Sized for every shift distinct (untouched capacity costs no page faults), so that it never
    // grows by doubling (copying and faulting it in again and again).
    let most = segment_shifts
        .iter()
        .flatten()
        .filter(|s| s.delta != 0)
        .map(|s| s.rope.head_dim)
        .sum::<usize>();
    let mut table = if most == 0 {
        Vec::new()
    } else {
        let mut spare = SPARE_TABLE.take();
        spare.clear();
        spare.reserve(most);
        spare
    };
    let mut scratch = Vec::new();
    let mut n_rows = 0i32;
    let rows = segment_shifts
        .iter()
        .map(|s| match s {
            Some(shift) if shift.delta != 0 => {
                let c = match configs.iter().position(|(t, _)| t.rope == shift.rope) {
                    Some(c) => c,
                    None => {
                        configs.push((digit_rotations(&shift.rope), HashMap::new()));
                        configs.len() - 1
                    }
                };
                let (rotations, rows) = &mut configs[c];
                *rows.entry(shift.delta).or_insert_with(|| {
                    rotations.push_row(shift.delta, &mut table, &mut scratch);
                    n_rows += 1;
                    n_rows - 1
                })
            }
            _ => -1,
        })
        .collect();
    (table, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::RopeLayout;

    #[test]
    fn rope_table_has_one_row_per_distinct_nonzero_shift() {
        let a = RopeConfig::new(8, 10_000.0, RopeLayout::Neox).expect("valid");
        let b = RopeConfig::new(8, 10_000.0, RopeLayout::Interleaved).expect("valid");
        let shift = |rope, delta| Some(RopeShift { rope, delta });
        let (table, rows) = rope_table(&[
            None,
            shift(a, 5),
            shift(a, 0),
            shift(a, 5),
            shift(b, 5),
            shift(a, -7),
        ]);
        assert_eq!(rows, vec![-1, 0, -1, 0, 1, 2]);
        assert_eq!(table.len(), 3 * 4 * 2);
        let row = |i: usize| &table[i * 8..(i + 1) * 8];
        for (i, delta) in [(0, 5.0f64), (2, -7.0)] {
            for (p, theta) in a.inv_freqs().iter().enumerate() {
                let (sin, cos) = (delta * theta).sin_cos();
                assert_eq!(row(i)[2 * p], cos as f32);
                assert_eq!(row(i)[2 * p + 1], sin as f32);
            }
        }
        // The same frequencies, another layout: its own row (the layout travels in the
        // descriptor), with the same values.
        assert_eq!(row(1), row(0));
        assert!(rope_table(&[None, shift(a, 0)]).0.is_empty());
    }

    /// Composing digit rotations gives the direct evaluation's values: bit for bit where
    /// `|delta|` has one nonzero digit (the same f64 expression), and otherwise within half an
    /// f32 ulp of 1 plus the two evaluations' f64 angle rounding (a few `2^-53 * |delta| *
    /// theta`): at every digit count, both signs, the digit boundaries, the largest 32-bit
    /// shifts, the fallback past them, and with Llama 3 scaling.
    #[test]
    fn composed_rows_match_direct_evaluation() {
        let mut configs = vec![
            RopeConfig::new(128, 500_000.0, RopeLayout::Neox).expect("valid"),
            RopeConfig::new(64, 10_000.0, RopeLayout::Interleaved).expect("valid"),
        ];
        let mut scaled = RopeConfig::new(128, 500_000.0, RopeLayout::Interleaved).expect("valid");
        scaled.llama3_scaling = Some(crate::params::Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        });
        configs.push(scaled);
        let mut deltas: Vec<i64> = vec![
            1,
            255,
            256,
            257,
            3 << 16,
            65_535,
            65_536,
            131_071,
            1 << 24,
            (1 << 24) + 1,
            u32::MAX as i64,
            1 << 32,
            (1 << 40) + 3,
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..400 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            deltas.push(((x >> 33) % (1 << 20)) as i64 + 1);
        }
        let signed: Vec<i64> = deltas.iter().flat_map(|&d| [d, -d]).collect();
        let (mut exact, mut total) = (0usize, 0usize);
        for rope in configs {
            let shifts: Vec<Option<RopeShift>> = signed
                .iter()
                .map(|&delta| Some(RopeShift { rope, delta }))
                .collect();
            let (table, rows) = rope_table(&shifts);
            let pairs = rope.head_dim / 2;
            let distinct: std::collections::HashSet<i64> = signed.iter().copied().collect();
            assert_eq!(table.len(), distinct.len() * 2 * pairs);
            let inv_freqs = rope.inv_freqs();
            for (shift, row) in shifts.iter().zip(rows) {
                let shift = shift.expect("set");
                let magnitude = shift.delta.unsigned_abs();
                let one_digit =
                    (0..4).any(|k| magnitude % (256u64.pow(k)) == 0 && magnitude >> (8 * k) < 256);
                let got = &table[row as usize * 2 * pairs..(row as usize + 1) * 2 * pairs];
                for (p, (c, s)) in shift.cos_sin().into_iter().enumerate() {
                    let tol = 2f64.powi(-24) + 8.0 * f64::EPSILON * magnitude as f64 * inv_freqs[p];
                    for (g, want) in [(got[2 * p], c), (got[2 * p + 1], s)] {
                        let want = want as f32;
                        assert!(
                            f64::from(g - want).abs() <= tol,
                            "delta {} pair {p}: {g} vs {want}",
                            shift.delta
                        );
                        if one_digit || magnitude >= 1 << 32 {
                            assert_eq!(g, want, "delta {} pair {p}", shift.delta);
                        }
                        exact += usize::from(g == want);
                        total += 1;
                    }
                }
            }
        }
        // Nearly every value is bit-identical.
        assert!(exact * 100 >= total * 95, "{exact} of {total} identical");
    }
}
