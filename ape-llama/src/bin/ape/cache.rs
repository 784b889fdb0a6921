//! The block store on the command line: its flags, opening it, and `ape cache stats | clear |
//! warm`.

use super::*;
use ape_llama::engine::{BlockSource, Part};
use ape_llama::store::{BlockStore, Source, StoreOptions, TierStats};

/// Where the disk tier lives unless told otherwise (beside the model cache).
pub(crate) const DEFAULT_STORE: &str = ".cache/ape/blocks";

/// The block store's flags, shared by every command that encodes passages.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct StoreArgs {
    /// The disk tier's folder: encoded passages are kept there across runs [default:
    /// .cache/ape/blocks].
    #[arg(long, env = "APE_STORE", value_name = "DIR")]
    pub(crate) store: Option<PathBuf>,
    /// No disk tier: passages are kept in this process's memory only (and in Redis, if given).
    /// Overrides --store and APE_STORE.
    #[arg(long)]
    pub(crate) no_store: bool,
    /// The disk tier's size limit; the least recently used blocks are removed beyond it (e.g.
    /// 8G, 500M).
    #[arg(long, env = "APE_STORE_BUDGET", default_value = "8G", value_parser = parse_budget, allow_hyphen_values = true)]
    pub(crate) store_budget: u64,
    /// A Redis server shared by every process pointed at it (redis://127.0.0.1:6379): a passage
    /// one process encoded is read by all.
    #[arg(long, env = "APE_REDIS", value_name = "URL")]
    pub(crate) redis: Option<String>,
}

fn parse_budget(s: &str) -> Result<u64, String> {
    ape_llama::store::parse_size(s)
}

impl StoreArgs {
    /// The store's options: the disk tier is on unless `--no-store`, or unless `default_disk`
    /// is false and no folder is given.
    pub(crate) fn options(&self, default_disk: bool) -> StoreOptions {
        let dir = match (&self.store, self.no_store, default_disk) {
            (_, true, _) => None,
            (Some(d), false, _) => Some(d.clone()),
            (None, false, true) => Some(PathBuf::from(DEFAULT_STORE)),
            (None, false, false) => None,
        };
        StoreOptions {
            dir,
            disk_budget: self.store_budget,
            redis: self.redis.clone(),
        }
    }

    /// Opens the store (`default_disk`: see [`StoreArgs::options`]). A folder given explicitly
    /// that cannot be used is an error; the default folder that cannot be used is a warning and
    /// no disk tier.
    pub(crate) fn open(&self, default_disk: bool) -> ape_attn::Result<Arc<BlockStore>> {
        let opts = self.options(default_disk);
        match BlockStore::open(&opts) {
            Ok(s) => Ok(Arc::new(s)),
            Err(e) if self.store.is_none() && opts.dir.is_some() => {
                eprintln!("ape: warning: {e}; passages are not kept on disk");
                let opts = StoreOptions { dir: None, ..opts };
                BlockStore::open(&opts)
                    .map(Arc::new)
                    .map_err(|e| Error::InvalidInput(e.to_string()))
            }
            Err(e) => Err(Error::InvalidInput(e.to_string())),
        }
    }
}

