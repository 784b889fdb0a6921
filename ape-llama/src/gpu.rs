//! The GPU forward pass: bf16 weights on the device, cuBLAS GEMMs (bf16 in, f32 accumulate), and
//! the crate's kernels for everything else: embedding, RMSNorm, RoPE, `silu * up`, and the
//! segmented attention for every mode. Activations are bf16 but for the residual stream, which
//! stays f32 across the layers (a bf16 residual costs the real model's logits a correlation of
//! 0.998 against the f32 CPU pass; f32 keeps it above 0.9996). It implements [`LlamaModel`], so
//! the engine's four modes run on it unchanged.
//!
//! A block's K/V are a list of chunks in position order, each `[len, n_kv_heads, head_dim]` per
//! layer; every chunk is one segment for the attention kernel. Appending a decode step adds a
//! chunk instead of copying the block (small chunks are merged once there are many), and a
//! Block-Attention shift copies nothing: it records the shift on the block's chunks, and the
//! attention kernel reads their keys rotated ([`RopeShift`]) from the cached tensors.
//!
//! A batch of sequences ([`LlamaModel::forward_batch`]) goes through each weight matrix as one
//! set of rows, and through one batched attention launch per layer, each sequence's rows
//! attending to its own blocks.
//!
//! The pass is written once against [`DeviceOps`], the operations it needs from a device:
//! [`CudaOps`] runs them on a GPU (cuBLAS and the crate's kernels); with the `emulator` feature,
//! `emulated_ops::EmulatedOps` runs the same kernels on the kernel emulator and the GEMMs on
//! the CPU, so the whole GPU forward pass (segment lists, chunks, shifts, merges) is tested
//! against the CPU forward pass on machines without a GPU (`tests/emulated_llama.rs`).
//!
//! Status: on a GPU, tested only by the ignored tests in `tests/gpu_llama.rs`; see issue #4.

use std::sync::Arc;

pub use super::cuda_ops::CudaOps;
pub use super::device_ops::{DeviceOps, DeviceTensor};

use super::config::LlamaConfig;
use super::model::{
    check_inputs, BlockFormat, Fill, ForwardOutput, KvBlock, LlamaModel, LogitRows, Past, Step,
};
use super::weights::{Weight, WeightSource};
use crate::store::StoredDType;
use ape_attn::cuda::{self, BatchSequence, DType, Device, Query, Segment, Tensor};
use ape_attn::{ApeParams, AttentionDims, RopeShift, SegmentRole};
use ape_attn::{Error, Result};

struct GpuLayer<T> {
    attn_norm: T,
    wq: T,
    wk: T,
    wv: T,
    wo: T,
    ffn_norm: T,
    w_gate: T,
    w_up: T,
    w_down: T,
}

/// A Llama model on one device: a GPU by default ([`CudaOps`]), or any [`DeviceOps`].
pub struct GpuModel<D: DeviceOps = CudaOps> {
    ops: D,
    config: LlamaConfig,
    dims: AttentionDims,
    embed: D::Tensor,
    layers: Vec<GpuLayer<D::Tensor>>,
    output_norm: D::Tensor,
    output: Option<D::Tensor>,
}

impl<D: DeviceOps> std::fmt::Debug for GpuModel<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One run of tokens' K/V, every layer.
struct Chunk<T> {
    len: usize,
    k: Vec<Arc<T>>,
    v: Vec<Arc<T>>,
    /// RoPE positions the keys are read rotated by (Block-Attention); the tensors hold them as
    /// computed.
    rope_shift: i64,
}

/// K and V of a run of tokens on the device (see the module docs).
pub struct GpuBlock<T = Tensor> {
    len: usize,
    chunks: Vec<Chunk<T>>,
}

impl<T> std::fmt::Debug for GpuBlock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBlock")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl<T: DeviceTensor> KvBlock for GpuBlock<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> usize {
        self.chunks
            .iter()
            .flat_map(|c| c.k.iter().chain(&c.v))
            .map(|t| t.bytes())
            .sum()
    }
}

/// Chunks beyond this many are merged (all but the first) on append.
const MAX_CHUNKS: usize = 16;

