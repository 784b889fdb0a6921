// Segmented attention with the APE correction fused in (docs/DESIGN.md §2.3), for the question's prefill and
// for decode; mirrors src/reference/segmented_attention.rs.
//
// The keys are a list of segments read in place through descriptors {k, v, len, pos_offset, role,
// first_tile, rope_row, rope_layout}, K and V of a segment being [len, n_kv_heads, D]. The
// launcher orders the descriptors Context first, then Causal, and numbers their 64-key tiles
// consecutively (first_tile), so that tiles [0, n_ctx_tiles) are the context group C and the rest
// the causal group O. The walk over them, and the copy of each tile, are in tile_walk.cuh.
//
// Batches: a launch covers one or more sequences, each with its own rows of the packed query, its
// own segments (descriptors seg0 onwards) and its own APE parameters; work[blockIdx.x] names each
// CTA's sequence (a single sequence's parameters travel by value instead). Everything below is per
// sequence. A fixed-grid launch (CapturableBatch, for CUDA graphs) always uses the arrays: its grid
// and by-value parameters are the same every launch, and the work list sends the thread blocks its
// plan does not need to an idle sequence without rows, which they leave at once.
//
// Work: a CTA (4 warps) takes a tile of packed query rows of one KV head (packed row = row * group
// + g: the `group` query heads that share the KV head, so K/V are read once for all of them and
// never repeated) and a range of key tiles (a split). Per key tile: S = Q K^T on tensor cores
// (mma.sync m16n8k16, f32 accumulate), the mask (tail keys; causal keys after the row's position;
// tile_mask.cuh), the online softmax with the tile's scale (1/(T sqrt d) for context tiles,
// 1/sqrt d for causal tiles; online_softmax.cuh), O += P V.
//
// Three tile shapes, three kernels (TileShape in src/cuda/segmented_attention/occupancy.rs):
// - prefill (segmented_attention_<dtype>_d<D>): 64 packed rows, each warp its own 16 against every
//   key; two pipeline stages; 2 CTAs per SM at up to 255 registers. A CTA left with at most 16
//   rows (the tail of a question) runs as the decode tile does.
// - wide (segmented_attention_wide_<dtype>_d<D>): 128 packed rows over 8 warps, each its own 16;
//   each copied key tile serves twice the rows, so the copies' share of the issue work halves.
//   One CTA per SM (8 warps at up to 255 registers). A CTA left with few rows computes them on
//   one warp.
// - decode (segmented_attention_decode_<dtype>_d<D>): 16 packed rows, a decode row's GQA group
//   or a short question. Every warp takes those rows and 16 of each key tile's keys, and the four
//   states merge after the walk. It needs fewer registers and less shared memory, so more CTAs
//   fit an SM, and the copies run 2 to 4 stages deep (the launch's `stages`, chosen per device
//   from its shared memory). It never runs a whole pass that crosses from the context keys to the
//   causal keys (below): the launcher splits such a sequence at the boundary.
//
// APE with one accumulator: when the walk crosses from the last context tile to the causal tiles,
// the finished context state (L_C, O_C) is turned into a state of log-mass a = S*T*L_C (or
// T*L_C + ln S) holding O_C: m = a, l = 1, acc = O_C. Continuing the online softmax over the causal
// keys then computes exactly merge((a, O_C), (L_O, O_O)), which is APE's output, and its LSE is
// ln(e^a + e^(L_O)). That needs the whole context group in one CTA ("whole" mode, one split),
// and, where it crosses, each warp holding its own rows over every key (the prefill tile).
//
// Split mode (short questions and decode, to fill the GPU): each split covers tiles of one group
// only and writes its normalised partial state (f32) to a workspace. The last split of a (query
// tile, KV head) to finish, found by a counter in the workspace (split_counters), then combines the
// tile's (row, head) entries in the same launch: it merges the splits of each group, applies the
// APE correction to L_C and merges the two groups (combine_splits), and resets the counter.
//
// RoPE shift (Block-Attention, RopeShift in src/params.rs): a segment whose cached keys must be
// read rotated by delta positions names a row of (cos, sin) of delta * theta_i; the CTA rotates its
// query fragments when the walk enters a segment with another shift (rope_shift.cuh), and
// shifted tiles take a second Q K^T pass for the rotated rows' lo parts. Launches without shifts
// pay one compare per tile.
#include <type_traits>

