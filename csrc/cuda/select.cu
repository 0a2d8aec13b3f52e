// batch_topk and threshold_select on CUDA. Reference: crossdiff_ext/ops/select.py; CPU twin: cpu/select.cpp.
//
// Scores s = f * w are ranked through the order-preserving keys of score_key.h (-0 == +0, NaN highest), ties
// to the lower flat index b * F + j. batch_topk runs entirely on the device, with no host sync:
//   1. three radix passes (11, 11, 10 bits of the key, high to low): a shared-memory histogram per block
//      (warp-aggregated atomics, so the many equal zero scores of a ReLU output do not serialise), added to a
//      global histogram; after each pass one block finds the bin that holds the need-th largest remaining key
//      and extends the prefix. A pass whose boundary bin is taken whole marks the search done and the later
//      passes return at once.
//   2. a count pass: per chunk of tiles, the entries above the boundary prefix and those equal to it;
//   3. an exclusive scan of the chunk counts (ATen cumsum), then one ordered write: block scans give every
//      entry its slot, in CSR order (row, then latent), exactly K entries; row counts by integer atomics.
// A tile is kThreads * VEC consecutive latents of one row, so latent ids are column offsets (no 64-bit
// division per element); flat offsets are 64-bit (B * F may exceed 2^32).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../score_key.h"
#include "common.cuh"

namespace crossdiff {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPasses = 3;
constexpr int kMaxBins = 1 << 11;
constexpr int kResolveThreads = 1024;  // 2 bins per thread

__host__ __device__ constexpr int digit_bits(int pass) { return pass < 2 ? 11 : 10; }
__host__ __device__ constexpr int digit_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }

// Radix state on the device: the key prefix found so far, its shift (compare key >> shift with prefix), how
// many entries of that prefix are still to take, and whether the search is done.
enum StateSlot { kPrefix = 0, kShift = 1, kNeed = 2, kDone = 3 };

template <typename scalar_t, int VEC>
struct TileScores {
  scalar_t f[VEC];
  float s[VEC];
  uint32_t key[VEC];
  bool in[VEC];
  int64_t row;
  int64_t col;  // latent of element 0 of this thread
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ f, const float* __restrict__ w, int64_t F,
                                          int64_t n_col_tiles, int64_t t, TileScores<scalar_t, VEC>& ts) {
  ts.row = t / n_col_tiles;
  ts.col = (t - ts.row * n_col_tiles) * static_cast<int64_t>(kThreads * VEC) + static_cast<int64_t>(threadIdx.x) * VEC;
  if (VEC > 1 && ts.col < F) {  // VEC > 1 only when F % VEC == 0: the whole pack is inside the row
    const Pack<scalar_t, VEC> p = load_pack<scalar_t, VEC>(f + ts.row * F + ts.col);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ts.f[v] = p.v[v];
      ts.in[v] = true;
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ts.in[v] = ts.col + v < F;
      ts.f[v] = ts.in[v] ? f[ts.row * F + ts.col + v] : scalar_t(0);
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const float wv = ts.in[v] ? __ldg(w + ts.col + v) : 0.0f;
    ts.s[v] = __fmul_rn(to_float(ts.f[v]), wv);  // the rounded product, never contracted into an FMA
    ts.key[v] = score_key(ts.s[v]);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const scalar_t* __restrict__ f, const float* __restrict__ w, const int64_t* __restrict__ state,
                     unsigned long long* __restrict__ hist, int64_t F, int64_t n_col_tiles, int64_t n_tiles, int pass) {
  __shared__ unsigned int counts[kMaxBins];
  if (state[kDone] != 0) return;  // uniform across the grid
  const int bits = digit_bits(pass), shift = digit_shift(pass), nbins = 1 << bits;
  const uint64_t prefix = static_cast<uint64_t>(state[kPrefix]);
  for (int i = threadIdx.x; i < nbins; i += kThreads) counts[i] = 0;
  __syncthreads();
  const unsigned lane = threadIdx.x & 31u;
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) {  // block-uniform trip count: warps stay converged
    TileScores<scalar_t, VEC> ts;
    load_tile(f, w, F, n_col_tiles, t, ts);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const bool take = ts.in[v] && (pass == 0 || static_cast<uint64_t>(ts.key[v] >> (shift + bits)) == prefix);
      const uint32_t d = take ? (ts.key[v] >> shift) & static_cast<uint32_t>(nbins - 1) : 0xFFFFFFFFu;
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, d);
      if (d != 0xFFFFFFFFu && lane == static_cast<unsigned>(__ffs(peers) - 1))
        atomicAdd(&counts[d], static_cast<unsigned int>(__popc(peers)));
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nbins; i += kThreads)
    if (counts[i] != 0) atomicAdd(hist + i, static_cast<unsigned long long>(counts[i]));
}

