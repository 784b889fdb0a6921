//! Hugging Face directories: a checkpoint and its GGUF conversion (Q/K rows permuted for
//! interleaved RoPE) give the same logits; config.json parsing (Llama 3 RoPE scaling, refusals);
//! bf16 weights; tokenizer.json.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use ape_attn::{ApeParams, RopeLayout};
use ape_llama::config::LlamaConfig;
use ape_llama::cpu::CpuModel;
use ape_llama::gguf::Gguf;
use ape_llama::hf::{config_from_json, HfModel};
use ape_llama::model::{LlamaModel, LogitRows};
use ape_llama::tokenizer::Tokenizer;
use ape_llama::weights::{gguf_name, hf_name, Weight};
use common::gguf_writer::Writer;
use common::seeded;

const DIM: usize = 16;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = DIM / HEADS;
const LAYERS: usize = 2;
const HIDDEN: usize = 24;
const VOCAB: usize = 11;

fn config_json(extra: &str) -> String {
    format!(
        r#"{{"model_type": "llama", "hidden_size": {DIM}, "intermediate_size": {HIDDEN},
        "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "num_hidden_layers": {LAYERS},
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "vocab_size": {VOCAB}, "eos_token_id": 2, "bos_token_id": 1{extra}}}"#
    )
}

/// Every tensor of the synthetic model in Hugging Face order, with its [out, in] shape.
fn weights(r: &mut common::Seeded) -> Vec<(Weight, Vec<usize>, Vec<f32>)> {
    let kv = KV_HEADS * HD;
    let mut w = vec![
        (Weight::Embedding, vec![VOCAB, DIM]),
        (Weight::OutputNorm, vec![DIM]),
        (Weight::Output, vec![VOCAB, DIM]),
    ];
    for l in 0..LAYERS {
        w.extend([
            (Weight::AttnNorm(l), vec![DIM]),
            (Weight::Q(l), vec![DIM, DIM]),
            (Weight::K(l), vec![kv, DIM]),
            (Weight::V(l), vec![kv, DIM]),
            (Weight::O(l), vec![DIM, DIM]),
            (Weight::FfnNorm(l), vec![DIM]),
            (Weight::Gate(l), vec![HIDDEN, DIM]),
            (Weight::Up(l), vec![HIDDEN, DIM]),
            (Weight::Down(l), vec![DIM, HIDDEN]),
        ]);
    }
    w.into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let v = if shape.len() == 1 {
                r.uniform(n, 0.2).iter().map(|x| 1.0 + x).collect()
            } else {
                r.uniform(n, 0.6)
            };
            (name, shape, v)
        })
        .collect()
}

