//! `ape eval` and `ape calibrate`: the tables, the JSON output.

use super::*;

pub(crate) fn mode_label(mode: &Mode) -> String {
    match mode {
        Mode::Ape(p) => format!("ape T={} S={}", p.temperature(), p.scale()),
        m => m.name().to_string(),
    }
}

/// Prints a table per document count (and over all), returns the JSON.
pub(crate) fn report(modes: &[Mode], results: &eval::Results) -> serde_json::Value {
    let mut counts: Vec<usize> = results[0].keys().copied().collect();
    counts.push(0); // 0: all document counts together
    let mut json = Vec::new();
    for &n in &counts {
        let tally = |m: usize| -> metrics::Tally {
            if n == 0 {
                results[m]
                    .values()
                    .fold(metrics::Tally::default(), |mut a, t| {
                        a.n += t.n;
                        a.correct += t.correct;
                        a.exact += t.exact;
                        a.contains += t.contains;
                        a.loglik += t.loglik;
                        a.kl += t.kl;
                        a
                    })
            } else {
                results[m].get(&n).copied().unwrap_or_default()
            }
        };
        let seq = tally(0);
        let label = if n == 0 {
            "all".to_string()
        } else {
            n.to_string()
        };
        println!("\ndocuments: {label} ({} examples)", seq.n);
        println!(
            "{:<20} {:>8} {:>9} {:>7} {:>9} {:>9} {:>8}",
            "mode", "accuracy", "retention", "exact", "contains", "loglik", "KL"
        );
        for (m, mode) in modes.iter().enumerate() {
            let t = tally(m);
            let retention = metrics::retention(t.accuracy(), seq.accuracy());
            println!(
                "{:<20} {:>8.3} {:>9.3} {:>7.3} {:>9.3} {:>9.3} {:>8.4}",
                mode_label(mode),
                t.accuracy(),
                retention,
                t.exact_rate(),
                t.contains_rate(),
                t.mean_loglik(),
                t.mean_kl()
            );
            json.push(serde_json::json!({
                "documents": label, "mode": mode_label(mode), "examples": t.n,
                "accuracy": t.accuracy(), "retention": retention, "exact_match": t.exact_rate(),
                "contains": t.contains_rate(), "mean_loglik": t.mean_loglik(), "mean_kl": t.mean_kl(),
            }));
        }
    }
    serde_json::Value::Array(json)
}

/// A `--json` output: a file beside the destination, created before the run so that a bad path
/// fails at once, and renamed onto it when the results are written. A run that fails leaves
/// nothing behind.
pub(crate) struct JsonOut {
    pub(crate) path: PathBuf,
    pub(crate) partial: PathBuf,
    pub(crate) file: std::fs::File,
    /// Renamed onto `path`: nothing to clean up.
    pub(crate) done: bool,
}

impl Drop for JsonOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

pub(crate) fn open_json(path: Option<PathBuf>) -> ape_attn::Result<Option<JsonOut>> {
    path.map(|path| {
        let io = Error::io_at(&path);
        if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory",
            )));
        }
        // The results replace the file by a rename, which a read-only file would not stop.
        if std::fs::metadata(&path).is_ok_and(|m| m.permissions().readonly()) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "is read-only",
            )));
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        let partial = path.with_file_name(name);
        let file = std::fs::File::create(&partial).map_err(io)?;
        Ok(JsonOut {
            path,
            partial,
            file,
            done: false,
        })
    })
    .transpose()
}

pub(crate) fn write_json(out: Option<JsonOut>, value: &serde_json::Value) -> ape_attn::Result<()> {
    use std::io::Write;
    let Some(mut out) = out else {
        return Ok(());
    };
    let io = Error::io_at(&out.path);
    serde_json::to_writer_pretty(&mut out.file, value).map_err(|e| io(e.into()))?;
    out.file.write_all(b"\n").map_err(io)?;
    std::fs::rename(&out.partial, &out.path).map_err(io)?;
    out.done = true;
    eprintln!("wrote {}", out.path.display());
    Ok(())
}

