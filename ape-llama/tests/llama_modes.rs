//! The encoding modes on the real model (CPU): the identities of docs/DESIGN.md §5.4 and the cache.

mod common;
#[path = "common/llama.rs"]
mod llama;

use ape_attn::{ApeParams, Error, SegmentRole};
use ape_llama::cpu::{Activations, CpuModel};
use ape_llama::engine::{Engine, Mode, Prompt, Sampling};
use ape_llama::gguf::Gguf;
use ape_llama::model::{KvBlock, LlamaModel, LogitRows, Past, Step};
use ape_llama::tokenizer::Tokenizer;

fn engine_with(activations: Activations) -> (Engine<CpuModel>, Tokenizer) {
    let g = Gguf::open(common::default_model()).expect("model parses");
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
    let model = CpuModel::load(&g)
        .expect("model loads")
        .with_activations(activations);
    (Engine::new(model, "smollm2-135m-q4_1", 1 << 30), tok)
}

/// The model as users run it (8-bit activations against the quantised weights).
fn engine() -> (Engine<CpuModel>, Tokenizer) {
    engine_with(Activations::Q8)
}

/// The model with exact f32 products, for identities that must hold to f32 rounding: two ways of
/// computing the same thing that differ in the last bits are rounded to different 8-bit
/// activations somewhere in 30 layers, and from there diverge by the 8-bit quantisation's own
/// error (about 2% of the largest logit on this model), which would hide a real error of that size.
fn exact_engine() -> (Engine<CpuModel>, Tokenizer) {
    engine_with(Activations::F32)
}

