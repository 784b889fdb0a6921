//! Metrics of the quality evaluation, kept pure so that they are tested on hand-computed cases.

/// `log softmax(logits)`, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let lse = m + logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// `KL(P || Q) = sum_i p_i (ln p_i - ln q_i)` of the distributions `softmax(p_logits)` and
/// `softmax(q_logits)`, in nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| {
            if a == f64::NEG_INFINITY {
                0.0
            } else {
                a.exp() * (a - b)
            }
        })
        .sum()
}

/// Lowercase, punctuation dropped, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exact match: the first line of the generated answer equals the gold answer after
/// [`normalize`].
pub fn exact_match(generated: &str, gold: &str) -> bool {
    let first = generated.trim().lines().next().unwrap_or("");
    normalize(first) == normalize(gold)
}

/// The gold answer appears, as whole words, in the generated answer after [`normalize`].
pub fn contains_answer(generated: &str, gold: &str) -> bool {
    let (g, a) = (normalize(generated), normalize(gold));
    !a.is_empty() && format!(" {g} ").contains(&format!(" {a} "))
}

/// Index of the largest score (the first on ties).
pub fn argmax(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if best.is_none_or(|b| s > scores[b]) {
            best = Some(i);
        }
    }
    best
}

/// Running totals of one mode over a set of examples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tally {
    /// Examples.
    pub n: usize,
    /// Examples whose most likely candidate is the gold answer.
    pub correct: usize,
    /// Examples whose greedy answer matches exactly.
    pub exact: usize,
    /// Examples whose greedy answer contains the gold answer.
    pub contains: usize,
    /// Sum of the gold answer's log-likelihood.
    pub loglik: f64,
    /// Sum of the KL divergence from sequential at the answer position.
    pub kl: f64,
}

impl Tally {
    /// Adds one example.
    pub fn add(&mut self, correct: bool, exact: bool, contains: bool, loglik: f64, kl: f64) {
        self.n += 1;
        self.correct += correct as usize;
        self.exact += exact as usize;
        self.contains += contains as usize;
        self.loglik += loglik;
        self.kl += kl;
    }

    fn mean(&self, x: f64) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            x / self.n as f64
        }
    }

    /// Candidate-likelihood accuracy.
    pub fn accuracy(&self) -> f64 {
        self.mean(self.correct as f64)
    }

    /// Exact-match rate.
    pub fn exact_rate(&self) -> f64 {
        self.mean(self.exact as f64)
    }

    /// Contains-the-answer rate.
    pub fn contains_rate(&self) -> f64 {
        self.mean(self.contains as f64)
    }

    /// Mean log-likelihood of the gold answer.
    pub fn mean_loglik(&self) -> f64 {
        self.mean(self.loglik)
    }

    /// Mean KL divergence from sequential.
    pub fn mean_kl(&self) -> f64 {
        self.mean(self.kl)
    }
}

/// `mode / sequential`; NaN when sequential scored 0.
pub fn retention(mode: f64, sequential: f64) -> f64 {
    if sequential == 0.0 {
        f64::NAN
    } else {
        mode / sequential
    }
}
