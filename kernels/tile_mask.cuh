// Which keys of a tile each query row sees (docs/DESIGN.md §2.1): none past the tile's valid
// keys, and for a Causal segment's keys none after the row's position.
#pragma once

#include <math.h>

namespace ape {

// Sets the logits of the keys a row does not see to -inf, in a warp's S fragments for one tile
// (the m16n8 layout: key j * 8 + 2 (lane % 4) + (e & 1) of block j; row_pos[e / 2] is the
// position of the row that element e belongs to). n: valid keys; pos0: position of key 0.
template <int NS>
__device__ __forceinline__ void mask_tile(float (&s)[NS][4], int n, bool causal, int pos0,
                                          const int (&row_pos)[2], int lane) {
#pragma unroll
  for (int j = 0; j < NS; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = j * 8 + (lane % 4) * 2 + (e & 1);
      const bool ok = key < n && (!causal || pos0 + key <= row_pos[e / 2]);
      if (!ok) s[j][e] = -INFINITY;
    }
  }
}

}  // namespace ape
