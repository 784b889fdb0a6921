// The attention kernel's walk over key tiles: the segment descriptors it reads, the tiles it
// visits, and the copy of a tile's K and V into shared memory (docs/DESIGN.md §2.1).
//
// The launcher numbers the tiles of all segments consecutively, Context segments first (a
// segment's first tile is first_tile), and a CTA walks a range of them in order. One thread, the
// walker, finds the tiles: it keeps its place (segment and tile) in shared memory, reads a
// descriptor from global memory only when the walk enters the next segment, skips the causal
// tiles that no row of the CTA sees, and describes each tile once, in a TileInfo in shared
// memory: where its K and V start (this CTA's KV head and the tile's first key folded in), its
// valid keys, position, role, logit scale, whether it needs the mask, and its RoPE shift. The
// other threads read that description; nobody walks descriptors or forms 64-bit addresses per
// copy.
//
// The copies run `stages` tiles deep (2 to 4; shared memory holds that many K and V tiles), and
// stages + 1 TileInfo slots rotate: while tile k is computed, tiles k + 1 .. k + stages - 1 are
// being copied (the last of them is issued at the start of the step, from its slot) and the
// walker describes tile k + stages in the remaining slot, whose last reader (tile k - 1) finished
// before the barrier that ended the previous step.
//
// A copy thread's share of a tile is fixed for the launch: chunk tid % (D/8) of the rows
// tid / (D/8) + i * (rows per pass). Its offset from the tile's start is 32-bit, and so is a
// tile's offset within its segment: validation bounds a segment to 2^31 - 1 elements of K (and of
// V), so no offset inside a segment needs 64 bits (check_problem in
// src/cuda/segmented_attention/validate.rs).
#pragma once

#include "mma.cuh"

