// The emulated CUDA device: a stand-in for the CUDA driver library (libcuda.so), built by
// emulator/build-emulated-device.sh and loaded by cudarc exactly as the real one is, through the
// library search path. It runs the crate's kernels on the kernel emulator (runtime.cpp), so the
// host side of every launch (src/cuda, the GPU forward pass, the GPU tests, the benches' set-up)
// runs here, unchanged, on machines without a GPU.
//
// The device is one H100 SXM (132 SMs, 227 KiB opt-in shared memory per block, 48 KiB default,
// 64K registers per block, 228 KiB of shared memory and 64K registers per SM for the occupancy
// calculator, compute capability 9.0). What a real driver enforces, this one
// enforces, with the driver's error code:
// - launches: at most 1024 threads per block (and the kernel's __launch_bounds__), grid y and z at
//   most 65535, registers x threads within 64K (each kernel's count from `ptxas -v` at build time),
//   dynamic shared memory above 48 KiB (less the kernel's static shared memory) only after the
//   function's max-dynamic-shared-size attribute was raised that far, and never past 227 KiB;
// - memory: copies and memsets must lie inside one live allocation; a freed buffer is gone;
// - kernels: global reads and writes must lie inside live allocations (every allocation sits
//   between inaccessible pages, its slack bytes are checked after each launch, freed pages stay
//   inaccessible, and cp.async and __ldg sources are checked byte-exactly): a stray access is the
//   driver's sticky "illegal address", reported at the next synchronizing call, as on a GPU;
// - streams: work runs when something waits for it (a synchronize, an event, a blocking copy),
//   not when it is queued, so a missing synchronization reads stale or poisoned bytes; fresh
//   device and page-locked memory is filled with 0xff bytes (NaN in f32, f16 and bf16);
// - stream capture and CUDA graphs: captured work is recorded, not run, and runs at each launch
//   of the instantiated graph; what a capture forbids (synchronizing, pageable copies, blocking
//   calls in global mode) is refused and invalidates the capture.
// Every other entry point of the driver API returns CUDA_ERROR_NOT_SUPPORTED, and
// cuGetErrorString says which function it was (stubs.cpp, generated from cudarc's bindings).
//
// It says nothing about speed, real rounding of tensor-core sums, or the real driver's own bugs.
#include <cuda.h>

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "device.h"

extern "C" int ape_emu_launch(const char* name, const uint32_t* grid, const uint32_t* block,
                              size_t smem, void** params, uint32_t flags, uint32_t threads,
                              const uint64_t* regions, size_t n_regions, char* err, size_t err_len);
extern "C" int ape_emu_kernel_params(const char* name, size_t* sizes, size_t max, size_t* n);
extern "C" int ape_emu_memory_fault(const char* what);
extern "C" int ape_emu_launch_fault(const char* what);

// The resources `ptxas -v` reported for each kernel (sm_90a), generated at build time.
struct KernelResources {
  const char* name;
  int registers;
  int static_smem;
  int local_bytes;
  int max_threads;  // __launch_bounds__' first value, or 0
};
extern const KernelResources kKernelResources[];
extern const size_t kKernelResourceCount;

// ---- The device ---------------------------------------------------------------------------------

