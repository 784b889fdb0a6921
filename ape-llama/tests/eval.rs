//! The quality evaluation's metric code on hand-computed cases, the dataset's properties, and one
//! small end-to-end run on the real model.

mod common;

use ape_attn::{ApeParams, Error};
use ape_llama::cpu::CpuModel;
use ape_llama::engine::{Engine, Mode};
use ape_llama::eval::dataset::{generate, MAX_CANDIDATES, MAX_DOCS};
use ape_llama::eval::metrics::{
    argmax, contains_answer, exact_match, kl_divergence, log_softmax, normalize, retention, Tally,
};
use ape_llama::eval::{evaluate, sort_grid, GridPoint, Objective};
use ape_llama::gguf::Gguf;
use ape_llama::tokenizer::Tokenizer;

#[test]
fn hand_computed_metrics() {
    // log softmax([1, 2, 3]) = x - ln(e + e^2 + e^3).
    let l = log_softmax(&[1.0, 2.0, 3.0]);
    for (got, want) in l.iter().zip([
        -2.407_605_964_444_38,
        -1.407_605_964_444_38,
        -0.407_605_964_444_38,
    ]) {
        assert!((got - want).abs() < 1e-6);
    }
    // P = softmax([0, ln 3]) = [1/4, 3/4], Q = [1/2, 1/2]:
    // KL(P||Q) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812035941137.
    let kl = kl_divergence(&[0.0, 3f32.ln()], &[0.0, 0.0]);
    assert!((kl - 0.130_812_035_941_137).abs() < 1e-6, "{kl}");
    assert!(kl_divergence(&[1.0, 2.0, -1.0], &[1.0, 2.0, -1.0]).abs() < 1e-12);
    // Shifting logits does not change the distribution.
    assert!(kl_divergence(&[1.0, 2.0], &[11.0, 12.0]).abs() < 1e-9);

    assert_eq!(
        normalize("  The Answer:  Mira  KOVAC! "),
        "the answer mira kovac"
    );
    assert!(exact_match("Mira Kovac.\nShe founded it.", "mira kovac"));
    assert!(!exact_match("The answer is Mira Kovac.", "Mira Kovac"));
    assert!(contains_answer("The answer is: Mira Kovac.", "Mira Kovac"));
    assert!(!contains_answer("Miranda Kovacs", "Mira Kovac"));
    assert!(!contains_answer("anything", ""));
    assert_eq!(argmax(&[-3.0, -1.0, -1.0, -2.0]), Some(1));
    assert_eq!(argmax(&[]), None);

    let mut t = Tally::default();
    t.add(true, false, true, -2.0, 0.5);
    t.add(false, true, true, -4.0, 1.5);
    t.add(true, false, false, -6.0, 1.0);
    assert_eq!((t.n, t.correct, t.exact, t.contains), (3, 2, 1, 2));
    assert!((t.accuracy() - 2.0 / 3.0).abs() < 1e-12);
    assert!((t.mean_loglik() + 4.0).abs() < 1e-12 && (t.mean_kl() - 1.0).abs() < 1e-12);
    assert!((retention(0.49, 0.7) - 0.7).abs() < 1e-12);
    assert!(retention(0.5, 0.0).is_nan());
    assert!(Tally::default().accuracy().is_nan());
}

#[test]
fn calibration_sorts_by_its_objective() {
    let p = |t, s, accuracy, kl| GridPoint {
        ape: ApeParams::new(t, s).expect("valid"),
        accuracy,
        kl,
    };
    let mut g = vec![
        p(0.5, 0.5, 0.9, 0.3),
        p(0.9, 0.9, 0.8, 0.1),
        p(1.0, 1.0, 0.9, 0.2),
    ];
    sort_grid(&mut g, Objective::Kl);
    assert_eq!(g[0].ape.temperature(), 0.9);
    sort_grid(&mut g, Objective::Accuracy);
    // Equal accuracy: the lower KL wins.
    assert_eq!((g[0].ape.temperature(), g[1].ape.temperature()), (1.0, 0.5));
}

