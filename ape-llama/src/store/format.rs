//! The stored block: one self-describing byte string, the same in a file on disk and in a Redis
//! value.
//!
//! ```text
//! offset  size  field (little-endian)
//!      0     8  magic "APEKVBLK"
//!      8     4  format version (FORMAT_VERSION)
//!     12     4  header length H (the data starts at H, a multiple of 64)
//!     16    32  key: BLAKE3 of everything below (BlockSpec::key)
//!     48    32  model fingerprint (BLAKE3 of the weights and configuration)
//!     80     1  scheme (0: alone from position 0, 1: after the prefix)
//!     81     1  dtype (0: f32, 1: bf16)
//!     82     2  zero
//!     84     4  start position of the block's first token
//!     88     4  layers
//!     92     4  KV heads
//!     96     4  head dim
//!    100     4  tokens N
//!    104     4  prefix tokens P
//!    108     4  encoder name length E
//!    112     E  encoder name (UTF-8: which forward pass computed the K and V, and its revision)
//!            4P prefix token ids, then 4N token ids, then zeros up to H
//!      H     D  data: for each layer, K then V, each [N, KV heads, head dim] row-major in dtype
//!    H+D    32  checksum: BLAKE3 of bytes 0..H+D
//! ```
//!
//! A reader always knows the block it wants (a [`BlockSpec`]), so every header field is compared
//! with what is expected before anything is allocated from it, and a block that is not exactly the
//! one asked for (another model, another prefix, a stale or corrupt file, a hash collision) is
//! refused. The data is streamed into the destination the caller provides (one read, no staging
//! copy) and checked against the checksum before the block is handed out.

use std::io::Read;

use super::StoreError;

/// Bumped whenever the layout above changes; a block of another version is not read.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"APEKVBLK";
/// Bytes of the fixed part of the header (up to the encoder name).
const FIXED: usize = 112;
/// The data starts at a multiple of this (cache lines; a memory-mapped reader may cast it).
const ALIGN: usize = 64;
/// The checksum's bytes at the end.
pub const CHECKSUM_BYTES: usize = 32;

/// How a block was encoded: part of what its K and V depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoredScheme {
    /// From position 0, attending to nothing before it (Block-Attention's blocks, every prefix).
    Alone = 0,
    /// After a prefix, at the positions that follow it (APE and parallel encoding's passages).
    AfterPrefix = 1,
}

/// The element type of the stored K and V.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoredDType {
    /// 4 bytes (the CPU forward pass).
    F32 = 0,
    /// 2 bytes (the GPU forward pass).
    BF16 = 1,
}

impl StoredDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StoredDType::F32 => 4,
            StoredDType::BF16 => 2,
        }
    }
}

/// How a forward pass's blocks are laid out in bytes: the same for every block of one model on
/// one backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockFormat {
    /// Which forward pass computes the K and V, with a revision that changes whenever its
    /// numerics change (a store must never serve a block computed differently).
    pub encoder: String,
    /// Element type.
    pub dtype: StoredDType,
    /// Layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dim.
    pub head_dim: usize,
}

impl BlockFormat {
    /// Bytes of one layer's K (or V) for `tokens` tokens.
    pub fn tensor_bytes(&self, tokens: usize) -> usize {
        tokens * self.kv_heads * self.head_dim * self.dtype.size()
    }

    /// Bytes of a block's data (every layer's K and V).
    pub fn data_bytes(&self, tokens: usize) -> usize {
        2 * self.layers * self.tensor_bytes(tokens)
    }
}

/// Everything a block's K and V depend on: what a reader asks for, and what a stored block's
/// header repeats.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockSpec {
    /// BLAKE3 of the model's weights and configuration.
    pub model: [u8; 32],
    /// Layout and the forward pass that computes it.
    pub format: BlockFormat,
    /// How it was encoded.
    pub scheme: StoredScheme,
    /// Position of the block's first token.
    pub pos: usize,
    /// The tokens it attended to before its own ([`StoredScheme::AfterPrefix`]; empty otherwise).
    pub prefix: Vec<u32>,
    /// Its own tokens.
    pub tokens: Vec<u32>,
}

fn u32_of(what: &str, n: usize) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::TooLarge(format!("{what} {n} does not fit 32 bits")))
}

