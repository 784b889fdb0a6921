//! Hugging Face Llama directories: `config.json`, `*.safetensors` (f32, f16, bf16; one file or
//! shards) and `tokenizer.json`. Hugging Face checkpoints keep Q and K in their original row order,
//! so they run with NeoX (rotate-half) RoPE, and `rope_scaling.rope_type = "llama3"` enables
//! Llama 3 frequency scaling.
//!
//! Opening a directory reads and checks only the safetensors headers; each tensor's bytes are read
//! from its file when the model loads it, so a checkpoint is never held in memory whole (16 GB for
//! an 8B model in bf16).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::config::LlamaConfig;
use super::quant::{dequantize, GgmlType};
use super::weights::{hf_name, RawTensor, Weight, WeightSource};
use ape_attn::{Error, Result};
use ape_attn::{Llama3RopeScaling, RopeConfig, RopeLayout};

fn bad(msg: impl Into<String>) -> Error {
    Error::Model(msg.into())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(Error::io_at(path))
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    max_position_embeddings: usize,
    vocab_size: usize,
    rope_scaling: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
}

/// Token ids named in `config.json` under `key` (`eos_token_id` may be one id or a list); an id
/// that is not a non-negative integer below `vocab_size` is an error, not a truncated id.
fn ids(v: &Option<serde_json::Value>, key: &str, vocab_size: usize) -> Result<Vec<u32>> {
    let one = |x: &serde_json::Value| {
        x.as_u64()
            .filter(|&id| id < vocab_size as u64)
            .map(|id| id as u32)
            .ok_or_else(|| {
                bad(format!(
                    "config.json: {key} {x} is not a token id (vocab_size {vocab_size})"
                ))
            })
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// One `.safetensors` file: its path, its checked header, and where the tensor data starts.
struct Shard {
    path: PathBuf,
    metadata: safetensors::tensor::Metadata,
    data_start: u64,
}

/// The length of a safetensors header from the file's first 8 bytes, checked against the size of
/// the file before anything is allocated for it.
pub fn safetensors_header_len(len_field: [u8; 8], file_len: u64) -> Result<usize> {
    let header_len = u64::from_le_bytes(len_field);
    // The safetensors format caps its header at 100 MB.
    if header_len > 100_000_000 || header_len > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "header length {header_len} does not fit the file ({file_len} bytes)"
        )));
    }
    Ok(header_len as usize)
}

/// Parses and checks a safetensors header (the JSON after the length field) of a file of
/// `file_len` bytes: names, dtypes, shapes, contiguous offsets whose sizes match the shapes, and
/// tensor data that fills the rest of the file exactly. Returns the metadata and the offset where
/// the data starts.
pub fn safetensors_metadata(
    header: &[u8],
    file_len: u64,
) -> Result<(safetensors::tensor::Metadata, u64)> {
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + header.len() as u64;
    if (metadata.data_len() as u64).checked_add(data_start) != Some(file_len) {
        return Err(bad(format!(
            "the header describes {} bytes of tensor data, the file holds {}",
            metadata.data_len(),
            file_len.saturating_sub(data_start)
        )));
    }
    Ok((metadata, data_start))
}

/// What a safetensors header entry `info` (named `name`) holds, checked against the `shape` the
/// model expects: the element type and count to convert its bytes from.
fn safetensors_entry(
    name: &str,
    info: &safetensors::tensor::TensorInfo,
    shape: &[usize],
) -> Result<(GgmlType, usize)> {
    if info.shape != shape {
        return Err(bad(format!(
            "{name} has shape {:?}, expected {shape:?}",
            info.shape
        )));
    }
    let ty = match info.dtype {
        safetensors::Dtype::F32 => GgmlType::F32,
        safetensors::Dtype::F16 => GgmlType::F16,
        safetensors::Dtype::BF16 => GgmlType::BF16,
        d => {
            return Err(bad(format!(
                "{name}: dtype {d:?} is not supported (f32, f16, bf16)"
            )))
        }
    };
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("{name}: element count overflows")))?;
    Ok((ty, n))
}

/// A safetensors tensor as f32: its header entry checked as the loader checks it, then `data`
/// (the bytes of its `data_offsets`) converted.
pub fn safetensors_f32(
    name: &str,
    info: &safetensors::tensor::TensorInfo,
    shape: &[usize],
    data: &[u8],
) -> Result<Vec<f32>> {
    let (ty, n) = safetensors_entry(name, info, shape)?;
    dequantize(ty, data, n).map_err(|e| bad(format!("{name}: {e}")))
}

/// Reads and checks a safetensors file's header ([`safetensors_header_len`],
/// [`safetensors_metadata`]). The data itself is not read.
fn read_shard(path: &Path) -> Result<Shard> {
    let io = Error::io_at(path);
    let at = |e: Error| match e {
        Error::Model(m) => bad(format!("{}: {m}", path.display())),
        e => e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| at(bad("shorter than a safetensors header")))?;
    let header_len = safetensors_header_len(len, file_len).map_err(at)?;
    let mut header = vec![0u8; header_len];
    f.read_exact(&mut header).map_err(io)?;
    let (metadata, data_start) = safetensors_metadata(&header, file_len).map_err(at)?;
    Ok(Shard {
        path: path.to_path_buf(),
        metadata,
        data_start,
    })
}