#[test]
fn the_dataset_puts_the_answer_in_the_relevant_document_only() {
    // Many seeds, so that every relation meets 10 and 14 documents (the fixed pools hold 14).
    for seed in 0..40 {
        for ex in generate(seed, &[10, 14], 1, 4).expect("valid counts") {
            assert!(ex.documents.len() == 10 || ex.documents.len() == 14);
            assert!(contains_answer(&ex.documents[ex.relevant], &ex.answer));
        }
    }
    let examples = generate(7, &[1, 2, 3, 5, 10], 2, 4).expect("valid");
    assert_eq!(examples.len(), 2 * (1 + 2 + 3 + 5 + 10));
    assert_eq!(
        examples,
        generate(7, &[1, 2, 3, 5, 10], 2, 4).expect("valid"),
        "seeded: the same set again"
    );
    assert_ne!(
        examples,
        generate(8, &[1, 2, 3, 5, 10], 2, 4).expect("valid")
    );
    let mut positions = std::collections::BTreeSet::new();
    for ex in &examples {
        positions.insert((ex.documents.len(), ex.relevant));
        assert!(ex.documents[ex.relevant].contains(&ex.answer), "{ex:?}");
        for (i, d) in ex.documents.iter().enumerate() {
            if i != ex.relevant {
                assert!(
                    !contains_answer(d, &ex.answer),
                    "a distractor states the answer: {ex:?}"
                );
            }
        }
        assert_eq!(ex.candidates[ex.answer_index], ex.answer);
        let mut c = ex.candidates.clone();
        c.sort();
        c.dedup();
        assert_eq!(c.len(), ex.candidates.len(), "duplicate candidates: {ex:?}");
        assert!(ex.candidates.len() == 4 || ex.documents.len() < 4);
    }
    // The relevant document at every position of every document count.
    for n in [1, 2, 3, 5, 10] {
        for pos in 0..n {
            assert!(positions.contains(&(n, pos)));
        }
    }
}

/// The generator's limits: the largest counts still give examples (it used to retry forever past
/// its pools), larger ones and a single candidate (every answer right) are errors.
#[test]
fn the_dataset_limits_are_errors_not_hangs() {
    let ex = generate(5, &[MAX_DOCS], 1, MAX_CANDIDATES).expect("at the limits");
    assert_eq!(ex.len(), MAX_DOCS);
    assert!(ex.iter().all(|e| e.candidates.len() == MAX_CANDIDATES));
    for (docs, candidates) in [(MAX_DOCS + 1, 4), (3, MAX_CANDIDATES + 1), (3, 1), (3, 0)] {
        assert!(matches!(
            generate(5, &[docs], 1, candidates),
            Err(Error::OutOfRange(_))
        ));
    }
}

#[test]
fn evaluate_runs_end_to_end_and_requires_the_sequential_reference() {
    let g = Gguf::open(common::default_model()).expect("model");
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
    let mut e = Engine::new(CpuModel::load(&g).expect("loads"), "m", 1 << 30);
    let examples = generate(3, &[2], 1, 3).expect("valid");
    assert!(evaluate(&mut e, &tok, &examples, &[Mode::Parallel], 4, |_| {}).is_err());
    let modes = [Mode::Sequential, Mode::Ape(ApeParams::default())];
    let results = evaluate(&mut e, &tok, &examples, &modes, 4, |_| {}).expect("evaluate");
    let (seq, ape) = (results[0][&2], results[1][&2]);
    assert_eq!((seq.n, ape.n), (2, 2));
    assert_eq!(seq.kl, 0.0);
    assert!(ape.kl > 0.0 && ape.kl.is_finite());
    assert!(seq.loglik < 0.0 && ape.loglik < 0.0);
}
