// Input validation shared by the CPU and CUDA implementations: every message says which
// argument is wrong and what was expected, so a user can act on it.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fastdp {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 inputs.
inline at::ScalarType accumulate_dtype(at::TensorList grads) {
  for (const auto& g : grads) {
    if (g.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// Per-sample gradient list: every tensor [B, ...] with the same B, one device, float dtype.
// Returns B.
inline int64_t check_per_sample_list(at::TensorList grads, const char* op, const at::Device& device,
                                     int64_t expected_batch /* -1: take from grads[0] */) {
  int64_t batch = expected_batch;
  for (size_t k = 0; k < grads.size(); ++k) {
    const auto& g = grads[k];
    TORCH_CHECK(g.defined(), op, ": grads[", k, "] is undefined");
    TORCH_CHECK(g.dim() >= 1, op, ": grads[", k, "] must have a leading batch dimension [B, ...], got a 0-d tensor");
    TORCH_CHECK(g.device() == device, op, ": grads[", k, "] is on ", g.device(), " but the op runs on ", device,
                "; move all tensors to one device");
    TORCH_CHECK(is_supported_float(g.scalar_type()), op, ": grads[", k, "] has dtype ", g.scalar_type(),
                "; expected float32, float64, float16 or bfloat16");
    if (batch < 0) batch = g.size(0);
    TORCH_CHECK(g.size(0) == batch, op, ": grads[", k, "] has batch size ", g.size(0), " but expected ", batch,
                " (all per-sample gradients must share the leading batch dimension)");
  }
  return batch;
}

inline void check_outputs(at::TensorList grads, at::TensorList out, const char* op, const at::Device& device) {
  TORCH_CHECK(grads.size() == out.size(), op, ": got ", grads.size(), " gradient tensors but ", out.size(),
              " output tensors; pass one output per parameter");
  for (size_t k = 0; k < out.size(); ++k) {
    const auto& o = out[k];
    TORCH_CHECK(o.defined(), op, ": out[", k, "] is undefined");
    TORCH_CHECK(o.device() == device, op, ": out[", k, "] is on ", o.device(), " but the op runs on ", device);
    TORCH_CHECK(is_supported_float(o.scalar_type()), op, ": out[", k, "] has dtype ", o.scalar_type(),
                "; expected float32, float64, float16 or bfloat16");
    TORCH_CHECK(o.is_contiguous(), op, ": out[", k, "] must be contiguous (it is written in place)");
    const auto& g = grads[k];
    TORCH_CHECK(o.sizes() == g.sizes().slice(1), op, ": out[", k, "] has shape ", o.sizes(), " but grads[", k,
                "] has per-sample shape ", g.sizes().slice(1));
  }
}

inline void check_sq_norms(const at::Tensor& sq_norms, int64_t batch, const char* op, const at::Device& device) {
  TORCH_CHECK(sq_norms.dim() == 1, op, ": sq_norms must be 1-D [B], got shape ", sq_norms.sizes());
  TORCH_CHECK(batch < 0 || sq_norms.size(0) == batch, op, ": sq_norms has ", sq_norms.size(0),
              " entries but the gradients have batch size ", batch);
  TORCH_CHECK(sq_norms.device() == device, op, ": sq_norms is on ", sq_norms.device(), " but the op runs on ", device);
  TORCH_CHECK(sq_norms.scalar_type() == at::kFloat || sq_norms.scalar_type() == at::kDouble, op,
              ": sq_norms must be float32 or float64, got ", sq_norms.scalar_type());
}

inline void check_noise_args(double noise_std, double scale, int64_t offset, const char* op) {
  TORCH_CHECK(noise_std >= 0.0 && std::isfinite(noise_std), op, ": noise_std must be finite and >= 0, got ", noise_std);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
}

inline void check_clip_args(double max_norm, const char* op) {
  TORCH_CHECK(max_norm > 0.0 && std::isfinite(max_norm), op, ": max_norm must be finite and > 0, got ", max_norm);
}

// All checks of clip_accumulate_noise's tensor arguments; returns B.
inline int64_t check_clip_accumulate_inputs(at::TensorList grads, const at::Tensor& sq_norms, at::TensorList out,
                                            const char* op) {
  const auto device = sq_norms.device();
  TORCH_CHECK(sq_norms.dim() == 1, op, ": sq_norms must be 1-D [B], got shape ", sq_norms.sizes());
  // B comes from the gradients when there are any, so a wrong sq_norms is named as such.
  const int64_t batch = check_per_sample_list(grads, op, device, grads.empty() ? sq_norms.size(0) : -1);
  check_sq_norms(sq_norms, batch, op, device);
  check_outputs(grads, out, op, device);
  return batch;
}

// add_noise_scale_'s tensor list: one device, float dtypes (any shapes).
inline void check_noise_list(at::TensorList grads, const char* op) {
  if (grads.empty()) return;
  const auto device = grads[0].device();
  for (size_t k = 0; k < grads.size(); ++k) {
    const auto& g = grads[k];
    TORCH_CHECK(g.defined(), op, ": grads[", k, "] is undefined");
    TORCH_CHECK(g.device() == device, op, ": grads[", k, "] is on ", g.device(), " but grads[0] is on ", device);
    TORCH_CHECK(is_supported_float(g.scalar_type()), op, ": grads[", k, "] has dtype ", g.scalar_type(),
                "; expected float32, float64, float16 or bfloat16");
  }
}

// Global noise index of each tensor's first element: tensors are numbered in list order.
inline std::vector<int64_t> noise_bases(at::TensorList out) {
  std::vector<int64_t> base(out.size());
  int64_t acc = 0;
  for (size_t k = 0; k < out.size(); ++k) {
    base[k] = acc;
    acc += out[k].numel();
  }
  return base;
}

}  // namespace fastdp
