// Sparse decoder and its sparse backward on CUDA, for all M models at once (rows of W are D = M * d wide).
// Reference: crossdiff_ext/ops/sparse.py; CPU twin: cpu/sparse.cpp.
//
// Every sum runs in fp32 in a fixed order (no float atomics), so results are deterministic:
//   sparse_decode       one block per (row, column span): the row's entries are staged in shared memory, each
//                       thread accumulates VEC columns over them in CSR order with 16-byte loads of W, issuing a
//                       group of loads (gather_unroll) before the group's FMAs so that several are in flight.
//   sparse_values_grad  one warp per entry: strided 16-byte loads of grad_out[row] and W[latent], dot_unroll steps
//                       loaded at once, a fixed shuffle tree; the row of an entry is a binary search in row_ptr.
//   latent_order        not here: a stable radix sort of the latent ids (torch.sort), registered for CUDA from
//                       Python (crossdiff_ext/ops/sparse.py, latent_order_by_sort).
//   sparse_weight_grad  one block per (latent, column span): value * dense[row] summed over the latent's
//                       entries in row order with the decoder's grouped gathers; column span 0 also writes the value
//                       sums (bias gradient).
// The kernels trust indices and row_ptr (range and order are checked by the CPU kernels and by the tests);
// codes produced by batch_topk / threshold_select satisfy them by construction.
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "common.cuh"

namespace crossdiff {
namespace cuda {
namespace {

constexpr int kStage = 128;  // entries staged in shared memory per step

// Threads per block for rows of D elements read VEC at a time: one column span per block when it fits.
inline int row_threads(int64_t D, int vec) {
  const int64_t packs = ceil_div(D, vec);
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, ceil_div(packs, 32) * 32)));
}

// Loads a thread keeps in flight in the gathers: a gathered row is a dependent load, and one load at a time
// leaves the thread waiting a full memory latency per entry. A 16-byte pack of a half type unpacks into 8 fp32
// registers, so those take 4 packs: 6 or 8 spill under a 64-register cap (ptxas -v, sm_90a).
template <int VEC>
constexpr int gather_unroll() {
  return VEC >= 8 ? 4 : 8;
}
// Steps of the per-entry dot products loaded at once (two loads each), with the same register reasoning.
template <int VEC>
constexpr int dot_unroll() {
  return VEC >= 8 ? 2 : 4;
}

// acc[v] += weight[i] * base[row[i] * D + v] for i = 0, 1, ..., n - 1 in that order (the fp32 order of every
// output element is the entry order, whatever the unroll). The gather_unroll loads of a group are issued before
// its FMAs; the last group is predicated, so a short list (a latent's few entries) is one group of loads.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void gather_fma(const float* weight, const int64_t* row, int n,
                                           const scalar_t* __restrict__ base, int64_t D, float (&acc)[VEC]) {
  constexpr int U = gather_unroll<VEC>();
  for (int i = 0; i < n; i += U) {
    const int here = n - i;
    Pack<scalar_t, VEC> p[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < here) p[u] = load_pack<scalar_t, VEC>(base + row[i + u] * D);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < here) {
        const float w = weight[i + u];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w, to_float(p[u].v[v]), acc[v]);
      }
    }
  }
}

// At most 56 registers: a block is up to 1024 threads (row_threads), and the paper's bf16 row (4608 columns, 576
// threads) then fits twice per SM (at 64, once).
constexpr int kGatherRegisters = 56;

template <typename scalar_t, typename index_t, int VEC>
__global__ void __maxnreg__(kGatherRegisters)
decode_kernel(const scalar_t* __restrict__ values, const index_t* __restrict__ indices,
              const int64_t* __restrict__ row_ptr, const scalar_t* __restrict__ W,
              const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t D) {
  __shared__ float stage_v[kStage];
  __shared__ int64_t stage_j[kStage];
  const int64_t row = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool live = c < D;
  const int64_t start = row_ptr[row], end = row_ptr[row + 1];
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.0f;
  for (int64_t s = start; s < end; s += kStage) {
    const int n = static_cast<int>(min64(kStage, end - s));
    __syncthreads();  // the previous stage is consumed
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      stage_v[i] = to_float(values[s + i]);
      stage_j[i] = static_cast<int64_t>(indices[s + i]);
    }
    __syncthreads();
    if (live) gather_fma<scalar_t, VEC>(stage_v, stage_j, n, W + c, D, acc);
  }
  if (live) {
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int v = 0; v < VEC; ++v) o.v[v] = from_float<scalar_t>(bias ? acc[v] + to_float(bias[c + v]) : acc[v]);
    store_pack<scalar_t, VEC>(out + row * D + c, o);
  }
}

