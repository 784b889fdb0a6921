//! The four encoding modes, for prefill and generation, over the block cache (docs/DESIGN.md §2.4):
//!
//! - **Sequential**: one causal prefill of `[prefix, C_1..C_N, question]` at contiguous positions,
//!   nothing cached (the baseline).
//! - **Parallel**: APE's positions with `T = S = 1`.
//! - **APE**: the prefix at `0..P`; each context encoded after the prefix at `P..P+L_i` (cached,
//!   independent of `T` and `S`); the question at `P + max L_i` attends to the prefix and its own
//!   tokens (causal) and to all contexts with the temperature and scaling correction, at the
//!   question's prefill and at every decode step.
//! - **Block-Attention**: every block (the prefix, each context) encoded alone from position 0
//!   (cached); at use, block `b`'s keys are re-rotated to `o_b = sum_{j<b} L_j`; the question starts
//!   at `sum_j L_j` and attends to everything with plain softmax.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::model::{LlamaModel, LogitRows, Past, Step};
use super::tokenizer::Tokenizer;
use crate::cache::{BlockCache, BlockKey, Scheme};
use crate::store::{BlockSpec, BlockStore, Source, StoredScheme};
use ape_attn::{ApeParams, SegmentRole};
use ape_attn::{Error, Result};

/// How the contexts are encoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Everything prefilled as one sequence on every request.
    Sequential,
    /// Contexts cached after the shared prefix, plain attention (`T = S = 1`).
    Parallel,
    /// Contexts cached after the shared prefix, APE's temperature and scaling.
    Ape(ApeParams),
    /// Blocks cached alone from position 0 and re-rotated to their offsets.
    BlockAttention,
}

impl Mode {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Sequential => "sequential",
            Mode::Parallel => "parallel",
            Mode::Ape(_) => "ape",
            Mode::BlockAttention => "block-attention",
        }
    }

    fn ape(&self) -> ApeParams {
        match self {
            Mode::Ape(p) => *p,
            _ => ApeParams::plain(),
        }
    }
}

/// A prompt in parts: the shared prefix, the contexts (passages, in order) and the question.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt {
    /// Shared prefix (system prompt, chat header).
    pub prefix: Vec<u32>,
    /// Contexts.
    pub contexts: Vec<Vec<u32>>,
    /// The question (and the assistant header that follows it).
    pub question: Vec<u32>,
}

impl Prompt {
    /// The chat prompt of a question over passages (ChatML, the default model's template): the
    /// system turn and the user header as the prefix, each passage's text as one context, and
    /// the question with the assistant header. Passages and the question are encoded as text, so
    /// control tokens written in them stay characters and cannot close the user's turn.
    pub fn chat(
        tok: &Tokenizer,
        system: &str,
        passages: &[String],
        question: &str,
    ) -> Result<Self> {
        if question.trim().is_empty() {
            return Err(Error::InvalidInput("the question is empty".into()));
        }
        Ok(Self {
            prefix: tok.encode_start(&format!(
                "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
            ))?,
            contexts: passages
                .iter()
                .map(|p| tok.encode_text(p))
                .collect::<Result<_>>()?,
            question: [
                tok.encode_text(&format!("Question: {question}"))?,
                tok.encode("<|im_end|>\n<|im_start|>assistant\n")?,
            ]
            .concat(),
        })
    }
}

/// A prefilled request, ready to decode: the blocks it reads (pinned while this lives), the
/// question's growing block, and the last logits.
pub struct Prefilled<B> {
    blocks: Vec<(Arc<B>, usize, SegmentRole)>,
    /// Cached blocks the request reads through shifted views (Block-Attention): held so that the
    /// cache sees them in use, and neither evicts them nor forgets their bytes, until the request
    /// ends.
    _pinned: Vec<Arc<B>>,
    tail: B,
    tail_pos: usize,
    next_pos: usize,
    ape: ApeParams,
    /// Logits of the last position.
    pub logits: Vec<f32>,
    /// Tokens encoded by this request (cache misses and the question), for reporting.
    pub tokens_encoded: usize,
    /// Where each cached block this request read came from, in prompt order.
    pub sources: Vec<BlockSource>,
}