__global__ void __launch_bounds__(kResolveThreads) resolve_kernel(int64_t* state, const unsigned long long* hist, int pass) {
  using Scan = cub::BlockScan<unsigned long long, kResolveThreads>;
  __shared__ typename Scan::TempStorage temp;
  if (state[kDone] != 0) return;
  const int bits = digit_bits(pass), nbins = 1 << bits;
  const unsigned long long need = static_cast<unsigned long long>(state[kNeed]);
  const int64_t prefix = state[kPrefix];
  // Bins in descending order, two per thread: the exclusive sum is the count of entries in higher bins.
  unsigned long long count[2], above[2];
  int bin[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    bin[j] = nbins - 1 - (2 * static_cast<int>(threadIdx.x) + j);
    count[j] = bin[j] >= 0 ? hist[bin[j]] : 0ull;
  }
  Scan(temp).ExclusiveSum(count, above);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (bin[j] >= 0 && above[j] < need && above[j] + count[j] >= need) {  // exactly one bin qualifies
      const unsigned long long rest = need - above[j];
      state[kPrefix] = (prefix << bits) | bin[j];
      state[kShift] = digit_shift(pass);
      state[kNeed] = static_cast<int64_t>(rest);
      state[kDone] = (count[j] == rest || pass == kPasses - 1) ? 1 : 0;
    }
  }
}

template <typename scalar_t, int VEC, bool TOPK>
__device__ __forceinline__ void classify(const TileScores<scalar_t, VEC>& ts, uint64_t prefix, int shift, float theta,
                                         bool (&above)[VEC], bool (&tie)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (TOPK) {
      const uint64_t high = static_cast<uint64_t>(ts.key[v] >> shift);
      above[v] = ts.in[v] && high > prefix;
      tie[v] = ts.in[v] && high == prefix;
    } else {
      above[v] = ts.in[v] && !(ts.s[v] <= theta);  // a NaN score is selected (it ranks highest)
      tie[v] = false;
    }
  }
}

template <typename scalar_t, int VEC, bool TOPK>
__global__ void __launch_bounds__(kThreads)
    count_kernel(const scalar_t* __restrict__ f, const float* __restrict__ w, const int64_t* __restrict__ state,
                 int64_t* __restrict__ above_out, int64_t* __restrict__ ties_out, float theta, int64_t F,
                 int64_t n_col_tiles, int64_t n_tiles, int64_t tiles_per_chunk) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t t0 = blockIdx.x * tiles_per_chunk, t1 = min64(t0 + tiles_per_chunk, n_tiles);
  const uint64_t prefix = TOPK ? static_cast<uint64_t>(state[kPrefix]) : 0;
  const int shift = TOPK ? static_cast<int>(state[kShift]) : 0;
  long long n_above = 0, n_ties = 0;
  for (int64_t t = t0; t < t1; ++t) {
    TileScores<scalar_t, VEC> ts;
    load_tile(f, w, F, n_col_tiles, t, ts);
    bool above[VEC], tie[VEC];
    classify<scalar_t, VEC, TOPK>(ts, prefix, shift, theta, above, tie);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      n_above += above[v];
      n_ties += tie[v];
    }
  }
  n_above = Reduce(temp).Sum(n_above);
  __syncthreads();
  n_ties = Reduce(temp).Sum(n_ties);
  if (threadIdx.x == 0) {
    above_out[blockIdx.x] = n_above;
    ties_out[blockIdx.x] = n_ties;
  }
}

