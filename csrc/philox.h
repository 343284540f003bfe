// Counter-based Philox4x32-10 (Salmon et al., SC'11) and a branch-free Box-Muller
// transform, shared by the CPU and CUDA kernels so both draw the same Gaussian noise.
//
// Noise element e of a call with (seed, offset) is a pure function of (seed, offset, e):
//   block  = e / 4, lane = e % 4
//   philox(counter = {block_lo, block_hi, offset_lo, offset_hi}, key = {seed_lo, seed_hi})
//   lanes (0, 1) and (2, 3) are Box-Muller pairs.
// The transcendental functions are written as plain float polynomials (Cephes-style) so
// that the compiler can vectorize the CPU loops and the GPU evaluates the same arithmetic.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTDP_HD __host__ __device__ __forceinline__
#else
#define FASTDP_HD inline
#endif

namespace fastdp {

struct Philox4 {
  uint32_t x[4];
};

FASTDP_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox4x32 constants (Salmon et al.): the two round multipliers and the Weyl increments of
// the key schedule.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// One Philox4x32 round of counter (c0, c1, c2, c3) under key (k0, k1), then the key bump.
// The only copy of the round: the CUDA kernels, the scalar CPU path and the vectorized CPU
// noise fill (cpu/noise_fill_cpu.h, which calls philox4x32_10 once per loop iteration and lets
// the compiler vectorize across iterations) all run it. fastdp/reference.py is the
// independent oracle the tests compare against.
FASTDP_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t& k0, uint32_t& k1) {
  uint32_t hi0, hi1;
  const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
  const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
  k0 += kPhiloxW0;
  k1 += kPhiloxW1;
}

// Philox4x32-10 of counter {block_lo, block_hi, offset_lo, offset_hi} under key {seed_lo, seed_hi}.
FASTDP_HD Philox4 philox4x32_10(uint64_t block, uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) philox_round(c0, c1, c2, c3, k0, k1);
  Philox4 r;
  r.x[0] = c0;
  r.x[1] = c1;
  r.x[2] = c2;
  r.x[3] = c3;
  return r;
}

FASTDP_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

FASTDP_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// Uniform in (0, 1]: 24 random bits, never 0 (log(0) would be -inf).
FASTDP_HD float uniform_open0(uint32_t r) { return static_cast<float>((r >> 8) + 1u) * (1.0f / 16777216.0f); }

// Uniform in [0, 1).
FASTDP_HD float uniform_closed0(uint32_t r) { return static_cast<float>(r >> 8) * (1.0f / 16777216.0f); }

// Natural log of a normal positive float (Cephes logf polynomial, ~1 ulp on (0, 1]).
FASTDP_HD float poly_logf(float x) {
  const uint32_t bits = float_to_bits(x);
  // Split x = m * 2^e with m in [0.5, 1).
  int e = static_cast<int>((bits >> 23) & 0xFFu) - 126;
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);
  // Move m to [sqrt(0.5), sqrt(2)) so the polynomial argument stays small. Written as
  // arithmetic selects (no branches) so CPU loops over it vectorize.
  const int small = m < 0.70710678118654752f ? 1 : 0;
  e -= small;
  m = m + static_cast<float>(small) * m - 1.0f;  // 2m - 1 when small (exact: m < 1), else m - 1
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440E-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// sin and cos of 2*pi*u for u in [0, 1): quadrant reduction is exact because u has 24 bits.
FASTDP_HD void sincos_2pi(float u, float* s_out, float* c_out) {
  const float t = u * 4.0f;                                            // [0, 4)
  const int q = static_cast<int>(t + 0.5f);                            // nearest quadrant, 0..4
  const float a = (t - static_cast<float>(q)) * 1.57079632679489662f;  // [-pi/4, pi/4]
  const float a2 = a * a;
  const float s = a + a * a2 * (-1.6666654611E-1f + a2 * (8.3321608736E-3f + a2 * -1.9515295891E-4f));
  const float c =
      1.0f - 0.5f * a2 + a2 * a2 * (4.166664568298827E-2f + a2 * (-1.388731625493765E-3f + a2 * 2.443315711809948E-5f));
  const uint32_t qm = static_cast<uint32_t>(q) & 3u;
  // Rotate (sin a, cos a) by qm quarter turns: odd qm swaps sin and cos, and the signs follow
  // the quadrant. Integer masks instead of branches so the CPU loop vectorizes.
  const uint32_t swap = 0u - (qm & 1u);
  const uint32_t bs = float_to_bits(s), bc = float_to_bits(c);
  const uint32_t sin_bits = ((bs & ~swap) | (bc & swap)) ^ ((qm & 2u) << 30);
  const uint32_t cos_bits = ((bc & ~swap) | (bs & swap)) ^ (((qm + 1u) & 2u) << 30);
  const float sv = bits_to_float(sin_bits);
  const float cv = bits_to_float(cos_bits);
  *s_out = sv;
  *c_out = cv;
}

FASTDP_HD float sqrt_hd(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return __builtin_sqrtf(x);
#endif
}

// Box-Muller: two standard normal draws from two Philox words, za from the cosine and zb
// from the sine. Shared by gaussian4 and the vectorized CPU fill.
FASTDP_HD void box_muller(uint32_t ra, uint32_t rb, float* za, float* zb) {
  const float u1 = uniform_open0(ra);
  const float u2 = uniform_closed0(rb);
  const float radius = sqrt_hd(-2.0f * poly_logf(u1));
  float s, c;
  sincos_2pi(u2, &s, &c);
  *za = radius * c;
  *zb = radius * s;
}

// Four standard normal draws for noise block `block` (elements 4*block .. 4*block+3).
FASTDP_HD void gaussian4(uint64_t block, uint64_t seed, uint64_t offset, float out[4]) {
  const Philox4 r = philox4x32_10(block, seed, offset);
  box_muller(r.x[0], r.x[1], &out[0], &out[1]);
  box_muller(r.x[2], r.x[3], &out[2], &out[3]);
}

// One standard normal draw for global element index e.
FASTDP_HD float gaussian_at(uint64_t e, uint64_t seed, uint64_t offset) {
  float z[4];
  gaussian4(e >> 2, seed, offset, z);
  return z[e & 3];
}

}  // namespace fastdp