/// Which part of the prompt a cached block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The shared prefix.
    Prefix,
    /// Context `i` (0-based, in the prompt's order).
    Context(usize),
}

/// Where one block of a request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSource {
    /// Which part of the prompt.
    pub part: Part,
    /// Its tokens.
    pub tokens: usize,
    /// The tier it was read from, or [`Source::Encoded`].
    pub source: Source,
}

impl<B> Prefilled<B> {
    /// The position the next token goes to.
    pub fn next_pos(&self) -> usize {
        self.next_pos
    }

    /// What the next tokens attend to: the cached blocks and the question's own block.
    fn past(&self) -> Vec<Past<'_, B>> {
        let mut past: Vec<Past<'_, B>> = self
            .blocks
            .iter()
            .map(|(b, pos, role)| Past {
                kv: b.as_ref(),
                pos_offset: *pos,
                role: *role,
            })
            .collect();
        past.push(Past {
            kv: &self.tail,
            pos_offset: self.tail_pos,
            role: SegmentRole::Causal,
        });
        past
    }
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Sample from `softmax(logits / temperature)` with a seeded generator.
    Temperature {
        /// Finite and > 0.
        temperature: f32,
        /// Seed of the generator.
        seed: u64,
    },
}

/// What a generation produced and how long it took.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated token ids (without the stop token).
    pub tokens: Vec<u32>,
    /// Time to first token: from the request to the first token's logits (context encoding on
    /// cache misses included).
    pub ttft: Duration,
    /// Time of the decode steps after the first token.
    pub decode_time: Duration,
    /// Tokens encoded by the prefill (cache misses and the question).
    pub tokens_encoded: usize,
    /// Generation stopped because the model's window was full (not at a stop token or the token
    /// limit).
    pub window_full: bool,
    /// Where each cached block came from, in prompt order (empty in sequential mode).
    pub sources: Vec<BlockSource>,
}

/// A model with its block cache, and the block store below it.
pub struct Engine<M: LlamaModel> {
    /// The model.
    pub model: M,
    /// Cached blocks (the memory tier).
    pub cache: BlockCache<M::Block>,
    model_id: String,
    store: Option<Arc<BlockStore>>,
    on_encode: Option<Box<dyn FnMut(usize) + Send>>,
}