// The row b with row_ptr[b] <= e < row_ptr[b + 1] (empty rows never qualify).
__device__ __forceinline__ int64_t row_of(const int64_t* __restrict__ row_ptr, int64_t B, int64_t e) {
  int64_t lo = 0, hi = B;  // row_ptr[lo] <= e < row_ptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (row_ptr[mid] <= e)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(256)
values_grad_kernel(const scalar_t* __restrict__ grad_out, const index_t* __restrict__ indices,
                   const int64_t* __restrict__ row_ptr, int64_t B, const scalar_t* __restrict__ W,
                   scalar_t* __restrict__ out, int64_t nnz, int64_t D) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (e >= nnz) return;  // uniform per warp
  const scalar_t* g = grad_out + row_of(row_ptr, B, e) * D;
  const scalar_t* wr = W + static_cast<int64_t>(indices[e]) * D;
  float acc = 0.0f;
  // dot_unroll steps of both rows are loaded before their FMAs; each lane still sums its columns in ascending
  // order, so the result does not depend on the unroll.
  constexpr int64_t kStep = 32 * VEC;
  constexpr int kDotUnroll = dot_unroll<VEC>();
  for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < D; c0 += kStep * kDotUnroll) {
    Pack<scalar_t, VEC> a[kDotUnroll], b[kDotUnroll];
#pragma unroll
    for (int u = 0; u < kDotUnroll; ++u) {
      if (c0 + u * kStep < D) {
        b[u] = load_pack<scalar_t, VEC>(wr + c0 + u * kStep);
        a[u] = load_pack<scalar_t, VEC>(g + c0 + u * kStep);
      }
    }
#pragma unroll
    for (int u = 0; u < kDotUnroll; ++u) {
      if (c0 + u * kStep < D) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc = fmaf(to_float(a[u].v[v]), to_float(b[u].v[v]), acc);
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
  if (lane == 0) out[e] = from_float<scalar_t>(acc);
}

template <typename scalar_t, int VEC>
__global__ void __maxnreg__(kGatherRegisters)
weight_grad_kernel(const scalar_t* __restrict__ values, const scalar_t* __restrict__ dense,
                   const int64_t* __restrict__ col_ptr, const int64_t* __restrict__ perm,
                   const int64_t* __restrict__ rows, scalar_t* __restrict__ grad,
                   float* __restrict__ sums, int64_t D) {
  __shared__ float stage_v[kStage];
  __shared__ int64_t stage_r[kStage];
  const int64_t latent = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool live = c < D;
  const bool sums_here = blockIdx.y == 0 && threadIdx.x == 0;
  const int64_t start = col_ptr[latent], end = col_ptr[latent + 1];
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.0f;
  float total = 0.0f;
  for (int64_t s = start; s < end; s += kStage) {
    const int n = static_cast<int>(min64(kStage, end - s));
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      stage_v[i] = to_float(values[perm[s + i]]);
      stage_r[i] = rows[s + i];
    }
    __syncthreads();
    if (live) gather_fma<scalar_t, VEC>(stage_v, stage_r, n, dense + c, D, acc);
    if (sums_here)
      for (int i = 0; i < n; ++i) total += stage_v[i];
  }
  if (live) {
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int v = 0; v < VEC; ++v) o.v[v] = from_float<scalar_t>(acc[v]);
    store_pack<scalar_t, VEC>(grad + latent * D + c, o);
  }
  if (sums_here) sums[latent] = total;
}

// Calls fn with std::integral_constant<int, VEC>: the 16-byte width V when `vec`, else 1.
template <int V, typename Fn>
void with_vec(bool vec, Fn&& fn) {
  if (vec)
    fn(std::integral_constant<int, V>{});
  else
    fn(std::integral_constant<int, 1>{});
}

// Calls fn with an index pointer of the indices tensor's type.
template <typename Fn>
void with_index_ptr(const at::Tensor& indices, Fn&& fn) {
  if (indices.scalar_type() == at::kInt)
    fn(indices.data_ptr<int32_t>());
  else
    fn(indices.data_ptr<int64_t>());
}

