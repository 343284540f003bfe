// Fills a buffer with the Philox Gaussian noise of global elements [first, first + n).
//
// The same functions as fastdp::gaussian4 (csrc/philox.h: philox4x32_10 and box_muller, no
// copy of either), laid out structure-of-arrays so the compiler vectorizes both the Philox
// rounds and the Box-Muller transform across blocks:
// a scalar loop over gaussian4 ran at ~60M normals/s per core here, the SoA loops at several
// times that.
#pragma once

#include <cstdint>

#include "../philox.h"

namespace fastdp {
namespace cpu {

// Largest chunk of columns one CPU task handles; a multiple of 4 (one Philox block).
constexpr int64_t kChunk = 2048;
constexpr int64_t kMaxBlocks = kChunk / 4 + 2;

struct NoiseScratch {
  uint32_t r[4][kMaxBlocks];
  float z[4][kMaxBlocks];
};

// The vectorized form is this loop, not a second Philox: each iteration runs the scalar
// fastdp::philox4x32_10 (philox.h) for one block, and with the Philox words stored
// structure-of-arrays GCC vectorizes the ten rounds across iterations (vpmuludq for the
// 32x32->64 multiplies), as fast as the hand-inlined round it replaces.
inline void philox_blocks(int64_t block0, int64_t nb, uint64_t seed, uint64_t offset, NoiseScratch& s) {
  uint32_t* __restrict r0 = s.r[0];
  uint32_t* __restrict r1 = s.r[1];
  uint32_t* __restrict r2 = s.r[2];
  uint32_t* __restrict r3 = s.r[3];
#pragma GCC ivdep
  for (int64_t b = 0; b < nb; ++b) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(block0 + b), seed, offset);
    r0[b] = r.x[0];
    r1[b] = r.x[1];
    r2[b] = r.x[2];
    r3[b] = r.x[3];
  }
}

// Box-Muller over the blocks, lanes (0, 1) and (2, 3) of each block: fastdp::box_muller, the
// function gaussian4 uses, vectorized across blocks.
inline void box_muller_blocks(int64_t nb, NoiseScratch& s) {
  for (int pair = 0; pair < 2; ++pair) {
    const uint32_t* __restrict ra = s.r[2 * pair];
    const uint32_t* __restrict rb = s.r[2 * pair + 1];
    float* __restrict za = s.z[2 * pair];
    float* __restrict zb = s.z[2 * pair + 1];
#pragma GCC ivdep
    for (int64_t b = 0; b < nb; ++b) box_muller(ra[b], rb[b], &za[b], &zb[b]);
  }
}

// z[0..n) = N(0,1) draws for global indices first..first+n-1; n <= kChunk.
inline void fill_gaussian(float* __restrict z, int64_t first, int64_t n, uint64_t seed, uint64_t offset,
                          NoiseScratch& s) {
  const int64_t block0 = first >> 2;
  const int64_t nb = ((first + n + 3) >> 2) - block0;
  philox_blocks(block0, nb, seed, offset, s);
  box_muller_blocks(nb, s);
  const int64_t lane0 = first & 3;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t e = lane0 + j;
    z[j] = s.z[e & 3][e >> 2];
  }
}

}  // namespace cpu
}  // namespace fastdp
