// add_noise_scale_ on CUDA: g = (g + noise_std * z) * scale in place, z from Philox(seed, offset)
// at each element's index in the concatenation of the list (row-major), as on the CPU.
//
// Each thread owns the (up to) four elements of one Philox block: one Philox call per four
// elements, 16-byte accesses where the tensor is aligned to the noise blocks. All tensors of
// one dtype are one launch; a block finds its tensor in a small table.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "launch_plan.cuh"
#include "multi_tensor.cuh"

namespace fastdp {
namespace cuda {
namespace {

struct NoiseMeta {
  void* data;  // contiguous
  int64_t numel;
  int64_t block0;       // Philox block of group 0: (noise index of data[0]) / 4
  int64_t groups;       // 4-element noise groups, see noise_groups()
  int64_t chunk_begin;  // first chunk (block) of this tensor within its launch, see launch_plan.cuh
  int32_t shift;        // (noise index of data[0]) % 4: group g covers elements 4g - shift ..
  int32_t vec;          // 1: shift == 0 and data aligned, so full groups are 4-wide accesses
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    add_noise_scale_kernel(const NoiseMeta* __restrict__ meta, int n_meta, int groups_per_thread, double noise_std,
                           double scale, uint64_t seed, uint64_t offset) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t chunk = blockIdx.x;
  const NoiseMeta m = meta[find_tensor(meta, n_meta, chunk)];
  scalar_t* __restrict__ x = static_cast<scalar_t*>(m.data);
  const acc_t sd = static_cast<acc_t>(noise_std);
  const acc_t sc = static_cast<acc_t>(scale);  // as the CPU: straight from double

  for (int r = 0; r < groups_per_thread; ++r) {
    const int64_t g = chunk_group(chunk, m.chunk_begin, groups_per_thread, r);
    if (g >= m.groups) break;
    const int64_t j0 = 4 * g - m.shift;
    const bool full = j0 >= 0 && j0 + 4 <= m.numel;
    const bool vec = full && m.vec;
    bool valid[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) valid[l] = j0 + l >= 0 && j0 + l < m.numel;

    acc_t v[4];
    if (vec) {
      const Vec4<scalar_t> q = load4<false>(x + j0);
#pragma unroll
      for (int l = 0; l < 4; ++l) v[l] = static_cast<acc_t>(q.v[l]);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) v[l] = valid[l] ? static_cast<acc_t>(load1<false>(x + j0 + l)) : acc_t(0);
    }

    if (noise_std > 0.0) {
      float z[4];
      gaussian4(static_cast<uint64_t>(m.block0 + g), seed, offset, z);
#pragma unroll
      for (int l = 0; l < 4; ++l) v[l] = (v[l] + sd * static_cast<acc_t>(z[l])) * sc;
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) v[l] = v[l] * sc;
    }

    if (vec) {
      Vec4<scalar_t> q;
#pragma unroll
      for (int l = 0; l < 4; ++l) q.v[l] = static_cast<scalar_t>(v[l]);
      store4(x + j0, q);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (valid[l]) store1(x + j0 + l, static_cast<scalar_t>(v[l]));
      }
    }
  }
}

void add_noise_scale_cuda(at::TensorList grads, double noise_std, double scale, int64_t seed, int64_t offset) {
  const char* op = "add_noise_scale_";
  check_noise_args(noise_std, scale, offset, op);
  check_noise_list(grads, op);
  if (grads.empty()) return;
  const auto device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  std::vector<at::Tensor> work;  // contiguous views, or copies written back at the end
  work.reserve(grads.size());
  for (const auto& g : grads) work.push_back(g.contiguous());
  const auto base = noise_bases(grads);

  const auto plan = plan_group_launches<NoiseMeta>(
      work.size(), base, device, [&](size_t k) { return work[k].scalar_type(); },
      [&](size_t k) { return work[k].numel(); },
      [&](size_t k, int64_t block0, int64_t groups, int32_t shift) {
        void* data = work[k].data_ptr();
        const bool vec = shift == 0 && aligned_to(data, 4 * work[k].element_size());
        return NoiseMeta{data, work[k].numel(), block0, groups, 0, shift, vec ? 1 : 0};
      });

  if (!plan.empty()) {
    const auto table_dev = upload_table(plan.table, device);
    const auto* meta = reinterpret_cast<const NoiseMeta*>(table_dev.const_data_ptr());
    for (const auto& launch : plan.launches) {
      const unsigned int blocks = grid_size(launch.chunks, op);
      FASTDP_DISPATCH_FLOAT(launch.dtype, op, scalar_t, [&] {
        add_noise_scale_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            meta + launch.first_meta, launch.n_meta, plan.groups_per_thread, noise_std, scale,
            static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }

  for (size_t k = 0; k < grads.size(); ++k) {
    if (!work[k].is_same(grads[k])) grads[k].copy_(work[k]);
  }
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastdp, CUDA, m) { m.impl("add_noise_scale_", &cuda::add_noise_scale_cuda); }

}  // namespace fastdp
