//! One function per fuzz target: any input must return normally (an `Err` inside is fine); a
//! panic, a hang, an out-of-bounds read or an allocation above the bound is a finding.

use ape_attn::ApeParams;
use ape_llama::cpu::CpuModel;
use ape_llama::gguf::Gguf;
use ape_llama::hf::{
    parse_config_json, safetensors_f32, safetensors_header_len, safetensors_metadata,
};
use ape_llama::model::{LlamaModel, LogitRows};
use ape_llama::store::format::{
    decode, BlockFormat, BlockSpec, StoredDType, StoredScheme, CHECKSUM_BYTES,
};
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

const ENCODERS: [&str; 4] = ["cpu-q8-2", "cuda-bf16-1", "", "x"];

/// Takes the next `n` bytes of `input`, if there are that many.
fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

fn u16_of(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// The expected spec the input's first bytes describe, and the mode byte.
fn spec_of(input: &mut &[u8]) -> Option<(u8, BlockSpec)> {
    let h = take(input, 5)?;
    let (mode, a, b, pos, model) = (h[0], h[1], h[2], h[3], h[4]);
    let n_prefix = usize::from(b >> 3 & 3);
    let n_tokens = usize::from(b >> 5);
    let ids = take(input, 2 * (n_prefix + n_tokens))?;
    let mut ids = ids.chunks_exact(2).map(|c| u32::from(u16_of(c)));
    let prefix: Vec<u32> = ids.by_ref().take(n_prefix).collect();
    let tokens: Vec<u32> = ids.collect();
    let spec = BlockSpec {
        model: [model; 32],
        format: BlockFormat {
            encoder: ENCODERS[usize::from(a >> 5 & 3)].to_string(),
            dtype: if a >> 3 & 1 == 0 {
                StoredDType::F32
            } else {
                StoredDType::BF16
            },
            layers: 1 + usize::from(a % 3),
            kv_heads: 1 + usize::from(a >> 2 & 1),
            head_dim: 1 + usize::from(b % 8),
        },
        scheme: if a >> 4 & 1 == 0 {
            StoredScheme::Alone
        } else {
            StoredScheme::AfterPrefix
        },
        pos: usize::from(pos),
        prefix,
        tokens,
    };
    Some((mode, spec))
}

/// A candidate that loads is exactly the block of `spec` with the data it loaded as.
fn check_loaded(candidate: &[u8], spec: &BlockSpec) {
    let Ok(data) = decode(candidate, spec) else {
        return;
    };
    assert_eq!(
        data.len(),
        spec.format.data_bytes(spec.tokens.len()),
        "loaded data of another size than the spec's"
    );
    let stored = spec.encode(&data).expect("encode the loaded data");
    assert!(
        stored == candidate,
        "a block loaded that is not the spec's block with its data ({} bytes loaded, {} expected)",
        candidate.len(),
        stored.len()
    );
    assert_eq!(candidate[16..48], spec.key(), "loaded under another key");
}

/// The stored KV block (`ape_llama::store::format`) read back against the block a reader asks
/// for.
///
/// The input's first bytes choose a small expected `BlockSpec`; the rest is a candidate stored
/// block, or the data of one. Three modes (bits of the first byte):
///
/// - plain: `decode(candidate, spec)`;
/// - checksum fixed (bit 0): the candidate's last 32 bytes are replaced by the BLAKE3 of the bytes
///   before them first, so that the header and length checks are what decides;
/// - mutated (bit 1, over bit 0): a valid block of the spec is encoded from the rest of the input,
///   one byte of it is xored with a nonzero value the input chooses, and the result must not load.
///
/// In the first two modes, a candidate that loads must be byte for byte the block of that spec
/// with the data it loaded as (`spec.encode(&data)`): a block never loads under another key, nor
/// with data of another size.
///
/// Input layout (little-endian):
///
/// ```text
/// 0     mode: bit 0 fix the checksum, bit 1 mutate a valid block
/// 1     layers 1 + b % 3 | kv heads 1 + (b >> 2 & 1) | dtype b >> 3 & 1 | scheme b >> 4 & 1
///       | encoder name ENCODERS[b >> 5 & 3]
/// 2     head dim 1 + b % 8 | prefix tokens b >> 3 & 3 | tokens (b >> 5), 0 to 7
/// 3     position
/// 4     model fingerprint: 32 times this byte
/// 5     2 bytes per prefix token id, then 2 per token id (u16)
///       mutated mode only: 2 bytes offset (modulo the block's length), 1 byte xor (0 means 1)
/// ...   the candidate block (mutated mode: its data, repeated or cut to the size the spec needs)
/// ```
pub fn block_file(data: &[u8]) {
    let mut input = data;
    let Some((mode, spec)) = spec_of(&mut input) else {
        return;
    };
    if mode & 2 != 0 {
        let Some(m) = take(&mut input, 3) else {
            return;
        };
        let (at, xor) = (usize::from(u16_of(m)), m[2].max(1));
        let n = spec.format.data_bytes(spec.tokens.len());
        let block_data: Vec<u8> = if input.is_empty() {
            vec![0; n]
        } else {
            input.iter().copied().cycle().take(n).collect()
        };
        let stored = spec.encode(&block_data).expect("encode a valid block");
        assert_eq!(
            stored.len(),
            spec.stored_bytes(),
            "stored_bytes is not the block's length"
        );
        assert_eq!(
            decode(&stored, &spec).expect("a valid block loads"),
            block_data,
            "a valid block loads as other data"
        );
        let mut bad = stored;
        let at = at % bad.len();
        bad[at] ^= xor;
        assert!(
            decode(&bad, &spec).is_err(),
            "a block with byte {at} xored with {xor:#04x} still loads"
        );
    } else if mode & 1 != 0 {
        let mut candidate = input.to_vec();
        if let Some(body) = candidate.len().checked_sub(CHECKSUM_BYTES) {
            let sum = blake3::hash(&candidate[..body]);
            candidate[body..].copy_from_slice(sum.as_bytes());
        }
        check_loaded(&candidate, &spec);
    } else {
        check_loaded(input, &spec);
    }
}

/// A request body of `ape serve` (`POST /v1/chat/completions` and `POST /v1/documents`), as the
/// server parses it before anything else runs: never a panic, and what it accepts is what the
/// server relies on (a last message from the user that is not empty, at most the limits' counts,
/// no empty document or stop sequence, sampling values in their ranges, APE's T and S finite
/// and > 0).
pub fn chat_request(data: &[u8]) {
    use ape_llama::serve::api::{self, ModeChoice, Role};
    let limits = api::Limits::default();
    if let Ok(r) = api::parse_chat_request(data, &limits) {
        let last = r.messages.last().expect("at least one message");
        assert_eq!(last.role, Role::User);
        assert!(!last.content.trim().is_empty());
        assert!(r.messages.len() <= limits.max_messages);
        assert!(r.documents.len() <= limits.max_documents);
        assert!(r.documents.iter().all(|d| !d.text.trim().is_empty()));
        assert!(r.stop.len() <= limits.max_stop && r.stop.iter().all(|s| !s.is_empty()));
        assert!(r.max_tokens != Some(0));
        let s = r.sampling;
        assert!(s.temperature.is_finite() && (0.0..=2.0).contains(&s.temperature));
        assert!(s.top_p > 0.0 && s.top_p <= 1.0);
        if let Some(choice @ ModeChoice::Ape { .. }) = r.mode {
            let mode = choice
                .resolve(ape_llama::engine::Mode::Parallel)
                .expect("checked T and S resolve");
            if let ape_llama::engine::Mode::Ape(p) = mode {
                assert!(p.temperature().is_finite() && p.temperature() > 0.0);
                assert!(p.scale().is_finite() && p.scale() > 0.0);
            }
        }
        // The error body of any request is JSON.
    }
    if let Err(e) = api::parse_documents_request(data, &limits) {
        assert!(e.status == 400);
        assert!(e.body()["error"]["message"].is_string());
    }
}