namespace {

constexpr const char* kDeviceName = "NVIDIA H100 80GB HBM3 (emulated)";
constexpr int kSmCount = 132;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultSmemPerBlock = 48 * 1024;
constexpr int kOptinSmemPerBlock = 227 * 1024;
constexpr int kRegistersPerBlock = 64 * 1024;
// Per SM, for the occupancy calculator: shared memory, the runtime's reservation per block,
// registers, resident warps and blocks.
constexpr int kSmemPerSm = 228 * 1024;
constexpr int kSmemReservedPerBlock = 1024;
constexpr int kRegistersPerSm = 64 * 1024;
constexpr int kMaxWarpsPerSm = 64;
constexpr int kMaxBlocksPerSm = 32;
constexpr size_t kDefaultMemory = size_t(81559) << 20;  // what an H100 80GB HBM3 reports
constexpr int kDriverVersion = 13000;

const std::map<int, int>& attributes() {
  static const std::map<int, int> table = {
      {CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, kMaxThreadsPerBlock},
      {CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X, 1024},
      {CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y, 1024},
      {CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z, 64},
      {CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X, 2147483647},
      {CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y, 65535},
      {CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z, 65535},
      {CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK, kDefaultSmemPerBlock},
      {CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY, 65536},
      {CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32},
      {CU_DEVICE_ATTRIBUTE_MAX_PITCH, 2147483647},
      {CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK, kRegistersPerBlock},
      {CU_DEVICE_ATTRIBUTE_CLOCK_RATE, 1980000},
      {CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT, 512},
      {CU_DEVICE_ATTRIBUTE_GPU_OVERLAP, 1},
      {CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, kSmCount},
      {CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT, 0},
      {CU_DEVICE_ATTRIBUTE_INTEGRATED, 0},
      {CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY, 1},
      {CU_DEVICE_ATTRIBUTE_COMPUTE_MODE, CU_COMPUTEMODE_DEFAULT},
      {CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS, 1},
      {CU_DEVICE_ATTRIBUTE_ECC_ENABLED, 1},
      {CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, 24},
      {CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, 0},
      {CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, 0},
      {CU_DEVICE_ATTRIBUTE_TCC_DRIVER, 0},
      {CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, 2619000},
      {CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, 5120},
      {CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, 50 << 20},
      {CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, 2048},
      {CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT, 3},
      {CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, 1},
      {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 9},
      {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0},
      {CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED, 1},
      {CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED, 1},
      {CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED, 1},
      {CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, 228 * 1024},
      {CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR, 64 * 1024},
      {CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY, 1},
      {CU_DEVICE_ATTRIBUTE_MULTI_GPU_BOARD, 0},
      {CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS, 1},
      {CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS, 0},
      {CU_DEVICE_ATTRIBUTE_COMPUTE_PREEMPTION_SUPPORTED, 1},
      {CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, 1},
      {CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, kOptinSmemPerBlock},
      {CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR, 32},
      {CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK, 1024},
      {CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, 1},
      {CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH, 1},
      {CU_DEVICE_ATTRIBUTE_HOST_NATIVE_ATOMIC_SUPPORTED, 0},
      {CU_DEVICE_ATTRIBUTE_SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO, 2},
  };
  return table;
}

// ---- Errors -------------------------------------------------------------------------------------

struct ErrorText {
  CUresult code;
  const char* name;
  const char* text;
};

const ErrorText kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_NO_BINARY_FOR_GPU, "CUDA_ERROR_NO_BINARY_FOR_GPU",
     "no kernel image is available for execution on the device"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation is not permitted in this state"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS",
     "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
     "too many resources requested for launch"},
    {CUDA_ERROR_CONTEXT_IS_DESTROYED, "CUDA_ERROR_CONTEXT_IS_DESTROYED",
     "context is destroyed"},
    {CUDA_ERROR_MISALIGNED_ADDRESS, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
     "operation not permitted when stream is capturing"},
    {CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
     "operation failed due to a previous error during capture"},
    {CUDA_ERROR_STREAM_CAPTURE_ISOLATION, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
     "dependency created on uncaptured work in another stream"},
    {CUDA_ERROR_CAPTURED_EVENT, "CUDA_ERROR_CAPTURED_EVENT",
     "operation not permitted on an event last recorded in a capturing stream"},
    {CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
     "attempt to terminate a thread-local capture sequence from another thread"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const ErrorText* find_error(CUresult code) {
  for (const ErrorText& e : kErrors) {
    if (e.code == code) return &e;
  }
  return nullptr;
}

// The driver's one lock: every entry point holds it, and work runs under it (a kernel's CTAs run on
// the emulator's own threads while the caller waits).
std::recursive_mutex g_mu;
using Lock = std::lock_guard<std::recursive_mutex>;

// The last detail of each error code, for cuGetErrorString (strings are kept for good: the driver
// hands out pointers to them).
std::map<int, const std::string*> g_detail;
std::deque<std::string> g_strings;
bool g_trace = false;

// Records why the current call fails with `code`, and returns it.
CUresult fail(CUresult code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
CUresult fail(CUresult code, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  g_strings.emplace_back(buf);
  g_detail[code] = &g_strings.back();
  if (g_trace) fprintf(stderr, "[emulated device] error %d: %s\n", int(code), buf);
  return code;
}

// ---- Device memory ------------------------------------------------------------------------------
//
// Every allocation (device memory and page-locked host memory alike) comes from one reserved
// address range, the arena, and is never placed where another was: [pages][guard page], with the
// allocation ending at the end of its pages (256-byte aligned start, as cuMemAlloc's) and canary
// bytes around it. Freed pages become inaccessible for good.

constexpr size_t kPage = 4096;
constexpr size_t kAlign = 256;
constexpr size_t kArenaBytes = size_t(1) << 45;  // 32 TiB of address space, reserved, not used
constexpr unsigned char kCanary = 0xa5;
constexpr unsigned char kPoison = 0xff;
constexpr size_t kCanaryCheck = 256;  // bytes checked before each allocation

uintptr_t g_arena_lo = 0, g_arena_hi = 0, g_bump = 0;

struct Allocation {
  uintptr_t ptr = 0;
  size_t bytes = 0;
  uintptr_t map_lo = 0, map_hi = 0;  // its accessible pages
  bool host = false;                 // page-locked host memory, not device memory
  bool free_queued = false;          // a cuMemFreeAsync is queued
  uint64_t id = 0;
};

std::map<uintptr_t, Allocation> g_live;   // by ptr
std::map<uintptr_t, Allocation> g_freed;  // by map_lo
uint64_t g_next_id = 1;
uint64_t g_live_version = 0;  // changes with every allocation and free
size_t g_device_used = 0;
size_t g_device_total = kDefaultMemory;

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

bool in_arena(uintptr_t a) { return a >= g_arena_lo && a < g_arena_hi; }

// The live allocation holding [p, p + bytes), or nullptr.
Allocation* find_live(uintptr_t p, size_t bytes) {
  auto it = g_live.upper_bound(p);
  if (it == g_live.begin()) return nullptr;
  --it;
  Allocation& a = it->second;
  if (p >= a.ptr && p - a.ptr <= a.bytes && bytes <= a.bytes - (p - a.ptr)) return &a;
  return nullptr;
}

// What address `p` is, for a message: in which allocation, or near or after which.
std::string describe(uintptr_t p) {
  char buf[256];
  auto it = g_live.upper_bound(p);
  if (it != g_live.begin()) {
    const Allocation& a = std::prev(it)->second;
    if (p >= a.map_lo && p < a.map_hi + kPage) {
      if (p >= a.ptr && p < a.ptr + a.bytes) {
        snprintf(buf, sizeof buf, "byte %zu of a live %zu-byte allocation at %#lx", size_t(p - a.ptr),
                 a.bytes, (unsigned long)a.ptr);
      } else if (p >= a.ptr + a.bytes) {
        snprintf(buf, sizeof buf, "%zu bytes past the end of a %zu-byte allocation at %#lx",
                 size_t(p - a.ptr - a.bytes), a.bytes, (unsigned long)a.ptr);
      } else {
        snprintf(buf, sizeof buf, "%zu bytes before a %zu-byte allocation at %#lx",
                 size_t(a.ptr - p), a.bytes, (unsigned long)a.ptr);
      }
      return buf;
    }
  }
  auto f = g_freed.upper_bound(p);
  if (f != g_freed.begin()) {
    const Allocation& a = std::prev(f)->second;
    if (p >= a.map_lo && p < a.map_hi + kPage) {
      snprintf(buf, sizeof buf, "%s%zu-byte allocation at %#lx, freed",
               p >= a.ptr && p < a.ptr + a.bytes ? "a " : "near a ", a.bytes,
               (unsigned long)a.ptr);
      return buf;
    }
  }
  if (in_arena(p)) return "device address space outside every allocation";
  return "not device memory";
}

bool reserve_arena() {
  if (g_arena_lo) return true;
  void* p = mmap(nullptr, kArenaBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  g_arena_lo = reinterpret_cast<uintptr_t>(p);
  g_arena_hi = g_arena_lo + kArenaBytes;
  g_bump = g_arena_lo + kPage;  // the first page stays a guard
  return true;
}

CUresult arena_alloc(size_t bytes, bool host, uintptr_t* out) {
  if (!reserve_arena()) return fail(CUDA_ERROR_OUT_OF_MEMORY, "cannot reserve the address space");
  const size_t body = round_up(std::max<size_t>(bytes, 1), kAlign);
  const size_t pages = bytes == 0 ? 0 : round_up(body, kPage);
  if (g_bump + pages + kPage > g_arena_hi) {
    return fail(CUDA_ERROR_OUT_OF_MEMORY, "the emulated device's address space is used up");
  }
  if (!host) {
    const size_t charge = round_up(std::max<size_t>(bytes, 1), kAlign);
    if (charge > g_device_total - g_device_used) {
      return fail(CUDA_ERROR_OUT_OF_MEMORY,
                  "%zu bytes requested, %zu of %zu bytes of device memory free", bytes,
                  g_device_total - g_device_used, g_device_total);
    }
    g_device_used += charge;
  }
  Allocation a;
  a.map_lo = g_bump;
  a.map_hi = g_bump + pages;
  a.ptr = bytes == 0 ? a.map_hi : a.map_hi - body;
  a.bytes = bytes;
  a.host = host;
  a.id = g_next_id++;
  g_bump += pages + kPage;
  if (pages > 0) {
    if (mprotect(reinterpret_cast<void*>(a.map_lo), pages, PROT_READ | PROT_WRITE) != 0) {
      if (!host) g_device_used -= round_up(std::max<size_t>(bytes, 1), kAlign);
      return fail(CUDA_ERROR_OUT_OF_MEMORY, "cannot map %zu bytes", pages);
    }
    auto* base = reinterpret_cast<unsigned char*>(a.map_lo);
    memset(base, kCanary, a.ptr - a.map_lo);
    memset(reinterpret_cast<void*>(a.ptr), kPoison, bytes);
    memset(reinterpret_cast<void*>(a.ptr + bytes), kCanary, a.map_hi - a.ptr - bytes);
  }
  g_live[a.ptr] = a;
  g_live_version += 1;
  *out = a.ptr;
  return CUDA_SUCCESS;
}

void arena_free(uintptr_t ptr) {
  auto it = g_live.find(ptr);
  if (it == g_live.end()) return;
  Allocation a = it->second;
  g_live.erase(it);
  g_live_version += 1;
  if (a.map_hi > a.map_lo) {
    void* p = reinterpret_cast<void*>(a.map_lo);
    mprotect(p, a.map_hi - a.map_lo, PROT_NONE);
    madvise(p, a.map_hi - a.map_lo, MADV_DONTNEED);
  }
  if (!a.host) g_device_used -= round_up(std::max<size_t>(a.bytes, 1), kAlign);
  g_freed[a.map_lo] = a;
}

// The live allocations as a flat list, and as the (address, bytes) pairs a kernel may access:
// rebuilt only when an allocation comes or goes.
struct LiveList {
  uint64_t version = ~uint64_t(0);
  std::vector<const Allocation*> allocations;
  std::vector<uint64_t> regions;
};
LiveList g_list;

const LiveList& live_list() {
  if (g_list.version != g_live_version) {
    g_list.allocations.clear();
    g_list.regions.clear();
    for (const auto& [ptr, a] : g_live) {
      if (a.bytes == 0) continue;
      g_list.allocations.push_back(&a);
      g_list.regions.push_back(ptr);
      g_list.regions.push_back(a.bytes);
    }
    g_list.version = g_live_version;
  }
  return g_list;
}

// The first damaged canary byte around any live allocation (a write just outside it), or "".
std::string check_canaries() {
  static const std::vector<unsigned char> canary(kPage, kCanary);
  auto intact = [](uintptr_t lo, uintptr_t hi) {
    return hi <= lo || memcmp(reinterpret_cast<const void*>(lo), canary.data(), hi - lo) == 0;
  };
  for (const Allocation* a : live_list().allocations) {
    const uintptr_t lo = std::max(a->map_lo, a->ptr - std::min<uintptr_t>(a->ptr, kCanaryCheck));
    const uintptr_t end = a->ptr + a->bytes;
    if (intact(lo, a->ptr) && intact(end, a->map_hi)) continue;
    for (uintptr_t p = lo; p < a->map_hi; ++p) {
      if ((p < a->ptr || p >= end) && *reinterpret_cast<const unsigned char*>(p) != kCanary) {
        return "a write at " + describe(p);
      }
    }
  }
  return "";
}

// Faults: a kernel's access to a page that is not accessible fails its launch (illegal address),
// wherever the address points; host code that touches device memory is a bug of the host code,
// reported before the process dies. An integer division by zero in a kernel, which a GPU does not
// trap, fails its launch too (CUDA_ERROR_LAUNCH_FAILED). Any other fault goes to the handler that
// was there before.
struct sigaction g_old_segv, g_old_bus, g_old_fpe;

void on_fault(int sig, siginfo_t* info, void* uctx) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  char what[512];
  if (sig == SIGFPE) {
    ape_emu_launch_fault("an integer division by zero (a GPU gives an undefined value, no trap)");
  } else if (in_arena(addr)) {
    snprintf(what, sizeof what, "a load or store at %#lx: %s", (unsigned long)addr,
             describe(addr).c_str());
    ape_emu_memory_fault(what);  // returns only off a kernel's thread
    char msg[640];
    const int n = snprintf(msg, sizeof msg, "emulated device: host code touched %s\n", what + 2);
    if (n > 0) (void)!write(2, msg, size_t(std::min(n, int(sizeof msg) - 1)));
    abort();
  } else {
    snprintf(what, sizeof what, "a load or store at %#lx, outside the device's memory",
             (unsigned long)addr);
    ape_emu_memory_fault(what);  // returns only off a kernel's thread
  }
  struct sigaction* old = sig == SIGSEGV ? &g_old_segv : sig == SIGBUS ? &g_old_bus : &g_old_fpe;
  if (old->sa_flags & SA_SIGINFO) {
    old->sa_sigaction(sig, info, uctx);
  } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
    old->sa_handler(sig);
  } else {
    sigaction(sig, old, nullptr);  // the default action happens when the access is retried
  }
}

void install_fault_handler() {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  sigaction(SIGFPE, &sa, &g_old_fpe);
}

}  // namespace

// ---- Driver objects -----------------------------------------------------------------------------

struct Task {
  std::string name;
  ape_emu_dev_task_fn run = nullptr;
  void* data = nullptr;
  void (*release)(void*) = nullptr;
  ~Task() {
    if (release) release(data);
  }
};

struct alignas(16) Chunk {
  unsigned char b[16];
};

struct Op {
  enum Kind { Kernel, Copy, Set, Record, Wait, Free, HostFn, RunTask } kind;
  explicit Op(Kind k) : kind(k) {}
  uint64_t seq = 0;
  // Kernel: the function, its launch shape and a copy of its arguments (taken at the launch).
  CUfunction fn = nullptr;
  uint32_t grid[3] = {}, block[3] = {};
  size_t smem = 0;
  std::shared_ptr<std::vector<std::vector<Chunk>>> args;
  // Copy (dst <- src, bytes; from a snapshot of pageable memory when it has one) and Set.
  uintptr_t dst = 0, src = 0;
  size_t bytes = 0;
  std::shared_ptr<std::vector<unsigned char>> snapshot;
  bool dst_device = false, src_device = false;
  uint32_t value = 0;
  int elem = 1;
  size_t count = 0;
  // Record and Wait.
  std::shared_ptr<CUevent_st> event;
  std::weak_ptr<CUstream_st> wait_stream;
  uint64_t wait_seq = 0;
  // Free: dst. HostFn.
  CUhostFn host_fn = nullptr;
  void* user = nullptr;
  std::shared_ptr<Task> task;
};

struct CUgraph_st {
  std::vector<Op> ops;
};

struct CUgraphExec_st {
  std::vector<Op> ops;
};

struct Capture {
  CUstreamCaptureMode mode;
  std::thread::id thread;
  std::shared_ptr<CUgraph_st> graph;
  bool invalidated = false;
  std::string why;
};

struct CUstream_st {
  CUctx_st* ctx = nullptr;
  unsigned flags = 0;
  int priority = 0;
  bool null_stream = false;
  std::deque<Op> queue;
  uint64_t enqueued = 0;
  uint64_t done = 0;
  size_t pending_bytes = 0;  // held by queued snapshots
  std::unique_ptr<Capture> capture;
};

