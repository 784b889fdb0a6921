//! Where a model's weights come from: one loader for every file format, which asks a source for
//! each tensor by its role, as f32 row-major `[out, in]` (vectors `[n]`).

use std::ops::{Deref, Range};
use std::sync::Arc;

use ape_attn::Result;

use super::quant::GgmlType;

/// Bytes of a tensor (or a whole model file): owned, or a window of a memory-mapped file that
/// stays mapped while any window of it lives.
#[derive(Clone)]
pub struct TensorBytes {
    store: Store,
    range: Range<usize>,
}

#[derive(Clone)]
enum Store {
    Owned(Arc<Vec<u8>>),
    Mapped(Arc<memmap2::Mmap>),
}

impl TensorBytes {
    /// The whole of `file`, mapped read-only.
    pub fn map(file: &std::fs::File) -> std::io::Result<Self> {
        // SAFETY: the mapping is read-only and private to this process's view; the data is only
        // ever read as bytes. A file truncated or rewritten while mapped is outside what the
        // program can guard against (the documented contract of `Gguf::open`).
        let map = unsafe { memmap2::Mmap::map(file)? };
        let len = map.len();
        Ok(Self {
            store: Store::Mapped(Arc::new(map)),
            range: 0..len,
        })
    }

    /// The bytes `range` of these (relative to their start), sharing the mapping when mapped.
    ///
    /// Panics if `range` is not within them (callers pass ranges their parser has checked).
    pub fn window(&self, range: Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.len());
        let abs = self.range.start + range.start..self.range.start + range.end;
        match &self.store {
            Store::Mapped(_) => Self {
                store: self.store.clone(),
                range: abs,
            },
            // A window of owned bytes is copied, so a small tensor does not keep a whole file's
            // buffer alive.
            Store::Owned(v) => Self::from(v[abs].to_vec()),
        }
    }

    /// Tells the kernel this process no longer needs the mapped pages wholly inside these bytes
    /// (`MADV_DONTNEED` on a read-only file mapping: they leave the process's resident set and
    /// stay in the page cache; a later read faults them back in from the file). Nothing for
    /// owned bytes, or where the advice is not supported.
    pub fn release(&self) {
        if let Store::Mapped(m) = &self.store {
            let page = 4096;
            let start = self.range.start.div_ceil(page) * page;
            let end = self.range.end / page * page;
            if end > start {
                // SAFETY: the mapping is a read-only view of a file that nothing in this process
                // writes: after DONTNEED a read of these bytes faults the file's contents back in,
                // so every slice handed out still reads the same bytes, and no pointer into the
                // range is invalidated (the range stays mapped).
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
    }

    /// Whether the bytes are a window of a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.store, Store::Mapped(_))
    }
}

impl From<Vec<u8>> for TensorBytes {
    fn from(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            store: Store::Owned(Arc::new(v)),
            range: 0..len,
        }
    }
}

impl Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.store {
            Store::Owned(v) => &v[self.range.clone()],
            Store::Mapped(m) => &m[self.range.clone()],
        }
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorBytes")
            .field("len", &self.len())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

/// A tensor as stored in its file: its element type and its bytes, rows contiguous.
#[derive(Clone, Debug)]
pub struct RawTensor {
    /// The element type.
    pub ty: GgmlType,
    /// The bytes.
    pub data: TensorBytes,
}

/// A Llama tensor by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    /// Token embedding `[vocab, dim]`.
    Embedding,
    /// Final RMSNorm weight `[dim]`.
    OutputNorm,
    /// Output projection `[vocab, dim]` (absent when tied to the embedding).
    Output,
    /// Layer `l`'s attention RMSNorm weight.
    AttnNorm(usize),
    /// Layer `l`'s query projection.
    Q(usize),
    /// Layer `l`'s key projection.
    K(usize),
    /// Layer `l`'s value projection.
    V(usize),
    /// Layer `l`'s attention output projection.
    O(usize),
    /// Layer `l`'s feed-forward RMSNorm weight.
    FfnNorm(usize),
    /// Layer `l`'s gate projection.
    Gate(usize),
    /// Layer `l`'s up projection.
    Up(usize),
    /// Layer `l`'s down projection.
    Down(usize),
}

/// A model file format.
pub trait WeightSource {
    /// The tensor as f32, checked to have `shape` (`[out, in]` or `[n]`).
    fn load(&self, w: Weight, shape: &[usize]) -> Result<Vec<f32>>;
    /// The tensor in its file's element type (no conversion), checked to have `shape`.
    fn load_raw(&self, w: Weight, shape: &[usize]) -> Result<RawTensor>;
    /// Whether the file holds the tensor (only [`Weight::Output`] is optional).
    fn has(&self, w: Weight) -> bool;
}

/// GGUF `llama` names; GGUF dims list the contiguous dim first, so `[out, in]` is `[in, out]`.
impl WeightSource for super::gguf::Gguf {
    fn load(&self, w: Weight, shape: &[usize]) -> Result<Vec<f32>> {
        let dims: Vec<usize> = shape.iter().rev().copied().collect();
        self.tensor_f32(&gguf_name(w), &dims)
    }

    fn load_raw(&self, w: Weight, shape: &[usize]) -> Result<RawTensor> {
        let dims: Vec<usize> = shape.iter().rev().copied().collect();
        let name = gguf_name(w);
        let info = self.tensor(&name)?;
        if info.dims != dims {
            return Err(ape_attn::Error::Model(format!(
                "{name} has dims {:?}, expected {dims:?}",
                info.dims
            )));
        }
        Ok(RawTensor {
            ty: info.ty,
            data: self.raw_shared(info),
        })
    }

    fn has(&self, w: Weight) -> bool {
        self.tensors.contains_key(&gguf_name(w))
    }
}

/// GGUF `llama` names.
pub fn gguf_name(w: Weight) -> String {
    match w {
        Weight::Embedding => "token_embd.weight".into(),
        Weight::OutputNorm => "output_norm.weight".into(),
        Weight::Output => "output.weight".into(),
        Weight::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
        Weight::Q(l) => format!("blk.{l}.attn_q.weight"),
        Weight::K(l) => format!("blk.{l}.attn_k.weight"),
        Weight::V(l) => format!("blk.{l}.attn_v.weight"),
        Weight::O(l) => format!("blk.{l}.attn_output.weight"),
        Weight::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
        Weight::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
        Weight::Up(l) => format!("blk.{l}.ffn_up.weight"),
        Weight::Down(l) => format!("blk.{l}.ffn_down.weight"),
    }
}

/// Hugging Face Llama names (`LlamaForCausalLM`).
pub fn hf_name(w: Weight) -> String {
    match w {
        Weight::Embedding => "model.embed_tokens.weight".into(),
        Weight::OutputNorm => "model.norm.weight".into(),
        Weight::Output => "lm_head.weight".into(),
        Weight::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
        Weight::Q(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
        Weight::K(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
        Weight::V(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
        Weight::O(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
        Weight::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
        Weight::Gate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
        Weight::Up(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
        Weight::Down(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
    }
}
