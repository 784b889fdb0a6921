//! The loop that owns the model: it admits requests between decode steps, prefills each in
//! pieces (the running sequences take a decode step between two pieces), and runs one batched
//! decode step for every running sequence at a time.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, DocumentSources, SamplingParams, Usage, UsageApe};
use super::metrics::Metrics;
use super::text::{Piece, TextStream};
use super::Shared;
use crate::engine::{decode_batch, Engine, Mode, Part, Prefilled, Prompt, Sampler, Sampling};
use crate::model::LlamaModel;
use crate::store::Source;
use crate::tokenizer::Tokenizer;

/// What the HTTP side hands the loop.
pub(crate) enum Work {
    /// A chat completion.
    Chat(ChatJob),
    /// Passages to encode ahead of the questions.
    Documents(DocumentsJob),
}

/// A chat completion, checked and tokenized.
pub(crate) struct ChatJob {
    pub(crate) prompt: Prompt,
    pub(crate) mode: Mode,
    pub(crate) max_tokens: usize,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: Vec<String>,
    pub(crate) queued_at: Instant,
    pub(crate) events: UnboundedSender<Event>,
}

/// `POST /v1/documents`: the blocks a question over these passages in `mode` reads.
pub(crate) struct DocumentsJob {
    pub(crate) prompt: Prompt,
    pub(crate) mode: Mode,
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<Vec<(usize, Source)>, ApiError>>,
}

/// What a chat completion's handler receives.
#[derive(Debug)]
pub(crate) enum Event {
    /// The next piece of the answer's text.
    Text(String),
    /// The answer ended: why (`stop`, `length`), and the usage.
    Done {
        finish_reason: &'static str,
        usage: Box<Usage>,
    },
    /// The request failed.
    Error(ApiError),
}

/// A sequence being generated.
struct Seq<B> {
    job: ChatJob,
    state: Prefilled<B>,
    sampler: Sampler,
    /// The token to feed at the next decode step.
    next: u32,
    generated: usize,
    text: TextStream,
    usage: Usage,
    last_token: Instant,
}

/// The loop's own state.
pub(crate) struct Scheduler<'a, M: LlamaModel> {
    pub(crate) engine: Engine<M>,
    pub(crate) tok: &'a Tokenizer,
    pub(crate) shared: &'a Shared,
    pub(crate) jobs: Receiver<Work>,
}

/// What the decode steps need besides the model and the sequences.
struct Ctx<'a> {
    tok: &'a Tokenizer,
    metrics: &'a Metrics,
    window: usize,
}

