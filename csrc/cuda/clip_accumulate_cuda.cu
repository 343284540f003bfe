// clip_accumulate_noise on CUDA: out[k] = (sum_i c_i grads[k][i] + noise_std * z) * scale in
// one pass over the per-sample gradients.
//
// Each thread owns four consecutive output columns whose global noise indices form one Philox
// block (so it computes one Philox call per four outputs, and none when noise_std == 0). It
// loops over the B samples, reading its four columns of every row (16-byte loads when the
// rows are aligned; neighbouring threads read neighbouring columns, so reads coalesce), keeps
// the weighted sum in registers, adds noise and writes the output once. All tensors of one
// input dtype are one launch; a block finds its tensor in a small table.
// The clip factors are computed first by a tiny kernel, in double as the CPU kernel does.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "launch_plan.cuh"
#include "multi_tensor.cuh"

namespace fastdp {
namespace cuda {
namespace {

constexpr int32_t kVecIn = 1;   // every row of `in` can be read 4-wide at a group's columns
constexpr int32_t kVecOut = 2;  // `out` can be written 4-wide at a group's columns
// The output dtype is a run-time field, not a template parameter: it is only used by the final
// store, and 4x fewer kernel instantiations keep the build fast.
constexpr int kOutTypeShift = 2;
enum OutType : int32_t { kOutFloat = 0, kOutDouble = 1, kOutHalf = 2, kOutBFloat16 = 3 };

int32_t out_type_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kOutFloat;
    case at::kDouble:
      return kOutDouble;
    case at::kHalf:
      return kOutHalf;
    default:
      return kOutBFloat16;
  }
}

// Writes the four values of the group whose lane 0 is column j0 (lanes outside [0, row) are
// skipped); `vec`: the whole group exists and out + j0 is 4-element aligned.
template <typename out_t, typename acc_t>
__device__ __forceinline__ void store_group(void* out_raw, int64_t j0, int64_t row, bool vec, const acc_t (&acc)[4]) {
  out_t* out = static_cast<out_t*>(out_raw);
  if (vec) {
    Vec4<out_t> q;
#pragma unroll
    for (int l = 0; l < 4; ++l) q.v[l] = static_cast<out_t>(acc[l]);
    store4(out + j0, q);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t j = j0 + l;
      if (j >= 0 && j < row) store1(out + j, static_cast<out_t>(acc[l]));
    }
  }
}

struct ClipMeta {
  const void* in;       // [B, row], contiguous
  void* out;            // [row], contiguous
  int64_t row;          // elements per sample (= out numel)
  int64_t block0;       // Philox block of group 0: (noise index of out[0]) / 4
  int64_t groups;       // 4-column noise groups, see noise_groups()
  int64_t chunk_begin;  // first chunk (block) of this tensor within its launch, see launch_plan.cuh
  int32_t shift;        // (noise index of out[0]) % 4: group g covers columns 4g - shift ..
  int32_t flags;        // kVecIn | kVecOut, and the output dtype in bits kOutTypeShift..
};

template <typename sq_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    clip_factors_kernel(const sq_t* __restrict__ sq_norms, int64_t n, double max_norm, acc_t* __restrict__ coef) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  // Same double arithmetic as the CPU kernel; (q < 1) ? q : 1 is std::min(1.0, q), NaN included.
  const double q = max_norm / (sqrt(static_cast<double>(sq_norms[i])) + 1e-6);
  coef[i] = static_cast<acc_t>(q < 1.0 ? q : 1.0);
}

