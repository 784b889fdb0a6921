// The attention state of one query row over one group of keys, and its merge (docs/DESIGN.md §2.2).
//
// L = LSE_j(c * s_j) (natural log), O = sum_j softmax_j(c * s) v_j; an empty group has
// L = -inf and O = 0. Two states merge as m = max(La, Lb), L = m + ln(e^(La-m) + e^(Lb-m)),
// O = e^(La-L) Oa + e^(Lb-L) Ob. A state with L = -inf gets weight 0 and is never read, so no
// merge turns an empty state into NaN. Mirrors src/reference/merge_states.rs.
#pragma once

#include <math.h>

namespace ape {

// Weights of two states in their merge, and the merged LSE.
struct MergeWeights {
  float wa, wb, lse;
};

__device__ __forceinline__ MergeWeights merge_weights(float la, float lb) {
  const float m = fmaxf(la, lb);
  if (m == -INFINITY) return {0.f, 0.f, -INFINITY};
  const float ea = la == -INFINITY ? 0.f : expf(la - m);
  const float eb = lb == -INFINITY ? 0.f : expf(lb - m);
  const float sum = ea + eb;
  return {ea / sum, eb / sum, m + logf(sum)};
}

}  // namespace ape
