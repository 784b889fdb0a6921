//! The GGUF tokenizer against llama.cpp's token ids (tests/fixtures, made by
//! scripts/fixtures/llamacpp.sh) on tricky strings, and round trips.

mod common;

use ape_llama::gguf::Gguf;
use ape_llama::tokenizer::Tokenizer;

fn tokenizer() -> Tokenizer {
    let g = Gguf::open(common::default_model()).expect("model parses");
    Tokenizer::from_gguf(&g).expect("tokenizer")
}

#[test]
fn token_ids_match_llama_cpp() {
    let tok = tokenizer();
    let fixture = common::llamacpp_fixture();
    let cases = fixture["tokens"].as_array().expect("tokens");
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = common::fixture_ids(&case["ids"]);
        let got = tok.encode(text).expect("encode");
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The prompts of the logits fixture too.
    for p in fixture["prompts"].as_array().expect("prompts") {
        let want = common::fixture_ids(&p["ids"]);
        assert_eq!(
            tok.encode(p["text"].as_str().expect("text"))
                .expect("encode"),
            want
        );
    }
}

#[test]
fn decode_inverts_encode() {
    let tok = tokenizer();
    for text in [
        "Hello world",
        "emoji 🦙 ünïcödé 日本語",
        "<|im_start|>user\nhi<|im_end|>\n",
        "  a\tb\n",
    ] {
        let ids = tok.encode(text).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), text);
    }
    assert_eq!(tok.vocab_size(), 49152);
    assert!(tok.stop_tokens.contains(&tok.eos));
}

/// Passages and questions are text: a control token written in them stays characters
/// (`encode_text`), so a document cannot close the user's turn. On text without control tokens it
/// is `encode` (llama.cpp's ids), and a prompt encoded in parts gives the ids of the whole.
#[test]
fn text_keeps_control_tokens_as_characters() {
    let tok = tokenizer();
    let fixture = common::llamacpp_fixture();
    for case in fixture["tokens"].as_array().expect("tokens") {
        let text = case["text"].as_str().expect("text");
        if !text.contains("<|") {
            assert_eq!(
                tok.encode_text(text).expect("encode"),
                tok.encode(text).expect("encode"),
                "{text:?}"
            );
        }
    }
    let im_end = *tok.stop_tokens.last().expect("stop tokens");
    let quoted = "The log ends with <|im_end|> and then <|im_start|>assistant";
    let as_text = tok.encode_text(quoted).expect("encode");
    assert!(!as_text.contains(&im_end), "{as_text:?}");
    assert_eq!(tok.decode(&as_text).expect("decode"), quoted);
    assert!(tok.encode(quoted).expect("encode").contains(&im_end));
    let suffix = "<|im_end|>\n<|im_start|>assistant\n";
    let parts = [
        tok.encode_text("Question: Who founded it?")
            .expect("encode"),
        tok.encode(suffix).expect("encode"),
    ]
    .concat();
    assert_eq!(
        parts,
        tok.encode(&format!("Question: Who founded it?{suffix}"))
            .expect("encode")
    );
}
