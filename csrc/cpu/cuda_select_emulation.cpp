// Test harness, not public API: the CUDA batch_topk (cuda/select.cu) run on the CPU. Every kernel of the CUDA
// launcher is emulated with the same launch geometry (select_phases.h): for each block of its grid, for each
// phase between two barriers, each thread of the block in turn, calling the same phase functions the kernels
// call. Atomics run sequentially; warp and block collectives (CUB scans and reductions, ballots, match-any
// aggregation) are the integer sums and prefix sums they compute. Blocks run one after another, in an order
// that `order` permutes (0: grid order, 1: reversed, other: shuffled with that seed): the staging buffer then
// fills in another order, and the result must not change.
//
// Registered as crossdiff_emulated::batch_topk for CPU tensors; python_tests/ops/test_cuda_emulation.py compares
// it with the reference. `sms` stands for the GPU's multiprocessor count, which sets the grid.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "../checks.h"
#include "../select_phases.h"

namespace crossdiff {
namespace emulated {
namespace {

using namespace select_phases;

std::vector<int64_t> block_order(int64_t n, int64_t order) {
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  if (order == 1) {
    std::reverse(idx.begin(), idx.end());
  } else if (order > 1) {
    std::mt19937_64 gen(static_cast<uint64_t>(order));
    std::shuffle(idx.begin(), idx.end(), gen);
  }
  return idx;
}

// Exclusive prefix sums in place; returns the total (a block scan's aggregate).
template <typename C>
int64_t exclusive_scan(C& v) {
  int64_t run = 0;
  for (auto& x : v) {
    const int64_t n = static_cast<int64_t>(x);
    x = static_cast<typename C::value_type>(run);
    run += n;
  }
  return run;
}

template <typename T, typename I, int VEC>
class Emulator {
 public:
  Emulator(const T* f, const float* w, const Geometry& g, int64_t order)
      // The staging slots start poisoned (a NaN key, a column past any slab, a NaN value), as the kernel's
      // at::empty buffer holds garbage: a read of a slot no tile wrote changes the result instead of reading 0.
      : f_(f), w_(w), g_(g), order_(order), hist_((2 * kLevels - 1) * kMaxBins, 0), skey_(g.cap, 0xFFFFFFFFu),
        scol_(g.cap, 0xFFFF), sval_(g.cap, T(std::numeric_limits<float>::quiet_NaN())), tiles_(2 * g.n_tiles, 0),
        table_(2 * g.n_tiles, 0) {}

  // The launch sequence of cuda/select.cu's topk_impl.
  void run(T* values, I* indices, int64_t* row_counts) {
    init_state(state_, g_.K, g_.B * g_.F);
    for (int level = 0; level < kLevels; ++level) {
      histogram(level);
      resolve(level, false, hist_.data() + level * kMaxBins);
    }
    stage();
    for (int level = 1; level < kLevels; ++level) {
      unsigned long long* h = hist_.data() + (kLevels - 1 + level) * kMaxBins;
      staged_histogram(level, h);
      resolve(level, true, h);
    }
    tile_count();
    std::vector<int64_t> before = table_;
    scan_rows(before, g_.n_tiles);
    staged_write(before, values, indices, row_counts);
    ties_count_and_write(values, indices, row_counts);
  }

  const int64_t* state() const { return state_; }
  int64_t f_passes() const { return f_passes_; }

 private:
  struct SlabThread {
    float wr[VEC];
    bool in[VEC];
    T fv[kRowUnroll][VEC];
    uint32_t key[VEC];
    bool keep[VEC];
    int n, offset;
  };

  // A slot outside [0, K) would write past the outputs: the emulator reports it instead.
  void check_slot(int64_t slot) const {
    TORCH_CHECK(slot >= 0 && slot < g_.K, "emulated write: slot ", slot, " outside [0, K = ", g_.K, ")");
  }

  static void scan_rows(std::vector<int64_t>& v, int64_t n) {
    int64_t run[2] = {0, 0};
    for (int k = 0; k < 2; ++k)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t x = v[k * n + i];
        v[k * n + i] = run[k];
        run[k] += x;
      }
  }

  void flush(const std::vector<uint32_t>& counts, unsigned long long* hist, int nbins) {
    for (int tid = 0; tid < kThreads; ++tid)
      for (int i = tid; i < nbins; i += kThreads)
        if (counts[i] != 0) hist[i] += counts[i];
  }

