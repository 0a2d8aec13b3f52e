// batch_topk and threshold_select on CUDA. Reference: crossdiff_ext/ops/select.py; CPU twin: cpu/select.cpp.
//
// Scores s = f * w are ranked through the order-preserving keys of score_key.h (-0 == +0, NaN highest), ties
// to the lower flat index b * F + j. batch_topk runs entirely on the device, with no host sync, and reads f twice
// in the usual case:
//   1. level loop over f (11, 11, 10 bits of the key, high to low; usually level 0 only): a block owns a slab of
//      kThreads * VEC latents and a run of rows, keeps w[slab] in registers and counts the digits of the keys in
//      the current range [lo, hi] in a shared-memory histogram (warp-aggregated atomics, so the many equal zero
//      scores of a ReLU output do not serialise), added to a global one. One block then finds the bin holding
//      the boundary (the K-th largest key) and narrows [lo, hi] to it. As soon as the entries with key >= lo fit
//      the staging buffer (CAP entries) the loop stops.
//   2. stage (second pass over f): per tile (one row of one slab) the entries with key >= lo, in column order,
//      at slots reserved by one atomic per tile; a tile table records where each tile's entries went. The order
//      of tiles in the buffer depends on scheduling; the result does not, since every later step walks the
//      tiles in flat order through the table.
//   3. the remaining digit levels over the staged keys only, until [lo, hi] is one key or is taken whole;
//   4. per-tile counts (entries above the range, entries in it), exclusive scans of the tile table in flat
//      order, and the ordered write from the buffer: exactly K entries in CSR order (row, then latent).
// When more than CAP entries share the boundary range (massive exact ties, or a range taken whole that is too
// big), the level loop ends in mode "ties": a count and an ordered write over f (two more passes) decide
// instead. Both paths are always launched; the kernels of the path not taken return at once (the mode lives on
// the device), which keeps the op CUDA-graph capturable.
//
// The algorithm between barriers is in ../select_phases.h; cpu/cuda_select_emulation.cpp runs these kernels'
// phases on the CPU with the same geometry, and the tests compare it with the reference there.
// Flat offsets are 64-bit (B * F may exceed 2^32); latent ids are column offsets within a slab.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "../checks.h"
#include "../score_key.h"
#include "../select_phases.h"
#include "common.cuh"

namespace crossdiff {
namespace cuda {
namespace {

using namespace select_phases;

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Adds 1 to counts[d] for every lane of the warp (kNoDigit: nothing): one shared atomic per distinct digit.
__device__ __forceinline__ void warp_count(unsigned int* counts, uint32_t d, unsigned lane) {
  const unsigned peers = __match_any_sync(kFullMask, d);
  if (d != kNoDigit && lane == static_cast<unsigned>(__ffs(peers) - 1))
    atomicAdd(&counts[d], static_cast<unsigned int>(__popc(peers)));
}

__device__ __forceinline__ void clear_bins(unsigned int* counts, int nbins) {
  for (int i = threadIdx.x; i < nbins; i += kThreads) counts[i] = 0;
}

__device__ __forceinline__ void flush_bins(const unsigned int* counts, unsigned long long* hist, int nbins) {
  for (int i = threadIdx.x; i < nbins; i += kThreads)
    if (counts[i] != 0) atomicAdd(hist + i, static_cast<unsigned long long>(counts[i]));
}

__global__ void init_state_kernel(int64_t* state, int64_t K, int64_t N) { init_state(state, K, N); }

// Level `level` of the loop over f.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const scalar_t* __restrict__ f, const float* __restrict__ w, const int64_t* __restrict__ state,
                     unsigned long long* __restrict__ hist, Geometry g, int level) {
  __shared__ unsigned int counts[kMaxBins];
  if (!level_active(state, level, false)) return;  // uniform across the grid
  const uint32_t lo = static_cast<uint32_t>(state[kLo]), hi = static_cast<uint32_t>(state[kHi]);
  const int nbins = 1 << digit_bits(level);
  clear_bins(counts, nbins);
  __syncthreads();
  const int64_t col0 = thread_col0(blockIdx.x, threadIdx.x, g);
  float wr[VEC];
  bool in[VEC];
  load_weights<VEC>(w, g, col0, wr, in);
  const unsigned lane = threadIdx.x & 31u;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * g.rows_per_block, r1 = min64(g.B, r0 + g.rows_per_block);
  for (int64_t r = r0; r < r1; r += kRowUnroll) {  // block-uniform trip count: warps stay converged
    scalar_t fv[kRowUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) load_row<scalar_t, VEC>(f, g, r + u, r + u < r1, col0, fv[u]);
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      uint32_t d[VEC];
      row_digits<scalar_t, VEC>(fv[u], wr, in, r + u < r1, lo, hi, level, d);
#pragma unroll
      for (int v = 0; v < VEC; ++v) warp_count(counts, d[v], lane);
    }
  }
  __syncthreads();
  flush_bins(counts, hist, nbins);
}

// Level `level` over the staging buffer's keys.
__global__ void __launch_bounds__(kThreads)
    staged_histogram_kernel(const uint32_t* __restrict__ skey, const int64_t* __restrict__ state,
                            unsigned long long* __restrict__ hist, int level) {
  __shared__ unsigned int counts[kMaxBins];
  if (!level_active(state, level, true)) return;
  const uint32_t lo = static_cast<uint32_t>(state[kLo]), hi = static_cast<uint32_t>(state[kHi]);
  const int64_t n = state[kStageCount];
  const int nbins = 1 << digit_bits(level);
  clear_bins(counts, nbins);
  __syncthreads();
  const unsigned lane = threadIdx.x & 31u;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    warp_count(counts, digit_of(i < n ? skey[i] : 0u, i < n, lo, hi, level), lane);
  }
  __syncthreads();
  flush_bins(counts, hist, nbins);
}