struct CUevent_st {
  unsigned flags = 0;
  bool recorded = false;  // recorded at least once outside a capture
  bool captured = false;  // last recorded into a capture
  std::weak_ptr<CUstream_st> stream;
  uint64_t seq = 0;
  bool done = true;
  std::chrono::steady_clock::time_point when;
};

struct CUfunc_st {
  CUmod_st* module = nullptr;
  std::string name;
  const KernelResources* res = nullptr;
  std::vector<size_t> param_sizes;
  int max_dynamic_smem = 0;
};

struct CUmod_st {
  std::set<std::string> names;  // the entry points of its sm_90 cubin
  std::map<std::string, std::unique_ptr<CUfunc_st>> functions;
};

struct CUctx_st {
  int retained = 0;
  bool live = false;
  CUresult sticky = CUDA_SUCCESS;  // a kernel's fault: every later call fails with it
  std::shared_ptr<CUstream_st> null_stream;
  std::map<CUstream, std::shared_ptr<CUstream_st>> streams;
  std::map<CUevent, std::shared_ptr<CUevent_st>> events;
  std::map<CUmodule, std::unique_ptr<CUmod_st>> modules;
  std::map<CUgraph, std::shared_ptr<CUgraph_st>> graphs;
  std::map<CUgraphExec, std::unique_ptr<CUgraphExec_st>> execs;
  std::map<int, size_t> limits;
};

namespace {

bool g_initialized = false;
CUctx_st g_primary;
thread_local CUctx_st* t_current = nullptr;
uint32_t g_schedule_flags = 0;  // APE_EMU_SCHEDULE: the kernel emulator's schedule
uint32_t g_threads = 0;         // APE_EMU_THREADS: OS threads per launch (0: one per core)
constexpr size_t kMaxPendingBytes = size_t(256) << 20;
constexpr size_t kMaxPendingOps = 1 << 14;

struct Api {
  const char* name;
  explicit Api(const char* n) : name(n) {
    if (g_trace) fprintf(stderr, "[emulated device] %s\n", n);
  }
};

#define API(NAME)  \
  Lock lock(g_mu); \
  Api api_(NAME)

#define NEED_INIT \
  if (!g_initialized) return fail(CUDA_ERROR_NOT_INITIALIZED, "%s before cuInit", api_.name)

// The current context, live; else returns the error from the calling entry point.
#define NEED_CTX(CTX)                                                                       \
  NEED_INIT;                                                                                \
  CUctx_st* CTX = t_current;                                                                \
  if (CTX == nullptr) {                                                                     \
    return fail(CUDA_ERROR_INVALID_CONTEXT, "%s without a current context", api_.name);     \
  }                                                                                         \
  if (!CTX->live) {                                                                         \
    return fail(CUDA_ERROR_CONTEXT_IS_DESTROYED, "%s: the current context was destroyed", \
                api_.name);                                                                 \
  }                                                                                         \
  if (CTX->sticky != CUDA_SUCCESS) return CTX->sticky

// Every capture under way (by stream), for the checks of blocking calls.
std::set<CUstream_st*> g_capturing;

void invalidate(CUstream_st* s, const std::string& why) {
  if (s->capture && !s->capture->invalidated) {
    s->capture->invalidated = true;
    s->capture->why = why;
  }
}

// A call that a capture forbids (a blocking call while a global capture runs anywhere, or a
// thread-local one on this thread): invalidates those captures and returns the error, or
// CUDA_SUCCESS when none forbids it.
CUresult refuse_if_capturing(const char* what) {
  CUresult rc = CUDA_SUCCESS;
  for (CUstream_st* s : g_capturing) {
    const Capture& c = *s->capture;
    const bool global = c.mode == CU_STREAM_CAPTURE_MODE_GLOBAL;
    const bool mine =
        c.mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL && c.thread == std::this_thread::get_id();
    if (global || mine) {
      invalidate(s, std::string(what) + " during the capture");
      rc = fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "%s is not permitted while a stream captures",
                what);
    }
  }
  return rc;
}

void set_sticky(CUctx_st* ctx, CUresult code, const std::string& why) {
  if (ctx->sticky != CUDA_SUCCESS) return;
  ctx->sticky = code;
  fail(code, "%s", why.c_str());
  fprintf(stderr, "emulated device: %s\n", why.c_str());
}

void flush(CUstream_st* s, uint64_t upto);
void flush_all(CUctx_st* ctx);

void run_kernel(CUctx_st* ctx, const Op& op) {
  std::vector<void*> params;
  for (auto& a : *op.args) params.push_back(a.data());
  const std::vector<uint64_t>& r = live_list().regions;
  char err[1024] = {0};
  const int rc =
      ape_emu_launch(op.fn->name.c_str(), op.grid, op.block, op.smem, params.data(),
                     g_schedule_flags, g_threads, r.data(), r.size() / 2, err, sizeof err);
  if (rc != 0) {
    const CUresult code = rc == 2   ? CUDA_ERROR_ILLEGAL_ADDRESS
                          : rc == 3 ? CUDA_ERROR_MISALIGNED_ADDRESS
                                    : CUDA_ERROR_LAUNCH_FAILED;
    set_sticky(ctx, code, std::string("kernel ") + err);
    return;
  }
  const std::string bad = check_canaries();
  if (!bad.empty()) {
    set_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, "kernel " + op.fn->name + ": " + bad);
  }
}

// A queued copy's device side must still be there when it runs.
bool copy_still_valid(CUctx_st* ctx, const Op& op) {
  for (auto [p, device, what] : {std::tuple{op.dst, op.dst_device, "destination"},
                                 std::tuple{op.src, op.src_device, "source"}}) {
    if (!device || op.bytes == 0) continue;
    if (find_live(p, op.bytes) == nullptr) {
      char buf[512];
      snprintf(buf, sizeof buf, "a copy of %zu bytes: its %s %#lx is %s", op.bytes, what,
               (unsigned long)p, describe(p).c_str());
      set_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, buf);
      return false;
    }
  }
  return true;
}

void execute(CUstream_st* s, Op& op) {
  CUctx_st* ctx = s->ctx;
  if (ctx->sticky != CUDA_SUCCESS && op.kind != Op::Free && op.kind != Op::Record) return;
  switch (op.kind) {
    case Op::Kernel:
      run_kernel(ctx, op);
      break;
    case Op::Copy:
      if (!copy_still_valid(ctx, op)) break;
      if (op.snapshot) {
        memcpy(reinterpret_cast<void*>(op.dst), op.snapshot->data(), op.bytes);
        s->pending_bytes -= op.bytes;
      } else if (op.bytes > 0) {
        memmove(reinterpret_cast<void*>(op.dst), reinterpret_cast<const void*>(op.src), op.bytes);
      }
      break;
    case Op::Set: {
      if (!copy_still_valid(ctx, op)) break;
      auto* d = reinterpret_cast<unsigned char*>(op.dst);
      for (size_t i = 0; i < op.count; ++i) memcpy(d + i * op.elem, &op.value, op.elem);
      break;
    }
    case Op::Record:
      op.event->done = true;
      op.event->when = std::chrono::steady_clock::now();
      break;
    case Op::Wait:
      if (auto other = op.wait_stream.lock()) flush(other.get(), op.wait_seq);
      break;
    case Op::Free:
      arena_free(op.dst);
      break;
    case Op::HostFn:
      op.host_fn(op.user);
      break;
    case Op::RunTask: {
      char err[1024] = {0};
      if (op.task->run(op.task->data, err, sizeof err) != 0) {
        set_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, op.task->name + ": " + err);
        break;
      }
      const std::string bad = check_canaries();
      if (!bad.empty()) set_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, op.task->name + ": " + bad);
      break;
    }
  }
}

// Runs the stream's queued work up to and including sequence number `upto`.
void flush(CUstream_st* s, uint64_t upto) {
  while (!s->queue.empty() && s->queue.front().seq <= upto) {
    Op op = std::move(s->queue.front());
    s->queue.pop_front();
    execute(s, op);
    s->done = op.seq;
  }
}

void flush_stream(CUstream_st* s) { flush(s, s->enqueued); }

void flush_all(CUctx_st* ctx) {
  if (ctx->null_stream) flush_stream(ctx->null_stream.get());
  for (auto& [h, s] : ctx->streams) flush_stream(s.get());
}

// The work of the legacy null stream waits for every blocking stream, and theirs for it.
void flush_blocking(CUctx_st* ctx) {
  for (auto& [h, s] : ctx->streams) {
    if (!(s->flags & CU_STREAM_NON_BLOCKING)) flush_stream(s.get());
  }
}

// The stream named by a handle (0 and CU_STREAM_LEGACY: the null stream), or nullptr.
CUstream_st* resolve(CUctx_st* ctx, CUstream h) {
  if (h == nullptr || h == CU_STREAM_LEGACY) return ctx->null_stream.get();
  auto it = ctx->streams.find(h);
  return it == ctx->streams.end() ? nullptr : it->second.get();
}

#define NEED_STREAM(S, CTX, H)                                                                   \
  CUstream_st* S = resolve(CTX, H);                                                              \
  if (S == nullptr) {                                                                            \
    if ((H) == CU_STREAM_PER_THREAD) {                                                           \
      return fail(CUDA_ERROR_NOT_SUPPORTED, "%s: the per-thread default stream is not supported " \
                                            "by the emulated device", api_.name);                \
    }                                                                                            \
    return fail(CUDA_ERROR_INVALID_HANDLE, "%s: stream %p is not a live stream", api_.name,    \
                (void*)(H));                                                                     \
  }

// Queues `op` on `s` (or records it into the stream's capture). The null stream runs at once,
// after every blocking stream; other streams run when waited for, or when too much is queued.
CUresult enqueue(CUstream_st* s, Op op, const char* what) {
  if (s->capture) {
    if (s->capture->invalidated) {
      return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "%s: the capture was invalidated: %s",
                  what, s->capture->why.c_str());
    }
    if (op.kind == Op::Record) {
      op.event->captured = true;
    }
    s->capture->graph->ops.push_back(std::move(op));
    return CUDA_SUCCESS;
  }
  op.seq = ++s->enqueued;
  if (op.kind == Op::Record) {
    op.event->recorded = true;
    op.event->captured = false;
    op.event->done = false;
    op.event->seq = op.seq;
    // The stream's own shared pointer: find it.
    if (s->null_stream) {
      op.event->stream = s->ctx->null_stream;
    } else {
      op.event->stream = s->ctx->streams[s];
    }
  }
  if (op.snapshot) s->pending_bytes += op.bytes;
  if (s->null_stream) {
    flush_blocking(s->ctx);
    s->queue.push_back(std::move(op));
    flush_stream(s);
    return CUDA_SUCCESS;
  }
  if (!(s->flags & CU_STREAM_NON_BLOCKING)) flush_stream(s->ctx->null_stream.get());
  s->queue.push_back(std::move(op));
  if (s->pending_bytes > kMaxPendingBytes || s->queue.size() > kMaxPendingOps) flush_stream(s);
  return CUDA_SUCCESS;
}

