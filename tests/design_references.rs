//! Every `docs/DESIGN.md §N` or `§N.M` cited in the code, the scripts and the README names a
//! heading of docs/DESIGN.md.

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| {
            ["rs", "cu", "cuh", "h", "cpp", "sh", "py", "md"].contains(&x.to_str().unwrap_or(""))
        }) {
            out.push(p);
        }
    }
}

#[test]
fn every_design_reference_names_a_heading() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let design = std::fs::read_to_string(root.join("docs/DESIGN.md")).expect("docs/DESIGN.md");
    let headings: Vec<String> = design
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| l.trim_start_matches('#').split_whitespace().next())
        .map(|n| n.trim_end_matches('.').to_string())
        .collect();
    let mut paths = vec![root.join("README.md")];
    for dir in [
        "src",
        "kernels",
        "emulator",
        "tests",
        "scripts",
        "benches",
        "examples",
        "fuzz/src",
        "docs",
        "ape-llama",
    ] {
        files(&root.join(dir), &mut paths);
    }
    let marker = "DESIGN.md §";
    let mut cited = 0;
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for (i, _) in text.match_indices(marker) {
            let section: String = text[i + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let section = section.trim_end_matches('.');
            // This file's own doc comment shows the marker without a number.
            if section.is_empty() && p.ends_with("design_references.rs") {
                continue;
            }
            assert!(
                headings.iter().any(|h| h == section),
                "{}: docs/DESIGN.md §{section} is not a heading ({headings:?})",
                p.display()
            );
            cited += 1;
        }
    }
    assert!(cited >= 10, "only {cited} references found");
}
