//! The GPU forward pass: bf16 weights on the device, cuBLAS GEMMs (bf16 in, f32 accumulate), and
//! the crate's kernels for everything else: embedding, RMSNorm, RoPE, `silu * up`, and the
//! segmented attention for every mode. It implements [`LlamaModel`], so the engine's four modes
//! run on it unchanged.
//!
//! A block's K/V are a list of chunks in position order, each `[len, n_kv_heads, head_dim]` per
//! layer; every chunk is one segment for the attention kernel. Appending a decode step adds a
//! chunk instead of copying the block (small chunks are merged once there are many), and a
//! Block-Attention shift copies nothing: it records the shift on the block's chunks, and the
//! attention kernel reads their keys rotated ([`RopeShift`]) from the cached tensors.
//!
//! Status: written against the CPU path's API and tested on a GPU only by the ignored tests in
//! `tests/gpu_llama.rs`; see issue #4.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use half::bf16;

use super::config::LlamaConfig;
use super::model::{check_inputs, ForwardOutput, KvBlock, LlamaModel, LogitRows, Past};
use super::weights::{Weight, WeightSource};
use crate::cuda::{self, llama_ops, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::params::{ApeParams, AttentionDims, RopeShift, SegmentRole};

struct GpuLayer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// A Llama model on one GPU.
pub struct GpuModel {
    dev: Arc<Device>,
    blas: CudaBlas,
    config: LlamaConfig,
    dims: AttentionDims,
    embed: Tensor,
    layers: Vec<GpuLayer>,
    output_norm: Tensor,
    output: Option<Tensor>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One run of tokens' K/V, every layer.
struct Chunk {
    len: usize,
    k: Vec<Arc<Tensor>>,
    v: Vec<Arc<Tensor>>,
    /// RoPE positions the keys are read rotated by (Block-Attention); the tensors hold them as
    /// computed.
    rope_shift: i64,
}

/// K and V of a run of tokens on the GPU (see the module docs).
pub struct GpuBlock {
    len: usize,
    chunks: Vec<Chunk>,
}

impl std::fmt::Debug for GpuBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBlock")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl KvBlock for GpuBlock {
    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> usize {
        self.chunks
            .iter()
            .flat_map(|c| c.k.iter().chain(&c.v))
            .map(|t| t.len() * t.dtype().size())
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

impl GpuModel {
    /// Uploads the weights of a model of shape `config` from any file format, as bf16.
    pub fn from_source(
        dev: Arc<Device>,
        config: LlamaConfig,
        src: &dyn WeightSource,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let n_layers = config.n_layers;
        let output = if src.has(Weight::Output) {
            let data = src.load(Weight::Output, &[config.vocab_size, config.dim])?;
            Some(Tensor::from_f32(
                &dev,
                &[config.vocab_size, config.dim],
                &data,
                DType::BF16,
            )?)
        } else {
            None
        };
        Self::build(dev, config, output, |dev, w, shape| {
            if let Weight::AttnNorm(l) = w {
                progress(l, n_layers);
            }
            Tensor::from_f32(dev, shape, &src.load(w, shape)?, DType::BF16)
        })
    }

    /// Synthetic weights of any Llama shape, generated on the device from `seed` (uniform, scaled
    /// by `1/sqrt(fan_in)`; norms 1; output tied to the embedding): for benchmarks at shapes no
    /// file here has.
    pub fn synthetic(dev: Arc<Device>, config: LlamaConfig, seed: u32) -> Result<Self> {
        let mut k = 0u32;
        Self::build(dev, config, None, |dev, _w, shape| {
            let mut t = Tensor::zeros(dev, shape, DType::BF16)?;
            k += 1;
            let (scale, offset) = match shape {
                [_] => (0.0, 1.0),
                [_, fan_in] => (1.0 / (*fan_in as f32).sqrt(), 0.0),
                _ => (0.0, 0.0),
            };
            llama_ops::fill_uniform(
                dev,
                &mut t,
                seed.wrapping_mul(7919).wrapping_add(k),
                scale,
                offset,
            )?;
            Ok(t)
        })
    }

    fn build(
        dev: Arc<Device>,
        config: LlamaConfig,
        output: Option<Tensor>,
        mut make: impl FnMut(&Device, Weight, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        let dims = config.attention_dims()?;
        if !cuda::segmented_attention::SUPPORTED_HEAD_DIMS.contains(&config.head_dim) {
            return Err(Error::UnsupportedHeadDim {
                op: "GPU forward pass",
                head_dim: config.head_dim,
                supported: cuda::segmented_attention::SUPPORTED_HEAD_DIMS,
            });
        }
        let mut tensors: Vec<(Weight, Tensor)> = Vec::new();
        for (w, shape) in weight_shapes(&config) {
            tensors.push((w, make(&dev, w, &shape)?));
        }
        let mut take = |w: Weight| -> Result<Tensor> {
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
        let blas = CudaBlas::new(dev.stream().clone())?;
        Ok(Self {
            dev,
            blas,
            config,
            dims,
            embed,
            layers,
            output_norm,
            output,
        })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// `y[n, out] (+)= x[n, in] W^T` with `W` `[out, in]`, all bf16 (cuBLAS, f32 accumulation).
    fn linear_into(&self, x: &Tensor, w: &Tensor, y: &mut Tensor, accumulate: bool) -> Result<()> {
        let (xs, ws) = (x.shape(), w.shape());
        if xs.len() != 2 || ws.len() != 2 || xs[1] != ws[1] || y.shape() != [xs[0], ws[0]] {
            return Err(Error::Shape(format!(
                "linear: x {xs:?}, W {ws:?}, y {:?}",
                y.shape()
            )));
        }
        let to_i32 = |v: usize| {
            i32::try_from(v).map_err(|_| Error::OutOfRange(format!("GEMM dim {v} exceeds i32")))
        };
        let (n, din, dout) = (to_i32(xs[0])?, to_i32(xs[1])?, to_i32(ws[0])?);
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: dout,
            n,
            k: din,
            alpha: bf16::ONE,
            lda: din,
            ldb: din,
            beta: if accumulate { bf16::ONE } else { bf16::ZERO },
            ldc: dout,
        };
        let (w_len, x_len, y_len) = (w.len(), x.len(), y.len());
        // SAFETY: every tensor is bf16 (the model only holds bf16 tensors and makes its
        // activations bf16), so their byte buffers hold exactly len bf16 values.
        let a = unsafe { w.buf().transmute::<bf16>(w_len) };
        let b = unsafe { x.buf().transmute::<bf16>(x_len) };
        let mut c = unsafe { y.buf_mut().transmute_mut::<bf16>(y_len) }
            .ok_or_else(|| Error::Shape("linear: output buffer too small".into()))?;
        let (a, b) = a
            .zip(b)
            .ok_or_else(|| Error::Shape("linear: input buffer too small".into()))?;
        // SAFETY: column-major view of row-major data: C (dout x n, ld dout) = op_T(W) (dout x din,
        // stored din x dout with ld din) * X (din x n, ld din); the shapes were checked above.
        unsafe { self.blas.gemm(cfg, &a, &b, &mut c) }?;
        Ok(())
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        // cuBLAS with beta = 0 writes all of y and never reads it: no zero fill needed.
        let mut y = Tensor::uninit(&self.dev, &[x.shape()[0], w.shape()[0]], DType::BF16)?;
        self.linear_into(x, w, &mut y, false)?;
        Ok(y)
    }

    /// Rows `[a; b; ...]` of equally shaped tensors, in one new tensor.
    fn concat(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let rows: usize = parts.iter().map(|t| t.shape()[0]).sum();
        let mut shape = parts[0].shape().to_vec();
        shape[0] = rows;
        let mut out = Tensor::zeros(&self.dev, &shape, parts[0].dtype())?;
        let mut at = 0;
        for t in parts {
            let bytes = t.len() * t.dtype().size();
            if bytes > 0 {
                let mut dst = out.buf_mut().slice_mut(at..at + bytes);
                self.dev.stream().memcpy_dtod(t.buf(), &mut dst)?;
            }
            at += bytes;
        }
        Ok(out)
    }
}

impl LlamaModel for GpuModel {
    type Block = GpuBlock;

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn forward(
        &self,
        tokens: &[u32],
        pos: usize,
        past: &[Past<'_, GpuBlock>],
        ape: &ApeParams,
        logits: LogitRows,
    ) -> Result<ForwardOutput<GpuBlock>> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Shape(
                "a forward pass needs at least one token".into(),
            ));
        }
        check_inputs(c, tokens, pos, past)?;
        let dev = &*self.dev;
        let mut x = llama_ops::embedding(dev, tokens, &self.embed)?;
        let mut chunk = Chunk {
            len: n,
            k: Vec::with_capacity(c.n_layers),
            v: Vec::with_capacity(c.n_layers),
            rope_shift: 0,
        };
        for (l, w) in self.layers.iter().enumerate() {
            let h = llama_ops::rms_norm(dev, &x, &w.attn_norm, c.rms_eps)?;
            let mut q = self
                .linear(&h, &w.wq)?
                .reshape(&[n, c.n_heads, c.head_dim])?;
            let mut k = self
                .linear(&h, &w.wk)?
                .reshape(&[n, c.n_kv_heads, c.head_dim])?;
            let v = self
                .linear(&h, &w.wv)?
                .reshape(&[n, c.n_kv_heads, c.head_dim])?;
            cuda::rope_apply(dev, &mut q, &c.rope, pos as i64)?;
            cuda::rope_apply(dev, &mut k, &c.rope, pos as i64)?;
            let mut segments = Vec::new();
            for p in past {
                let mut offset = p.pos_offset;
                for ch in &p.kv.chunks {
                    segments.push(cuda::Segment {
                        k: &ch.k[l],
                        v: &ch.v[l],
                        pos_offset: offset,
                        role: p.role,
                        rope_shift: (ch.rope_shift != 0).then_some(RopeShift {
                            rope: c.rope,
                            delta: ch.rope_shift,
                        }),
                    });
                    offset += ch.len;
                }
            }
            segments.push(cuda::Segment {
                k: &k,
                v: &v,
                pos_offset: pos,
                role: SegmentRole::Causal,
                rope_shift: None,
            });
            let query = cuda::Query {
                data: &q,
                pos_offset: pos,
            };
            let (o, _lse) = cuda::segmented_attention(dev, &query, &segments, &self.dims, ape)?;
            drop(segments);
            self.linear_into(&o.reshape(&[n, c.dim])?, &w.wo, &mut x, true)?;
            let h = llama_ops::rms_norm(dev, &x, &w.ffn_norm, c.rms_eps)?;
            let gate = self.linear(&h, &w.w_gate)?;
            let up = self.linear(&h, &w.w_up)?;
            let a = llama_ops::silu_mul(dev, &gate, &up)?;
            self.linear_into(&a, &w.w_down, &mut x, true)?;
            chunk.k.push(Arc::new(k));
            chunk.v.push(Arc::new(v));
        }
        let logits = match logits {
            LogitRows::None => Vec::new(),
            rows => {
                let last = if rows == LogitRows::Last {
                    x.copy_rows(dev, n - 1, 1)?
                } else {
                    x
                };
                let h = llama_ops::rms_norm(dev, &last, &self.output_norm, c.rms_eps)?;
                let out = self.output.as_ref().unwrap_or(&self.embed);
                self.linear(&h, out)?.to_f32(dev)?
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

    /// O(1): the chunks share the block's tensors and carry the shift (`R(a) R(b) = R(a + b)`).
    fn shift_block(&self, block: &GpuBlock, delta: i64) -> Result<GpuBlock> {
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

    fn append_block(&self, block: &mut GpuBlock, more: GpuBlock) -> Result<()> {
        block.len += more.len;
        block.chunks.extend(more.chunks);
        if block.chunks.len() > MAX_CHUNKS {
            // Merge every chunk after the first (the prompt) into one.
            let tail: Vec<Chunk> = block.chunks.drain(1..).collect();
            let layers = self.config.n_layers;
            let mut merged = Chunk {
                len: tail.iter().map(|c| c.len).sum(),
                k: Vec::with_capacity(layers),
                v: Vec::with_capacity(layers),
                rope_shift: 0,
            };
            for l in 0..layers {
                // The merged chunk holds its keys as read: shifted chunks are rotated first.
                let rotated: Vec<Option<Tensor>> = tail
                    .iter()
                    .map(|c| {
                        (c.rope_shift != 0)
                            .then(|| {
                                let mut k = c.k[l].try_clone(&self.dev)?;
                                cuda::rope_shift(
                                    &self.dev,
                                    &mut k,
                                    &self.config.rope,
                                    c.rope_shift,
                                )?;
                                Ok(k)
                            })
                            .transpose()
                    })
                    .collect::<Result<_>>()?;
                let ks: Vec<&Tensor> = tail
                    .iter()
                    .zip(&rotated)
                    .map(|(c, r)| r.as_ref().unwrap_or(c.k[l].as_ref()))
                    .collect();
                let vs: Vec<&Tensor> = tail.iter().map(|c| c.v[l].as_ref()).collect();
                merged.k.push(Arc::new(self.concat(&ks)?));
                merged.v.push(Arc::new(self.concat(&vs)?));
            }
            block.chunks.push(merged);
        }
        Ok(())
    }
}
