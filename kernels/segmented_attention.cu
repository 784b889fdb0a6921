// Segmented attention with the APE correction fused in (docs/DESIGN.md §2.3), for the question's prefill and
// for decode; mirrors src/reference/segmented_attention.rs.
//
// The keys are a list of segments read in place through descriptors {k, v, len, pos_offset, role,
// first_tile, rope_row, rope_layout}, K and V of a segment being [len, n_kv_heads, D]. The
// launcher orders the descriptors Context first, then Causal, and numbers their 64-key tiles
// consecutively (first_tile), so that tiles [0, n_ctx_tiles) are the context group C and the rest
// the causal group O.
//
// Batches: a launch covers one or more sequences, each with its own rows of the packed query, its
// own segments (descriptors seg0 onwards) and its own APE parameters; work[blockIdx.x] names each
// CTA's sequence (a single sequence's parameters travel by value instead). Everything below is per
// sequence. A fixed-grid launch (CapturableBatch, for CUDA graphs) always uses the arrays: its grid
// and by-value parameters are the same every launch, and the work list sends the thread blocks its
// plan does not need to an idle sequence without rows, which they leave at once.
//
// Work: a CTA (4 warps) takes 64 packed query rows of one KV head (packed row = row * group + g:
// the `group` query heads that share the KV head, so K/V are read once for all of them and never
// repeated) and a range of tiles (a split). Per tile: S = Q K^T on tensor cores (mma.sync m16n8k16,
// f32 accumulate), scale (1/(T sqrt d) for context tiles, 1/sqrt d for causal tiles; log2 domain),
// mask (tail keys; causal keys after the row's position), online softmax, O += P V.
//
// APE with one accumulator: when the walk crosses from the last context tile to the causal tiles,
// the finished context state (L_C, O_C) is turned into a state of log-mass a = S*T*L_C (or
// T*L_C + ln S) holding O_C: m = a, l = 1, acc = O_C. Continuing the online softmax over the causal
// keys then computes exactly merge((a, O_C), (L_O, O_O)), which is APE's output, and its LSE is
// ln(e^a + e^(L_O)). That needs the whole context group in one CTA ("whole" mode, one split).
//
// Split mode (short questions and decode, to fill the GPU): each split covers tiles of one group
// only and writes its normalised partial state (f32) to a workspace; the combine kernel merges the
// splits of each group, applies the APE correction to L_C and merges the two groups.
//
// RoPE shift (Block-Attention, RopeShift in src/params.rs): a segment whose cached keys must be
// read rotated by delta positions names a row of (cos, sin) of delta * theta_i. RoPE is a rotation,
// so q . R(delta) k = R(-delta) q . k: instead of rotating every K tile (in every CTA that reads
// it), the CTA rotates its query fragments when the walk enters a segment with another shift. Both
// lanes of a RoPE pair sit in the same thread's A fragments (NeoX: columns c and c + D/2 are the
// same slot of k-steps ks and ks + D/32; interleaved: one 32-bit register), so the rotation needs
// no shuffles; the K bytes read are those of the cache.
//
// The rotated rows are f32; rounding them to T once would put a logit error of ~2e-3 (bf16) into
// every key of the segment alike, which no averaging over keys removes (LSE errors up to 8e-3 at
// head dim 128, above the 1e-3 bar; rotating K in a separate pass does no better on short
// segments). So they are split as hi + lo, both in T, and shifted tiles take two MMAs per Q K^T
// step: the logits are then good to ~2^-17. hi stays in the Q fragments; lo goes to a fourth shared
// tile, sQlo, which the launcher allocates only for launches with shifts, and which each warp
// writes and reads for its own 16 rows only.
//
// Launches without shifts pay one compare per tile; the branch's values are kept opaque (see
// opaque() in ptx.cuh) so that it costs no registers in the walk: at head dim 128 the kernel sits
// near the 255-register limit.
#include "attention_state.cuh"
#include "mma.cuh"

