// per_sample_sq_norms on CPU: row-wise sums of squares, parallel over fixed-size chunks of
// each (tensor, sample) row so a few huge tensors and many tiny ones both use every core.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace fastdp {
namespace {

constexpr int64_t kNormChunk = 1 << 15;
constexpr int kLanes = 16;

struct RowChunk {
  int64_t tensor;
  int64_t sample;
  int64_t start;
  int64_t len;
};

// Sum of squares of x[0..n) in acc_t, with independent lanes so the loop vectorizes
// without reassociation flags.
template <typename scalar_t, typename acc_t>
acc_t sum_squares(const scalar_t* x, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(x[j + l]);
      lanes[l] += v * v;
    }
  }
  acc_t tail = 0;
  for (; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    tail += v * v;
  }
  acc_t total = tail;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

at::Tensor per_sample_sq_norms_cpu(at::TensorList grads_in) {
  TORCH_CHECK(!grads_in.empty(), "per_sample_sq_norms: needs at least one tensor");
  const auto device = grads_in[0].device();
  const int64_t batch = check_per_sample_list(grads_in, "per_sample_sq_norms", device, -1);
  const auto acc_dtype = accumulate_dtype(grads_in);

  std::vector<at::Tensor> grads;
  grads.reserve(grads_in.size());
  std::vector<RowChunk> chunks;
  for (size_t k = 0; k < grads_in.size(); ++k) {
    grads.push_back(grads_in[k].contiguous());
    const int64_t row = batch == 0 ? 0 : grads.back().numel() / batch;
    for (int64_t i = 0; i < batch; ++i) {
      for (int64_t s = 0; s < row; s += kNormChunk) {
        chunks.push_back({static_cast<int64_t>(k), i, s, std::min(kNormChunk, row - s)});
      }
    }
  }

  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const RowChunk& ch = chunks[c];
      const at::Tensor& g = grads[ch.tensor];
      const int64_t row = g.numel() / batch;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "per_sample_sq_norms_cpu", [&] {
        const scalar_t* x = g.const_data_ptr<scalar_t>() + ch.sample * row + ch.start;
        if (acc_dtype == at::kDouble) {
          partial[c] = sum_squares<scalar_t, double>(x, ch.len);
        } else {
          partial[c] = static_cast<double>(sum_squares<scalar_t, float>(x, ch.len));
        }
      });
    }
  });

  // Deterministic reduction in chunk order.
  auto out = at::zeros({batch}, grads_in[0].options().dtype(acc_dtype));
  if (acc_dtype == at::kDouble) {
    double* o = out.data_ptr<double>();
    for (size_t c = 0; c < chunks.size(); ++c) o[chunks[c].sample] += partial[c];
  } else {
    float* o = out.data_ptr<float>();
    for (size_t c = 0; c < chunks.size(); ++c) o[chunks[c].sample] += static_cast<float>(partial[c]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdp, CPU, m) { m.impl("per_sample_sq_norms", &per_sample_sq_norms_cpu); }

}  // namespace fastdp