impl<M: LlamaModel> std::fmt::Debug for Engine<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model_id", &self.model_id)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl<M: LlamaModel> Engine<M> {
    /// An engine whose cache holds at most `cache_bytes`; `model_id` names the weights (it is part
    /// of every cache key).
    pub fn new(model: M, model_id: impl Into<String>, cache_bytes: usize) -> Self {
        Self {
            model,
            cache: BlockCache::new(cache_bytes),
            model_id: model_id.into(),
            store: None,
            on_encode: None,
        }
    }

    /// The engine with `store` below its memory cache: a miss in memory reads the block from
    /// the store's tiers before encoding it, and what is encoded is written to them.
    pub fn with_store(mut self, store: Arc<BlockStore>) -> Self {
        self.set_store(Some(store));
        self
    }

    /// Replaces the block store (`None`: memory only).
    pub fn set_store(&mut self, store: Option<Arc<BlockStore>>) {
        self.store = store.filter(|s| !s.is_empty());
    }

    /// The block store, if any.
    pub fn store(&self) -> Option<&Arc<BlockStore>> {
        self.store.as_ref()
    }

    /// Calls `f(tokens)` after each block is encoded on a cache miss (for progress bars).
    pub fn on_encode(&mut self, f: impl FnMut(usize) + Send + 'static) {
        self.on_encode = Some(Box::new(f));
    }

    /// The block for `tokens` encoded by `scheme`: from memory, from the store, or encoded now
    /// at `pos` after `prefix` (whose block, for [`Scheme::AfterPrefix`], is `prefix_block`) and
    /// written to the store. Says where it came from.
    fn cached(
        &mut self,
        scheme: Scheme,
        prefix: (&[u32], Option<&Arc<M::Block>>),
        tokens: &[u32],
        pos: usize,
        encoded: &mut usize,
        chunks: &mut Chunks<'_, M>,
    ) -> Result<(Arc<M::Block>, Source)> {
        let (prefix, prefix_block) = prefix;
        let key = BlockKey {
            model: self.model_id.clone(),
            scheme,
            prefix: prefix.to_vec(),
            tokens: tokens.to_vec(),
        };
        let model_id = self.model_id.as_str();
        let model = &self.model;
        let store = self.store.as_deref();
        let mut source = Source::Memory;
        let expected = model.block_bytes(tokens.len());
        let mut encode = || -> Result<M::Block> {
            let past: Vec<Past<'_, M::Block>> = prefix_block
                .into_iter()
                .map(|b| Past {
                    kv: b.as_ref(),
                    pos_offset: 0,
                    role: SegmentRole::Causal,
                })
                .collect();
            Ok(chunks
                .forward(
                    model,
                    tokens,
                    pos,
                    &past,
                    &ApeParams::plain(),
                    LogitRows::None,
                )?
                .kv)
        };
        let block = self.cache.get_or_encode(key, expected, || {
            let Some(store) = store else {
                source = Source::Encoded;
                return encode();
            };
            // What the block's K and V depend on: the store's key.
            let spec = &BlockSpec {
                model: model_fingerprint(model_id),
                format: model.block_format(),
                scheme: match scheme {
                    Scheme::Alone => StoredScheme::Alone,
                    Scheme::AfterPrefix => StoredScheme::AfterPrefix,
                },
                pos,
                prefix: prefix.to_vec(),
                tokens: tokens.to_vec(),
            };
            let mut build =
                |fill: &mut crate::store::Fill<'_>| model.load_block(tokens.len(), fill);
            if let Some((b, from)) = store.load(spec, &mut build) {
                source = from;
                return Ok(b);
            }
            // Encode it once: wait for whoever else is encoding it, then look again.
            let claim = store.claim(spec);
            if claim.waited() {
                if let Some((b, from)) = store.load(spec, &mut build) {
                    source = from;
                    return Ok(b);
                }
            }
            let b = encode()?;
            source = Source::Encoded;
            match model.save_block(&b) {
                Ok(data) => store.save(spec, &data, claim),
                Err(e) => crate::store::warn(format!("block not stored: {e}")),
            }
            Ok(b)
        })?;
        if source == Source::Encoded {
            *encoded += tokens.len();
            if let Some(f) = self.on_encode.as_mut() {
                f(tokens.len());
            }
        }
        Ok((block, source))
    }

    /// Prefills `prompt` in `mode`: contexts come from the cache (encoded on a miss), the question
    /// is run over them; returns the state to decode from, with the last position's logits.
    pub fn prefill(&mut self, mode: Mode, prompt: &Prompt) -> Result<Prefilled<M::Block>> {
        self.prefill_chunked(mode, prompt, usize::MAX, &mut |_| Ok(()))
    }

    /// [`Engine::prefill`] with every forward pass cut into pieces of at most `chunk` tokens (a
    /// block's or the question's later pieces attend to its earlier ones, as decode steps do), and
    /// `between(model)` called between two pieces: a server runs its other sequences' decode step
    /// there, so that a long prompt holds them up for at most one piece at a time. The blocks and
    /// logits are those of an unchunked prefill up to the rounding of the split attention. An
    /// error from `between` ends the prefill with that error (a client that left); what was
    /// encoded of an unfinished block is dropped, finished blocks stay cached.
    pub fn prefill_chunked(
        &mut self,
        mode: Mode,
        prompt: &Prompt,
        chunk: usize,
        between: &mut dyn FnMut(&M) -> Result<()>,
    ) -> Result<Prefilled<M::Block>> {
        let chunks = &mut Chunks {
            size: chunk.max(1),
            between,
            started: false,
        };
        if prompt.question.is_empty() {
            return Err(Error::InvalidInput("the question has no tokens".into()));
        }
        // Reject a request that does not fit the window before encoding anything.
        let lens = prompt.contexts.iter().map(Vec::len);
        let needed = prompt.question.len()
            + match mode {
                Mode::Parallel | Mode::Ape(_) => prompt.prefix.len() + lens.max().unwrap_or(0),
                Mode::Sequential | Mode::BlockAttention => {
                    prompt.prefix.len() + lens.sum::<usize>()
                }
            };
        let window = self.model.config().context_length;
        if needed > window {
            return Err(Error::OutOfRange(format!(
                "the {} request needs {needed} positions, more than the model's window of {window}",
                mode.name()
            )));
        }
        let ape = mode.ape();
        let mut encoded = 0;
        let mut blocks: Vec<(Arc<M::Block>, usize, SegmentRole)> = Vec::new();
        let mut pinned: Vec<Arc<M::Block>> = Vec::new();
        let mut sources = Vec::new();
        let q_pos = match mode {
            Mode::Sequential => {
                let mut all = prompt.prefix.clone();
                prompt.contexts.iter().for_each(|c| all.extend(c));
                all.extend(&prompt.question);
                let out = chunks.forward(&self.model, &all, 0, &[], &ape, LogitRows::Last)?;
                return Ok(Prefilled {
                    blocks,
                    _pinned: Vec::new(),
                    tail: out.kv,
                    tail_pos: 0,
                    next_pos: all.len(),
                    ape,
                    logits: out.logits,
                    tokens_encoded: all.len(),
                    sources,
                });
            }
            Mode::Parallel | Mode::Ape(_) => {
                let p = prompt.prefix.len();
                let prefix_block = if p > 0 {
                    let (b, source) = self.cached(
                        Scheme::Alone,
                        (&[], None),
                        &prompt.prefix,
                        0,
                        &mut encoded,
                        chunks,
                    )?;
                    sources.push(BlockSource {
                        part: Part::Prefix,
                        tokens: p,
                        source,
                    });
                    blocks.push((b.clone(), 0, SegmentRole::Causal));
                    Some(b)
                } else {
                    None
                };
                let mut longest = 0;
                for (i, c) in prompt
                    .contexts
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.is_empty())
                {
                    let after = (prompt.prefix.as_slice(), prefix_block.as_ref());
                    let (b, source) =
                        self.cached(Scheme::AfterPrefix, after, c, p, &mut encoded, chunks)?;
                    sources.push(BlockSource {
                        part: Part::Context(i),
                        tokens: c.len(),
                        source,
                    });
                    blocks.push((b, p, SegmentRole::Context));
                    longest = longest.max(c.len());
                }
                p + longest
            }
            Mode::BlockAttention => {
                let mut offset = 0;
                let parts = std::iter::once(&prompt.prefix).chain(&prompt.contexts);
                for (i, c) in parts.enumerate().filter(|(_, c)| !c.is_empty()) {
                    let (b, source) =
                        self.cached(Scheme::Alone, (&[], None), c, 0, &mut encoded, chunks)?;
                    sources.push(BlockSource {
                        part: if i == 0 {
                            Part::Prefix
                        } else {
                            Part::Context(i - 1)
                        },
                        tokens: c.len(),
                        source,
                    });
                    let shifted = if offset == 0 {
                        b
                    } else {
                        let shifted = Arc::new(self.model.shift_block(&b, offset as i64)?);
                        pinned.push(b);
                        shifted
                    };
                    let role = if i == 0 {
                        SegmentRole::Causal
                    } else {
                        SegmentRole::Context
                    };
                    blocks.push((shifted, offset, role));
                    offset += c.len();
                }
                offset
            }
        };
        let past: Vec<Past<'_, M::Block>> = blocks
            .iter()
            .map(|(b, pos, role)| Past {
                kv: b.as_ref(),
                pos_offset: *pos,
                role: *role,
            })
            .collect();
        let out = chunks.forward(
            &self.model,
            &prompt.question,
            q_pos,
            &past,
            &ape,
            LogitRows::Last,
        )?;
        drop(past);
        Ok(Prefilled {
            blocks,
            _pinned: pinned,
            tail: out.kv,
            tail_pos: q_pos,
            next_pos: q_pos + prompt.question.len(),
            ape,
            logits: out.logits,
            tokens_encoded: encoded + prompt.question.len(),
            sources,
        })
    }

    /// `log p(tokens | prompt)` after `state`'s prompt (teacher forcing; the state is unchanged):
    /// the first token from the prefill logits, the rest from one forward pass over `tokens`.
    pub fn continuation_logprob(&self, state: &Prefilled<M::Block>, tokens: &[u32]) -> Result<f64> {
        let Some((&first, _)) = tokens.split_first() else {
            return Ok(0.0);
        };
        let mut total = log_softmax_at(&state.logits, first)?;
        if tokens.len() > 1 {
            let past = state.past();
            let feed = &tokens[..tokens.len() - 1];
            let out =
                self.model
                    .forward(feed, state.next_pos, &past, &state.ape, LogitRows::All)?;
            let vocab = self.model.config().vocab_size;
            for (row, &next) in out.logits.chunks_exact(vocab).zip(&tokens[1..]) {
                total += log_softmax_at(row, next)?;
            }
        }
        Ok(total)
    }

    /// Feeds one token and returns the next logits.
    pub fn decode_step(&self, state: &mut Prefilled<M::Block>, token: u32) -> Result<Vec<f32>> {
        let past = state.past();
        let out =
            self.model
                .forward(&[token], state.next_pos, &past, &state.ape, LogitRows::Last)?;
        drop(past);
        self.model.append_block(&mut state.tail, out.kv)?;
        state.next_pos += 1;
        Ok(out.logits)
    }

    /// Feeds `tokens[i]` to `states[i]` for every sequence at once, as one batched forward pass
    /// ([`LlamaModel::forward_batch`]: the weights are read once for all of them), and returns
    /// each sequence's next logits in order. Each sequence attends only to its own blocks.
    pub fn decode_batch(
        &self,
        states: &mut [&mut Prefilled<M::Block>],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        decode_batch(&self.model, states, tokens)
    }

    /// Prefills, then generates up to `max_tokens` tokens, stopping at any of `stop`.
    pub fn generate(
        &mut self,
        mode: Mode,
        prompt: &Prompt,
        sampling: Sampling,
        max_tokens: usize,
        stop: &[u32],
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(sampling)?;
        let start = Instant::now();
        let mut state = self.prefill(mode, prompt)?;
        let first = sampler.sample(&state.logits)?;
        let ttft = start.elapsed();
        let decode_start = Instant::now();
        let (tokens, window_full) =
            self.decode_from(&mut state, first, &mut sampler, max_tokens, stop)?;
        Ok(Generation {
            tokens,
            ttft,
            decode_time: decode_start.elapsed(),
            tokens_encoded: state.tokens_encoded,
            window_full,
            sources: state.sources,
        })
    }

    /// Generates up to `max_tokens` tokens from a prefilled state (its logits give the first),
    /// stopping at any of `stop`, or when the model's window is full (the tokens so far are
    /// returned).
    pub fn decode(
        &self,
        state: &mut Prefilled<M::Block>,
        sampling: Sampling,
        max_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        let mut sampler = Sampler::new(sampling)?;
        let first = sampler.sample(&state.logits)?;
        Ok(self
            .decode_from(state, first, &mut sampler, max_tokens, stop)?
            .0)
    }

    fn decode_from(
        &self,
        state: &mut Prefilled<M::Block>,
        mut next: u32,
        sampler: &mut Sampler,
        max_tokens: usize,
        stop: &[u32],
    ) -> Result<(Vec<u32>, bool)> {
        let window = self.model.config().context_length;
        let mut tokens = Vec::new();
        while tokens.len() < max_tokens && !stop.contains(&next) {
            tokens.push(next);
            if tokens.len() == max_tokens {
                break;
            }
            // The token would be fed at position next_pos: past the window, stop here.
            if state.next_pos >= window {
                return Ok((tokens, true));
            }
            let logits = self.decode_step(state, next)?;
            next = sampler.sample(&logits)?;
        }
        Ok((tokens, false))
    }
}