  void histogram(int level) {
    unsigned long long* hist = hist_.data() + level * kMaxBins;
    bool counted = false;
    for (const int64_t b : block_order(g_.n_slabs * g_.row_blocks, order_)) {
      if (!level_active(state_, level, false)) return;
      if (!counted) ++f_passes_, counted = true;
      const int64_t bx = b % g_.n_slabs, by = b / g_.n_slabs;
      const uint32_t lo = static_cast<uint32_t>(state_[kLo]), hi = static_cast<uint32_t>(state_[kHi]);
      const int nbins = 1 << digit_bits(level);
      std::vector<uint32_t> counts(kMaxBins, 0);
      // barrier
      const int64_t r0 = by * g_.rows_per_block, r1 = std::min(g_.B, r0 + g_.rows_per_block);
      for (int tid = 0; tid < kThreads; ++tid) {
        SlabThread th;
        const int64_t col0 = thread_col0(bx, tid, g_);
        load_weights<VEC>(w_, g_, col0, th.wr, th.in);
        for (int64_t r = r0; r < r1; r += kRowUnroll) {
          for (int u = 0; u < kRowUnroll; ++u) load_row<T, VEC>(f_, g_, r + u, r + u < r1, col0, th.fv[u]);
          for (int u = 0; u < kRowUnroll; ++u) {
            uint32_t d[VEC];
            row_digits<T, VEC>(th.fv[u], th.wr, th.in, r + u < r1, lo, hi, level, d);
            for (int v = 0; v < VEC; ++v)
              if (d[v] != kNoDigit) ++counts[d[v]];  // the warp's match-any aggregation adds the same counts
          }
        }
      }
      // barrier
      flush(counts, hist, nbins);
    }
  }

  void staged_histogram(int level, unsigned long long* hist) {
    for (const int64_t b : block_order(g_.stage_blocks, order_)) {
      if (!level_active(state_, level, true)) return;
      const uint32_t lo = static_cast<uint32_t>(state_[kLo]), hi = static_cast<uint32_t>(state_[kHi]);
      const int64_t n = state_[kStageCount];
      const int nbins = 1 << digit_bits(level);
      std::vector<uint32_t> counts(kMaxBins, 0);
      // barrier
      const int64_t stride = g_.stage_blocks * kThreads;
      for (int64_t base = b * kThreads; base < n; base += stride)
        for (int tid = 0; tid < kThreads; ++tid) {
          const int64_t i = base + tid;
          const uint32_t d = digit_of(i < n ? skey_[i] : 0u, i < n, lo, hi, level);
          if (d != kNoDigit) ++counts[d];
        }
      // barrier
      flush(counts, hist, nbins);
    }
  }

  void resolve(int level, bool staged, const unsigned long long* hist) {
    if (!level_active(state_, level, staged)) return;
    const int64_t need = state_[kNeed];
    constexpr int n = kResolveThreads * kResolveItems;
    std::vector<int> bin(n);
    std::vector<unsigned long long> count(n), above;
    for (int tid = 0; tid < kResolveThreads; ++tid)
      for (int j = 0; j < kResolveItems; ++j) {
        const int k = tid * kResolveItems + j;
        bin[k] = resolve_bin(tid, j, level);
        count[k] = bin[k] >= 0 ? hist[bin[k]] : 0ull;
      }
    above = count;
    exclusive_scan(above);  // cub::BlockScan::ExclusiveSum over the blocked arrangement
    for (int tid = 0; tid < kResolveThreads; ++tid)
      for (int j = 0; j < kResolveItems; ++j) {
        const int k = tid * kResolveItems + j;
        if (is_boundary_bin(bin[k], count[k], above[k], need))
          apply_boundary(state_, level, staged, bin[k], count[k], above[k], g_.cap);
      }
  }