template <typename scalar_t, typename index_t, int VEC, bool TOPK>
__global__ void __launch_bounds__(kThreads)
    write_kernel(const scalar_t* __restrict__ f, const float* __restrict__ w, const int64_t* __restrict__ state,
                 const int64_t* __restrict__ above_before, const int64_t* __restrict__ ties_before,
                 scalar_t* __restrict__ values, index_t* __restrict__ indices, int64_t* __restrict__ row_counts,
                 float theta, int64_t F, int64_t n_col_tiles, int64_t n_tiles, int64_t tiles_per_chunk) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t chunk = blockIdx.x;
  const int64_t t0 = chunk * tiles_per_chunk, t1 = min64(t0 + tiles_per_chunk, n_tiles);
  const uint64_t prefix = TOPK ? static_cast<uint64_t>(state[kPrefix]) : 0;
  const int shift = TOPK ? static_cast<int>(state[kShift]) : 0;
  const int64_t need = TOPK ? state[kNeed] : 0;
  int64_t tie_rank = ties_before[chunk];  // boundary ties in earlier chunks (flat order)
  int64_t pos = above_before[chunk] + min64(tie_rank, need);
  for (int64_t t = t0; t < t1; ++t) {
    TileScores<scalar_t, VEC> ts;
    load_tile(f, w, F, n_col_tiles, t, ts);
    bool above[VEC], tie[VEC];
    classify<scalar_t, VEC, TOPK>(ts, prefix, shift, theta, above, tie);
    int my_ties = 0;
#pragma unroll
    for (int v = 0; v < VEC; ++v) my_ties += tie[v];
    int tie_base, tile_ties;
    Scan(temp).ExclusiveSum(my_ties, tie_base, tile_ties);
    __syncthreads();
    bool chosen[VEC];
    int my_chosen = 0;
    int64_t rank = tie_rank + tie_base;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      chosen[v] = above[v] || (tie[v] && rank < need);
      rank += tie[v];
      my_chosen += chosen[v];
    }
    int slot_base, tile_chosen;
    Scan(temp).ExclusiveSum(my_chosen, slot_base, tile_chosen);
    __syncthreads();
    int64_t slot = pos + slot_base;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (chosen[v]) {
        // batch top-k: an entry kept with a non-positive score carries 0 (SPEC: no gradient reaches it); a NaN
        // score keeps its f, so NaN reaches the output
        values[slot] = (TOPK && ts.s[v] <= 0.0f) ? scalar_t(0) : ts.f[v];
        indices[slot] = static_cast<index_t>(ts.col + v);
        ++slot;
      }
    }
    if (threadIdx.x == 0 && tile_chosen > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(row_counts + ts.row), static_cast<unsigned long long>(tile_chosen));
    pos += tile_chosen;
    tie_rank += tile_ties;
  }
}

struct Tiling {
  bool vectorized;
  int64_t n_col_tiles, n_tiles, tiles_per_chunk, n_chunks;
};

template <typename scalar_t>
Tiling make_tiling(const at::Tensor& f) {
  const int64_t B = f.size(0), F = f.size(1);
  Tiling t;
  t.vectorized = rows_vectorizable(f.data_ptr(), F, vec16<scalar_t>());
  const int64_t tile = kThreads * (t.vectorized ? vec16<scalar_t>() : 1);
  t.n_col_tiles = ceil_div(F, tile);
  t.n_tiles = B * t.n_col_tiles;
  t.tiles_per_chunk = std::max<int64_t>(1, ceil_div(t.n_tiles, 4 * static_cast<int64_t>(sm_count())));
  t.n_chunks = ceil_div(t.n_tiles, t.tiles_per_chunk);
  return t;
}

at::Tensor exclusive_scan(const at::Tensor& counts) { return counts.cumsum(0) - counts; }

// Count and write with the same tiling and classification; returns (values, indices, row_ptr).
template <typename scalar_t, int VEC, bool TOPK>
std::tuple<at::Tensor, at::Tensor, at::Tensor> compact(const at::Tensor& f, const at::Tensor& w, const at::Tensor& state,
                                                       float theta, int64_t K, const Tiling& tl) {
  const int64_t B = f.size(0), F = f.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto i64 = f.options().dtype(at::kLong);
  at::Tensor above = at::empty({tl.n_chunks}, i64), ties = at::empty({tl.n_chunks}, i64);
  count_kernel<scalar_t, VEC, TOPK><<<tl.n_chunks, kThreads, 0, stream>>>(
      f.data_ptr<scalar_t>(), w.data_ptr<float>(), state.data_ptr<int64_t>(), above.data_ptr<int64_t>(),
      ties.data_ptr<int64_t>(), theta, F, tl.n_col_tiles, tl.n_tiles, tl.tiles_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t nnz = TOPK ? K : above.sum().item<int64_t>();  // threshold: the output size needs one sync
  at::Tensor values = at::empty({nnz}, f.options());
  const bool i32 = latent_index_is_int32(F);
  at::Tensor indices = at::empty({nnz}, f.options().dtype(i32 ? at::kInt : at::kLong));
  at::Tensor row_counts = at::zeros({B + 1}, i64);
  const at::Tensor above_before = exclusive_scan(above), ties_before = exclusive_scan(ties);
  auto launch = [&](auto* index_ptr) {
    using index_t = std::remove_pointer_t<decltype(index_ptr)>;
    write_kernel<scalar_t, index_t, VEC, TOPK><<<tl.n_chunks, kThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), w.data_ptr<float>(), state.data_ptr<int64_t>(), above_before.data_ptr<int64_t>(),
        ties_before.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), index_ptr, row_counts.data_ptr<int64_t>() + 1,
        theta, F, tl.n_col_tiles, tl.n_tiles, tl.tiles_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (i32)
    launch(indices.data_ptr<int32_t>());
  else
    launch(indices.data_ptr<int64_t>());
  return {values, indices, row_counts.cumsum(0)};
}