/// The shapes of every weight (`[out, in]` or `[n]`).
fn weight_shapes(c: &LlamaConfig) -> Vec<(Weight, Vec<usize>)> {
    let (d, kv, h) = (c.dim, c.kv_dim(), c.hidden_dim);
    let mut w = vec![
        (Weight::Embedding, vec![c.vocab_size, d]),
        (Weight::OutputNorm, vec![d]),
    ];
    for l in 0..c.n_layers {
        w.extend([
            (Weight::AttnNorm(l), vec![d]),
            (Weight::Q(l), vec![d, d]),
            (Weight::K(l), vec![kv, d]),
            (Weight::V(l), vec![kv, d]),
            (Weight::O(l), vec![d, d]),
            (Weight::FfnNorm(l), vec![d]),
            (Weight::Gate(l), vec![h, d]),
            (Weight::Up(l), vec![h, d]),
            (Weight::Down(l), vec![d, h]),
        ]);
    }
    w
}

impl GpuModel<CudaOps> {
    /// Uploads the weights of a model of shape `config` from any file format to GPU `dev`, as
    /// bf16.
    pub fn from_source(
        dev: Arc<Device>,
        config: LlamaConfig,
        src: &dyn WeightSource,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        Self::from_source_on(CudaOps::new(dev)?, config, src, progress)
    }

    /// Synthetic weights of any Llama shape, generated on GPU `dev` (see [`Self::synthetic_on`]).
    pub fn synthetic(dev: Arc<Device>, config: LlamaConfig, seed: u32) -> Result<Self> {
        Self::synthetic_on(CudaOps::new(dev)?, config, seed)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.ops.device()
    }
}

impl<D: DeviceOps> GpuModel<D> {
    /// Uploads the weights of a model of shape `config` from any file format through `ops`, as
    /// bf16. `progress(layer, n_layers)` is called as each layer starts.
    pub fn from_source_on(
        ops: D,
        config: LlamaConfig,
        src: &dyn WeightSource,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        check_config(&config)?;
        let n_layers = config.n_layers;
        let output = if src.has(Weight::Output) {
            let shape = [config.vocab_size, config.dim];
            Some(ops.upload(&shape, &src.load(Weight::Output, &shape)?)?)
        } else {
            None
        };
        Self::build(ops, config, output, |ops, w, shape| {
            if let Weight::AttnNorm(l) = w {
                progress(l, n_layers);
            }
            ops.upload(shape, &src.load(w, shape)?)
        })
    }

    /// Synthetic weights of any Llama shape, generated on the device from `seed` (uniform, scaled
    /// by `1/sqrt(fan_in)`; norms 1; output tied to the embedding): for benchmarks at shapes no
    /// file here has.
    pub fn synthetic_on(ops: D, config: LlamaConfig, seed: u32) -> Result<Self> {
        check_config(&config)?;
        let mut k = 0u32;
        Self::build(ops, config, None, |ops, _w, shape| {
            k += 1;
            let (scale, offset) = match shape {
                [_] => (0.0, 1.0),
                [_, fan_in] => (1.0 / (*fan_in as f32).sqrt(), 0.0),
                _ => (0.0, 0.0),
            };
            ops.uniform(
                shape,
                seed.wrapping_mul(7919).wrapping_add(k),
                scale,
                offset,
            )
        })
    }

