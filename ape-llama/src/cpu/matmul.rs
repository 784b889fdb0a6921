//! Matrix products with weights kept in their file's element type ([`QMatrix`]).
//!
//! `y[n, rows] = x[n, cols] · Wᵀ` with `W` stored row by row in its GGUF (or safetensors) type,
//! the way llama.cpp's CPU backend multiplies: the activation rows are quantised to 8 bits once
//! per call and every output is an integer dot product of a weight row with an activation row,
//! scaled per block in f32. Rows of `W` (in groups of eight, see the packed layout below) are
//! split over rayon's global pool; each weight row is read once for up to four activation rows
//! at a time, so a batch of `n` rows streams the weights `ceil(n / 4)` times from cache, not
//! `n` times from memory.
//!
//! # Weight blocks (see [`crate::quant`]; `d`, `m`, `dmin` are f16)
//! - `Q4_0` (32 values, 18 bytes): `w = d * (q - 8)`, `q` a nibble.
//! - `Q4_1` (32 values, 20 bytes): `w = d * q + m`.
//! - `Q8_0` (32 values, 34 bytes): `w = d * q`, `q` a signed byte.
//! - `Q4_K` (256 values, 144 bytes): eight sub-blocks of 32 with 6-bit scale `sc` and min `mn`:
//!   `w = d * sc * q - dmin * mn`.
//! - `Q6_K` (256 values, 210 bytes): sixteen groups of 16 with a signed 8-bit scale `sc`:
//!   `w = d * sc * (q - 32)`, `q` 6 bits.
//! - `F32`, `F16`, `BF16`: one value per element.
//!
//! # Packed layout (`Q4_0`, `Q4_1`, `Q8_0` with a multiple of 8 rows)
//! [`QMatrix::from_raw`] repacks these into groups of eight consecutive rows (the same number of
//! bytes, replacing the file's), so that one 256-bit vector holds the same block of the eight
//! rows and each of its lanes accumulates one output row: no per-block scalar scale conversion
//! and no horizontal sums. Group `g`'s block `b` (`8 * block_bytes` bytes, groups in order,
//! blocks in order within a group) holds the eight rows' `d` (f16), for `Q4_1` their eight `m`
//! (f16), then the quants in 32-byte chunks: chunk `j` holds, for each row `r`, bytes `4j..4j+4`
//! of that row's quants as the file stores them, at `4r..4r+4`. For the 4-bit types (file byte
//! `i` holds value `i` in its low nibble and `i + 16` in its high one) chunk `j` thus gives, per
//! row, values `4j..4j+4` (low nibbles) and `16+4j..16+4j+4` (high), multiplied with the
//! activation's four quants at those positions broadcast to all lanes: one `vpdpbusd` each (two
//! per chunk, eight per block); `Q8_0` has eight chunks of signed bytes, one `vpdpbusd` each on
//! `w + 128` with `128 Σ q_x` subtracted (AVX2: the sign trick). `Q4_0`'s `-8` is folded in as
//! `-8 Σ q_x` (the activation block keeps its exact integer sum). Each weight vector is loaded
//! and unpacked once for up to four activation rows. `row_f32` and the sgemm path read rows back
//! out of the groups. Other types and row counts keep the file's layout, one row at a time.
//!
//! # Activation quantisation (as llama.cpp's x86 build does it)
//! - For `Q4_0` and `Q8_0` weights (llama.cpp's `q8_0`) and `Q4_1` (`q8_1`): blocks of 32;
//!   `amax = max |x|`, `d = amax / 127` rounded to f16, `q = round(x * 127 / amax)` (round half
//!   to even, as `_mm256_round_ps`), and for `q8_1` also `s = d * Σq` (with the unrounded `d`)
//!   rounded to f16. A `Q4_1` block's dot product is `d_w * d_x * Σ q_w q_x + m_w * s_x`. The
//!   block also keeps the exact `Σq` (for `Q4_0`'s `-8` and `Q8_0`'s `+128` on the packed
//!   layout). On AVX2 CPUs these blocks are computed in AVX2, bit for bit the same.
//! - For `Q4_K` and `Q6_K` (llama.cpp's `q8_K`): blocks of 256; `max` the element of largest
//!   magnitude (with its sign), `q = min(127, round(-127 / max * x))` (half to even), `d = 1 /
//!   (-127 / max)` kept in f32, plus the sums of `q` over each group of 16. The mins of `Q4_K` and
//!   the `-32` offset of `Q6_K` are applied through those sums.
//! - `F32`, `F16`, `BF16` weights multiply the f32 activations unquantised (llama.cpp rounds
//!   them to f16 / bf16 first; keeping f32 is more accurate and costs nothing here).
//!
//! What is exact and what is rounded: every product of a weight quant with an activation quant
//! and every sum within one block (32 values, or a 256-value super-block for the k-quants) is an
//! exact 32-bit integer (no 16-bit saturation can occur: the activation quants lie in
//! `[-127, 127]`). Each block's integer sum is converted to f32 and multiplied by the f32 product
//! of the two block scales, and the blocks' terms are summed in f32 (in the file's layout: in
//! eight SIMD lanes, then across them; packed: in one lane per row). The only approximation beyond f32 rounding is therefore the 8-bit quantisation
//! of `x` (a relative error of about `2^-8` per element for a block whose values are of similar
//! size) and, for `q8_0`/`q8_1`, the f16 rounding of `d` and `s`. When `x` is exactly
//! representable (each block's values are integers times a power of two with the largest
//! magnitude 127 times that power) the result equals the f64 product of the dequantised weights
//! with `x` up to f32 rounding.
//!
//! # Paths
//! Quantised weights take the integer kernels at every row count ([`Kernels::Auto`]), so that a
//! token's numerics do not depend on how many rows share its product (a prefill chunk, a decode
//! batch): the row range (packed: the range of groups of eight rows) of each rayon task is walked
//! once per group of four activation rows, so a task's weights stay in L1/L2 while the
//! activation streams past them. [`Kernels::Sgemm`]
//! dequantises tiles of `W` to f32 and multiplies them with `matrixmultiply::sgemm` with the
//! unquantised activations: the exact product of the stored weights, slower at few rows (a
//! model built with [`super::Activations::F32`] uses it). Float weights go through `sgemm` from
//! [`SGEMM_MIN_N_FLOAT`] rows. Kernels: AVX512-VNNI (`vpdpbusd` on 256-bit vectors), AVX2 + FMA
//! + F16C (`vpmaddubsw` / `vpmaddwd`), chosen at run time, and a portable scalar fallback.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::quant::{self, GgmlType};
use crate::weights::TensorBytes;
use ape_attn::{Error, Result};

/// Float-weight (`F32`, `F16`, `BF16`) products with at least this many activation rows go
/// through `sgemm`.
pub const SGEMM_MIN_N_FLOAT: usize = 8;

