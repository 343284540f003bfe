// Launch planning of the noise kernels (add_noise_scale_, clip_accumulate_noise), in one place:
// the per-dtype tables, the groups-per-thread heuristic and the chunk boundaries.
//
// Both ops work on noise groups (noise_groups() in multi_tensor.cuh: the up to four elements
// of a tensor that share one Philox block), one group per thread per round. A call's tensors
// are described by one table (one Meta per non-empty tensor), grouped by dtype in the order
// of kLaunchDtypes, one launch per dtype present. A launch's grid is made of chunks (CUDA
// blocks) of kThreads * groups_per_thread consecutive groups of one tensor; entry t of the
// table owns chunks [chunk_begin, chunk_begin + ceil(groups / groups per chunk)) of its
// launch, which find_tensor() inverts on the device. chunk_group() is the device side of the
// same boundaries: in round r, thread x of a chunk handles group
// (chunk - chunk_begin) * kThreads * groups_per_thread + r * kThreads + x.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "multi_tensor.cuh"

namespace fastdp {
namespace cuda {

// Dtypes of the tensors of one call, in launch order.
constexpr at::ScalarType kLaunchDtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

// One launch: the tensors of one dtype, table entries [first_meta, first_meta + n_meta), in
// `chunks` CUDA blocks.
struct GroupLaunch {
  at::ScalarType dtype;
  int first_meta;
  int n_meta;
  int64_t chunks;
};

template <typename Meta>
struct GroupPlan {
  std::vector<Meta> table;            // host table; upload with upload_table()
  std::vector<GroupLaunch> launches;  // one per dtype present, in kLaunchDtypes order
  int groups_per_thread = 1;          // passed to every launch of the call
  bool empty() const { return table.empty(); }
};

// Enough blocks to fill the GPU several times over (8 per SM), as few as that allows: 8 groups
// per thread, halved (down to 1) while the call's groups would give fewer blocks.
inline int groups_per_thread_for(int64_t total_groups, const at::Device& device) {
  int groups_per_thread = 8;
  const int64_t target_blocks = 8LL * sm_count(device);
  while (groups_per_thread > 1 && total_groups < target_blocks * kThreads * groups_per_thread) groups_per_thread >>= 1;
  return groups_per_thread;
}

// Plans the launches of a call over n_tensors tensors; base[k] is tensor k's global noise
// index (noise_bases()). dtype_of(k) is the dtype tensor k is launched with, numel_of(k) its
// element count (the elements that draw noise), and make_meta(k, block0, groups, shift) its
// Meta, which must have the fields `groups` (read here) and `chunk_begin` (set here). Tensors
// without elements get no entry. sm_count() is queried only when some tensor has one.
template <typename Meta, typename DtypeOf, typename NumelOf, typename MakeMeta>
GroupPlan<Meta> plan_group_launches(size_t n_tensors, const std::vector<int64_t>& base, const at::Device& device,
                                    DtypeOf&& dtype_of, NumelOf&& numel_of, MakeMeta&& make_meta) {
  GroupPlan<Meta> plan;
  int64_t total_groups = 0;
  for (const auto dtype : kLaunchDtypes) {
    GroupLaunch launch{dtype, static_cast<int>(plan.table.size()), 0, 0};
    for (size_t k = 0; k < n_tensors; ++k) {
      if (dtype_of(k) != dtype) continue;
      const int32_t shift = static_cast<int32_t>(base[k] & 3);
      const int64_t groups = noise_groups(numel_of(k), shift);
      if (groups == 0) continue;
      plan.table.push_back(make_meta(k, base[k] >> 2, groups, shift));
      total_groups += groups;
    }
    launch.n_meta = static_cast<int>(plan.table.size()) - launch.first_meta;
    if (launch.n_meta > 0) plan.launches.push_back(launch);
  }
  if (plan.table.empty()) return plan;

  plan.groups_per_thread = groups_per_thread_for(total_groups, device);
  const int64_t groups_per_chunk = static_cast<int64_t>(kThreads) * plan.groups_per_thread;
  for (auto& launch : plan.launches) {
    for (int t = launch.first_meta; t < launch.first_meta + launch.n_meta; ++t) {
      plan.table[t].chunk_begin = launch.chunks;
      launch.chunks += (plan.table[t].groups + groups_per_chunk - 1) / groups_per_chunk;
    }
  }
  return plan;
}

// The group this thread handles in round r (0 <= r < groups_per_thread) of `chunk`, the
// chunk_begin-th .. chunk of its tensor; the caller stops at the tensor's `groups`.
__device__ __forceinline__ int64_t chunk_group(int64_t chunk, int64_t chunk_begin, int groups_per_thread, int r) {
  return (chunk - chunk_begin) * kThreads * groups_per_thread + static_cast<int64_t>(r) * kThreads + threadIdx.x;
}

}  // namespace cuda
}  // namespace fastdp