#include "attention_state.cuh"
#include "online_softmax.cuh"
#include "rope_shift.cuh"
#include "tile_mask.cuh"
#include "tile_walk.cuh"

namespace ape {

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
  uint32_t stages;                 // pipeline stages: 2 for the prefill tile, 2..4 for decode
  uint32_t pad[2];
};
static_assert(sizeof(SegmentedAttentionLaunch) == 96, "SegmentedAttentionLaunch layout");

constexpr float kLog2e = 1.442695040888963407f;

// APE's corrected log-mass of the context group from its LSE (natural log).
__device__ __forceinline__ float context_log_mass(float lse_c, const SegmentedAttentionParams& p) {
  if (lse_c == -INFINITY) return -INFINITY;
  return p.variant == 0 ? p.scale * p.temperature * lse_c : p.temperature * lse_c + logf(p.scale);
}

// Few rows: the kWarps warps hold states of the same 16 rows over different keys; warp 0's state
// becomes their merge (docs/DESIGN.md §2.2), the others' are left as they are (they write
// nothing). `scratch` is shared memory no tile uses any more: kWarps * 16 * (D + 2) floats.
template <int D, int kWarps>
__device__ __forceinline__ void merge_warp_states(OnlineSoftmax& sm, float (&acc)[D / 8][4],
                                                  float* scratch, int warp, int lane) {
  float* ml = scratch + kWarps * 16 * D;  // [warp][row] (m, sum)
  __syncthreads();  // every warp is done with the tiles
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lane / 4 + 8 * i;
    const float sum = sm.sum(i);
    if (warp > 0) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<float2*>(scratch + (warp * 16 + r) * D + j * 8 + (lane % 4) * 2) =
            make_float2(acc[j][2 * i], acc[j][2 * i + 1]);
      }
    }
    if (lane % 4 == 0) {
      ml[(warp * 16 + r) * 2] = sm.m[i];
      ml[(warp * 16 + r) * 2 + 1] = sum;
    }
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lane / 4 + 8 * i;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, ml[(w * 16 + r) * 2]);
    if (m_all == -INFINITY) continue;  // no keys in any warp: the state stays empty
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float m_w = ml[(w * 16 + r) * 2];
      const float f = m_w == -INFINITY ? 0.f : exp2_ftz(m_w - m_all);
      total += f * ml[(w * 16 + r) * 2 + 1];
      if (w == 0) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          acc[j][2 * i] *= f;
          acc[j][2 * i + 1] *= f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          const float2 o = *reinterpret_cast<const float2*>(scratch + (w * 16 + r) * D + j * 8 +
                                                            (lane % 4) * 2);
          acc[j][2 * i] += f * o.x;
          acc[j][2 * i + 1] += f * o.y;
        }
      }
    }
    sm.m[i] = m_all;
    sm.l[i] = lane % 4 == 0 ? total : 0.f;  // the quad's shares add up to the total
  }
}