// ---- Memory checks for copies -------------------------------------------------------------------

// [p, p + bytes) as a device range: inside one live device allocation.
CUresult check_device_range(uintptr_t p, size_t bytes, const char* what, const char* call) {
  if (bytes == 0) return CUDA_SUCCESS;
  const Allocation* a = find_live(p, bytes);
  if (a == nullptr) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: %s [%#lx, +%zu) is not inside one allocation: %#lx is %s",
                call, what, (unsigned long)p, bytes, (unsigned long)p, describe(p).c_str());
  }
  if (a->host) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: %s %#lx is page-locked host memory, not device memory",
                call, what, (unsigned long)p);
  }
  return CUDA_SUCCESS;
}

// [p, p + bytes) as a host range: page-locked (inside one allocation) or pageable (outside the
// arena). *pinned says which.
CUresult check_host_range(uintptr_t p, size_t bytes, bool* pinned, const char* what, const char* call) {
  *pinned = false;
  if (bytes == 0) return CUDA_SUCCESS;
  if (p == 0) return fail(CUDA_ERROR_INVALID_VALUE, "%s: %s is a null pointer", call, what);
  if (!in_arena(p)) return CUDA_SUCCESS;
  const Allocation* a = find_live(p, bytes);
  if (a == nullptr || !a->host) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: host %s %#lx (%zu bytes) is %s", call, what,
                (unsigned long)p, bytes, describe(p).c_str());
  }
  *pinned = true;
  return CUDA_SUCCESS;
}

CUresult copy(CUctx_st* ctx, CUstream_st* s, uintptr_t dst, bool dst_device, uintptr_t src,
              bool src_device, size_t bytes, bool blocking, const char* call) {
  CUresult rc;
  bool dst_pinned = false, src_pinned = false;
  if (dst_device) {
    rc = check_device_range(dst, bytes, "destination", call);
  } else {
    rc = check_host_range(dst, bytes, &dst_pinned, "destination", call);
  }
  if (rc != CUDA_SUCCESS) return rc;
  if (src_device) {
    rc = check_device_range(src, bytes, "source", call);
  } else {
    rc = check_host_range(src, bytes, &src_pinned, "source", call);
  }
  if (rc != CUDA_SUCCESS) return rc;
  const bool pageable = (!dst_device && !dst_pinned) || (!src_device && !src_pinned);
  if (s->capture && (pageable || blocking)) {
    invalidate(s, std::string(call) + (pageable ? " with pageable host memory" : ""));
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                "%s: a copy %s is not permitted in a stream capture", call,
                pageable ? "from or to pageable host memory" : "that blocks");
  }
  if (blocking) {
    rc = refuse_if_capturing(call);
    if (rc != CUDA_SUCCESS) return rc;
  }
  Op op(Op::Copy);
  op.dst = dst;
  op.src = src;
  op.bytes = bytes;
  op.dst_device = dst_device;
  op.src_device = src_device;
  // Pageable source: the driver takes its bytes before the call returns.
  if (!src_device && !src_pinned && bytes > 0) {
    op.snapshot = std::make_shared<std::vector<unsigned char>>(
        reinterpret_cast<const unsigned char*>(src), reinterpret_cast<const unsigned char*>(src) + bytes);
  }
  const uint64_t seq_before = s->enqueued;
  rc = enqueue(s, std::move(op), call);
  if (rc != CUDA_SUCCESS) return rc;
  // Pageable destination, or a blocking call: the copy is done when the call returns.
  if (blocking || (!dst_device && !dst_pinned)) {
    flush(s, seq_before + 1);
    if (ctx->sticky != CUDA_SUCCESS) return ctx->sticky;
  }
  return CUDA_SUCCESS;
}

CUresult memset_op(CUctx_st* ctx, CUstream_st* s, uintptr_t dst, uint32_t value, int elem,
                   size_t count, bool blocking, const char* call) {
  if (dst % elem != 0) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: %#lx is not aligned to %d bytes", call,
                (unsigned long)dst, elem);
  }
  CUresult rc = check_device_range(dst, count * elem, "destination", call);
  if (rc != CUDA_SUCCESS) return rc;
  if (blocking) {
    rc = refuse_if_capturing(call);
    if (rc != CUDA_SUCCESS) return rc;
  }
  Op op(Op::Set);
  op.dst = dst;
  op.dst_device = true;
  op.bytes = count * elem;
  op.value = value;
  op.elem = elem;
  op.count = count;
  const uint64_t seq_before = s->enqueued;
  rc = enqueue(s, std::move(op), call);
  if (rc != CUDA_SUCCESS) return rc;
  if (blocking) {
    flush(s, seq_before + 1);
    if (ctx->sticky != CUDA_SUCCESS) return ctx->sticky;
  }
  return CUDA_SUCCESS;
}

// ---- Modules ------------------------------------------------------------------------------------

// The global function symbols of an ELF64 image (a cubin), or false when it is not one.
bool elf_functions(const unsigned char* p, size_t size, std::set<std::string>* out) {
  auto rd = [&](size_t off, size_t n, void* dst) {
    if (off > size || n > size - off) return false;
    memcpy(dst, p + off, n);
    return true;
  };
  if (size < 64 || memcmp(p, "\x7f" "ELF", 4) != 0 || p[4] != 2) return false;
  uint64_t shoff;
  uint16_t shentsize, shnum;
  if (!rd(0x28, 8, &shoff) || !rd(0x3a, 2, &shentsize) || !rd(0x3c, 2, &shnum)) return false;
  if (shentsize < 64) return false;
  struct Section {
    uint32_t type, link;
    uint64_t offset, size, entsize;
  };
  std::vector<Section> sections(shnum);
  for (uint16_t i = 0; i < shnum; ++i) {
    const size_t h = shoff + size_t(i) * shentsize;
    Section& s = sections[i];
    if (!rd(h + 4, 4, &s.type) || !rd(h + 0x18, 8, &s.offset) || !rd(h + 0x20, 8, &s.size) ||
        !rd(h + 0x28, 4, &s.link) || !rd(h + 0x38, 8, &s.entsize)) {
      return false;
    }
  }
  for (const Section& s : sections) {
    if (s.type != 2 /* SHT_SYMTAB */ || s.entsize < 24 || s.link >= sections.size()) continue;
    const Section& strtab = sections[s.link];
    for (uint64_t off = s.offset; off + 24 <= s.offset + s.size; off += s.entsize) {
      uint32_t name;
      unsigned char info;
      uint16_t shndx;
      if (!rd(off, 4, &name) || !rd(off + 4, 1, &info) || !rd(off + 6, 2, &shndx)) return false;
      if ((info & 0xf) != 2 /* STT_FUNC */ || (info >> 4) != 1 /* STB_GLOBAL */ || shndx == 0) {
        continue;
      }
      if (name >= strtab.size) return false;
      const char* str = reinterpret_cast<const char*>(p + strtab.offset + name);
      out->insert(std::string(str, strnlen(str, strtab.size - name)));
    }
  }
  return true;
}

// Finds the sm_90 cubin of a fatbin (what an H100's driver loads) and lists its kernels.
CUresult load_image(const void* image, std::set<std::string>* names) {
  const auto* p = static_cast<const unsigned char*>(image);
  uint32_t magic;
  memcpy(&magic, p, 4);
  if (memcmp(p, "\x7f" "ELF", 4) == 0) {
    // A bare cubin: its size is not passed; read its section headers' extent.
    uint64_t shoff;
    uint16_t shentsize, shnum;
    memcpy(&shoff, p + 0x28, 8);
    memcpy(&shentsize, p + 0x3a, 2);
    memcpy(&shnum, p + 0x3c, 2);
    if (!elf_functions(p, shoff + size_t(shentsize) * shnum, names)) {
      return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: a malformed ELF image");
    }
    return CUDA_SUCCESS;
  }
  if (magic != 0xBA55ED50u) {
    return fail(CUDA_ERROR_INVALID_IMAGE,
                "cuModuleLoadData: not a fatbin or a cubin (PTX is not JIT-compiled by the "
                "emulated device)");
  }
  uint16_t header;
  uint64_t fat_size;
  memcpy(&header, p + 6, 2);
  memcpy(&fat_size, p + 8, 8);
  bool found = false;
  std::string archs;
  for (uint64_t off = header; off + 32 <= header + fat_size;) {
    uint16_t kind;
    uint32_t entry_header, arch;
    uint64_t size;
    memcpy(&kind, p + off, 2);
    memcpy(&entry_header, p + off + 4, 4);
    memcpy(&size, p + off + 8, 8);
    memcpy(&arch, p + off + 28, 4);
    if (entry_header == 0) break;
    const unsigned char* payload = p + off + entry_header;
    archs += (archs.empty() ? "" : ", ") + std::string(kind == 2 ? "sm_" : "compute_") +
             std::to_string(arch);
    if (kind == 2 && arch == 90) {
      if (!elf_functions(payload, size, names)) {
        return fail(CUDA_ERROR_INVALID_IMAGE,
                    "cuModuleLoadData: the sm_90 entry of the fatbin is not an ELF image "
                    "(compressed?)");
      }
      found = true;
    }
    off += entry_header + size;
  }
  if (!found) {
    return fail(CUDA_ERROR_NO_BINARY_FOR_GPU,
                "cuModuleLoadData: the fatbin holds %s, no sm_90 cubin for the H100 (PTX is not "
                "JIT-compiled by the emulated device)",
                archs.c_str());
  }
  return CUDA_SUCCESS;
}

const KernelResources* resources(const std::string& name) {
  for (size_t i = 0; i < kKernelResourceCount; ++i) {
    if (name == kKernelResources[i].name) return &kKernelResources[i];
  }
  return nullptr;
}

