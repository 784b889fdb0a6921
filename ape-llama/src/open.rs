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
    /// An id for the block cache's keys: the path, the file's size and its tensor count.
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
    let (config, tokenizer, tensors, weights): (
        LlamaConfig,
        Tokenizer,
        usize,
        Box<dyn WeightSource>,
    ) = if path.is_dir() {
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
        (hf.config.clone(), tokenizer, 0, Box::new(hf))
    } else {
        let g = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let n = g.tensors.len();
        (LlamaConfig::from_gguf(&g)?, tokenizer, n, Box::new(g))
    };
    let id = format!(
        "{}:{}:{}",
        path.display(),
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        tensors
    );
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
        id,
    })
}
