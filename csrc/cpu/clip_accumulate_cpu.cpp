// clip_accumulate_noise on CPU: out = (sum_i c_i g_i + noise_std * z) * scale in one pass
// over the per-sample gradients. Work is split into column chunks of every tensor; each task
// accumulates its chunk over all samples in a small local buffer (no [B, P] temporaries),
// adds its own slice of the counter-based noise and writes the output once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "noise_fill_cpu.h"

namespace fastdp {
namespace {

struct ColumnChunk {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

template <typename acc_t>
std::vector<acc_t> clip_factors(const at::Tensor& sq_norms, double max_norm) {
  auto sq = sq_norms.to(at::kDouble).contiguous();
  const double* s = sq.const_data_ptr<double>();
  std::vector<acc_t> c(sq.numel());
  for (int64_t i = 0; i < sq.numel(); ++i) {
    c[i] = static_cast<acc_t>(std::min(1.0, max_norm / (std::sqrt(s[i]) + 1e-6)));
  }
  return c;
}

template <typename scalar_t, typename out_t, typename acc_t>
void accumulate_chunk(const scalar_t* g, int64_t row, int64_t batch, const acc_t* coef, const ColumnChunk& ch,
                      out_t* out, int64_t noise_first, double noise_std, double scale, uint64_t seed, uint64_t offset) {
  acc_t acc[cpu::kChunk];
  float z[cpu::kChunk];
  cpu::NoiseScratch scratch;
  const int64_t n = ch.len;
  for (int64_t j = 0; j < n; ++j) acc[j] = 0;
  // Four samples per sweep: one load and store of the accumulator serves four gradient rows.
  int64_t i = 0;
  for (; i + 4 <= batch; i += 4) {
    const scalar_t* __restrict x0 = g + i * row + ch.start;
    const scalar_t* __restrict x1 = x0 + row;
    const scalar_t* __restrict x2 = x1 + row;
    const scalar_t* __restrict x3 = x2 + row;
    const acc_t c0 = coef[i], c1 = coef[i + 1], c2 = coef[i + 2], c3 = coef[i + 3];
    for (int64_t j = 0; j < n; ++j) {
      acc[j] += c0 * static_cast<acc_t>(x0[j]) + c1 * static_cast<acc_t>(x1[j]) + c2 * static_cast<acc_t>(x2[j]) +
                c3 * static_cast<acc_t>(x3[j]);
    }
  }
  for (; i < batch; ++i) {
    const scalar_t* __restrict x = g + i * row + ch.start;
    const acc_t c = coef[i];
    for (int64_t j = 0; j < n; ++j) acc[j] += c * static_cast<acc_t>(x[j]);
  }
  out_t* o = out + ch.start;
  if (noise_std > 0.0) {
    cpu::fill_gaussian(z, noise_first + ch.start, n, seed, offset, scratch);
    const acc_t sd = static_cast<acc_t>(noise_std);
    const acc_t sc = static_cast<acc_t>(scale);
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<out_t>((acc[j] + sd * static_cast<acc_t>(z[j])) * sc);
  } else {
    const acc_t sc = static_cast<acc_t>(scale);
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<out_t>(acc[j] * sc);
  }
}

at::Tensor clip_accumulate_noise_cpu(at::TensorList grads_in, const at::Tensor& sq_norms, at::TensorList out,
                                     double max_norm, double noise_std, double scale, int64_t seed, int64_t offset) {
  const char* op = "clip_accumulate_noise";
  const int64_t batch = check_clip_accumulate_inputs(grads_in, sq_norms, out, op);
  check_clip_args(max_norm, op);
  check_noise_args(noise_std, scale, offset, op);

  const bool use_double = accumulate_dtype(grads_in) == at::kDouble || sq_norms.scalar_type() == at::kDouble;
  // Only the accumulation type's clip factors are needed.
  const auto coef_f = use_double ? std::vector<float>() : clip_factors<float>(sq_norms, max_norm);
  const auto coef_d = use_double ? clip_factors<double>(sq_norms, max_norm) : std::vector<double>();

  std::vector<at::Tensor> grads;
  std::vector<ColumnChunk> chunks;
  for (size_t k = 0; k < grads_in.size(); ++k) {
    grads.push_back(grads_in[k].contiguous());
    const int64_t cols = out[k].numel();
    for (int64_t s = 0; s < cols; s += cpu::kChunk) {
      chunks.push_back({static_cast<int64_t>(k), s, std::min(cpu::kChunk, cols - s)});
    }
  }
  const auto base = noise_bases(out);

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const ColumnChunk& ch = chunks[c];
      const at::Tensor& g = grads[ch.tensor];
      const at::Tensor& o = out[ch.tensor];
      const int64_t row = o.numel();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "clip_accumulate_noise_cpu", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "clip_accumulate_noise_out", [&] {
          const in_t* gp = g.const_data_ptr<in_t>();
          scalar_t* op_ = o.data_ptr<scalar_t>();
          if (use_double) {
            accumulate_chunk<in_t, scalar_t, double>(gp, row, batch, coef_d.data(), ch, op_, base[ch.tensor], noise_std,
                                                     scale, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
          } else {
            accumulate_chunk<in_t, scalar_t, float>(gp, row, batch, coef_f.data(), ch, op_, base[ch.tensor], noise_std,
                                                    scale, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
          }
        });
      });
    }
  });

  auto coef = at::empty({batch}, sq_norms.options().dtype(use_double ? at::kDouble : at::kFloat));
  if (use_double) {
    std::copy(coef_d.begin(), coef_d.end(), coef.data_ptr<double>());
  } else {
    std::copy(coef_f.begin(), coef_f.end(), coef.data_ptr<float>());
  }
  return coef;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdp, CPU, m) { m.impl("clip_accumulate_noise", &clip_accumulate_noise_cpu); }

}  // namespace fastdp
