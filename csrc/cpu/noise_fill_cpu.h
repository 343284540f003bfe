// Fills a buffer with the Philox Gaussian noise of global elements [first, first + n).
#pragma once

#include <cstdint>

#include "../philox.h"

namespace fastdp {
namespace cpu {

// Largest chunk of columns one CPU task handles; a multiple of 4 (one Philox block).
constexpr int64_t kChunk = 2048;

// z[0..n) = N(0,1) draws for global indices first..first+n-1; n <= kChunk.
// `scratch` must hold kChunk + 8 floats.
inline void fill_gaussian(float* z, int64_t first, int64_t n, uint64_t seed, uint64_t offset, float* scratch) {
  const int64_t block0 = first >> 2;
  const int64_t block1 = (first + n + 3) >> 2;
  for (int64_t b = block0; b < block1; ++b) {
    gaussian4(static_cast<uint64_t>(b), seed, offset, scratch + 4 * (b - block0));
  }
  const float* src = scratch + (first & 3);
  for (int64_t j = 0; j < n; ++j) z[j] = src[j];
}

}  // namespace cpu
}  // namespace fastdp