fn prompt(tok: &Tokenizer, passages: &[&str], question: &str) -> Prompt {
    let enc = |s: &str| tok.encode(s).expect("encode");
    Prompt {
        prefix: enc("<|im_start|>system\nAnswer from the passages.<|im_end|>\n<|im_start|>user\n"),
        contexts: passages.iter().map(|p| enc(&format!("{p}\n"))).collect(),
        question: enc(&format!(
            "Question: {question}<|im_end|>\n<|im_start|>assistant\n"
        )),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const PASSAGES: [&str; 3] = [
    "Mira Kovac founded the Lantern Bakery in 1987 in the town of Esterhill.",
    "The Lantern Bakery is known for a dark rye bread baked with caraway.",
    "Esterhill lies on the river Vel, two hours north of the capital.",
];

#[test]
fn sequential_equals_ape_and_parallel_with_one_context_and_plain_params() {
    let (mut e, tok) = exact_engine();
    let p = prompt(&tok, &PASSAGES[..1], "Who founded the Lantern Bakery?");
    let seq = e.prefill(Mode::Sequential, &p).expect("sequential").logits;
    let ape = e
        .prefill(Mode::Ape(ApeParams::plain()), &p)
        .expect("ape")
        .logits;
    let par = e.prefill(Mode::Parallel, &p).expect("parallel").logits;
    let scale = seq.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!(
        "max |seq - ape| {} (logit scale {scale})",
        max_diff(&seq, &ape)
    );
    assert!(max_diff(&seq, &ape) < 1e-3 * scale);
    assert!(max_diff(&ape, &par) < 1e-5 * scale);
}

#[test]
fn block_rerotation_equals_prefill_at_the_real_offset() {
    let (e, tok) = exact_engine();
    let ids = tok.encode(PASSAGES[1]).expect("encode");
    let m = &e.model;
    let plain = ApeParams::plain();
    for offset in [1usize, 37, 1000] {
        let at_zero = m
            .forward(&ids, 0, &[], &plain, LogitRows::None)
            .expect("forward")
            .kv;
        let shifted = m.shift_block(&at_zero, offset as i64).expect("shift");
        let direct = m
            .forward(&ids, offset, &[], &plain, LogitRows::None)
            .expect("forward")
            .kv;
        for l in 0..m.config().n_layers {
            let scale = direct.k(l).iter().fold(0f32, |a, x| a.max(x.abs()));
            let (dk, dv) = (
                max_diff(&shifted.k(l), &direct.k(l)),
                max_diff(shifted.v(l), direct.v(l)),
            );
            assert!(
                dk < 1e-3 * scale,
                "layer {l} offset {offset}: K differs by {dk} (scale {scale})"
            );
            assert!(
                dv < 1e-3 * scale.max(1.0),
                "layer {l} offset {offset}: V differs by {dv}"
            );
        }
        // A question read over the shifted view (the kernel rotates as it reads) answers as over
        // the block prefilled at its real offset.
        let question = tok.encode(" Which bread?").expect("encode");
        let q_pos = offset + ids.len();
        let logits = |block| {
            let past = [Past {
                kv: block,
                pos_offset: offset,
                role: SegmentRole::Context,
            }];
            m.forward(&question, q_pos, &past, &plain, LogitRows::Last)
                .expect("forward")
                .logits
        };
        let (via_view, via_direct) = (logits(&shifted), logits(&direct));
        let scale = via_direct.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = max_diff(&via_view, &via_direct);
        assert!(
            d < 1e-3 * scale,
            "offset {offset}: logits differ by {d} (scale {scale})"
        );
    }
}

#[test]
fn a_second_request_in_any_order_encodes_nothing_and_ape_ignores_the_order() {
    let (mut e, tok) = exact_engine();
    let p = prompt(&tok, &PASSAGES, "Where is the Lantern Bakery?");
    let mut reversed = p.clone();
    reversed.contexts.reverse();
    for mode in [Mode::Ape(ApeParams::default()), Mode::BlockAttention] {
        let first = e.prefill(mode, &p).expect("prefill");
        let misses = e.cache.stats().misses;
        assert!(first.tokens_encoded > p.question.len());
        let again = e.prefill(mode, &reversed).expect("prefill");
        assert_eq!(
            e.cache.stats().misses,
            misses,
            "{mode:?}: the second request encoded a block"
        );
        assert_eq!(again.tokens_encoded, p.question.len());
        if let Mode::Ape(_) = mode {
            // Contexts share positions and form one group: their order does not matter.
            let scale = first.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max_diff(&first.logits, &again.logits) < 1e-4 * scale);
        }
    }
    assert!(e.cache.stats().hits > 0);
}

#[test]
fn generation_stops_and_sampling_is_reproducible() {
    let (mut e, tok) = engine();
    let p = prompt(&tok, &PASSAGES, "Who founded the Lantern Bakery?");
    let greedy = e
        .generate(
            Mode::Ape(ApeParams::default()),
            &p,
            Sampling::Greedy,
            12,
            &tok.stop_tokens,
        )
        .expect("generate");
    assert!(!greedy.tokens.is_empty() && greedy.tokens.len() <= 12);
    assert!(greedy.tokens.iter().all(|t| !tok.stop_tokens.contains(t)));
    let again = e
        .generate(
            Mode::Ape(ApeParams::default()),
            &p,
            Sampling::Greedy,
            12,
            &tok.stop_tokens,
        )
        .expect("generate");
    assert_eq!(greedy.tokens, again.tokens);
    let s = Sampling::Temperature {
        temperature: 0.8,
        seed: 7,
    };
    let a = e
        .generate(Mode::Sequential, &p, s, 8, &[])
        .expect("generate");
    let b = e
        .generate(Mode::Sequential, &p, s, 8, &[])
        .expect("generate");
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens.len(), 8);
    let bad = Sampling::Temperature {
        temperature: 0.0,
        seed: 1,
    };
    assert!(matches!(
        e.generate(Mode::Sequential, &p, bad, 4, &[]),
        Err(Error::InvalidParameter { .. })
    ));
    println!(
        "greedy answer: {:?}",
        tok.decode(&greedy.tokens).expect("decode")
    );
}

#[test]
fn bad_requests_are_errors() {
    let (mut e, tok) = engine();
    let mut p = prompt(&tok, &PASSAGES[..1], "Who?");
    p.question.clear();
    assert!(e.prefill(Mode::Parallel, &p).is_err());
    let window = e.model.config().context_length;
    let long = Prompt {
        prefix: vec![],
        contexts: vec![vec![100; window]],
        question: vec![100],
    };
    assert!(matches!(
        e.prefill(Mode::BlockAttention, &long),
        Err(Error::OutOfRange(_))
    ));
    let bad_token = Prompt {
        prefix: vec![],
        contexts: vec![],
        question: vec![u32::MAX],
    };
    assert!(matches!(
        e.prefill(Mode::Sequential, &bad_token),
        Err(Error::OutOfRange(_))
    ));
}

