//! ggml tensor element types and their dequantisation to f32.
//!
//! Block formats (little-endian; `d`, `m` are f16):
//! - `Q4_0`: 32 values in 18 bytes: `d`, 16 bytes of nibbles; `x[j] = d * (lo(q[j]) - 8)`,
//!   `x[j + 16] = d * (hi(q[j]) - 8)`.
//! - `Q4_1`: 32 values in 20 bytes: `d`, `m`, 16 bytes of nibbles; `x[j] = d * lo(q[j]) + m`,
//!   `x[j + 16] = d * hi(q[j]) + m`.
//! - `Q8_0`: 32 values in 34 bytes: `d`, 32 signed bytes; `x[j] = d * q[j]`.
//! - `Q4_K`: 256 values in 144 bytes: `d`, `dmin`, 12 bytes of 6-bit scales and mins for eight
//!   sub-blocks of 32, 128 bytes of nibbles. Each 32 bytes of nibbles hold two sub-blocks (low
//!   nibbles, then high): `x = d * sc * q - dmin * m`.
//! - `Q6_K`: 256 values in 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs,
//!   16 signed 8-bit scales (one per 16 values), `d` last: `x = d * sc * (q - 32)` with 6-bit `q`.

use half::{bf16, f16};

/// Element types this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, 32-value blocks with a scale.
    Q4_0,
    /// 4-bit, 32-value blocks with a scale and a minimum.
    Q4_1,
    /// 8-bit, 32-value blocks with a scale.
    Q8_0,
    /// 4-bit k-quant, 256-value super-blocks.
    Q4K,
    /// 6-bit k-quant, 256-value super-blocks.
    Q6K,
}

impl GgmlType {
    /// The type of a ggml type id; unknown and unsupported ids are errors that name them.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            6 | 7 | 9..=11 | 13 | 15..=23 | 29 | 34..=39 => {
                return Err(format!(
                    "ggml type {id} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K and Q6_K are)"
                ))
            }
            _ => return Err(format!("unknown ggml type {id}")),
        })
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }
}

/// Bytes of a tensor of `n` elements whose rows have `ne0` elements.
pub fn byte_len(ty: GgmlType, ne0: usize, n: usize) -> Result<usize, String> {
    let (values, bytes) = ty.block();
    if !ne0.is_multiple_of(values) {
        return Err(format!(
            "row length {ne0} is not a multiple of the {ty:?} block of {values}"
        ));
    }
    (n / values)
        .checked_mul(bytes)
        .ok_or_else(|| "byte length overflows".to_string())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `n` elements from `raw` (which must hold exactly their bytes).
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let (values, bytes) = ty.block();
    if !n.is_multiple_of(values) || raw.len() != n / values * bytes {
        return Err(format!("{} bytes do not hold {n} {ty:?} values", raw.len()));
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|b| f16_at(b, 0))),
        GgmlType::BF16 => out.extend(
            raw.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::Q4_0 => {
            for b in raw.chunks_exact(bytes) {
                let d = f16_at(b, 0);
                let q = &b[2..18];
                out.extend(q.iter().map(|&x| d * ((x & 0xF) as f32 - 8.0)));
                out.extend(q.iter().map(|&x| d * ((x >> 4) as f32 - 8.0)));
            }
        }
        GgmlType::Q4_1 => {
            for b in raw.chunks_exact(bytes) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let q = &b[4..20];
                out.extend(q.iter().map(|&x| d * (x & 0xF) as f32 + m));
                out.extend(q.iter().map(|&x| d * (x >> 4) as f32 + m));
            }
        }
        GgmlType::Q8_0 => {
            for b in raw.chunks_exact(bytes) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&x| d * x as i8 as f32));
            }
        }
        GgmlType::Q4K => raw.chunks_exact(bytes).for_each(|b| q4k_block(b, &mut out)),
        GgmlType::Q6K => raw.chunks_exact(bytes).for_each(|b| q6k_block(b, &mut out)),
    }
    Ok(out)
}

/// Scale and min of Q4_K sub-block `j` (0..8) from the 12 packed bytes: sub-blocks 0-3 keep
/// theirs in the low 6 bits of bytes `j` and `j + 4`; 4-7 combine a nibble of byte `j + 4` with
/// the top 2 bits of bytes `j - 4` (scale) and `j` (min).
fn q4k_scale_min(scales: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((scales[j] & 63) as f32, (scales[j + 4] & 63) as f32)
    } else {
        let sc = (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4);
        let m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

fn q4k_block(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for pair in 0..4 {
        let q = &qs[32 * pair..32 * pair + 32];
        let (sc0, m0) = q4k_scale_min(scales, 2 * pair);
        let (sc1, m1) = q4k_scale_min(scales, 2 * pair + 1);
        let (d0, d1) = (d * sc0, d * sc1);
        let (o0, o1) = (dmin * m0, dmin * m1);
        out.extend(q.iter().map(|&x| d0 * (x & 0x0F) as f32 - o0));
        out.extend(q.iter().map(|&x| d1 * (x >> 4) as f32 - o1));
    }
}

fn q6k_block(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let start = out.len();
    out.resize(start + 256, 0.0);
    let y = &mut out[start..];
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * sc[is + k] as i8 as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}
