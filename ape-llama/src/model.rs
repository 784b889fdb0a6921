//! The model API shared by the CPU and (later) GPU forward passes, so that the encoding modes,
//! generation and tests are written once.

use super::config::LlamaConfig;
use ape_attn::{ApeParams, SegmentRole};
use ape_attn::{Error, Result};

/// Which rows of a forward pass get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// None (context encoding only fills the cache).
    None,
    /// The last token's row.
    Last,
    /// Every row.
    All,
}

/// A cached block's K/V used by a forward pass, with where its keys sit and how they are masked.
#[derive(Debug)]
pub struct Past<'a, B> {
    /// The block.
    pub kv: &'a B,
    /// Absolute position of the block's first token.
    pub pos_offset: usize,
    /// `Context` (every row sees every key) or `Causal` (masked by position).
    pub role: SegmentRole,
}

impl<B> Clone for Past<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Past<'_, B> {}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ForwardOutput<B> {
    /// Logits of the requested rows, `[rows, vocab]`.
    pub logits: Vec<f32>,
    /// K and V of the new tokens, every layer (keys already rotated to their positions).
    pub kv: B,
}

/// One sequence's share of a batched forward pass ([`LlamaModel::forward_batch`]): its new tokens
/// at positions `pos..pos + tokens.len()`, the blocks they attend to, its APE parameters and which
/// of its rows get logits.
#[derive(Debug)]
pub struct Step<'a, B> {
    /// The new tokens.
    pub tokens: &'a [u32],
    /// Position of the first new token.
    pub pos: usize,
    /// The cached blocks this sequence attends to (its own earlier tokens included).
    pub past: &'a [Past<'a, B>],
    /// Its APE correction (`ApeParams::plain()` for plain attention).
    pub ape: ApeParams,
    /// Which of its rows get logits.
    pub logits: LogitRows,
}

impl<B> Clone for Step<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Step<'_, B> {}

/// A Llama forward pass over new tokens that attend to cached blocks in place.
pub trait LlamaModel {
    /// The K/V of a run of tokens across all layers: what the block cache stores.
    type Block: KvBlock;

    /// The model's shape.
    fn config(&self) -> &LlamaConfig;

    /// Runs `tokens` at positions `pos..pos + tokens.len()`. Every layer's attention sees the
    /// `past` blocks (read in place) and the new tokens' own keys (causal), with the APE correction
    /// `ape` (`ApeParams::plain()` for plain attention).
    fn forward(
        &self,
        tokens: &[u32],
        pos: usize,
        past: &[Past<'_, Self::Block>],
        ape: &ApeParams,
        logits: LogitRows,
    ) -> Result<ForwardOutput<Self::Block>>;

    /// Several sequences' forward passes as one: every row of every sequence goes through each
    /// weight matrix together (a batch of decode steps reads the weights once), while each
    /// sequence's rows attend only to its own `past` and its own new tokens. The outputs are in
    /// the order of `steps`, each as [`LlamaModel::forward`] would return it for that sequence
    /// alone (up to the rounding of a different summation order in the matrix products). An
    /// invalid step fails the whole call before any work.
    ///
    /// The default runs the sequences one after another.
    fn forward_batch(
        &self,
        steps: &[Step<'_, Self::Block>],
    ) -> Result<Vec<ForwardOutput<Self::Block>>> {
        steps
            .iter()
            .map(|s| self.forward(s.tokens, s.pos, s.past, &s.ape, s.logits))
            .collect()
    }

    /// The block with its keys re-rotated by `delta` positions (Block-Attention: a block prefilled
    /// at position 0 moved to its real offset). Values are unchanged.
    fn shift_block(&self, block: &Self::Block, delta: i64) -> Result<Self::Block>;

    /// The bytes [`KvBlock::bytes`] reports for a freshly encoded block of `n_tokens` tokens: the
    /// cache refuses a block it cannot hold before encoding it.
    fn block_bytes(&self, n_tokens: usize) -> usize;

    /// Appends `more`'s tokens to `block` (the question's keys growing during generation).
    fn append_block(&self, block: &mut Self::Block, more: Self::Block) -> Result<()>;

    /// How this pass's blocks are stored ([`crate::store`]): the dtype and layout of their K and
    /// V, and the name of the computation with a revision that changes whenever its numerics do,
    /// so that a store never serves a block this pass would not have computed.
    fn block_format(&self) -> BlockFormat;

    /// A freshly encoded block's K and V in the stored layout: for each layer, K then V, each
    /// `[len, n_kv_heads, head_dim]` row-major in [`BlockFormat::dtype`].
    fn save_block(&self, block: &Self::Block) -> Result<Vec<u8>>;

    /// A block of `n_tokens` tokens from stored data in the layout of [`LlamaModel::save_block`]:
    /// `fill` is called with the block's own buffers in order and fills them (one read into the
    /// destination).
    fn load_block(&self, n_tokens: usize, fill: &mut Fill<'_>) -> Result<Self::Block>;
}

pub use crate::store::{BlockFormat, Fill};

pub use crate::cache::KvBlock;

/// The checks every forward pass makes before any work: the new tokens and every past block fit
/// the model's window, and every token id is in the vocabulary.
pub fn check_inputs<B: KvBlock>(
    c: &LlamaConfig,
    tokens: &[u32],
    pos: usize,
    past: &[Past<'_, B>],
) -> Result<()> {
    let end = past
        .iter()
        .map(|p| p.pos_offset + p.kv.len())
        .chain([pos + tokens.len()])
        .max()
        .unwrap_or(0);
    if end > c.context_length {
        return Err(Error::OutOfRange(format!(
            "context of {end} positions exceeds the model's window of {}",
            c.context_length
        )));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(Error::OutOfRange(format!(
            "token id {t} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    Ok(())
}
