//! Every input the fuzzers found a bug with (tests/fixtures/fuzz/<target>/), replayed through the
//! fuzz targets' own bodies (fuzz/src/targets.rs, included by path) under the same allocation
//! bound (fuzz/src/bound.rs). A panic or an allocation past the bound fails this test as it
//! failed the fuzzer. This release build has no overflow checks, so a finding that was an overflow
//! panic must also break an invariant the target asserts (as the saved config.json does);
//! `scripts/fuzz.sh`, in the test command too, replays these files as seeds in the fuzzers' own
//! build, with overflow checks and AddressSanitizer.

#[path = "../../fuzz/src/bound.rs"]
mod bound;
#[path = "../../fuzz/src/targets.rs"]
mod targets;

#[global_allocator]
static ALLOC: bound::BoundedAlloc = bound::BoundedAlloc;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("gguf", targets::gguf),
    ("gguf_tokenizer", targets::gguf_tokenizer),
    ("safetensors", targets::safetensors),
    ("hf_config", targets::hf_config),
    ("block_file", targets::block_file),
    ("chat_request", targets::chat_request),
];

#[test]
fn saved_fuzz_findings_stay_fixed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        // A target without findings has no directory.
        let Ok(entries) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("read a saved input");
            println!("{name}: {}", file.display());
            bound::bound_allocations(data.len());
            target(&data);
            bound::unbound_allocations();
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no saved inputs under {}", root.display());
}