// Split mode: merges the context splits of (row, head) entry i of a sequence into (L_C, O_C) and
// its causal splits into (L_O, O_O), then out = merge((a, O_C), (L_O, O_O)) with a = APE's
// corrected context log-mass. One warp per entry; each lane owns D/32 consecutive elements.
// o_part, lse_part, out and lse start at the sequence's partial states and rows. The partial
// states were written by other thread blocks of this launch: they are read through L2 (ld.cg),
// never from this SM's L1, which is not coherent with the other SMs' writes.
template <typename T, int D>
__device__ __forceinline__ void combine_splits(const float* o_part, const float* lse_part,
                                               T* out, float* lse,
                                               const SegmentedAttentionParams& p, size_t i,
                                               int lane) {
  constexpr int kPer = D / 32;
  const size_t n = size_t(p.n_rows) * p.n_heads;
  const int nc = int(p.n_ctx_splits);
  const int ns = nc + int(p.n_causal_splits);
  auto group_lse = [&](int s0, int s1) {
    float mx = -INFINITY;
    for (int s = s0; s < s1; ++s) mx = fmaxf(mx, __ldcg(lse_part + s * n + i));
    if (mx == -INFINITY) return -INFINITY;
    float sum = 0.f;
    for (int s = s0; s < s1; ++s) {
      const float x = __ldcg(lse_part + s * n + i);
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
    const float x = __ldcg(lse_part + s * n + i);
    if (x == -INFINITY) continue;
    const float weight = s < nc ? w.wa * expf(x - lse_c) : w.wb * expf(x - lse_o);
    if (weight == 0.f) continue;
    const float* src = o_part + (s * n + i) * D + lane * kPer;
#pragma unroll
    for (int e = 0; e < kPer; ++e) o[e] += weight * __ldcg(src + e);
  }
  T* dst = out + i * D + lane * kPer;
#pragma unroll
  for (int e = 0; e < kPer; ++e) dst[e] = from_float<T>(o[e]);
  if (lane == 0) lse[i] = w.lse;
}

// The tile shapes (TileShape in src/cuda/segmented_attention/occupancy.rs): packed query rows and
// warps per CTA, the most pipeline stages, whether every warp always takes all the rows and a
// quarter of each tile's keys (kFewRows), and whether a CTA with at most 16 rows does so
// (kSplitKeys).
struct PrefillTile {
  static constexpr int kRows = 64;
  static constexpr int kWarps = 4;
  static constexpr int kMaxStages = 2;
  static constexpr bool kFewRows = false;
  static constexpr bool kSplitKeys = true;
};
struct WideTile {
  static constexpr int kRows = 128;
  static constexpr int kWarps = 8;
  static constexpr int kMaxStages = 2;
  static constexpr bool kFewRows = false;
  static constexpr bool kSplitKeys = false;
};
struct DecodeTile {
  static constexpr int kRows = 16;
  static constexpr int kWarps = 4;
  static constexpr int kMaxStages = 4;
  static constexpr bool kFewRows = true;
  static constexpr bool kSplitKeys = true;
};

template <typename T, int D, typename Tile>
__device__ __forceinline__ void segmented_attention_body(
    const T* __restrict__ q, const SegmentDesc* __restrict__ segs,
    const float2* __restrict__ rope_cs, T* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ o_part, float* __restrict__ lse_part,
    uint32_t* __restrict__ split_counters, const SegmentedAttentionParams* __restrict__ seqs,
    const uint32_t* __restrict__ work,
    const SegmentedAttentionLaunch& launch) {
  static_assert(D == 64 || D == 128, "head dim");
  constexpr int kChunks = D / 8;
  constexpr int kNBlocksS = kBlockN / 8;  // n8 blocks of S
  constexpr int kNBlocksO = D / 8;        // n8 blocks of O
  constexpr int kKSteps = D / 16;         // k16 steps over the head dim
  constexpr int kBlockM = Tile::kRows;
  constexpr int kWarps = Tile::kWarps;
  constexpr int kThreads = kWarps * 32;
  static_assert(kBlockM == kWarps * 16 || Tile::kFewRows, "16 rows per warp");

  // Pipeline stages: K and V tiles in shared memory, copied ahead of the one being computed.
  int stages = 2;
  if constexpr (Tile::kMaxStages > 2) {
    stages = min(max(int(launch.stages), 2), Tile::kMaxStages);
  }
  const int n_slots = stages + 1;  // TileInfo slots (tile_walk.cuh)

  APE_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * D;            // [stages][kBlockN][D]
  T* sV = sK + stages * kBlockN * D;   // [stages][kBlockN][D]
  T* sQlo = sV + stages * kBlockN * D; // [kWarps * 16][D], launches with RoPE shifts only

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int kvh = blockIdx.y;

  // This CTA's sequence. Its parameters are read from shared memory where they are used, rather
  // than held in registers across the walk (the kernel sits near the register limit); so are the
  // walk's state and its tiles' descriptions (tile_walk.cuh).
  __shared__ SegmentedAttentionParams s_params;
  __shared__ WalkState s_walk;
  __shared__ TileInfo s_tiles[Tile::kMaxStages + 1];
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

  // Positions of the rows this CTA holds (for skipping and masking causal tiles).
  const uint32_t last_packed = min(m0 + kBlockM, packed_rows) - 1;
  const int q_pos_min = int(p.q_pos_offset + m0 / p.group);
  const int q_pos_max = int(p.q_pos_offset + last_packed / p.group);

  // The walker finds this CTA's first two tiles.
  const WalkParams wp{segs,      int(p.n_segments),      q_pos_min,           q_pos_max,
                      uint32_t(kvh) * D, p.n_kv_heads * D, p.ctx_scale_log2, p.causal_scale_log2};
  if (tid == 0) {
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
    s_walk.t = t_begin - 1;
    s_walk.t_end = t_end;
    s_walk.next_first = 0;
    s_walk.seg = -1;
    for (int i = 0; i < stages; ++i) walk_next<T>(s_walk, s_tiles[i], wp);
  }

  // Few rows (decode, short questions): when the CTA's rows fit one warp's 16, every warp takes
  // those rows and a quarter of each tile's keys, and the four states are merged after the walk,
  // instead of one warp computing while three only copy. Not where the walk crosses from the
  // context keys to the causal keys in whole mode: the APE correction there needs the context
  // state of all the keys.
  const bool split_keys =
      Tile::kFewRows || (Tile::kSplitKeys && packed_rows - m0 <= 16 &&
                         !(p.whole && p.n_ctx_tiles > 0 && p.n_causal_tiles > 0));
  const int row_warp = split_keys ? 0 : warp;  // the warp whose 16 rows this warp holds

  // The two rows of each thread's accumulator fragments: packed rows r and r + 8.
  int row_pos[2];
  int row_idx[2];
  int row_head[2];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t pr = m0 + row_warp * 16 + lane / 4 + i * 8;
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

  KvCopy<D, kThreads> kv;
  kv.init(tid, p.n_kv_heads * D);
  __syncthreads();  // the first `stages` tiles are described
  // The first stages - 1 tiles, one commit group each (the first with Q).
  for (int i = 0; i < stages - 1; ++i) {
    if (s_tiles[i].n > 0) {
      kv.copy(sK + i * kBlockN * D, s_tiles[i].k, s_tiles[i].n);
      kv.copy(sV + i * kBlockN * D, s_tiles[i].v, s_tiles[i].n);
    }
    cp_async_commit();
  }
  cp_async_wait_upto(stages - 2);  // Q and the first tile have landed
  __syncthreads();

  // Q fragments stay in registers for the whole walk; sQ keeps the unrotated rows, from which they
  // are reloaded when the walk enters a segment with another RoPE shift.
  uint32_t qf[kKSteps][4];
  load_a_fragments<T, D>(qf, sQ, row_warp * 16, lane);
  int q_rope_row = -1;  // the RoPE shift the fragments carry

  // Warps whose 16 rows are all padding (short questions, decode) only help load tiles.
  const bool warp_active = split_keys || m0 + warp * 16 < packed_rows;

  float acc[kNBlocksO][4];
#pragma unroll
  for (int j = 0; j < kNBlocksO; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  OnlineSoftmax sm;
  sm.init();
  bool corrected = false;  // whole mode: the context state has been turned into (a, O_C)

  // Whole mode: (L_C, O_C) -> (a, O_C) as a running state, before the first causal key.
  auto correct_context = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float l_full = sm.sum(i);
      const float a = context_log_mass(OnlineSoftmax::lse(sm.m[i], l_full), p);
      const float inv = l_full > 0.f ? 1.f / l_full : 0.f;
#pragma unroll
      for (int j = 0; j < kNBlocksO; ++j) {
        acc[j][2 * i] *= inv;
        acc[j][2 * i + 1] *= inv;
      }
      sm.m[i] = a == -INFINITY ? -INFINITY : a * kLog2e;
      // The quad's shares must sum to 1: one lane holds it.
      sm.l[i] = (a != -INFINITY && lane % 4 == 0) ? 1.f : 0.f;
    }
    corrected = true;
  };

  // This lane's ldmatrix addresses (shared window) in buffer 0's K and V tiles, for k-steps (K)
  // and d-steps (V) j < 4; step j + 4 is 128 bytes on (the swizzle flips only the low three chunk
  // bits), key block nb (K) or k-step ks (V) 16 rows on, buffer b b * kBufBytes on.
  constexpr uint32_t kBufBytes = kBlockN * D * 2;
  constexpr int kLaneSteps = kKSteps < 4 ? kKSteps : 4;
  uint32_t k_lane[kLaneSteps], v_lane[kLaneSteps];
#pragma unroll
  for (int j = 0; j < kLaneSteps; ++j) {
    const int mi = lane / 8;
    k_lane[j] = smem_addr(sK + swizzle<D>((mi / 2) * 8 + lane % 8, j * 2 + mi % 2));
    v_lane[j] = smem_addr(sV + swizzle<D>((mi % 2) * 8 + lane % 8, j * 2 + mi / 2));
  }

  uint32_t buf_bytes = 0;  // kBufBytes * the buffer being computed
  int buf = 0;
  int cur = 0;  // the slot of s_tiles describing the tile being computed
  while (s_tiles[cur].n > 0) {
    // Tile k + stages - 1 (its slot and buffer) is copied while this one, tile k, is computed;
    // its buffer is tile k - 1's, which every warp finished with before the last barrier.
    const int ahead = cur + stages - 1 >= n_slots ? cur + stages - 1 - n_slots : cur + stages - 1;
    const int fill = buf == 0 ? stages - 1 : buf - 1;
    if (s_tiles[ahead].n > 0) {
      kv.copy(sK + fill * kBlockN * D, s_tiles[ahead].k, s_tiles[ahead].n);
      kv.copy(sV + fill * kBlockN * D, s_tiles[ahead].v, s_tiles[ahead].n);
    }
    cp_async_commit();
    // The walker describes tile k + stages in the slot after it (tile k - 1's).
    if (tid == 0) walk_next<T>(s_walk, s_tiles[ahead + 1 == n_slots ? 0 : ahead + 1], wp);
    cp_async_wait_upto(stages - 1);  // tile k has landed
    __syncthreads();

    const TileInfo& tile = s_tiles[cur];
    // static-check: cold begin (once per CTA: the walk enters the causal group)
    if (p.whole && tile.causal && !corrected) correct_context();
    // static-check: cold end

    const T* k_tile = sK + buf * kBlockN * D;
    if (warp_active) {
      const int rope_row = tile.rope_row;
      // static-check: cold begin (the walk enters a segment with another RoPE shift)
      if (rope_row != q_rope_row) {  // uniform over the CTA: the tile is
        enter_shift<T, D>(qf, sQ, sQlo, rope_cs, rope_row, tile.rope_layout, row_warp, warp,
                          lane);
        q_rope_row = rope_row;
      }
      // static-check: cold end

      // S = Q K^T for this warp's 16 rows and NS * 8 of the tile's keys from key0 on, the mask,
      // the online softmax, O += P V.
      auto keys = [&](auto ns, int key0) {
        constexpr int NS = decltype(ns)::value;
        const uint32_t key_bytes = uint32_t(key0) * D * 2;
        float s[NS][4];
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
          for (int nb = 0; nb < NS / 2; ++nb) {
            uint32_t b[4];
            ldmatrix_x4_at(b, k_lane[ks % 4] + buf_bytes + key_bytes + (ks / 4) * 128 +
                                  nb * 16 * D * 2);
            mma_16816<T>(s[2 * nb], qf[ks], b[0], b[1]);
            mma_16816<T>(s[2 * nb + 1], qf[ks], b[2], b[3]);
          }
        }
        // static-check: cold begin (shifted tiles only: the rotated rows' lo part)
        if (rope_row >= 0) qk_lo_pass<T, D>(s, sQlo, k_tile + key0 * D, warp, lane);
        // static-check: cold end

        // static-check: cold begin (tail tiles and the causal diagonal)
        if (tile.need_mask) {
          mask_tile(s, tile.n - key0, tile.causal != 0, tile.pos0 + key0, row_pos, lane);
        }
        // static-check: cold end

        sm.update(s, tile.scale_log2, acc);

        // O += P V, P taken straight from the S accumulators.
#pragma unroll
        for (int ks = 0; ks < NS / 2; ++ks) {
          uint32_t a[4];
          a[0] = pack2<T>(s[2 * ks][0], s[2 * ks][1]);
          a[1] = pack2<T>(s[2 * ks][2], s[2 * ks][3]);
          a[2] = pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
          a[3] = pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
          for (int db = 0; db < D / 16; ++db) {
            uint32_t b[4];
            ldmatrix_x4_trans_at(b, v_lane[db % 4] + buf_bytes + key_bytes + (db / 4) * 128 +
                                        ks * 16 * D * 2);
            mma_16816<T>(acc[2 * db], a, b[0], b[1]);
            mma_16816<T>(acc[2 * db + 1], a, b[2], b[3]);
          }
        }
      };
      if constexpr (Tile::kFewRows) {
        // static-check: decode begin (the decode tile: every warp on a quarter of the keys)
        keys(std::integral_constant<int, kNBlocksS / kWarps>(), warp * (kBlockN / kWarps));
        // static-check: decode end
      } else if constexpr (Tile::kSplitKeys) {
        if (split_keys) {
          // static-check: decode begin (every warp on a quarter of the keys)
          keys(std::integral_constant<int, kNBlocksS / kWarps>(), warp * (kBlockN / kWarps));
          // static-check: decode end
        } else {
          // static-check: prefill begin (each warp on its own rows, every key)
          keys(std::integral_constant<int, kNBlocksS>(), 0);
          // static-check: prefill end
        }
      } else {
        // static-check: prefill begin (the wide tile: each warp on its own rows, every key)
        keys(std::integral_constant<int, kNBlocksS>(), 0);
        // static-check: prefill end
      }
    }  // warp_active

    __syncthreads();  // every warp is done with this buffer (and this slot) before they are reused
    if constexpr (Tile::kMaxStages == 2) {
      buf ^= 1;
      buf_bytes ^= kBufBytes;
    } else {
      buf = buf + 1 == stages ? 0 : buf + 1;
      buf_bytes = uint32_t(buf) * kBufBytes;
    }
    cur = cur + 1 == n_slots ? 0 : cur + 1;
  }
  cp_async_wait<0>();

  // static-check: cold begin (few rows: once per CTA)
  if constexpr (Tile::kSplitKeys) {
    if (split_keys) {
      merge_warp_states<D, kWarps>(sm, acc, reinterpret_cast<float*>(sK), warp, lane);
    }
  }
  // static-check: cold end

  if (p.whole && !corrected) correct_context();

  // Epilogue: normalise, and write either the final output or this split's partial state.
  const int col = (lane % 4) * 2;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l_full = sm.sum(i);
    const float inv = l_full > 0.f ? 1.f / l_full : 0.f;
    const float row_lse = OnlineSoftmax::lse(sm.m[i], l_full);
    if (!row_ok[i] || (split_keys && warp != 0)) continue;  // few rows: warp 0 holds the merge
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
  if (p.whole) return;

  // Split mode: the last of the tile's n_splits thread blocks to get here combines the tile's
  // (row, head) entries. Every thread's partial state is made visible device-wide before thread 0
  // counts this split in; the block that counts the last one has seen every other split's count,
  // and so (after its own fence) reads their partial states.
  __shared__ uint32_t s_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    // One counter per (query tile, KV head): the tile's split 0 thread block's place in the grid.
    uint32_t* counter = split_counters + size_t(kvh) * gridDim.x + (blockIdx.x - uint32_t(split));
    const uint32_t done = atomicAdd(counter, 1u);
    s_last = done == n_splits - 1;
    // Reset by the last split, when every split of the tile has counted itself in: the counter is
    // 0 again when the launch ends, as it was when it started, so the next launch (or the next
    // replay of a captured CUDA graph, which cannot re-zero the workspace) counts from 0 without
    // a memset. The launches on a stream run one after another, so no other launch sees it
    // midway.
    if (s_last) *counter = 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const uint32_t tile_rows = min(m0 + kBlockM, packed_rows) - m0;
  const size_t seq_rows = size_t(p.q_row0) * p.n_heads;
  for (uint32_t r = warp; r < tile_rows; r += kWarps) {
    const uint32_t pr = m0 + r;
    const size_t entry = size_t(pr / p.group) * p.n_heads + kvh * group + pr % p.group;
    combine_splits<T, D>(o_part + size_t(p.part0) * D, lse_part + p.part0, out + seq_rows * D,
                         lse + seq_rows, p, entry, lane);
  }
}

}  // namespace ape

