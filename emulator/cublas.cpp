// The emulated device's cuBLAS: a stand-in for libcublas.so, built beside the driver stand-in
// (driver.cpp) by emulator/build-emulated-device.sh. It implements the GEMM entry points the crate
// calls (cublasGemmEx, and its strided-batched form, cublasSgemm and its strided-batched form) with
// cuBLAS's documented semantics: column-major operands, op(A) and op(B) by the transpose flags,
// leading dimensions and batch strides, bf16/f16/f32 inputs, f32 accumulation, host alpha and beta,
// and C not read when beta is 0. The product runs on the CPU when the handle's stream reaches it
// (a task of the driver's queue, recorded into a graph when the stream captures), and an operand
// outside device memory is an illegal address there, as a cuBLAS kernel's access would be.
//
// Sums are f32, of exact products, in eight interleaved partial sums over k: not cuBLAS's order,
// which is unspecified. Every other cuBLAS entry point returns CUBLAS_STATUS_NOT_SUPPORTED
// (stubs.cpp).
#include <library_types.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "device.h"

typedef enum {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
  CUBLAS_STATUS_LICENSE_ERROR = 16,
} cublasStatus_t;

typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 } cublasPointerMode_t;
typedef int cublasMath_t;
typedef int cublasGemmAlgo_t;
typedef enum {
  CUBLAS_COMPUTE_16F = 64,
  CUBLAS_COMPUTE_16F_PEDANTIC = 65,
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_PEDANTIC = 69,
  CUBLAS_COMPUTE_32F_FAST_16F = 74,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
} cublasComputeType_t;

struct cublasContext {
  CUstream stream = nullptr;
  cublasMath_t math = 0;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};
typedef cublasContext* cublasHandle_t;

namespace {

std::mutex g_mu;
std::set<cublasHandle_t> g_handles;

bool valid(cublasHandle_t h) {
  std::lock_guard<std::mutex> lock(g_mu);
  return h != nullptr && g_handles.count(h) > 0;
}

cublasStatus_t say(cublasStatus_t status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
cublasStatus_t say(cublasStatus_t status, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "emulated cuBLAS: %s\n", buf);
  return status;
}

size_t elem_size(cudaDataType t) {
  switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_16F:
    case CUDA_R_16BF: return 2;
    default: return 0;
  }
}

float load(const void* base, cudaDataType t, size_t i) {
  switch (t) {
    case CUDA_R_32F: return static_cast<const float*>(base)[i];
    case CUDA_R_16BF: {
      const uint32_t u = uint32_t(static_cast<const uint16_t*>(base)[i]) << 16;
      float f;
      memcpy(&f, &u, 4);
      return f;
    }
    case CUDA_R_16F: {
      _Float16 h;
      memcpy(&h, static_cast<const uint16_t*>(base) + i, 2);
      return float(h);
    }
    default: return NAN;
  }
}

void store(void* base, cudaDataType t, size_t i, float v) {
  switch (t) {
    case CUDA_R_32F: static_cast<float*>(base)[i] = v; break;
    case CUDA_R_16BF: {
      uint32_t u;
      memcpy(&u, &v, 4);
      uint16_t bits;
      if ((u & 0x7fffffffu) > 0x7f800000u) {
        bits = uint16_t((u >> 16) | 0x40);  // NaN stays NaN
      } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
        bits = uint16_t(u >> 16);
      }
      static_cast<uint16_t*>(base)[i] = bits;
      break;
    }
    case CUDA_R_16F: {
      const _Float16 h = _Float16(v);
      memcpy(static_cast<uint16_t*>(base) + i, &h, 2);
      break;
    }
    default: break;
  }
}