/// A Hugging Face Llama directory: its configuration and its safetensors headers.
pub struct HfModel {
    /// The model's shape.
    pub config: LlamaConfig,
    /// End-of-sequence ids from `config.json`.
    pub eos: Vec<u32>,
    /// Beginning-of-sequence id from `config.json`.
    pub bos: Option<u32>,
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Which shard holds each tensor.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModel")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a Llama `config.json` says: the model's shape and its special token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfigJson {
    /// The model's shape.
    pub config: LlamaConfig,
    /// End-of-sequence ids (`eos_token_id`, one id or a list).
    pub eos: Vec<u32>,
    /// Beginning-of-sequence id (`bos_token_id`).
    pub bos: Option<u32>,
}

/// Parses a Llama `config.json`: the model's shape.
pub fn config_from_json(text: &str) -> Result<LlamaConfig> {
    Ok(parse_config_json(text)?.config)
}

/// Parses a Llama `config.json`: the model's shape and its special token ids, each checked.
pub fn parse_config_json(text: &str) -> Result<HfConfigJson> {
    let c: HfConfig = serde_json::from_str(text).map_err(|e| bad(format!("config.json: {e}")))?;
    if let Some(t) = &c.model_type {
        if t != "llama" {
            return Err(bad(format!(
                "config.json: model_type {t:?} is not supported (only \"llama\")"
            )));
        }
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(bad(
            "config.json: hidden_size is not a multiple of num_attention_heads",
        ));
    }
    let head_dim = c.hidden_size / c.num_attention_heads;
    if c.head_dim.is_some_and(|h| h != head_dim) {
        return Err(bad(
            "config.json: head_dim * num_attention_heads != hidden_size is not supported",
        ));
    }
    let mut rope = RopeConfig::new(head_dim, c.rope_theta.unwrap_or(10_000.0), RopeLayout::Neox)?;
    match &c.rope_scaling {
        None | Some(serde_json::Value::Null) => {}
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|v| v.as_str());
            if kind != Some("llama3") {
                return Err(bad(format!(
                    "config.json: rope_scaling {s} is not supported (only llama3)"
                )));
            }
            let num = |k: &str| {
                s.get(k)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| bad(format!("config.json: rope_scaling.{k} missing")))
            };
            rope = rope.with_llama3_scaling(Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position: num("original_max_position_embeddings")?,
            })?;
        }
    }
    let rms_eps = c.rms_norm_eps as f32;
    if !(rms_eps.is_finite() && rms_eps > 0.0) {
        return Err(bad("config.json: rms_norm_eps must be finite and > 0"));
    }
    let cfg = LlamaConfig {
        dim: c.hidden_size,
        n_layers: c.num_hidden_layers,
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        head_dim,
        hidden_dim: c.intermediate_size,
        vocab_size: c.vocab_size,
        rms_eps,
        rope,
        context_length: c.max_position_embeddings,
    };
    cfg.validate()?;
    let eos = ids(&c.eos_token_id, "eos_token_id", cfg.vocab_size)?;
    let bos = ids(&c.bos_token_id, "bos_token_id", cfg.vocab_size)?;
    Ok(HfConfigJson {
        config: cfg,
        eos,
        bos: bos.first().copied(),
    })
}

impl HfModel {
    /// Reads `config.json` and the header of every `*.safetensors` file of `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let text = String::from_utf8(read(&dir.join("config.json"))?)
            .map_err(|_| bad("config.json is not UTF-8"))?;
        let HfConfigJson { config, eos, bos } = parse_config_json(&text)?;
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(Error::io_at(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(bad(format!("no .safetensors files in {}", dir.display())));
        }
        let shards = paths
            .iter()
            .map(|p| read_shard(p))
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.metadata.offset_keys() {
                if let Some(j) = index.insert(name.clone(), i) {
                    return Err(bad(format!(
                        "tensor {name} is in both {} and {}",
                        shards[j].path.display(),
                        shard.path.display()
                    )));
                }
            }
        }
        Ok(Self {
            config,
            eos,
            bos,
            dir,
            shards,
            index,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A tensor's header entry and its shard.
    fn find(&self, name: &str) -> Option<(&Shard, &safetensors::tensor::TensorInfo)> {
        let shard = &self.shards[*self.index.get(name)?];
        Some((shard, shard.metadata.info(name)?))
    }

    /// A tensor's bytes, read from its file (read_shard checked that they lie within it).
    fn read_data(shard: &Shard, info: &safetensors::tensor::TensorInfo) -> Result<Vec<u8>> {
        let io = Error::io_at(&shard.path);
        let (start, end) = info.data_offsets;
        let mut f = std::fs::File::open(&shard.path).map_err(io)?;
        f.seek(SeekFrom::Start(shard.data_start + start as u64))
            .map_err(io)?;
        let mut data = vec![0u8; end - start];
        f.read_exact(&mut data).map_err(io)?;
        Ok(data)
    }
}

impl WeightSource for HfModel {
    fn load(&self, w: Weight, shape: &[usize]) -> Result<Vec<f32>> {
        let name = hf_name(w);
        let (shard, info) = self
            .find(&name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        let (ty, n) = safetensors_entry(&name, info, shape)?;
        let data = Self::read_data(shard, info)?;
        dequantize(ty, &data, n).map_err(|e| bad(format!("{name}: {e}")))
    }

    fn load_raw(&self, w: Weight, shape: &[usize]) -> Result<RawTensor> {
        let name = hf_name(w);
        let (shard, info) = self
            .find(&name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        let (ty, _) = safetensors_entry(&name, info, shape)?;
        Ok(RawTensor {
            ty,
            data: Self::read_data(shard, info)?.into(),
        })
    }

    fn has(&self, w: Weight) -> bool {
        self.index.contains_key(&hf_name(w))
    }
}
