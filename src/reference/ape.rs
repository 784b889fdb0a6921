//! The APE combination of the context group and the causal group (docs/DESIGN.md §2.3).
//!
//! Given the context state `(L_C, O_C)` (logits scaled by `1/(T*sqrt(d))`) and the causal state
//! `(L_O, O_O)` (scale `1/sqrt(d)`):
//! `a = S*T*L_C` (released form) or `a = T*L_C + ln S` (scaled-mass form), `b = L_O`,
//! `w = sigmoid(a - b)`, `out = w*O_C + (1-w)*O_O`, combined LSE `ln(exp(a) + exp(b))`.
//! That is, the combined state is the two-way merge of `(a, O_C)` and `(b, O_O)`.

use super::merge_states::AttentionState;
use crate::params::{ApeParams, ApeVariant};

/// The context group's corrected log-mass `a` from its LSE `L_C`.
pub fn context_log_mass(lse_context: f64, ape: &ApeParams) -> f64 {
    let t = ape.temperature() as f64;
    let s = ape.scale() as f64;
    if lse_context == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    match ape.variant() {
        ApeVariant::Released => s * t * lse_context,
        ApeVariant::ScaledMass => t * lse_context + s.ln(),
    }
}

/// Combines the context state and the causal state with APE's temperature and scaling.
pub fn combine(
    context: &AttentionState,
    causal: &AttentionState,
    ape: &ApeParams,
) -> AttentionState {
    let corrected = AttentionState {
        out: context.out.clone(),
        lse: context_log_mass(context.lse, ape),
    };
    corrected.merge(causal)
}
