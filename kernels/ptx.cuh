// Every inline-PTX primitive the kernels use, in one place: cp.async, ldmatrix, mma.sync
// m16n8k16 (f32 accumulate), ex2.approx, and an optimisation barrier. The kernel emulator
// (APE_EMULATE) replaces this file with emulator/ptx.cuh, which implements the same
// functions on the CPU from the PTX ISA's definitions.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16 inputs), lane = 4 * group + tig:
//   A 16x16 (row-major), 4 x b16x2:  a0 (row group,   cols 2tig..+1)   a1 (row group+8, cols 2tig..+1)
//                                    a2 (row group,   cols 2tig+8..+9) a3 (row group+8, cols 2tig+8..+9)
//   B 16x8 ("col"), 2 x b16x2:       b0 (k 2tig..+1, n group)          b1 (k 2tig+8..+9, n group)
//   C 16x8 f32:                      c0,c1 (row group, cols 2tig..+1)  c2,c3 (row group+8, same cols)
#pragma once

#include "common.cuh"

#ifdef APE_EMULATE
#include "../emulator/ptx.cuh"
#else

namespace ape {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false the destination is zero-filled and nothing
// is read from global memory.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// The same at a shared-window address (smem_addr): for addresses formed once and offset by
// constants, which the instruction takes as an immediate.
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans_at(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x with flush-to-zero (one MUFU op; max relative error 2^-22); 2^-inf = 0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// x, hidden from the optimiser. The compiler would otherwise hoist everything the attention
// kernel's rare RoPE shift branch derives from these values (16 table offsets, 8 Q fragment
// addresses) out of the key loop and hold it in registers for the whole walk, which spills at
// head dim 128.
template <typename U> __device__ __forceinline__ U opaque(U x) {
  static_assert(sizeof(U) == 4 || sizeof(U) == 8, "a 32- or 64-bit value");
  if constexpr (sizeof(U) == 8) {
    uint64_t v = reinterpret_cast<uint64_t>(x);
    asm volatile("mov.b64 %0, %0;" : "+l"(v));
    return reinterpret_cast<U>(v);
  } else {
    uint32_t v = static_cast<uint32_t>(x);
    asm volatile("mov.b32 %0, %0;" : "+r"(v));
    return static_cast<U>(v);
  }
}

}  // namespace ape

#endif  // APE_EMULATE