  void stage() {
    bool counted = false;
    std::vector<SlabThread> th(kThreads);
    for (const int64_t b : block_order(g_.n_slabs * g_.row_blocks, order_)) {
      if (state_[kMode] != kModeStaged) return;
      if (!counted) ++f_passes_, counted = true;
      const int64_t bx = b % g_.n_slabs, by = b / g_.n_slabs;
      const uint32_t lo = static_cast<uint32_t>(state_[kLo]);
      for (int tid = 0; tid < kThreads; ++tid) load_weights<VEC>(w_, g_, thread_col0(bx, tid, g_), th[tid].wr, th[tid].in);
      const int64_t r0 = by * g_.rows_per_block, r1 = std::min(g_.B, r0 + g_.rows_per_block);
      for (int64_t r = r0; r < r1; r += kRowUnroll) {
        for (int tid = 0; tid < kThreads; ++tid)
          for (int u = 0; u < kRowUnroll; ++u)
            load_row<T, VEC>(f_, g_, r + u, r + u < r1, thread_col0(bx, tid, g_), th[tid].fv[u]);
        for (int u = 0; u < kRowUnroll; ++u) {
          if (r + u >= r1) break;
          std::vector<int> offset(kThreads);
          for (int tid = 0; tid < kThreads; ++tid)
            offset[tid] = th[tid].n = stage_classify<T, VEC>(th[tid].fv[u], th[tid].wr, th[tid].in, lo, th[tid].key, th[tid].keep);
          const int64_t total = exclusive_scan(offset);
          // thread 0: the tile's reservation
          const int64_t t = tile_id(r + u, bx, g_);
          int64_t base = 0;
          if (total > 0) {
            base = state_[kStageCount];
            state_[kStageCount] += total;
          }
          tiles_[t] = base;
          tiles_[g_.n_tiles + t] = total;
          // barrier
          // The kernel skips a tile that would overflow the buffer; the level loop's count makes that impossible,
          // which the emulator checks.
          TORCH_CHECK(base + total <= g_.cap, "emulated stage: tile ", t, " needs slots up to ", base + total,
                      ", capacity ", g_.cap);
          for (int tid = 0; tid < kThreads; ++tid)
              stage_store<T, VEC>(th[tid].fv[u], th[tid].key, th[tid].keep, tid, base + offset[tid], skey_.data(),
                                  scol_.data(), sval_.data());
          // barrier
        }
      }
    }
  }

  void tile_count() {
    for (const int64_t b : block_order(g_.tile_blocks, order_))
      for (int warp = 0; warp < kTilesPerBlock; ++warp) {
        const int64_t t = b * kTilesPerBlock + warp;
        if (t >= g_.n_tiles) continue;
        int64_t a = 0, e = 0;
        if (state_[kMode] == kModeStaged) {
          const uint32_t lo = static_cast<uint32_t>(state_[kLo]), hi = static_cast<uint32_t>(state_[kHi]);
          const int64_t base = tiles_[t], cnt = tiles_[g_.n_tiles + t];
          for (int lane = 0; lane < kWarp; ++lane)
            for (int64_t i = lane; i < cnt; i += kWarp) {
              a += key_above(skey_[base + i], hi);
              e += key_tie(skey_[base + i], lo, hi);
            }
        }
        table_[t] = a;
        table_[g_.n_tiles + t] = e;
      }
  }

  void staged_write(const std::vector<int64_t>& before, T* values, I* indices, int64_t* row_counts) {
    for (const int64_t b : block_order(g_.tile_blocks, order_))
      for (int warp = 0; warp < kTilesPerBlock; ++warp) {
        const int64_t t = b * kTilesPerBlock + warp;
        if (t >= g_.n_tiles || state_[kMode] != kModeStaged) continue;
        const uint32_t lo = static_cast<uint32_t>(state_[kLo]), hi = static_cast<uint32_t>(state_[kHi]);
        const int64_t need = state_[kNeed];
        const int64_t base = tiles_[t], cnt = tiles_[g_.n_tiles + t];
        const int64_t row = t / g_.n_slabs, col_base = (t - row * g_.n_slabs) * g_.slab;
        int64_t tie_rank = before[g_.n_tiles + t];
        const int64_t pos0 = first_slot(before[t], tie_rank, need);
        int64_t pos = pos0;
        for (int64_t i0 = 0; i0 < cnt; i0 += kWarp) {
          int64_t ties_lower = 0, chosen_lower = 0;  // the ballots' prefix counts, lane by lane
          for (int lane = 0; lane < kWarp; ++lane) {
            const int64_t i = i0 + lane;
            const bool valid = i < cnt;
            const uint32_t key = valid ? skey_[base + i] : 0u;
            const bool tie = valid && key_tie(key, lo, hi);
            const bool chosen = choose(valid && key_above(key, hi), tie, tie_rank + ties_lower, need);
            if (chosen) {
              const int64_t slot = pos + chosen_lower;
              check_slot(slot);
              values[slot] = kept_value(key, sval_[base + i]);
              indices[slot] = static_cast<I>(col_base + scol_[base + i]);
            }
            ties_lower += tie;
            chosen_lower += chosen;
          }
          pos += chosen_lower;
          tie_rank += ties_lower;
        }
        if (pos > pos0) row_counts[row] += pos - pos0;
      }
  }

