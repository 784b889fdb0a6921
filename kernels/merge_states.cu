// Merge of attention states (docs/DESIGN.md §2.2), mirrors src/reference/merge_states.rs.
//
// merge_states:          N stacked states v [n_states, n, d], s [n_states, n] -> v_out [n, d],
//                        s_out [n]: L = m + ln sum_k e^(L_k - m), O = sum_k e^(L_k - L) O_k.
// merge_state_in_place:  (v, s) <- merge((v, s), (v_other, s_other)).
//
// Memory-bound: each row (one query row and head) is handled by a group of G lanes of one warp
// (G a power of two <= 32, chosen by the launcher so that G covers the row's 16-byte chunks),
// each lane loading whole 16-byte vectors. Every lane of a group reads the row's LSEs before the
// group's first lane writes the merged LSE (a __syncwarp separates them), so the in-place form has
// no read-after-write hazard.
#include "attention_state.cuh"
#include "common.cuh"

namespace ape {

// Scalars of a merge launch; mirrored by MergeStatesParams in src/cuda/merge_states.rs.
struct MergeStatesParams {
  uint64_t n;         // rows (query rows times heads)
  uint32_t n_states;  // states per row (2 for the in-place form)
  uint32_t head_dim;  // elements per row
  uint32_t group;     // lanes per row: a power of two <= 32
  uint32_t _pad;
};
static_assert(sizeof(MergeStatesParams) == 24, "MergeStatesParams layout");

// State k of row i in a stack [n_states, n, d].
template <typename T> struct Stacked {
  const T* v;
  const float* s;
  uint64_t n;
  uint32_t d;
  __device__ __forceinline__ const T* v_at(uint32_t k, uint64_t i) const {
    return v + (k * n + i) * d;
  }
  __device__ __forceinline__ float s_at(uint32_t k, uint64_t i) const { return s[k * n + i]; }
};

// Two separate states (the in-place form).
template <typename T> struct Pair {
  const T* v0;
  const float* s0;
  const T* v1;
  const float* s1;
  uint32_t d;
  __device__ __forceinline__ const T* v_at(uint32_t k, uint64_t i) const {
    return (k == 0 ? v0 : v1) + i * d;
  }
  __device__ __forceinline__ float s_at(uint32_t k, uint64_t i) const {
    return k == 0 ? s0[i] : s1[i];
  }
};

template <typename T, int VEC, typename States>
__device__ __forceinline__ void merge_rows(const States states, T* v_out, float* s_out,
                                           const MergeStatesParams p) {
  const uint32_t G = p.group;
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t g = lane % G;
  const uint32_t rows_per_warp = 32 / G;
  const uint32_t chunks = p.head_dim / VEC;
  const uint64_t warp = (uint64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const uint64_t n_warps = uint64_t(gridDim.x) * blockDim.x / 32;

  for (uint64_t base = warp * rows_per_warp; base < p.n; base += n_warps * rows_per_warp) {
    const uint64_t i = base + lane / G;
    const bool active = i < p.n;
    float lse = -INFINITY;
    if (active) {
      float m = -INFINITY;
      for (uint32_t k = 0; k < p.n_states; ++k) m = fmaxf(m, states.s_at(k, i));
      if (m != -INFINITY) {
        float sum = 0.f;
        for (uint32_t k = 0; k < p.n_states; ++k) {
          const float sk = states.s_at(k, i);
          if (sk != -INFINITY) sum += expf(sk - m);
        }
        lse = m + logf(sum);
      }
      for (uint32_t c = g; c < chunks; c += G) {
        float acc[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
        if (lse != -INFINITY) {
          for (uint32_t k = 0; k < p.n_states; ++k) {
            const float sk = states.s_at(k, i);
            if (sk == -INFINITY) continue;
            const float w = expf(sk - lse);
            Vec<T, VEC> x;
            x.load(states.v_at(k, i) + c * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += w * to_float(x.v[e]);
          }
        }
        Vec<T, VEC> y;
#pragma unroll
        for (int e = 0; e < VEC; ++e) y.v[e] = from_float<T>(acc[e]);
        y.store(v_out + i * p.head_dim + c * VEC);
      }
    }
    __syncwarp();
    if (active && g == 0) s_out[i] = lse;
  }
}

}  // namespace ape

// One entry point per dtype and access width: *_vec reads 16-byte vectors (head_dim * sizeof(T)
// a multiple of 16), *_scalar one element at a time (any head_dim).
#define APE_MERGE_STATES(NAME, T, VEC)                                                          \
  extern "C" __global__ void merge_states_##NAME(const T* v, const float* s, T* v_out,          \
                                                 float* s_out, ape::MergeStatesParams p) {     \
    ape::merge_rows<T, VEC>(ape::Stacked<T>{v, s, p.n, p.head_dim}, v_out, s_out, p);          \
  }                                                                                             \
  extern "C" __global__ void merge_state_in_place_##NAME(T* v, float* s, const T* v_other,     \
                                                         const float* s_other,                  \
                                                         ape::MergeStatesParams p) {           \
    ape::merge_rows<T, VEC>(ape::Pair<T>{v, s, v_other, s_other, p.head_dim}, v, s, p);        \
  }

APE_MERGE_STATES(f32_vec, float, 4)
APE_MERGE_STATES(f16_vec, __half, 8)
APE_MERGE_STATES(bf16_vec, __nv_bfloat16, 8)
APE_MERGE_STATES(f32_scalar, float, 1)
APE_MERGE_STATES(f16_scalar, __half, 1)
APE_MERGE_STATES(bf16_scalar, __nv_bfloat16, 1)
