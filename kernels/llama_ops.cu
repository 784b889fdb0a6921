// The element-wise Llama operations of the forward pass; mirrors src/reference/llama_ops.rs.
//
// rms_norm:  y[r, i] = x[r, i] / sqrt(mean_j x[r, j]^2 + eps) * w[i]   (one block per row, f32 sums)
// silu_mul:  y[i] = silu(g[i]) * u[i], silu(z) = z / (1 + e^-z)
// embedding: y[r, :] = table[ids[r], :]  (ids checked on the host)
//
// Each comes in one dtype per tensor (rms_norm_bf16, ...), and the forward pass's f32 residual
// stream has two mixed forms: rms_norm_f32_to_T reads an f32 x (w and y are T), and
// embedding_T_to_f32 writes an f32 y from a T table (exact).
#include "common.cuh"

namespace ape {

// Mirrored by LlamaOpsParams in src/cuda/llama_ops.rs.
struct LlamaOpsParams {
  uint64_t n;      // rows (rms_norm, embedding) or elements (silu_mul)
  uint32_t width;  // row width
  float eps;       // RMSNorm epsilon
};
static_assert(sizeof(LlamaOpsParams) == 16, "LlamaOpsParams layout");

template <typename TX, typename T>
__device__ __forceinline__ void rms_norm_body(const TX* x, const T* w, T* y,
                                              const LlamaOpsParams p) {
  __shared__ float partial[32];
  const uint32_t d = p.width;
  for (uint64_t row = blockIdx.x; row < p.n; row += gridDim.x) {
    const TX* xr = x + row * d;
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
      const float v = to_float(xr[i]);
      s += v * v;
    }
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
      float t = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
      for (int o = 16; o > 0; o /= 2) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (threadIdx.x == 0) partial[0] = t;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / float(d) + p.eps);
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
      y[row * d + i] = from_float<T>(to_float(xr[i]) * inv * to_float(w[i]));
    }
    __syncthreads();  // partial[] is reused by the next row
  }
}

template <typename T>
__device__ __forceinline__ void silu_mul_body(const T* g, const T* u, T* y, const LlamaOpsParams p) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    const float z = to_float(g[i]);
    y[i] = from_float<T>(z / (1.f + expf(-z)) * to_float(u[i]));
  }
}

template <typename T, typename TY>
__device__ __forceinline__ void embedding_body(const uint32_t* ids, const T* table, TY* y,
                                               const LlamaOpsParams p) {
  const uint32_t d = p.width;
  for (uint64_t row = blockIdx.x; row < p.n; row += gridDim.x) {
    const T* src = table + uint64_t(ids[row]) * d;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
      y[row * d + i] = from_float<TY>(to_float(src[i]));  // exact: TY is T or f32
    }
  }
}

// Synthetic weights: y[i] = offset + scale * u(i), u uniform in [-1, 1) from an integer hash of
// (i, seed), so any Llama shape can be filled on the device without host data.
template <typename T>
__device__ __forceinline__ void fill_uniform_body(T* y, uint32_t seed, float scale, float offset,
                                                  const LlamaOpsParams p) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    uint64_t x = i * 0x9e3779b97f4a7c15ull + seed;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    const float u = float(x >> 40) * (2.f / 16777216.f) - 1.f;
    y[i] = from_float<T>(offset + scale * u);
  }
}

}  // namespace ape

#define APE_LLAMA_OPS(NAME, T)                                                                  \
  extern "C" __global__ void rms_norm_##NAME(const T* x, const T* w, T* y,                     \
                                             const ape::LlamaOpsParams p) {                    \
    ape::rms_norm_body<T, T>(x, w, y, p);                                                       \
  }                                                                                            \
  extern "C" __global__ void silu_mul_##NAME(const T* g, const T* u, T* y,                     \
                                             const ape::LlamaOpsParams p) {                    \
    ape::silu_mul_body<T>(g, u, y, p);                                                         \
  }                                                                                            \
  extern "C" __global__ void fill_uniform_##NAME(T* y, uint32_t seed, float scale, float offset,  \
                                                 const ape::LlamaOpsParams p) {                \
    ape::fill_uniform_body<T>(y, seed, scale, offset, p);                                      \
  }                                                                                            \
  extern "C" __global__ void embedding_##NAME(const uint32_t* ids, const T* table, T* y,       \
                                              const ape::LlamaOpsParams p) {                   \
    ape::embedding_body<T, T>(ids, table, y, p);                                                \
  }

// The f32 residual stream's forms (x or y f32, the rest T).
#define APE_LLAMA_OPS_F32_RESIDUAL(NAME, T)                                                      \
  extern "C" __global__ void rms_norm_f32_to_##NAME(const float* x, const T* w, T* y,           \
                                                    const ape::LlamaOpsParams p) {              \
    ape::rms_norm_body<float, T>(x, w, y, p);                                                   \
  }                                                                                            \
  extern "C" __global__ void embedding_##NAME##_to_f32(const uint32_t* ids, const T* table,     \
                                                       float* y, const ape::LlamaOpsParams p) { \
    ape::embedding_body<T, float>(ids, table, y, p);                                            \
  }

APE_LLAMA_OPS(f32, float)
APE_LLAMA_OPS(f16, __half)
APE_LLAMA_OPS(bf16, __nv_bfloat16)
APE_LLAMA_OPS_F32_RESIDUAL(f16, __half)
APE_LLAMA_OPS_F32_RESIDUAL(bf16, __nv_bfloat16)
