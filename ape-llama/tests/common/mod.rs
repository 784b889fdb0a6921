//! Test helpers of the model crate: ape-attn's (seeded randomness, RoPE configurations, the
//! kernel backends), the default model, the llama.cpp fixture and a GGUF writer.
#![allow(dead_code)]

#[path = "../../../tests/common/mod.rs"]
mod kernel;
#[allow(unused_imports)]
pub use kernel::*;

pub mod gguf_writer;

/// The repository root (the workspace's, above this crate), where `.cache/models/` is.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ape-llama sits in the workspace root")
        .to_path_buf()
}

/// The default real model (fetched by scripts/fetch-model.sh, which the test command runs), or
/// `$APE_MODEL`. A missing model fails the test: it must not pass silently.
pub fn default_model() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("APE_MODEL") {
        return p.into();
    }
    let p = workspace_root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh (the test command does)",
        p.display()
    );
    p
}

/// The llama.cpp fixture (scripts/fixtures/llamacpp.sh), from the folder `$APE_FIXTURES` when
/// set, else from the source tree the test was built in or `ape-llama/tests/fixtures` under the current
/// directory (a GPU machine runs binaries built elsewhere, from its copy of the repository root).
pub fn llamacpp_fixture() -> serde_json::Value {
    let name = "smollm2_llamacpp.json";
    let dirs: Vec<std::path::PathBuf> = match std::env::var_os("APE_FIXTURES") {
        Some(dir) => vec![dir.into()],
        None => vec![
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
            "ape-llama/tests/fixtures".into(),
        ],
    };
    let p = dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
    let p = p.unwrap_or_else(|| {
        panic!("{name} is in none of {dirs:?}: set APE_FIXTURES to the repository's ape-llama/tests/fixtures")
    });
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture")).expect("fixture JSON")
}

/// A JSON array of token ids from the fixture.
pub fn fixture_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}