/// [`Engine::decode_batch`] on the model alone: what a caller that holds the engine mutably (a
/// chunked prefill's `between`) runs for its other sequences.
pub fn decode_batch<M: LlamaModel>(
    model: &M,
    states: &mut [&mut Prefilled<M::Block>],
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>> {
    if states.len() != tokens.len() {
        return Err(Error::Shape(format!(
            "decode_batch: {} sequences but {} tokens",
            states.len(),
            tokens.len()
        )));
    }
    let pasts: Vec<Vec<Past<'_, M::Block>>> = states.iter().map(|s| s.past()).collect();
    let steps: Vec<Step<'_, M::Block>> = states
        .iter()
        .zip(&pasts)
        .zip(tokens)
        .map(|((s, past), t)| Step {
            tokens: std::slice::from_ref(t),
            pos: s.next_pos,
            past,
            ape: s.ape,
            logits: LogitRows::Last,
        })
        .collect();
    let outs = model.forward_batch(&steps)?;
    drop(steps);
    drop(pasts);
    let mut logits = Vec::with_capacity(outs.len());
    for (state, out) in states.iter_mut().zip(outs) {
        model.append_block(&mut state.tail, out.kv)?;
        state.next_pos += 1;
        logits.push(out.logits);
    }
    Ok(logits)
}

/// How a prefill cuts its forward passes ([`Engine::prefill_chunked`]).
struct Chunks<'a, M: LlamaModel> {
    size: usize,
    between: &'a mut dyn FnMut(&M) -> Result<()>,
    /// Whether a piece has run (`between` goes before every piece after the first).
    started: bool,
}

