//! The CPU forward pass: the weights kept in their file's element type (GGUF quantisations are
//! multiplied directly, [`QMatrix`]), and the CPU kernels of `ape-attn` for attention and RoPE,
//! so every encoding mode goes through the same segmented attention the GPU kernels implement.
//! Several sequences' rows go through each weight matrix together
//! ([`LlamaModel::forward_batch`]).
//!
//! Activations meet quantised weights as 8-bit blocks by default ([`Activations::Q8`], as
//! llama.cpp does: integer dot products, the fast path); [`Activations::F32`] multiplies them
//! unquantised with the dequantised weights (the exact product of the stored weights, slower),
//! which the tests use where an identity must hold to f32 rounding.

use std::borrow::Cow;
use std::sync::Arc;

mod matmul;
pub use matmul::{Kernels, QMatrix, SGEMM_MIN_N_FLOAT};

use super::config::LlamaConfig;
use super::gguf::Gguf;
use super::model::{
    check_inputs, BlockFormat, Fill, ForwardOutput, KvBlock, LlamaModel, LogitRows, Past, Step,
};
use super::weights::{Weight, WeightSource};
use crate::store::StoredDType;
use ape_attn::cpu::{self, rope::RopeAngles};
use ape_attn::reference::{self, llama_ops, rope};
use ape_attn::{ApeParams, RopeConfig, RopeShift, SegmentRole};
use ape_attn::{Error, Result};

/// One transformer block's weights, matrices `[out, in]` in their file's element type.
struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

/// How activations meet quantised weights in the matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activations {
    /// Quantised to 8-bit blocks, integer dot products (llama.cpp's numerics; the default).
    #[default]
    Q8,
    /// Unquantised f32 against weights dequantised to f32 (exact products of the stored
    /// weights).
    F32,
}