impl<M: LlamaModel> Scheduler<'_, M> {
    /// Runs until the HTTP side has shut down (the job channel closes) and no sequence is left.
    pub(crate) fn run(mut self) {
        let shared = self.shared;
        let metrics = &*shared.metrics;
        let ctx = Ctx {
            tok: self.tok,
            metrics,
            window: self.engine.model.config().context_length,
        };
        let mut active: Vec<Seq<M::Block>> = Vec::new();
        let mut open = true;
        loop {
            if shared.abort.load(Ordering::Relaxed) {
                // Shutting down past the grace period: end what runs, refuse what waits.
                for s in active.drain(..) {
                    let _ = s.job.events.send(Event::Error(shutting_down()));
                }
                while let Ok(w) = self.jobs.try_recv() {
                    metrics.queue_depth.dec();
                    refuse(w, shutting_down());
                }
            }
            let work = if !open {
                None
            } else if active.is_empty() {
                match self.jobs.recv_timeout(Duration::from_millis(100)) {
                    Ok(w) => Some(w),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else if active.len() < shared.opts.max_active {
                match self.jobs.try_recv() {
                    Ok(w) => Some(w),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else {
                None
            };
            if let Some(w) = work {
                metrics.queue_depth.dec();
                self.admit(w, &mut active, &ctx);
                metrics.active.set(active.len() as i64);
            }
            if !open && active.is_empty() {
                return;
            }
            step(&self.engine.model, &mut active, &ctx);
            metrics.active.set(active.len() as i64);
        }
    }

    fn admit(&mut self, work: Work, active: &mut Vec<Seq<M::Block>>, ctx: &Ctx<'_>) {
        let chunk = self.shared.opts.prefill_chunk;
        match work {
            Work::Documents(job) => {
                if job.reply.is_closed() {
                    return;
                }
                let result = self
                    .engine
                    .prefill_chunked(job.mode, &job.prompt, chunk, &mut |model| {
                        step(model, active, ctx);
                        Ok(())
                    })
                    .map_err(ApiError::from)
                    .map(|state| document_blocks(ctx.metrics, &self.engine.model, &state));
                update_tiers(ctx.metrics, &self.engine);
                let _ = job.reply.send(result);
            }
            Work::Chat(job) => {
                if job.events.is_closed() {
                    return;
                }
                let admitted = Instant::now();
                ctx.metrics
                    .queue_wait
                    .observe((admitted - job.queued_at).as_secs_f64());
                let sampling = if job.sampling.temperature == 0.0 {
                    Sampling::Greedy
                } else {
                    Sampling::Temperature {
                        temperature: job.sampling.temperature as f32,
                        seed: job.sampling.seed.unwrap_or_else(fresh_seed),
                    }
                };
                let sampler = match Sampler::new(sampling) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = job.events.send(Event::Error(e.into()));
                        return;
                    }
                };
                let events = job.events.clone();
                let prefilled =
                    self.engine
                        .prefill_chunked(job.mode, &job.prompt, chunk, &mut |model| {
                            if events.is_closed() {
                                return Err(ape_attn::Error::InvalidInput(
                                    "the client disconnected".into(),
                                ));
                            }
                            step(model, active, ctx);
                            Ok(())
                        });
                update_tiers(ctx.metrics, &self.engine);
                let mut state = match prefilled {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = job.events.send(Event::Error(e.into()));
                        return;
                    }
                };
                let mut documents = DocumentSources::default();
                for (_, source) in document_blocks(ctx.metrics, &self.engine.model, &state) {
                    match source {
                        Source::Memory => documents.memory += 1,
                        Source::Disk => documents.disk += 1,
                        Source::Redis => documents.redis += 1,
                        Source::Encoded => documents.encoded += 1,
                    }
                }
                let prompt_tokens = super::api::prompt_tokens(&job.prompt);
                ctx.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
                ctx.metrics
                    .encoded_tokens
                    .inc_by(state.tokens_encoded as u64);
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens: 0,
                    total_tokens: prompt_tokens,
                    ape: UsageApe {
                        mode: job.mode.name().to_string(),
                        tokens_encoded: state.tokens_encoded,
                        documents,
                        time_to_first_token_ms: 0.0,
                        queue_ms: (admitted - job.queued_at).as_secs_f64() * 1e3,
                    },
                };
                let logits = std::mem::take(&mut state.logits);
                let mut seq = Seq {
                    text: TextStream::new(job.stop.clone()),
                    job,
                    state,
                    sampler,
                    next: 0,
                    generated: 0,
                    usage,
                    last_token: Instant::now(),
                };
                let ttft = admitted.elapsed();
                ctx.metrics.ttft.observe(ttft.as_secs_f64());
                seq.usage.ape.time_to_first_token_ms = ttft.as_secs_f64() * 1e3;
                if let Some(seq) = accept(seq, logits, ctx, true) {
                    active.push(seq);
                }
            }
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(503, "server_error", "the server is shutting down").with_code("shutting_down")
}

/// Answers work that will not run.
pub(crate) fn refuse(work: Work, e: ApiError) {
    match work {
        Work::Chat(j) => {
            let _ = j.events.send(Event::Error(e));
        }
        Work::Documents(j) => {
            let _ = j.reply.send(Err(e));
        }
    }
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// The request's document blocks (its contexts; the prefix is not a document), each with its
/// tokens and where it came from, counted into the per-tier metrics.
fn document_blocks<M: LlamaModel>(
    metrics: &Metrics,
    model: &M,
    state: &Prefilled<M::Block>,
) -> Vec<(usize, Source)> {
    let blocks: Vec<(usize, Source)> = state
        .sources
        .iter()
        .filter(|s| matches!(s.part, Part::Context(_)))
        .map(|s| (s.tokens, s.source))
        .collect();
    for &(tokens, source) in &blocks {
        let name = source.name();
        metrics.blocks.with_label_values(&[name]).inc();
        metrics
            .block_bytes
            .with_label_values(&[name])
            .inc_by(model.block_bytes(tokens) as u64);
    }
    blocks
}

fn update_tiers<M: LlamaModel>(metrics: &Metrics, engine: &Engine<M>) {
    let mem = engine.cache.stats();
    let disk = engine.store().and_then(|s| s.disk()).map(|d| d.stats());
    let tiers = [
        ("memory", Some((mem.bytes as u64, mem.blocks as u64))),
        ("disk", disk.map(|d| (d.bytes, d.blocks))),
    ];
    for (tier, held) in tiers {
        if let Some((bytes, blocks)) = held {
            metrics
                .tier_bytes
                .with_label_values(&[tier])
                .set(bytes as i64);
            metrics
                .tier_blocks
                .with_label_values(&[tier])
                .set(blocks as i64);
        }
    }
}

/// Keeps only the most likely tokens whose probabilities (at `temperature`) add up to `top_p`.
fn nucleus(logits: &mut [f32], temperature: f64, top_p: f64) {
    if top_p >= 1.0 || temperature == 0.0 || logits.is_empty() {
        return;
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let mut order: Vec<(f64, usize)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (((x as f64 - m) / temperature).exp(), i))
        .collect();
    let total: f64 = order.iter().map(|p| p.0).sum();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut acc = 0.0;
    let mut keep = order.len();
    for (k, (p, _)) in order.iter().enumerate() {
        acc += p / total;
        if acc >= top_p {
            keep = k + 1;
            break;
        }
    }
    for &(_, i) in &order[keep..] {
        logits[i] = f32::NEG_INFINITY;
    }
}

/// Chooses the sequence's next token from `logits` and passes it on; returns the sequence if it
/// goes on.
fn accept<B>(mut seq: Seq<B>, mut logits: Vec<f32>, ctx: &Ctx<'_>, first: bool) -> Option<Seq<B>> {
    let s = seq.job.sampling;
    nucleus(&mut logits, s.temperature, s.top_p);
    let token = match seq.sampler.sample(&logits) {
        Ok(t) => t,
        Err(e) => {
            let _ = seq.job.events.send(Event::Error(e.into()));
            return None;
        }
    };
    let now = Instant::now();
    if !first {
        ctx.metrics
            .token_latency
            .observe((now - seq.last_token).as_secs_f64());
    }
    seq.last_token = now;
    if ctx.tok.stop_tokens.contains(&token) {
        return finish(seq, "stop", ctx);
    }
    seq.generated += 1;
    ctx.metrics.completion_tokens.inc();
    let piece = match seq.text.push(ctx.tok, token) {
        Ok(p) => p,
        Err(e) => {
            let _ = seq.job.events.send(Event::Error(e.into()));
            return None;
        }
    };
    let (text, stopped) = match piece {
        Piece::Text(t) => (t, false),
        Piece::Stopped(t) => (t, true),
    };
    if !text.is_empty() && seq.job.events.send(Event::Text(text)).is_err() {
        return None; // the client left
    }
    if stopped {
        return finish(seq, "stop", ctx);
    }
    // The token is fed at the next step at `next_pos`: past the window, the answer ends here.
    if seq.generated >= seq.job.max_tokens || seq.state.next_pos() >= ctx.window {
        return finish(seq, "length", ctx);
    }
    seq.next = token;
    Some(seq)
}

fn finish<B>(mut seq: Seq<B>, reason: &'static str, ctx: &Ctx<'_>) -> Option<Seq<B>> {
    match seq.text.finish(ctx.tok) {
        Ok(rest) if !rest.is_empty() => {
            let _ = seq.job.events.send(Event::Text(rest));
        }
        Ok(_) => {}
        Err(e) => {
            let _ = seq.job.events.send(Event::Error(e.into()));
            return None;
        }
    }
    seq.usage.completion_tokens = seq.generated;
    seq.usage.total_tokens = seq.usage.prompt_tokens + seq.generated;
    let _ = seq.job.events.send(Event::Done {
        finish_reason: reason,
        usage: Box::new(seq.usage),
    });
    None
}

/// One decode step of every running sequence, as one batched forward pass. Sequences whose
/// client left are dropped first (their blocks are released with them).
fn step<M: LlamaModel>(model: &M, active: &mut Vec<Seq<M::Block>>, ctx: &Ctx<'_>) {
    active.retain(|s| !s.job.events.is_closed());
    if active.is_empty() {
        return;
    }
    let tokens: Vec<u32> = active.iter().map(|s| s.next).collect();
    ctx.metrics.batch_rows.observe(tokens.len() as f64);
    let mut states: Vec<&mut Prefilled<M::Block>> =
        active.iter_mut().map(|s| &mut s.state).collect();
    let result = decode_batch(model, &mut states, &tokens);
    drop(states);
    match result {
        Ok(all) => {
            let seqs = std::mem::take(active);
            for (seq, logits) in seqs.into_iter().zip(all) {
                if let Some(seq) = accept(seq, logits, ctx, false) {
                    active.push(seq);
                }
            }
        }
        Err(e) => {
            let e = ApiError::from(e);
            for s in active.drain(..) {
                let _ = s.job.events.send(Event::Error(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::nucleus;

    #[test]
    fn nucleus_keeps_the_smallest_set_over_top_p() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03.
        let mut l = vec![3.0, 2.0, 1.0, 0.0];
        nucleus(&mut l, 1.0, 0.8);
        assert_eq!(l[..2], [3.0, 2.0]);
        assert!(l[2..].iter().all(|x| *x == f32::NEG_INFINITY));
        let mut l = vec![3.0, 2.0, 1.0, 0.0];
        nucleus(&mut l, 1.0, 1.0);
        assert_eq!(l, vec![3.0, 2.0, 1.0, 0.0]);
    }
}