__global__ void __launch_bounds__(kResolveThreads)
    resolve_kernel(int64_t* state, const unsigned long long* hist, int level, bool staged, int64_t cap) {
  using Scan = cub::BlockScan<unsigned long long, kResolveThreads>;
  __shared__ typename Scan::TempStorage temp;
  if (!level_active(state, level, staged)) return;
  const int64_t need = state[kNeed];
  unsigned long long count[kResolveItems], above[kResolveItems];
  int bin[kResolveItems];
#pragma unroll
  for (int j = 0; j < kResolveItems; ++j) {
    bin[j] = resolve_bin(threadIdx.x, j, level);
    count[j] = bin[j] >= 0 ? hist[bin[j]] : 0ull;
  }
  Scan(temp).ExclusiveSum(count, above);  // every thread has read the state before the one writer runs
#pragma unroll
  for (int j = 0; j < kResolveItems; ++j)
    if (is_boundary_bin(bin[j], count[j], above[j], need)) apply_boundary(state, level, staged, bin[j], count[j], above[j], cap);
}

// Second pass over f: the entries with key >= lo into the staging buffer, one tile (row x slab) at a time.
// At least 4 resident blocks: with 8-element packs the compiler otherwise takes 80 registers (3 blocks per SM)
// and fewer loads of f are in flight; 64 registers hold the two rows without spilling (cuobjdump, sm_90a).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, 4)
    stage_kernel(const scalar_t* __restrict__ f, const float* __restrict__ w, int64_t* __restrict__ state,
                 uint32_t* __restrict__ skey, uint16_t* __restrict__ scol, scalar_t* __restrict__ sval,
                 int64_t* __restrict__ tile_base, int64_t* __restrict__ tile_count, Geometry g) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int64_t base_shared;
  if (state[kMode] != kModeStaged) return;
  const uint32_t lo = static_cast<uint32_t>(state[kLo]);
  const int64_t col0 = thread_col0(blockIdx.x, threadIdx.x, g);
  float wr[VEC];
  bool in[VEC];
  load_weights<VEC>(w, g, col0, wr, in);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * g.rows_per_block, r1 = min64(g.B, r0 + g.rows_per_block);
  for (int64_t r = r0; r < r1; r += kRowUnroll) {
    scalar_t fv[kRowUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) load_row<scalar_t, VEC>(f, g, r + u, r + u < r1, col0, fv[u]);
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      if (r + u >= r1) break;  // block-uniform
      uint32_t key[VEC];
      bool keep[VEC];
      const int n = stage_classify<scalar_t, VEC>(fv[u], wr, in, lo, key, keep);
      int offset, total;
      Scan(temp).ExclusiveSum(n, offset, total);
      if (threadIdx.x == 0) {
        const int64_t t = tile_id(r + u, blockIdx.x, g);
        const int64_t base = total > 0 ? static_cast<int64_t>(atomicAdd(
                                             reinterpret_cast<unsigned long long*>(state + kStageCount),
                                             static_cast<unsigned long long>(total)))
                                       : 0;
        tile_base[t] = base;
        tile_count[t] = total;
        base_shared = base;
      }
      __syncthreads();
      // The level loop counted exactly the entries with key >= lo, so they fit; the test only guards memory.
      if (base_shared + total <= g.cap) stage_store<scalar_t, VEC>(fv[u], key, keep, threadIdx.x, base_shared + offset, skey, scol, sval);
      __syncthreads();  // base_shared and temp are reused by the next tile
    }
  }
}