pub(crate) fn eval_command(
    model: Option<PathBuf>,
    examples: &[dataset::Example],
    modes: &[Mode],
    max_answer_tokens: usize,
    json: Option<PathBuf>,
    store: Option<PathBuf>,
) -> ape_attn::Result<()> {
    if examples.is_empty() {
        return Err(Error::InvalidInput(
            "no examples: --docs and --per-position must be positive".into(),
        ));
    }
    let json = open_json(json)?;
    let path = model_path(model)?;
    // The evaluation keeps its passages in memory unless told where to keep them.
    let store = ape_llama::store::BlockStore::open(&ape_llama::store::StoreOptions {
        dir: store,
        disk_budget: 8 << 30,
        redis: None,
    })
    .map_err(|e| Error::InvalidInput(e.to_string()))?;
    let (mut engine, tokenizer) = load_cpu(&path, Arc::new(store))?;
    println!(
        "{} examples x {} modes on {} (CPU)",
        examples.len(),
        modes.len(),
        path.display()
    );
    let progress = bar(examples.len(), "evaluating");
    let results = eval::evaluate(
        &mut engine,
        &tokenizer,
        examples,
        modes,
        max_answer_tokens,
        |i| progress.set_position(i as u64),
    )?;
    progress.finish_and_clear();
    let table = report(modes, &results);
    write_json(json, &table)
}

pub(crate) struct CalibrateArgs {
    pub(crate) model: Option<PathBuf>,
    pub(crate) docs: Vec<usize>,
    pub(crate) per_position: usize,
    pub(crate) candidates: usize,
    pub(crate) temperatures: Vec<f32>,
    pub(crate) scales: Vec<f32>,
    pub(crate) objective: Objective,
    pub(crate) seed: u64,
    pub(crate) json: Option<PathBuf>,
}

pub(crate) fn calibrate_command(a: CalibrateArgs) -> ape_attn::Result<()> {
    for &t in &a.temperatures {
        ApeParams::new(t, 1.0)?;
    }
    for &s in &a.scales {
        ApeParams::new(1.0, s)?;
    }
    let path = model_path(a.model)?;
    let (mut engine, tokenizer) = load_cpu(&path, Arc::new(Default::default()))?;
    let cal = dataset::generate(a.seed, &a.docs, a.per_position, a.candidates)?;
    let held = dataset::generate(
        a.seed.wrapping_add(1000),
        &a.docs,
        a.per_position,
        a.candidates,
    )?;
    if cal.is_empty() || a.temperatures.is_empty() || a.scales.is_empty() {
        return Err(Error::InvalidInput(
            "nothing to calibrate: --docs, --per-position, --temperatures and --scales must be non-empty".into(),
        ));
    }
    let json = open_json(a.json)?;
    let points = a.temperatures.len() * a.scales.len();
    println!(
        "calibration: {} examples x {points} (T, S) points; held-out: {} examples",
        cal.len(),
        held.len()
    );
    let progress = bar(cal.len() * points, "calibrating");
    let grid = eval::calibrate(
        &mut engine,
        &tokenizer,
        &cal,
        &a.temperatures,
        &a.scales,
        a.objective,
        |i| progress.set_position(i as u64),
    )?;
    progress.finish_and_clear();
    println!("\n{:>5} {:>5} {:>9} {:>9}", "T", "S", "accuracy", "KL");
    for g in grid.iter().take(8) {
        println!(
            "{:>5} {:>5} {:>9.3} {:>9.4}",
            g.ape.temperature(),
            g.ape.scale(),
            g.accuracy,
            g.kl
        );
    }
    let best = grid
        .first()
        .ok_or_else(|| Error::InvalidInput("empty calibration grid".into()))?
        .ape;
    println!(
        "\nchosen: T = {}, S = {} ({:?} objective); held-out results:",
        best.temperature(),
        best.scale(),
        a.objective
    );
    let modes = [
        Mode::Sequential,
        Mode::Parallel,
        Mode::Ape(ApeParams::default()),
        Mode::Ape(best),
    ];
    let progress = bar(held.len(), "held-out");
    let results = eval::evaluate(&mut engine, &tokenizer, &held, &modes, 24, |i| {
        progress.set_position(i as u64)
    })?;
    progress.finish_and_clear();
    let table = report(&modes, &results);
    let grid_json: Vec<serde_json::Value> = grid
        .iter()
        .map(|g| {
            serde_json::json!({"T": g.ape.temperature(), "S": g.ape.scale(), "accuracy": g.accuracy, "mean_kl": g.kl})
        })
        .collect();
    write_json(
        json,
        &serde_json::json!({"chosen": {"T": best.temperature(), "S": best.scale()}, "grid": grid_json, "held_out": table}),
    )
}
