// The kernel emulator's twin of kernels/ptx.cuh: the same functions, implemented on the CPU from
// the PTX ISA's definitions of each instruction (see runtime.cpp). The layouts are not derived
// from the kernels: a kernel whose index math disagrees with the ISA gets wrong numbers here as it
// would on a GPU.
#pragma once

#include <type_traits>

#include "cuda.h"

namespace ape_emu {

void cp_async_16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int n);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
float ex2_approx_ftz(float x);

}  // namespace ape_emu

namespace ape {

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::ape_emu::cp_async_16(smem, gmem, valid);
}
inline void cp_async_commit() { ::ape_emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { ::ape_emu::cp_async_wait(N); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  ::ape_emu::ldmatrix_x4(r, smem, false);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ::ape_emu::ldmatrix_x4(r, smem, true);
}

// A shared address in the form the *_at functions take: on a GPU the shared window's 32-bit
// address; here the offset into the CTA's dynamic shared memory, where every tile the kernels
// read with ldmatrix lies.
inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::ape_emu::dynamic_smem());
}
inline void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t addr) {
  ::ape_emu::ldmatrix_x4(r, ::ape_emu::dynamic_smem() + addr, false);
}
inline void ldmatrix_x4_trans_at(uint32_t (&r)[4], uint32_t addr) {
  ::ape_emu::ldmatrix_x4(r, ::ape_emu::dynamic_smem() + addr, true);
}

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(sizeof(T) == 2, "16-bit inputs");
  ::ape_emu::mma_m16n8k16(c, a, b0, b1, sizeof(T) == 2 && std::is_same<T, __nv_bfloat16>::value);
}

inline float exp2_ftz(float x) { return ::ape_emu::ex2_approx_ftz(x); }

template <typename U> inline U opaque(U x) { return x; }

}  // namespace ape
