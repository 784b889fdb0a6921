//! The GGUF reader: hand-computed dequantisation, a synthetic model through the loader, and
//! robustness on mutated bytes (every truncation, random byte flips, huge counts): a corrupt file
//! is an error, never a panic. The cargo-fuzz target in fuzz/ drives the same entry points.

mod common;

use ape_attn::{ApeParams, Error};
use ape_llama::config::LlamaConfig;
use ape_llama::cpu::CpuModel;
use ape_llama::gguf::Gguf;
use ape_llama::model::{LlamaModel, LogitRows};
use ape_llama::quant::{dequantize, GgmlType};
use ape_llama::tokenizer::Tokenizer;
use common::gguf_writer::Writer;
use common::seeded;

/// A tiny llama model: dim 8, 2 heads of 4, 1 KV head, 2 layers, hidden 16, a 6-token vocabulary.
fn tiny_model(seed_values: &mut common::Seeded) -> Vec<u8> {
    let (d, kv, h, vocab) = (8, 4, 16, 6);
    let mut w = Writer::default();
    w.str("general.architecture", "llama")
        .u32("llama.embedding_length", d as u32)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .u32("llama.block_count", 2)
        .u32("llama.feed_forward_length", h as u32)
        .u32("llama.context_length", 64)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .f32("llama.rope.freq_base", 10000.0)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "gpt2")
        .strs(
            "tokenizer.ggml.tokens",
            &["a", "b", "c", "ab", "<|endoftext|>", "Ġ"],
        )
        .strs("tokenizer.ggml.merges", &["a b"])
        .u32("tokenizer.ggml.eos_token_id", 4);
    let mut r = |n: usize| seed_values.uniform(n, 0.5);
    w.f32_tensor("token_embd.weight", &[d, vocab], &r(d * vocab));
    w.f32_tensor("output_norm.weight", &[d], &vec![1.0; d]);
    for l in 0..2 {
        let t = |name: &str| format!("blk.{l}.{name}");
        w.f32_tensor(&t("attn_norm.weight"), &[d], &vec![1.0; d]);
        w.f32_tensor(&t("ffn_norm.weight"), &[d], &vec![1.0; d]);
        w.f32_tensor(&t("attn_q.weight"), &[d, d], &r(d * d));
        w.f32_tensor(&t("attn_k.weight"), &[d, kv], &r(d * kv));
        w.f32_tensor(&t("attn_v.weight"), &[d, kv], &r(d * kv));
        w.f32_tensor(&t("attn_output.weight"), &[d, d], &r(d * d));
        w.f32_tensor(&t("ffn_gate.weight"), &[d, h], &r(d * h));
        w.f32_tensor(&t("ffn_up.weight"), &[d, h], &r(d * h));
        w.f32_tensor(&t("ffn_down.weight"), &[h, d], &r(h * d));
    }
    w.bytes()
}

/// Everything a user does with a file: parse, read the config, build the tokenizer, load and run.
fn load_everything(bytes: Vec<u8>) -> Result<(), Error> {
    let g = Gguf::parse(bytes)?;
    LlamaConfig::from_gguf(&g)?;
    let _ = Tokenizer::from_gguf(&g);
    let m = CpuModel::load(&g)?;
    m.forward(&[0, 1], 0, &[], &ApeParams::plain(), LogitRows::Last)?;
    Ok(())
}

#[test]
fn a_synthetic_model_loads_and_runs() {
    let mut r = seeded("a_synthetic_model_loads_and_runs");
    let bytes = tiny_model(&mut r);
    let g = Gguf::parse(bytes.clone()).expect("parses");
    let c = LlamaConfig::from_gguf(&g).expect("config");
    assert_eq!(
        (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.n_layers),
        (8, 2, 1, 4, 2)
    );
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
    assert_eq!(tok.encode("ab").expect("encode"), vec![3]);
    let m = CpuModel::load(&g).expect("loads");
    let out = m
        .forward(&[0, 3, 2], 0, &[], &ApeParams::plain(), LogitRows::All)
        .expect("forward");
    assert_eq!(out.logits.len(), 3 * 6);
    assert!(out.logits.iter().all(|x| x.is_finite()));
    load_everything(bytes).expect("the whole path");
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let mut r = seeded("every_truncation_is_an_error_not_a_panic");
    let bytes = tiny_model(&mut r);
    for len in 0..bytes.len() {
        assert!(
            load_everything(bytes[..len].to_vec()).is_err(),
            "truncated to {len} bytes loaded"
        );
    }
}

