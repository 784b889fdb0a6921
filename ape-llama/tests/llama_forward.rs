//! The CPU forward pass on the real model against llama.cpp's logits (tests/fixtures, made by
//! scripts/fixtures/llamacpp.sh): correlation > 0.995 at every position, and the same top-1
//! wherever llama.cpp's top-1 leads its runner-up by more than 0.5 (llama.cpp quantises
//! activations to 8 bits in its matmuls, so near-ties can flip).

mod common;

use ape_attn::ApeParams;
use ape_llama::cpu::CpuModel;
use ape_llama::gguf::Gguf;
use ape_llama::model::{LlamaModel, LogitRows};

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn cpu_logits_match_llama_cpp() {
    let g = Gguf::open(common::default_model()).expect("model parses");
    let model = CpuModel::load(&g).expect("model loads");
    let fixture = common::llamacpp_fixture();
    let vocab = model.config().vocab_size;
    let mut worst = f64::INFINITY;
    let mut checked_top1 = 0;
    for p in fixture["prompts"].as_array().expect("prompts") {
        let ids = common::fixture_ids(&p["ids"]);
        let out = model
            .forward(&ids, 0, &[], &ApeParams::plain(), LogitRows::All)
            .expect("forward");
        for (t, pos) in p["positions"]
            .as_array()
            .expect("positions")
            .iter()
            .enumerate()
        {
            let row = &out.logits[t * vocab..(t + 1) * vocab];
            let keep: Vec<usize> = pos["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as usize)
                .collect();
            let want: Vec<f64> = pos["logits"]
                .as_array()
                .expect("logits")
                .iter()
                .map(|v| v.as_f64().expect("logit"))
                .collect();
            let got: Vec<f64> = keep.iter().map(|&i| row[i] as f64).collect();
            let r = correlation(&got, &want);
            worst = worst.min(r);
            assert!(
                r > 0.995,
                "position {t} of {:?}: correlation {r}",
                p["text"]
            );

            let top: Vec<usize> = pos["top"]
                .as_array()
                .expect("top")
                .iter()
                .map(|v| v.as_u64().expect("id") as usize)
                .collect();
            let at = |id: usize| want[keep.iter().position(|&k| k == id).expect("top ids kept")];
            if at(top[0]) - at(top[1]) > 0.5 {
                checked_top1 += 1;
                let ours = (0..vocab)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .expect("vocab");
                assert_eq!(ours, top[0], "top-1 at position {t} of {:?}", p["text"]);
            }
        }
    }
    println!("worst correlation {worst:.5}, top-1 checked at {checked_top1} positions");
    assert!(
        checked_top1 >= 20,
        "too few confident positions to check top-1"
    );
}