// 4 blocks of 256 threads per SM (64 registers): without the bound ptxas spilled to reach a
// higher occupancy that this streaming loop does not need.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 4)
    clip_accumulate_noise_kernel(const ClipMeta* __restrict__ meta, int n_meta, int groups_per_thread,
                                 const acc_t* __restrict__ coef, int64_t batch, double noise_std, double scale,
                                 uint64_t seed, uint64_t offset) {
  const int64_t chunk = blockIdx.x;
  const ClipMeta m = meta[find_tensor(meta, n_meta, chunk)];
  const in_t* __restrict__ in = static_cast<const in_t*>(m.in);
  const int64_t row = m.row;
  const acc_t sd = static_cast<acc_t>(noise_std);
  const acc_t sc = static_cast<acc_t>(scale);

  for (int r = 0; r < groups_per_thread; ++r) {
    const int64_t g = chunk_group(chunk, m.chunk_begin, groups_per_thread, r);
    if (g >= m.groups) break;
    const int64_t j0 = 4 * g - m.shift;  // column of lane 0 (may be < 0 in group 0)
    const bool full = j0 >= 0 && j0 + 4 <= row;
    acc_t acc[4] = {0, 0, 0, 0};

    if (full && (m.flags & kVecIn)) {
      // row % 4 == 0 and shift == 0: in + i * row + j0 is 4-element aligned for every i.
      const in_t* __restrict__ p = in + j0;
      int64_t i = 0;
      for (; i + 4 <= batch; i += 4) {
        Vec4<in_t> q[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) q[u] = load4<true>(p + (i + u) * row);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const acc_t c = coef[i + u];
#pragma unroll
          for (int l = 0; l < 4; ++l) acc[l] += c * static_cast<acc_t>(q[u].v[l]);
        }
      }
      for (; i < batch; ++i) {
        const Vec4<in_t> q = load4<true>(p + i * row);
        const acc_t c = coef[i];
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[l] += c * static_cast<acc_t>(q.v[l]);
      }
    } else if (full) {
      // Rows not 4-aligned (row % 4 != 0, or the noise blocks are shifted against the
      // columns): four scalar loads per row; the warp's loads still cover contiguous memory.
#pragma unroll 4
      for (int64_t i = 0; i < batch; ++i) {
        const in_t* __restrict__ x = in + (i * row + j0);
        const acc_t c = coef[i];
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[l] += c * static_cast<acc_t>(load1<true>(x + l));
      }
    } else {
      // First or last group of a tensor: only some of the four columns exist.
      bool valid[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) valid[l] = j0 + l >= 0 && j0 + l < row;
#pragma unroll 4
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t at = i * row + j0;
        const acc_t c = coef[i];
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          if (valid[l]) acc[l] += c * static_cast<acc_t>(load1<true>(in + (at + l)));
        }
      }
    }

    if (noise_std > 0.0) {
      float z[4];
      gaussian4(static_cast<uint64_t>(m.block0 + g), seed, offset, z);
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[l] = (acc[l] + sd * static_cast<acc_t>(z[l])) * sc;
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[l] = acc[l] * sc;
    }

    const bool vec_out = full && (m.flags & kVecOut);
    switch (m.flags >> kOutTypeShift) {
      case kOutFloat:
        store_group<float>(m.out, j0, row, vec_out, acc);
        break;
      case kOutDouble:
        store_group<double>(m.out, j0, row, vec_out, acc);
        break;
      case kOutHalf:
        store_group<at::Half>(m.out, j0, row, vec_out, acc);
        break;
      default:
        store_group<at::BFloat16>(m.out, j0, row, vec_out, acc);
        break;
    }
  }
}