// out[p] = element start + p * stride of an operand of type t, as f32, for p < k.
void load_run(const void* base, cudaDataType t, size_t start, size_t stride, int k, float* out) {
  switch (t) {
    case CUDA_R_32F: {
      const float* x = static_cast<const float*>(base) + start;
      for (int p = 0; p < k; ++p) out[p] = x[size_t(p) * stride];
      break;
    }
    case CUDA_R_16BF: {
      const uint16_t* x = static_cast<const uint16_t*>(base) + start;
      for (int p = 0; p < k; ++p) {
        const uint32_t u = uint32_t(x[size_t(p) * stride]) << 16;
        memcpy(&out[p], &u, 4);
      }
      break;
    }
    default:
      for (int p = 0; p < k; ++p) out[p] = load(base, t, start + size_t(p) * stride);
      break;
  }
}

// One strided-batched GEMM, C = alpha op(A) op(B) + beta C, as queued.
struct Gemm {
  std::string name;
  cublasOperation_t transa, transb;
  int m, n, k;
  float alpha, beta;
  const void* a;
  cudaDataType at;
  int lda;
  long long stride_a;
  const void* b;
  cudaDataType bt;
  int ldb;
  long long stride_b;
  void* c;
  cudaDataType ct;
  int ldc;
  long long stride_c;
  int batch;
};

// Elements an operand of `rows` x `cols` (as stored, column-major) spans with leading dim `ld`.
size_t span(int rows, int cols, int ld) {
  if (rows == 0 || cols == 0) return 0;
  return size_t(cols - 1) * size_t(ld) + size_t(rows);
}

float dot(const float* x, const float* y, int k) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int p = 0;
  for (; p + 8 <= k; p += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += x[p + l] * y[p + l];
  }
  for (int l = 0; p < k; ++p, ++l) acc[l] += x[p] * y[p];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

int run_gemm(void* data, char* err, size_t err_len) {
  const Gemm& g = *static_cast<const Gemm*>(data);
  const bool ta = g.transa != CUBLAS_OP_N, tb = g.transb != CUBLAS_OP_N;
  const int a_rows = ta ? g.k : g.m, a_cols = ta ? g.m : g.k;
  const int b_rows = tb ? g.n : g.k, b_cols = tb ? g.k : g.n;
  for (int batch = 0; batch < g.batch; ++batch) {
    const auto* a = static_cast<const char*>(g.a) + batch * g.stride_a * elem_size(g.at);
    const auto* b = static_cast<const char*>(g.b) + batch * g.stride_b * elem_size(g.bt);
    auto* c = static_cast<char*>(g.c) + batch * g.stride_c * elem_size(g.ct);
    struct Operand {
      const char* what;
      const void* p;
      size_t elems;
      size_t size;
    } operands[] = {
        {"A", a, g.k > 0 ? span(a_rows, a_cols, g.lda) : 0, elem_size(g.at)},
        {"B", b, g.k > 0 ? span(b_rows, b_cols, g.ldb) : 0, elem_size(g.bt)},
        {"C", c, span(g.m, g.n, g.ldc), elem_size(g.ct)},
    };
    for (const Operand& o : operands) {
      char why[512];
      if (o.elems > 0 &&
          ape_emu_dev_check_range(uint64_t(reinterpret_cast<uintptr_t>(o.p)), o.elems * o.size,
                                  why, sizeof why) != 0) {
        snprintf(err, err_len, "%s (m %d, n %d, k %d, batch %d): operand %s: %s", g.name.c_str(),
                 g.m, g.n, g.k, batch, o.what, why);
        return 1;
      }
    }
    // op(B) by column, as f32: bcols[j * k + p] = op(B)(p, j).
    std::vector<float> bcols(size_t(g.n) * g.k);
    for (int j = 0; j < g.n; ++j) {
      load_run(b, g.bt, tb ? size_t(j) : size_t(j) * g.ldb, tb ? size_t(g.ldb) : 1, g.k,
               bcols.data() + size_t(j) * g.k);
    }
    // Rows of op(A) in blocks, each block's outputs by one thread.
    const int block = 64;
    const int n_blocks = (g.m + block - 1) / block;
    const unsigned n_threads =
        std::max(1u, std::min(std::thread::hardware_concurrency(), unsigned(n_blocks)));
    auto work = [&](unsigned t) {
      std::vector<float> arow(g.k);
      for (int blk = int(t); blk < n_blocks; blk += int(n_threads)) {
        for (int i = blk * block; i < std::min(g.m, (blk + 1) * block); ++i) {
          load_run(a, g.at, ta ? size_t(i) * g.lda : size_t(i), ta ? 1 : size_t(g.lda), g.k,
                   arow.data());
          for (int j = 0; j < g.n; ++j) {
            const size_t ci = size_t(i) + size_t(j) * g.ldc;
            float v = g.alpha * dot(arow.data(), bcols.data() + size_t(j) * g.k, g.k);
            if (g.beta != 0.f) v += g.beta * load(c, g.ct, ci);  // beta 0: C is not read
            store(c, g.ct, ci, v);
          }
        }
      }
    };
    if (n_threads == 1 || size_t(g.m) * g.n * std::max(g.k, 1) < (size_t(1) << 16)) {
      for (unsigned t = 0; t < n_threads; ++t) work(t);
    } else {
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < n_threads; ++t) pool.emplace_back(work, t);
      for (auto& th : pool) th.join();
    }
  }
  return 0;
}