impl<M: LlamaModel> Chunks<'_, M> {
    /// `model.forward(tokens, pos, past, ape, logits)` in pieces of at most `size` tokens: each
    /// piece attends to `past` and to the pieces before it (a causal block at `pos`), whose K/V
    /// it is appended to.
    fn forward(
        &mut self,
        model: &M,
        tokens: &[u32],
        pos: usize,
        past: &[Past<'_, M::Block>],
        ape: &ApeParams,
        logits: LogitRows,
    ) -> Result<crate::model::ForwardOutput<M::Block>> {
        let mut done: Option<crate::model::ForwardOutput<M::Block>> = None;
        let n = tokens.len();
        let mut start = 0;
        while start < n || done.is_none() {
            let end = n.min(start.saturating_add(self.size));
            if self.started {
                (self.between)(model)?;
            }
            self.started = true;
            let rows = match logits {
                LogitRows::Last if end < n => LogitRows::None,
                other => other,
            };
            let out = match &done {
                None => model.forward(&tokens[start..end], pos, past, ape, rows)?,
                Some(so_far) => {
                    let mut with_own: Vec<Past<'_, M::Block>> = past.to_vec();
                    with_own.push(Past {
                        kv: &so_far.kv,
                        pos_offset: pos,
                        role: SegmentRole::Causal,
                    });
                    model.forward(&tokens[start..end], pos + start, &with_own, ape, rows)?
                }
            };
            match done.as_mut() {
                None => done = Some(out),
                Some(so_far) => {
                    model.append_block(&mut so_far.kv, out.kv)?;
                    match logits {
                        LogitRows::All => so_far.logits.extend(out.logits),
                        LogitRows::Last => so_far.logits = out.logits,
                        LogitRows::None => {}
                    }
                }
            }
            start = end;
        }
        done.ok_or_else(|| Error::InvalidInput("nothing to run".into()))
    }
}