template <typename scalar_t, int VEC>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_impl(const at::Tensor& f, const at::Tensor& w,
                                                                     int64_t K, const Tiling& tl) {
  auto stream = at::cuda::getCurrentCUDAStream();
  // (prefix, shift, need, done), filled on the device: no sync, and no copy from pageable host memory, which a
  // CUDA graph capture (torch.compile mode="reduce-overhead") refuses.
  at::Tensor state = at::zeros({4}, f.options().dtype(at::kLong));
  state.select(0, kShift).fill_(32);
  state.select(0, kNeed).fill_(K);
  at::Tensor hist = at::zeros({kPasses, kMaxBins}, f.options().dtype(at::kLong));
  auto* hp = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  for (int pass = 0; pass < kPasses; ++pass) {
    histogram_kernel<scalar_t, VEC><<<tl.n_chunks, kThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), w.data_ptr<float>(), state.data_ptr<int64_t>(), hp + pass * kMaxBins, f.size(1),
        tl.n_col_tiles, tl.n_tiles, pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    resolve_kernel<<<1, kResolveThreads, 0, stream>>>(state.data_ptr<int64_t>(), hp + pass * kMaxBins, pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto [values, indices, row_ptr] = compact<scalar_t, VEC, true>(f, w, state, 0.0f, K, tl);
  // The smallest selected positive score: a K-sized reduction over the kept entries (the kernel's exact s).
  const at::Tensor scores = values.to(at::kFloat) * w.index_select(0, indices);
  const at::Tensor inf = at::full({}, std::numeric_limits<float>::infinity(), scores.options());
  at::Tensor min_score = at::where(scores > 0, scores, inf).min();
  return {values, indices, row_ptr, min_score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_topk_cuda(const at::Tensor& f_in, const at::Tensor& w_in,
                                                                           int64_t K) {
  check_batch_topk(f_in, w_in, K);
  const c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous(), w = w_in.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  CROSSDIFF_DISPATCH_FLOATS(f.scalar_type(), "batch_topk_cuda", [&] {
    const Tiling tl = make_tiling<scalar_t>(f);
    out = tl.vectorized ? topk_impl<scalar_t, vec16<scalar_t>()>(f, w, K, tl) : topk_impl<scalar_t, 1>(f, w, K, tl);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_select_cuda(const at::Tensor& f_in, const at::Tensor& w_in,
                                                                     double theta) {
  check_selection(f_in, w_in);
  check_threshold(theta);
  const c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous(), w = w_in.contiguous();
  const int64_t B = f.size(0), F = f.size(1);
  if (B * F == 0) {
    return {at::empty({0}, f.options()), at::empty({0}, f.options().dtype(latent_index_is_int32(F) ? at::kInt : at::kLong)),
            at::zeros({B + 1}, f.options().dtype(at::kLong))};
  }
  const at::Tensor unused_state = at::zeros({4}, f.options().dtype(at::kLong));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  CROSSDIFF_DISPATCH_FLOATS(f.scalar_type(), "threshold_select_cuda", [&] {
    const Tiling tl = make_tiling<scalar_t>(f);
    const float th = static_cast<float>(theta);
    out = tl.vectorized ? compact<scalar_t, vec16<scalar_t>(), false>(f, w, unused_state, th, 0, tl)
                        : compact<scalar_t, 1, false>(f, w, unused_state, th, 0, tl);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossdiff, CUDA, m) {
  m.impl("batch_topk", &batch_topk_cuda);
  m.impl("threshold_select", &threshold_select_cuda);
}

}  // namespace cuda
}  // namespace crossdiff