/// Generation that reaches the model's window stops there and returns what it has (it used to fail
/// the whole request).
#[test]
fn generation_stops_at_the_window() {
    let window = 24;
    let model = CpuModel::load(&llama::small_model_with_window(window)).expect("model loads");
    let mut e = Engine::new(model, "small", 1 << 30);
    let p = Prompt {
        prefix: vec![1, 2, 3, 4],
        contexts: vec![vec![5, 6, 7, 8, 9, 10]],
        question: vec![11, 12, 13, 14, 15],
    };
    for mode in [
        Mode::Sequential,
        Mode::Ape(ApeParams::default()),
        Mode::BlockAttention,
    ] {
        let g = e
            .generate(mode, &p, Sampling::Greedy, 100, &[])
            .expect("generate");
        // Positions 15..24 take the fed tokens; the last token is sampled at position 23's
        // logits and not fed.
        assert_eq!(g.tokens.len(), window as usize - 15 + 1, "{mode:?}");
        assert!(g.window_full);
        let g = e
            .generate(mode, &p, Sampling::Greedy, 3, &[])
            .expect("generate");
        assert_eq!(g.tokens.len(), 3);
        assert!(!g.window_full);
    }
}

/// Block-Attention reads cached blocks through shifted views; the cached blocks stay pinned while
/// the request runs, so another request cannot evict them (and the cache's byte count stays true).
#[test]
fn block_attention_pins_the_blocks_it_reads() {
    let load = || CpuModel::load(&llama::small_model_with_window(4096)).expect("model loads");
    let p = Prompt {
        prefix: vec![1, 2, 3],
        contexts: vec![vec![5; 40], vec![6; 40]],
        question: vec![7, 8],
    };
    let mut probe = Engine::new(load(), "small", 1 << 30);
    drop(probe.prefill(Mode::BlockAttention, &p).expect("prefill"));
    let bytes = probe.cache.stats().bytes;
    // A cache that holds exactly this request's blocks.
    let mut e = Engine::new(load(), "small", bytes);
    let state = e.prefill(Mode::BlockAttention, &p).expect("prefill");
    let other = Prompt {
        contexts: vec![vec![9; 40]],
        ..p.clone()
    };
    assert!(matches!(
        e.prefill(Mode::BlockAttention, &other),
        Err(Error::CacheFull(_))
    ));
    assert_eq!(e.cache.stats().evictions, 0);
    drop(state);
    // Unpinned: the same request now evicts what it needs.
    assert!(e.prefill(Mode::BlockAttention, &other).is_ok());
    assert!(e.cache.stats().evictions > 0);
}

/// The shared prefix is encoded alone from position 0 in every mode: an APE request and a
/// Block-Attention request over the same prefix share its block.
#[test]
fn ape_and_block_attention_share_the_prefix_block() {
    let model = CpuModel::load(&llama::small_model_with_window(4096)).expect("model loads");
    let mut e = Engine::new(model, "small", 1 << 30);
    let p = Prompt {
        prefix: vec![1, 2, 3, 4, 5],
        contexts: vec![vec![6; 20], vec![7; 30]],
        question: vec![8, 9],
    };
    let ape = e
        .prefill(Mode::Ape(ApeParams::default()), &p)
        .expect("prefill");
    assert_eq!(ape.tokens_encoded, 5 + 20 + 30 + 2);
    let blocks = e.prefill(Mode::BlockAttention, &p).expect("prefill");
    // The contexts are encoded again (alone, not after the prefix); the prefix is a hit.
    assert_eq!(blocks.tokens_encoded, 20 + 30 + 2);
}

/// The CPU pass's blocks read back from the store give the encoded blocks' logits bit for bit.
#[test]
fn stored_blocks_answer_as_encoded_ones_on_the_cpu() {
    let g = llama::small_model_with_window(4096);
    llama::stored_blocks_answer_as_encoded_ones(|| CpuModel::load(&g).expect("model"), "cpu");
}

/// Index of the largest logit and its margin over the runner-up.
fn top1(logits: &[f32]) -> (u32, f32) {
    let mut best = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in logits.iter().enumerate() {
        if x > best.1 {
            best = (i, x, best.1);
        } else if x > best.2 {
            best.2 = x;
        }
    }
    (best.0 as u32, best.1 - best.2)
}

