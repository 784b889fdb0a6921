// RoPE apply and shift (docs/DESIGN.md §2.5), mirrors src/reference/rope.rs.
//
// x is [n_tokens, n_heads, D]; pair i of every head at token t is rotated by angle(t) * theta_i:
// (x, y) -> (x cos - y sin, x sin + y cos), with angle(t) = pos_offset + t (apply) or delta for
// every token (shift: Block-Attention re-encoding of a block cached at position 0). The
// frequencies theta_i come from the host (RopeConfig::inv_freqs, Llama 3 scaling included) in f64,
// and the angle is formed and reduced in f64: at position 128K, pos * theta in f32 would be off by
// about 0.008 rad. The rotation itself is f32.
#include "common.cuh"

namespace ape {

// Mirrored by RopeParams in src/cuda/rope.rs.
struct RopeParams {
  int64_t pos_offset;  // apply: position of token 0; shift: the delta
  uint32_t n_tokens;
  uint32_t n_heads;
  uint32_t head_dim;
  uint32_t layout;     // 0 = NeoX (i, i + D/2), 1 = interleaved (2i, 2i + 1)
  uint32_t per_token;  // 1 = apply (angle grows with the token), 0 = shift (same angle)
  uint32_t _pad;
};
static_assert(sizeof(RopeParams) == 32, "RopeParams layout");

// One thread per (token, pair): the angle is computed once and applied to every head.
template <typename T>
__device__ __forceinline__ void rope_body(T* x, const double* inv_freq, const RopeParams p) {
  const uint32_t half = p.head_dim / 2;
  const uint64_t total = uint64_t(p.n_tokens) * half;
  for (uint64_t idx = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t t = idx / half;
    const uint32_t i = uint32_t(idx % half);
    const double pos = double(p.pos_offset + (p.per_token ? int64_t(t) : 0));
    double s, c;
    sincos(pos * inv_freq[i], &s, &c);
    const float sn = float(s), cs = float(c);
    const uint32_t a = p.layout == 0 ? i : 2 * i;
    const uint32_t b = p.layout == 0 ? i + half : 2 * i + 1;
    T* row = x + t * p.n_heads * p.head_dim;
    for (uint32_t h = 0; h < p.n_heads; ++h) {
      T* head = row + h * p.head_dim;
      const float x0 = to_float(head[a]);
      const float x1 = to_float(head[b]);
      head[a] = from_float<T>(x0 * cs - x1 * sn);
      head[b] = from_float<T>(x0 * sn + x1 * cs);
    }
  }
}

}  // namespace ape

#define APE_ROPE(NAME, T)                                                                   \
  extern "C" __global__ void rope_##NAME(T* x, const double* inv_freq, ape::RopeParams p) { \
    ape::rope_body<T>(x, inv_freq, p);                                                      \
  }

APE_ROPE(f32, float)
APE_ROPE(f16, __half)
APE_ROPE(bf16, __nv_bfloat16)