/// A weight matrix `[rows = out, cols = in]`, each row contiguous in its file's element type.
#[derive(Clone)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// The file's rows, or (when `packed`) the same bytes in groups of eight rows interleaved
    /// (see the module doc).
    data: TensorBytes,
    packed: bool,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// The kernels a product may run on; [`Kernels::Auto`] is what [`QMatrix::matmul`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The fastest the CPU supports, and the path chosen by `n` and the element type.
    Auto,
    /// The portable scalar integer kernels (the reference the SIMD kernels are tested against).
    Scalar,
    /// The AVX2 + FMA + F16C kernels (falls back to scalar on CPUs without them).
    Avx2,
    /// The AVX512-VNNI kernels (falls back to AVX2, then scalar, on CPUs without them).
    Vnni,
    /// Tiles of `W` dequantised to f32 and multiplied with `matrixmultiply::sgemm` (any `n`).
    Sgemm,
}

/// The instruction set of the integer kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Isa {
    /// The best of `want` and below that this CPU has.
    fn detect(want: Kernels) -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let vnni = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            match want {
                Kernels::Auto | Kernels::Vnni | Kernels::Sgemm if vnni => return Isa::Vnni,
                Kernels::Auto | Kernels::Vnni | Kernels::Avx2 | Kernels::Sgemm if avx2 => {
                    return Isa::Avx2
                }
                _ => {}
            }
        }
        let _ = want;
        Isa::Scalar
    }
}

impl QMatrix {
    /// A matrix from its raw bytes: `rows` rows of `cols` elements of `ty`, row-major. Errors
    /// (never panics) when `cols` is not a multiple of the type's block or `raw` does not hold
    /// exactly the matrix's bytes. `Q4_0`, `Q4_1` and `Q8_0` matrices whose rows are a multiple
    /// of 8 are repacked into groups of eight interleaved rows (a copy of the same size that
    /// replaces `raw`); other bytes are kept as given (a window of a mapped model file stays in
    /// the file's pages).
    pub fn from_raw(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        raw: impl Into<TensorBytes>,
    ) -> Result<Self> {
        Self::new(ty, rows, cols, raw.into(), true)
    }

    /// [`QMatrix::from_raw`] keeping the file's layout whatever the row count (the path of
    /// matrices that cannot be packed), to compare the two layouts in tests and benchmarks.
    pub fn from_raw_unpacked(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        raw: impl Into<TensorBytes>,
    ) -> Result<Self> {
        Self::new(ty, rows, cols, raw.into(), false)
    }