#[test]
fn mutated_bytes_never_panic() {
    let mut r = seeded("mutated_bytes_never_panic");
    let bytes = tiny_model(&mut r);
    let header_end = bytes.len() - 2000.min(bytes.len() / 2);
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..r.range(1, 4) {
            // Mostly in the header, where the lengths and counts are.
            let at = if r.coin() {
                r.range(0, header_end)
            } else {
                r.range(0, b.len() - 1)
            };
            b[at] = r.range(0, 255) as u8;
        }
        let _ = load_everything(b);
    }
    // Huge counts and lengths at every 8-byte-aligned field of the header.
    for at in (4..header_end.saturating_sub(8)).step_by(4) {
        for v in [u64::MAX, u64::MAX / 2, 1 << 40, 0xffff_ffff] {
            let mut b = bytes.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            let _ = load_everything(b);
        }
    }
}

#[test]
fn corrupt_headers_say_what_is_wrong() {
    let mut r = seeded("corrupt_headers_say_what_is_wrong");
    let bytes = tiny_model(&mut r);
    let msg = |b: Vec<u8>| match Gguf::parse(b) {
        Err(Error::Model(m)) => m,
        other => panic!("expected a model error, got {other:?}"),
    };
    assert!(msg(b"GGML....".to_vec()).contains("not a GGUF file"));
    let mut v = bytes.clone();
    v[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(msg(v).contains("version 9"));
    assert!(msg(bytes[..bytes.len() - 10].to_vec()).contains("beyond the end"));
    // An unsupported architecture is refused by the loader.
    let mut w = Writer::default();
    w.str("general.architecture", "mamba");
    let g = Gguf::parse(w.bytes()).expect("parses");
    assert!(matches!(LlamaConfig::from_gguf(&g), Err(Error::Model(m)) if m.contains("mamba")));
    // An unknown tensor type names itself.
    let mut w = Writer::default();
    w.tensor("x", &[32], 99, &[0; 64]);
    assert!(msg(w.bytes()).contains("unknown ggml type 99"));
    let mut w = Writer::default();
    w.tensor("x", &[256], 13, &[0; 176]);
    assert!(msg(w.bytes()).contains("not supported"));
}

// ---- dequantisation, expected values from the block formats by hand ----

#[test]
fn hand_computed_blocks() {
    let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    // Q8_0: d = 0.5, q = [-2, 0, 3, 127, -128, 0...]: x = d * q.
    let mut b = f16(0.5).to_vec();
    let mut q = [0i8; 32];
    q[..5].copy_from_slice(&[-2, 0, 3, 127, -128]);
    b.extend(q.iter().map(|&x| x as u8));
    let x = dequantize(GgmlType::Q8_0, &b, 32).expect("q8_0");
    assert_eq!(&x[..5], &[-1.0, 0.0, 1.5, 63.5, -64.0]);
    // Q4_1: d = 0.25, m = -1; byte 0 = 0xC3: x[0] = 0.25*3 - 1 = -0.25, x[16] = 0.25*12 - 1 = 2.
    let mut b = f16(0.25).to_vec();
    b.extend(f16(-1.0));
    b.extend([0xC3u8].iter().chain([0u8; 15].iter()));
    let x = dequantize(GgmlType::Q4_1, &b, 32).expect("q4_1");
    assert_eq!((x[0], x[16], x[1], x[17]), (-0.25, 2.0, -1.0, -1.0));
    // Q4_0: d = 2; byte 0 = 0x09: x[0] = 2*(9-8) = 2, x[16] = 2*(0-8) = -16.
    let mut b = f16(2.0).to_vec();
    b.extend([0x09u8].iter().chain([0x88u8; 15].iter()));
    let x = dequantize(GgmlType::Q4_0, &b, 32).expect("q4_0");
    assert_eq!((x[0], x[16], x[1], x[17]), (2.0, -16.0, 0.0, 0.0));
    // F16 and BF16: 1.5 and -2.
    let x = dequantize(GgmlType::F16, &[0x00, 0x3E, 0x00, 0xC0], 2).expect("f16");
    assert_eq!(x, vec![1.5, -2.0]);
    let x = dequantize(GgmlType::BF16, &[0xC0, 0x3F, 0x00, 0xC0], 2).expect("bf16");
    assert_eq!(x, vec![1.5, -2.0]);
    // Wrong sizes are errors.
    assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_err());
    assert!(dequantize(GgmlType::Q4_1, &[0; 20], 31).is_err());
}

/// Q4_K and Q6_K against llama.cpp's own Python implementation (the gguf package) on random
/// blocks: tests/fixtures/kquants.json, made by scripts/fixtures/kquants.py.
#[test]
fn k_quants_match_the_gguf_package() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kquants.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json");
    for (name, ty) in [("Q4_K", GgmlType::Q4K), ("Q6_K", GgmlType::Q6K)] {
        let hex = fixture[name]["bytes"].as_str().expect("bytes");
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let want: Vec<f32> = fixture[name]["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_f64().expect("f") as f32)
            .collect();
        let got = dequantize(ty, &raw, want.len()).expect("dequantize");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-6 * scale,
            "{name}: worst difference {worst} (scale {scale})"
        );
    }
}