// Threads per block the function can launch with: its __launch_bounds__, and the registers.
int max_threads(const CUfunc_st* f) {
  const int per_warp = int(round_up(size_t(std::max(f->res->registers, 1)) * 32, 256));
  int t = std::min(kMaxThreadsPerBlock, kRegistersPerBlock / per_warp * 32);
  if (f->res->max_threads > 0) t = std::min(t, f->res->max_threads);
  return t;
}

bool valid_function(CUctx_st* ctx, CUfunction f) {
  if (f == nullptr) return false;
  for (auto& [h, m] : ctx->modules) {
    auto it = m->functions.find(f->name);
    if (it != m->functions.end() && it->second.get() == f) return true;
  }
  return false;
}

// Destroys everything of a context: its queued work runs first.
void reset_context(CUctx_st* ctx) {
  flush_all(ctx);
  std::vector<uintptr_t> all;
  for (auto& [p, a] : g_live) all.push_back(p);
  for (uintptr_t p : all) arena_free(p);
  for (auto& [h, s] : ctx->streams) g_capturing.erase(s.get());
  ctx->streams.clear();
  ctx->events.clear();
  ctx->modules.clear();
  ctx->graphs.clear();
  ctx->execs.clear();
  ctx->null_stream.reset();
  ctx->sticky = CUDA_SUCCESS;
  ctx->live = false;
}

void init_once() {
  static bool done = false;
  if (done) return;
  done = true;
  g_trace = getenv("APE_EMU_TRACE") && strcmp(getenv("APE_EMU_TRACE"), "1") == 0;
  if (const char* s = getenv("APE_EMU_SCHEDULE")) {
    if (strstr(s, "reverse")) g_schedule_flags |= 1;
    if (strstr(s, "late")) g_schedule_flags |= 2;
  }
  if (const char* t = getenv("APE_EMU_THREADS")) g_threads = uint32_t(strtoul(t, nullptr, 10));
  if (const char* m = getenv("APE_EMU_DEVICE_MEMORY")) {
    char* end = nullptr;
    double v = strtod(m, &end);
    if (end && (*end == 'G' || *end == 'g')) v *= double(1 << 30);
    if (end && (*end == 'M' || *end == 'm')) v *= double(1 << 20);
    if (v > 0) g_device_total = size_t(v);
  }
  install_fault_handler();
}

}  // namespace

// ---- The driver API -----------------------------------------------------------------------------