/// One line of where a request's blocks came from: `prefix disk, 1 disk, 2 encoded`, with the
/// passages named by `names`.
pub(crate) fn sources_line(sources: &[BlockSource], names: &[String]) -> String {
    sources
        .iter()
        .map(|s| {
            let what = match s.part {
                Part::Prefix => "prefix".to_string(),
                Part::Context(i) => names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("passage {}", i + 1)),
            };
            format!("{what} {}", s.source.name())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many blocks came from each tier: `2 disk, 1 encoded`.
pub(crate) fn sources_count(sources: &[BlockSource]) -> String {
    let tiers = [Source::Memory, Source::Disk, Source::Redis, Source::Encoded];
    let parts: Vec<String> = tiers
        .iter()
        .filter_map(|t| {
            let n = sources.iter().filter(|s| s.source == *t).count();
            (n > 0).then(|| format!("{n} {}", t.name()))
        })
        .collect();
    if parts.is_empty() {
        "none cached".into()
    } else {
        parts.join(", ")
    }
}

/// Which tiers `ape cache clear` empties.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TierArg {
    /// The disk tier and Redis (when given).
    All,
    /// The disk tier.
    Disk,
    /// The Redis tier.
    Redis,
}

fn print_tier(name: &str, where_: &str, s: Option<TierStats>) {
    match s {
        None => println!("{name:<7} {where_}: unreachable"),
        Some(s) => {
            let c = s.counters;
            println!(
                "{name:<7} {where_}: {} blocks, {:.1} MiB; {} hits, {} misses, {} written, {} evicted, {} corrupt dropped, {} write errors",
                s.blocks,
                s.bytes as f64 / (1 << 20) as f64,
                c.hits,
                c.misses,
                c.writes,
                c.evictions,
                c.corrupt,
                c.write_errors
            );
        }
    }
}

pub(crate) fn cache_stats(store: &StoreArgs) -> ape_attn::Result<()> {
    let s = store.open(true)?;
    println!("memory  per process (each command's own cache, empty when it starts)");
    match s.disk() {
        Some(d) => print_tier(
            "disk",
            &format!(
                "{} (budget {:.1} GiB)",
                d.dir().display(),
                d.budget() as f64 / (1u64 << 30) as f64
            ),
            Some(d.stats()),
        ),
        None => println!("disk    off"),
    }
    match s.redis() {
        Some(r) => print_tier("redis", r.url(), r.stats()),
        None => println!("redis   off (--redis URL or APE_REDIS)"),
    }
    Ok(())
}

pub(crate) fn cache_clear(store: &StoreArgs, tier: TierArg) -> ape_attn::Result<()> {
    let s = store.open(true)?;
    let fail = |e: ape_llama::store::StoreError| Error::InvalidInput(e.to_string());
    if matches!(tier, TierArg::All | TierArg::Disk) {
        match s.disk() {
            Some(d) => println!(
                "disk: {} blocks removed from {}",
                d.clear().map_err(fail)?,
                d.dir().display()
            ),
            None if tier == TierArg::Disk => {
                return Err(Error::InvalidInput(
                    "no disk tier to clear (--no-store)".into(),
                ))
            }
            None => {}
        }
    }
    if matches!(tier, TierArg::All | TierArg::Redis) {
        match s.redis() {
            Some(r) => println!(
                "redis: {} blocks removed from {}",
                r.clear().map_err(fail)?,
                r.url()
            ),
            None if tier == TierArg::Redis => {
                return Err(Error::InvalidInput(
                    "no Redis tier to clear: give --redis URL (or APE_REDIS)".into(),
                ))
            }
            None => {}
        }
    }
    Ok(())
}

pub(crate) struct WarmArgs {
    pub(crate) model: Option<PathBuf>,
    pub(crate) contexts: Vec<PathBuf>,
    pub(crate) mode: Mode,
    pub(crate) device: DeviceArg,
    pub(crate) system: String,
    pub(crate) store: StoreArgs,
}

/// Encodes passages into the store ahead of the questions: the blocks a question in `mode` with
/// the same system prompt reads.
pub(crate) fn cache_warm(a: WarmArgs) -> ape_attn::Result<()> {
    if a.mode == Mode::Sequential {
        return Err(Error::InvalidInput(
            "sequential mode caches nothing: warm for parallel, ape or block-attention".into(),
        ));
    }
    let passages = read_passages(&a.contexts)?;
    let store = a.store.open(true)?;
    if store.is_empty() {
        return Err(Error::InvalidInput(
            "nothing to warm: the disk tier is off (--no-store) and no Redis is given".into(),
        ));
    }
    let path = model_path(a.model.clone())?;
    let loaded = load(&path, a.device, store.clone())?;
    let tokenizer = loaded.tokenizer;
    with_engine!(loaded.backend, engine => warm_with(engine, &tokenizer, &a, &passages))?;
    store.flush();
    Ok(())
}

fn warm_with<M: LlamaModel>(
    mut engine: Engine<M>,
    tokenizer: &Tokenizer,
    a: &WarmArgs,
    passages: &[String],
) -> ape_attn::Result<()> {
    // The question is not part of any block: any question reads the same blocks.
    let prompt = build_prompt(tokenizer, &a.system, passages, "?")?;
    let total: usize = prompt.prefix.len() + prompt.contexts.iter().map(Vec::len).sum::<usize>();
    let bar = encoding_bar(&mut engine, total);
    let started = std::time::Instant::now();
    let state = engine.prefill(a.mode, &prompt)?;
    bar.finish_and_clear();
    let names: Vec<String> = a.contexts.iter().map(|p| p.display().to_string()).collect();
    println!(
        "[{}] {} blocks in {:.1} s: {}",
        a.mode.name(),
        state.sources.len(),
        started.elapsed().as_secs_f64(),
        sources_line(&state.sources, &names)
    );
    Ok(())
}