impl BlockSpec {
    /// The header's bytes (up to the data, padded).
    fn header(&self, key: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
        let f = &self.format;
        let mut h = Vec::with_capacity(
            FIXED + f.encoder.len() + 4 * (self.prefix.len() + self.tokens.len()) + ALIGN,
        );
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // the length, set below
        h.extend_from_slice(key);
        h.extend_from_slice(&self.model);
        h.extend_from_slice(&[self.scheme as u8, f.dtype as u8, 0, 0]);
        for (what, n) in [
            ("position", self.pos),
            ("layers", f.layers),
            ("KV heads", f.kv_heads),
            ("head dim", f.head_dim),
            ("tokens", self.tokens.len()),
            ("prefix tokens", self.prefix.len()),
            ("encoder name length", f.encoder.len()),
        ] {
            h.extend_from_slice(&u32_of(what, n)?.to_le_bytes());
        }
        debug_assert_eq!(h.len(), FIXED);
        h.extend_from_slice(f.encoder.as_bytes());
        for t in self.prefix.iter().chain(&self.tokens) {
            h.extend_from_slice(&t.to_le_bytes());
        }
        h.resize(h.len().div_ceil(ALIGN) * ALIGN, 0);
        let len = u32_of("header length", h.len())?;
        h[12..16].copy_from_slice(&len.to_le_bytes());
        Ok(h)
    }