namespace ape {

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

// Mirrored by SegmentedAttentionParams in src/cuda/segmented_attention/layout.rs.
struct SegmentedAttentionParams {
  uint32_t n_rows;           // query rows
  uint32_t n_heads;          // query heads
  uint32_t n_kv_heads;       // KV heads
  uint32_t group;            // n_heads / n_kv_heads
  uint32_t q_pos_offset;     // position of query row 0
  uint32_t n_segments;       // descriptors
  uint32_t n_ctx_tiles;      // tiles of the context group (they come first)
  uint32_t n_causal_tiles;   // tiles of the causal group
  uint32_t n_ctx_splits;     // split mode: splits over the context tiles
  uint32_t n_causal_splits;  // split mode: splits over the causal tiles
  uint32_t whole;            // 1: one split over every tile, APE fused, final output written
  uint32_t variant;          // ApeVariant: 0 released (a = S*T*L_C), 1 scaled mass (T*L_C + ln S)
  float ctx_scale_log2;      // log2(e) / (T * sqrt(D))
  float causal_scale_log2;   // log2(e) / sqrt(D)
  float temperature;         // T
  float scale;               // S
  uint32_t q_row0;           // first row of this sequence in q, out and lse
  uint32_t seg0;             // first descriptor of this sequence
  uint32_t part0;            // split mode: first (row, head) entry of its partial states
  uint32_t work0;            // first thread block (blockIdx.x) of this sequence
};
static_assert(sizeof(SegmentedAttentionParams) == 80, "SegmentedAttentionParams layout");

// Mirrored by SegmentedAttentionLaunch in src/cuda/segmented_attention/layout.rs. A launch covers one or
// more sequences (a batch), each with its own rows, segments and APE parameters. With one, its
// parameters travel here, by value; a batch's are in the `seqs` array, and `work[blockIdx.x]`
// names the sequence of each thread block.
struct SegmentedAttentionLaunch {
  SegmentedAttentionParams first;  // the sequence, when n_sequences == 1
  uint32_t n_sequences;
  uint32_t pad[3];
};
static_assert(sizeof(SegmentedAttentionLaunch) == 96, "SegmentedAttentionLaunch layout");

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// APE's corrected log-mass of the context group from its LSE (natural log).
__device__ __forceinline__ float context_log_mass(float lse_c, const SegmentedAttentionParams& p) {
  if (lse_c == -INFINITY) return -INFINITY;
  return p.variant == 0 ? p.scale * p.temperature * lse_c : p.temperature * lse_c + logf(p.scale);
}

// Where a tile's keys are.
template <typename T> struct Tile {
  const T* k;
  const T* v;
  int start;   // first token of the tile within its segment
  int n;       // valid keys in the tile (1..kBlockN)
  int pos0;    // position of the tile's first key
  int role;    // 0 = Context, 1 = Causal
  int rope_row;          // RoPE shift table row, -1 for none
  uint32_t rope_layout;  // RopeLayout
};

template <typename T>
__device__ __forceinline__ Tile<T> tile_at(const SegmentDesc* segs, int n_segments, int& cursor,
                                           uint32_t t) {
  // Descriptors are in tile order; tiles are visited in increasing order, so the cursor only moves
  // forward.
  while (cursor + 1 < n_segments && segs[cursor + 1].first_tile <= t) ++cursor;
  const SegmentDesc s = segs[cursor];
  Tile<T> tile;
  tile.k = reinterpret_cast<const T*>(s.k);
  tile.v = reinterpret_cast<const T*>(s.v);
  tile.start = int(t - s.first_tile) * kBlockN;
  tile.n = min(kBlockN, int(s.len) - tile.start);
  tile.pos0 = int(s.pos_offset) + tile.start;
  tile.role = int(s.role);
  tile.rope_row = s.rope_row;
  tile.rope_layout = s.rope_layout;
  return tile;
}

// This warp's Q fragments (16 rows, every k16 step of the head dim) from the shared Q tile.
template <typename T, int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[D / 16][4], const T* sQ, int warp,
                                                 int lane) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int mi = lane / 8;
    const int r = warp * 16 + (mi % 2) * 8 + lane % 8;
    ldmatrix_x4(qf[ks], sQ + swizzle<D>(r, ks * 2 + mi / 2));
  }
}

