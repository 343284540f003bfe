// Fills a buffer with the Philox Gaussian noise of global elements [first, first + n).
//
// The same arithmetic as fastdp::gaussian4 (csrc/philox.h), laid out structure-of-arrays so
// the compiler vectorizes both the Philox rounds and the Box-Muller transform across blocks:
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

inline void philox_blocks(int64_t block0, int64_t nb, uint64_t seed, uint64_t offset, NoiseScratch& s) {
  const uint32_t c2_0 = static_cast<uint32_t>(offset), c3_0 = static_cast<uint32_t>(offset >> 32);
  const uint32_t k0_0 = static_cast<uint32_t>(seed), k1_0 = static_cast<uint32_t>(seed >> 32);
  uint32_t* __restrict r0 = s.r[0];
  uint32_t* __restrict r1 = s.r[1];
  uint32_t* __restrict r2 = s.r[2];
  uint32_t* __restrict r3 = s.r[3];
#pragma GCC ivdep
  for (int64_t b = 0; b < nb; ++b) {
    const uint64_t block = static_cast<uint64_t>(block0 + b);
    uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
    uint32_t c2 = c2_0, c3 = c3_0, k0 = k0_0, k1 = k1_0;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    r0[b] = c0;
    r1[b] = c1;
    r2[b] = c2;
    r3[b] = c3;
  }
}

inline void box_muller_blocks(int64_t nb, NoiseScratch& s) {
  for (int pair = 0; pair < 2; ++pair) {
    const uint32_t* __restrict ra = s.r[2 * pair];
    const uint32_t* __restrict rb = s.r[2 * pair + 1];
    float* __restrict za = s.z[2 * pair];
    float* __restrict zb = s.z[2 * pair + 1];
#pragma GCC ivdep
    for (int64_t b = 0; b < nb; ++b) {
      const float u1 = uniform_open0(ra[b]);
      const float u2 = uniform_closed0(rb[b]);
      const float radius = sqrt_hd(-2.0f * poly_logf(u1));
      float sn, cs;
      sincos_2pi(u2, &sn, &cs);
      za[b] = radius * cs;
      zb[b] = radius * sn;
    }
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
