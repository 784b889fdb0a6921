// The online softmax of one warp's 16 query rows over a walk of key tiles (docs/DESIGN.md §2.2):
// the running state of the rows a thread holds, and its update by one tile of logits.
//
// The state is kept in the log2 domain, scaled: m is a running max of c * s * log2(e) (c the
// tile's logit scale), and the probabilities are exp2(c' s - m) with c' = c log2(e), one FFMA and
// one ex2 per logit. The accumulator of P V and the sum l are relative to m. m only moves when a
// tile's max passes it by more than kRescaleThresholdLog2: until then the probabilities are at
// most 2^8 (exact enough in f32 sums and in the 16-bit P operand of the MMA) and the accumulator
// is not touched. When some row's max does move, the warp rescales (a vote keeps the branch
// uniform), and rows whose max did not move keep theirs.
#pragma once

#include "ptx.cuh"

namespace ape {

// Reductions over the quad of lanes that share an accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// How far (log2 units) a tile's max may pass the running max before the state is rescaled.
constexpr float kRescaleThresholdLog2 = 8.f;

// The two accumulator rows a thread holds (rows lane / 4 and lane / 4 + 8 of its warp's 16, in
// the m16n8 fragment layout: elements 0, 1 and 2, 3 of each n8 block).
struct OnlineSoftmax {
  float m[2];  // running max, scaled log2 domain; -inf: no key seen yet
  float l[2];  // this lane's share of the sum of exp2(x - m) (the quad's shares add up)

  __device__ __forceinline__ void init() {
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }

  // Turns one tile's raw logits s (masked keys -inf) into probabilities exp2(scale_log2 * s - m)
  // in place, adds them to l, and rescales acc and l where m moves. scale_log2 > 0.
  template <int NS, int NO>
  __device__ __forceinline__ void update(float (&s)[NS][4], float scale_log2,
                                         float (&acc)[NO][4]) {
    float m_tile[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mt = -INFINITY;
#pragma unroll
      for (int j = 0; j < NS; ++j) mt = fmaxf(mt, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      m_tile[i] = quad_max(mt) * scale_log2;
    }
    // (-inf + threshold is -inf: the first tile with a visible key always moves m.)
    const bool moved =
        m_tile[0] > m[0] + kRescaleThresholdLog2 || m_tile[1] > m[1] + kRescaleThresholdLog2;
    if (__any_sync(0xffffffffu, moved)) {
      // static-check: cold begin (a row's max moved by more than the threshold)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (m_tile[i] > m[i] + kRescaleThresholdLog2) {
          const float alpha = exp2_ftz(m[i] - m_tile[i]);  // 0 when m was -inf
          l[i] *= alpha;
#pragma unroll
          for (int j = 0; j < NO; ++j) {
            acc[j][2 * i] *= alpha;
            acc[j][2 * i + 1] *= alpha;
          }
          m[i] = m_tile[i];
        }
      }
      // static-check: cold end
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // With nothing visible yet m is -inf (and so is every logit): use 0 so that no
      // (-inf) - (-inf) appears.
      const float neg_m = m[i] == -INFINITY ? 0.f : -m[i];
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        s[j][2 * i] = exp2_ftz(fmaf(s[j][2 * i], scale_log2, neg_m));
        s[j][2 * i + 1] = exp2_ftz(fmaf(s[j][2 * i + 1], scale_log2, neg_m));
        rs += s[j][2 * i] + s[j][2 * i + 1];
      }
      l[i] += rs;
    }
  }

  // The row's sum over the quad, its LSE (natural log; -inf for no keys), and 1 / sum (0 for no
  // keys): the epilogue's and the APE correction's view of the state.
  __device__ __forceinline__ float sum(int i) const { return quad_sum(l[i]); }
  __device__ __forceinline__ static float lse(float m_i, float sum) {
    return sum > 0.f ? (m_i + log2f(sum)) * 0.693147180559945309f : -INFINITY;
  }
};

}  // namespace ape