// A rotated fragment register's two values, split: hi (rounded to T) back into the fragment, the
// rest (rounded to T) into the same place of this warp's rows of sQlo.
template <typename T, int D>
__device__ __forceinline__ void store_split(uint32_t& frag, T* sQlo, int ks, int r, int lane,
                                            int warp, float x0, float x1) {
  frag = pack2<T>(x0, x1);
  const float2 hi = unpack2<T>(frag);
  const int row = warp * 16 + lane / 4 + 8 * (r % 2);
  *reinterpret_cast<uint32_t*>(sQlo + swizzle<D>(row, ks * 2 + r / 2) + 2 * (lane % 4)) =
      pack2<T>(x0 - hi.x, x1 - hi.y);
}

// Rotates the Q fragments by -delta, (x, y) -> (x cos + y sin, -x sin + y cos), so that their dot
// products with stored keys equal those with keys rotated by +delta, and splits the result
// (store_split). cs holds the D/2 pairs (cos, sin) of delta * theta_i. Fragment register r of
// k-step ks holds row (lane / 4 + 8 (r % 2)), columns ks * 16 + 8 (r / 2) + 2 (lane % 4) + {0, 1}
// (see mma.cuh).
template <typename T, int D>
__device__ __forceinline__ void rotate_q_fragments(uint32_t (&qf)[D / 16][4], T* sQlo,
                                                   const float2* __restrict__ cs,
                                                   uint32_t layout, int lane, int warp) {
  constexpr int kKSteps = D / 16;
  const int tig = lane % 4;
  if (layout == 0) {
    // NeoX: pair i = column c < D/2 with column c + D/2, the same slot kKSteps / 2 steps later.
#pragma unroll
    for (int ks = 0; ks < kKSteps / 2; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int c = ks * 16 + (r / 2) * 8 + 2 * tig;
        const float2 x = unpack2<T>(qf[ks][r]);
        const float2 y = unpack2<T>(qf[ks + kKSteps / 2][r]);
        const float2 cs0 = __ldg(cs + c);
        const float2 cs1 = __ldg(cs + c + 1);
        store_split<T, D>(qf[ks][r], sQlo, ks, r, lane, warp, x.x * cs0.x + y.x * cs0.y,
                          x.y * cs1.x + y.y * cs1.y);
        store_split<T, D>(qf[ks + kKSteps / 2][r], sQlo, ks + kKSteps / 2, r, lane, warp,
                          y.x * cs0.x - x.x * cs0.y, y.y * cs1.x - x.y * cs1.y);
      }
    }
  } else {
    // Interleaved: pair i = columns (2i, 2i + 1), the two halves of one register.
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int c = ks * 16 + (r / 2) * 8 + 2 * tig;
        const float2 xy = unpack2<T>(qf[ks][r]);
        const float2 cs0 = __ldg(cs + c / 2);
        store_split<T, D>(qf[ks][r], sQlo, ks, r, lane, warp, xy.x * cs0.x + xy.y * cs0.y,
                          xy.y * cs0.x - xy.x * cs0.y);
      }
    }
  }
}

// Copies a [kBlockN, D] slice of K or V (one KV head) into a swizzled shared tile; rows past the
// tile's valid keys are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(T* dst, const T* base, const Tile<T>& tile, int kvh,
                                             int n_kv_heads, int tid) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = 0; i < kBlockN * kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int row = idx / kChunks;
    const int chunk = idx % kChunks;
    const bool valid = row < tile.n;
    const T* src =
        valid ? base + (size_t(tile.start + row) * n_kv_heads + kvh) * D + chunk * 8 : base;
    cp_async_16(dst + swizzle<D>(row, chunk), src, valid);
  }
}

