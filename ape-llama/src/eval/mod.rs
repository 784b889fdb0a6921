//! Quality evaluation: how much of sequential encoding's accuracy each mode keeps, and a search
//! for APE's `T` and `S` (calibration).
//!
//! For every example and mode: accuracy by answer likelihood (the most likely candidate is the
//! gold answer), exact match of the greedy answer, the gold answer's log-likelihood, and the KL
//! divergence of the first answer position's distribution from sequential's.

pub mod dataset;
pub mod metrics;

use std::collections::BTreeMap;

use crate::engine::{Engine, Mode, Prompt, Sampling};
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;
use ape_attn::ApeParams;
use ape_attn::{Error, Result};
use dataset::Example;
use metrics::{argmax, contains_answer, exact_match, kl_divergence, Tally};

/// The system prompt of every example.
pub const SYSTEM: &str = "Answer the question using the documents. Reply with the answer only.";

/// The prompt of an example: system prompt and user header as prefix, one context per document,
/// the question and the assistant header.
pub fn prompt(tok: &Tokenizer, ex: &Example) -> Result<Prompt> {
    let documents: Vec<String> = ex
        .documents
        .iter()
        .map(|d| format!("Document: {d}\n"))
        .collect();
    Prompt::chat(tok, SYSTEM, &documents, &ex.question)
}

/// Per mode, per document count: the tallies.
pub type Results = Vec<BTreeMap<usize, Tally>>;

/// Runs every example in every mode. `modes[0]` is the reference for the KL divergence and must be
/// [`Mode::Sequential`]. `progress(done)` is called after each example.
pub fn evaluate<M: LlamaModel>(
    engine: &mut Engine<M>,
    tok: &Tokenizer,
    examples: &[Example],
    modes: &[Mode],
    max_answer_tokens: usize,
    mut progress: impl FnMut(usize),
) -> Result<Results> {
    if modes.first() != Some(&Mode::Sequential) {
        return Err(Error::Shape(
            "the first mode must be sequential (the reference)".into(),
        ));
    }
    let mut results: Results = vec![BTreeMap::new(); modes.len()];
    for (i, ex) in examples.iter().enumerate() {
        let p = prompt(tok, ex)?;
        let candidates: Vec<Vec<u32>> = ex
            .candidates
            .iter()
            .map(|c| tok.encode(c))
            .collect::<Result<_>>()?;
        let mut reference: Option<Vec<f32>> = None;
        for (m, &mode) in modes.iter().enumerate() {
            let mut state = engine.prefill(mode, &p)?;
            let kl = match &reference {
                None => {
                    reference = Some(state.logits.clone());
                    0.0
                }
                Some(r) => kl_divergence(r, &state.logits),
            };
            let scores: Vec<f64> = candidates
                .iter()
                .map(|c| engine.continuation_logprob(&state, c))
                .collect::<Result<_>>()?;
            let answer = engine.decode(
                &mut state,
                Sampling::Greedy,
                max_answer_tokens,
                &tok.stop_tokens,
            )?;
            let text = tok.decode(&answer)?;
            results[m].entry(ex.documents.len()).or_default().add(
                argmax(&scores) == Some(ex.answer_index),
                exact_match(&text, &ex.answer),
                contains_answer(&text, &ex.answer),
                scores[ex.answer_index],
                kl,
            );
        }
        progress(i + 1);
    }
    Ok(results)
}

/// One point of the calibration grid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GridPoint {
    /// The parameters.
    pub ape: ApeParams,
    /// Candidate-likelihood accuracy on the calibration split.
    pub accuracy: f64,
    /// Mean KL divergence from sequential on the calibration split.
    pub kl: f64,
}

/// What calibration optimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// Lowest mean KL divergence from sequential (smooth; the default).
    Kl,
    /// Highest candidate-likelihood accuracy (ties broken by KL).
    Accuracy,
}

/// Scores every `(T, S)` of the grid on `examples` (APE mode; the contexts are encoded once and
/// reused, since their cache does not depend on `T` and `S`) and returns the grid with the best
/// point first under `objective`.
pub fn calibrate<M: LlamaModel>(
    engine: &mut Engine<M>,
    tok: &Tokenizer,
    examples: &[Example],
    temperatures: &[f32],
    scales: &[f32],
    objective: Objective,
    mut progress: impl FnMut(usize),
) -> Result<Vec<GridPoint>> {
    let prompts: Vec<Prompt> = examples
        .iter()
        .map(|e| prompt(tok, e))
        .collect::<Result<_>>()?;
    let candidates: Vec<Vec<Vec<u32>>> = examples
        .iter()
        .map(|e| {
            e.candidates
                .iter()
                .map(|c| tok.encode(c))
                .collect::<Result<_>>()
        })
        .collect::<Result<_>>()?;
    let mut reference = Vec::with_capacity(examples.len());
    for p in &prompts {
        reference.push(engine.prefill(Mode::Sequential, p)?.logits);
    }
    let mut grid = Vec::new();
    let mut done = 0;
    for &t in temperatures {
        for &s in scales {
            let ape = ApeParams::new(t, s)?;
            let mut tally = Tally::default();
            for (k, ex) in examples.iter().enumerate() {
                let state = engine.prefill(Mode::Ape(ape), &prompts[k])?;
                let scores: Vec<f64> = candidates[k]
                    .iter()
                    .map(|c| engine.continuation_logprob(&state, c))
                    .collect::<Result<_>>()?;
                let kl = kl_divergence(&reference[k], &state.logits);
                tally.add(
                    argmax(&scores) == Some(ex.answer_index),
                    false,
                    false,
                    scores[ex.answer_index],
                    kl,
                );
                done += 1;
                progress(done);
            }
            grid.push(GridPoint {
                ape,
                accuracy: tally.accuracy(),
                kl: tally.mean_kl(),
            });
        }
    }
    sort_grid(&mut grid, objective);
    Ok(grid)
}

/// Best point first under `objective`.
pub fn sort_grid(grid: &mut [GridPoint], objective: Objective) {
    grid.sort_by(|a, b| match objective {
        Objective::Kl => a.kl.total_cmp(&b.kl),
        Objective::Accuracy => b
            .accuracy
            .total_cmp(&a.accuracy)
            .then(a.kl.total_cmp(&b.kl)),
    });
}
