//! Where a model's weights come from: one loader for every file format, which asks a source for
//! each tensor by its role, as f32 row-major `[out, in]` (vectors `[n]`).

use ape_attn::Result;

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
    /// Whether the file holds the tensor (only [`Weight::Output`] is optional).
    fn has(&self, w: Weight) -> bool;
}

/// GGUF `llama` names; GGUF dims list the contiguous dim first, so `[out, in]` is `[in, out]`.
impl WeightSource for super::gguf::Gguf {
    fn load(&self, w: Weight, shape: &[usize]) -> Result<Vec<f32>> {
        let dims: Vec<usize> = shape.iter().rev().copied().collect();
        self.tensor_f32(&gguf_name(w), &dims)
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
