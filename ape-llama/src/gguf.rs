//! GGUF v3 reader: metadata, tensor directory, and tensor data as f32.
//!
//! Layout: magic `GGUF`, version (u32, 2 or 3), tensor count (u64), metadata count (u64); the
//! metadata key/value pairs; the tensor infos (name, dims with the contiguous dim first, ggml type,
//! offset into the data section); then the data section at the next multiple of
//! `general.alignment` (default 32). All integers are little-endian.
//!
//! Every read is bounds-checked and nothing is allocated from a count before the bytes it counts
//! have been seen, so a corrupt or truncated file is an [`Error::Model`], never a panic or an
//! out-of-bounds read.

use std::collections::BTreeMap;

use super::quant::{self, GgmlType};
use super::weights::TensorBytes;
use ape_attn::{Error, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// A UTF-8 string (invalid UTF-8 is replaced).
    Str(String),
    /// An array of values.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// As a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dims, contiguous dim first (`[in, out]` for a weight matrix).
    pub dims: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte range of the data within the file.
    pub start: usize,
    /// Byte length.
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file held in memory.
pub struct Gguf {
    /// The GGUF version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor directory by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: TensorBytes,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Model(msg.into())
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                bad(format!(
                    "truncated: {what} needs {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn usize(&mut self, what: &str) -> Result<usize> {
        usize::try_from(self.u64(what)?).map_err(|_| bad(format!("{what} does not fit in memory")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.usize(what)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.array::<1>(key)?[0] as u64),
            1 => Value::I64(self.array::<1>(key)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.array(key)?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.array(key)?) as i64),
            4 => Value::U64(self.u32(key)? as u64),
            5 => Value::I64(i32::from_le_bytes(self.array(key)?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.array(key)?) as f64),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(bad(format!("{key}: invalid bool byte {b}"))),
            },
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(bad(format!("{key}: nested arrays are not supported")));
                }
                let elem = self.u32(key)?;
                let n = self.usize(key)?;
                // Each element takes at least one byte: a count beyond the rest of the file is
                // corrupt, and checking it first keeps the loop bounded by the file size.
                if n > self.bytes.len() - self.pos {
                    return Err(bad(format!(
                        "{key}: array of {n} elements exceeds the file"
                    )));
                }
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(bad(format!("{key}: unknown metadata value type {t}"))),
        })
    }
}

impl Gguf {
    /// Maps and parses a GGUF file. The file is memory-mapped, not read: tensors are read from
    /// the page cache where they lie, and a model that keeps them ([`Gguf::raw_shared`]) shares
    /// the pages with every other process that maps the same file. Like any mapped model file, it
    /// must not be truncated or rewritten in place while in use.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        // A device or a pipe (/dev/zero) would be read without end.
        if !std::fs::metadata(path)
            .map_err(Error::io_at(path))?
            .is_file()
        {
            return Err(bad(format!("{} is not a regular file", path.display())));
        }
        let file = std::fs::File::open(path).map_err(Error::io_at(path))?;
        Self::parse_bytes(TensorBytes::map(&file).map_err(Error::io_at(path))?)
    }

    /// Parses GGUF bytes held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self> {
        Self::parse_bytes(TensorBytes::from(bytes))
    }

    fn parse_bytes(bytes: TensorBytes) -> Result<Self> {
        let mut c = Cursor {
            bytes: &bytes,
            pos: 0,
        };
        if c.take(4, "magic")? != b"GGUF" {
            return Err(bad("not a GGUF file (bad magic)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "unsupported GGUF version {version} (2 and 3 are)"
            )));
        }
        let n_tensors = c.usize("tensor count")?;
        let n_kv = c.usize("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let value = c.value(ty, 0, &key)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| bad(format!("general.alignment {v:?} is not a power of two")))?
                as usize,
        };
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dims")? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(bad(format!("{name}: {n_dims} dims (1 to 4 allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.usize("tensor dim")?);
            }
            let ty = GgmlType::from_id(c.u32("tensor type")?)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            let offset = c.usize("tensor offset")?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = c
            .pos
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| bad("data offset overflows"))?;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let n = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("{name}: element count overflows")))?;
            let len = quant::byte_len(ty, dims[0], n).map_err(|e| bad(format!("{name}: {e}")))?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "{name}: offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let start = data_start
                .checked_add(offset)
                .ok_or_else(|| bad(format!("{name}: offset overflows")))?;
            if start.checked_add(len).is_none_or(|end| end > bytes.len()) {
                return Err(bad(format!(
                    "{name}: data [{start}, +{len}) lies beyond the end of the file ({} bytes): truncated?",
                    bytes.len()
                )));
            }
            if tensors.contains_key(&name) {
                return Err(bad(format!("duplicate tensor {name}")));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    ty,
                    start,
                    len,
                },
            );
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| bad(format!("missing metadata {key}")))
    }

    /// A metadata unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| bad(format!("{key} is not a non-negative integer")))
    }

    /// A metadata number.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| bad(format!("{key} is not a number")))
    }

    /// A metadata string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| bad(format!("{key} is not a string")))
    }

    /// A tensor's directory entry.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))
    }

    /// A tensor's raw bytes.
    pub fn raw(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.start..info.start + info.len]
    }

    /// A tensor's raw bytes as a value that outlives the parsed file: a window of the same
    /// mapping when the file is mapped (nothing copied), a copy otherwise.
    pub fn raw_shared(&self, info: &TensorInfo) -> TensorBytes {
        self.bytes.window(info.start..info.start + info.len)
    }

    /// A tensor dequantised to f32, checking its dims (contiguous dim first).
    pub fn tensor_f32(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let info = self.tensor(name)?;
        if info.dims != dims {
            return Err(bad(format!(
                "{name} has dims {:?}, expected {dims:?}",
                info.dims
            )));
        }
        quant::dequantize(info.ty, self.raw(info), info.n_elements())
            .map_err(|e| bad(format!("{name}: {e}")))
    }
}
