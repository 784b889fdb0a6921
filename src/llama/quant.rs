//! ggml tensor element types and their dequantisation to f32.
//!
//! Block formats (little-endian; `d`, `m` are f16):
//! - `Q4_0`: 32 values in 18 bytes: `d`, 16 bytes of nibbles; `x[j] = d * (lo(q[j]) - 8)`,
//!   `x[j + 16] = d * (hi(q[j]) - 8)`.
//! - `Q4_1`: 32 values in 20 bytes: `d`, `m`, 16 bytes of nibbles; `x[j] = d * lo(q[j]) + m`,
//!   `x[j + 16] = d * hi(q[j]) + m`.
//! - `Q8_0`: 32 values in 34 bytes: `d`, 32 signed bytes; `x[j] = d * q[j]`.

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
            30 => GgmlType::BF16,
            6 | 7 | 9..=23 | 29 | 34..=39 => {
                return Err(format!(
                    "ggml type {id} is not supported (F32, F16, BF16, Q4_0, Q4_1 and Q8_0 are)"
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
        }
    }
}

/// Bytes of a tensor of `n` elements whose rows have `ne0` elements.
pub fn byte_len(ty: GgmlType, ne0: usize, n: usize) -> Result<usize, String> {
    let (values, bytes) = ty.block();
    if ne0 % values != 0 {
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
    if n % values != 0 || raw.len() != n / values * bytes {
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
    }
    Ok(out)
}
