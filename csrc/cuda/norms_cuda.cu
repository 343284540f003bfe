// per_sample_sq_norms on CUDA: squared L2 norm of every sample over a list of per-sample
// gradients, in two deterministic stages.
//   1. One block per (tensor, sample, segment of kNormSeg elements) chunk reduces its
//      segment to one partial sum: partials[sample, chunk].
//   2. One block per sample adds that sample's partials in a fixed order.
// No atomics, so the result is bitwise reproducible. Tensors are grouped by dtype and each
// group is one launch over all of its tensors (one launch when all share a dtype).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "multi_tensor.cuh"

namespace fastdp {
namespace cuda {
namespace {

// Elements of one sample's row that one block reduces: 16 per thread, enough work to
// amortize the block's start-up, small enough to fill the GPU for small models.
constexpr int64_t kNormSeg = 16 * kThreads;

struct NormMeta {
  const void* data;     // [B, row], contiguous
  int64_t row;          // elements per sample
  int64_t chunk_begin;  // first chunk of this tensor within its launch's chunks of one sample
  int64_t vec;          // 1: rows can be read 4 elements at a time (row % 4 == 0, data aligned)
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sq_norm_partials_kernel(const NormMeta* __restrict__ meta, int n_meta, int64_t launch_chunks, int64_t first_chunk,
                            int64_t chunks_per_sample, acc_t* __restrict__ partials) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t flat = blockIdx.x;
  const int64_t sample = flat / launch_chunks;
  const int64_t local = flat - sample * launch_chunks;
  const NormMeta m = meta[find_tensor(meta, n_meta, local)];
  const int64_t start = (local - m.chunk_begin) * kNormSeg;
  const int64_t len = m.row - start < kNormSeg ? m.row - start : kNormSeg;
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(m.data) + sample * m.row + start;

  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  if (m.vec) {
    // start and sample * row are multiples of 4, so x is aligned; len is a multiple of 4.
    const int64_t nv = len >> 2;
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
      const Vec4<scalar_t> q = load4<true>(x + 4 * v);
      const acc_t a0 = static_cast<acc_t>(q.v[0]), a1 = static_cast<acc_t>(q.v[1]);
      const acc_t a2 = static_cast<acc_t>(q.v[2]), a3 = static_cast<acc_t>(q.v[3]);
      s0 += a0 * a0;
      s1 += a1 * a1;
      s2 += a2 * a2;
      s3 += a3 * a3;
    }
  } else {
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < len; j += kThreads) {
      const acc_t a = static_cast<acc_t>(load1<true>(x + j));
      s0 += a * a;
    }
  }
  const acc_t s = block_sum<acc_t>((s0 + s1) + (s2 + s3), shared);
  if (threadIdx.x == 0) partials[sample * chunks_per_sample + first_chunk + local] = s;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const acc_t* __restrict__ partials, int64_t chunks_per_sample, acc_t* __restrict__ out) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t sample = blockIdx.x;
  const acc_t* __restrict__ p = partials + sample * chunks_per_sample;
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < chunks_per_sample; c += kThreads) s += p[c];
  s = block_sum<acc_t>(s, shared);
  if (threadIdx.x == 0) out[sample] = s;
}

template <typename scalar_t>
void launch_partials(bool acc_double, unsigned int blocks, cudaStream_t stream, const NormMeta* meta, int n_meta,
                     int64_t launch_chunks, int64_t first_chunk, int64_t chunks_per_sample, at::Tensor& partials) {
  // fp64 inputs always accumulate in fp64: <double, float> is never instantiated.
  if (std::is_same_v<scalar_t, double> || acc_double) {
    sq_norm_partials_kernel<scalar_t, double><<<blocks, kThreads, 0, stream>>>(
        meta, n_meta, launch_chunks, first_chunk, chunks_per_sample, partials.mutable_data_ptr<double>());
  } else if constexpr (!std::is_same_v<scalar_t, double>) {
    sq_norm_partials_kernel<scalar_t, float><<<blocks, kThreads, 0, stream>>>(
        meta, n_meta, launch_chunks, first_chunk, chunks_per_sample, partials.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct NormLaunch {
  at::ScalarType dtype;
  int first_meta;
  int n_meta;
  int64_t first_chunk;  // offset of this launch's chunks within one sample's chunks
  int64_t chunks;       // chunks per sample in this launch
};

at::Tensor per_sample_sq_norms_cuda(at::TensorList grads_in) {
  const char* op = "per_sample_sq_norms";
  TORCH_CHECK(!grads_in.empty(), op, ": needs at least one tensor");
  const auto device = grads_in[0].device();
  const int64_t batch = check_per_sample_list(grads_in, op, device, -1);
  const auto acc_dtype = accumulate_dtype(grads_in);
  const c10::cuda::CUDAGuard guard(device);

  auto out = at::empty({batch}, grads_in[0].options().dtype(acc_dtype));
  if (batch == 0) return out;

  std::vector<at::Tensor> grads;  // contiguous views, or copies kept alive until the launches
  grads.reserve(grads_in.size());
  for (const auto& g : grads_in) grads.push_back(g.contiguous());

  std::vector<NormMeta> table;
  std::vector<NormLaunch> launches;
  int64_t chunks_per_sample = 0;
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    NormLaunch launch{dtype, static_cast<int>(table.size()), 0, chunks_per_sample, 0};
    for (const auto& g : grads) {
      if (g.scalar_type() != dtype) continue;
      const int64_t row = g.numel() / batch;
      if (row == 0) continue;
      const void* data = g.const_data_ptr();
      const bool vec = row % 4 == 0 && aligned_to(data, 4 * g.element_size());
      table.push_back({data, row, launch.chunks, vec ? 1 : 0});
      launch.chunks += (row + kNormSeg - 1) / kNormSeg;
    }
    launch.n_meta = static_cast<int>(table.size()) - launch.first_meta;
    if (launch.chunks > 0) launches.push_back(launch);
    chunks_per_sample += launch.chunks;
  }
  if (chunks_per_sample == 0) return out.zero_();

  auto partials = at::empty({batch * chunks_per_sample}, out.options());
  const auto table_dev = upload_table(table, device);
  const auto* meta = reinterpret_cast<const NormMeta*>(table_dev.const_data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();

  for (const auto& launch : launches) {
    const unsigned int blocks = grid_size(launch.chunks * batch, op);
    FASTDP_DISPATCH_FLOAT(launch.dtype, op, scalar_t, [&] {
      launch_partials<scalar_t>(acc_dtype == at::kDouble, blocks, stream, meta + launch.first_meta, launch.n_meta,
                                launch.chunks, launch.first_chunk, chunks_per_sample, partials);
    });
  }
  const unsigned int blocks = grid_size(batch, op);
  if (acc_dtype == at::kDouble) {
    sum_partials_kernel<double><<<blocks, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), chunks_per_sample,
                                                                 out.mutable_data_ptr<double>());
  } else {
    sum_partials_kernel<float><<<blocks, kThreads, 0, stream>>>(partials.const_data_ptr<float>(), chunks_per_sample,
                                                                out.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastdp, CUDA, m) { m.impl("per_sample_sq_norms", &cuda::per_sample_sq_norms_cuda); }

}  // namespace fastdp