template <typename T, int D>
__device__ __forceinline__ void segmented_attention_body(
    const T* __restrict__ q, const SegmentDesc* __restrict__ segs,
    const float2* __restrict__ rope_cs, T* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ o_part, float* __restrict__ lse_part,
    const SegmentedAttentionParams* __restrict__ seqs, const uint32_t* __restrict__ work,
    const SegmentedAttentionLaunch& launch) {
  static_assert(D == 64 || D == 128, "head dim");
  constexpr int kChunks = D / 8;
  constexpr int kNBlocksS = kBlockN / 8;  // n8 blocks of S
  constexpr int kNBlocksO = D / 8;        // n8 blocks of O
  constexpr int kKSteps = D / 16;         // k16 steps over the head dim

  APE_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * D;       // [2][kBlockN][D]
  T* sV = sK + 2 * kBlockN * D;   // [2][kBlockN][D]
  T* sQlo = sV + 2 * kBlockN * D; // [kBlockM][D], launches with RoPE shifts only

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int kvh = blockIdx.y;

  // This CTA's sequence. Its parameters are read from shared memory where they are used, rather
  // than held in registers across the walk (the kernel sits near the register limit).
  __shared__ SegmentedAttentionParams s_params;
  if (tid == 0) {
    if (launch.n_sequences == 1) {
      s_params = launch.first;
    } else {
      s_params = seqs[work[blockIdx.x]];
    }
  }
  __syncthreads();
  const SegmentedAttentionParams& p = s_params;
  segs += p.seg0;
  const uint32_t n_splits = p.whole ? 1u : p.n_ctx_splits + p.n_causal_splits;
  const uint32_t local = blockIdx.x - p.work0;
  const int split = int(local % n_splits);
  const int group = int(p.group);
  const uint32_t packed_rows = p.n_rows * p.group;
  const uint32_t m0 = (local / n_splits) * kBlockM;
  // Thread blocks a fixed-grid launch does not need (the idle sequence's) leave here.
  if (m0 >= packed_rows) return;

  // This CTA's tile range.
  uint32_t t_begin, t_end;
  if (p.whole) {
    t_begin = 0;
    t_end = p.n_ctx_tiles + p.n_causal_tiles;
  } else if (uint32_t(split) < p.n_ctx_splits) {
    t_begin = uint32_t(uint64_t(split) * p.n_ctx_tiles / p.n_ctx_splits);
    t_end = uint32_t(uint64_t(split + 1) * p.n_ctx_tiles / p.n_ctx_splits);
  } else {
    const uint64_t s = split - p.n_ctx_splits;
    t_begin = p.n_ctx_tiles + uint32_t(s * p.n_causal_tiles / p.n_causal_splits);
    t_end = p.n_ctx_tiles + uint32_t((s + 1) * p.n_causal_tiles / p.n_causal_splits);
  }

  // Positions of the rows this CTA holds (for skipping and masking causal tiles).
  const uint32_t last_packed = min(m0 + kBlockM, packed_rows) - 1;
  const int q_pos_min = int(p.q_pos_offset + m0 / p.group);
  const int q_pos_max = int(p.q_pos_offset + last_packed / p.group);

  // The two rows of each thread's accumulator fragments: packed rows r and r + 8.
  int row_pos[2];
  int row_idx[2];
  int row_head[2];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t pr = m0 + warp * 16 + lane / 4 + i * 8;
    row_ok[i] = pr < packed_rows;
    row_idx[i] = int(pr / p.group);
    row_head[i] = kvh * group + int(pr % p.group);
    // Padding rows take the last valid row's position, so that no position passes n_rows.
    row_pos[i] = row_ok[i] ? int(p.q_pos_offset) + row_idx[i] : q_pos_max;
  }

  // Load the Q tile: packed row r -> query row r / group, head kvh * group + r % group.
  for (int idx = tid; idx < kBlockM * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int chunk = idx % kChunks;
    const uint32_t pr = m0 + r;
    const bool valid = pr < packed_rows;
    const T* src =
        valid ? q + ((size_t(p.q_row0) + pr / p.group) * p.n_heads + kvh * group + pr % p.group) *
                            D +
                    chunk * 8
              : q;
    cp_async_16(sQ + swizzle<D>(r, chunk), src, valid);
  }
  cp_async_commit();

  int cursor = 0;
  // A causal tile whose first key comes after every row of the CTA contributes nothing.
  auto visible = [&](uint32_t t) {
    if (t < p.n_ctx_tiles) return true;
    int c = cursor;
    const Tile<T> tile = tile_at<T>(segs, int(p.n_segments), c, t);
    return tile.pos0 <= q_pos_max;
  };
  auto next_visible = [&](uint32_t t) {
    while (t < t_end && !visible(t)) ++t;
    return t;
  };

  uint32_t t = next_visible(t_begin);
  if (t < t_end) {
    const Tile<T> tile = tile_at<T>(segs, int(p.n_segments), cursor, t);
    load_kv_tile<T, D>(sK, tile.k, tile, kvh, int(p.n_kv_heads), tid);
    load_kv_tile<T, D>(sV, tile.v, tile, kvh, int(p.n_kv_heads), tid);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // Q fragments stay in registers for the whole walk; sQ keeps the unrotated rows, from which they
  // are reloaded when the walk enters a segment with another RoPE shift.
  uint32_t qf[kKSteps][4];
  load_q_fragments<T, D>(qf, sQ, warp, lane);
  int q_rope_row = -1;  // the RoPE shift the fragments carry

  // Warps whose 16 rows are all padding (short questions, decode) only help load tiles.
  const bool warp_active = m0 + warp * 16 < packed_rows;

  float acc[kNBlocksO][4];
#pragma unroll
  for (int j = 0; j < kNBlocksO; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max, log2 domain
  float l[2] = {0.f, 0.f};              // running sum (this lane's share of the quad)
  bool corrected = false;               // whole mode: the context state has been turned into (a, O_C)

  // Whole mode: (L_C, O_C) -> (a, O_C) as a running state, before the first causal key.
  auto correct_context = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float l_full = quad_sum(l[i]);
      const float lse_c = (l_full > 0.f) ? (m[i] + log2f(l_full)) * kLn2 : -INFINITY;
      const float a = context_log_mass(lse_c, p);
      const float inv = l_full > 0.f ? 1.f / l_full : 0.f;
#pragma unroll
      for (int j = 0; j < kNBlocksO; ++j) {
        acc[j][2 * i] *= inv;
        acc[j][2 * i + 1] *= inv;
      }
      m[i] = a == -INFINITY ? -INFINITY : a * kLog2e;
      // The quad's shares must sum to 1: one lane holds it.
      l[i] = (a != -INFINITY && lane % 4 == 0) ? 1.f : 0.f;
    }
    corrected = true;
  };

  int buf = 0;
  while (t < t_end) {
    const Tile<T> tile = tile_at<T>(segs, int(p.n_segments), cursor, t);
    const uint32_t t_next = next_visible(t + 1);
    if (t_next < t_end) {
      int c = cursor;
      const Tile<T> nt = tile_at<T>(segs, int(p.n_segments), c, t_next);
      load_kv_tile<T, D>(sK + (buf ^ 1) * kBlockN * D, nt.k, nt, kvh, int(p.n_kv_heads), tid);
      load_kv_tile<T, D>(sV + (buf ^ 1) * kBlockN * D, nt.v, nt, kvh, int(p.n_kv_heads), tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (p.whole && tile.role == 1 && !corrected) correct_context();

    const T* k_tile = sK + buf * kBlockN * D;
    const T* v_tile = sV + buf * kBlockN * D;
    if (warp_active) {

    if (tile.rope_row != q_rope_row) {  // uniform over the CTA: the tile is
      const int lane_o = opaque(lane);
      load_q_fragments<T, D>(qf, opaque(sQ), warp, lane_o);
      if (tile.rope_row >= 0) {
        __syncwarp();  // every lane is done reading the previous lo rows
        rotate_q_fragments<T, D>(qf, opaque(sQlo),
                                 opaque(rope_cs) + size_t(tile.rope_row) * (D / 2),
                                 tile.rope_layout, lane_o, warp);
        __syncwarp();  // the lo rows are written before any lane loads them
      }
      q_rope_row = tile.rope_row;
    }
    const bool split_q = tile.rope_row >= 0;  // uniform

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[kNBlocksS][4];
#pragma unroll
    for (int j = 0; j < kNBlocksS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int nb = 0; nb < kNBlocksS / 2; ++nb) {
        const int mi = lane / 8;
        const int key = nb * 16 + (mi / 2) * 8 + lane % 8;
        uint32_t b[4];
        ldmatrix_x4(b, k_tile + swizzle<D>(key, ks * 2 + mi % 2));
        mma_16816<T>(s[2 * nb], qf[ks], b[0], b[1]);
        mma_16816<T>(s[2 * nb + 1], qf[ks], b[2], b[3]);
      }
    }
    if (split_q) {
      // The lo part of the rotated rows: a second pass over the tile's K fragments.
      const T* lo = opaque(sQlo);
      const T* kt = opaque(k_tile);
      const int ln = opaque(lane);
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        const int mi = ln / 8;
        uint32_t qlo[4];
        ldmatrix_x4(qlo, lo + swizzle<D>(warp * 16 + (mi % 2) * 8 + ln % 8, ks * 2 + mi / 2));
#pragma unroll
        for (int nb = 0; nb < kNBlocksS / 2; ++nb) {
          const int key = nb * 16 + (mi / 2) * 8 + ln % 8;
          uint32_t b[4];
          ldmatrix_x4(b, kt + swizzle<D>(key, ks * 2 + mi % 2));
          mma_16816<T>(s[2 * nb], qlo, b[0], b[1]);
          mma_16816<T>(s[2 * nb + 1], qlo, b[2], b[3]);
        }
      }
    }

    // Scale into the log2 domain and mask.
    const float scale_log2 = tile.role == 0 ? p.ctx_scale_log2 : p.causal_scale_log2;
    // (tile.n < kBlockN already masks, so pos0 + n - 1 cannot overflow when it is evaluated.)
    const bool need_mask =
        tile.n < kBlockN || (tile.role == 1 && tile.pos0 + tile.n - 1 > q_pos_min);
#pragma unroll
    for (int j = 0; j < kNBlocksS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale_log2;
        if (need_mask) {
          const int key = j * 8 + (lane % 4) * 2 + (e & 1);
          const bool ok = key < tile.n && (tile.role == 0 || tile.pos0 + key <= row_pos[e / 2]);
          x = ok ? x : -INFINITY;
        }
        s[j][e] = x;
      }
    }

    // Online softmax.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mt = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNBlocksS; ++j) mt = fmaxf(mt, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      mt = quad_max(mt);
      const float m_new = fmaxf(m[i], mt);
      // With nothing visible yet, m_new is -inf: use 0 so that no (-inf) - (-inf) appears.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2_ftz(m[i] - m_use);
      l[i] *= alpha;
#pragma unroll
      for (int j = 0; j < kNBlocksO; ++j) {
        acc[j][2 * i] *= alpha;
        acc[j][2 * i + 1] *= alpha;
      }
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < kNBlocksS; ++j) {
        s[j][2 * i] = exp2_ftz(s[j][2 * i] - m_use);
        s[j][2 * i + 1] = exp2_ftz(s[j][2 * i + 1] - m_use);
        rs += s[j][2 * i] + s[j][2 * i + 1];
      }
      l[i] += rs;
      m[i] = m_new;
    }

    // O += P V, P taken straight from the S accumulators.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * ks][0], s[2 * ks][1]);
      a[1] = pack2<T>(s[2 * ks][2], s[2 * ks][3]);
      a[2] = pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
      a[3] = pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
      for (int db = 0; db < D / 16; ++db) {
        const int mi = lane / 8;
        const int key = ks * 16 + (mi % 2) * 8 + lane % 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + swizzle<D>(key, db * 2 + mi / 2));
        mma_16816<T>(acc[2 * db], a, b[0], b[1]);
        mma_16816<T>(acc[2 * db + 1], a, b[2], b[3]);
      }
    }
    }  // warp_active

    __syncthreads();  // every warp is done with this buffer before it is refilled
    buf ^= 1;
    t = t_next;
  }
  cp_async_wait<0>();

  if (p.whole && !corrected) correct_context();

  // Epilogue: normalise, and write either the final output or this split's partial state.
  const int col = (lane % 4) * 2;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l_full = quad_sum(l[i]);
    const float inv = l_full > 0.f ? 1.f / l_full : 0.f;
    const float row_lse = l_full > 0.f ? (m[i] + log2f(l_full)) * kLn2 : -INFINITY;
    if (!row_ok[i]) continue;
    const size_t row = size_t(row_idx[i]) * p.n_heads + row_head[i];  // within the sequence
    if (p.whole) {
      const size_t at = size_t(p.q_row0) * p.n_heads + row;
      T* o = out + at * D;
#pragma unroll
      for (int j = 0; j < kNBlocksO; ++j) {
        *reinterpret_cast<uint32_t*>(o + j * 8 + col) =
            pack2<T>(acc[j][2 * i] * inv, acc[j][2 * i + 1] * inv);
      }
      if (lane % 4 == 0) lse[at] = row_lse;
    } else {
      const size_t n = size_t(p.n_rows) * p.n_heads;
      const size_t at = size_t(p.part0) + size_t(split) * n + row;
      float* o = o_part + at * D;
#pragma unroll
      for (int j = 0; j < kNBlocksO; ++j) {
        *reinterpret_cast<float2*>(o + j * 8 + col) =
            make_float2(acc[j][2 * i] * inv, acc[j][2 * i + 1] * inv);
      }
      if (lane % 4 == 0) lse_part[at] = row_lse;
    }
  }
}

