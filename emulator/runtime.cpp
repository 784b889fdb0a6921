// The kernel emulator: every kernel of kernels/*.cu, compiled from the same source by a host C++
// compiler (APE_EMULATE), run on the CPU. It exists so that the kernels' index math, masking,
// pipelining and reductions are tested against the CPU oracle on machines without a GPU; it says
// nothing about speed, and nothing about what only hardware does (the exact rounding of a tensor
// core's sums, bank conflicts, registers).
//
// Model:
// - A CTA is one fiber per CUDA thread, all on one OS thread, switched cooperatively: a fiber runs
//   until it waits at a barrier or exits. Fibers run in thread order, or in reverse
//   (APE_EMU_REVERSE), so that a missing barrier shows up as a result that depends on the order.
// - Warp collectives (ldmatrix, mma, shuffles) are barriers over the warp's 32 lanes through
//   a pair of per-warp exchange slots; each lane computes its own outputs from every lane's
//   inputs, as the PTX ISA defines them.
// - cp.async copies land when issued, or only at the cp.async.wait_group that guarantees them
//   (APE_EMU_LATE_COPIES): a kernel that reads a tile before waiting for it reads the previous
//   tile's bytes (or the poison below) in the second mode.
// - Dynamic shared memory is filled with 0xff bytes (a NaN in bf16, f16 and f32) when a CTA
//   starts and is followed by an inaccessible page; ldmatrix and cp.async check that their shared
//   addresses are in it and aligned.
// - A barrier that can never complete (some threads wait, the others have exited or wait
//   elsewhere) is an error, not a hang. Independent CTAs run on several OS threads.
// - Global memory is the host's, shared by the OS threads that run CTAs: __threadfence and
//   atomicAdd are the CPU's fence and atomic read-modify-write (cuda.h), so a CTA that waits for
//   others through a counter (the attention kernel's last split) meets them as on a GPU.
// - Global reads the emulator sees (cp.async sources, __ldg, __ldcg, atomicAdd) must lie in one of
//   the buffers the launcher names, as compute-sanitizer's memcheck would require of every access.
#include "../kernels/llama_ops.cu"
#include "../kernels/merge_states.cu"
#include "../kernels/rope.cu"
#include "../kernels/segmented_attention.cu"

#include <stdarg.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#error "the kernel emulator's context switch is written for x86-64"
#endif

