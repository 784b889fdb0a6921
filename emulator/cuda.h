// The CUDA language as the kernels use it, for the kernel emulator (APE_EMULATE): the kernels'
// own source compiled by a host C++ compiler and run on the CPU, one fiber per CUDA thread.
//
// What it provides: the qualifiers, threadIdx/blockIdx/blockDim/gridDim, __syncthreads,
// __syncwarp, __shfl_xor_sync, __any_sync, __ldg, __ldcg, __threadfence, atomicAdd (u32), half
// and bfloat16 with round-to-nearest-even conversions, float2, and the few math functions the
// kernels call. Static __shared__ arrays are per CTA
// (thread_local: an OS thread runs one CTA at a time); the dynamic one comes from
// APE_DYNAMIC_SMEM. The PTX the kernels write inline has its emulated twin in ptx.cuh here.
//
// Semantics are those of the CUDA programming guide and the PTX ISA, not of one GPU: a barrier
// that some threads never reach is reported as an error instead of hanging, and warp collectives
// need every lane of the warp.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local

struct uint3 {
  unsigned int x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

namespace ape_emu {

// The running CUDA thread's coordinates (set by the scheduler before it switches to a fiber).
struct ThreadCoords {
  uint3 thread_idx, block_idx, block_dim, grid_dim;
};
ThreadCoords& coords();

// The CTA's dynamic shared memory (the launch's smem bytes).
unsigned char* dynamic_smem();

// Barriers: every thread of the CTA (exited threads count as arrived), or every lane of the warp.
void sync_block();
void sync_warp();

// Lane exchange: each lane gives `value` and gets that of lane `lane ^ lane_mask`.
uint32_t shfl_xor(uint32_t mask, uint32_t value, int lane_mask);

// Warp vote: whether `predicate` holds in any lane of the warp.
bool vote_any(uint32_t mask, bool predicate);

// Stops the launch with an error (an invalid address, a misused primitive).
[[noreturn]] void fail(const char* fmt, ...);

// Fails unless [p, p + bytes) lies in one of the launch's global buffers (when it names any).
void check_global(const void* p, size_t bytes, const char* what);

}  // namespace ape_emu

#define threadIdx (::ape_emu::coords().thread_idx)
#define blockIdx (::ape_emu::coords().block_idx)
#define blockDim (::ape_emu::coords().block_dim)
#define gridDim (::ape_emu::coords().grid_dim)

inline void __syncthreads() { ::ape_emu::sync_block(); }
inline void __syncwarp(uint32_t = 0xffffffffu) { ::ape_emu::sync_warp(); }

template <typename U> inline U __shfl_xor_sync(uint32_t mask, U value, int lane_mask) {
  static_assert(sizeof(U) == 4, "32-bit shuffles only");
  uint32_t bits;
  memcpy(&bits, &value, 4);
  bits = ::ape_emu::shfl_xor(mask, bits, lane_mask);
  memcpy(&value, &bits, 4);
  return value;
}

inline bool __any_sync(uint32_t mask, bool predicate) {
  return ::ape_emu::vote_any(mask, predicate);
}

template <typename U> inline U __ldg(const U* p) {
  ::ape_emu::check_global(p, sizeof(U), "__ldg");
  return *p;
}

// Global loads through L2 only (ld.global.cg): the values another CTA wrote before a fence.
template <typename U> inline U __ldcg(const U* p) {
  ::ape_emu::check_global(p, sizeof(U), "__ldcg");
  return *p;
}

// Memory fence over the device (membar.gl / fence.sc.gpu), and the 32-bit atomic add. CTAs run on
// several OS threads at once (runtime.cpp), so both are the CPU's real ones: a kernel that hands
// data from one CTA to another through them is run as a GPU runs it, with the other CTAs still
// running.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int value) {
  ::ape_emu::check_global(p, sizeof(unsigned int), "atomicAdd");
  return __atomic_fetch_add(p, value, __ATOMIC_SEQ_CST);
}

template <typename U> inline U min(U a, U b) { return a < b ? a : b; }
template <typename U> inline U max(U a, U b) { return a < b ? b : a; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

// 16-bit floats: storage only; arithmetic goes through float, as the kernels do.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return {uint16_t(u >> 16)};
}

inline float __half2float(__half h) {
  _Float16 x;
  memcpy(&x, &h.bits, 2);
  return float(x);
}

inline __half __float2half_rn(float f) {
  const _Float16 x = _Float16(f);  // IEEE conversion: round to nearest, ties to even
  __half h;
  memcpy(&h.bits, &x, 2);
  return h;
}

inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }

// The CTA's dynamic shared memory as a byte array named NAME.
#define APE_DYNAMIC_SMEM(NAME) unsigned char* NAME = ::ape_emu::dynamic_smem()
