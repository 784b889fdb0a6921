//! The byte-level BPE tokenizer stored in a GGUF file (`tokenizer.ggml.model = "gpt2"`), built on
//! the `tokenizers` crate: vocabulary and merges from the file, control tokens (`<|im_start|>`...)
//! recognised in the text, and the pre-tokenizer the file names in `tokenizer.ggml.pre`.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use super::gguf::{Gguf, Value};
use ape_attn::{Error, Result};

/// A text tokenizer with the model's special token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens read as plain text ([`Tokenizer::encode_text`]).
    text: tokenizers::Tokenizer,
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: u32,
    /// Whether the model expects BOS in front of a prompt.
    pub add_bos: bool,
    /// Token ids that end a chat turn (EOS and, when present, `<|im_end|>`).
    pub stop_tokens: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// The ids `t` gives `text` (`add_special`: let its post-processor add special tokens).
fn ids(t: &tokenizers::Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>> {
    let enc = t
        .encode(text, add_special)
        .map_err(|e| bad(format!("tokenize: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// `inner` with its special tokens encoded as plain text.
fn text_only(inner: &tokenizers::Tokenizer) -> tokenizers::Tokenizer {
    let mut text = inner.clone();
    text.set_encode_special_tokens(true);
    text
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Model(msg.into())
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    g.get(key)?
        .as_array()
        .ok_or_else(|| bad(format!("{key} is not an array")))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| bad(format!("{key} holds a non-string")))
        })
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
            )));
        }
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let merges = strings(g, "tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I64(x) => Ok(*x),
                    Value::U64(x) => Ok(*x as i64),
                    _ => Err(bad("tokenizer.ggml.token_type holds a non-integer")),
                })
                .collect::<Result<_>>()?,
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(bad("tokenizer.ggml.token_type and tokens differ in length"));
        }
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let pre_tokenizer = match pre {
            // SmolLM: every digit on its own, then GPT-2's byte-level split.
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ])),
            "gpt2" | "default" => byte_level,
            other => {
                return Err(bad(format!(
                    "pre-tokenizer {other:?} is not supported (\"smollm\", \"gpt2\" are)"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control (3) and user-defined (4) tokens are matched whole in the text.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(text, _)| AddedToken::from(text.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);

        let id = |key: &str| -> Result<Option<u32>> {
            match g.metadata.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| (x as usize) < tokens.len())
                    .map(|x| Some(x as u32))
                    .ok_or_else(|| bad(format!("{key} is not a token id"))),
            }
        };
        let eos = id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| bad("no EOS token id"))?;
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let add_bos = matches!(
            g.metadata.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let mut stop_tokens = vec![eos];
        if let Some(&im_end) = tokens.iter().position(|t| *t == "<|im_end|>").as_ref() {
            if im_end as u32 != eos {
                stop_tokens.push(im_end as u32);
            }
        }
        Ok(Self {
            text: text_only(&inner),
            inner,
            bos,
            eos,
            add_bos,
            stop_tokens,
        })
    }

    /// A tokenizer from a Hugging Face `tokenizer.json` (its own pre-tokenizer, special tokens and
    /// post-processor), with the end-of-sequence ids and BOS from the model's `config.json`.
    pub fn from_hf_json(json: &str, eos: &[u32], bos: Option<u32>) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| bad(format!("tokenizer.json: {e}")))?;
        let eos_first = *eos
            .first()
            .ok_or_else(|| bad("config.json names no eos_token_id"))?;
        let mut stop_tokens = eos.to_vec();
        if let Some(im_end) = inner.token_to_id("<|im_end|>") {
            if !stop_tokens.contains(&im_end) {
                stop_tokens.push(im_end);
            }
        }
        Ok(Self {
            text: text_only(&inner),
            inner,
            bos,
            eos: eos_first,
            // The tokenizer's post-processor decides about BOS (see encode_start).
            add_bos: false,
            stop_tokens,
        })
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` document.
    pub fn to_hf_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| bad(format!("tokenizer.json: {e}")))
    }

    /// Token ids of `text`; special tokens written in the text are recognised. No BOS: prompts
    /// are encoded in parts (see [`Tokenizer::encode_start`] for the first part).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        ids(&self.inner, text, false)
    }

    /// Token ids of `text` with special tokens written in it read as plain text: for passages
    /// and questions, which must not open or close chat turns (a document quoting `<|im_end|>`
    /// gets the tokens of those characters, not the control token).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        ids(&self.text, text, false)
    }

    /// [`Tokenizer::encode`] with BOS in front when the model asks for it: the start of a prompt.
    pub fn encode_start(&self, text: &str) -> Result<Vec<u32>> {
        // With the tokenizer's own post-processor (tokenizer.json), special tokens are its choice.
        let mut out: Vec<u32> = self.bos.filter(|_| self.add_bos).into_iter().collect();
        out.extend(ids(&self.inner, text, true)?);
        Ok(out)
    }

    /// The text of token ids (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| bad(format!("detokenize: {e}")))
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