void release_gemm(void* data) { delete static_cast<Gemm*>(data); }

bool supported(cudaDataType at, cudaDataType bt, cudaDataType ct, cublasComputeType_t compute) {
  const bool f32_compute = compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC ||
                           compute == CUBLAS_COMPUTE_32F_FAST_16F ||
                           compute == CUBLAS_COMPUTE_32F_FAST_16BF ||
                           compute == CUBLAS_COMPUTE_32F_FAST_TF32;
  if (!f32_compute || at != bt) return false;
  switch (at) {
    case CUDA_R_16BF: return ct == CUDA_R_16BF || ct == CUDA_R_32F;
    case CUDA_R_16F: return ct == CUDA_R_16F || ct == CUDA_R_32F;
    case CUDA_R_32F: return ct == CUDA_R_32F;
    default: return false;
  }
}

cublasStatus_t gemm(const char* name, cublasHandle_t handle, cublasOperation_t transa,
                    cublasOperation_t transb, int m, int n, int k, const void* alpha, const void* A,
                    cudaDataType Atype, int lda, long long strideA, const void* B, cudaDataType Btype,
                    int ldb, long long strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                    long long strideC, int batchCount, cublasComputeType_t computeType) {
  if (!valid(handle)) return say(CUBLAS_STATUS_NOT_INITIALIZED, "%s: not a live handle", name);
  if (handle->pointer_mode != CUBLAS_POINTER_MODE_HOST) {
    return say(CUBLAS_STATUS_NOT_SUPPORTED, "%s: device pointer mode is not emulated", name);
  }
  auto op_ok = [](cublasOperation_t t) {
    return t == CUBLAS_OP_N || t == CUBLAS_OP_T || t == CUBLAS_OP_C;
  };
  const int a_rows = transa == CUBLAS_OP_N ? m : k;
  const int b_rows = transb == CUBLAS_OP_N ? k : n;
  if (!op_ok(transa) || !op_ok(transb) || m < 0 || n < 0 || k < 0 || batchCount < 0 ||
      lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m) ||
      alpha == nullptr || beta == nullptr) {
    return say(CUBLAS_STATUS_INVALID_VALUE,
               "%s: transa %d, transb %d, m %d, n %d, k %d, lda %d, ldb %d, ldc %d, batch %d", name,
               int(transa), int(transb), m, n, k, lda, ldb, ldc, batchCount);
  }
  if (!supported(Atype, Btype, Ctype, computeType)) {
    return say(CUBLAS_STATUS_NOT_SUPPORTED, "%s: types A %d, B %d, C %d with compute type %d", name,
               int(Atype), int(Btype), int(Ctype), int(computeType));
  }
  if (m == 0 || n == 0 || batchCount == 0) return CUBLAS_STATUS_SUCCESS;
  auto* g = new Gemm{name,  transa, transb, m,     n,       k,     *static_cast<const float*>(alpha),
                     *static_cast<const float*>(beta), A, Atype, lda, strideA, B, Btype, ldb,
                     strideB, C, Ctype, ldc, strideC, batchCount};
  const CUresult rc = ape_emu_dev_enqueue_task(handle->stream, name, run_gemm, g, release_gemm);
  if (rc != CUDA_SUCCESS) {
    return say(CUBLAS_STATUS_EXECUTION_FAILED, "%s: the driver refused the launch (error %d)", name,
               int(rc));
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (!ape_emu_dev_has_context()) {
    return say(CUBLAS_STATUS_NOT_INITIALIZED, "cublasCreate: no current CUDA context");
  }
  auto* h = new cublasContext;
  std::lock_guard<std::mutex> lock(g_mu);
  g_handles.insert(h);
  *handle = h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  ape_emu_dev_synchronize();  // as cuBLAS, it waits for the device
  std::lock_guard<std::mutex> lock(g_mu);
  g_handles.erase(handle);
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetVersion_v2(cublasHandle_t handle, int* version) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (version == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *version = 130000;
  return CUBLAS_STATUS_SUCCESS;
}

size_t cublasGetCudartVersion(void) { return 13000; }

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, CUstream stream) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, CUstream* stream) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (stream == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t bytes) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  char why[512];
  if (bytes > 0 && ape_emu_dev_check_range(uint64_t(reinterpret_cast<uintptr_t>(workspace)), bytes,
                                           why, sizeof why) != 0) {
    return say(CUBLAS_STATUS_INVALID_VALUE, "cublasSetWorkspace: %s", why);
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->math;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t* mode) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode) {
  if (!valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  handle->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    default: return cublasGetStatusName(status);
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                            int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                            int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                            void* C, cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo) {
  (void)algo;
  return gemm("cublasGemmEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype,
              ldb, 0, beta, C, Ctype, ldc, 0, 1, computeType);
}

cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
    const void* alpha, const void* A, cudaDataType Atype, int lda, long long strideA, const void* B,
    cudaDataType Btype, int ldb, long long strideB, const void* beta, void* C, cudaDataType Ctype,
    int ldc, long long strideC, int batchCount, cublasComputeType_t computeType,
    cublasGemmAlgo_t algo) {
  (void)algo;
  return gemm("cublasGemmStridedBatchedEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda,
              strideA, B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
              computeType);
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa,
                              cublasOperation_t transb, int m, int n, int k, const float* alpha,
                              const float* A, int lda, const float* B, int ldb, const float* beta,
                              float* C, int ldc) {
  return gemm("cublasSgemm", handle, transa, transb, m, n, k, alpha, A, CUDA_R_32F, lda, 0, B,
              CUDA_R_32F, ldb, 0, beta, C, CUDA_R_32F, ldc, 0, 1, CUBLAS_COMPUTE_32F);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa,
                                         cublasOperation_t transb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long strideA, const float* B, int ldb,
                                         long long strideB, const float* beta, float* C, int ldc,
                                         long long strideC, int batchCount) {
  return gemm("cublasSgemmStridedBatched", handle, transa, transb, m, n, k, alpha, A, CUDA_R_32F,
              lda, strideA, B, CUDA_R_32F, ldb, strideB, beta, C, CUDA_R_32F, ldc, strideC,
              batchCount, CUBLAS_COMPUTE_32F);
}

// Every cuBLAS entry point not implemented here (stubs.cpp) calls this.
cublasStatus_t ape_emu_cublas_unsupported(const char* name) {
  static std::mutex mu;
  static std::set<std::string> said;
  std::lock_guard<std::mutex> lock(mu);
  if (said.insert(name).second) {
    fprintf(stderr, "emulated cuBLAS: %s is not supported by the emulated device\n", name);
  }
  return CUBLAS_STATUS_NOT_SUPPORTED;
}

}  // extern "C"