/// HF row order -> llama.cpp's: within each head, row 2i + j is HF row j * (hd/2) + i.
fn permute_rows(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for h in 0..rows / HD {
        for i in 0..HD / 2 {
            for j in 0..2 {
                let (dst, src) = (h * HD + 2 * i + j, h * HD + j * (HD / 2) + i);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ape-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn write_hf(dir: &std::path::Path, w: &[(Weight, Vec<usize>, Vec<f32>)], bf16: bool) {
    std::fs::write(dir.join("config.json"), config_json("")).expect("write config");
    write_safetensors(&dir.join("model.safetensors"), w, bf16);
}

fn write_safetensors(path: &std::path::Path, w: &[(Weight, Vec<usize>, Vec<f32>)], bf16: bool) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(name, shape, v)| {
            let b: Vec<u8> = if bf16 {
                v.iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            (hf_name(*name), shape.clone(), b)
        })
        .collect();
    let dtype = if bf16 {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).expect("view"),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None::<HashMap<String, String>>).expect("serialize");
    std::fs::write(path, data).expect("write weights");
}

fn gguf_of(w: &[(Weight, Vec<usize>, Vec<f32>)], permute: bool) -> Vec<u8> {
    let mut g = Writer::default();
    g.str("general.architecture", "llama")
        .u32("llama.embedding_length", DIM as u32)
        .u32("llama.attention.head_count", HEADS as u32)
        .u32("llama.attention.head_count_kv", KV_HEADS as u32)
        .u32("llama.block_count", LAYERS as u32)
        .u32("llama.feed_forward_length", HIDDEN as u32)
        .u32("llama.context_length", 128)
        .u32("llama.vocab_size", VOCAB as u32)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .f32("llama.rope.freq_base", 10000.0);
    for (name, shape, v) in w {
        let gguf_name = gguf_name(*name);
        let data = match name {
            Weight::Q(_) | Weight::K(_) if permute => permute_rows(v, shape[0], shape[1]),
            _ => v.clone(),
        };
        let dims: Vec<usize> = shape.iter().rev().copied().collect();
        g.f32_tensor(&gguf_name, &dims, &data);
    }
    g.bytes()
}

fn logits(m: &CpuModel) -> Vec<f32> {
    m.forward(
        &[1, 5, 3, 7, 2, 9],
        0,
        &[],
        &ApeParams::plain(),
        LogitRows::All,
    )
    .expect("forward")
    .logits
}

/// Opens a Hugging Face directory and loads its CPU model.
fn load_hf(dir: &std::path::Path) -> Result<CpuModel, ape_attn::Error> {
    let hf = HfModel::open(dir)?;
    CpuModel::from_source(hf.config.clone(), &hf, |_, _| {})
}

#[test]
fn a_checkpoint_and_its_gguf_conversion_agree() {
    let mut r = seeded("a_checkpoint_and_its_gguf_conversion_agree");
    let w = weights(&mut r);
    let dir = temp_dir("f32");
    write_hf(&dir, &w, false);
    let hf = HfModel::open(&dir).expect("opens");
    assert_eq!(hf.config.rope.layout, RopeLayout::Neox);
    assert_eq!((hf.eos.clone(), hf.bos), (vec![2], Some(1)));
    let from_hf = CpuModel::from_source(hf.config.clone(), &hf, |_, _| {}).expect("loads");
    let g = Gguf::parse(gguf_of(&w, true)).expect("parses");
    let from_gguf = CpuModel::load(&g).expect("loads");
    let (a, b) = (logits(&from_hf), logits(&from_gguf));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(
        diff < 1e-4,
        "HF (NeoX) and GGUF (permuted, interleaved) differ by {diff}"
    );
    // Control: without the permutation the GGUF model computes something else.
    let unpermuted =
        CpuModel::load(&Gguf::parse(gguf_of(&w, false)).expect("parses")).expect("loads");
    let c = logits(&unpermuted);
    let diff = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff > 1e-3, "the test cannot tell the layouts apart");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bf16_checkpoints_load() {
    let mut r = seeded("bf16_checkpoints_load");
    let w = weights(&mut r);
    let dir = temp_dir("bf16");
    write_hf(&dir, &w, true);
    let m = load_hf(&dir).expect("loads");
    let rounded: Vec<(Weight, Vec<usize>, Vec<f32>)> = w
        .iter()
        .map(|(n, s, v)| {
            (
                *n,
                s.clone(),
                v.iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect(),
            )
        })
        .collect();
    let g = Gguf::parse(gguf_of(&rounded, true)).expect("parses");
    let (a, b) = (logits(&m), logits(&CpuModel::load(&g).expect("loads")));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint in shards loads as the same checkpoint in one file; a tensor in two shards is
/// refused (which copy would be meant?).
#[test]
fn sharded_checkpoints_load() {
    let mut r = seeded("sharded_checkpoints_load");
    let w = weights(&mut r);
    let one = temp_dir("one-file");
    write_hf(&one, &w, true);
    let whole = logits(&load_hf(&one).expect("loads"));
    let dir = temp_dir("shards");
    std::fs::write(dir.join("config.json"), config_json("")).expect("write config");
    let (a, b) = w.split_at(w.len() / 3);
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), a, true);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), b, true);
    let sharded = logits(&load_hf(&dir).expect("loads"));
    assert_eq!(sharded, whole, "sharded and whole checkpoints differ");
    // The first shard's tensors once more, in a third file.
    write_safetensors(&dir.join("extra.safetensors"), a, true);
    let err = HfModel::open(&dir)
        .expect_err("a tensor in two files")
        .to_string();
    assert!(err.contains("is in both"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&one);
}