namespace ape_emu {

// fail() with the kind of error the launch reports (kIllegalAddress, kMisaligned).
[[noreturn]] void fail_kind(int kind, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

namespace {

// What ape_emu_launch returns for a failed launch: the kind of error, as a driver reports it.
constexpr int kFailed = 1;          // any other error (a deadlock, a misused primitive)
constexpr int kIllegalAddress = 2;  // an access outside every buffer, or outside shared memory
constexpr int kMisaligned = 3;      // a misaligned address

constexpr uint32_t kReverse = 1;      // APE_EMU_REVERSE
constexpr uint32_t kLateCopies = 2;   // APE_EMU_LATE_COPIES
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kMaxSmem = 227 * 1024;  // H100's opt-in limit per CTA

using Invoker = void (*)(void**);

// ---- Context switching -------------------------------------------------------------------------

// switch_context(save, load): saves the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer in *save, and resumes the context whose stack
// pointer is `load`. A new context starts in start_context, which calls r13(r12).
extern "C" void ape_emu_switch_context(void** save, void* load);
extern "C" void ape_emu_start_context();
asm(R"(
  .pushsection .text
  .globl ape_emu_switch_context
  .type ape_emu_switch_context, @function
ape_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ape_emu_switch_context, .-ape_emu_switch_context

  .globl ape_emu_start_context
  .type ape_emu_start_context, @function
ape_emu_start_context:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size ape_emu_start_context, .-ape_emu_start_context
  .popsection
)");

struct Context {
  void* sp = nullptr;
};

// Prepares `ctx` to run fn(arg), on the stack that ends at `hi`, when first switched to.
void make_context(Context& ctx, char* hi, void (*fn)(void*), void* arg) {
  auto top = reinterpret_cast<uintptr_t>(hi) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 88);  // start_context runs with rsp = top - 16
  frame[0] = 0x1f80 | (uint64_t(0x037f) << 32);          // MXCSR, x87 control word: defaults
  frame[1] = 0;
  frame[2] = 0;                                    // r15
  frame[3] = 0;                                    // r14
  frame[4] = reinterpret_cast<uint64_t>(fn);       // r13
  frame[5] = reinterpret_cast<uint64_t>(arg);      // r12
  frame[6] = 0;                                    // rbx
  frame[7] = 0;                                    // rbp
  frame[8] = reinterpret_cast<uint64_t>(&ape_emu_start_context);  // return address
  ctx.sp = frame;
}

void switch_context(Context& save, Context& load) { ape_emu_switch_context(&save.sp, load.sp); }

// ---- CTA state ---------------------------------------------------------------------------------

enum class Wait { None, Block, Warp };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  Context ctx;
  ThreadCoords coords;
  uint32_t linear = 0;  // thread index within the CTA
  bool done = false;
  Wait wait = Wait::None;
  uint64_t collectives = 0;  // warp collectives done: picks the exchange slot
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
};

struct Slots {
  const void* addr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  uint32_t word[32];
  // An mma's A and B as f32, decoded by the first lane past the barrier for the others.
  float fa[16][16];
  float fb[16][8];
  uint64_t decoded = ~uint64_t(0);  // the collective they belong to
};

struct Warp {
  int lanes = 0;
  int exited = 0;
  int arrived = 0;
  Slots slots[2];
};

struct Region {
  uintptr_t begin, end;
};

struct Cta {
  std::vector<Fiber> fibers;
  const Region* regions = nullptr;
  size_t n_regions = 0;
  std::vector<Warp> warps;
  char* stacks = nullptr;  // one stack per thread, a guard page below each (CtaMemory's)
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  Context scheduler;
  Fiber* current = nullptr;
  int live = 0;
  int block_arrived = 0;
  bool failed = false;
  int error_kind = 0;  // kFailed, kIllegalAddress or kMisaligned, once failed
  std::string error;
  Invoker invoke = nullptr;
  void** params = nullptr;
  uint32_t flags = 0;
};

// A CTA's stacks and dynamic shared memory, mapped once and kept for later launches (mapping them
// and protecting each stack's guard page was most of a small launch's cost).
struct CtaMemory {
  char* stacks = nullptr;
  size_t n_stacks = 0;
  unsigned char* smem_map = nullptr;  // smem_capacity bytes, then an inaccessible page
  size_t smem_capacity = 0;
};

std::mutex g_memory_mu;
std::vector<CtaMemory> g_memory;
constexpr size_t kKeptMemory = 64;

// Memory for a CTA of `n_threads` threads and `smem` bytes of dynamic shared memory.
bool acquire_memory(size_t n_threads, size_t smem, CtaMemory* out) {
  {
    std::lock_guard<std::mutex> lock(g_memory_mu);
    for (size_t i = 0; i < g_memory.size(); ++i) {
      if (g_memory[i].n_stacks >= n_threads && g_memory[i].smem_capacity >= smem) {
        *out = g_memory[i];
        g_memory.erase(g_memory.begin() + long(i));
        return true;
      }
    }
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  // Sized for any launch of the crate's kernels, so that one mapping serves them all.
  CtaMemory m;
  m.n_stacks = std::max<size_t>(n_threads, 256);
  m.smem_capacity = (std::max<size_t>(smem, 64 * 1024) + page - 1) / page * page;
  const size_t stacks_bytes = m.n_stacks * (kStackBytes + 4096);
  void* stacks = mmap(nullptr, stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
  void* smem_map = mmap(nullptr, m.smem_capacity + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (stacks == MAP_FAILED || smem_map == MAP_FAILED) {
    if (stacks != MAP_FAILED) munmap(stacks, stacks_bytes);
    if (smem_map != MAP_FAILED) munmap(smem_map, m.smem_capacity + page);
    return false;
  }
  m.stacks = static_cast<char*>(stacks);
  for (size_t i = 0; i < m.n_stacks; ++i) {
    mprotect(m.stacks + i * (kStackBytes + 4096), 4096, PROT_NONE);
  }
  m.smem_map = static_cast<unsigned char*>(smem_map);
  mprotect(m.smem_map + m.smem_capacity, page, PROT_NONE);
  *out = m;
  return true;
}

void release_memory(const CtaMemory& m) {
  {
    std::lock_guard<std::mutex> lock(g_memory_mu);
    if (g_memory.size() < kKeptMemory) {
      g_memory.push_back(m);
      return;
    }
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  munmap(m.stacks, m.n_stacks * (kStackBytes + 4096));
  munmap(m.smem_map, m.smem_capacity + page);
}

thread_local Cta* t_cta = nullptr;

Cta& cta() { return *t_cta; }
Fiber& me() { return *t_cta->current; }
int lane_of(const Fiber& f) { return int(f.linear % 32); }
Warp& warp_of(const Fiber& f) { return t_cta->warps[f.linear / 32]; }

// Suspends the running fiber until the scheduler resumes it.
void suspend() { switch_context(me().ctx, cta().scheduler); }

void release(Wait kind, int warp) {
  for (Fiber& f : cta().fibers) {
    if (f.wait == kind && (kind == Wait::Block || int(f.linear / 32) == warp)) f.wait = Wait::None;
  }
}

void land(const Copy& c) {
  if (c.valid) {
    memcpy(c.dst, c.src, 16);
  } else {
    memset(c.dst, 0, 16);
  }
}

void land(const std::vector<Copy>& copies) {
  for (const Copy& c : copies) land(c);
}

bool in_smem(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  return b >= cta().smem && b + bytes <= cta().smem + cta().smem_bytes;
}

void check_shared(const void* p, const char* what) {
  if (!in_smem(p, 16)) {
    fail_kind(kIllegalAddress, "%s: address %p is not in the CTA's %zu bytes of dynamic shared memory",
              what, p, cta().smem_bytes);
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fail_kind(kMisaligned, "%s: address %p is not 16-byte aligned", what, p);
  }
}

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  cta().invoke(cta().params);
  // Exit: the thread counts as arrived at every later __syncthreads.
  f.done = true;
  cta().live -= 1;
  land(f.open);
  for (const auto& g : f.groups) land(g);
  Warp& w = warp_of(f);
  w.exited += 1;
  if (w.arrived > 0) fail("a lane exited while the rest of its warp waits in a warp collective");
  if (cta().block_arrived > 0 && cta().block_arrived == cta().live) {
    cta().block_arrived = 0;
    release(Wait::Block, -1);
  }
  suspend();
  __builtin_unreachable();
}

// Arrival at the warp's barrier: returns once all 32 lanes have arrived.
void warp_barrier() {
  Fiber& f = me();
  Warp& w = warp_of(f);
  if (w.exited > 0) fail("warp collective after a lane of the warp exited");
  if (w.lanes != 32) fail("warp collective in a partial warp (%d lanes)", w.lanes);
  w.arrived += 1;
  if (w.arrived == w.lanes) {
    w.arrived = 0;
    release(Wait::Warp, int(f.linear / 32));
    return;
  }
  f.wait = Wait::Warp;
  suspend();
}

// This collective's exchange slots (two sets, alternating: a lane cannot reach the collective
// after next before every lane has read this one).
Slots& slots() { return warp_of(me()).slots[me().collectives & 1]; }

// Runs one CTA to completion; false (with cta().error) on an error.
bool run_cta(const uint3 block_idx, const uint3 grid_dim, const uint3 block_dim) {
  Cta& c = cta();
  const uint32_t n = block_dim.x * block_dim.y * block_dim.z;
  memset(c.smem, 0xff, c.smem_bytes);
  c.live = int(n);
  c.block_arrived = 0;
  for (uint32_t i = 0; i < n; ++i) {
    Fiber& f = c.fibers[i];
    f.linear = i;
    f.coords = {{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)},
                block_idx,
                block_dim,
                grid_dim};
    f.done = false;
    f.wait = Wait::None;
    f.collectives = 0;
    f.groups.clear();
    f.open.clear();
    char* lo = c.stacks + size_t(i) * (kStackBytes + 4096) + 4096;  // a guard page below
    make_context(f.ctx, lo + kStackBytes, &fiber_main, &f);
  }
  for (uint32_t w = 0; w < c.warps.size(); ++w) {
    c.warps[w].lanes = int(std::min<uint32_t>(32, n - 32 * w));
    c.warps[w].exited = 0;
    c.warps[w].arrived = 0;
    for (Slots& sl : c.warps[w].slots) sl.decoded = ~uint64_t(0);
  }
  const bool reverse = c.flags & kReverse;
  while (c.live > 0) {
    bool ran = false;
    for (uint32_t k = 0; k < n; ++k) {
      Fiber& f = c.fibers[reverse ? n - 1 - k : k];
      if (f.done || f.wait != Wait::None) continue;
      c.current = &f;
      switch_context(c.scheduler, f.ctx);
      c.current = nullptr;
      ran = true;
      if (c.failed) return false;
    }
    if (!ran) {
      int at_block = 0, at_warp = 0;
      for (const Fiber& f : c.fibers) {
        at_block += !f.done && f.wait == Wait::Block;
        at_warp += !f.done && f.wait == Wait::Warp;
      }
      char buf[256];
      snprintf(buf, sizeof buf,
               "deadlock in CTA (%u, %u, %u): %d threads wait at __syncthreads, %d in warp "
               "collectives, %d of %u have exited",
               block_idx.x, block_idx.y, block_idx.z, at_block, at_warp, int(n) - c.live, n);
      c.error = buf;
      return false;
    }
  }
  return true;
}

// ---- Kernel registry ---------------------------------------------------------------------------

template <typename F> struct Signature;
template <typename... A> struct Signature<void (*)(A...)> {
  template <auto F, size_t... I> static void call(void** p, std::index_sequence<I...>) {
    F(*static_cast<std::decay_t<A>*>(p[I])...);
  }
  static constexpr size_t arity = sizeof...(A);
};

// Calls kernel F with its arguments read from p[i] (pointers to each argument, as cuLaunchKernel
// takes them).
template <auto F> void invoke(void** p) {
  using S = Signature<decltype(F)>;
  S::template call<F>(p, std::make_index_sequence<S::arity>());
}

// The byte size of each of a kernel's parameters, as a driver copies them at a launch.
template <typename F> struct ParamSizes;
template <typename... A> struct ParamSizes<void (*)(A...)> {
  static constexpr size_t n = sizeof...(A);
  static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(std::decay_t<A>)..., 0};
};

struct Kernel {
  const char* name;
  Invoker invoke;
  const size_t* param_sizes;
  size_t n_params;
};

#define APE_EMU_KERNEL(NAME)                                                     \
  {#NAME, &invoke<&NAME>, ParamSizes<decltype(&NAME)>::sizes,                   \
   ParamSizes<decltype(&NAME)>::n}
#define APE_EMU_DTYPES(PREFIX) \
  APE_EMU_KERNEL(PREFIX##f32), APE_EMU_KERNEL(PREFIX##f16), APE_EMU_KERNEL(PREFIX##bf16)

const Kernel kKernels[] = {
    APE_EMU_KERNEL(segmented_attention_bf16_d64),
    APE_EMU_KERNEL(segmented_attention_bf16_d128),
    APE_EMU_KERNEL(segmented_attention_f16_d64),
    APE_EMU_KERNEL(segmented_attention_f16_d128),
    APE_EMU_KERNEL(segmented_attention_wide_bf16_d64),
    APE_EMU_KERNEL(segmented_attention_wide_bf16_d128),
    APE_EMU_KERNEL(segmented_attention_wide_f16_d64),
    APE_EMU_KERNEL(segmented_attention_wide_f16_d128),
    APE_EMU_KERNEL(segmented_attention_decode_bf16_d64),
    APE_EMU_KERNEL(segmented_attention_decode_bf16_d128),
    APE_EMU_KERNEL(segmented_attention_decode_f16_d64),
    APE_EMU_KERNEL(segmented_attention_decode_f16_d128),
    APE_EMU_KERNEL(merge_states_f32_vec),
    APE_EMU_KERNEL(merge_states_f16_vec),
    APE_EMU_KERNEL(merge_states_bf16_vec),
    APE_EMU_KERNEL(merge_states_f32_scalar),
    APE_EMU_KERNEL(merge_states_f16_scalar),
    APE_EMU_KERNEL(merge_states_bf16_scalar),
    APE_EMU_KERNEL(merge_state_in_place_f32_vec),
    APE_EMU_KERNEL(merge_state_in_place_f16_vec),
    APE_EMU_KERNEL(merge_state_in_place_bf16_vec),
    APE_EMU_KERNEL(merge_state_in_place_f32_scalar),
    APE_EMU_KERNEL(merge_state_in_place_f16_scalar),
    APE_EMU_KERNEL(merge_state_in_place_bf16_scalar),
    APE_EMU_DTYPES(rope_),
    APE_EMU_DTYPES(rms_norm_),
    APE_EMU_DTYPES(silu_mul_),
    APE_EMU_DTYPES(fill_uniform_),
    APE_EMU_DTYPES(embedding_),
    APE_EMU_KERNEL(rms_norm_f32_to_f16),
    APE_EMU_KERNEL(rms_norm_f32_to_bf16),
    APE_EMU_KERNEL(embedding_f16_to_f32),
    APE_EMU_KERNEL(embedding_bf16_to_f32),
};

}  // namespace

// ---- The runtime the kernels call (cuda.h, ptx.cuh) --------------------------------------------

ThreadCoords& coords() { return me().coords; }
unsigned char* dynamic_smem() { return cta().smem; }

namespace {

[[noreturn]] void vfail(int kind, const char* fmt, va_list ap) {
  Cta& c = cta();
  if (!c.failed) {
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    const ThreadCoords& t = me().coords;
    char where[128];
    snprintf(where, sizeof where, " (CTA (%u, %u, %u), thread %u)", t.block_idx.x, t.block_idx.y,
             t.block_idx.z, me().linear);
    c.error = std::string(buf) + where;
    c.error_kind = kind;
    c.failed = true;
  }
  me().done = true;
  suspend();
  __builtin_unreachable();
}

}  // namespace

void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(kFailed, fmt, ap);
}

void fail_kind(int kind, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(kind, fmt, ap);
}

void sync_block() {
  Cta& c = cta();
  c.block_arrived += 1;
  if (c.block_arrived == c.live) {
    c.block_arrived = 0;
    release(Wait::Block, -1);
    return;
  }
  me().wait = Wait::Block;
  suspend();
}

void sync_warp() { warp_barrier(); }

void check_global(const void* p, size_t bytes, const char* what) {
  const Cta& c = cta();
  if (c.n_regions == 0) return;
  const auto b = reinterpret_cast<uintptr_t>(p);
  // The regions are sorted by their start (ape_emu_launch): the last one that starts at or before
  // b holds the access, unless regions overlap, when an earlier one may.
  const Region* first = c.regions;
  const Region* it = std::upper_bound(first, first + c.n_regions, b,
                                      [](uintptr_t a, const Region& r) { return a < r.begin; });
  while (it != first) {
    --it;
    if (b + bytes <= it->end) return;
  }
  fail_kind(kIllegalAddress, "%s: %zu bytes at %p are outside every buffer of the launch", what,
            bytes, p);
}

uint32_t shfl_xor(uint32_t mask, uint32_t value, int lane_mask) {
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with mask %#x: only full warps are emulated", mask);
  if (lane_mask < 0 || lane_mask > 31) fail("__shfl_xor_sync with lane mask %d", lane_mask);
  const int lane = lane_of(me());
  Slots& s = slots();
  s.word[lane] = value;
  warp_barrier();
  const uint32_t r = s.word[lane ^ lane_mask];
  me().collectives += 1;
  return r;
}

bool vote_any(uint32_t mask, bool predicate) {
  if (mask != 0xffffffffu) fail("__any_sync with mask %#x: only full warps are emulated", mask);
  const int lane = lane_of(me());
  Slots& s = slots();
  s.word[lane] = predicate ? 1u : 0u;
  warp_barrier();
  bool any = false;
  for (int i = 0; i < 32; ++i) any = any || s.word[i] != 0;
  me().collectives += 1;
  return any;
}

// cp.async.cg.shared.global, 16 bytes; src-size 0 zero-fills.
void cp_async_16(void* smem, const void* gmem, bool valid) {
  check_shared(smem, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    fail_kind(kMisaligned, "cp.async source %p is not 16-byte aligned", gmem);
  }
  if (valid) check_global(gmem, 16, "cp.async source");
  const Copy c{smem, gmem, valid};
  if (cta().flags & kLateCopies) {
    me().open.push_back(c);
  } else {
    land(c);
  }
}

void cp_async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

// cp.async.wait_group n: every group but the newest n has landed.
void cp_async_wait(int n) {
  Fiber& f = me();
  while (f.groups.size() > size_t(n)) {
    land(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane 8 i + j gives the address of row j of
// matrix i (8 contiguous b16). Register i of lane l holds, of matrix i, elements (l / 4, 2 (l % 4))
// and (l / 4, 2 (l % 4) + 1); with .trans, elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  check_shared(smem, "ldmatrix");
  const int lane = lane_of(me());
  Slots& s = slots();
  s.addr[lane] = smem;
  warp_barrier();
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const auto* row = static_cast<const unsigned char*>(s.addr[8 * i + lane / 4]);
      memcpy(&r[i], row + 4 * (lane % 4), 4);
    } else {
      const auto* r0 = static_cast<const uint16_t*>(s.addr[8 * i + 2 * (lane % 4)]);
      const auto* r1 = static_cast<const uint16_t*>(s.addr[8 * i + 2 * (lane % 4) + 1]);
      r[i] = uint32_t(r0[lane / 4]) | (uint32_t(r1[lane / 4]) << 16);
    }
  }
  me().collectives += 1;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A B + C with A 16x16, B 16x8, C/D 16x8,
// in the fragment layouts of kernels/ptx.cuh. Products are exact in f32 and summed in k order.
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const int lane = lane_of(me());
  Slots& s = slots();
  for (int i = 0; i < 4; ++i) s.a[lane][i] = a[i];
  s.b[lane][0] = b0;
  s.b[lane][1] = b1;
  warp_barrier();
  if (s.decoded != me().collectives) {
    auto value = [bf16](uint32_t word, int high) {
      const uint16_t bits = uint16_t(high ? word >> 16 : word & 0xffffu);
      return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
    };
    // A(row, k) is in lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2;
    // B(k, n) in lane 4 n + (k % 8) / 2, register k / 8, half k % 2.
    for (int row = 0; row < 16; ++row) {
      for (int k = 0; k < 16; ++k) {
        s.fa[row][k] = value(s.a[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
      }
    }
    for (int k = 0; k < 16; ++k) {
      for (int n = 0; n < 8; ++n) s.fb[k][n] = value(s.b[4 * n + (k % 8) / 2][k / 8], k % 2);
    }
    s.decoded = me().collectives;
  }
  const int group = lane / 4, tig = lane % 4;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = group + 8 * (e / 2);
    const int col = 2 * tig + e % 2;
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc = fmaf(s.fa[row][k], s.fb[k][col], acc);
    d[e] = acc;
  }
  me().collectives += 1;
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// ex2.approx.ftz.f32: subnormal results flush to zero (the hardware's result is within 2^-22).
float ex2_approx_ftz(float x) {
  const float y = exp2f(x);
  return fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

}  // namespace ape_emu

// ---- Entry point -------------------------------------------------------------------------------

namespace {

void set_error(char* err, size_t err_len, const std::string& msg) {
  if (err && err_len > 0) snprintf(err, err_len, "%s", msg.c_str());
}

}  // namespace

// Runs kernel `name` over grid x block with `smem` bytes of dynamic shared memory; params[i]
// points at the i-th argument. flags: APE_EMU_REVERSE (1), APE_EMU_LATE_COPIES (2). threads: OS
// threads running CTAs (0: one per core). regions: n_regions (address, bytes) pairs, the global
// buffers the kernel may read through cp.async and __ldg (none: unchecked). Returns 0, or with a
// message in err the kind of error: 2 for an access outside every buffer (or outside shared
// memory), 3 for a misaligned address, 1 for anything else.
// The number of kernel `name`'s parameters in *n and, when it is at most `max`, their byte sizes
// in sizes[0..n]. Returns 0, or 1 when no kernel has that name.
extern "C" int ape_emu_kernel_params(const char* name, size_t* sizes, size_t max, size_t* n) {
  using namespace ape_emu;
  for (const Kernel& k : kKernels) {
    if (strcmp(k.name, name) != 0) continue;
    *n = k.n_params;
    for (size_t i = 0; i < k.n_params && i < max; ++i) sizes[i] = k.param_sizes[i];
    return 0;
  }
  return 1;
}

// A memory fault (a load or store the OS refused) met by the running kernel: when the calling
// thread runs a CTA's thread, that thread fails with `what`, an illegal address, and this does
// not return. Returns 0 on any other thread. Called from a signal handler (the driver stand-in's).
extern "C" int ape_emu_memory_fault(const char* what) {
  using namespace ape_emu;
  if (t_cta == nullptr || t_cta->current == nullptr) return 0;
  fail_kind(kIllegalAddress, "%s", what);
}

// A trap of the CPU inside a kernel that a GPU would not take (an integer division by zero): the
// launch fails, as the kernel's result would be undefined on a GPU. Returns 0 off a kernel thread.
extern "C" int ape_emu_launch_fault(const char* what) {
  using namespace ape_emu;
  if (t_cta == nullptr || t_cta->current == nullptr) return 0;
  fail_kind(kFailed, "%s", what);
}

extern "C" int ape_emu_launch(const char* name, const uint32_t* grid, const uint32_t* block,
                              size_t smem, void** params, uint32_t flags, uint32_t threads,
                              const uint64_t* regions, size_t n_regions, char* err,
                              size_t err_len) {
  using namespace ape_emu;
  const Kernel* kernel = nullptr;
  for (const Kernel& k : kKernels) {
    if (strcmp(k.name, name) == 0) kernel = &k;
  }
  if (!kernel) {
    set_error(err, err_len, std::string("no kernel named ") + name);
    return 1;
  }
  const uint64_t n_threads = uint64_t(block[0]) * block[1] * block[2];
  if (n_threads == 0 || n_threads > 1024) {
    set_error(err, err_len, "block of " + std::to_string(n_threads) + " threads (1..1024)");
    return 1;
  }
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 ||
      grid[2] > 65535) {
    set_error(err, err_len,
              "grid (" + std::to_string(grid[0]) + ", " + std::to_string(grid[1]) + ", " +
                  std::to_string(grid[2]) + ") outside CUDA's limits");
    return 1;
  }
  if (smem > kMaxSmem) {
    set_error(err, err_len, std::to_string(smem) + " bytes of dynamic shared memory (at most " +
                                std::to_string(kMaxSmem) + ")");
    return 1;
  }
  const uint64_t n_ctas = uint64_t(grid[0]) * grid[1] * grid[2];
  unsigned n_workers = threads ? threads : std::max(1u, std::thread::hardware_concurrency());
  n_workers = unsigned(std::min<uint64_t>(n_workers, n_ctas));

  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
  int error_kind = kFailed;
  std::vector<Region> buffers;
  for (size_t i = 0; i < n_regions; ++i) {
    buffers.push_back({uintptr_t(regions[2 * i]), uintptr_t(regions[2 * i] + regions[2 * i + 1])});
  }
  std::sort(buffers.begin(), buffers.end(),
            [](const Region& a, const Region& b) { return a.begin < b.begin; });
  const uint3 grid_dim{grid[0], grid[1], grid[2]};
  const uint3 block_dim{block[0], block[1], block[2]};

  auto worker = [&]() {
    Cta c;
    c.invoke = kernel->invoke;
    c.params = params;
    c.flags = flags;
    c.regions = buffers.data();
    c.n_regions = buffers.size();
    c.fibers.resize(n_threads);
    c.warps.resize((n_threads + 31) / 32);
    CtaMemory memory;
    if (!acquire_memory(n_threads, smem, &memory)) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!failed.exchange(true)) error = "cannot allocate the emulator's stacks";
      return;
    }
    c.stacks = memory.stacks;
    // The bytes just below the guard page, 128-byte aligned as CUDA's dynamic shared memory is.
    c.smem_bytes = smem;
    c.smem = memory.smem_map + memory.smem_capacity - (smem + 127) / 128 * 128;
    t_cta = &c;
    while (!failed.load()) {
      const uint64_t i = next.fetch_add(1);
      if (i >= n_ctas) break;
      const uint3 block_idx{uint32_t(i % grid[0]), uint32_t((i / grid[0]) % grid[1]),
                            uint32_t(i / (uint64_t(grid[0]) * grid[1]))};
      if (!run_cta(block_idx, grid_dim, block_dim)) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!failed.exchange(true)) {
          error = c.error;
          error_kind = c.error_kind ? c.error_kind : kFailed;
        }
        break;
      }
    }
    t_cta = nullptr;
    release_memory(memory);
  };

  if (n_workers <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < n_workers; ++w) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  if (failed.load()) {
    set_error(err, err_len, std::string(name) + ": " + error);
    return error_kind;
  }
  return 0;
}