// Split mode: merges the context splits into (L_C, O_C) and the causal splits into (L_O, O_O),
// then out = merge((a, O_C), (L_O, O_O)) with a = APE's corrected context log-mass. One warp per
// (row, head) of sequence blockIdx.y; each lane owns D/32 consecutive elements. Sequences that ran
// whole have nothing to combine.
template <typename T, int D>
__device__ __forceinline__ void segmented_attention_combine_body(
    const float* __restrict__ o_part, const float* __restrict__ lse_part, T* __restrict__ out,
    float* __restrict__ lse, const SegmentedAttentionParams* __restrict__ seqs,
    const SegmentedAttentionLaunch& launch) {
  constexpr int kPer = D / 32;
  const SegmentedAttentionParams p = launch.n_sequences == 1 ? launch.first : seqs[blockIdx.y];
  if (p.whole) return;
  const size_t n = size_t(p.n_rows) * p.n_heads;
  const size_t i = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  lse_part += p.part0;
  o_part += size_t(p.part0) * D;
  out += size_t(p.q_row0) * p.n_heads * D;
  lse += size_t(p.q_row0) * p.n_heads;

  const int nc = int(p.n_ctx_splits);
  const int ns = nc + int(p.n_causal_splits);
  auto group_lse = [&](int s0, int s1) {
    float mx = -INFINITY;
    for (int s = s0; s < s1; ++s) mx = fmaxf(mx, lse_part[s * n + i]);
    if (mx == -INFINITY) return -INFINITY;
    float sum = 0.f;
    for (int s = s0; s < s1; ++s) {
      const float x = lse_part[s * n + i];
      if (x != -INFINITY) sum += expf(x - mx);
    }
    return mx + logf(sum);
  };
  const float lse_c = group_lse(0, nc);
  const float lse_o = group_lse(nc, ns);
  const MergeWeights w = merge_weights(context_log_mass(lse_c, p), lse_o);

  float o[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) o[e] = 0.f;
  for (int s = 0; s < ns; ++s) {
    const float x = lse_part[s * n + i];
    if (x == -INFINITY) continue;
    const float weight = s < nc ? w.wa * expf(x - lse_c) : w.wb * expf(x - lse_o);
    if (weight == 0.f) continue;
    const float* src = o_part + (s * n + i) * D + lane * kPer;
#pragma unroll
    for (int e = 0; e < kPer; ++e) o[e] += weight * src[e];
  }
  T* dst = out + i * D + lane * kPer;
#pragma unroll
  for (int e = 0; e < kPer; ++e) dst[e] = from_float<T>(o[e]);
  if (lane == 0) lse[i] = w.lse;
}

}  // namespace ape