namespace ape {

// Keys per tile of the attention kernels (BLOCK_N in src/cuda/segmented_attention/mod.rs). The
// packed query rows and the warps per thread block are the kernel's tile shape (PrefillTile,
// WideTile, DecodeTile in segmented_attention.cu).
constexpr int kBlockN = 64;

// cp.async.wait_group n for a count known only at run time (the pipeline's stages - 1 or - 2,
// at most 3): every committed group of copies but the newest n has landed. Where the count is a
// constant, the branches fold away.
__device__ __forceinline__ void cp_async_wait_upto(int n) {
  if (n <= 0) {
    cp_async_wait<0>();
  } else if (n == 1) {
    cp_async_wait<1>();
  } else if (n == 2) {
    cp_async_wait<2>();
  } else {
    cp_async_wait<3>();
  }
}

// Mirrored by SegmentDesc in src/cuda/segmented_attention/layout.rs.
struct SegmentDesc {
  uint64_t k;           // device pointer to [len, n_kv_heads, D]
  uint64_t v;           // device pointer to [len, n_kv_heads, D]
  uint32_t len;         // tokens (> 0: the launcher drops empty segments)
  uint32_t pos_offset;  // absolute position of token 0
  uint32_t role;        // 0 = Context, 1 = Causal (SegmentRole)
  uint32_t first_tile;  // index of this segment's first tile in the launch's tile order
  int32_t rope_row;     // row of the RoPE shift table (D/2 (cos, sin) pairs); -1: keys as stored
  uint32_t rope_layout; // 0 = NeoX (i, i + D/2), 1 = interleaved (2i, 2i + 1) (RopeLayout)
};
static_assert(sizeof(SegmentDesc) == 40, "SegmentDesc layout");

// One tile as the walker describes it.
struct alignas(16) TileInfo {
  uint64_t k;          // K of the tile's first key, this CTA's KV head
  uint64_t v;          // V likewise
  int n;               // valid keys (1..kBlockN); 0: the walk is over
  int pos0;            // position of the first key
  float scale_log2;    // the logit scale of its group, log2 domain
  uint32_t causal;     // 1: a Causal segment's tile
  uint32_t need_mask;  // 1: some key is past n, or after some row's position
  int rope_row;        // RoPE shift table row, -1 for none
  uint32_t rope_layout;
  uint32_t pad;
};

// The walker's place: the tile it described last and the segment that holds it.
struct WalkState {
  uint32_t t;           // last tile described (t_begin - 1 before the first)
  uint32_t t_end;       // one past the CTA's last tile
  uint32_t next_first;  // first tile of the next segment (~0u: none)
  int seg;              // current segment (-1 before the first)
  SegmentDesc desc;     // its descriptor
};

// What the walker needs of the launch: fixed for the CTA.
struct WalkParams {
  const SegmentDesc* segs;  // this sequence's descriptors
  int n_segments;
  int q_pos_min;            // positions of the CTA's first and last rows
  int q_pos_max;
  uint32_t kv_offset;       // kvh * D: this CTA's KV head within a token's row
  uint32_t stride;          // n_kv_heads * D: elements from one token to the next
  float ctx_scale_log2;
  float causal_scale_log2;
};

// The walker (one thread): describes the next tile the CTA sees after w.t into `out`, or ends
// the walk (out.n = 0). Causal tiles that start after the CTA's last row are skipped, with the
// rest of their segment.
template <typename T>
__device__ __forceinline__ void walk_next(WalkState& w, TileInfo& out, const WalkParams& wp) {
  uint32_t t = w.t + 1;
  while (true) {
    if (t >= w.t_end) {
      // static-check: cold begin (the walk is over)
      w.t = w.t_end;
      out.n = 0;
      return;
      // static-check: cold end
    }
    // static-check: cold begin (the walk enters the next segment)
    while (t >= w.next_first) {
      w.seg += 1;
      w.desc = wp.segs[w.seg];
      w.next_first = w.seg + 1 < wp.n_segments ? wp.segs[w.seg + 1].first_tile : ~0u;
    }
    // static-check: cold end
    const int start = int(t - w.desc.first_tile) * kBlockN;
    const int pos0 = int(w.desc.pos_offset) + start;
    if (w.desc.role == 1 && pos0 > wp.q_pos_max) {
      // static-check: cold begin (a causal tile after every row)
      t = w.next_first;  // and every later tile of this causal segment
      continue;
      // static-check: cold end
    }
    const int n = min(kBlockN, int(w.desc.len) - start);
    const uint32_t offset = uint32_t(start) * wp.stride + wp.kv_offset;
    TileInfo info;
    info.k = reinterpret_cast<uint64_t>(reinterpret_cast<const T*>(w.desc.k) + offset);
    info.v = reinterpret_cast<uint64_t>(reinterpret_cast<const T*>(w.desc.v) + offset);
    info.n = n;
    info.pos0 = pos0;
    info.causal = w.desc.role;
    info.scale_log2 = w.desc.role == 0 ? wp.ctx_scale_log2 : wp.causal_scale_log2;
    // (n < kBlockN already masks, so pos0 + n - 1 cannot overflow when it is evaluated.)
    info.need_mask = n < kBlockN || (w.desc.role == 1 && pos0 + n - 1 > wp.q_pos_min);
    info.rope_row = w.desc.rope_row;
    info.rope_layout = w.desc.rope_layout;
    info.pad = 0;
    out = info;  // three 16-byte stores
    w.t = t;
    return;
  }
}

// A thread's share of every tile copy by kThreads threads: the rows tid / (D/8) + i *
// kRowsPerPass, chunk tid % (D/8), as offsets from the tile's start (global, in elements) and from
// the shared tile's.
template <int D, int kThreads> struct KvCopy {
  static constexpr int kChunks = D / 8;               // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = kBlockN / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0, "a pass keeps the swizzle's row phase");
  uint32_t src;  // row0 * stride + chunk * 8
  uint32_t step; // kRowsPerPass * stride
  int dst;       // swizzle<D>(row0, chunk)
  int row0;

  __device__ __forceinline__ void init(int tid, uint32_t stride) {
    row0 = tid / kChunks;
    const int chunk = tid % kChunks;
    src = uint32_t(row0) * stride + uint32_t(chunk) * 8;
    step = uint32_t(kRowsPerPass) * stride;
    dst = swizzle<D>(row0, chunk);
  }

  // Copies this thread's share of a [kBlockN, D] tile that starts at `src_tile` into the
  // swizzled shared tile `dst_tile`; rows past the n valid keys are zero-filled.
  template <typename T>
  __device__ __forceinline__ void copy(T* dst_tile, uint64_t src_tile, int n) const {
    const T* base = reinterpret_cast<const T*>(src_tile);
    if (n == kBlockN) {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        cp_async_16(dst_tile + dst + i * kRowsPerPass * D, base + (src + uint32_t(i) * step), true);
      }
    } else {
      // static-check: cold begin (the last tile of a segment)
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const bool valid = row0 + i * kRowsPerPass < n;
        cp_async_16(dst_tile + dst + i * kRowsPerPass * D,
                    valid ? base + (src + uint32_t(i) * step) : base, valid);
      }
      // static-check: cold end
    }
  }
};

}  // namespace ape