    fn new(ty: GgmlType, rows: usize, cols: usize, raw: TensorBytes, repack: bool) -> Result<Self> {
        let (values, block_bytes) = ty.block();
        if !cols.is_multiple_of(values) {
            return Err(Error::Shape(format!(
                "{ty:?} matrix: {cols} columns are not a multiple of the block of {values}"
            )));
        }
        let row_bytes = cols / values * block_bytes;
        let want = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| Error::Shape(format!("{ty:?} matrix {rows}x{cols} overflows")))?;
        if raw.len() != want {
            return Err(Error::Shape(format!(
                "{ty:?} matrix {rows}x{cols} needs {want} bytes, got {}",
                raw.len()
            )));
        }
        let packed = repack
            && matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
            && rows.is_multiple_of(GROUP)
            && rows > 0;
        // The packed copy replaces the file's bytes (dropped here), so memory does not double.
        let data = if packed {
            let data = TensorBytes::from(pack(ty, &raw, rows, row_bytes));
            // The file's pages read by the packing leave this process (they stay in the page
            // cache), so loading does not hold the file and its packed copy at once.
            raw.release();
            data
        } else {
            raw
        };
        Ok(QMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
            packed,
        })
    }

    /// An `F32` matrix from `rows * cols` values, row-major.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::Shape(format!(
                "F32 matrix {rows}x{cols}: {} values",
                data.len()
            )));
        }
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_raw(GgmlType::F32, rows, cols, raw)
    }

    /// The element type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Output features (rows of `W`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of `W`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the stored weights.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` dequantised into `out[..cols]` (the embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.dequant_range(r, 1, &mut out[..self.cols]);
    }

    /// Whether the weights are in the packed layout of groups of eight rows.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Rows `first..first + nr` dequantised into `out[..nr * cols]`.
    fn dequant_range(&self, first: usize, nr: usize, out: &mut [f32]) {
        let cols = self.cols;
        if !self.packed {
            let raw = &self.data[first * self.row_bytes..(first + nr) * self.row_bytes];
            dequant_rows(self.ty, raw, nr * cols, out);
            return;
        }
        let mut raw = vec![0u8; self.row_bytes];
        for (k, o) in out[..nr * cols].chunks_exact_mut(cols).enumerate() {
            let r = first + k;
            let g = r / GROUP;
            let group = &self.data[g * GROUP * self.row_bytes..(g + 1) * GROUP * self.row_bytes];
            unpack_row(self.ty, group, r % GROUP, &mut raw);
            dequant_rows(self.ty, &raw, cols, o);
        }
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ`, multithreaded with rayon (the global pool).
    ///
    /// # Panics
    /// When `x` does not hold `n * cols` values or `y` `n * rows`.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_with(Kernels::Auto, x, n, y);
    }

    /// [`QMatrix::matmul`] on the given kernels (for tests and benchmarks: the scalar
    /// reference, one SIMD level, or the dequantise-and-sgemm path).
    ///
    /// # Panics
    /// When `x` does not hold `n * cols` values or `y` `n * rows`.
    pub fn matmul_with(&self, kernels: Kernels, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "x is not [n, cols]");
        assert_eq!(y.len(), n * self.rows, "y is not [n, rows]");
        if n == 0 || self.rows == 0 {
            return;
        }
        if self.cols == 0 {
            y.fill(0.0);
            return;
        }
        let float = matches!(self.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
        let sgemm = match kernels {
            Kernels::Sgemm => true,
            Kernels::Auto if float => n >= SGEMM_MIN_N_FLOAT,
            Kernels::Auto => false,
            _ => false,
        };
        if sgemm {
            self.matmul_sgemm(x, n, y);
            return;
        }
        let isa = Isa::detect(kernels);
        let act = Act::new(isa, self.ty, x, n, self.cols);
        self.run_rows(isa, &act, n, y);
    }

    /// Rows per rayon task: each task does roughly `task_ns` of work, and for several
    /// activation rows its weights fit in L2.
    fn chunk_rows(&self, n: usize) -> usize {
        // Rough costs on a 2024 x86 core: weights streamed at ~16 bytes/ns, and ~0.02 ns per
        // multiply-add of a weight with an activation once the weights are in cache. The packed
        // kernels run at about twice that, and a task split costs ~10 µs on a loaded 2-core
        // machine (measured: a 576x576 Q4_1 product at n = 1 took 6 µs as one task, 20 µs as
        // two), so they take larger tasks.
        let (task_ns, bytes_per_ns, ns_per_mac) = if self.packed {
            (TASK_NS_PACKED, 32.0, 0.01)
        } else {
            (20_000.0, 16.0, 0.02)
        };
        let row_ns = self.row_bytes as f64 / bytes_per_ns + (n * self.cols) as f64 * ns_per_mac;
        let total = row_ns * self.rows as f64;
        let threads = rayon::current_num_threads().max(1);
        let mut tasks = (total / task_ns).ceil().max(1.0) as usize;
        if tasks > 1 {
            tasks = tasks.max(threads);
        }
        let mut chunk = self.rows.div_ceil(tasks);
        if n > 4 {
            // Keep a task's weights within ~128 KiB so that they are reused from cache.
            chunk = chunk.min((128 * 1024 / self.row_bytes.max(1)).max(4));
        }
        chunk.max(1)
    }

    fn run_rows(&self, isa: Isa, act: &Act<'_>, n: usize, y: &mut [f32]) {
        if self.packed {
            self.run_groups(isa, act, n, y);
            return;
        }
        let rows = self.rows;
        let chunk = self.chunk_rows(n);
        let out = OutPtr(y.as_mut_ptr());
        let body = |r0: usize, r1: usize| {
            let mut res = [0.0f32; 4];
            let mut i0 = 0;
            while i0 < n {
                let g = (n - i0).min(4);
                for r in r0..r1 {
                    dot_group(isa, self.ty, self.row(r), act, i0, g, &mut res);
                    for (k, &v) in res[..g].iter().enumerate() {
                        // SAFETY: y holds n * rows values (asserted in matmul_with); i0 + k < n
                        // and r < rows, and each (i, r) is written by the one task that owns
                        // row r (tasks own disjoint row ranges), while nothing reads y.
                        unsafe { out.write((i0 + k) * rows + r, v) };
                    }
                }
                i0 += g;
            }
        };
        let tasks = rows.div_ceil(chunk);
        if tasks == 1 {
            body(0, rows);
        } else {
            (0..tasks)
                .into_par_iter()
                .for_each(|t| body(t * chunk, ((t + 1) * chunk).min(rows)));
        }
    }

    /// The packed path: each rayon task owns a range of groups of eight rows and walks it once
    /// per four activation rows; a kernel call gives eight outputs for each activation row.
    fn run_groups(&self, isa: Isa, act: &Act<'_>, n: usize, y: &mut [f32]) {
        let Act::Q8 { blocks, per_row } = act else {
            unreachable!("packed matrices are Q4_0, Q4_1 or Q8_0")
        };
        let rows = self.rows;
        let groups = rows / GROUP;
        let group_bytes = GROUP * self.row_bytes;
        let chunk = self.chunk_rows(n).div_ceil(GROUP);
        let out = OutPtr(y.as_mut_ptr());
        let body = |g0: usize, g1: usize| {
            let mut res = [[0.0f32; GROUP]; 4];
            let mut i0 = 0;
            while i0 < n {
                let k = (n - i0).min(4);
                let x = |i: usize| &blocks[(i0 + i) * per_row..(i0 + i + 1) * per_row];
                for g in g0..g1 {
                    let w = &self.data[g * group_bytes..(g + 1) * group_bytes];
                    match k {
                        1 => res[..1].copy_from_slice(&packed_dot::<1>(isa, self.ty, w, [x(0)])),
                        2 => res[..2].copy_from_slice(&packed_dot(isa, self.ty, w, [x(0), x(1)])),
                        3 => res[..3].copy_from_slice(&packed_dot(
                            isa,
                            self.ty,
                            w,
                            [x(0), x(1), x(2)],
                        )),
                        _ => res = packed_dot(isa, self.ty, w, [x(0), x(1), x(2), x(3)]),
                    }
                    for (i, v) in res[..k].iter().enumerate() {
                        for (l, &v) in v.iter().enumerate() {
                            // SAFETY: y holds n * rows values (asserted in matmul_with); i0 + i
                            // < n and GROUP * g + l < rows, and each element is written by the
                            // one task that owns group g (tasks own disjoint group ranges),
                            // while nothing reads y.
                            unsafe { out.write((i0 + i) * rows + GROUP * g + l, v) };
                        }
                    }
                }
                i0 += k;
            }
        };
        let tasks = groups.div_ceil(chunk);
        if tasks == 1 {
            body(0, groups);
        } else {
            (0..tasks)
                .into_par_iter()
                .for_each(|t| body(t * chunk, ((t + 1) * chunk).min(groups)));
        }
    }

    /// Tiles of `W` dequantised to f32 (in parallel), each multiplied with `sgemm` (which
    /// threads itself).
    fn matmul_sgemm(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let tile = rows.min((1 << 20) / cols.max(1)).max(1);
        let mut buf = vec![0.0f32; tile * cols];
        let sub = 64.min(tile);
        for r0 in (0..rows).step_by(tile) {
            let t = tile.min(rows - r0);
            buf[..t * cols]
                .par_chunks_mut(sub * cols)
                .enumerate()
                .for_each(|(c, out)| {
                    let nr = out.len() / cols;
                    self.dequant_range(r0 + c * sub, nr, out);
                });
            // SAFETY: x holds n * cols values and buf at least t * cols (row-major, stride
            // cols, read transposed); y holds n * rows values and this tile writes its columns
            // r0..r0 + t of every row (row stride rows): all in bounds (asserted in
            // matmul_with), and nothing else aliases y.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    cols,
                    t,
                    1.0,
                    x.as_ptr(),
                    cols as isize,
                    1,
                    buf.as_ptr(),
                    1,
                    cols as isize,
                    0.0,
                    y.as_mut_ptr().add(r0),
                    rows as isize,
                    1,
                );
            }
        }
    }
}

/// `y`'s pointer, shared by the tasks that write disjoint elements of it.
struct OutPtr(*mut f32);

// SAFETY: the tasks holding an `OutPtr` write disjoint elements and nothing reads them meanwhile
// (see `run_rows`).
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is in bounds of the buffer and no other thread accesses element `i` meanwhile.
    unsafe fn write(&self, i: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(i).write(v) }
    }
}

// ---------------------------------------------------------------------------------------------
// The packed layout (see the module doc).

/// The work (in ns, by `chunk_rows`'s cost model) of one rayon task on the packed layout.
const TASK_NS_PACKED: f64 = 30_000.0;

/// Rows per group of the packed layout: one output per lane of a 256-bit f32 / i32 vector.
const GROUP: usize = 8;

/// Bytes of a raw block's scales (`d`, and `m` for `Q4_1`): the packed block holds them for its
/// eight rows first, then the quants.
fn scale_bytes(ty: GgmlType) -> usize {
    if ty == GgmlType::Q4_1 {
        4
    } else {
        2
    }
}

/// The file's rows repacked into groups of eight: block `b` of group `g` is `GROUP * block_bytes`
/// bytes at `(g * blocks_per_row + b) * GROUP * block_bytes`, made of the eight rows' `d` (f16),
/// for `Q4_1` their eight `m` (f16), then the quants in 32-byte chunks `j` where bytes `4r..4r+4`
/// are bytes `4j..4j+4` of row `r`'s quants (as stored in the file).
fn pack(ty: GgmlType, raw: &[u8], rows: usize, row_bytes: usize) -> Vec<u8> {
    let mut out = vec![0u8; raw.len()];
    let group_bytes = GROUP * row_bytes;
    let pack_group = |(g, o): (usize, &mut [u8])| {
        let rows = &raw[g * group_bytes..(g + 1) * group_bytes];
        for r in 0..GROUP {
            pack_row(ty, o, r, &rows[r * row_bytes..(r + 1) * row_bytes]);
        }
    };
    if rows >= 256 {
        out.par_chunks_mut(group_bytes)
            .enumerate()
            .for_each(pack_group);
    } else {
        out.chunks_mut(group_bytes).enumerate().for_each(pack_group);
    }
    out
}

/// The packed ranges of row `r`'s raw block, as `f(packed start, raw start, length)`.
#[inline]
fn each_packed_range(ty: GgmlType, r: usize, mut f: impl FnMut(usize, usize, usize)) {
    let (_, bb) = ty.block();
    let sb = scale_bytes(ty);
    for h in 0..sb / 2 {
        f(16 * h + 2 * r, 2 * h, 2);
    }
    for j in 0..(bb - sb) / 4 {
        f(GROUP * sb + 32 * j + 4 * r, sb + 4 * j, 4);
    }
}

/// Writes raw row `row` as row `r` of a packed group.
fn pack_row(ty: GgmlType, group: &mut [u8], r: usize, row: &[u8]) {
    let (_, bb) = ty.block();
    for (pb, rb) in group.chunks_exact_mut(GROUP * bb).zip(row.chunks_exact(bb)) {
        each_packed_range(ty, r, |p, q, len| {
            pb[p..p + len].copy_from_slice(&rb[q..q + len])
        });
    }
}

/// Row `r` of a packed group, in the file's layout, into `row`.
fn unpack_row(ty: GgmlType, group: &[u8], r: usize, row: &mut [u8]) {
    let (_, bb) = ty.block();
    for (pb, rb) in group.chunks_exact(GROUP * bb).zip(row.chunks_exact_mut(bb)) {
        each_packed_range(ty, r, |p, q, len| {
            rb[q..q + len].copy_from_slice(&pb[p..p + len])
        });
    }
}

/// `res[k][l]` = row `l` of the packed group `w` times activation row `x[k]`.
#[inline]
fn packed_dot<const R: usize>(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    x: [&[BlockQ8]; R],
) -> [[f32; GROUP]; R] {
    match isa {
        Isa::Scalar => scalar::packed_dot(ty, w, x),
        // SAFETY: Isa::Avx2 / Isa::Vnni come from Isa::detect, which checked that the CPU has
        // every feature these functions enable.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::packed_dot(ty, w, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni => unsafe { vnni::packed_dot(ty, w, x) },
    }
}

/// Dequantises whole rows (`n` values) from `raw` into `out[..n]`.
fn dequant_rows(ty: GgmlType, raw: &[u8], n: usize, out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, b) in out[..n].iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        _ => {
            let v = quant::dequantize(ty, raw, n).expect("QMatrix rows hold whole blocks");
            out[..n].copy_from_slice(&v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation.

/// An activation block for `Q4_0`, `Q4_1` and `Q8_0` weights (llama.cpp's `q8_0` / `q8_1`).
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ8 {
    /// The scale, rounded to f16.
    d: f32,
    /// `d * Σ qs`, rounded to f16.
    s: f32,
    /// `Σ qs`, exact.
    sum: i32,
    qs: [i8; 32],
}

/// An activation block for `Q4_K` and `Q6_K` weights (llama.cpp's `q8_K`).
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ8K {
    d: f32,
    qs: [i8; 256],
    /// Sums of `qs` over each group of 16.
    bsums: [i16; 16],
}

/// The activation of one call, in the form the weight type's kernels take.
enum Act<'a> {
    Q8 {
        blocks: Vec<BlockQ8>,
        per_row: usize,
    },
    Q8K {
        blocks: Vec<BlockQ8K>,
        per_row: usize,
    },
    F32 {
        x: &'a [f32],
        cols: usize,
    },
}

/// Round half to even for `|v| < 2^22` (ggml's `nearest_int`).
#[inline]
fn nearest_int(v: f32) -> i32 {
    let t = v + 12_582_912.0;
    (t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// [`quantize_q8_scalar`] on the SIMD kernels' CPUs: the same blocks, bit for bit (for finite x).
fn quantize_q8(isa: Isa, x: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        // SAFETY: Isa::Avx2 / Isa::Vnni come from Isa::detect, which checked that the CPU has
        // AVX2, FMA and F16C.
        unsafe { quantize_q8_avx2(x, out) };
        return;
    }
    let _ = isa;
    quantize_q8_scalar(x, out);
}

/// [`quantize_q8_scalar`] in AVX2: the same f32 operations, `cvtps` rounding half to even (the
/// default MXCSR mode) like `nearest_int`, and an exact integer sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_avx2(x: &[f32], out: &mut [BlockQ8]) {
    use std::arch::x86_64::*;
    let abs = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xb, ob) in x.chunks_exact(32).zip(out) {
        let (xs, _) = xb.as_chunks::<8>();
        // SAFETY: each chunk is 8 readable f32; loadu has no alignment requirement.
        let v: [__m256; 4] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(xs[k].as_ptr()) });
        let mut m = _mm256_andnot_ps(abs, v[0]);
        for &v in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(abs, v));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id)));
        let t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
        // i32 -> i8 (the values lie in [-127, 127]); packs interleaves the 128-bit lanes, perm
        // restores the order.
        let b = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let b = _mm256_permutevar8x32_epi32(b, perm);
        // SAFETY: qs is 32 writable bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(ob.qs.as_mut_ptr().cast(), b) };
        ob.d = f16_round(d);
        ob.s = f16_round(d * sum as f32);
        ob.sum = sum;
    }
}

fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    for (xb, ob) in x.chunks_exact(32).zip(out) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            let i = nearest_int(v * id);
            *q = i as i8;
            sum += i;
        }
        ob.d = f16_round(d);
        ob.s = f16_round(d * sum as f32);
        ob.sum = sum;
    }
}

fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, ob) in x.chunks_exact(256).zip(out) {
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            ob.d = 0.0;
            ob.qs = [0; 256];
            ob.bsums = [0; 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, g) in ob.bsums.iter_mut().zip(ob.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        ob.d = 1.0 / iscale;
    }
}

impl<'a> Act<'a> {
    fn new(isa: Isa, ty: GgmlType, x: &'a [f32], n: usize, cols: usize) -> Act<'a> {
        // Large activations are quantised in parallel, a row per task.
        let par = n >= 16;
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                let per_row = cols / 32;
                let zero = BlockQ8 {
                    d: 0.0,
                    s: 0.0,
                    sum: 0,
                    qs: [0; 32],
                };
                let mut blocks = vec![zero; n * per_row];
                if par {
                    blocks
                        .par_chunks_mut(per_row)
                        .zip(x.par_chunks(cols))
                        .for_each(|(b, xr)| quantize_q8(isa, xr, b));
                } else {
                    quantize_q8(isa, x, &mut blocks);
                }
                Act::Q8 { blocks, per_row }
            }
            GgmlType::Q4K | GgmlType::Q6K => {
                let per_row = cols / 256;
                let zero = BlockQ8K {
                    d: 0.0,
                    qs: [0; 256],
                    bsums: [0; 16],
                };
                let mut blocks = vec![zero; n * per_row];
                if par {
                    blocks
                        .par_chunks_mut(per_row)
                        .zip(x.par_chunks(cols))
                        .for_each(|(b, xr)| quantize_q8k(xr, b));
                } else {
                    quantize_q8k(x, &mut blocks);
                }
                Act::Q8K { blocks, per_row }
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Act::F32 { x, cols },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

/// `res[k] = W_row · x[i0 + k]` for `k < g` (`g` in 1..=4).
#[inline]
fn dot_group(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    act: &Act<'_>,
    i0: usize,
    g: usize,
    res: &mut [f32; 4],
) {
    match g {
        1 => res[..1].copy_from_slice(&dot_rows::<1>(isa, ty, w, act, i0)),
        2 => res[..2].copy_from_slice(&dot_rows::<2>(isa, ty, w, act, i0)),
        3 => res[..3].copy_from_slice(&dot_rows::<3>(isa, ty, w, act, i0)),
        _ => res.copy_from_slice(&dot_rows::<4>(isa, ty, w, act, i0)),
    }
}

#[inline]
fn dot_rows<const R: usize>(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    act: &Act<'_>,
    i0: usize,
) -> [f32; R] {
    match act {
        Act::Q8 { blocks, per_row } => {
            let x: [&[BlockQ8]; R] =
                std::array::from_fn(|k| &blocks[(i0 + k) * per_row..(i0 + k + 1) * per_row]);
            match isa {
                Isa::Scalar => scalar::q8_dot(ty, w, x),
                // SAFETY: Isa::Avx2 / Isa::Vnni come from Isa::detect, which checked that the
                // CPU has every feature these functions enable.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::q8_dot(ty, w, x) },
                #[cfg(target_arch = "x86_64")]
                Isa::Vnni => unsafe { vnni::q8_dot(ty, w, x) },
            }
        }
        Act::Q8K { blocks, per_row } => {
            let x: [&[BlockQ8K]; R] =
                std::array::from_fn(|k| &blocks[(i0 + k) * per_row..(i0 + k + 1) * per_row]);
            match isa {
                Isa::Scalar => scalar::q8k_dot(ty, w, x),
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::q8k_dot(ty, w, x) },
                #[cfg(target_arch = "x86_64")]
                Isa::Vnni => unsafe { vnni::q8k_dot(ty, w, x) },
            }
        }
        Act::F32 { x, cols } => {
            let x: [&[f32]; R] = std::array::from_fn(|k| &x[(i0 + k) * cols..(i0 + k + 1) * cols]);
            match isa {
                Isa::Scalar => scalar::f_dot(ty, w, x),
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::f_dot(ty, w, x) },
                #[cfg(target_arch = "x86_64")]
                Isa::Vnni => unsafe { vnni::f_dot(ty, w, x) },
            }
        }
    }
}

/// Scale and min of `Q4_K` sub-block `j` (0..8) from the 12 packed bytes.
#[inline]
fn q4k_scale_min(s: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16_le(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

// ---------------------------------------------------------------------------------------------
// The scalar kernels (portable; the reference for the SIMD ones).

mod scalar {
    use super::*;

    pub(super) fn q8_dot<const R: usize>(ty: GgmlType, w: &[u8], x: [&[BlockQ8]; R]) -> [f32; R] {
        x.map(|x| match ty {
            GgmlType::Q4_0 => {
                let (blocks, _) = w.as_chunks::<18>();
                let mut acc = 0.0f32;
                for (b, xb) in blocks.iter().zip(x) {
                    let mut s = 0i32;
                    for j in 0..16 {
                        s += ((b[2 + j] & 0x0F) as i32 - 8) * xb.qs[j] as i32;
                        s += ((b[2 + j] >> 4) as i32 - 8) * xb.qs[j + 16] as i32;
                    }
                    acc += s as f32 * (f16_le([b[0], b[1]]) * xb.d);
                }
                acc
            }
            GgmlType::Q4_1 => {
                let (blocks, _) = w.as_chunks::<20>();
                let mut acc = 0.0f32;
                for (b, xb) in blocks.iter().zip(x) {
                    let mut s = 0i32;
                    for j in 0..16 {
                        s += (b[4 + j] & 0x0F) as i32 * xb.qs[j] as i32;
                        s += (b[4 + j] >> 4) as i32 * xb.qs[j + 16] as i32;
                    }
                    acc += s as f32 * (f16_le([b[0], b[1]]) * xb.d) + f16_le([b[2], b[3]]) * xb.s;
                }
                acc
            }
            _ => {
                let (blocks, _) = w.as_chunks::<34>();
                let mut acc = 0.0f32;
                for (b, xb) in blocks.iter().zip(x) {
                    let s: i32 = (0..32)
                        .map(|j| b[2 + j] as i8 as i32 * xb.qs[j] as i32)
                        .sum();
                    acc += s as f32 * (f16_le([b[0], b[1]]) * xb.d);
                }
                acc
            }
        })
    }

    /// The packed layout's kernel: for each row of the group, the same exact integer block sums
    /// as [`q8_dot`], scaled the same way.
    pub(super) fn packed_dot<const R: usize>(
        ty: GgmlType,
        w: &[u8],
        x: [&[BlockQ8]; R],
    ) -> [[f32; GROUP]; R] {
        let (_, bb) = ty.block();
        let sb = scale_bytes(ty);
        let q = &|b: &[u8], j: usize, l: usize, k: usize| b[GROUP * sb + 32 * j + 4 * l + k];
        x.map(|x| {
            let mut acc = [0.0f32; GROUP];
            for (b, xb) in w.chunks_exact(GROUP * bb).zip(x) {
                for (l, acc) in acc.iter_mut().enumerate() {
                    let d = f16_le([b[2 * l], b[2 * l + 1]]);
                    let mut s = 0i32;
                    match ty {
                        GgmlType::Q4_0 | GgmlType::Q4_1 => {
                            for j in 0..4 {
                                for k in 0..4 {
                                    let v = q(b, j, l, k);
                                    s += (v & 0x0F) as i32 * xb.qs[4 * j + k] as i32;
                                    s += (v >> 4) as i32 * xb.qs[16 + 4 * j + k] as i32;
                                }
                            }
                        }
                        _ => {
                            for j in 0..8 {
                                for k in 0..4 {
                                    s += q(b, j, l, k) as i8 as i32 * xb.qs[4 * j + k] as i32;
                                }
                            }
                        }
                    }
                    match ty {
                        GgmlType::Q4_0 => *acc += (s - 8 * xb.sum) as f32 * (d * xb.d),
                        GgmlType::Q4_1 => {
                            let m = f16_le([b[16 + 2 * l], b[17 + 2 * l]]);
                            *acc += s as f32 * (d * xb.d) + m * xb.s;
                        }
                        _ => *acc += s as f32 * (d * xb.d),
                    }
                }
            }
            acc
        })
    }

    pub(super) fn q8k_dot<const R: usize>(ty: GgmlType, w: &[u8], x: [&[BlockQ8K]; R]) -> [f32; R] {
        x.map(|x| {
            let mut acc = 0.0f32;
            if ty == GgmlType::Q4K {
                let (blocks, _) = w.as_chunks::<144>();
                for (b, xb) in blocks.iter().zip(x) {
                    let scales: &[u8; 12] = b[4..16].try_into().unwrap();
                    let (mut sum, mut mins) = (0i32, 0i32);
                    for j in 0..8 {
                        let (sc, m) = q4k_scale_min(scales, j);
                        let q = &b[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
                        let y = &xb.qs[32 * j..32 * j + 32];
                        let shift = 4 * (j % 2);
                        let s: i32 = (0..32)
                            .map(|l| ((q[l] >> shift) & 0x0F) as i32 * y[l] as i32)
                            .sum();
                        sum += sc as i32 * s;
                        mins += m as i32 * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32);
                    }
                    acc += f16_le([b[0], b[1]]) * xb.d * sum as f32
                        - f16_le([b[2], b[3]]) * xb.d * mins as f32;
                }
            } else {
                let (blocks, _) = w.as_chunks::<210>();
                for (b, xb) in blocks.iter().zip(x) {
                    let mut sum = 0i32;
                    for half in 0..2 {
                        let ql = &b[64 * half..64 * half + 64];
                        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                        for l in 0..32 {
                            let q = [
                                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                            ];
                            for (i, &q) in q.iter().enumerate() {
                                let v = 128 * half + 32 * i + l;
                                let sc = b[192 + v / 16] as i8 as i32;
                                sum += sc * (q as i32 - 32) * xb.qs[v] as i32;
                            }
                        }
                    }
                    acc += f16_le([b[208], b[209]]) * xb.d * sum as f32;
                }
            }
            acc
        })
    }

    pub(super) fn f_dot<const R: usize>(ty: GgmlType, w: &[u8], x: [&[f32]; R]) -> [f32; R] {
        x.map(|x| match ty {
            GgmlType::F32 => w
                .chunks_exact(4)
                .zip(x)
                .map(|(b, v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v)
                .sum(),
            GgmlType::F16 => w
                .chunks_exact(2)
                .zip(x)
                .map(|(b, v)| f16_le([b[0], b[1]]) * v)
                .sum(),
            _ => w
                .chunks_exact(2)
                .zip(x)
                .map(|(b, v)| bf16::from_le_bytes([b[0], b[1]]).to_f32() * v)
                .sum(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The x86 kernels: one body, compiled for AVX2 and for AVX512-VNNI (which differ only in how a
// 32-byte u8 x i8 dot product is summed into eight i32 lanes).

#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($name:ident, $features:literal, $q8_offset:literal, $i16_sums:literal, $dot4:item, $dot_s8:item) => {
        mod $name {
            use super::*;
            use std::arch::x86_64::*;

            /// Adds the four-byte sums of `a (u8) * b (i8)` to the eight i32 lanes of `acc`.
            $dot4

            /// Adds the four-byte sums of `a (i8) * b (i8)` plus `Q8_OFFSET` times those of `b`
            /// to the eight i32 lanes of `acc`.
            $dot_s8

            /// What [`dot_s8`] adds per unit of `Σ b`.
            const Q8_OFFSET: i32 = $q8_offset;

            /// Whether the packed 4-bit kernel sums a block's `vpmaddubsw` products in i16 and
            /// widens them once (exact: eight sums of two products of a nibble with an i8,
            /// `8 * 2 * 15 * 127 = 30480 < 2^15`), rather than calling `dot4` per chunk.
            const I16_SUMS: bool = $i16_sums;

            /// Eight f16 from 16 bytes, as f32.
            #[inline]
            #[target_feature(enable = $features)]
            fn f16x8(b: &[u8; 16]) -> __m256 {
                // SAFETY: b is 16 readable bytes; loadu has no alignment requirement.
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
            }

            /// Four activation quants broadcast to the eight i32 lanes.
            #[inline]
            #[target_feature(enable = $features)]
            fn bcast4(q: &[i8], at: usize) -> __m256i {
                let b: [i8; 4] = q[at..at + 4].try_into().unwrap();
                _mm256_set1_epi32(i32::from_le_bytes(b.map(|v| v as u8)))
            }

            /// The packed layout's kernel: eight rows per lane-vector, no horizontal sums.
            #[target_feature(enable = $features)]
            pub(in super::super) fn packed_dot<const R: usize>(
                ty: GgmlType,
                w: &[u8],
                x: [&[BlockQ8]; R],
            ) -> [[f32; GROUP]; R] {
                let mut acc = [_mm256_setzero_ps(); R];
                let m4 = _mm256_set1_epi8(0x0F);
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q4_1 => {
                        let q41 = ty == GgmlType::Q4_1;
                        let (bb, sb) = if q41 { (160, 32) } else { (144, 16) };
                        for (i, b) in w.chunks_exact(bb).enumerate() {
                            // Q4_0's `q - 8` is folded in as `-8 Σ x` (exact integers).
                            let mut lo: [__m256i; R] = std::array::from_fn(|r| {
                                if q41 {
                                    _mm256_setzero_si256()
                                } else {
                                    _mm256_set1_epi32(-8 * x[r][i].sum)
                                }
                            });
                            let mut hi = [_mm256_setzero_si256(); R];
                            for j in 0..4 {
                                let v = ld32(b[sb + 32 * j..sb + 32 * j + 32].try_into().unwrap());
                                let vl = _mm256_and_si256(v, m4);
                                let vh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                                for r in 0..R {
                                    let qs = &x[r][i].qs;
                                    let (xl, xh) = (bcast4(qs, 4 * j), bcast4(qs, 16 + 4 * j));
                                    if I16_SUMS {
                                        let p = _mm256_add_epi16(
                                            _mm256_maddubs_epi16(vl, xl),
                                            _mm256_maddubs_epi16(vh, xh),
                                        );
                                        hi[r] = _mm256_add_epi16(hi[r], p);
                                    } else {
                                        lo[r] = dot4(lo[r], vl, xl);
                                        hi[r] = dot4(hi[r], vh, xh);
                                    }
                                }
                            }
                            if I16_SUMS {
                                let ones = _mm256_set1_epi16(1);
                                for r in 0..R {
                                    hi[r] = _mm256_madd_epi16(hi[r], ones);
                                }
                            }
                            let d = f16x8(b[..16].try_into().unwrap());
                            let m = if q41 {
                                f16x8(b[16..32].try_into().unwrap())
                            } else {
                                _mm256_setzero_ps()
                            };
                            for r in 0..R {
                                let xb = &x[r][i];
                                let s = _mm256_cvtepi32_ps(_mm256_add_epi32(lo[r], hi[r]));
                                let dd = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                                acc[r] = _mm256_fmadd_ps(s, dd, acc[r]);
                                if q41 {
                                    acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xb.s), acc[r]);
                                }
                            }
                        }
                    }
                    _ => {
                        for (i, b) in w.chunks_exact(272).enumerate() {
                            let mut s: [[__m256i; 2]; R] = std::array::from_fn(|r| {
                                [
                                    _mm256_set1_epi32(-Q8_OFFSET * x[r][i].sum),
                                    _mm256_setzero_si256(),
                                ]
                            });
                            for j in 0..8 {
                                let v = ld32(b[16 + 32 * j..48 + 32 * j].try_into().unwrap());
                                for r in 0..R {
                                    let y = bcast4(&x[r][i].qs, 4 * j);
                                    s[r][j % 2] = dot_s8(s[r][j % 2], v, y);
                                }
                            }
                            let d = f16x8(b[..16].try_into().unwrap());
                            for r in 0..R {
                                let t = _mm256_cvtepi32_ps(_mm256_add_epi32(s[r][0], s[r][1]));
                                let dd = _mm256_mul_ps(d, _mm256_set1_ps(x[r][i].d));
                                acc[r] = _mm256_fmadd_ps(t, dd, acc[r]);
                            }
                        }
                    }
                }
                acc.map(|a| {
                    let mut o = [0.0f32; GROUP];
                    // SAFETY: o is 8 writable f32; storeu has no alignment requirement.
                    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
                    o
                })
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn ld32(b: &[u8; 32]) -> __m256i {
                // SAFETY: b is 32 readable bytes; loadu has no alignment requirement.
                unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn ld32i(b: &[i8; 32]) -> __m256i {
                // SAFETY: as ld32.
                unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
            }

            /// The 32 nibbles of 16 bytes: the low ones in lanes 0..16, the high in 16..32.
            #[inline]
            #[target_feature(enable = $features)]
            fn nibbles(b: &[u8; 16]) -> __m256i {
                // SAFETY: b is 16 readable bytes; loadu has no alignment requirement.
                let t = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
                let v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
                _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn f16s(b: [u8; 2]) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes(b) as i32)))
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }

            /// Signed i8 x i8 dot through the sign trick: `|w| * (y * sign(w))`.
            #[inline]
            #[target_feature(enable = $features)]
            fn dot_ii<const R: usize>(w: __m256i, y: [__m256i; R]) -> [__m256i; R] {
                let aw = _mm256_sign_epi8(w, w);
                y.map(|y| dot4(_mm256_setzero_si256(), aw, _mm256_sign_epi8(y, w)))
            }

            #[target_feature(enable = $features)]
            pub(in super::super) fn q8_dot<const R: usize>(
                ty: GgmlType,
                w: &[u8],
                x: [&[BlockQ8]; R],
            ) -> [f32; R] {
                let mut acc = [_mm256_setzero_ps(); R];
                let mut mins = [0.0f32; R];
                match ty {
                    GgmlType::Q4_0 => {
                        let (blocks, _) = w.as_chunks::<18>();
                        for (i, b) in blocks.iter().enumerate() {
                            let d = f16s([b[0], b[1]]);
                            let q = nibbles(b[2..18].try_into().unwrap());
                            let q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
                            let y: [__m256i; R] = std::array::from_fn(|r| ld32i(&x[r][i].qs));
                            let p = dot_ii(q, y);
                            for r in 0..R {
                                let s = _mm256_set1_ps(d * x[r][i].d);
                                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[r]), s, acc[r]);
                            }
                        }
                    }
                    GgmlType::Q4_1 => {
                        let (blocks, _) = w.as_chunks::<20>();
                        for (i, b) in blocks.iter().enumerate() {
                            let (d, m) = (f16s([b[0], b[1]]), f16s([b[2], b[3]]));
                            let q = nibbles(b[4..20].try_into().unwrap());
                            for r in 0..R {
                                let xb = &x[r][i];
                                let p = dot4(_mm256_setzero_si256(), q, ld32i(&xb.qs));
                                let s = _mm256_set1_ps(d * xb.d);
                                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r]);
                                mins[r] += m * xb.s;
                            }
                        }
                    }
                    _ => {
                        let (blocks, _) = w.as_chunks::<34>();
                        for (i, b) in blocks.iter().enumerate() {
                            let d = f16s([b[0], b[1]]);
                            let q = ld32(b[2..34].try_into().unwrap());
                            let y: [__m256i; R] = std::array::from_fn(|r| ld32i(&x[r][i].qs));
                            let p = dot_ii(q, y);
                            for r in 0..R {
                                let s = _mm256_set1_ps(d * x[r][i].d);
                                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[r]), s, acc[r]);
                            }
                        }
                    }
                }
                std::array::from_fn(|r| hsum(acc[r]) + mins[r])
            }

            #[target_feature(enable = $features)]
            pub(in super::super) fn q8k_dot<const R: usize>(
                ty: GgmlType,
                w: &[u8],
                x: [&[BlockQ8K]; R],
            ) -> [f32; R] {
                let mut acc = [_mm256_setzero_ps(); R];
                let mut off = [0.0f32; R];
                let m4 = _mm256_set1_epi8(0x0F);
                if ty == GgmlType::Q4K {
                    let (blocks, _) = w.as_chunks::<144>();
                    for (i, b) in blocks.iter().enumerate() {
                        let (d, dmin) = (f16s([b[0], b[1]]), f16s([b[2], b[3]]));
                        let scales: &[u8; 12] = b[4..16].try_into().unwrap();
                        let sm: [(u8, u8); 8] = std::array::from_fn(|j| q4k_scale_min(scales, j));
                        let mut isum = [_mm256_setzero_si256(); R];
                        let (qs, _) = b[16..144].as_chunks::<32>();
                        for (pair, q) in qs.iter().enumerate() {
                            let q = ld32(q);
                            let lo = _mm256_and_si256(q, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                            let s0 = _mm256_set1_epi16(sm[2 * pair].0 as i16);
                            let s1 = _mm256_set1_epi16(sm[2 * pair + 1].0 as i16);
                            for r in 0..R {
                                let (ys, _) = x[r][i].qs.as_chunks::<32>();
                                let p0 = _mm256_maddubs_epi16(lo, ld32i(&ys[2 * pair]));
                                let p1 = _mm256_maddubs_epi16(hi, ld32i(&ys[2 * pair + 1]));
                                let p = _mm256_add_epi32(
                                    _mm256_madd_epi16(p0, s0),
                                    _mm256_madd_epi16(p1, s1),
                                );
                                isum[r] = _mm256_add_epi32(isum[r], p);
                            }
                        }
                        for r in 0..R {
                            let xb = &x[r][i];
                            let mut mn = 0i32;
                            for (j, &(_, m)) in sm.iter().enumerate() {
                                mn += m as i32
                                    * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32);
                            }
                            let s = _mm256_set1_ps(d * xb.d);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), s, acc[r]);
                            off[r] += dmin * xb.d * mn as f32;
                        }
                    }
                } else {
                    let (blocks, _) = w.as_chunks::<210>();
                    for (i, b) in blocks.iter().enumerate() {
                        let d = f16s([b[208], b[209]]);
                        let sc: [i8; 16] = std::array::from_fn(|k| b[192 + k] as i8);
                        let mut isum = [_mm256_setzero_si256(); R];
                        for half in 0..2 {
                            let ql0 = ld32(b[64 * half..64 * half + 32].try_into().unwrap());
                            let ql1 = ld32(b[64 * half + 32..64 * half + 64].try_into().unwrap());
                            let qh = ld32(b[128 + 32 * half..160 + 32 * half].try_into().unwrap());
                            let q = [
                                _mm256_or_si256(
                                    _mm256_and_si256(ql0, m4),
                                    _mm256_slli_epi16(
                                        _mm256_and_si256(qh, _mm256_set1_epi8(0x03)),
                                        4,
                                    ),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(ql1, m4),
                                    _mm256_slli_epi16(
                                        _mm256_and_si256(qh, _mm256_set1_epi8(0x0C)),
                                        2,
                                    ),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                    _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                    _mm256_srli_epi16(
                                        _mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)),
                                        2,
                                    ),
                                ),
                            ];
                            let s: [__m256i; 4] = std::array::from_fn(|k| {
                                let g = 8 * half + 2 * k;
                                _mm256_set_m128i(
                                    _mm_set1_epi16(sc[g + 1] as i16),
                                    _mm_set1_epi16(sc[g] as i16),
                                )
                            });
                            for r in 0..R {
                                let (ys, _) = x[r][i].qs.as_chunks::<32>();
                                for k in 0..4 {
                                    let p = _mm256_maddubs_epi16(q[k], ld32i(&ys[4 * half + k]));
                                    isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, s[k]));
                                }
                            }
                        }
                        for r in 0..R {
                            let xb = &x[r][i];
                            let o: i32 = sc
                                .iter()
                                .zip(&xb.bsums)
                                .map(|(&s, &b)| s as i32 * b as i32)
                                .sum();
                            let s = _mm256_set1_ps(d * xb.d);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), s, acc[r]);
                            off[r] += d * xb.d * (32 * o) as f32;
                        }
                    }
                }
                std::array::from_fn(|r| hsum(acc[r]) - off[r])
            }

            /// Eight f32 weights from 32, 16 or 16 bytes of F32, F16 or BF16.
            #[inline]
            #[target_feature(enable = $features)]
            fn ld8(ty: GgmlType, w: &[u8], k: usize) -> __m256 {
                match ty {
                    GgmlType::F32 => {
                        let b: &[u8; 32] = w[4 * k..4 * k + 32].try_into().unwrap();
                        // SAFETY: b is 32 readable bytes; loadu has no alignment requirement.
                        unsafe { _mm256_loadu_ps(b.as_ptr().cast()) }
                    }
                    _ => {
                        let b: &[u8; 16] = w[2 * k..2 * k + 16].try_into().unwrap();
                        // SAFETY: b is 16 readable bytes; loadu has no alignment requirement.
                        let h = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
                        if ty == GgmlType::F16 {
                            _mm256_cvtph_ps(h)
                        } else {
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                        }
                    }
                }
            }

            #[target_feature(enable = $features)]
            pub(in super::super) fn f_dot<const R: usize>(
                ty: GgmlType,
                w: &[u8],
                x: [&[f32]; R],
            ) -> [f32; R] {
                let cols = x[0].len();
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                let mut k = 0;
                while k + 16 <= cols {
                    let w0 = ld8(ty, w, k);
                    let w1 = ld8(ty, w, k + 8);
                    for r in 0..R {
                        let xr: &[f32; 16] = x[r][k..k + 16].try_into().unwrap();
                        // SAFETY: xr is 16 readable f32; loadu has no alignment requirement.
                        let (x0, x1) =
                            unsafe { (_mm256_loadu_ps(xr.as_ptr()), _mm256_loadu_ps(xr[8..].as_ptr())) };
                        acc[r][0] = _mm256_fmadd_ps(w0, x0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(w1, x1, acc[r][1]);
                    }
                    k += 16;
                }
                let tail = super::scalar_f_tail(ty, w, k);
                std::array::from_fn(|r| {
                    let t: f32 = tail.clone().zip(&x[r][k..]).map(|(a, b)| a * b).sum();
                    hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + t
                })
            }
        }
    };
}

/// The f32 weights of a float row from element `k` on.
#[cfg(target_arch = "x86_64")]
fn scalar_f_tail(ty: GgmlType, w: &[u8], k: usize) -> impl Iterator<Item = f32> + Clone + '_ {
    let size = if ty == GgmlType::F32 { 4 } else { 2 };
    w[size * k..].chunks_exact(size).map(move |b| match ty {
        GgmlType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => f16_le([b[0], b[1]]),
        _ => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
    })
}

#[cfg(target_arch = "x86_64")]
x86_kernels!(
    avx2,
    "avx2,fma,f16c",
    0,
    true,
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot4(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(a, b);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    },
    // The sign trick: `|a| * (b * sign(a))` (no offset).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_s8(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        dot4(acc, _mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
    }
);

#[cfg(target_arch = "x86_64")]
x86_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    128,
    false,
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    fn dot4(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, a, b)
    },
    // `a + 128` as u8 (flipping the sign bit), so that `dpbusd` can take it.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    fn dot_s8(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, _mm256_xor_si256(a, _mm256_set1_epi8(-128)), b)
    }
);

#[cfg(test)]
mod tests;
