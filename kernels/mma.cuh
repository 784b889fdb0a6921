// Tensor-core helpers for sm_80+: packing of 16-bit pairs and the swizzled shared tiles that
// ldmatrix reads. The instructions themselves (and their fragment layouts) are in ptx.cuh.
#pragma once

#include "ptx.cuh"

namespace ape {

// Two floats rounded to T and packed into one 32-bit register (lo in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The two 16-bit values of a packed register, as floats (the inverse of pack2).
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);

template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}

template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}

// Element offset of (row, 16-byte chunk) in a [rows][D] tile of 2-byte elements whose chunks are
// XOR-swizzled by the row (D >= 64), so that ldmatrix's 8 row addresses hit 8 different banks.
template <int D> __device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// A warp's A fragments for 16 rows from row0 on, every k16 step of the head dim, from a swizzled
// [rows][D] tile.
template <typename T, int D>
__device__ __forceinline__ void load_a_fragments(uint32_t (&frag)[D / 16][4], const T* tile,
                                                 int row0, int lane) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int mi = lane / 8;
    const int r = row0 + (mi % 2) * 8 + lane % 8;
    ldmatrix_x4(frag[ks], tile + swizzle<D>(r, ks * 2 + mi / 2));
  }
}

}  // namespace ape