  void ties_count_and_write(T* values, I* indices, int64_t* row_counts) {
    std::vector<int64_t> table(2 * g_.n_chunks, 0);
    bool counted = false;
    for (const int64_t b : block_order(g_.n_chunks, order_)) {
      if (state_[kMode] != kModeTies) break;  // the table stays zero
      if (!counted) ++f_passes_, counted = true;
      const uint32_t lo = static_cast<uint32_t>(state_[kLo]), hi = static_cast<uint32_t>(state_[kHi]);
      const int64_t t0 = b * g_.tiles_per_chunk, t1 = std::min(t0 + g_.tiles_per_chunk, g_.n_tiles);
      int64_t n_above = 0, n_ties = 0;  // the block reductions' sums
      for (int tid = 0; tid < kThreads; ++tid)
        for (int64_t t = t0; t < t1; ++t) {
          TileEntries<T, VEC> e;
          tile_entries<T, VEC>(f_, w_, g_, t, tid, lo, hi, e);
          for (int v = 0; v < VEC; ++v) {
            n_above += e.above[v];
            n_ties += e.tie[v];
          }
        }
      table[b] = n_above;
      table[g_.n_chunks + b] = n_ties;
    }
    scan_rows(table, g_.n_chunks);
    counted = false;
    std::vector<TileEntries<T, VEC>> e(kThreads);
    struct Chosen {
      bool c[VEC];
    };
    std::vector<Chosen> chosen(kThreads);
    for (const int64_t b : block_order(g_.n_chunks, order_)) {
      if (state_[kMode] != kModeTies) return;
      if (!counted) ++f_passes_, counted = true;
      const uint32_t lo = static_cast<uint32_t>(state_[kLo]), hi = static_cast<uint32_t>(state_[kHi]);
      const int64_t need = state_[kNeed];
      const int64_t t0 = b * g_.tiles_per_chunk, t1 = std::min(t0 + g_.tiles_per_chunk, g_.n_tiles);
      int64_t tie_rank = table[g_.n_chunks + b];
      int64_t pos = first_slot(table[b], tie_rank, need);
      for (int64_t t = t0; t < t1; ++t) {
        std::vector<int> tie_base(kThreads), slot_base(kThreads);
        for (int tid = 0; tid < kThreads; ++tid) {
          tile_entries<T, VEC>(f_, w_, g_, t, tid, lo, hi, e[tid]);
          tie_base[tid] = count_ties(e[tid]);
        }
        const int64_t tile_ties = exclusive_scan(tie_base);
        // barrier
        for (int tid = 0; tid < kThreads; ++tid)
          slot_base[tid] = choose_entries(e[tid], tie_rank + tie_base[tid], need, chosen[tid].c);
        const int64_t tile_chosen = exclusive_scan(slot_base);
        // barrier
        if (tile_chosen > 0) check_slot(pos), check_slot(pos + tile_chosen - 1);
        for (int tid = 0; tid < kThreads; ++tid) write_entries(e[tid], chosen[tid].c, pos + slot_base[tid], values, indices);
        if (tile_chosen > 0) row_counts[e[0].row] += tile_chosen;
        pos += tile_chosen;
        tie_rank += tile_ties;
      }
    }
  }