/// The model's fingerprint from its id: the id is the fingerprint in hex (as
/// [`crate::open::ModelFiles::id`]); any other id is hashed.
fn model_fingerprint(id: &str) -> [u8; 32] {
    let hex = id.as_bytes();
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if hex.len() == 64 {
        let mut out = [0u8; 32];
        let parsed = out.iter_mut().zip(hex.chunks_exact(2)).all(|(o, pair)| {
            match (digit(pair[0]), digit(pair[1])) {
                (Some(a), Some(b)) => {
                    *o = a << 4 | b;
                    true
                }
                _ => false,
            }
        });
        if parsed {
            return out;
        }
    }
    *blake3::hash(id.as_bytes()).as_bytes()
}

/// The splitmix64 finaliser of `x + golden ratio`: a bijection on u64 with well-mixed bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Chooses tokens from logits.
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    state: u64,
}

impl Sampler {
    /// A sampler; errors on a temperature that is not finite and > 0.
    pub fn new(sampling: Sampling) -> Result<Self> {
        let state = match sampling {
            Sampling::Greedy => 0,
            Sampling::Temperature { temperature, seed } => {
                ape_attn::check_positive("sampling temperature", temperature as f64)?;
                // xorshift's state must never be 0 (it would stay 0); splitmix64 spreads the
                // seed, and its one input that maps to 0 takes another state.
                match splitmix64(seed) {
                    0 => 0x9e37_79b9_7f4a_7c15,
                    s => s,
                }
            }
        };
        Ok(Self { sampling, state })
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::InvalidInput("no logits to sample from".into()));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::Model("the forward pass produced NaN logits".into()));
        }
        let argmax = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap_or(0);
        let temperature = match self.sampling {
            Sampling::Greedy => return Ok(argmax as u32),
            Sampling::Temperature { temperature, .. } => temperature as f64,
        };
        let m = logits[argmax] as f64;
        let weights: Vec<f64> = logits
            .iter()
            .map(|&x| ((x as f64 - m) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // xorshift64*: enough for sampling, reproducible from the seed.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let u = (self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        let mut acc = 0.0;
        for (i, w) in weights.iter().enumerate() {
            acc += w / total;
            if u < acc {
                return Ok(i as u32);
            }
        }
        Ok(argmax as u32)
    }
}

/// `log softmax(logits)[token]`, computed in f64.
pub fn log_softmax_at(logits: &[f32], token: u32) -> Result<f64> {
    let x = *logits.get(token as usize).ok_or_else(|| {
        Error::OutOfRange(format!("token {token} outside {} logits", logits.len()))
    })?;
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + logits
        .iter()
        .map(|&v| (v as f64 - m).exp())
        .sum::<f64>()
        .ln();
    Ok(x as f64 - lse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed gives a varied stream: seed 0x9e37_79b9_7f4a_7c15 once made the state 0, and a
    /// zero xorshift state picks token 0 forever.
    #[test]
    fn sampling_varies_for_every_seed() {
        for seed in [0, 1, 0x9e37_79b9_7f4a_7c15, u64::MAX] {
            let mut s = Sampler::new(Sampling::Temperature {
                temperature: 1.0,
                seed,
            })
            .expect("valid");
            let picks: std::collections::HashSet<u32> = (0..64)
                .map(|_| s.sample(&[0.0; 8]).expect("sample"))
                .collect();
            assert!(picks.len() > 4, "seed {seed}: {picks:?}");
        }
    }
}
