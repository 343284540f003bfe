// add_noise_scale_ on CPU: g = (g + noise_std * z) * scale in place, z from Philox(seed, offset)
// indexed by each element's position in the concatenation of the list (row-major).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "noise_fill_cpu.h"

namespace fastdp {
namespace {

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

void add_noise_scale_cpu(at::TensorList grads, double noise_std, double scale, int64_t seed, int64_t offset) {
  const char* op = "add_noise_scale_";
  check_noise_args(noise_std, scale, offset, op);
  check_noise_list(grads, op);
  std::vector<at::Tensor> work;  // contiguous views (or copies written back at the end)
  std::vector<Chunk> chunks;
  for (size_t k = 0; k < grads.size(); ++k) {
    const auto& g = grads[k];
    work.push_back(g.contiguous());
    for (int64_t s = 0; s < g.numel(); s += cpu::kChunk) {
      chunks.push_back({static_cast<int64_t>(k), s, std::min(cpu::kChunk, g.numel() - s)});
    }
  }
  const auto base = noise_bases(grads);
  const float sd = static_cast<float>(noise_std);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    float z[cpu::kChunk];
    cpu::NoiseScratch scratch;
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      at::Tensor& g = work[ch.tensor];
      if (sd > 0.0f) {
        cpu::fill_gaussian(z, base[ch.tensor] + ch.start, ch.len, static_cast<uint64_t>(seed),
                           static_cast<uint64_t>(offset), scratch);
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_noise_scale_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* x = g.data_ptr<scalar_t>() + ch.start;
        const acc_t s = static_cast<acc_t>(scale);
        if (sd > 0.0f) {
          const acc_t sdv = static_cast<acc_t>(noise_std);
          for (int64_t j = 0; j < ch.len; ++j) {
            x[j] = static_cast<scalar_t>((static_cast<acc_t>(x[j]) + sdv * static_cast<acc_t>(z[j])) * s);
          }
        } else {
          for (int64_t j = 0; j < ch.len; ++j) x[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * s);
        }
      });
    }
  });
  for (size_t k = 0; k < grads.size(); ++k) {
    if (!work[k].is_same(grads[k])) const_cast<at::Tensor&>(grads[k]).copy_(work[k]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdp, CPU, m) { m.impl("add_noise_scale_", &add_noise_scale_cpu); }

}  // namespace fastdp