#[test]
fn config_json_parsing() {
    let c: LlamaConfig = config_from_json(&config_json(
        r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    ))
    .expect("llama3 scaling");
    let s = c.rope.llama3_scaling.expect("scaling kept");
    assert_eq!((s.factor, s.original_max_position), (8.0, 8192.0));
    assert_eq!(
        (c.dim, c.n_heads, c.n_kv_heads, c.head_dim),
        (DIM, HEADS, KV_HEADS, HD)
    );
    for bad in [
        config_json(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#),
        config_json(r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#),
        config_json("").replace(r#""model_type": "llama""#, r#""model_type": "mistral""#),
        config_json("").replace(r#""hidden_size": 16"#, r#""hidden_size": 15"#),
        // Degenerate shapes: no window, no layers, no vocabulary.
        config_json("").replace(
            r#""max_position_embeddings": 128"#,
            r#""max_position_embeddings": 0"#,
        ),
        config_json("").replace(
            &format!(r#""num_hidden_layers": {LAYERS}"#),
            r#""num_hidden_layers": 0"#,
        ),
        config_json("").replace(&format!(r#""vocab_size": {VOCAB}"#), r#""vocab_size": 0"#),
        "{}".to_string(),
        "not json".to_string(),
    ] {
        assert_ne!(bad, config_json(""), "the case must change the config");
        assert!(config_from_json(&bad).is_err(), "accepted: {bad}");
    }
    let dir = temp_dir("empty");
    // Token ids that are not ids of this vocabulary (11 tokens) are refused, not truncated.
    for (key, value) in [
        ("eos_token_id", "4294967298"),
        ("eos_token_id", "[2, 11]"),
        ("eos_token_id", "-1"),
        ("bos_token_id", "\"<s>\""),
    ] {
        let c = config_json("").replace(
            &format!(r#""{key}": {}"#, if key == "eos_token_id" { 2 } else { 1 }),
            &format!(r#""{key}": {value}"#),
        );
        assert_ne!(c, config_json(""), "the case must change the config");
        std::fs::write(dir.join("config.json"), &c).expect("write");
        let err = HfModel::open(&dir).expect_err("a bad token id").to_string();
        assert!(err.contains(key) && err.contains("not a token id"), "{err}");
    }
    std::fs::write(dir.join("config.json"), config_json("")).expect("write");
    assert!(HfModel::open(&dir).is_err(), "no safetensors: an error");
    std::fs::write(dir.join("model.safetensors"), b"garbage").expect("write");
    assert!(
        HfModel::open(&dir).is_err(),
        "corrupt safetensors: an error"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens the directory and, when that succeeds, loads the model and runs it: Ok or an error, never
/// a panic (which fails the test).
fn load_everything(dir: &std::path::Path) -> Result<Vec<f32>, ape_attn::Error> {
    let out = load_hf(dir)?.forward(&[1, 2], 0, &[], &ApeParams::plain(), LogitRows::Last)?;
    Ok(out.logits)
}

/// A corrupt checkpoint (flipped bytes, mostly in the safetensors header where the shapes, dtypes
/// and offsets are; every kind of truncation; a config.json with changed digits) is refused with
/// an error or, where the change only touches weight values, loads: never a panic.
#[test]
fn corrupt_checkpoints_never_panic() {
    let mut r = seeded("corrupt_checkpoints_never_panic");
    let w = weights(&mut r);
    let dir = temp_dir("corrupt");
    write_hf(&dir, &w, true);
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).expect("read");
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    assert!(load_everything(&dir).is_ok(), "the intact checkpoint loads");
    let (mut refused, mut loaded) = (0, 0);
    let mut tally = |res: Result<Vec<f32>, ape_attn::Error>| match res {
        Ok(_) => loaded += 1,
        Err(_) => refused += 1,
    };
    for _ in 0..400 {
        let mut b = bytes.clone();
        for _ in 0..r.range(1, 3) {
            let at = if r.range(0, 3) > 0 {
                r.range(0, header_end - 1)
            } else {
                r.range(0, b.len() - 1)
            };
            let any = r.range(0, 255) as u8;
            b[at] = r.pick(&[b'0', b'9', b'[', b'"', b',', 0, 0xff, any]);
        }
        std::fs::write(&st, &b).expect("write");
        tally(load_everything(&dir));
    }
    for cut in (0..bytes.len())
        .step_by(bytes.len() / 97 + 1)
        .chain([bytes.len() - 1])
    {
        std::fs::write(&st, &bytes[..cut]).expect("write");
        assert!(
            load_everything(&dir).is_err(),
            "truncated to {cut} bytes: accepted"
        );
    }
    // Offsets that add up past 2^64 with the header's length: eight U8 tensors of 2^61 - 1 bytes
    // (larger ones overflow the format's own size check).
    let n = (1u64 << 61) - 1;
    let entries: Vec<String> = (0..8u64)
        .map(|t| {
            format!(
                r#""t{t}":{{"dtype":"U8","shape":[{n}],"data_offsets":[{},{}]}}"#,
                t * n,
                (t + 1) * n
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let header = header.as_bytes();
    let mut huge = (header.len() as u64).to_le_bytes().to_vec();
    huge.extend_from_slice(header);
    std::fs::write(&st, &huge).expect("write");
    assert!(
        load_everything(&dir).is_err(),
        "a header past 2^64 bytes: accepted"
    );
    std::fs::write(&st, &bytes).expect("write");
    let config = config_json("");
    let digits: Vec<usize> = config
        .char_indices()
        .filter(|(_, c)| c.is_ascii_digit())
        .map(|(i, _)| i)
        .collect();
    for _ in 0..200 {
        let mut c = config.clone().into_bytes();
        let at = r.pick(&digits);
        c[at] = r.pick(b"0123456789e-.");
        if r.coin() {
            // A long run of digits: numbers that overflow their type.
            c.splice(at..at, std::iter::repeat_n(b'9', 24));
        }
        std::fs::write(dir.join("config.json"), &c).expect("write");
        tally(load_everything(&dir));
    }
    // Both outcomes occur: the mutations reach the checks and also leave loadable files.
    assert!(
        refused > 50 && loaded > 10,
        "{refused} refused, {loaded} loaded"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tokenizer_json_round_trip_keeps_llama_cpp_ids() {
    let g = Gguf::open(common::default_model()).expect("model");
    let from_gguf = Tokenizer::from_gguf(&g).expect("tokenizer");
    let json = from_gguf.to_hf_json().expect("serialise");
    let from_json = Tokenizer::from_hf_json(&json, &[2], Some(1)).expect("tokenizer.json");
    let fixture = common::llamacpp_fixture();
    for case in fixture["tokens"].as_array().expect("tokens") {
        let text = case["text"].as_str().expect("text");
        let want = common::fixture_ids(&case["ids"]);
        assert_eq!(from_json.encode(text).expect("encode"), want, "{text:?}");
    }
    assert!(from_json.stop_tokens.contains(&2));
    assert!(Tokenizer::from_hf_json("{", &[2], None).is_err());
    assert!(Tokenizer::from_hf_json(&json, &[], None).is_err());
}