at::Tensor sparse_decode_cuda(const at::Tensor& values_in, const at::Tensor& indices_in, const at::Tensor& row_ptr_in,
                              const at::Tensor& W_in, const c10::optional<at::Tensor>& bias_in) {
  check_sparse_decode(values_in, indices_in, row_ptr_in, W_in, bias_in);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const at::Tensor W = W_in.contiguous(), values = values_in.contiguous(), indices = indices_in.contiguous(),
                   row_ptr = row_ptr_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t B = row_ptr.size(0) - 1, D = W.size(1) * W.size(2);
  at::Tensor out = at::empty({B, W.size(1), W.size(2)}, W.options());
  if (B == 0 || D == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  CROSSDIFF_DISPATCH_FLOATS(W.scalar_type(), "sparse_decode_cuda", [&] {
    constexpr int V = vec16<scalar_t>();
    const bool vec = rows_vectorizable(W.data_ptr(), D, V) && rows_vectorizable(out.data_ptr(), D, V) &&
                     (!bias.defined() || reinterpret_cast<uintptr_t>(bias.data_ptr()) % 16 == 0);
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    with_index_ptr(indices, [&](auto* ip) {
      using index_t = std::remove_pointer_t<decltype(ip)>;
      auto launch = [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        const int threads = row_threads(D, VEC);
        const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(ceil_div(ceil_div(D, VEC), threads)));
        decode_kernel<scalar_t, index_t, VEC><<<grid, threads, 0, stream>>>(
            values.data_ptr<scalar_t>(), ip, row_ptr.data_ptr<int64_t>(), W.data_ptr<scalar_t>(), bp,
            out.data_ptr<scalar_t>(), D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      with_vec<V>(vec, launch);
    });
  });
  return out;
}

at::Tensor sparse_values_grad_cuda(const at::Tensor& grad_in, const at::Tensor& indices_in, const at::Tensor& row_ptr_in,
                                   const at::Tensor& W_in) {
  check_sparse_values_grad(grad_in, indices_in, row_ptr_in, W_in);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const at::Tensor W = W_in.contiguous(), grad = grad_in.contiguous(), indices = indices_in.contiguous(),
                   row_ptr = row_ptr_in.contiguous();
  const int64_t B = row_ptr.size(0) - 1, nnz = indices.size(0), D = W.size(1) * W.size(2);
  at::Tensor out = at::empty({nnz}, W.options());
  if (nnz == 0) return out;
  if (D == 0) return out.zero_();
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int kWarpsPerBlock = 8;
  TORCH_CHECK(ceil_div(nnz, kWarpsPerBlock) <= std::numeric_limits<int32_t>::max(), "sparse_values_grad: nnz = ", nnz,
              " exceeds the grid limit");
  CROSSDIFF_DISPATCH_FLOATS(W.scalar_type(), "sparse_values_grad_cuda", [&] {
    constexpr int V = vec16<scalar_t>();
    const bool vec = rows_vectorizable(W.data_ptr(), D, V) && rows_vectorizable(grad.data_ptr(), D, V);
    with_index_ptr(indices, [&](auto* ip) {
      using index_t = std::remove_pointer_t<decltype(ip)>;
      auto launch = [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        values_grad_kernel<scalar_t, index_t, VEC><<<ceil_div(nnz, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
            grad.data_ptr<scalar_t>(), ip, row_ptr.data_ptr<int64_t>(), B, W.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(), nnz, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      with_vec<V>(vec, launch);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_weight_grad_cuda(const at::Tensor& values_in, const at::Tensor& dense_in,
                                                           const at::Tensor& col_ptr_in, const at::Tensor& perm_in,
                                                           const at::Tensor& rows_in) {
  check_sparse_weight_grad(values_in, dense_in, col_ptr_in, perm_in, rows_in);
  const c10::cuda::CUDAGuard guard(dense_in.device());
  const at::Tensor values = values_in.contiguous(), dense = dense_in.contiguous(), col_ptr = col_ptr_in.contiguous(),
                   perm = perm_in.contiguous(), rows = rows_in.contiguous();
  const int64_t F = col_ptr.size(0) - 1, D = dense.size(1) * dense.size(2);
  at::Tensor grad = at::empty({F, dense.size(1), dense.size(2)}, dense.options());
  at::Tensor sums = at::empty({F}, dense.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  CROSSDIFF_DISPATCH_FLOATS(dense.scalar_type(), "sparse_weight_grad_cuda", [&] {
    constexpr int V = vec16<scalar_t>();
    const bool vec = rows_vectorizable(dense.data_ptr(), D, V) && rows_vectorizable(grad.data_ptr(), D, V);
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int threads = row_threads(std::max<int64_t>(D, 1), VEC);
      const dim3 grid(static_cast<unsigned>(F), static_cast<unsigned>(std::max<int64_t>(1, ceil_div(ceil_div(D, VEC), threads))));
      weight_grad_kernel<scalar_t, VEC><<<grid, threads, 0, stream>>>(
          values.data_ptr<scalar_t>(), dense.data_ptr<scalar_t>(), col_ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
          rows.data_ptr<int64_t>(), grad.data_ptr<scalar_t>(), sums.data_ptr<float>(), D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_vec<V>(vec, launch);
  });
  return {grad, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(crossdiff, CUDA, m) {
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_values_grad", &sparse_values_grad_cuda);
  m.impl("sparse_weight_grad", &sparse_weight_grad_cuda);
}

}  // namespace cuda
}  // namespace crossdiff
