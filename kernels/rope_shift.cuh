// Reading a segment's cached keys rotated by a RoPE shift of delta positions (docs/DESIGN.md
// §2.5, Block-Attention) without rotating them: RoPE is a rotation, so q . R(delta) k =
// R(-delta) q . k, and the attention kernel rotates its query fragments instead, when the walk
// enters a segment with another shift. Both lanes of a RoPE pair sit in the same thread's A
// fragments (NeoX: columns c and c + D/2 are the same slot of k-steps ks and ks + D/32;
// interleaved: one 32-bit register), so the rotation needs no shuffles.
//
// The rotated rows are f32; rounded to T once they would put a logit error of ~2e-3 (bf16) into
// every key of the segment alike. So they are split as hi + lo, both in T: hi stays in the Q
// fragments, lo goes to a shared tile (sQlo, allocated only for launches with shifts, each warp
// writing and reading its own 16 rows), and a shifted tile takes a second Q K^T pass with lo.
#pragma once

#include "mma.cuh"

namespace ape {

// A rotated fragment register's two values, split: hi (rounded to T) back into the fragment, the
// rest (rounded to T) into the same place of this warp's rows of sQlo.
template <typename T, int D>
__device__ __forceinline__ void store_split(uint32_t& frag, T* sQlo, int ks, int r, int lane,
                                            int warp, float x0, float x1) {
  frag = pack2<T>(x0, x1);
  const float2 hi = unpack2<T>(frag);
  const int row = warp * 16 + lane / 4 + 8 * (r % 2);
  *reinterpret_cast<uint32_t*>(sQlo + swizzle<D>(row, ks * 2 + r / 2) + 2 * (lane % 4)) =
      pack2<T>(x0 - hi.x, x1 - hi.y);
}

// Rotates the Q fragments by -delta, (x, y) -> (x cos + y sin, -x sin + y cos), so that their dot
// products with stored keys equal those with keys rotated by +delta, and splits the result
// (store_split). cs holds the D/2 pairs (cos, sin) of delta * theta_i. Fragment register r of
// k-step ks holds row (lane / 4 + 8 (r % 2)), columns ks * 16 + 8 (r / 2) + 2 (lane % 4) + {0, 1}
// (see mma.cuh).
template <typename T, int D>
__device__ __forceinline__ void rotate_q_fragments(uint32_t (&qf)[D / 16][4], T* sQlo,
                                                   const float2* __restrict__ cs,
                                                   uint32_t layout, int lane, int warp) {
  constexpr int kKSteps = D / 16;
  const int tig = lane % 4;
  if (layout == 0) {
    // NeoX: pair i = column c < D/2 with column c + D/2, the same slot kKSteps / 2 steps later.
#pragma unroll
    for (int ks = 0; ks < kKSteps / 2; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int c = ks * 16 + (r / 2) * 8 + 2 * tig;
        const float2 x = unpack2<T>(qf[ks][r]);
        const float2 y = unpack2<T>(qf[ks + kKSteps / 2][r]);
        const float2 cs0 = __ldg(cs + c);
        const float2 cs1 = __ldg(cs + c + 1);
        store_split<T, D>(qf[ks][r], sQlo, ks, r, lane, warp, x.x * cs0.x + y.x * cs0.y,
                          x.y * cs1.x + y.y * cs1.y);
        store_split<T, D>(qf[ks + kKSteps / 2][r], sQlo, ks + kKSteps / 2, r, lane, warp,
                          y.x * cs0.x - x.x * cs0.y, y.y * cs1.x - x.y * cs1.y);
      }
    }
  } else {
    // Interleaved: pair i = columns (2i, 2i + 1), the two halves of one register.
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int c = ks * 16 + (r / 2) * 8 + 2 * tig;
        const float2 xy = unpack2<T>(qf[ks][r]);
        const float2 cs0 = __ldg(cs + c / 2);
        store_split<T, D>(qf[ks][r], sQlo, ks, r, lane, warp, xy.x * cs0.x + xy.y * cs0.y,
                          xy.y * cs0.x - xy.x * cs0.y);
      }
    }
  }
}

// Loads the warp's unrotated Q fragments from sQ and, for a shift (rope_row >= 0), rotates them
// by the table's row and writes the lo parts to sQlo. Its values are opaque (ptx.cuh): the
// compiler would otherwise hoist what this rare branch derives from them out of the key loop and
// hold it in registers for the whole walk, which spills at head dim 128.
// q_warp: the warp whose rows of sQ the fragments hold (with few rows every warp holds warp 0's);
// the lo parts go to the calling warp's own rows of sQlo.
template <typename T, int D>
__device__ __forceinline__ void enter_shift(uint32_t (&qf)[D / 16][4], const T* sQ, T* sQlo,
                                            const float2* __restrict__ rope_cs, int rope_row,
                                            uint32_t rope_layout, int q_warp, int warp,
                                            int lane) {
  const int lane_o = opaque(lane);
  load_a_fragments<T, D>(qf, opaque(sQ), q_warp * 16, lane_o);
  if (rope_row >= 0) {
    __syncwarp();  // every lane is done reading the previous lo rows
    rotate_q_fragments<T, D>(qf, opaque(sQlo), opaque(rope_cs) + size_t(rope_row) * (D / 2),
                             rope_layout, lane_o, warp);
    __syncwarp();  // the lo rows are written before any lane loads them
  }
}

// The lo parts' share of S = Q K^T for a shifted tile: a second pass over its K fragments.
template <typename T, int D, int NS>
__device__ __forceinline__ void qk_lo_pass(float (&s)[NS][4], const T* sQlo, const T* k_tile,
                                           int warp, int lane) {
  const T* lo = opaque(sQlo);
  const T* kt = opaque(k_tile);
  const int ln = opaque(lane);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int mi = ln / 8;
    uint32_t qlo[4];
    ldmatrix_x4(qlo, lo + swizzle<D>(warp * 16 + (mi % 2) * 8 + ln % 8, ks * 2 + mi / 2));
#pragma unroll
    for (int nb = 0; nb < NS / 2; ++nb) {
      const int key = nb * 16 + (mi / 2) * 8 + ln % 8;
      uint32_t b[4];
      ldmatrix_x4(b, kt + swizzle<D>(key, ks * 2 + mi % 2));
      mma_16816<T>(s[2 * nb], qlo, b[0], b[1]);
      mma_16816<T>(s[2 * nb + 1], qlo, b[2], b[3]);
    }
  }
}

}  // namespace ape