// MIN_BLOCKS: the launch bounds' CTAs per SM, which cap the registers a thread may use (4 warps:
// 2 blocks, 255; 3, 168; 4, 128. 8 warps: 1 block, 255).
#define APE_SEGMENTED_ATTENTION(NAME, T, D, TILE, MIN_BLOCKS)                                    \
  extern "C" __global__ void __launch_bounds__(ape::TILE::kWarps * 32, MIN_BLOCKS) NAME(        \
      const T* q, const ape::SegmentDesc* segs, const float2* rope_cs, T* out, float* lse,      \
      float* o_part, float* lse_part, uint32_t* split_counters,                                  \
      const ape::SegmentedAttentionParams* seqs, const uint32_t* work,                          \
      const ape::SegmentedAttentionLaunch launch) {                                             \
    ape::segmented_attention_body<T, D, ape::TILE>(q, segs, rope_cs, out, lse, o_part,          \
                                                   lse_part, split_counters, seqs, work,        \
                                                   launch);                                     \
  }

APE_SEGMENTED_ATTENTION(segmented_attention_bf16_d64, __nv_bfloat16, 64, PrefillTile, 2)
APE_SEGMENTED_ATTENTION(segmented_attention_bf16_d128, __nv_bfloat16, 128, PrefillTile, 2)
APE_SEGMENTED_ATTENTION(segmented_attention_f16_d64, __half, 64, PrefillTile, 2)
APE_SEGMENTED_ATTENTION(segmented_attention_f16_d128, __half, 128, PrefillTile, 2)
APE_SEGMENTED_ATTENTION(segmented_attention_wide_bf16_d64, __nv_bfloat16, 64, WideTile, 1)
APE_SEGMENTED_ATTENTION(segmented_attention_wide_bf16_d128, __nv_bfloat16, 128, WideTile, 1)
APE_SEGMENTED_ATTENTION(segmented_attention_wide_f16_d64, __half, 64, WideTile, 1)
APE_SEGMENTED_ATTENTION(segmented_attention_wide_f16_d128, __half, 128, WideTile, 1)
APE_SEGMENTED_ATTENTION(segmented_attention_decode_bf16_d64, __nv_bfloat16, 64, DecodeTile, 4)
APE_SEGMENTED_ATTENTION(segmented_attention_decode_bf16_d128, __nv_bfloat16, 128, DecodeTile, 3)
APE_SEGMENTED_ATTENTION(segmented_attention_decode_f16_d64, __half, 64, DecodeTile, 4)
APE_SEGMENTED_ATTENTION(segmented_attention_decode_f16_d128, __half, 128, DecodeTile, 3)