// Launches the tensors of one input dtype. fp64 inputs always accumulate in fp64, so
// <double, float> is never instantiated.
template <typename in_t>
void launch_group(bool acc_double, const GroupLaunch& launch, const ClipMeta* meta, int groups_per_thread,
                  const at::Tensor& coef, int64_t batch, double noise_std, double scale, uint64_t seed, uint64_t offset,
                  cudaStream_t stream, const char* op) {
  const unsigned int blocks = grid_size(launch.chunks, op);
  if (std::is_same_v<in_t, double> || acc_double) {
    clip_accumulate_noise_kernel<in_t, double>
        <<<blocks, kThreads, 0, stream>>>(meta + launch.first_meta, launch.n_meta, groups_per_thread,
                                          coef.const_data_ptr<double>(), batch, noise_std, scale, seed, offset);
  } else if constexpr (!std::is_same_v<in_t, double>) {
    clip_accumulate_noise_kernel<in_t, float>
        <<<blocks, kThreads, 0, stream>>>(meta + launch.first_meta, launch.n_meta, groups_per_thread,
                                          coef.const_data_ptr<float>(), batch, noise_std, scale, seed, offset);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor clip_accumulate_noise_cuda(at::TensorList grads_in, const at::Tensor& sq_norms, at::TensorList out,
                                      double max_norm, double noise_std, double scale, int64_t seed, int64_t offset) {
  const char* op = "clip_accumulate_noise";
  const auto device = sq_norms.device();
  const int64_t batch = sq_norms.dim() == 1 ? sq_norms.size(0) : -1;
  check_sq_norms(sq_norms, batch, op, device);
  check_per_sample_list(grads_in, op, device, batch);
  check_outputs(grads_in, out, op, device);
  check_clip_args(max_norm, op);
  check_noise_args(noise_std, scale, offset, op);
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const bool acc_double = accumulate_dtype(grads_in) == at::kDouble || sq_norms.scalar_type() == at::kDouble;
  auto coef = at::empty({batch}, sq_norms.options().dtype(acc_double ? at::kDouble : at::kFloat));
  if (batch > 0) {
    const auto sq = sq_norms.contiguous();
    const unsigned int blocks = grid_size((batch + kThreads - 1) / kThreads, op);
    AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "clip_factors_cuda", [&] {
      if (acc_double) {
        clip_factors_kernel<scalar_t, double><<<blocks, kThreads, 0, stream>>>(
            sq.const_data_ptr<scalar_t>(), batch, max_norm, coef.mutable_data_ptr<double>());
      } else {
        clip_factors_kernel<scalar_t, float><<<blocks, kThreads, 0, stream>>>(sq.const_data_ptr<scalar_t>(), batch,
                                                                              max_norm, coef.mutable_data_ptr<float>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  std::vector<at::Tensor> grads;  // contiguous views, or copies kept alive until the launches
  grads.reserve(grads_in.size());
  for (const auto& g : grads_in) grads.push_back(g.contiguous());
  const auto base = noise_bases(out);

  // Describe every non-empty tensor, grouped by input dtype.
  const auto plan = plan_group_launches<ClipMeta>(
      grads.size(), base, device, [&](size_t k) { return grads[k].scalar_type(); },
      [&](size_t k) { return out[k].numel(); },
      [&](size_t k, int64_t block0, int64_t groups, int32_t shift) {
        const auto& g = grads[k];
        const auto& o = out[k];
        const int64_t row = o.numel();
        const void* in_ptr = g.const_data_ptr();
        void* out_ptr = o.data_ptr();
        int32_t flags = out_type_code(o.scalar_type()) << kOutTypeShift;
        if (shift == 0 && row % 4 == 0 && aligned_to(in_ptr, 4 * g.element_size())) flags |= kVecIn;
        if (shift == 0 && aligned_to(out_ptr, 4 * o.element_size())) flags |= kVecOut;
        return ClipMeta{in_ptr, out_ptr, row, block0, groups, 0, shift, flags};
      });
  if (plan.empty()) return coef;

  const auto table_dev = upload_table(plan.table, device);
  const auto* meta = reinterpret_cast<const ClipMeta*>(table_dev.const_data_ptr());
  // noise_std and scale stay double to the kernel, which casts them to its accumulation type
  // (a float scale would cost fp64 outputs 1e-8 relative error, as on the CPU).
  for (const auto& launch : plan.launches) {
    FASTDP_DISPATCH_FLOAT(launch.dtype, op, in_t, [&] {
      launch_group<in_t>(acc_double, launch, meta, plan.groups_per_thread, coef, batch, noise_std, scale,
                         static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), stream, op);
    });
  }
  return coef;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastdp, CUDA, m) { m.impl("clip_accumulate_noise", &cuda::clip_accumulate_noise_cuda); }

}  // namespace fastdp