/// A Llama model on the CPU.
pub struct CpuModel {
    config: LlamaConfig,
    activations: Activations,
    embed: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None`: tied to the embedding.
    output: Option<QMatrix>,
}

impl std::fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// K and V of a run of tokens on the CPU, every layer `[len, n_kv_heads, head_dim]` f32. The
/// tensors are shared: a Block-Attention view of a cached block ([`LlamaModel::shift_block`])
/// shares its K and V and records the RoPE shift its keys are read with, which the attention
/// kernel applies as it reads them (no shifted copy).
#[derive(Clone, Debug, PartialEq)]
pub struct CpuBlock {
    len: usize,
    kv: Arc<LayersKv>,
    /// Positions the keys are rotated by as they are read.
    rope_shift: i64,
    rope: RopeConfig,
}

#[derive(Clone, Debug, PartialEq)]
struct LayersKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvBlock for CpuBlock {
    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> usize {
        self.kv
            .k
            .iter()
            .chain(&self.kv.v)
            .map(|x| x.len() * 4)
            .sum()
    }
}

impl CpuBlock {
    /// Layer `l`'s keys as attention reads them (rotated by the block's RoPE shift, if any).
    pub fn k(&self, l: usize) -> Cow<'_, [f32]> {
        let k = &self.kv.k[l];
        if self.rope_shift == 0 {
            return Cow::Borrowed(k);
        }
        let mut shifted = k.clone();
        let heads = k.len() / (self.len.max(1) * self.rope.head_dim);
        rope::shift(&mut shifted, self.len, heads, &self.rope, self.rope_shift)
            .expect("a block's keys have its own shape");
        Cow::Owned(shifted)
    }

    /// Layer `l`'s values.
    pub fn v(&self, l: usize) -> &[f32] {
        &self.kv.v[l]
    }

    /// The RoPE shift its keys are read with (0 for a block read where it was encoded).
    pub fn rope_shift(&self) -> i64 {
        self.rope_shift
    }
}

/// `y[n, out] = x[n, in] W^T` into a new buffer.
fn matmul(x: &[f32], w: &QMatrix, n: usize, activations: Activations) -> Vec<f32> {
    let mut y = vec![0.0f32; n * w.rows()];
    let kernels = match activations {
        Activations::Q8 => Kernels::Auto,
        Activations::F32 => Kernels::Sgemm,
    };
    w.matmul_with(kernels, x, n, &mut y);
    y
}

impl CpuModel {
    /// The same model with activations meeting quantised weights as `activations`.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    /// How activations meet quantised weights.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Loads a GGUF `llama` model, its matrices kept in their quantisation.
    pub fn load(g: &Gguf) -> Result<Self> {
        Self::load_with_progress(g, |_, _| {})
    }

    /// [`CpuModel::load`], calling `progress(layers_done, n_layers)` as layers load.
    pub fn load_with_progress(g: &Gguf, progress: impl FnMut(usize, usize)) -> Result<Self> {
        Self::from_source(LlamaConfig::from_gguf(g)?, g, progress)
    }

    /// Loads the weights of a model of shape `c` from any file format.
    pub fn from_source(
        c: LlamaConfig,
        src: &dyn WeightSource,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let (d, kv, h) = (c.dim, c.kv_dim(), c.hidden_dim);
        let matrix = |w: Weight, rows: usize, cols: usize| -> Result<QMatrix> {
            let raw = src.load_raw(w, &[rows, cols])?;
            QMatrix::from_raw(raw.ty, rows, cols, raw.data).map_err(|e| match e {
                Error::Shape(m) => Error::Model(format!("{w:?}: {m}")),
                e => e,
            })
        };
        let embed = matrix(Weight::Embedding, c.vocab_size, d)?;
        let output = match src.has(Weight::Output) {
            true => Some(matrix(Weight::Output, c.vocab_size, d)?),
            false => None,
        };
        let layers = (0..c.n_layers)
            .map(|l| {
                progress(l, c.n_layers);
                Ok(Layer {
                    attn_norm: src.load(Weight::AttnNorm(l), &[d])?,
                    wq: matrix(Weight::Q(l), d, d)?,
                    wk: matrix(Weight::K(l), kv, d)?,
                    wv: matrix(Weight::V(l), kv, d)?,
                    wo: matrix(Weight::O(l), d, d)?,
                    ffn_norm: src.load(Weight::FfnNorm(l), &[d])?,
                    w_gate: matrix(Weight::Gate(l), h, d)?,
                    w_up: matrix(Weight::Up(l), h, d)?,
                    w_down: matrix(Weight::Down(l), d, h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            output_norm: src.load(Weight::OutputNorm, &[d])?,
            activations: Activations::default(),
            config: c,
            embed,
            layers,
            output,
        })
    }

    /// Layer `l`'s attention for one sequence's rows `q` (`[n, n_heads, head_dim]`, the first at
    /// `pos`) over its `past` blocks and its own new keys and values (causal), into `out`.
    #[allow(clippy::too_many_arguments)]
    /// Layer `l`'s segments of a sequence: its past blocks (read through their RoPE shift) and
    /// its own new keys and values at `pos` (causal).
    fn segments<'a>(
        &self,
        l: usize,
        pos: usize,
        own: (&'a [f32], &'a [f32]),
        past: &'a [Past<'a, CpuBlock>],
    ) -> Vec<reference::Segment<'a>> {
        let c = &self.config;
        let n = own.0.len() / c.kv_dim();
        let mut segments: Vec<reference::Segment> = past
            .iter()
            .map(|p| reference::Segment {
                k: &p.kv.kv.k[l],
                v: &p.kv.kv.v[l],
                len: p.kv.len,
                pos_offset: p.pos_offset,
                role: p.role,
                rope_shift: (p.kv.rope_shift != 0).then_some(RopeShift {
                    rope: c.rope,
                    delta: p.kv.rope_shift,
                }),
            })
            .collect();
        segments.push(reference::Segment {
            k: own.0,
            v: own.1,
            len: n,
            pos_offset: pos,
            role: SegmentRole::Causal,
            rope_shift: None,
        });
        segments
    }
}

impl CpuModel {
    /// A block read where it was encoded.
    fn block(&self, len: usize, kv: LayersKv) -> CpuBlock {
        CpuBlock {
            len,
            kv: Arc::new(kv),
            rope_shift: 0,
            rope: self.config.rope,
        }
    }
}

impl LlamaModel for CpuModel {
    type Block = CpuBlock;

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn forward(
        &self,
        tokens: &[u32],
        pos: usize,
        past: &[Past<'_, CpuBlock>],
        ape: &ApeParams,
        logits: LogitRows,
    ) -> Result<ForwardOutput<CpuBlock>> {
        let step = Step {
            tokens,
            pos,
            past,
            ape: *ape,
            logits,
        };
        let mut out = self.forward_batch(&[step])?;
        Ok(out.pop().expect("one output per step"))
    }

    fn forward_batch(&self, steps: &[Step<'_, CpuBlock>]) -> Result<Vec<ForwardOutput<CpuBlock>>> {
        let c = &self.config;
        let (d, kvd, qd) = (c.dim, c.kv_dim(), c.n_heads * c.head_dim);
        for s in steps {
            check_inputs(c, s.tokens, s.pos, s.past)?;
            if s.past.iter().any(|p| p.kv.kv.k.len() != c.n_layers) {
                return Err(Error::Shape(
                    "a past block has the wrong number of layers".into(),
                ));
            }
        }
        // Row ranges of each sequence in the packed rows.
        let mut ranges = Vec::with_capacity(steps.len());
        let mut n = 0;
        for s in steps {
            ranges.push(n..n + s.tokens.len());
            n += s.tokens.len();
        }
        let mut x = Vec::with_capacity(n * d);
        for s in steps {
            for &t in s.tokens {
                let at = x.len();
                x.resize(at + d, 0.0);
                self.embed.row_f32(t as usize, &mut x[at..]);
            }
        }
        let mut blocks: Vec<LayersKv> = steps
            .iter()
            .map(|_| LayersKv {
                k: Vec::with_capacity(c.n_layers),
                v: Vec::with_capacity(c.n_layers),
            })
            .collect();
        // Each sequence's rotation angles, formed once for all layers.
        let angles = steps
            .iter()
            .map(|s| RopeAngles::new(&c.rope, s.pos as i64, s.tokens.len()))
            .collect::<Result<Vec<_>>>()?;
        let mut o = vec![0.0f32; n * qd];
        for (l, w) in self.layers.iter().enumerate() {
            let h = llama_ops::rms_norm(&x, &w.attn_norm, c.rms_eps)?;
            let mut q = matmul(&h, &w.wq, n, self.activations);
            let mut k = matmul(&h, &w.wk, n, self.activations);
            let v = matmul(&h, &w.wv, n, self.activations);
            for (r, angles) in ranges.iter().zip(&angles) {
                angles.apply(&mut q[r.start * qd..r.end * qd], c.n_heads)?;
                angles.apply(&mut k[r.start * kvd..r.end * kvd], c.n_kv_heads)?;
            }
            // One attention call for every sequence: they run side by side on the pool, each
            // giving the bits it gives alone.
            let segments: Vec<Vec<reference::Segment<'_>>> = steps
                .iter()
                .zip(&ranges)
                .map(|(s, r)| {
                    self.segments(
                        l,
                        s.pos,
                        (
                            &k[r.start * kvd..r.end * kvd],
                            &v[r.start * kvd..r.end * kvd],
                        ),
                        s.past,
                    )
                })
                .collect();
            let sequences: Vec<reference::BatchSequence<'_>> = steps
                .iter()
                .zip(&segments)
                .map(|(s, segments)| reference::BatchSequence {
                    n_rows: s.tokens.len(),
                    pos_offset: s.pos,
                    segments,
                    ape: s.ape,
                })
                .collect();
            cpu::segmented_attention_batch_into(
                &q,
                &sequences,
                &c.attention_dims()?,
                &mut o,
                None,
            )?;
            drop(sequences);
            drop(segments);
            for (r, block) in ranges.iter().zip(&mut blocks) {
                block.k.push(k[r.start * kvd..r.end * kvd].to_vec());
                block.v.push(v[r.start * kvd..r.end * kvd].to_vec());
            }
            for (xi, oi) in x.iter_mut().zip(matmul(&o, &w.wo, n, self.activations)) {
                *xi += oi;
            }
            let h = llama_ops::rms_norm(&x, &w.ffn_norm, c.rms_eps)?;
            let gate = matmul(&h, &w.w_gate, n, self.activations);
            let up = matmul(&h, &w.w_up, n, self.activations);
            let a = llama_ops::silu_mul(&gate, &up)?;
            for (xi, yi) in x.iter_mut().zip(matmul(&a, &w.w_down, n, self.activations)) {
                *xi += yi;
            }
        }
        // The rows that get logits, every sequence's together: one pass through the output
        // matrix.
        let wanted: Vec<std::ops::Range<usize>> = steps
            .iter()
            .zip(&ranges)
            .map(|(s, r)| match s.logits {
                LogitRows::None => r.start..r.start,
                LogitRows::Last => r.end.saturating_sub(1).max(r.start)..r.end,
                LogitRows::All => r.clone(),
            })
            .collect();
        let n_out: usize = wanted.iter().map(|r| r.len()).sum();
        let mut logits = Vec::new();
        if n_out > 0 {
            let mut rows = Vec::with_capacity(n_out * d);
            for r in &wanted {
                rows.extend_from_slice(&x[r.start * d..r.end * d]);
            }
            let h = llama_ops::rms_norm(&rows, &self.output_norm, c.rms_eps)?;
            let out = self.output.as_ref().unwrap_or(&self.embed);
            logits = matmul(&h, out, n_out, self.activations);
        }
        let mut outputs = Vec::with_capacity(steps.len());
        let mut at = 0;
        for ((r, kv), s) in wanted.iter().zip(blocks).zip(steps) {
            let len = r.len() * c.vocab_size;
            outputs.push(ForwardOutput {
                logits: logits[at..at + len].to_vec(),
                kv: self.block(s.tokens.len(), kv),
            });
            at += len;
        }
        Ok(outputs)
    }

    fn block_bytes(&self, n_tokens: usize) -> usize {
        self.config.kv_bytes(n_tokens, std::mem::size_of::<f32>())
    }

    fn append_block(&self, block: &mut CpuBlock, more: CpuBlock) -> Result<()> {
        if block.kv.k.len() != more.kv.k.len() {
            return Err(Error::Shape("blocks of different depths".into()));
        }
        // A shifted view that grows (a Block-Attention block whose tokens continue) takes its own
        // rotated copy of the keys once; from then on it is a plain block. Otherwise the tensors
        // are copied only when another block shares them.
        let c = &self.config;
        let (block_shift, more_shift) = (block.rope_shift, more.rope_shift);
        let kv = Arc::make_mut(&mut block.kv);
        if block_shift != 0 {
            for k in &mut kv.k {
                rope::shift(k, block.len, c.n_kv_heads, &c.rope, block_shift)?;
            }
            block.rope_shift = 0;
        }
        let (more_len, mut more) = (more.len, Arc::unwrap_or_clone(more.kv));
        if more_shift != 0 {
            for k in &mut more.k {
                rope::shift(k, more_len, c.n_kv_heads, &c.rope, more_shift)?;
            }
        }
        for (a, b) in
            kv.k.iter_mut()
                .zip(more.k)
                .chain(kv.v.iter_mut().zip(more.v))
        {
            a.extend(b);
        }
        block.len += more_len;
        Ok(())
    }

    fn block_format(&self) -> BlockFormat {
        let c = &self.config;
        BlockFormat {
            // The name says how activations meet the weights; the revision changes with the
            // pass's numerics. 2: weights kept in their file's quantisation, the CPU attention
            // kernel in f32 (1: weights dequantised to f32, the f64 reference's attention).
            encoder: match self.activations {
                Activations::Q8 => "cpu-q8-2".into(),
                Activations::F32 => "cpu-f32-2".into(),
            },
            dtype: StoredDType::F32,
            layers: c.n_layers,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }

    fn save_block(&self, block: &CpuBlock) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(block.bytes());
        if block.rope_shift != 0 {
            return Err(Error::Shape(
                "a shifted view is not stored: its block is".into(),
            ));
        }
        for (k, v) in block.kv.k.iter().zip(&block.kv.v) {
            out.extend_from_slice(bytemuck::cast_slice(k));
            out.extend_from_slice(bytemuck::cast_slice(v));
        }
        Ok(out)
    }

    fn load_block(&self, n_tokens: usize, fill: &mut Fill<'_>) -> Result<CpuBlock> {
        let c = &self.config;
        let n = n_tokens * c.kv_dim();
        let mut kv = LayersKv {
            k: Vec::with_capacity(c.n_layers),
            v: Vec::with_capacity(c.n_layers),
        };
        for _ in 0..c.n_layers {
            let mut k = vec![0.0f32; n];
            fill(bytemuck::cast_slice_mut(&mut k))?;
            let mut v = vec![0.0f32; n];
            fill(bytemuck::cast_slice_mut(&mut v))?;
            kv.k.push(k);
            kv.v.push(v);
        }
        Ok(self.block(n_tokens, kv))
    }

    fn shift_block(&self, block: &CpuBlock, delta: i64) -> Result<CpuBlock> {
        let rope_shift = block.rope_shift.checked_add(delta).ok_or_else(|| {
            Error::OutOfRange(format!("RoPE shift {} + {delta}", block.rope_shift))
        })?;
        Ok(CpuBlock {
            rope_shift,
            ..block.clone()
        })
    }
}
