//! Opening a model from a path, as the command line and the evaluation do: a directory is a
//! Hugging Face checkpoint (`config.json`, `*.safetensors`, `tokenizer.json`), a file is GGUF.

use std::path::Path;

use super::config::LlamaConfig;
use super::gguf::Gguf;
use super::hf::HfModel;
use super::tokenizer::Tokenizer;
use super::weights::WeightSource;
use ape_attn::{Error, Result};

/// A model's files, opened: nothing but the headers is read yet (the weights are read as a
/// forward pass loads them from [`ModelFiles::weights`]).
pub struct ModelFiles {
    /// The configuration.
    pub config: LlamaConfig,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The weights.
    pub weights: Box<dyn WeightSource>,
    /// BLAKE3 of the model's bytes: the GGUF file (weights, configuration and tokenizer), or
    /// the Hugging Face folder's `config.json` and `*.safetensors`. Part of every stored block's
    /// key: another file, or the same model quantised otherwise, never reads these blocks.
    pub fingerprint: [u8; 32],
    /// The fingerprint in hex: the block cache's model id.
    pub id: String,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Opens the GGUF file or Hugging Face checkpoint directory at `path`, with its tokenizer.
pub fn open(path: &Path) -> Result<ModelFiles> {
    let (config, tokenizer, weights): (LlamaConfig, Tokenizer, Box<dyn WeightSource>) = if path
        .is_dir()
    {
        if !path.join("config.json").is_file() {
            return Err(Error::Model(format!(
                    "{} is a directory without config.json: a model is a GGUF file or a Hugging Face checkpoint directory",
                    path.display()
                )));
        }
        let hf = HfModel::open(path)?;
        let json_path = path.join("tokenizer.json");
        let json = std::fs::read_to_string(&json_path).map_err(Error::io_at(&json_path))?;
        let tokenizer = Tokenizer::from_hf_json(&json, &hf.eos, hf.bos)?;
        (hf.config.clone(), tokenizer, Box::new(hf))
    } else {
        let g = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        (LlamaConfig::from_gguf(&g)?, tokenizer, Box::new(g))
    };
    let fingerprint = fingerprint(path)?;
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
        fingerprint,
        id: crate::store::hex(&fingerprint),
    })
}

/// BLAKE3 of a model's bytes (see [`ModelFiles::fingerprint`]), each file memory-mapped and
/// hashed on every core (the default model's 98 MB: about 0.1 s on two cores).
pub fn fingerprint(path: &Path) -> Result<[u8; 32]> {
    let add = |h: &mut blake3::Hasher, p: &Path| -> Result<()> {
        // The name within the model and the length delimit each file's bytes.
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let len = std::fs::metadata(p).map_err(Error::io_at(p))?.len();
        h.update(&len.to_le_bytes());
        h.update_mmap_rayon(p).map_err(Error::io_at(p))?;
        Ok(())
    };
    let mut h = blake3::Hasher::new();
    if path.is_dir() {
        h.update(b"hf");
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(Error::io_at(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        add(&mut h, &path.join("config.json"))?;
        for f in &files {
            add(&mut h, f)?;
        }
    } else {
        h.update(b"gguf");
        add(&mut h, path)?;
    }
    Ok(*h.finalize().as_bytes())
}
