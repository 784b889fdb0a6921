//! Llama hyper-parameters, read and validated from a model file's metadata.

use super::gguf::Gguf;
use ape_attn::{AttentionDims, RopeConfig, RopeLayout};
use ape_attn::{Error, Result};

/// The shape of a Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Hidden size.
    pub dim: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head (`dim / n_heads`).
    pub head_dim: usize,
    /// Feed-forward hidden size.
    pub hidden_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// The longest context the model was trained for.
    pub context_length: usize,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Model(msg.into())
}

impl LlamaConfig {
    /// Reads the `llama.*` metadata of a GGUF file. GGUF `llama` files store Q and K permuted for
    /// llama.cpp's interleaved RoPE, so the layout is [`RopeLayout::Interleaved`].
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(bad(format!(
                "unsupported architecture {arch:?} (only \"llama\" is supported)"
            )));
        }
        let get = |key: &str| -> Result<usize> {
            let v = g.get_u64(&format!("llama.{key}"))?;
            usize::try_from(v).map_err(|_| bad(format!("llama.{key} = {v} is too large")))
        };
        let dim = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = match g.metadata.get("llama.attention.head_count_kv") {
            Some(_) => get("attention.head_count_kv")?,
            None => n_heads,
        };
        if n_heads == 0 || dim % n_heads != 0 {
            return Err(bad(format!(
                "embedding_length {dim} is not a multiple of head_count {n_heads}"
            )));
        }
        let head_dim = dim / n_heads;
        if let Some(v) = g.metadata.get("llama.rope.dimension_count") {
            if v.as_u64() != Some(head_dim as u64) {
                return Err(bad(format!(
                    "rope.dimension_count {v:?} differs from the head dim {head_dim} (partial RoPE is not supported)"
                )));
            }
        }
        let vocab_size = match g.metadata.get("llama.vocab_size") {
            Some(_) => get("vocab_size")?,
            None => g
                .get("tokenizer.ggml.tokens")?
                .as_array()
                .map(|a| a.len())
                .ok_or_else(|| bad("tokenizer.ggml.tokens is not an array"))?,
        };
        let base = match g.metadata.get("llama.rope.freq_base") {
            Some(_) => g.get_f64("llama.rope.freq_base")?,
            None => 10_000.0,
        };
        let rms_eps = g.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32;
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(bad(format!(
                "layer_norm_rms_epsilon {rms_eps} must be finite and > 0"
            )));
        }
        let cfg = Self {
            dim,
            n_layers: get("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            hidden_dim: get("feed_forward_length")?,
            vocab_size,
            rms_eps,
            rope: RopeConfig::new(head_dim, base, RopeLayout::Interleaved)?,
            context_length: get("context_length")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks a shape read from a model file: a valid head layout, and no zero layer count,
    /// FFN width, vocabulary or window.
    pub fn validate(&self) -> Result<()> {
        self.attention_dims()?;
        if self.n_layers == 0
            || self.hidden_dim == 0
            || self.vocab_size == 0
            || self.context_length == 0
        {
            return Err(bad(format!("degenerate model shape {self:?}")));
        }
        // Every size the model computes from its shape must be representable: the weights'
        // element counts and the K and V of a full window in f32.
        let sizes = [
            self.vocab_size.checked_mul(self.dim),
            self.hidden_dim.checked_mul(self.dim),
            self.dim.checked_mul(self.dim),
            [2, self.n_layers, self.context_length, self.kv_dim(), 4]
                .into_iter()
                .try_fold(1usize, usize::checked_mul),
        ];
        if sizes.iter().any(Option::is_none) {
            return Err(bad(format!(
                "model shape {self:?} is too large: its sizes overflow"
            )));
        }
        Ok(())
    }

    /// The attention head layout.
    pub fn attention_dims(&self) -> Result<AttentionDims> {
        AttentionDims::new(self.n_heads, self.n_kv_heads, self.head_dim)
    }

    /// Width of the K (and V) projection: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes of the K and V of `n_tokens` tokens across every layer, `elem_bytes` per value: a
    /// cached block's size.
    /// Saturates rather than overflows (a validated shape does not overflow up to its window in
    /// f32; a saturated size is refused by any budget).
    pub fn kv_bytes(&self, n_tokens: usize, elem_bytes: usize) -> usize {
        [self.n_layers, n_tokens, self.kv_dim(), elem_bytes]
            .into_iter()
            .fold(2usize, usize::saturating_mul)
    }
}