    fn build(
        ops: D,
        config: LlamaConfig,
        output: Option<D::Tensor>,
        mut make: impl FnMut(&D, Weight, &[usize]) -> Result<D::Tensor>,
    ) -> Result<Self> {
        let dims = config.attention_dims()?;
        let mut tensors: Vec<(Weight, D::Tensor)> = Vec::new();
        for (w, shape) in weight_shapes(&config) {
            tensors.push((w, make(&ops, w, &shape)?));
        }
        let mut take = |w: Weight| -> Result<D::Tensor> {
            let i = tensors
                .iter()
                .position(|(x, _)| *x == w)
                .ok_or_else(|| Error::Model(format!("missing weight {w:?}")))?;
            Ok(tensors.swap_remove(i).1)
        };
        let embed = take(Weight::Embedding)?;
        let output_norm = take(Weight::OutputNorm)?;
        let layers = (0..config.n_layers)
            .map(|l| {
                Ok(GpuLayer {
                    attn_norm: take(Weight::AttnNorm(l))?,
                    wq: take(Weight::Q(l))?,
                    wk: take(Weight::K(l))?,
                    wv: take(Weight::V(l))?,
                    wo: take(Weight::O(l))?,
                    ffn_norm: take(Weight::FfnNorm(l))?,
                    w_gate: take(Weight::Gate(l))?,
                    w_up: take(Weight::Up(l))?,
                    w_down: take(Weight::Down(l))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ops,
            config,
            dims,
            embed,
            layers,
            output_norm,
            output,
        })
    }

    /// The device operations the model runs on.
    pub fn ops(&self) -> &D {
        &self.ops
    }

    /// The checks of a forward pass before any work: at least one token, [`check_inputs`], and
    /// past blocks of this model's shape (every chunk has K and V for every layer,
    /// `[len, n_kv_heads, head_dim]`).
    fn check_step(
        &self,
        tokens: &[u32],
        pos: usize,
        past: &[Past<'_, GpuBlock<D::Tensor>>],
    ) -> Result<()> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(Error::Shape(
                "a forward pass needs at least one token".into(),
            ));
        }
        check_inputs(c, tokens, pos, past)?;
        for (i, p) in past.iter().enumerate() {
            for ch in &p.kv.chunks {
                let want = [ch.len, c.n_kv_heads, c.head_dim];
                let fits = ch.k.len() == c.n_layers
                    && ch.v.len() == c.n_layers
                    && ch.k.iter().chain(&ch.v).all(|t| t.shape() == want);
                if !fits {
                    return Err(Error::Shape(format!(
                        "past block {i} does not have K and V of {want:?} for each of the \
                         model's {} layers",
                        c.n_layers
                    )));
                }
            }
        }
        Ok(())
    }

    /// A layer's feed-forward block added into the residual stream `x`:
    /// `x += W_down (silu(W_gate h) * W_up h)`, `h = rms_norm(x)`. Gate and up (the largest
    /// activations: 3.7 GB each for 128K tokens at 8B shapes) are freed before the down
    /// projection.
    fn ffn(&self, w: &GpuLayer<D::Tensor>, x: &mut D::Tensor) -> Result<()> {
        let ops = &self.ops;
        let a = {
            let h = ops.rms_norm(x, &w.ffn_norm, self.config.rms_eps)?;
            let gate = ops.linear(&h, &w.w_gate, DType::BF16)?;
            let up = ops.linear(&h, &w.w_up, DType::BF16)?;
            ops.silu_mul(&gate, &up)?
        };
        ops.add_linear(&a, &w.w_down, x)
    }

    /// Layer `l`'s segments of the `past` blocks: one per chunk, in position order, read rotated
    /// by the chunk's shift.
    fn past_segments<'a>(
        &self,
        past: &'a [Past<'a, GpuBlock<D::Tensor>>],
        l: usize,
    ) -> Vec<Segment<'a, D::Tensor>> {
        let mut segments = Vec::new();
        for p in past {
            let mut offset = p.pos_offset;
            for ch in &p.kv.chunks {
                segments.push(Segment {
                    k: &*ch.k[l],
                    v: &*ch.v[l],
                    pos_offset: offset,
                    role: p.role,
                    rope_shift: (ch.rope_shift != 0).then_some(RopeShift {
                        rope: self.config.rope,
                        delta: ch.rope_shift,
                    }),
                });
                offset += ch.len;
            }
        }
        segments
    }
}

/// The model shapes the GPU forward pass supports (its attention kernel's head dims), checked
/// before any weight is loaded.
fn check_config(config: &LlamaConfig) -> Result<()> {
    config.attention_dims()?;
    if !cuda::segmented_attention::SUPPORTED_HEAD_DIMS.contains(&config.head_dim) {
        return Err(Error::UnsupportedHeadDim {
            op: "GPU forward pass",
            head_dim: config.head_dim,
            supported: cuda::segmented_attention::SUPPORTED_HEAD_DIMS,
        });
    }
    Ok(())
}