#[test]
fn a_batch_of_decode_steps_answers_as_each_sequence_alone() {
    let (mut e, tok) = engine();
    // Three sequences in three modes, each over its own passages and of its own length.
    let requests = [
        (
            Mode::Ape(ApeParams::default()),
            prompt(&tok, &PASSAGES, "Who founded the Lantern Bakery?"),
        ),
        (
            Mode::BlockAttention,
            prompt(&tok, &PASSAGES[1..], "What bread is the bakery known for?"),
        ),
        (
            Mode::Sequential,
            prompt(&tok, &PASSAGES[2..], "Where does Esterhill lie?"),
        ),
    ];
    let steps = 8;
    // Alone: greedy decoding one sequence at a time.
    let mut alone = Vec::new();
    for (mode, p) in &requests {
        let mut state = e.prefill(*mode, p).expect("prefill");
        let mut logits = vec![state.logits.clone()];
        for _ in 0..steps {
            let next = top1(logits.last().expect("logits")).0;
            logits.push(e.decode_step(&mut state, next).expect("decode"));
        }
        alone.push(logits);
    }
    // Together: one batched forward per step, fed the tokens chosen alone so that the logits
    // compare step by step.
    let mut states: Vec<_> = requests
        .iter()
        .map(|(mode, p)| e.prefill(*mode, p).expect("prefill"))
        .collect();
    let mut worst = 0f32;
    let mut near_ties = Vec::new();
    for step in 0..steps {
        let tokens: Vec<u32> = alone.iter().map(|l| top1(&l[step]).0).collect();
        let mut refs: Vec<_> = states.iter_mut().collect();
        let batch = e.decode_batch(&mut refs, &tokens).expect("batched decode");
        assert_eq!(batch.len(), requests.len());
        for (i, got) in batch.iter().enumerate() {
            let want = &alone[i][step + 1];
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            worst = worst.max(max_diff(got, want) / scale);
            let (t_want, margin) = top1(want);
            if top1(got).0 != t_want {
                near_ties.push((i, step, margin));
                assert!(
                    margin < 1e-3 * scale,
                    "sequence {i} step {step}: top-1 differs with margin {margin}"
                );
            }
        }
    }
    println!("batched vs alone: largest logit difference {worst:e} of the scale; near-ties {near_ties:?}");
    assert!(
        worst < 1e-4,
        "batched logits differ by {worst:e} of the scale"
    );
    // A batch with one bad step is refused as a whole, and the good sequences are untouched.
    let before: Vec<usize> = states.iter().map(|s| s.next_pos()).collect();
    let mut refs: Vec<_> = states.iter_mut().collect();
    let bad = e.decode_batch(&mut refs, &[1, 2, u32::MAX]);
    assert!(matches!(bad, Err(Error::OutOfRange(_))), "{bad:?}");
    assert!(e.decode_batch(&mut refs, &[1, 2]).is_err());
    let after: Vec<usize> = states.iter().map(|s| s.next_pos()).collect();
    assert_eq!(before, after);
}

#[test]
fn a_batch_mixes_a_prefill_chunk_with_decode_rows() {
    let (e, tok) = engine();
    let m = &e.model;
    let a = tok
        .encode("The river Vel runs north of the capital.")
        .expect("encode");
    let b = tok.encode("Rye bread").expect("encode");
    let alone_a = m
        .forward(&a, 0, &[], &ApeParams::plain(), LogitRows::All)
        .expect("forward");
    let alone_b = m
        .forward(&b, 5, &[], &ApeParams::plain(), LogitRows::Last)
        .expect("forward");
    let none = m
        .forward(&b, 0, &[], &ApeParams::plain(), LogitRows::None)
        .expect("forward");
    assert!(none.logits.is_empty());
    let steps = [
        Step {
            tokens: &a,
            pos: 0,
            past: &[],
            ape: ApeParams::plain(),
            logits: LogitRows::All,
        },
        Step {
            tokens: &b,
            pos: 5,
            past: &[],
            ape: ApeParams::plain(),
            logits: LogitRows::Last,
        },
    ];
    let both = m.forward_batch(&steps).expect("batch");
    for (got, want) in both.iter().zip([&alone_a, &alone_b]) {
        assert_eq!(got.logits.len(), want.logits.len());
        let scale = want.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max_diff(&got.logits, &want.logits) < 1e-4 * scale);
        assert_eq!(got.kv.len(), want.kv.len());
        for l in 0..m.config().n_layers {
            assert!(max_diff(&got.kv.k(l), &want.kv.k(l)) < 1e-3);
        }
    }
}