// Per tile: staged entries above [lo, hi] and inside it, as table[0][t] and table[1][t] (zeros off the staged path).
__global__ void __launch_bounds__(kThreads)
    tile_count_kernel(const uint32_t* __restrict__ skey, const int64_t* __restrict__ state,
                      const int64_t* __restrict__ tile_base, const int64_t* __restrict__ tile_count,
                      int64_t* __restrict__ table, int64_t n_tiles) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTilesPerBlock + threadIdx.x / kWarp;
  const unsigned lane = threadIdx.x % kWarp;
  if (t >= n_tiles) return;  // warp-uniform
  unsigned a = 0, e = 0;
  if (state[kMode] == kModeStaged) {
    const uint32_t lo = static_cast<uint32_t>(state[kLo]), hi = static_cast<uint32_t>(state[kHi]);
    const int64_t base = tile_base[t], cnt = tile_count[t];
    for (int64_t i = lane; i < cnt; i += kWarp) {
      const uint32_t key = skey[base + i];
      a += key_above(key, hi);
      e += key_tie(key, lo, hi);
    }
    a = __reduce_add_sync(kFullMask, a);
    e = __reduce_add_sync(kFullMask, e);
  }
  if (lane == 0) {
    table[t] = a;
    table[n_tiles + t] = e;
  }
}

// Ordered write from the staging buffer: one warp per tile, entries in column order, ranks by warp ballots.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    staged_write_kernel(const uint32_t* __restrict__ skey, const uint16_t* __restrict__ scol,
                        const scalar_t* __restrict__ sval, const int64_t* __restrict__ state,
                        const int64_t* __restrict__ tile_base, const int64_t* __restrict__ tile_count,
                        const int64_t* __restrict__ before, scalar_t* __restrict__ values, index_t* __restrict__ indices,
                        int64_t* __restrict__ row_counts, Geometry g) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTilesPerBlock + threadIdx.x / kWarp;
  const unsigned lane = threadIdx.x % kWarp;
  if (t >= g.n_tiles || state[kMode] != kModeStaged) return;  // warp-uniform
  const uint32_t lo = static_cast<uint32_t>(state[kLo]), hi = static_cast<uint32_t>(state[kHi]);
  const int64_t need = state[kNeed];
  const int64_t base = tile_base[t], cnt = tile_count[t];
  const int64_t row = t / g.n_slabs, col_base = (t - row * g.n_slabs) * g.slab;
  int64_t tie_rank = before[g.n_tiles + t];
  const int64_t pos0 = first_slot(before[t], tie_rank, need);
  int64_t pos = pos0;
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t i0 = 0; i0 < cnt; i0 += kWarp) {
    const int64_t i = i0 + lane;
    const bool valid = i < cnt;
    const uint32_t key = valid ? skey[base + i] : 0u;
    const bool tie = valid && key_tie(key, lo, hi);
    const unsigned ties = __ballot_sync(kFullMask, tie);
    const bool chosen = choose(valid && key_above(key, hi), tie, tie_rank + __popc(ties & lower), need);
    const unsigned chosen_mask = __ballot_sync(kFullMask, chosen);
    if (chosen) {
      const int64_t slot = pos + __popc(chosen_mask & lower);
      values[slot] = kept_value(key, sval[base + i]);
      indices[slot] = static_cast<index_t>(col_base + scol[base + i]);
    }
    pos += __popc(chosen_mask);
    tie_rank += __popc(ties);
  }
  if (lane == 0 && pos > pos0)
    atomicAdd(reinterpret_cast<unsigned long long*>(row_counts + row), static_cast<unsigned long long>(pos - pos0));
}

