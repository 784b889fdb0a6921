//! `ape demo` and `ape run`: the prompt, generation in the modes, and what they print.

use super::*;

/// The chat prompt of the passages (each ending in one newline) and the question.
pub(crate) fn build_prompt(
    tok: &Tokenizer,
    system: &str,
    passages: &[String],
    question: &str,
) -> ape_attn::Result<Prompt> {
    let passages: Vec<String> = passages
        .iter()
        .map(|p| format!("{}\n", p.trim_end()))
        .collect();
    Prompt::chat(tok, system, &passages, question)
}

/// Shows a bar over the context tokens the engine encodes on cache misses.
pub(crate) fn encoding_bar<M: LlamaModel>(
    engine: &mut Engine<M>,
    total_tokens: usize,
) -> ProgressBar {
    let bar = ProgressBar::new(total_tokens as u64).with_style(
        ProgressStyle::with_template("encoding contexts [{bar:30}] {pos}/{len} tokens")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    engine.on_encode(move |n| b.inc(n as u64));
    bar
}

pub(crate) fn tokens_per_second(g: &Generation) -> f64 {
    let steps = g.tokens.len().saturating_sub(1);
    if steps == 0 || g.decode_time == Duration::ZERO {
        0.0
    } else {
        steps as f64 / g.decode_time.as_secs_f64()
    }
}

pub(crate) const DEMO_PASSAGES: [&str; 5] = [
    "The Lantern Bakery was founded by Mira Kovac in 1987 in the river town of Esterhill.",
    "Esterhill is a small town on the river Vel, known for its stone bridges and its autumn fair.",
    "The best-known loaf of the Lantern Bakery is a dark rye bread baked with caraway seeds.",
    "In 2004 the bakery opened a second shop in Marrow Bay, run by Tomas Kovac, Mira's nephew.",
    "The Esterhill autumn fair has been held every October since 1902.",
];
pub(crate) const DEMO_QUESTION: &str = "Who founded the Lantern Bakery, and in which town?";

/// `--max-tokens` must ask for at least one token.
pub(crate) fn check_max_tokens(max_tokens: usize) -> ape_attn::Result<()> {
    if max_tokens == 0 {
        return Err(Error::InvalidInput(
            "--max-tokens must be at least 1".into(),
        ));
    }
    Ok(())
}

/// `--max-tokens` must fit the model's window (checked once the model is loaded, before any work).
pub(crate) fn check_max_tokens_fit<M: LlamaModel>(
    engine: &Engine<M>,
    max_tokens: usize,
) -> ape_attn::Result<()> {
    let window = engine.model.config().context_length;
    if max_tokens > window {
        return Err(Error::OutOfRange(format!(
            "--max-tokens {max_tokens} is more than the model's window of {window} positions"
        )));
    }
    Ok(())
}

pub(crate) fn demo(
    model: Option<PathBuf>,
    max_tokens: usize,
    device: DeviceArg,
) -> ape_attn::Result<()> {
    check_max_tokens(max_tokens)?;
    let path = model_path(model)?;
    // Each mode gets its own store below (a folder of its own, removed at the end).
    let loaded = load(&path, device, Arc::new(Default::default()))?;
    let heading = format!("device: {}\nmodel: {}", loaded.device, path.display());
    let tokenizer = loaded.tokenizer;
    with_engine!(loaded.backend, engine => demo_with(engine, &tokenizer, max_tokens, &heading))
}

/// A folder for one demo mode's block store, removed when dropped.
struct DemoStore(PathBuf);

impl Drop for DemoStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn demo_with<M: LlamaModel>(
    mut engine: Engine<M>,
    tokenizer: &Tokenizer,
    max_tokens: usize,
    heading: &str,
) -> ape_attn::Result<()> {
    check_max_tokens_fit(&engine, max_tokens)?;
    println!("{heading}");
    let passages: Vec<String> = DEMO_PASSAGES.iter().map(|s| s.to_string()).collect();
    let prompt = build_prompt(tokenizer, DEFAULT_SYSTEM, &passages, DEMO_QUESTION)?;
    println!(
        "passages: {}, question: {DEMO_QUESTION:?}\n",
        passages.len()
    );
    let modes = [
        Mode::Sequential,
        Mode::Parallel,
        Mode::Ape(ApeParams::default()),
        Mode::BlockAttention,
    ];
    let ctx_tokens: usize =
        prompt.prefix.len() + prompt.contexts.iter().map(Vec::len).sum::<usize>();
    let mut rows = Vec::new();
    for mode in modes {
        // Every mode starts cold: an empty memory cache and an empty store of its own.
        let dir = DemoStore(std::env::temp_dir().join(format!(
            "ape-demo-{}-{}",
            std::process::id(),
            mode.name()
        )));
        let _ = std::fs::remove_dir_all(&dir.0);
        let store = ape_llama::store::BlockStore::open(&ape_llama::store::StoreOptions {
            dir: Some(dir.0.clone()),
            disk_budget: 1 << 30,
            redis: None,
        })
        .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let store = Arc::new(store);
        engine.set_store(Some(store.clone()));
        engine.cache.clear();
        let bar = encoding_bar(&mut engine, ctx_tokens);
        let first = engine.generate(
            mode,
            &prompt,
            Sampling::Greedy,
            max_tokens,
            &tokenizer.stop_tokens,
        )?;
        bar.finish_and_clear();
        // The second request as a new process makes it: nothing in memory, the blocks on disk.
        store.flush();
        engine.cache.clear();
        let second = engine.generate(mode, &prompt, Sampling::Greedy, 1, &tokenizer.stop_tokens)?;
        engine.set_store(None);
        let answer = tokenizer.decode(&first.tokens)?;
        println!("[{}] {}", mode.name(), answer.trim());
        rows.push((
            mode.name(),
            first.ttft,
            first.tokens_encoded,
            tokens_per_second(&first),
            second.ttft,
            second.tokens_encoded,
            sources_count(&second.sources),
        ));
    }
    println!(
        "\n{:<16} {:>11} {:>9} {:>9} | {:>11} {:>9}  2nd request's blocks from",
        "mode", "TTFT", "encoded", "tok/s", "2nd TTFT", "encoded"
    );
    for (name, ttft, enc, tps, ttft2, enc2, from) in rows {
        println!(
            "{name:<16} {:>9.1}ms {enc:>9} {tps:>9.1} | {:>9.1}ms {enc2:>9}  {from}",
            ttft.as_secs_f64() * 1e3,
            ttft2.as_secs_f64() * 1e3,
        );
    }
    println!(
        "\nEach mode's first request starts with an empty cache and an empty block store: its TTFT
includes encoding the passages, and 'encoded' counts the tokens run through the model before the
first answer token (system prompt, passages and question). The second request is what a new
process sees: nothing in memory, the blocks the first one wrote in its store on disk; it encodes
only the question. Sequential mode caches nothing. The demo's stores are temporary; `ape run`
keeps its blocks in .cache/ape/blocks."
    );
    Ok(())
}

pub(crate) struct RunArgs {
    pub(crate) model: Option<PathBuf>,
    pub(crate) contexts: Vec<PathBuf>,
    pub(crate) question: String,
    pub(crate) mode: Mode,
    pub(crate) max_tokens: usize,
    pub(crate) sampling: Sampling,
    pub(crate) print_logits: usize,
    pub(crate) device: DeviceArg,
    pub(crate) system: String,
    pub(crate) store: StoreArgs,
}

pub(crate) fn run(a: RunArgs) -> ape_attn::Result<()> {
    if a.question.trim().is_empty() {
        return Err(Error::InvalidInput("the question is empty".into()));
    }
    check_max_tokens(a.max_tokens)?;
    let passages = read_passages(&a.contexts)?;
    let store = a.store.open(true)?;
    let path = model_path(a.model.clone())?;
    let loaded = load(&path, a.device, store.clone())?;
    let tokenizer = loaded.tokenizer;
    let device = loaded.device;
    with_engine!(loaded.backend, engine => run_with(engine, &tokenizer, &a, &passages, &device))?;
    // The blocks this run encoded reach the store before the process ends.
    store.flush();
    Ok(())
}

/// Every context file's text ([`read_passage`]), in order.
pub(crate) fn read_passages(paths: &[PathBuf]) -> ape_attn::Result<Vec<String>> {
    paths.iter().map(|p| read_passage(p)).collect()
}

/// The largest context file read: 16 MiB of text is millions of tokens, past any window.
pub(crate) const MAX_PASSAGE_BYTES: u64 = 16 << 20;

/// A context file's text: it must be UTF-8 text (no NUL or other control bytes but tabs, line
/// and page breaks) and not empty.
pub(crate) fn read_passage(path: &Path) -> ape_attn::Result<String> {
    use std::io::Read;
    let io = Error::io_at(path);
    let refuse = |why: &str| {
        Err(Error::InvalidInput(format!(
            "context file {}: {why}",
            path.display()
        )))
    };
    // A device or a pipe (/dev/zero) would be read without end.
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return refuse("a directory, not a file");
    }
    if !meta.is_file() {
        return refuse("not a regular file");
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_PASSAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_PASSAGE_BYTES {
        return refuse(&format!(
            "larger than {} MiB, more text than any model's window holds",
            MAX_PASSAGE_BYTES >> 20
        ));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return refuse("not UTF-8 text");
    };
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\x0c'))
    {
        return refuse("holds control bytes: a binary file, not text");
    }
    if text.trim().is_empty() {
        return refuse("empty");
    }
    Ok(text)
}

pub(crate) fn run_with<M: LlamaModel>(
    mut engine: Engine<M>,
    tokenizer: &Tokenizer,
    a: &RunArgs,
    passages: &[String],
    device: &str,
) -> ape_attn::Result<()> {
    check_max_tokens_fit(&engine, a.max_tokens)?;
    let prompt = build_prompt(tokenizer, &a.system, passages, &a.question)?;
    let total: usize = prompt.prefix.len() + prompt.contexts.iter().map(Vec::len).sum::<usize>();
    let bar = encoding_bar(&mut engine, total);
    if a.print_logits > 0 {
        let state = engine.prefill(a.mode, &prompt)?;
        bar.finish_and_clear();
        if state.logits.iter().any(|x| !x.is_finite()) {
            return Err(Error::Model(
                "the forward pass produced non-finite logits".into(),
            ));
        }
        let mut top: Vec<(usize, f32)> = state.logits.iter().copied().enumerate().collect();
        top.sort_by(|x, y| y.1.total_cmp(&x.1));
        for (id, logit) in top.into_iter().take(a.print_logits) {
            println!(
                "{id:>6} {logit:>10.4} {:?}",
                tokenizer.decode(&[id as u32])?
            );
        }
        return Ok(());
    }
    let g = engine.generate(
        a.mode,
        &prompt,
        a.sampling,
        a.max_tokens,
        &tokenizer.stop_tokens,
    )?;
    bar.finish_and_clear();
    println!("{}", tokenizer.decode(&g.tokens)?.trim());
    if g.window_full {
        eprintln!(
            "(stopped: the model's window of {} positions is full)",
            engine.model.config().context_length
        );
    }
    eprintln!(
        "[{}] TTFT {:.1} ms ({} tokens encoded), {} tokens at {:.1} tok/s, window {}, on {device}",
        a.mode.name(),
        g.ttft.as_secs_f64() * 1e3,
        g.tokens_encoded,
        g.tokens.len(),
        tokens_per_second(&g),
        engine.model.config().context_length
    );
    if !g.sources.is_empty() {
        let names: Vec<String> = a.contexts.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "blocks ({}): {}",
            sources_count(&g.sources),
            sources_line(&g.sources, &names)
        );
    }
    Ok(())
}

pub(crate) fn bar(len: usize, what: &str) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} elapsed {{elapsed}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}
