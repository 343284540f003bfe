// Shared pieces of the multi-tensor CUDA kernels: the per-tensor metadata table that is
// copied to the device once per call, the chunk -> tensor lookup, aligned 4-wide vector
// access, block reductions and dtype helpers.
//
// Work layout used by every op: a call's tensors are described by one small table on the
// device (one entry per tensor, never per chunk), each entry holding the index of its first
// chunk. A block finds its tensor by binary search over those indices, so the table stays
// O(number of tensors) however large the tensors are.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastdp {
namespace cuda {

constexpr int kThreads = 256;  // threads per block for every fastdp kernel

// Four consecutive elements, aligned so that one (or, for double, two) vector memory
// instructions move them.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Raw memory access by bit pattern: one vector instruction per Vec4 (two for double), always
// in the global address space (the tensors' pointers come from a table, so the compiler
// cannot infer it, and the half/bfloat16 class wrappers would load through generic pointers
// one element at a time). kReadOnly loads take the read-only path (ld.global.nc): use it only
// for memory that no thread writes during the kernel.
template <bool kReadOnly, typename Raw>
__device__ __forceinline__ Raw load_raw(const Raw* p) {
  if constexpr (kReadOnly) {
    return __ldg(p);
  } else {
    return __ldca(p);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t bits32(T v) {
  uint32_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T>
__device__ __forceinline__ uint64_t bits64(T v) {
  uint64_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T>
__device__ __forceinline__ unsigned short bits16(T v) {
  unsigned short b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T, typename Bits>
__device__ __forceinline__ T from_bits(Bits b) {
  static_assert(sizeof(T) == sizeof(Bits), "size mismatch");
  T v;
  memcpy(&v, &b, sizeof(v));
  return v;
}

template <bool kReadOnly, typename T>
__device__ __forceinline__ Vec4<T> load4(const T* p) {
  Vec4<T> v;
  if constexpr (sizeof(T) == 2) {
    const uint2 r = load_raw<kReadOnly>(reinterpret_cast<const uint2*>(p));
    v.v[0] = from_bits<T>(static_cast<unsigned short>(r.x & 0xFFFFu));
    v.v[1] = from_bits<T>(static_cast<unsigned short>(r.x >> 16));
    v.v[2] = from_bits<T>(static_cast<unsigned short>(r.y & 0xFFFFu));
    v.v[3] = from_bits<T>(static_cast<unsigned short>(r.y >> 16));
  } else if constexpr (sizeof(T) == 4) {
    const uint4 r = load_raw<kReadOnly>(reinterpret_cast<const uint4*>(p));
    v.v[0] = from_bits<T>(r.x);
    v.v[1] = from_bits<T>(r.y);
    v.v[2] = from_bits<T>(r.z);
    v.v[3] = from_bits<T>(r.w);
  } else {
    static_assert(sizeof(T) == 8, "unsupported element size");
    const ulonglong2 r0 = load_raw<kReadOnly>(reinterpret_cast<const ulonglong2*>(p));
    const ulonglong2 r1 = load_raw<kReadOnly>(reinterpret_cast<const ulonglong2*>(p) + 1);
    v.v[0] = from_bits<T>(static_cast<uint64_t>(r0.x));
    v.v[1] = from_bits<T>(static_cast<uint64_t>(r0.y));
    v.v[2] = from_bits<T>(static_cast<uint64_t>(r1.x));
    v.v[3] = from_bits<T>(static_cast<uint64_t>(r1.y));
  }
  return v;
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const Vec4<T>& v) {
  if constexpr (sizeof(T) == 2) {
    uint2 r;
    r.x = static_cast<uint32_t>(bits16(v.v[0])) | (static_cast<uint32_t>(bits16(v.v[1])) << 16);
    r.y = static_cast<uint32_t>(bits16(v.v[2])) | (static_cast<uint32_t>(bits16(v.v[3])) << 16);
    __stwb(reinterpret_cast<uint2*>(p), r);
  } else if constexpr (sizeof(T) == 4) {
    const uint4 r = make_uint4(bits32(v.v[0]), bits32(v.v[1]), bits32(v.v[2]), bits32(v.v[3]));
    __stwb(reinterpret_cast<uint4*>(p), r);
  } else {
    static_assert(sizeof(T) == 8, "unsupported element size");
    ulonglong2 r0, r1;
    r0.x = bits64(v.v[0]);
    r0.y = bits64(v.v[1]);
    r1.x = bits64(v.v[2]);
    r1.y = bits64(v.v[3]);
    __stwb(reinterpret_cast<ulonglong2*>(p), r0);
    __stwb(reinterpret_cast<ulonglong2*>(p) + 1, r1);
  }
}

template <bool kReadOnly, typename T>
__device__ __forceinline__ T load1(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return from_bits<T>(load_raw<kReadOnly>(reinterpret_cast<const unsigned short*>(p)));
  } else {
    return load_raw<kReadOnly>(p);
  }
}

template <typename T>
__device__ __forceinline__ void store1(T* p, T v) {
  if constexpr (sizeof(T) == 2) {
    __stwb(reinterpret_cast<unsigned short*>(p), bits16(v));
  } else {
    __stwb(p, v);
  }
}

// Accumulation type of an element-wise op on one tensor: fp32 except fp64 for fp64.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Index of the entry of `meta[0..n)` that owns `chunk`: the last entry whose chunk_begin is
// <= chunk. Entries are sorted by chunk_begin and every entry owns at least one chunk.
template <typename Meta>
__device__ __forceinline__ int find_tensor(const Meta* __restrict__ meta, int n, int64_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta[mid].chunk_begin <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sum over the block of one value per thread; the result is valid in thread 0. The order of
// additions is fixed by blockDim, so the result is deterministic. `shared` holds one acc_t
// per warp.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    v = lane < warps ? shared[lane] : acc_t(0);
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  }
  return v;
}

// Noise blocks (groups of four output elements that share one Philox call) of a tensor of
// `numel` elements whose first element has global noise index `base`: group g covers the
// tensor's elements 4g - shift .. 4g - shift + 3 (those inside [0, numel)), where
// shift = base % 4, and draws Philox block base / 4 + g.
inline int64_t noise_groups(int64_t numel, int64_t shift) { return numel == 0 ? 0 : (numel + shift + 3) / 4; }

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Copies a host-side metadata table to `device` in one asynchronous copy on the current
// stream (through pinned memory; the caching host allocator keeps the staging buffer alive
// until the copy has run). Returns the device tensor that owns the table.
template <typename Meta>
at::Tensor upload_table(const std::vector<Meta>& table, const at::Device& device) {
  static_assert(std::is_trivially_copyable_v<Meta>, "metadata must be plain data");
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(Meta));
  auto host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (bytes > 0) std::memcpy(host.data_ptr(), table.data(), static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}

inline int sm_count(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count > 0 ? count : 1;
}

inline unsigned int grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()), op,
              ": the tensors are too large for one launch (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

// Dispatch on one of the four supported float dtypes, binding `T` inside `body`.
#define FASTDP_DISPATCH_FLOAT(TYPE, NAME, T, ...)               \
  [&] {                                                         \
    switch (TYPE) {                                             \
      case at::kFloat: {                                        \
        using T = float;                                        \
        return __VA_ARGS__();                                   \
      }                                                         \
      case at::kDouble: {                                       \
        using T = double;                                       \
        return __VA_ARGS__();                                   \
      }                                                         \
      case at::kHalf: {                                         \
        using T = at::Half;                                     \
        return __VA_ARGS__();                                   \
      }                                                         \
      case at::kBFloat16: {                                     \
        using T = at::BFloat16;                                 \
        return __VA_ARGS__();                                   \
      }                                                         \
      default:                                                  \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE); \
    }                                                           \
  }()

}  // namespace cuda
}  // namespace fastdp