#define APE_SEGMENTED_ATTENTION(NAME, T, D)                                                      \
  extern "C" __global__ void __launch_bounds__(ape::kThreads, 2) segmented_attention_##NAME(   \
      const T* q, const ape::SegmentDesc* segs, const float2* rope_cs, T* out, float* lse,      \
      float* o_part, float* lse_part, const ape::SegmentedAttentionParams* seqs,                \
      const uint32_t* work, const ape::SegmentedAttentionLaunch launch) {                       \
    ape::segmented_attention_body<T, D>(q, segs, rope_cs, out, lse, o_part, lse_part, seqs,     \
                                        work, launch);                                          \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256) segmented_attention_combine_##NAME(        \
      const float* o_part, const float* lse_part, T* out, float* lse,                           \
      const ape::SegmentedAttentionParams* seqs, const ape::SegmentedAttentionLaunch launch) {  \
    ape::segmented_attention_combine_body<T, D>(o_part, lse_part, out, lse, seqs, launch);     \
  }

APE_SEGMENTED_ATTENTION(bf16_d64, __nv_bfloat16, 64)
APE_SEGMENTED_ATTENTION(bf16_d128, __nv_bfloat16, 128)
APE_SEGMENTED_ATTENTION(f16_d64, __half, 64)
APE_SEGMENTED_ATTENTION(f16_d128, __half, 128)