// Count over f per chunk of consecutive tiles: entries above [lo, hi] and inside it, as table[0][c], table[1][c].
// batch_topk (TOPK) reads the range from the state and runs only in mode ties; threshold_select passes it.
template <typename scalar_t, int VEC, bool TOPK>
__global__ void __launch_bounds__(kThreads)
    count_kernel(const scalar_t* __restrict__ f, const float* __restrict__ w, const int64_t* __restrict__ state,
                 int64_t* __restrict__ table, uint32_t lo_arg, uint32_t hi_arg, Geometry g) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  if (TOPK && state[kMode] != kModeTies) {
    if (threadIdx.x == 0) table[blockIdx.x] = table[g.n_chunks + blockIdx.x] = 0;
    return;
  }
  const uint32_t lo = TOPK ? static_cast<uint32_t>(state[kLo]) : lo_arg;
  const uint32_t hi = TOPK ? static_cast<uint32_t>(state[kHi]) : hi_arg;
  const int64_t t0 = blockIdx.x * g.tiles_per_chunk, t1 = min64(t0 + g.tiles_per_chunk, g.n_tiles);
  long long n_above = 0, n_ties = 0;
  for (int64_t t = t0; t < t1; ++t) {
    TileEntries<scalar_t, VEC> e;
    tile_entries<scalar_t, VEC>(f, w, g, t, threadIdx.x, lo, hi, e);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      n_above += e.above[v];
      n_ties += e.tie[v];
    }
  }
  n_above = Reduce(temp).Sum(n_above);
  __syncthreads();
  n_ties = Reduce(temp).Sum(n_ties);
  if (threadIdx.x == 0) {
    table[blockIdx.x] = n_above;
    table[g.n_chunks + blockIdx.x] = n_ties;
  }
}

// Ordered write over f: block scans give every chosen entry its slot, in CSR order.
template <typename scalar_t, typename index_t, int VEC, bool TOPK>
__global__ void __launch_bounds__(kThreads)
    write_kernel(const scalar_t* __restrict__ f, const float* __restrict__ w, const int64_t* __restrict__ state,
                 const int64_t* __restrict__ before, scalar_t* __restrict__ values, index_t* __restrict__ indices,
                 int64_t* __restrict__ row_counts, uint32_t lo_arg, uint32_t hi_arg, Geometry g) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  if (TOPK && state[kMode] != kModeTies) return;
  const uint32_t lo = TOPK ? static_cast<uint32_t>(state[kLo]) : lo_arg;
  const uint32_t hi = TOPK ? static_cast<uint32_t>(state[kHi]) : hi_arg;
  const int64_t need = TOPK ? state[kNeed] : 0;
  const int64_t chunk = blockIdx.x;
  const int64_t t0 = chunk * g.tiles_per_chunk, t1 = min64(t0 + g.tiles_per_chunk, g.n_tiles);
  int64_t tie_rank = before[g.n_chunks + chunk];  // range entries in earlier chunks (flat order)
  int64_t pos = first_slot(before[chunk], tie_rank, need);
  for (int64_t t = t0; t < t1; ++t) {
    TileEntries<scalar_t, VEC> e;
    tile_entries<scalar_t, VEC>(f, w, g, t, threadIdx.x, lo, hi, e);
    int tie_base, tile_ties;
    Scan(temp).ExclusiveSum(count_ties(e), tie_base, tile_ties);
    __syncthreads();
    bool chosen[VEC];
    const int my_chosen = choose_entries(e, tie_rank + tie_base, need, chosen);
    int slot_base, tile_chosen;
    Scan(temp).ExclusiveSum(my_chosen, slot_base, tile_chosen);
    __syncthreads();
    write_entries(e, chosen, pos + slot_base, values, indices);
    if (threadIdx.x == 0 && tile_chosen > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(row_counts + e.row), static_cast<unsigned long long>(tile_chosen));
    pos += tile_chosen;
    tie_rank += tile_ties;
  }
}

// [2, n] counts -> their exclusive scans along dim 1.
at::Tensor exclusive_scan(const at::Tensor& counts) { return counts.cumsum(1) - counts; }

template <typename scalar_t>
Geometry geometry_of(const at::Tensor& f, const at::Tensor& w, int64_t K, bool relu, int64_t cap) {
  const int vec = rows_vectorizable(f.data_ptr(), f.size(1), vec16<scalar_t>()) ? vec16<scalar_t>() : 1;
  const bool w_aligned = reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
  return make_geometry(f.size(0), f.size(1), K, vec, w_aligned, relu, sm_count(), cap);
}