impl<D: DeviceOps> LlamaModel for GpuModel<D> {
    type Block = GpuBlock<D::Tensor>;

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn forward(
        &self,
        tokens: &[u32],
        pos: usize,
        past: &[Past<'_, Self::Block>],
        ape: &ApeParams,
        logits: LogitRows,
    ) -> Result<ForwardOutput<Self::Block>> {
        let c = &self.config;
        let n = tokens.len();
        self.check_step(tokens, pos, past)?;
        let ops = &self.ops;
        let mut x = ops.embedding(tokens, &self.embed)?;
        let mut chunk = Chunk {
            len: n,
            k: Vec::with_capacity(c.n_layers),
            v: Vec::with_capacity(c.n_layers),
            rope_shift: 0,
        };
        for (l, w) in self.layers.iter().enumerate() {
            let h = ops.rms_norm(&x, &w.attn_norm, c.rms_eps)?;
            let mut q = ops
                .linear(&h, &w.wq, DType::BF16)?
                .reshape(&[n, c.n_heads, c.head_dim])?;
            let mut k =
                ops.linear(&h, &w.wk, DType::BF16)?
                    .reshape(&[n, c.n_kv_heads, c.head_dim])?;
            let v = ops
                .linear(&h, &w.wv, DType::BF16)?
                .reshape(&[n, c.n_kv_heads, c.head_dim])?;
            // Activations are freed as soon as they are used (h here, q after the attention): at
            // 128K tokens and 8B shapes each is 1 GiB, and the FFN's peak comes next.
            drop(h);
            ops.rope_apply(&mut q, &c.rope, pos as i64)?;
            ops.rope_apply(&mut k, &c.rope, pos as i64)?;
            let mut segments = self.past_segments(past, l);
            segments.push(Segment {
                k: &k,
                v: &v,
                pos_offset: pos,
                role: SegmentRole::Causal,
                rope_shift: None,
            });
            let query = Query {
                data: &q,
                pos_offset: pos,
            };
            let o = ops.segmented_attention(&query, &segments, &self.dims, ape)?;
            drop(segments);
            drop(q);
            ops.add_linear(&o.reshape(&[n, c.dim])?, &w.wo, &mut x)?;
            self.ffn(w, &mut x)?;
            chunk.k.push(Arc::new(k));
            chunk.v.push(Arc::new(v));
        }
        let logits = match logits {
            LogitRows::None => Vec::new(),
            rows => {
                let last = if rows == LogitRows::Last {
                    ops.copy_rows(&x, n - 1, 1)?
                } else {
                    x
                };
                let h = ops.rms_norm(&last, &self.output_norm, c.rms_eps)?;
                let out = self.output.as_ref().unwrap_or(&self.embed);
                // f32 logits: bf16's spacing (0.125 at 16 to 32) would blur near-ties.
                ops.download(&ops.linear(&h, out, DType::F32)?)?
            }
        };
        Ok(ForwardOutput {
            logits,
            kv: GpuBlock {
                len: n,
                chunks: vec![chunk],
            },
        })
    }

    /// Every sequence's rows together through each weight matrix (the embedding, the q/k/v, o
    /// and FFN projections, and the output head over the rows that get logits), RoPE per
    /// sequence at its own positions, and one batched attention launch per layer
    /// ([`DeviceOps::segmented_attention_batch`]) in which each sequence's rows attend to its own
    /// past and its own new keys. Each sequence's K and V are copied out of the packed rows into
    /// its own block. One step runs as [`LlamaModel::forward`].
    fn forward_batch(
        &self,
        steps: &[Step<'_, Self::Block>],
    ) -> Result<Vec<ForwardOutput<Self::Block>>> {
        for s in steps {
            self.check_step(s.tokens, s.pos, s.past)?;
        }
        if let [s] = steps {
            return Ok(vec![
                self.forward(s.tokens, s.pos, s.past, &s.ape, s.logits)?
            ]);
        }
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let c = &self.config;
        let ops = &self.ops;
        // Each sequence's rows in the packed rows.
        let mut ranges = Vec::with_capacity(steps.len());
        let mut n = 0;
        for s in steps {
            ranges.push(n..n + s.tokens.len());
            n += s.tokens.len();
        }
        let ids: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let mut x = ops.embedding(&ids, &self.embed)?;
        let mut chunks: Vec<Chunk<D::Tensor>> = steps
            .iter()
            .map(|s| Chunk {
                len: s.tokens.len(),
                k: Vec::with_capacity(c.n_layers),
                v: Vec::with_capacity(c.n_layers),
                rope_shift: 0,
            })
            .collect();
        for (l, w) in self.layers.iter().enumerate() {
            let h = ops.rms_norm(&x, &w.attn_norm, c.rms_eps)?;
            let q_all = ops
                .linear(&h, &w.wq, DType::BF16)?
                .reshape(&[n, c.n_heads, c.head_dim])?;
            let k_all =
                ops.linear(&h, &w.wk, DType::BF16)?
                    .reshape(&[n, c.n_kv_heads, c.head_dim])?;
            let v_all =
                ops.linear(&h, &w.wv, DType::BF16)?
                    .reshape(&[n, c.n_kv_heads, c.head_dim])?;
            drop(h);
            // Each sequence's rows rotated to its own positions; its K and V become its own
            // tensors (its block's chunk), its queries are packed again for the launch.
            let mut qs = Vec::with_capacity(steps.len());
            let mut own = Vec::with_capacity(steps.len());
            for (s, r) in steps.iter().zip(&ranges) {
                let mut q = ops.copy_rows(&q_all, r.start, r.len())?;
                let mut k = ops.copy_rows(&k_all, r.start, r.len())?;
                ops.rope_apply(&mut q, &c.rope, s.pos as i64)?;
                ops.rope_apply(&mut k, &c.rope, s.pos as i64)?;
                qs.push(q);
                own.push((k, ops.copy_rows(&v_all, r.start, r.len())?));
            }
            drop((q_all, k_all, v_all));
            let q = ops.concat(&qs.iter().collect::<Vec<_>>())?;
            drop(qs);
            let segments: Vec<Vec<Segment<'_, D::Tensor>>> = steps
                .iter()
                .zip(&own)
                .map(|(s, (k, v))| {
                    let mut segments = self.past_segments(s.past, l);
                    segments.push(Segment {
                        k,
                        v,
                        pos_offset: s.pos,
                        role: SegmentRole::Causal,
                        rope_shift: None,
                    });
                    segments
                })
                .collect();
            let sequences: Vec<BatchSequence<'_, D::Tensor>> = steps
                .iter()
                .zip(&segments)
                .map(|(s, segments)| BatchSequence {
                    n_rows: s.tokens.len(),
                    pos_offset: s.pos,
                    segments,
                    ape: s.ape,
                })
                .collect();
            let o = ops.segmented_attention_batch(&q, &sequences, &self.dims)?;
            drop(sequences);
            drop(segments);
            drop(q);
            ops.add_linear(&o.reshape(&[n, c.dim])?, &w.wo, &mut x)?;
            self.ffn(w, &mut x)?;
            for (chunk, (k, v)) in chunks.iter_mut().zip(own) {
                chunk.k.push(Arc::new(k));
                chunk.v.push(Arc::new(v));
            }
        }
        // The rows that get logits, every sequence's together: one pass through the output head.
        let wanted: Vec<std::ops::Range<usize>> = steps
            .iter()
            .zip(&ranges)
            .map(|(s, r)| match s.logits {
                LogitRows::None => r.start..r.start,
                LogitRows::Last => r.end - 1..r.end,
                LogitRows::All => r.clone(),
            })
            .collect();
        let n_out: usize = wanted.iter().map(|r| r.len()).sum();
        let logits = if n_out == 0 {
            Vec::new()
        } else {
            let rows = if n_out == n {
                x
            } else {
                let parts = wanted
                    .iter()
                    .filter(|r| !r.is_empty())
                    .map(|r| ops.copy_rows(&x, r.start, r.len()))
                    .collect::<Result<Vec<_>>>()?;
                drop(x);
                ops.concat(&parts.iter().collect::<Vec<_>>())?
            };
            let h = ops.rms_norm(&rows, &self.output_norm, c.rms_eps)?;
            let out = self.output.as_ref().unwrap_or(&self.embed);
            // f32 logits, as in forward.
            ops.download(&ops.linear(&h, out, DType::F32)?)?
        };
        let mut outputs = Vec::with_capacity(steps.len());
        let mut at = 0;
        for (r, chunk) in wanted.iter().zip(chunks) {
            let len = r.len() * c.vocab_size;
            outputs.push(ForwardOutput {
                logits: logits[at..at + len].to_vec(),
                kv: GpuBlock {
                    len: chunk.len,
                    chunks: vec![chunk],
                },
            });
            at += len;
        }
        Ok(outputs)
    }

    /// O(1): the chunks share the block's tensors and carry the shift (`R(a) R(b) = R(a + b)`).
    fn shift_block(&self, block: &Self::Block, delta: i64) -> Result<Self::Block> {
        let chunks = block
            .chunks
            .iter()
            .map(|ch| {
                Ok(Chunk {
                    len: ch.len,
                    k: ch.k.clone(),
                    v: ch.v.clone(),
                    rope_shift: ch.rope_shift.checked_add(delta).ok_or_else(|| {
                        Error::OutOfRange(format!("RoPE shift {} + {delta}", ch.rope_shift))
                    })?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuBlock {
            len: block.len,
            chunks,
        })
    }

    fn block_bytes(&self, n_tokens: usize) -> usize {
        // bf16, the projections' dtype.
        self.config.kv_bytes(n_tokens, DType::BF16.size())
    }

    fn block_format(&self) -> BlockFormat {
        let c = &self.config;
        BlockFormat {
            // The device's name: the emulator's GEMMs round unlike cuBLAS's.
            encoder: format!("{}-bf16-1", self.ops.name()),
            dtype: StoredDType::BF16,
            layers: c.n_layers,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// Blocks as encoded (one chunk, not shifted); the bf16 values are exact in f32 and back.
    fn save_block(&self, block: &Self::Block) -> Result<Vec<u8>> {
        let [chunk] = block.chunks.as_slice() else {
            return Err(Error::InvalidInput(format!(
                "only a block as encoded is stored, this one has {} chunks",
                block.chunks.len()
            )));
        };
        if chunk.rope_shift != 0 {
            return Err(Error::InvalidInput(
                "only a block as encoded is stored, this one is shifted".into(),
            ));
        }
        let mut out = Vec::with_capacity(block.bytes());
        for (k, v) in chunk.k.iter().zip(&chunk.v) {
            for t in [k, v] {
                for x in self.ops.download(t)? {
                    out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    fn load_block(&self, n_tokens: usize, fill: &mut Fill<'_>) -> Result<Self::Block> {
        let c = &self.config;
        let shape = [n_tokens, c.n_kv_heads, c.head_dim];
        // Layer by layer, K then V: the stored order.
        let mut tensors = self
            .ops
            .upload_bf16_bytes(&shape, 2 * c.n_layers, fill)?
            .into_iter()
            .map(Arc::new);
        let mut chunk = Chunk {
            len: n_tokens,
            k: Vec::with_capacity(c.n_layers),
            v: Vec::with_capacity(c.n_layers),
            rope_shift: 0,
        };
        while let (Some(k), Some(v)) = (tensors.next(), tensors.next()) {
            chunk.k.push(k);
            chunk.v.push(v);
        }
        if chunk.k.len() != c.n_layers {
            return Err(Error::Shape(format!(
                "{} of {} layers uploaded",
                chunk.k.len(),
                c.n_layers
            )));
        }
        Ok(GpuBlock {
            len: n_tokens,
            chunks: vec![chunk],
        })
    }

    fn append_block(&self, block: &mut Self::Block, more: Self::Block) -> Result<()> {
        block.len += more.len;
        block.chunks.extend(more.chunks);
        if block.chunks.len() > MAX_CHUNKS {
            // Merge every chunk after the first (the prompt) into one. The block keeps its chunks
            // until the merge has succeeded, so an error (out of memory) leaves it whole.
            let tail = &block.chunks[1..];
            let layers = self.config.n_layers;
            let mut merged = Chunk {
                len: tail.iter().map(|c| c.len).sum(),
                k: Vec::with_capacity(layers),
                v: Vec::with_capacity(layers),
                rope_shift: 0,
            };
            for l in 0..layers {
                // The merged chunk holds its keys as read: shifted chunks are rotated first.
                let rotated: Vec<Option<D::Tensor>> = tail
                    .iter()
                    .map(|c| {
                        (c.rope_shift != 0)
                            .then(|| {
                                let mut k = self.ops.try_clone(&c.k[l])?;
                                self.ops
                                    .rope_shift(&mut k, &self.config.rope, c.rope_shift)?;
                                Ok(k)
                            })
                            .transpose()
                    })
                    .collect::<Result<_>>()?;
                let ks: Vec<&D::Tensor> = tail
                    .iter()
                    .zip(&rotated)
                    .map(|(c, r)| r.as_ref().unwrap_or(c.k[l].as_ref()))
                    .collect();
                let vs: Vec<&D::Tensor> = tail.iter().map(|c| c.v[l].as_ref()).collect();
                merged.k.push(Arc::new(self.ops.concat(&ks)?));
                merged.v.push(Arc::new(self.ops.concat(&vs)?));
            }
            block.chunks.truncate(1);
            block.chunks.push(merged);
        }
        Ok(())
    }
}
