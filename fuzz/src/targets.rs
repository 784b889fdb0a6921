//! One function per fuzz target: any input must return normally (an `Err` inside is fine); a
//! panic, a hang, an out-of-bounds read or an allocation above the bound is a finding.

use ape_attn::ApeParams;
use ape_llama::cpu::CpuModel;
use ape_llama::gguf::Gguf;
use ape_llama::hf::{
    parse_config_json, safetensors_f32, safetensors_header_len, safetensors_metadata,
};
use ape_llama::model::{LlamaModel, LogitRows};
use ape_llama::tokenizer::Tokenizer;

/// The GGUF reader end to end: header, metadata, tensor directory, every tensor dequantised
/// (every supported type), the config, the CPU model's load and one token through it. (The
/// tokenizer has its own target, [`gguf_tokenizer`].)
pub fn gguf(data: &[u8]) {
    let Ok(g) = Gguf::parse(data.to_vec()) else {
        return;
    };
    for info in g.tensors.values() {
        let _ = g.tensor_f32(&info.name, &info.dims);
    }
    if let Ok(model) = CpuModel::load(&g) {
        let _ = model.forward(&[0], 0, &[], &ApeParams::plain(), LogitRows::Last);
    }
}

const TEXTS: [&str; 3] = [
    "<|im_start|>user\nWho founded the Lantern Bakery in 1987?<|im_end|>\n",
    "  tabs\tand 12345 digits, \u{fc}mlauts, \u{6f22}\u{5b57} and emoji \u{1f35e}\n",
    "",
];

/// The tokenizer a GGUF file's metadata describes (vocabulary, merges, token types,
/// pre-tokenizer, special ids), built and used: text with and without control tokens encoded,
/// ids decoded (the vocabulary's, the special ones, and ones past its end).
pub fn gguf_tokenizer(data: &[u8]) {
    let Ok(g) = Gguf::parse(data.to_vec()) else {
        return;
    };
    let Ok(t) = Tokenizer::from_gguf(&g) else {
        return;
    };
    for text in TEXTS {
        for ids in [t.encode(text), t.encode_text(text), t.encode_start(text)]
            .into_iter()
            .flatten()
        {
            let _ = t.decode(&ids);
        }
    }
    let n = t.vocab_size() as u32;
    let mut ids: Vec<u32> = (0..n.min(64)).collect();
    ids.extend([t.eos, n, n.wrapping_add(1), u32::MAX]);
    ids.extend(t.bos);
    let _ = t.decode(&ids);
}

/// A safetensors file as the Hugging Face loader reads it: the length field, the JSON header
/// (names, dtypes, shapes, offsets), the check that the data fills the file, and every tensor
/// converted to f32 (and refused under another shape).
pub fn safetensors(data: &[u8]) {
    let file_len = data.len() as u64;
    let Some(len_field) = data.first_chunk::<8>() else {
        return;
    };
    let Ok(header_len) = safetensors_header_len(*len_field, file_len) else {
        return;
    };
    let Ok((metadata, data_start)) = safetensors_metadata(&data[8..8 + header_len], file_len)
    else {
        return;
    };
    for (name, info) in metadata.tensors() {
        // The metadata check promised that these offsets lie inside the file.
        let (start, end) = info.data_offsets;
        let at = data_start as usize;
        let bytes = &data[at + start..at + end];
        let _ = safetensors_f32(&name, info, &info.shape, bytes);
        let mut other = info.shape.clone();
        other.push(2);
        assert!(safetensors_f32(&name, info, &other, bytes).is_err());
    }
}

/// A Hugging Face `config.json` as the loader reads it: the shape (heads, head dim, GQA, RoPE
/// base and Llama 3 scaling, norm epsilon, window) and the special token ids. What it accepts,
/// the rest of the crate relies on: a valid shape whose sizes can be computed with.
pub fn hf_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse_config_json(text) else {
        return;
    };
    let c = &parsed.config;
    assert!(c.validate().is_ok());
    assert_eq!(c.n_heads * c.head_dim, c.dim);
    assert!(parsed
        .eos
        .iter()
        .chain(&parsed.bos)
        .all(|&id| (id as usize) < c.vocab_size));
    // The K and V of a full window in f32 can be counted (overflow checks or not).
    let window_bytes = [2, c.n_layers, c.context_length, c.kv_dim(), 4]
        .into_iter()
        .try_fold(1usize, usize::checked_mul);
    assert!(
        window_bytes.is_some(),
        "accepted a shape that overflows: {c:?}"
    );
    assert_eq!(Some(c.kv_bytes(c.context_length, 4)), window_bytes);
}
