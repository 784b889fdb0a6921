// Shared helpers for every ape-attn kernel: dtype conversion and 16-byte vector access.
#pragma once

#ifdef APE_EMULATE
#include "../emulator/cuda.h"  // the kernel emulator: the same source, run on the CPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// The CTA's dynamic shared memory as a byte array named NAME.
#define APE_DYNAMIC_SMEM(NAME) extern __shared__ __align__(128) unsigned char NAME[]
#endif

namespace ape {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T loaded or stored as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N> struct alignas(sizeof(T) * N) Vec {
  T v[N];

  __device__ __forceinline__ void load(const T* p) { *this = *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
};

}  // namespace ape