// Count + ordered write over f with the range [lo, hi] (threshold_select: lo > hi, nothing in range).
template <typename scalar_t, typename index_t, int VEC, bool TOPK>
void count_and_write(const at::Tensor& f, const at::Tensor& w, const at::Tensor& state, uint32_t lo, uint32_t hi,
                     const Geometry& g, at::Tensor& values, at::Tensor& indices, at::Tensor& row_counts, int64_t* nnz) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* sp = TOPK ? state.data_ptr<int64_t>() : nullptr;
  at::Tensor table = at::empty({2, g.n_chunks}, f.options().dtype(at::kLong));
  count_kernel<scalar_t, VEC, TOPK><<<g.n_chunks, kThreads, 0, stream>>>(
      f.data_ptr<scalar_t>(), w.data_ptr<float>(), sp, table.data_ptr<int64_t>(), lo, hi, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (nnz != nullptr) {  // threshold_select: the output size needs one sync
    *nnz = table[0].sum().item<int64_t>();
    values = at::empty({*nnz}, f.options());
    indices = at::empty({*nnz}, indices.options());
  }
  const at::Tensor before = exclusive_scan(table);
  write_kernel<scalar_t, index_t, VEC, TOPK><<<g.n_chunks, kThreads, 0, stream>>>(
      f.data_ptr<scalar_t>(), w.data_ptr<float>(), sp, before.data_ptr<int64_t>(), values.data_ptr<scalar_t>(),
      indices.data_ptr<index_t>(), row_counts.data_ptr<int64_t>() + 1, lo, hi, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Staging capacity: CROSSDIFF_CUDA_TOPK_CAP (entries) overrides the default, so that tests on a GPU can force
// the extra-level and ties paths on small inputs.
int64_t stage_cap_override() {
  const char* env = std::getenv("CROSSDIFF_CUDA_TOPK_CAP");
  return env != nullptr && *env != '\0' ? std::max<int64_t>(0, std::atoll(env)) : -1;
}

template <typename scalar_t, typename index_t, int VEC>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_impl(const at::Tensor& f, const at::Tensor& w,
                                                                     int64_t K, const Geometry& g) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto i64 = f.options().dtype(at::kLong);
  const int64_t N = g.B * g.F;
  // The state is filled on the device: no sync, and no copy from pageable host memory, which a CUDA graph
  // capture (torch.compile mode="reduce-overhead") refuses.
  at::Tensor state = at::empty({kSlots}, i64);
  int64_t* sp = state.data_ptr<int64_t>();
  init_state_kernel<<<1, 1, 0, stream>>>(sp, K, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Histograms: levels 0-2 over f, then levels 1-2 over the staging buffer.
  at::Tensor hist = at::zeros({2 * kLevels - 1, kMaxBins}, i64);
  auto* hp = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  const dim3 slab_grid(static_cast<unsigned>(g.n_slabs), static_cast<unsigned>(g.row_blocks));
  for (int level = 0; level < kLevels; ++level) {
    histogram_kernel<scalar_t, VEC><<<slab_grid, kThreads, 0, stream>>>(f.data_ptr<scalar_t>(), w.data_ptr<float>(),
                                                                       sp, hp + level * kMaxBins, g, level);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    resolve_kernel<<<1, kResolveThreads, 0, stream>>>(sp, hp + level * kMaxBins, level, false, g.cap);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Staged path.
  at::Tensor skey = at::empty({g.cap}, f.options().dtype(at::kInt));
  at::Tensor scol = at::empty({g.cap}, f.options().dtype(at::kShort));
  at::Tensor sval = at::empty({g.cap}, f.options());
  at::Tensor tiles = at::empty({2, g.n_tiles}, i64);  // [0]: base, [1]: count
  auto* skp = reinterpret_cast<uint32_t*>(skey.data_ptr<int32_t>());
  auto* scp = reinterpret_cast<uint16_t*>(scol.data_ptr<int16_t>());
  int64_t* tbase = tiles.data_ptr<int64_t>();
  int64_t* tcount = tbase + g.n_tiles;
  stage_kernel<scalar_t, VEC><<<slab_grid, kThreads, 0, stream>>>(f.data_ptr<scalar_t>(), w.data_ptr<float>(), sp,
                                                                 skp, scp, sval.data_ptr<scalar_t>(), tbase, tcount, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int level = 1; level < kLevels; ++level) {
    unsigned long long* h = hp + (kLevels - 1 + level) * kMaxBins;
    staged_histogram_kernel<<<g.stage_blocks, kThreads, 0, stream>>>(skp, sp, h, level);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    resolve_kernel<<<1, kResolveThreads, 0, stream>>>(sp, h, level, true, g.cap);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor table = at::empty({2, g.n_tiles}, i64);
  tile_count_kernel<<<g.tile_blocks, kThreads, 0, stream>>>(skp, sp, tbase, tcount, table.data_ptr<int64_t>(), g.n_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor before = exclusive_scan(table);
  at::Tensor values = at::empty({K}, f.options());
  at::Tensor indices = at::empty({K}, f.options().dtype(c10::CppTypeToScalarType<index_t>::value));
  at::Tensor row_counts = at::zeros({g.B + 1}, i64);
  staged_write_kernel<scalar_t, index_t><<<g.tile_blocks, kThreads, 0, stream>>>(
      skp, scp, sval.data_ptr<scalar_t>(), sp, tbase, tcount, before.data_ptr<int64_t>(), values.data_ptr<scalar_t>(),
      indices.data_ptr<index_t>(), row_counts.data_ptr<int64_t>() + 1, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Ties path.
  count_and_write<scalar_t, index_t, VEC, true>(f, w, state, 0, 0, g, values, indices, row_counts, nullptr);

  // The smallest selected positive score: a K-sized reduction over the kept entries (the kernel's exact s).
  const at::Tensor scores = values.to(at::kFloat) * w.index_select(0, indices);
  const at::Tensor inf = at::full({}, std::numeric_limits<float>::infinity(), scores.options());
  at::Tensor min_score = at::where(scores > 0, scores, inf).min();
  return {values, indices, row_counts.cumsum(0), min_score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_topk_cuda(const at::Tensor& f_in, const at::Tensor& w_in,
                                                                           int64_t K, bool relu) {
  check_batch_topk(f_in, w_in, K);
  const c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous(), w = w_in.contiguous();
  const bool i32 = latent_index_is_int32(f.size(1));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  CROSSDIFF_DISPATCH_FLOATS(f.scalar_type(), "batch_topk_cuda", [&] {
    const Geometry g = geometry_of<scalar_t>(f, w, K, relu, stage_cap_override());
    constexpr int V = vec16<scalar_t>();
    if (g.vec > 1)
      out = i32 ? topk_impl<scalar_t, int32_t, V>(f, w, K, g) : topk_impl<scalar_t, int64_t, V>(f, w, K, g);
    else
      out = i32 ? topk_impl<scalar_t, int32_t, 1>(f, w, K, g) : topk_impl<scalar_t, int64_t, 1>(f, w, K, g);
  });
  return out;
}

template <typename scalar_t, typename index_t, int VEC>
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_impl(const at::Tensor& f, const at::Tensor& w, float theta,
                                                              const Geometry& g) {
  // s > theta exactly when key(s) > key(theta), for theta >= 0 (checked) and any s, NaN included; lo > hi
  // leaves no entry in the range.
  const uint32_t hi = score_key(theta);
  at::Tensor values, indices = at::empty({0}, f.options().dtype(c10::CppTypeToScalarType<index_t>::value));
  at::Tensor row_counts = at::zeros({g.B + 1}, f.options().dtype(at::kLong));
  int64_t nnz = 0;
  count_and_write<scalar_t, index_t, VEC, false>(f, w, at::Tensor(), 0xFFFFFFFFu, hi, g, values, indices, row_counts,
                                                  &nnz);
  return {values, indices, row_counts.cumsum(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_select_cuda(const at::Tensor& f_in, const at::Tensor& w_in,
                                                                     double theta, bool relu) {
  check_selection(f_in, w_in);
  check_threshold(theta);
  const c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous(), w = w_in.contiguous();
  const int64_t B = f.size(0), F = f.size(1);
  const bool i32 = latent_index_is_int32(F);
  if (B * F == 0) {
    return {at::empty({0}, f.options()), at::empty({0}, f.options().dtype(i32 ? at::kInt : at::kLong)),
            at::zeros({B + 1}, f.options().dtype(at::kLong))};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  CROSSDIFF_DISPATCH_FLOATS(f.scalar_type(), "threshold_select_cuda", [&] {
    const Geometry g = geometry_of<scalar_t>(f, w, 0, relu, 0);
    const float th = static_cast<float>(theta);
    constexpr int V = vec16<scalar_t>();
    if (g.vec > 1)
      out = i32 ? threshold_impl<scalar_t, int32_t, V>(f, w, th, g) : threshold_impl<scalar_t, int64_t, V>(f, w, th, g);
    else
      out = i32 ? threshold_impl<scalar_t, int32_t, 1>(f, w, th, g) : threshold_impl<scalar_t, int64_t, 1>(f, w, th, g);
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