extern "C" {

CUresult CUDAAPI cuGetErrorString(CUresult error, const char** pStr) {
  Lock lock(g_mu);
  if (pStr == nullptr) return CUDA_ERROR_INVALID_VALUE;
  const ErrorText* e = find_error(error);
  std::string text = e ? e->text : "CUresult " + std::to_string(int(error));
  auto d = g_detail.find(int(error));
  if (d != g_detail.end()) text += " [emulated device: " + *d->second + "]";
  else if (!e) {
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
  }
  g_strings.push_back(text);
  *pStr = g_strings.back().c_str();
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorName(CUresult error, const char** pStr) {
  if (pStr == nullptr) return CUDA_ERROR_INVALID_VALUE;
  const ErrorText* e = find_error(error);
  if (e == nullptr) {
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
  }
  *pStr = e->name;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuInit(unsigned int Flags) {
  API("cuInit");
  init_once();
  if (Flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0");
  if (!reserve_arena()) return fail(CUDA_ERROR_NO_DEVICE, "cannot reserve the device's address space");
  g_initialized = true;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDriverGetVersion(int* driverVersion) {
  if (driverVersion == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *driverVersion = kDriverVersion;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetCount(int* count) {
  API("cuDeviceGetCount");
  NEED_INIT;
  if (count == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetCount: null");
  *count = 1;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice* device, int ordinal) {
  API("cuDeviceGet");
  NEED_INIT;
  if (device == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGet: null");
  if (ordinal != 0) {
    return fail(CUDA_ERROR_INVALID_DEVICE, "device %d requested; the emulated machine has one",
                ordinal);
  }
  *device = 0;
  return CUDA_SUCCESS;
}

#define NEED_DEVICE(DEV) \
  if ((DEV) != 0) return fail(CUDA_ERROR_INVALID_DEVICE, "%s: no device %d", api_.name, int(DEV))

CUresult CUDAAPI cuDeviceGetName(char* name, int len, CUdevice dev) {
  API("cuDeviceGetName");
  NEED_INIT;
  NEED_DEVICE(dev);
  if (name == nullptr || len <= 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetName: buffer");
  snprintf(name, size_t(len), "%s", kDeviceName);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetUuid(CUuuid* uuid, CUdevice dev) {
  API("cuDeviceGetUuid");
  NEED_INIT;
  NEED_DEVICE(dev);
  if (uuid == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetUuid: null");
  memcpy(uuid->bytes, "ape-attn-emu-h10", 16);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceTotalMem(size_t* bytes, CUdevice dev) {
  API("cuDeviceTotalMem");
  NEED_INIT;
  NEED_DEVICE(dev);
  if (bytes == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceTotalMem: null");
  *bytes = g_device_total;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int* pi, CUdevice_attribute attrib, CUdevice dev) {
  API("cuDeviceGetAttribute");
  NEED_INIT;
  NEED_DEVICE(dev);
  if (pi == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetAttribute: null");
  auto it = attributes().find(int(attrib));
  if (it == attributes().end()) {
    return fail(CUDA_ERROR_NOT_SUPPORTED,
                "device attribute %d is not supported by the emulated device", int(attrib));
  }
  *pi = it->second;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
  API("cuDevicePrimaryCtxRetain");
  NEED_INIT;
  NEED_DEVICE(dev);
  if (pctx == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuDevicePrimaryCtxRetain: null");
  CUctx_st* ctx = &g_primary;
  if (!ctx->live) {
    ctx->live = true;
    ctx->sticky = CUDA_SUCCESS;
    ctx->null_stream = std::make_shared<CUstream_st>();
    ctx->null_stream->ctx = ctx;
    ctx->null_stream->null_stream = true;
  }
  ctx->retained += 1;
  *pctx = ctx;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev) {
  API("cuDevicePrimaryCtxRelease");
  NEED_INIT;
  NEED_DEVICE(dev);
  CUctx_st* ctx = &g_primary;
  if (ctx->retained <= 0) {
    return fail(CUDA_ERROR_INVALID_CONTEXT, "cuDevicePrimaryCtxRelease: not retained");
  }
  ctx->retained -= 1;
  if (ctx->retained == 0) reset_context(ctx);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx) {
  API("cuCtxSetCurrent");
  NEED_INIT;
  if (ctx != nullptr && ctx != &g_primary) {
    return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: %p is not a context", (void*)ctx);
  }
  t_current = ctx;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext* pctx) {
  API("cuCtxGetCurrent");
  NEED_INIT;
  if (pctx == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuCtxGetCurrent: null");
  *pctx = t_current;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetDevice(CUdevice* device) {
  API("cuCtxGetDevice");
  NEED_CTX(ctx);
  (void)ctx;
  if (device == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuCtxGetDevice: null");
  *device = 0;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSynchronize(void) {
  API("cuCtxSynchronize");
  NEED_CTX(ctx);
  for (auto& [h, s] : ctx->streams) {
    if (s->capture) {
      invalidate(s.get(), "cuCtxSynchronize during the capture");
      return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                  "cuCtxSynchronize while a stream of the context captures");
    }
  }
  flush_all(ctx);
  return ctx->sticky;
}

CUresult CUDAAPI cuCtxGetStreamPriorityRange(int* leastPriority, int* greatestPriority) {
  API("cuCtxGetStreamPriorityRange");
  NEED_CTX(ctx);
  (void)ctx;
  if (leastPriority) *leastPriority = 0;
  if (greatestPriority) *greatestPriority = -5;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetLimit(size_t* pvalue, CUlimit limit) {
  API("cuCtxGetLimit");
  NEED_CTX(ctx);
  if (pvalue == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuCtxGetLimit: null");
  auto it = ctx->limits.find(int(limit));
  *pvalue = it == ctx->limits.end() ? (limit == CU_LIMIT_STACK_SIZE ? 1024 : 0) : it->second;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetLimit(CUlimit limit, size_t value) {
  API("cuCtxSetLimit");
  NEED_CTX(ctx);
  ctx->limits[int(limit)] = value;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCacheConfig(CUfunc_cache* pconfig) {
  API("cuCtxGetCacheConfig");
  NEED_CTX(ctx);
  (void)ctx;
  if (pconfig == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuCtxGetCacheConfig: null");
  *pconfig = CU_FUNC_CACHE_PREFER_NONE;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCacheConfig(CUfunc_cache config) {
  API("cuCtxSetCacheConfig");
  NEED_CTX(ctx);
  (void)ctx;
  (void)config;
  return CUDA_SUCCESS;
}

// -- Memory

CUresult CUDAAPI cuMemGetInfo(size_t* free, size_t* total) {
  API("cuMemGetInfo");
  NEED_CTX(ctx);
  (void)ctx;
  if (free == nullptr || total == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemGetInfo: null");
  *free = g_device_total - g_device_used;
  *total = g_device_total;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAlloc(CUdeviceptr* dptr, size_t bytesize) {
  API("cuMemAlloc");
  NEED_CTX(ctx);
  (void)ctx;
  if (dptr == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc: null");
  if (bytesize == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc of 0 bytes");
  CUresult rc = refuse_if_capturing("cuMemAlloc");
  if (rc != CUDA_SUCCESS) return rc;
  uintptr_t p;
  rc = arena_alloc(bytesize, false, &p);
  if (rc == CUDA_SUCCESS) *dptr = p;
  return rc;
}

CUresult CUDAAPI cuMemAllocAsync(CUdeviceptr* dptr, size_t bytesize, CUstream hStream) {
  API("cuMemAllocAsync");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  if (dptr == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAllocAsync: null");
  if (s->capture) {
    invalidate(s, "cuMemAllocAsync during the capture");
    return fail(CUDA_ERROR_NOT_SUPPORTED,
                "cuMemAllocAsync in a stream capture (a graph memory node) is not supported by "
                "the emulated device");
  }
  uintptr_t p;
  CUresult rc = arena_alloc(bytesize, false, &p);
  if (rc == CUDA_SUCCESS) *dptr = p;
  return rc;
}

CUresult CUDAAPI cuMemFree(CUdeviceptr dptr) {
  API("cuMemFree");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuMemFree: no context");
  CUresult rc = refuse_if_capturing("cuMemFree");
  if (rc != CUDA_SUCCESS) return rc;
  auto it = g_live.find(dptr);
  if (it == g_live.end() || it->second.host || it->second.free_queued) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree(%#lx): %s", (unsigned long)dptr,
                it == g_live.end() ? describe(dptr).c_str()
                : it->second.host  ? "page-locked host memory"
                                   : "already freed by cuMemFreeAsync");
  }
  flush_all(ctx);  // as cudaFree, it waits for the device
  arena_free(dptr);
  return ctx->sticky;
}

CUresult CUDAAPI cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream) {
  API("cuMemFreeAsync");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuMemFreeAsync: no context");
  NEED_STREAM(s, ctx, hStream);
  auto it = g_live.find(dptr);
  if (it == g_live.end() || it->second.host || it->second.free_queued) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFreeAsync(%#lx): %s", (unsigned long)dptr,
                it == g_live.end() ? describe(dptr).c_str()
                : it->second.host  ? "page-locked host memory"
                                   : "already freed by cuMemFreeAsync");
  }
  if (s->capture) {
    invalidate(s, "cuMemFreeAsync during the capture");
    return fail(CUDA_ERROR_NOT_SUPPORTED,
                "cuMemFreeAsync in a stream capture (a graph memory node) is not supported by the "
                "emulated device");
  }
  it->second.free_queued = true;
  Op op(Op::Free);
  op.dst = dptr;
  CUresult rc = enqueue(s, std::move(op), "cuMemFreeAsync");
  if (rc != CUDA_SUCCESS) return rc;
  return ctx->sticky;
}

CUresult CUDAAPI cuMemHostAlloc(void** pp, size_t bytesize, unsigned int Flags) {
  API("cuMemHostAlloc");
  NEED_CTX(ctx);
  (void)ctx;
  (void)Flags;
  if (pp == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemHostAlloc: null");
  CUresult rc = refuse_if_capturing("cuMemHostAlloc");
  if (rc != CUDA_SUCCESS) return rc;
  uintptr_t p;
  rc = arena_alloc(bytesize, true, &p);
  if (rc == CUDA_SUCCESS) *pp = reinterpret_cast<void*>(p);
  return rc;
}

CUresult CUDAAPI cuMemAllocHost(void** pp, size_t bytesize) {
  return cuMemHostAlloc(pp, bytesize, 0);
}

CUresult CUDAAPI cuMemFreeHost(void* p) {
  API("cuMemFreeHost");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuMemFreeHost: no context");
  CUresult rc = refuse_if_capturing("cuMemFreeHost");
  if (rc != CUDA_SUCCESS) return rc;
  const auto ptr = reinterpret_cast<uintptr_t>(p);
  auto it = g_live.find(ptr);
  if (it == g_live.end() || !it->second.host) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost(%p): %s", p, describe(ptr).c_str());
  }
  flush_all(ctx);
  arena_free(ptr);
  return ctx->sticky;
}

CUresult CUDAAPI cuMemHostGetDevicePointer(CUdeviceptr* pdptr, void* p, unsigned int Flags) {
  API("cuMemHostGetDevicePointer");
  NEED_CTX(ctx);
  (void)ctx;
  const auto ptr = reinterpret_cast<uintptr_t>(p);
  const Allocation* a = find_live(ptr, 0);
  if (pdptr == nullptr || Flags != 0 || a == nullptr || !a->host) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuMemHostGetDevicePointer(%p): not page-locked memory", p);
  }
  *pdptr = ptr;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuPointerGetAttribute(void* data, CUpointer_attribute attribute, CUdeviceptr ptr) {
  API("cuPointerGetAttribute");
  NEED_INIT;
  const Allocation* a = find_live(ptr, 0);
  if (data == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute: null");
  if (a == nullptr) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute(%#lx): %s", (unsigned long)ptr,
                describe(ptr).c_str());
  }
  switch (attribute) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
      *static_cast<CUcontext*>(data) = &g_primary;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
      *static_cast<unsigned*>(data) = a->host ? CU_MEMORYTYPE_HOST : CU_MEMORYTYPE_DEVICE;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
      *static_cast<CUdeviceptr*>(data) = ptr;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
      if (!a->host) return fail(CUDA_ERROR_INVALID_VALUE, "device memory has no host pointer");
      *static_cast<void**>(data) = reinterpret_cast<void*>(ptr);
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_IS_MANAGED:
      *static_cast<unsigned*>(data) = 0;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
      *static_cast<int*>(data) = 0;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
      *static_cast<CUdeviceptr*>(data) = a->ptr;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
      *static_cast<size_t*>(data) = a->bytes;
      return CUDA_SUCCESS;
    default:
      return fail(CUDA_ERROR_NOT_SUPPORTED,
                  "pointer attribute %d is not supported by the emulated device", int(attribute));
  }
}

CUresult CUDAAPI cuMemcpyHtoDAsync(CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount,
                                   CUstream hStream) {
  API("cuMemcpyHtoDAsync");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  return copy(ctx, s, dstDevice, true, reinterpret_cast<uintptr_t>(srcHost), false, ByteCount,
              false, api_.name);
}

CUresult CUDAAPI cuMemcpyDtoHAsync(void* dstHost, CUdeviceptr srcDevice, size_t ByteCount,
                                   CUstream hStream) {
  API("cuMemcpyDtoHAsync");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  return copy(ctx, s, reinterpret_cast<uintptr_t>(dstHost), false, srcDevice, true, ByteCount,
              false, api_.name);
}

CUresult CUDAAPI cuMemcpyDtoDAsync(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount,
                                   CUstream hStream) {
  API("cuMemcpyDtoDAsync");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  return copy(ctx, s, dstDevice, true, srcDevice, true, ByteCount, false, api_.name);
}

CUresult CUDAAPI cuMemcpyHtoD(CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount) {
  API("cuMemcpyHtoD");
  NEED_CTX(ctx);
  return copy(ctx, ctx->null_stream.get(), dstDevice, true, reinterpret_cast<uintptr_t>(srcHost),
              false, ByteCount, true, api_.name);
}

CUresult CUDAAPI cuMemcpyDtoH(void* dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
  API("cuMemcpyDtoH");
  NEED_CTX(ctx);
  return copy(ctx, ctx->null_stream.get(), reinterpret_cast<uintptr_t>(dstHost), false, srcDevice,
              true, ByteCount, true, api_.name);
}

CUresult CUDAAPI cuMemcpyDtoD(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount) {
  API("cuMemcpyDtoD");
  NEED_CTX(ctx);
  return copy(ctx, ctx->null_stream.get(), dstDevice, true, srcDevice, true, ByteCount, true,
              api_.name);
}

CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr dstDevice, unsigned char uc, size_t N, CUstream hStream) {
  API("cuMemsetD8Async");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  return memset_op(ctx, s, dstDevice, uc, 1, N, false, api_.name);
}

CUresult CUDAAPI cuMemsetD16Async(CUdeviceptr dstDevice, unsigned short us, size_t N,
                                  CUstream hStream) {
  API("cuMemsetD16Async");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  return memset_op(ctx, s, dstDevice, us, 2, N, false, api_.name);
}

CUresult CUDAAPI cuMemsetD32Async(CUdeviceptr dstDevice, unsigned int ui, size_t N, CUstream hStream) {
  API("cuMemsetD32Async");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  return memset_op(ctx, s, dstDevice, ui, 4, N, false, api_.name);
}

CUresult CUDAAPI cuMemsetD8(CUdeviceptr dstDevice, unsigned char uc, size_t N) {
  API("cuMemsetD8");
  NEED_CTX(ctx);
  return memset_op(ctx, ctx->null_stream.get(), dstDevice, uc, 1, N, true, api_.name);
}

CUresult CUDAAPI cuMemsetD32(CUdeviceptr dstDevice, unsigned int ui, size_t N) {
  API("cuMemsetD32");
  NEED_CTX(ctx);
  return memset_op(ctx, ctx->null_stream.get(), dstDevice, ui, 4, N, true, api_.name);
}

// -- Streams and events

CUresult CUDAAPI cuStreamCreate(CUstream* phStream, unsigned int Flags) {
  API("cuStreamCreate");
  NEED_CTX(ctx);
  if (phStream == nullptr || (Flags & ~unsigned(CU_STREAM_NON_BLOCKING)) != 0) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamCreate: flags %#x", Flags);
  }
  auto s = std::make_shared<CUstream_st>();
  s->ctx = ctx;
  s->flags = Flags;
  ctx->streams[s.get()] = s;
  *phStream = s.get();
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamCreateWithPriority(CUstream* phStream, unsigned int flags, int priority) {
  CUresult rc = cuStreamCreate(phStream, flags);
  if (rc == CUDA_SUCCESS) {
    Lock lock(g_mu);
    (*phStream)->priority = std::max(-5, std::min(0, priority));
  }
  return rc;
}

CUresult CUDAAPI cuStreamDestroy(CUstream hStream) {
  API("cuStreamDestroy");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuStreamDestroy: no context");
  auto it = ctx->streams.find(hStream);
  if (it == ctx->streams.end()) {
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: %p is not a live stream", (void*)hStream);
  }
  if (it->second->capture) {
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamDestroy of a capturing stream");
  }
  flush_stream(it->second.get());  // its work completes; the handle goes now
  ctx->streams.erase(it);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamSynchronize(CUstream hStream) {
  API("cuStreamSynchronize");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  if (s->capture) {
    invalidate(s, "cuStreamSynchronize during the capture");
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize of a capturing stream");
  }
  if (s->null_stream) flush_blocking(ctx);
  flush_stream(s);
  return ctx->sticky;
}

CUresult CUDAAPI cuStreamQuery(CUstream hStream) {
  API("cuStreamQuery");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  if (s->capture) {
    invalidate(s, "cuStreamQuery during the capture");
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamQuery of a capturing stream");
  }
  flush_stream(s);
  return ctx->sticky;
}

CUresult CUDAAPI cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags) {
  API("cuStreamWaitEvent");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  auto ev = ctx->events.find(hEvent);
  if (ev == ctx->events.end()) {
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent: %p is not a live event", (void*)hEvent);
  }
  if (Flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamWaitEvent: flags %#x", Flags);
  CUevent_st& e = *ev->second;
  if (s->capture) {
    if (e.captured) return CUDA_SUCCESS;  // recorded earlier in this capture: already ordered
    if (e.recorded && !e.done) {
      invalidate(s, "a wait on work outside the capture");
      return fail(CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
                  "cuStreamWaitEvent: a capturing stream waits on an event recorded outside the "
                  "capture");
    }
    return CUDA_SUCCESS;
  }
  if (e.captured) {
    return fail(CUDA_ERROR_CAPTURED_EVENT,
                "cuStreamWaitEvent on an event last recorded in a capturing stream");
  }
  if (!e.recorded || e.done) return CUDA_SUCCESS;
  Op op(Op::Wait);
  op.wait_stream = e.stream;
  op.wait_seq = e.seq;
  return enqueue(s, std::move(op), api_.name);
}

CUresult CUDAAPI cuStreamBeginCapture(CUstream hStream, CUstreamCaptureMode mode) {
  API("cuStreamBeginCapture");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  if (s->null_stream) {
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "the legacy null stream cannot be captured");
  }
  if (s->capture) return fail(CUDA_ERROR_ILLEGAL_STATE, "the stream is already capturing");
  if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
      mode != CU_STREAM_CAPTURE_MODE_RELAXED) {
    return fail(CUDA_ERROR_INVALID_VALUE, "capture mode %d", int(mode));
  }
  s->capture = std::make_unique<Capture>();
  s->capture->mode = mode;
  s->capture->thread = std::this_thread::get_id();
  s->capture->graph = std::make_shared<CUgraph_st>();
  g_capturing.insert(s);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamEndCapture(CUstream hStream, CUgraph* phGraph) {
  API("cuStreamEndCapture");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  if (phGraph == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamEndCapture: null");
  if (!s->capture) return fail(CUDA_ERROR_ILLEGAL_STATE, "the stream is not capturing");
  if (s->capture->mode != CU_STREAM_CAPTURE_MODE_RELAXED &&
      s->capture->thread != std::this_thread::get_id()) {
    return fail(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "the capture began on another thread");
  }
  std::unique_ptr<Capture> c = std::move(s->capture);
  g_capturing.erase(s);
  *phGraph = nullptr;
  if (c->invalidated) {
    return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "the capture was invalidated: %s",
                c->why.c_str());
  }
  ctx->graphs[c->graph.get()] = c->graph;
  *phGraph = c->graph.get();
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus* captureStatus) {
  API("cuStreamIsCapturing");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  if (captureStatus == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamIsCapturing: null");
  *captureStatus = !s->capture                ? CU_STREAM_CAPTURE_STATUS_NONE
                   : s->capture->invalidated ? CU_STREAM_CAPTURE_STATUS_INVALIDATED
                                             : CU_STREAM_CAPTURE_STATUS_ACTIVE;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuLaunchHostFunc(CUstream hStream, CUhostFn fn, void* userData) {
  API("cuLaunchHostFunc");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, hStream);
  if (fn == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchHostFunc: null function");
  Op op(Op::HostFn);
  op.host_fn = fn;
  op.user = userData;
  return enqueue(s, std::move(op), api_.name);
}

CUresult CUDAAPI cuEventCreate(CUevent* phEvent, unsigned int Flags) {
  API("cuEventCreate");
  NEED_CTX(ctx);
  if (phEvent == nullptr ||
      (Flags & ~unsigned(CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING)) != 0) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuEventCreate: flags %#x", Flags);
  }
  auto e = std::make_shared<CUevent_st>();
  e->flags = Flags;
  ctx->events[e.get()] = e;
  *phEvent = e.get();
  return CUDA_SUCCESS;
}

#define NEED_EVENT(E, CTX, H)                                                                  \
  auto E##_it = (CTX)->events.find(H);                                                         \
  if (E##_it == (CTX)->events.end()) {                                                         \
    return fail(CUDA_ERROR_INVALID_HANDLE, "%s: %p is not a live event", api_.name, (void*)(H)); \
  }                                                                                            \
  std::shared_ptr<CUevent_st> E = E##_it->second

CUresult CUDAAPI cuEventDestroy(CUevent hEvent) {
  API("cuEventDestroy");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuEventDestroy: no context");
  NEED_EVENT(e, ctx, hEvent);
  ctx->events.erase(e_it);  // queued records keep the event alive until they run
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventRecord(CUevent hEvent, CUstream hStream) {
  API("cuEventRecord");
  NEED_CTX(ctx);
  NEED_EVENT(e, ctx, hEvent);
  NEED_STREAM(s, ctx, hStream);
  Op op(Op::Record);
  op.event = e;
  return enqueue(s, std::move(op), api_.name);
}

// cuEventSynchronize and cuEventQuery: the emulated device finishes the work up to the event
// when asked, so a query never says "not ready".
CUresult finish_event(CUctx_st* ctx, const std::shared_ptr<CUevent_st>& e, const char* api) {
  if (e->captured) {
    return fail(CUDA_ERROR_CAPTURED_EVENT, "%s on an event recorded in a capture", api);
  }
  if (e->recorded && !e->done) {
    if (auto s = e->stream.lock()) flush(s.get(), e->seq);
  }
  return ctx->sticky;
}

CUresult CUDAAPI cuEventSynchronize(CUevent hEvent) {
  API("cuEventSynchronize");
  NEED_CTX(ctx);
  NEED_EVENT(e, ctx, hEvent);
  return finish_event(ctx, e, api_.name);
}

CUresult CUDAAPI cuEventQuery(CUevent hEvent) {
  API("cuEventQuery");
  NEED_CTX(ctx);
  NEED_EVENT(e, ctx, hEvent);
  return finish_event(ctx, e, api_.name);
}

CUresult CUDAAPI cuEventElapsedTime(float* pMilliseconds, CUevent hStart, CUevent hEnd) {
  API("cuEventElapsedTime");
  NEED_CTX(ctx);
  NEED_EVENT(a, ctx, hStart);
  NEED_EVENT(b, ctx, hEnd);
  if (pMilliseconds == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuEventElapsedTime: null");
  if ((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING) {
    return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event without timing");
  }
  if (!a->recorded || !b->recorded) return fail(CUDA_ERROR_INVALID_HANDLE, "an event was never recorded");
  if (!a->done || !b->done) return fail(CUDA_ERROR_NOT_READY, "an event has not completed");
  *pMilliseconds = std::chrono::duration<float, std::milli>(b->when - a->when).count();
  return CUDA_SUCCESS;
}

// -- Modules and launches

CUresult CUDAAPI cuModuleLoadData(CUmodule* module, const void* image) {
  API("cuModuleLoadData");
  NEED_CTX(ctx);
  if (module == nullptr || image == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuModuleLoadData: null");
  CUresult rc = refuse_if_capturing("cuModuleLoadData");
  if (rc != CUDA_SUCCESS) return rc;
  auto m = std::make_unique<CUmod_st>();
  rc = load_image(image, &m->names);
  if (rc != CUDA_SUCCESS) return rc;
  *module = m.get();
  ctx->modules[m.get()] = std::move(m);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleUnload(CUmodule hmod) {
  API("cuModuleUnload");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuModuleUnload: no context");
  auto it = ctx->modules.find(hmod);
  if (it == ctx->modules.end()) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleUnload: not a module");
  flush_all(ctx);  // queued launches of its kernels run first
  ctx->modules.erase(it);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleGetFunction(CUfunction* hfunc, CUmodule hmod, const char* name) {
  API("cuModuleGetFunction");
  NEED_CTX(ctx);
  auto it = ctx->modules.find(hmod);
  if (it == ctx->modules.end()) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleGetFunction: not a module");
  if (hfunc == nullptr || name == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuModuleGetFunction: null");
  CUmod_st& m = *it->second;
  auto f = m.functions.find(name);
  if (f != m.functions.end()) {
    *hfunc = f->second.get();
    return CUDA_SUCCESS;
  }
  if (!m.names.count(name)) {
    return fail(CUDA_ERROR_NOT_FOUND, "no kernel named %s in the module's sm_90 cubin", name);
  }
  auto fn = std::make_unique<CUfunc_st>();
  fn->module = &m;
  fn->name = name;
  fn->res = resources(name);
  size_t sizes[64];
  size_t n = 0;
  if (fn->res == nullptr || ape_emu_kernel_params(name, sizes, 64, &n) != 0 || n > 64) {
    return fail(CUDA_ERROR_NOT_SUPPORTED,
                "kernel %s is in the module but %s: rebuild the emulated device "
                "(emulator/build-emulated-device.sh)",
                name, fn->res ? "not in the kernel emulator" : "has no ptxas resource record");
  }
  fn->param_sizes.assign(sizes, sizes + n);
  fn->max_dynamic_smem = kDefaultSmemPerBlock - fn->res->static_smem;
  *hfunc = fn.get();
  m.functions[name] = std::move(fn);
  return CUDA_SUCCESS;
}

#define NEED_FUNCTION(CTX, F) \
  if (!valid_function(CTX, F)) return fail(CUDA_ERROR_INVALID_HANDLE, "%s: not a loaded function", api_.name)

CUresult CUDAAPI cuFuncGetAttribute(int* pi, CUfunction_attribute attrib, CUfunction hfunc) {
  API("cuFuncGetAttribute");
  NEED_CTX(ctx);
  NEED_FUNCTION(ctx, hfunc);
  if (pi == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncGetAttribute: null");
  const KernelResources& r = *hfunc->res;
  switch (attrib) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = max_threads(hfunc); break;
    case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *pi = r.static_smem; break;
    case CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES: *pi = 0; break;
    case CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: *pi = r.local_bytes; break;
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = r.registers; break;
    case CU_FUNC_ATTRIBUTE_PTX_VERSION: *pi = 90; break;
    case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *pi = 90; break;
    case CU_FUNC_ATTRIBUTE_CACHE_MODE_CA: *pi = 0; break;
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *pi = hfunc->max_dynamic_smem; break;
    case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: *pi = -1; break;
    default:
      return fail(CUDA_ERROR_NOT_SUPPORTED,
                  "function attribute %d is not supported by the emulated device", int(attrib));
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib, int value) {
  API("cuFuncSetAttribute");
  NEED_CTX(ctx);
  NEED_FUNCTION(ctx, hfunc);
  switch (attrib) {
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
      if (value < 0 || value > kOptinSmemPerBlock - hfunc->res->static_smem) {
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "%s: max dynamic shared memory %d; at most %d with its %d bytes of static "
                    "shared memory",
                    hfunc->name.c_str(), value, kOptinSmemPerBlock - hfunc->res->static_smem,
                    hfunc->res->static_smem);
      }
      hfunc->max_dynamic_smem = value;
      return CUDA_SUCCESS;
    case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT:
      if (value < -1 || value > 100) return fail(CUDA_ERROR_INVALID_VALUE, "carveout %d", value);
      return CUDA_SUCCESS;
    default:
      return fail(CUDA_ERROR_NOT_SUPPORTED,
                  "setting function attribute %d is not supported by the emulated device",
                  int(attrib));
  }
}

// Blocks of `blockSize` threads resident per SM: the registers (allocated per warp in units of
// 256), the shared memory (static plus `dynamicSMemSize`, plus the runtime's reservation) and
// the warp and block limits, as the CUDA occupancy calculator counts them. 0 when one block does
// not fit, as the real driver answers.
CUresult CUDAAPI cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* numBlocks,
                                                                     CUfunction func,
                                                                     int blockSize,
                                                                     size_t dynamicSMemSize,
                                                                     unsigned int flags) {
  API("cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags");
  NEED_CTX(ctx);
  NEED_FUNCTION(ctx, func);
  if (numBlocks == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "%s: null", api_.name);
  if (blockSize <= 0 || blockSize > max_threads(func)) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: block size %d; %s takes at most %d threads",
                api_.name, blockSize, func->name.c_str(), max_threads(func));
  }
  (void)flags;
  const size_t warps = size_t(blockSize + 31) / 32;
  const size_t per_warp = round_up(size_t(std::max(func->res->registers, 1)) * 32, 256);
  const size_t smem = size_t(func->res->static_smem) + dynamicSMemSize + kSmemReservedPerBlock;
  size_t n = kRegistersPerSm / (per_warp * warps);
  n = std::min(n, size_t(kSmemPerSm) / smem);
  n = std::min(n, size_t(kMaxWarpsPerSm) / warps);
  n = std::min(n, size_t(kMaxBlocksPerSm));
  *numBlocks = int(n);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction hfunc, CUfunc_cache config) {
  API("cuFuncSetCacheConfig");
  NEED_CTX(ctx);
  NEED_FUNCTION(ctx, hfunc);
  (void)config;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                                unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                                void** kernelParams, void** extra) {
  API("cuLaunchKernel");
  NEED_CTX(ctx);
  NEED_FUNCTION(ctx, f);
  NEED_STREAM(s, ctx, hStream);
  const char* k = f->name.c_str();
  if (extra != nullptr) {
    return fail(CUDA_ERROR_NOT_SUPPORTED,
                "%s: arguments through `extra` are not supported by the emulated device", k);
  }
  const uint64_t threads = uint64_t(blockDimX) * blockDimY * blockDimZ;
  if (blockDimX == 0 || blockDimY == 0 || blockDimZ == 0 || blockDimX > 1024 || blockDimY > 1024 ||
      blockDimZ > 64 || threads > uint64_t(kMaxThreadsPerBlock)) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: block (%u, %u, %u): at most 1024 threads, (1024, 1024, 64)",
                k, blockDimX, blockDimY, blockDimZ);
  }
  if (gridDimX == 0 || gridDimY == 0 || gridDimZ == 0 || gridDimX > 2147483647u ||
      gridDimY > 65535 || gridDimZ > 65535) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: grid (%u, %u, %u): y and z at most 65535, none 0", k,
                gridDimX, gridDimY, gridDimZ);
  }
  if (f->res->max_threads > 0 && threads > uint64_t(f->res->max_threads)) {
    return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                "%s: %lu threads per block, past its __launch_bounds__ of %d", k,
                (unsigned long)threads, f->res->max_threads);
  }
  const uint64_t warps = (threads + 31) / 32;
  const uint64_t per_warp = round_up(size_t(std::max(f->res->registers, 1)) * 32, 256);
  if (warps * per_warp > uint64_t(kRegistersPerBlock)) {
    return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                "%s: %lu threads x %d registers need %lu registers; a block has %d", k,
                (unsigned long)threads, f->res->registers, (unsigned long)(warps * per_warp),
                kRegistersPerBlock);
  }
  if (int64_t(sharedMemBytes) > f->max_dynamic_smem) {
    return fail(CUDA_ERROR_INVALID_VALUE,
                "%s: %u bytes of dynamic shared memory, past the function's limit of %d (static %d "
                "bytes; above %d bytes in all, raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES"
                ", at most %d)",
                k, sharedMemBytes, f->max_dynamic_smem, f->res->static_smem, kDefaultSmemPerBlock,
                kOptinSmemPerBlock);
  }
  if (kernelParams == nullptr && !f->param_sizes.empty()) {
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: no kernel parameters; it takes %zu", k,
                f->param_sizes.size());
  }
  Op op(Op::Kernel);
  op.fn = f;
  op.grid[0] = gridDimX;
  op.grid[1] = gridDimY;
  op.grid[2] = gridDimZ;
  op.block[0] = blockDimX;
  op.block[1] = blockDimY;
  op.block[2] = blockDimZ;
  op.smem = sharedMemBytes;
  // The driver copies the arguments at the launch: by the sizes of the kernel's parameters.
  op.args = std::make_shared<std::vector<std::vector<Chunk>>>();
  for (size_t i = 0; i < f->param_sizes.size(); ++i) {
    if (kernelParams[i] == nullptr) {
      return fail(CUDA_ERROR_INVALID_VALUE, "%s: kernel parameter %zu is a null pointer", k, i);
    }
    std::vector<Chunk> a((f->param_sizes[i] + 15) / 16);
    memcpy(a.data(), kernelParams[i], f->param_sizes[i]);
    op.args->push_back(std::move(a));
  }
  return enqueue(s, std::move(op), api_.name);
}

// -- Graphs

CUresult CUDAAPI cuGraphInstantiateWithFlags(CUgraphExec* phGraphExec, CUgraph hGraph,
                                             unsigned long long flags) {
  API("cuGraphInstantiateWithFlags");
  NEED_CTX(ctx);
  auto it = ctx->graphs.find(hGraph);
  if (it == ctx->graphs.end()) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphInstantiate: not a graph");
  if (phGraphExec == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiate: null");
  const unsigned long long known = CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH |
                                   CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD |
                                   CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH |
                                   CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY;
  if ((flags & ~known) != 0 || ((flags & CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH) &&
                                (flags & CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH))) {
    return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiate: flags %#llx", flags);
  }
  if (flags & CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH) {
    return fail(CUDA_ERROR_NOT_SUPPORTED, "device-launched graphs are not supported by the emulated device");
  }
  auto exec = std::make_unique<CUgraphExec_st>();
  exec->ops = it->second->ops;
  *phGraphExec = exec.get();
  ctx->execs[exec.get()] = std::move(exec);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) {
  API("cuGraphLaunch");
  NEED_CTX(ctx);
  auto it = ctx->execs.find(hGraphExec);
  if (it == ctx->execs.end()) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphLaunch: not a graph exec");
  NEED_STREAM(s, ctx, hStream);
  if (s->capture) {
    return fail(CUDA_ERROR_NOT_SUPPORTED,
                "launching a graph into a capture (a child graph) is not supported by the "
                "emulated device");
  }
  for (const Op& op : it->second->ops) {
    CUresult rc = enqueue(s, op, api_.name);
    if (rc != CUDA_SUCCESS) return rc;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGraphUpload(CUgraphExec hGraphExec, CUstream hStream) {
  API("cuGraphUpload");
  NEED_CTX(ctx);
  if (!ctx->execs.count(hGraphExec)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphUpload: not a graph exec");
  NEED_STREAM(s, ctx, hStream);
  (void)s;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGraphExecDestroy(CUgraphExec hGraphExec) {
  API("cuGraphExecDestroy");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuGraphExecDestroy: no context");
  if (!ctx->execs.erase(hGraphExec)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphExecDestroy: not a graph exec");
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGraphDestroy(CUgraph hGraph) {
  API("cuGraphDestroy");
  NEED_INIT;
  CUctx_st* ctx = t_current;
  if (ctx == nullptr || !ctx->live) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuGraphDestroy: no context");
  if (!ctx->graphs.erase(hGraph)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphDestroy: not a graph");
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuProfilerStart(void) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuProfilerStop(void) { return CUDA_SUCCESS; }

// ---- For the emulated libraries (device.h) and the generated stubs --------------------------------

// Every driver entry point the emulated device does not implement (stubs.cpp) calls this: the
// call fails with CUDA_ERROR_NOT_SUPPORTED, and the first call of each says so on stderr.
CUresult ape_emu_unsupported(const char* name) {
  Lock lock(g_mu);
  static std::set<std::string> said;
  if (said.insert(name).second) {
    fprintf(stderr, "emulated device: %s is not supported by the emulated device\n", name);
  }
  return fail(CUDA_ERROR_NOT_SUPPORTED, "%s is not supported by the emulated device", name);
}

CUresult ape_emu_dev_enqueue_task(CUstream stream, const char* name, ape_emu_dev_task_fn run,
                                  void* data, void (*release)(void*)) {
  auto task = std::make_shared<Task>();
  task->name = name;
  task->run = run;
  task->data = data;
  task->release = release;  // from here on, the task releases the data
  API("ape_emu_dev_enqueue_task");
  NEED_CTX(ctx);
  NEED_STREAM(s, ctx, stream);
  Op op(Op::RunTask);
  op.task = std::move(task);
  return enqueue(s, std::move(op), name);
}

int ape_emu_dev_check_range(uint64_t ptr, uint64_t bytes, char* err, size_t err_len) {
  Lock lock(g_mu);
  const Allocation* a = find_live(ptr, bytes);
  if (a != nullptr) return 0;
  snprintf(err, err_len, "[%#lx, +%lu) is not inside one allocation: %#lx is %s", (unsigned long)ptr,
           (unsigned long)bytes, (unsigned long)ptr, describe(ptr).c_str());
  return 1;
}

int ape_emu_dev_has_context(void) {
  Lock lock(g_mu);
  return g_initialized && t_current != nullptr && t_current->live;
}

CUresult ape_emu_dev_synchronize(void) {
  Lock lock(g_mu);
  if (!g_primary.live) return CUDA_SUCCESS;
  flush_all(&g_primary);
  return g_primary.sticky;
}

}  // extern "C"