    /// The key: BLAKE3 of every field above, each length-delimited, under the format version.
    pub fn key(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"ape-attn kv block");
        h.update(&FORMAT_VERSION.to_le_bytes());
        h.update(&self.model);
        let f = &self.format;
        h.update(&(f.encoder.len() as u64).to_le_bytes());
        h.update(f.encoder.as_bytes());
        h.update(&[self.scheme as u8, f.dtype as u8]);
        for n in [
            self.pos,
            f.layers,
            f.kv_heads,
            f.head_dim,
            self.prefix.len(),
            self.tokens.len(),
        ] {
            h.update(&(n as u64).to_le_bytes());
        }
        for t in self.prefix.iter().chain(&self.tokens) {
            h.update(&t.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Bytes of the stored block: header, data, checksum.
    pub fn stored_bytes(&self) -> usize {
        // The header's length without building it.
        let vars = self.format.encoder.len() + 4 * (self.prefix.len() + self.tokens.len());
        (FIXED + vars).div_ceil(ALIGN) * ALIGN
            + self.format.data_bytes(self.tokens.len())
            + CHECKSUM_BYTES
    }

    /// The stored block of this spec with `data` (every layer's K then V, in the format's dtype).
    pub fn encode(&self, data: &[u8]) -> Result<Vec<u8>, StoreError> {
        let expected = self.format.data_bytes(self.tokens.len());
        if data.len() != expected {
            return Err(StoreError::Corrupt(format!(
                "{} bytes of K and V given, the format needs {expected}",
                data.len()
            )));
        }
        let mut out = self.header(&self.key())?;
        out.reserve_exact(data.len() + CHECKSUM_BYTES);
        out.extend_from_slice(data);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        Ok(out)
    }
}

/// Reads one stored block of a known spec: the header is checked at [`BlockReader::open`], the
/// data is read into the caller's buffers by [`BlockReader::fill`], and [`BlockReader::finish`]
/// checks the checksum and that nothing follows. A block is valid only once `finish` succeeds.
pub struct BlockReader<R> {
    src: R,
    hasher: blake3::Hasher,
    remaining: usize,
}

impl<R: Read> BlockReader<R> {
    /// Reads and checks the header of the block in `src` against `spec`.
    pub fn open(mut src: R, spec: &BlockSpec) -> Result<Self, StoreError> {
        let key = spec.key();
        let expected = spec.header(&key)?;
        let mut fixed = [0u8; FIXED];
        read_exact(&mut src, &mut fixed)?;
        if &fixed[..8] != MAGIC {
            return Err(StoreError::Corrupt("not a stored block (bad magic)".into()));
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(StoreError::Corrupt(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        if fixed[16..48] != key {
            return Err(StoreError::Corrupt(
                "the header's key is another block's".into(),
            ));
        }
        if fixed[..] != expected[..FIXED] {
            return Err(StoreError::Corrupt(
                "the header does not describe the block asked for (model, scheme, dtype or layout)"
                    .into(),
            ));
        }
        // The rest of the header has the length the spec implies (checked above through H).
        let mut rest = vec![0u8; expected.len() - FIXED];
        read_exact(&mut src, &mut rest)?;
        if rest[..] != expected[FIXED..] {
            return Err(StoreError::Corrupt(
                "the header's encoder or tokens are not the block asked for".into(),
            ));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&expected);
        Ok(Self {
            src,
            hasher,
            remaining: spec.format.data_bytes(spec.tokens.len()),
        })
    }

    /// Reads the next `dst.len()` bytes of the data into `dst`.
    pub fn fill(&mut self, dst: &mut [u8]) -> Result<(), StoreError> {
        if dst.len() > self.remaining {
            return Err(StoreError::Corrupt(format!(
                "{} bytes asked for, {} left in the block",
                dst.len(),
                self.remaining
            )));
        }
        read_exact(&mut self.src, dst)?;
        self.hasher.update(dst);
        self.remaining -= dst.len();
        Ok(())
    }

    /// Checks that all the data was read, the checksum, and that the block ends there.
    pub fn finish(mut self) -> Result<(), StoreError> {
        if self.remaining != 0 {
            return Err(StoreError::Corrupt(format!(
                "{} bytes of data not read",
                self.remaining
            )));
        }
        let mut sum = [0u8; CHECKSUM_BYTES];
        read_exact(&mut self.src, &mut sum)?;
        if sum != *self.hasher.finalize().as_bytes() {
            return Err(StoreError::Corrupt("checksum mismatch".into()));
        }
        let mut extra = [0u8; 1];
        match self.src.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(StoreError::Corrupt("bytes after the checksum".into())),
            Err(e) => Err(StoreError::Io(e)),
        }
    }
}

/// `read_exact`, with a short read reported as a truncated block.
fn read_exact(src: &mut impl Read, buf: &mut [u8]) -> Result<(), StoreError> {
    src.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StoreError::Corrupt("truncated".into()),
        _ => StoreError::Io(e),
    })
}

/// Reads a whole stored block of `spec` from `bytes` into a new buffer (tests, fuzzing; the tiers
/// read into the model's own buffers).
pub fn decode(bytes: &[u8], spec: &BlockSpec) -> Result<Vec<u8>, StoreError> {
    let mut r = BlockReader::open(bytes, spec)?;
    let mut data = vec![0u8; spec.format.data_bytes(spec.tokens.len())];
    r.fill(&mut data)?;
    r.finish()?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(tokens: Vec<u32>) -> BlockSpec {
        BlockSpec {
            model: [7; 32],
            format: BlockFormat {
                encoder: "test-f32-1".into(),
                dtype: StoredDType::F32,
                layers: 2,
                kv_heads: 1,
                head_dim: 4,
            },
            scheme: StoredScheme::AfterPrefix,
            pos: 3,
            prefix: vec![1, 2, 3],
            tokens,
        }
    }

    fn data(s: &BlockSpec) -> Vec<u8> {
        (0..s.format.data_bytes(s.tokens.len()))
            .map(|i| (i * 31 % 251) as u8)
            .collect()
    }

    #[test]
    fn a_block_reads_back_as_written_and_its_size_is_known_ahead() {
        let s = spec(vec![10, 11, 12, 13, 14]);
        let d = data(&s);
        let stored = s.encode(&d).expect("encode");
        assert_eq!(stored.len(), s.stored_bytes());
        assert_eq!(decode(&stored, &s).expect("decode"), d);
        // The data starts aligned.
        let h = u32::from_le_bytes(stored[12..16].try_into().unwrap()) as usize;
        assert_eq!(h % ALIGN, 0);
        assert_eq!(&stored[h..h + d.len()], &d[..]);
    }

    #[test]
    fn every_field_of_the_spec_changes_the_key_and_is_refused_by_the_other_spec() {
        let s = spec(vec![10, 11, 12]);
        let stored = s.encode(&data(&s)).expect("encode");
        let mut others = Vec::new();
        let mut o = s.clone();
        o.model[31] ^= 1;
        others.push(o);
        let mut o = s.clone();
        o.format.encoder.push('x');
        others.push(o);
        let mut o = s.clone();
        o.scheme = StoredScheme::Alone;
        others.push(o);
        let mut o = s.clone();
        o.pos += 1;
        others.push(o);
        let mut o = s.clone();
        o.prefix.pop();
        others.push(o);
        let mut o = s.clone();
        o.tokens[1] += 1;
        others.push(o);
        let mut o = s.clone();
        o.format.head_dim = 2;
        o.format.kv_heads = 2;
        others.push(o);
        // Same data size, another dtype: f32 over 4 dims is bf16 over 8.
        let mut o = s.clone();
        o.format.dtype = StoredDType::BF16;
        o.format.head_dim = 8;
        others.push(o);
        // The token moved from the prefix to the block: same concatenation, another block.
        let mut o = s.clone();
        o.tokens.insert(0, o.prefix.pop().unwrap());
        others.push(o);
        for o in &others {
            assert_ne!(o.key(), s.key(), "{o:?}");
            assert!(
                matches!(decode(&stored, o), Err(StoreError::Corrupt(_))),
                "{o:?}"
            );
        }
    }

    #[test]
    fn truncation_and_every_flipped_byte_are_caught() {
        let s = spec(vec![10, 11, 12]);
        let stored = s.encode(&data(&s)).expect("encode");
        for cut in 0..stored.len() {
            assert!(decode(&stored[..cut], &s).is_err(), "cut at {cut}");
        }
        let mut longer = stored.clone();
        longer.push(0);
        assert!(decode(&longer, &s).is_err());
        for i in 0..stored.len() {
            for bit in [0x01, 0x80] {
                let mut bad = stored.clone();
                bad[i] ^= bit;
                assert!(
                    matches!(decode(&bad, &s), Err(StoreError::Corrupt(_))),
                    "byte {i} bit {bit:#x}"
                );
            }
        }
    }

    #[test]
    fn data_of_the_wrong_size_is_not_encoded() {
        let s = spec(vec![1]);
        assert!(s.encode(&[0u8; 3]).is_err());
    }
}
