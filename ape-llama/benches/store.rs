//! Loading a block from the store against encoding it, on the default model (SmolLM2-135M, the
//! CPU forward pass, f32 blocks): for blocks of 64 to 2048 tokens, the median time to encode the
//! tokens, to read the block back from the disk tier, and to read it from Redis (when
//! `APE_BENCH_REDIS` names a server; `scripts/bench-store.sh` starts one on loopback), each
//! through the path the engine takes (header and checksum checks, the model's own buffers).
//! Rounds alternate encode, disk, Redis, so a drift of the machine touches all three alike.
//!
//! The disk reads come from the page cache after the first (a block just written, as in a
//! server's steady state); a cold read from the device is slower. Prints a Markdown table.
//! `APE_BENCH_SIZES` (comma-separated token counts) and `APE_BENCH_ROUNDS` change the sweep.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ape_attn::ApeParams;
use ape_llama::cpu::CpuModel;
use ape_llama::model::{LlamaModel, LogitRows};
use ape_llama::store::{BlockSpec, BlockStore, StoreOptions, StoredScheme};

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let path = std::env::var_os("APE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let files = ape_llama::open::open(&path).expect("the default model (scripts/fetch-model.sh)");
    let model = CpuModel::from_source(files.config.clone(), files.weights.as_ref(), |_, _| {})
        .expect("model");
    let sizes: Vec<usize> = std::env::var("APE_BENCH_SIZES")
        .unwrap_or_else(|_| "64,256,1024,2048".into())
        .split(',')
        .map(|s| s.trim().parse().expect("a token count"))
        .collect();
    let rounds: usize = std::env::var("APE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let redis_url = std::env::var("APE_BENCH_REDIS").ok();
    let dir = std::env::temp_dir().join(format!("ape-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let disk = BlockStore::open(&StoreOptions {
        dir: Some(dir.clone()),
        disk_budget: 64 << 30,
        redis: None,
    })
    .expect("disk store");
    let redis = redis_url.as_ref().map(|url| {
        let s = BlockStore::open(&StoreOptions {
            dir: None,
            disk_budget: 0,
            redis: Some(url.clone()),
        })
        .expect("redis store");
        assert!(
            s.redis().expect("tier").reachable(),
            "redis at {url} does not answer"
        );
        s
    });
    let vocab = files.config.vocab_size as u32;
    println!(
        "model {} (CPU forward pass, f32 blocks, {} threads), median of {rounds} rounds\n",
        path.display(),
        rayon::current_num_threads()
    );
    println!("| tokens | block MiB | encode ms | disk load ms | encode / disk | redis load ms | encode / redis |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &sizes {
        let tokens: Vec<u32> = (0..n as u32)
            .map(|i| (i * 2_654_435_761u32.wrapping_add(7)) % vocab)
            .collect();
        let spec = BlockSpec {
            model: files.fingerprint,
            format: model.block_format(),
            scheme: StoredScheme::Alone,
            pos: 0,
            prefix: vec![],
            tokens: tokens.clone(),
        };
        let encode = || {
            model
                .forward(&tokens, 0, &[], &ApeParams::plain(), LogitRows::None)
                .expect("encode")
                .kv
        };
        let block = encode();
        let data = model.save_block(&block).expect("save");
        drop(block);
        for s in std::iter::once(&disk).chain(redis.as_ref()) {
            let claim = s.claim(&spec);
            s.save(&spec, &data, claim);
            s.flush();
        }
        let load = |s: &BlockStore| {
            let t = Instant::now();
            let (b, _) = s
                .load(&spec, &mut |fill| model.load_block(n, fill))
                .expect("the block is stored");
            let dt = t.elapsed();
            drop(b);
            dt
        };
        let (mut te, mut td, mut tr) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            drop(encode());
            te.push(t.elapsed());
            td.push(load(&disk));
            if let Some(r) = &redis {
                tr.push(load(r));
            }
        }
        let (e, d) = (median(te), median(td));
        let (r, ratio_r) = if tr.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            let r = median(tr);
            (format!("{:.2}", ms(r)), format!("{:.0}x", ms(e) / ms(r)))
        };
        println!(
            "| {n} | {:.1} | {:.1} | {:.2} | {:.0}x | {r} | {ratio_r} |",
            data.len() as f64 / (1 << 20) as f64,
            ms(e),
            ms(d),
            ms(e) / ms(d),
        );
    }
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);
}