  const T* f_;
  const float* w_;
  Geometry g_;
  int64_t order_;
  int64_t state_[kSlots];
  std::vector<unsigned long long> hist_;
  std::vector<uint32_t> skey_;
  std::vector<uint16_t> scol_;
  std::vector<T> sval_;
  std::vector<int64_t> tiles_;  // [0]: base, [1]: count, per tile
  std::vector<int64_t> table_;  // [0]: entries above the range, [1]: entries in it, per tile
  int64_t f_passes_ = 0;
};

template <typename T, typename I, int VEC>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate(const at::Tensor& f, const at::Tensor& w,
                                                                               int64_t K, const Geometry& g,
                                                                               int64_t order) {
  // Poisoned outputs: an entry the kernels fail to write shows.
  at::Tensor values = at::full({K}, std::numeric_limits<float>::quiet_NaN(), f.options());
  at::Tensor indices = at::full({K}, -1, f.options().dtype(c10::CppTypeToScalarType<I>::value));
  at::Tensor row_counts = at::zeros({g.B + 1}, f.options().dtype(at::kLong));
  Emulator<T, I, VEC> emu(f.data_ptr<T>(), w.data_ptr<float>(), g, order);
  emu.run(values.data_ptr<T>(), indices.data_ptr<I>(), row_counts.data_ptr<int64_t>() + 1);
  const at::Tensor scores = values.to(at::kFloat) * w.index_select(0, indices);
  const at::Tensor inf = at::full({}, std::numeric_limits<float>::infinity(), scores.options());
  at::Tensor min_score = at::where(scores > 0, scores, inf).min();
  const int64_t* s = emu.state();
  const std::vector<int64_t> tr = {emu.f_passes(), s[kMode], s[kLevel], s[kStageCount], g.vec, g.n_slabs * g.row_blocks};
  at::Tensor trace = at::tensor(tr, f.options().dtype(at::kLong));
  return {values, indices, row_counts.cumsum(0), min_score, trace};
}

// The CUDA launcher's choices: 16-byte loads where f's rows allow them, int32 latent ids where F fits.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_dtype(const at::Tensor& f,
                                                                                     const at::Tensor& w, int64_t K,
                                                                                     bool relu, int64_t cap,
                                                                                     int64_t sms, int64_t order) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const int vec = rows_vectorizable(f.data_ptr(), f.size(1), V) ? V : 1;
  const bool w_aligned = reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
  const Geometry g = make_geometry(f.size(0), f.size(1), K, vec, w_aligned, relu, sms, cap);
  const bool i32 = latent_index_is_int32(f.size(1));
  if (vec > 1) return i32 ? emulate<T, int32_t, V>(f, w, K, g, order) : emulate<T, int64_t, V>(f, w, K, g, order);
  return i32 ? emulate<T, int32_t, 1>(f, w, K, g, order) : emulate<T, int64_t, 1>(f, w, K, g, order);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_topk_emulated(
    const at::Tensor& f_in, const at::Tensor& w_in, int64_t K, int64_t cap, int64_t sms, int64_t order, bool relu) {
  check_batch_topk(f_in, w_in, K);
  TORCH_CHECK(f_in.device().is_cpu(), "crossdiff_emulated::batch_topk runs on CPU tensors, got f on ", f_in.device());
  TORCH_CHECK(sms >= 1, "sms must be >= 1, got ", sms);
  const at::Tensor f = f_in.contiguous(), w = w_in.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_SWITCH(f.scalar_type(), "batch_topk_emulated",
                     AT_DISPATCH_CASE(at::kFloat, [&] { out = emulate_dtype<scalar_t>(f, w, K, relu, cap, sms, order); })
                         AT_DISPATCH_CASE(at::kHalf, [&] { out = emulate_dtype<scalar_t>(f, w, K, relu, cap, sms, order); })
                             AT_DISPATCH_CASE(at::kBFloat16,
                                              [&] { out = emulate_dtype<scalar_t>(f, w, K, relu, cap, sms, order); }));
  return out;
}

}  // namespace

// A namespace of its own, so that the crossdiff op schemas (ops.cpp) stay the public surface. trace holds
// (passes over f, final mode, levels resolved, entries staged, vec, blocks of an f pass).
TORCH_LIBRARY(crossdiff_emulated, m) {
  m.def(
      "batch_topk(Tensor f, Tensor w, int K, int cap=-1, int sms=132, int order=0, bool relu=False) -> (Tensor values, Tensor indices, "
      "Tensor row_ptr, Tensor min_score, Tensor trace)");
}

TORCH_LIBRARY_IMPL(crossdiff_emulated, CPU, m) { m.impl("batch_topk", &batch_topk_emulated); }

}  // namespace emulated
}  // namespace crossdiff