#[test]
fn eight_bit_activations_keep_the_exact_products_answers() {
    let (mut q8, tok) = engine();
    let (mut exact, _) = exact_engine();
    let mut near_ties = Vec::new();
    let mut worst_corr = 1.0f64;
    for (i, question) in [
        "Who founded the Lantern Bakery?",
        "What bread is the bakery known for?",
        "Where does Esterhill lie?",
    ]
    .iter()
    .enumerate()
    {
        let p = prompt(&tok, &PASSAGES, question);
        for mode in [Mode::Sequential, Mode::Ape(ApeParams::default())] {
            let a = q8.prefill(mode, &p).expect("prefill").logits;
            let b = exact.prefill(mode, &p).expect("prefill").logits;
            worst_corr = worst_corr.min(correlation(&a, &b));
            let (ta, tb) = (top1(&a).0, top1(&b).0);
            if ta != tb {
                let margin = top1(&b).1;
                near_ties.push((i, mode, margin));
                assert!(
                    margin < 0.5,
                    "{question} {mode:?}: top-1 differs, margin {margin}"
                );
            }
        }
    }
    println!("8-bit vs f32 activations: worst logit correlation {worst_corr:.5}; near-ties {near_ties:?}");
    assert!(worst_corr > 0.995, "correlation {worst_corr}");
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&x| x as f64).sum::<f64>() / n,
        b.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64 - ma, y as f64 - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    sab / (saa * sbb).sqrt()
}

/// A prefill cut into pieces (the server's, so that running sequences decode between them) gives
/// the logits of the whole prefill in every mode, calls its hook between every two pieces, and
/// stops at the hook's error with nothing half-encoded left in the cache.
#[test]
fn a_chunked_prefill_answers_as_the_whole_one() {
    let (mut whole, tok) = exact_engine();
    let (mut pieces, _) = exact_engine();
    let p = prompt(
        &tok,
        &PASSAGES,
        "Who founded the Lantern Bakery, and where?",
    );
    for mode in [
        Mode::Sequential,
        Mode::Parallel,
        Mode::Ape(ApeParams::new(0.8, 0.9).unwrap()),
        Mode::BlockAttention,
    ] {
        let a = whole.prefill(mode, &p).expect("whole");
        let chunk = 5;
        let mut calls = 0;
        let b = pieces
            .prefill_chunked(mode, &p, chunk, &mut |_| {
                calls += 1;
                Ok(())
            })
            .expect("in pieces");
        let scale = a.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = max_diff(&a.logits, &b.logits);
        println!(
            "{}: max |whole - pieces| {d} (scale {scale}), {calls} hook calls",
            mode.name()
        );
        assert!(d < 1e-3 * scale, "{}: {d}", mode.name());
        assert_eq!(a.next_pos(), b.next_pos());
        assert_eq!(a.tokens_encoded, b.tokens_encoded);
        assert!(calls > 0);
        // The second time the blocks come from memory: only the question's pieces are run.
        if mode != Mode::Sequential {
            let mut again = 0;
            pieces
                .prefill_chunked(mode, &p, chunk, &mut |_| {
                    again += 1;
                    Ok(())
                })
                .expect("again");
            assert_eq!(
                again,
                p.question.len().div_ceil(chunk) - 1,
                "{}",
                mode.name()
            );
        }
    }
    // An error from the hook (a client that left) ends the prefill with it.
    let (mut e, _) = exact_engine();
    let blocks_before = e.cache.stats().blocks;
    let err = e
        .prefill_chunked(Mode::Ape(ApeParams::default()), &p, 4, &mut |_| {
            Err(Error::InvalidInput("the client disconnected".into()))
        })
        .err()
        .expect("stopped");
    assert!(err.to_string().contains("disconnected"), "{err}");
    // The prefix (several pieces) was the block being encoded: it is not cached half done.
    assert_eq!(e.cache.stats().blocks, blocks_before);
}
