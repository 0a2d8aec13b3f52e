// The phases of the CUDA batch_topk (cuda/select.cu) as plain functions that compile for the host and the
// device. The kernels call them between their barriers; cpu/cuda_select_emulation.cpp calls the same functions
// thread by thread, block by block, with the same launch geometry, so the algorithm of the CUDA kernels is tested
// on machines without a GPU. What stays in the kernels is the block- and warp-wide collectives (CUB scans and
// reductions, warp ballots and match-any aggregation): each computes an exact integer sum or prefix sum that the
// emulator reproduces sequentially.
#pragma once
#include <algorithm>
#include <cstdint>

#include "score_key.h"

#if defined(__CUDA_ARCH__)
#define CROSSDIFF_UNROLL _Pragma("unroll")
#else
#define CROSSDIFF_UNROLL
#endif

namespace crossdiff {
namespace select_phases {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kLevels = 3;
constexpr int kMaxBins = 1 << 11;
constexpr int kResolveThreads = 1024;
constexpr int kResolveItems = kMaxBins / kResolveThreads;
// Rows a thread loads before it uses them: two independent 16-byte loads of f in flight per thread.
constexpr int kRowUnroll = 2;
// Kernels over the tile table: one warp per tile.
constexpr int kTilesPerBlock = kThreads / kWarp;
constexpr uint32_t kNoDigit = 0xFFFFFFFFu;
// score_key(+0) == score_key(-0): a key at or below it is a score <= 0 (NaN has the largest key).
constexpr uint32_t kZeroKey = 0x80000000u;

// Radix digits from the top of the key: 11 + 11 + 10 bits. 2^11 bins of 32-bit counters (8 KiB) leave the
// histogram blocks room for several resident blocks per SM, and the resolve block covers them with 1024 threads x 2.
CROSSDIFF_HD int digit_bits(int level) { return level < 2 ? 11 : 10; }
CROSSDIFF_HD int digit_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }

// The radix state, on the device (int64 slots). [lo, hi] is the key range that holds the boundary (the K-th
// largest key); need is how many of the keys in it are still to take, in_range how many there are; above counts
// the keys > hi. level is the next digit level to resolve. stage_count is the staging buffer's fill counter.
enum Slot : int { kLo = 0, kHi, kNeed, kInRange, kAbove, kLevel, kMode, kStageCount, kSlots };
// kSearch: the level loop goes on over f. kStaged: the entries with key >= lo fit the staging buffer; the rest of
// the work reads only that buffer. kTies: they do not fit and [lo, hi] is final (one exact key, or a range taken
// whole): the count + ordered write over f decide.
constexpr int64_t kModeSearch = 0, kModeStaged = 1, kModeTies = 2;

CROSSDIFF_HD void init_state(int64_t* state, int64_t K, int64_t N) {
  state[kLo] = 0;
  state[kHi] = 0xFFFFFFFFll;
  state[kNeed] = K;
  state[kInRange] = N;
  state[kAbove] = 0;
  state[kLevel] = 0;
  state[kMode] = kModeSearch;
  state[kStageCount] = 0;
}

// Whether the histogram and resolve of `level` have work: over f (staged = false) while the search goes on; over
// the staging buffer (staged = true) while [lo, hi] still holds more keys than the ones to take.
CROSSDIFF_HD bool level_active(const int64_t* state, int level, bool staged) {
  if (state[kLevel] != level) return false;
  if (!staged) return state[kMode] == kModeSearch;
  return state[kMode] == kModeStaged && state[kNeed] < state[kInRange];
}

// ---- launch geometry, shared by the CUDA launcher and the emulator ----

struct Geometry {
  int vec;          // elements of f per 16-byte load (1: unaligned or F % vec != 0)
  bool w_aligned;   // w can be read with 16-byte loads
  bool relu;        // f holds pre-activations: every phase reads ReLU(f) (score_key.h, selection_input)
  int64_t B, F, K;
  int64_t slab;     // latents per block column: kThreads * vec; a tile is one row of one slab
  int64_t n_slabs, n_tiles;
  int64_t rows_per_block, row_blocks;   // f passes: grid (n_slabs, row_blocks)
  int64_t tiles_per_chunk, n_chunks;    // count + write over f: n_chunks blocks of consecutive tiles
  int64_t cap;                          // staging buffer entries
  int64_t stage_blocks;                 // histograms over the staging buffer
  int64_t tile_blocks;                  // kernels over the tile table
};

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether rows of `width` elements starting at `base` can all be read with vec-element aligned accesses.
inline bool rows_vectorizable(const void* base, int64_t width, int vec) {
  return vec > 1 && width % vec == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// Staging capacity: the entries above the boundary bin (< K) plus the bin itself. The 11-bit bin of a ReLU
// output's scores is a quarter octave wide; room for 3 K in the bin keeps the usual case at two passes over f,
// and a slot costs 8-10 bytes of memory but no traffic unless used.
inline int64_t default_stage_cap(int64_t K, int64_t N) { return std::min<int64_t>(N, 4 * K + (1 << 16)); }

inline Geometry make_geometry(int64_t B, int64_t F, int64_t K, int vec, bool w_aligned, bool relu, int64_t n_sm,
                              int64_t cap) {
  Geometry g;
  g.vec = vec;
  g.w_aligned = w_aligned;
  g.relu = relu;
  g.B = B;
  g.F = F;
  g.K = K;
  g.slab = static_cast<int64_t>(kThreads) * vec;
  g.n_slabs = ceil_div64(F, g.slab);
  g.n_tiles = B * g.n_slabs;
  const int64_t target_blocks = 4 * std::max<int64_t>(1, n_sm);
  // A block's shared 32-bit bin counters see at most rows_per_block * slab entries.
  g.rows_per_block = std::min<int64_t>(ceil_div64(B, std::max<int64_t>(1, target_blocks / g.n_slabs)), 1 << 20);
  g.row_blocks = ceil_div64(B, g.rows_per_block);
  g.tiles_per_chunk = std::max<int64_t>(1, ceil_div64(g.n_tiles, target_blocks));
  g.n_chunks = ceil_div64(g.n_tiles, g.tiles_per_chunk);
  g.cap = cap >= 0 ? cap : default_stage_cap(K, B * F);
  g.stage_blocks = std::max<int64_t>(1, std::min<int64_t>(target_blocks, ceil_div64(g.cap, kThreads)));
  g.tile_blocks = ceil_div64(g.n_tiles, kTilesPerBlock);
  return g;
}

// ---- per-thread loads and keys ----

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

CROSSDIFF_HD int64_t thread_col0(int64_t slab_index, int tid, const Geometry& g) {
  return slab_index * g.slab + static_cast<int64_t>(tid) * g.vec;
}

// w of the thread's VEC latents, loaded once per block: 16-byte loads where aligned.
template <int VEC>
CROSSDIFF_HD void load_weights(const float* w, const Geometry& g, int64_t col0, float (&wr)[VEC], bool (&in)[VEC]) {
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) in[v] = col0 + v < g.F;
  if (VEC % 4 == 0 && g.w_aligned && col0 < g.F) {  // VEC > 1 only when F % VEC == 0: every latent is inside
    CROSSDIFF_UNROLL
    for (int q = 0; q < VEC; q += 4) {
      const Vec<float, 4> p = *reinterpret_cast<const Vec<float, 4>*>(w + col0 + q);
      CROSSDIFF_UNROLL
      for (int v = 0; v < 4; ++v) wr[q + v] = p.v[v];
    }
  } else {
    CROSSDIFF_UNROLL
    for (int v = 0; v < VEC; ++v) wr[v] = in[v] ? w[col0 + v] : 0.0f;
  }
}

// The thread's VEC entries of one row: one 16-byte load when VEC > 1; zeros for a row past the block's end.
// Over pre-activations (g.relu) the entries are ReLU'd as they arrive: every later phase, the staged values and
// the written ones included, sees exactly what it would see in the encoder's ReLU output.
template <typename T, int VEC>
CROSSDIFF_HD void load_row(const T* f, const Geometry& g, int64_t row, bool row_ok, int64_t col0, T (&fv)[VEC]) {
  if (VEC > 1 && row_ok && col0 < g.F) {
    const Vec<T, VEC> p = *reinterpret_cast<const Vec<T, VEC>*>(f + row * g.F + col0);
    CROSSDIFF_UNROLL
    for (int v = 0; v < VEC; ++v) fv[v] = p.v[v];
  } else {
    CROSSDIFF_UNROLL
    for (int v = 0; v < VEC; ++v) fv[v] = (row_ok && col0 + v < g.F) ? f[row * g.F + col0 + v] : T(0.0f);
  }
  if (g.relu) {
    CROSSDIFF_UNROLL
    for (int v = 0; v < VEC; ++v) fv[v] = static_cast<float>(fv[v]) < 0.0f ? T(0.0f) : fv[v];
  }
}

// The rounded product f * w, never contracted into an FMA (score_key.h).
CROSSDIFF_HD float score_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // the CPU build passes -ffp-contract=off
#endif
}

template <typename T>
CROSSDIFF_HD uint32_t entry_key(T fv, float w) {
  return score_key(score_mul(static_cast<float>(fv), w));
}

// ---- histogram passes ----

// The digit of `level` of a key inside [lo, hi]; kNoDigit for a key outside it or a lane without an entry.
CROSSDIFF_HD uint32_t digit_of(uint32_t key, bool valid, uint32_t lo, uint32_t hi, int level) {
  return (valid && key >= lo && key <= hi) ? (key >> digit_shift(level)) & ((1u << digit_bits(level)) - 1u)
                                           : kNoDigit;
}

template <typename T, int VEC>
CROSSDIFF_HD void row_digits(const T (&fv)[VEC], const float (&wr)[VEC], const bool (&in)[VEC], bool row_ok,
                             uint32_t lo, uint32_t hi, int level, uint32_t (&digit)[VEC]) {
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) digit[v] = digit_of(entry_key(fv[v], wr[v]), row_ok && in[v], lo, hi, level);
}

// ---- resolve (one block: kResolveThreads threads x kResolveItems bins, bins in descending order) ----

// The bin of item j of thread tid (negative: none); the exclusive sum of the counts in this order is the number
// of keys in higher bins.
CROSSDIFF_HD int resolve_bin(int tid, int j, int level) {
  return (1 << digit_bits(level)) - 1 - (kResolveItems * tid + j);
}

// Exactly one bin holds the need-th largest key of the range.
CROSSDIFF_HD bool is_boundary_bin(int bin, uint64_t count, uint64_t above, int64_t need) {
  return bin >= 0 && above < static_cast<uint64_t>(need) && above + count >= static_cast<uint64_t>(need);
}

// Narrows [lo, hi] to the boundary bin. In the level loop over f it also picks the mode: staged as soon as the
// entries with key >= lo fit the buffer; ties when they do not and the range is final (one key, or a range whose
// every key is taken); else the next level.
CROSSDIFF_HD void apply_boundary(int64_t* state, int level, bool staged, int bin, uint64_t count, uint64_t above,
                                 int64_t cap) {
  const int shift = digit_shift(level);
  const uint32_t lo = static_cast<uint32_t>(state[kLo]) | (static_cast<uint32_t>(bin) << shift);
  const uint32_t hi = lo | (shift == 0 ? 0u : ((1u << shift) - 1u));
  const int64_t need = state[kNeed] - static_cast<int64_t>(above);
  const int64_t n_above = state[kAbove] + static_cast<int64_t>(above);
  state[kLo] = lo;
  state[kHi] = hi;
  state[kNeed] = need;
  state[kInRange] = static_cast<int64_t>(count);
  state[kAbove] = n_above;
  state[kLevel] = level + 1;
  if (!staged) {
    const bool final_range = need == static_cast<int64_t>(count) || lo == hi;
    state[kMode] = n_above + static_cast<int64_t>(count) <= cap ? kModeStaged
                                                                : (final_range ? kModeTies : kModeSearch);
  }
}

// ---- stage pass: the entries with key >= lo, per tile, in column order ----

template <typename T, int VEC>
CROSSDIFF_HD int stage_classify(const T (&fv)[VEC], const float (&wr)[VEC], const bool (&in)[VEC], uint32_t lo,
                                uint32_t (&key)[VEC], bool (&keep)[VEC]) {
  int n = 0;
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) {
    key[v] = entry_key(fv[v], wr[v]);
    keep[v] = in[v] && key[v] >= lo;
    n += keep[v];
  }
  return n;
}

// Stores the thread's kept entries from `slot` on: key, column within the slab, f.
template <typename T, int VEC>
CROSSDIFF_HD void stage_store(const T (&fv)[VEC], const uint32_t (&key)[VEC], const bool (&keep)[VEC], int tid,
                              int64_t slot, uint32_t* skey, uint16_t* scol, T* sval) {
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) {
    if (keep[v]) {
      skey[slot] = key[v];
      scol[slot] = static_cast<uint16_t>(tid * VEC + v);
      sval[slot] = fv[v];
      ++slot;
    }
  }
}

CROSSDIFF_HD int64_t tile_id(int64_t row, int64_t slab_index, const Geometry& g) { return row * g.n_slabs + slab_index; }

// ---- final classification and placement (staged buffer and ties path alike) ----

CROSSDIFF_HD bool key_above(uint32_t key, uint32_t hi) { return key > hi; }
CROSSDIFF_HD bool key_tie(uint32_t key, uint32_t lo, uint32_t hi) { return key >= lo && key <= hi; }
// Keys in [lo, hi] are taken in flat order: [lo, hi] is one key (ties to the lower flat index), or need covers
// every key in it.
CROSSDIFF_HD bool choose(bool above, bool tie, int64_t tie_rank, int64_t need) {
  return above || (tie && tie_rank < need);
}
// An entry kept with a score <= 0 carries 0; a NaN score keeps its f.
template <typename T>
CROSSDIFF_HD T kept_value(uint32_t key, T fv) {
  return key <= kZeroKey ? T(0.0f) : fv;
}
// First output slot of a tile (or chunk): the entries above, and the ties taken, in earlier ones (flat order).
CROSSDIFF_HD int64_t first_slot(int64_t above_before, int64_t ties_before, int64_t need) {
  return above_before + (ties_before < need ? ties_before : need);
}

// ---- count + ordered write over f (the ties path; threshold_select too) ----

template <typename T, int VEC>
struct TileEntries {
  T f[VEC];
  uint32_t key[VEC];
  bool above[VEC], tie[VEC];
  int64_t row, col0;
};

template <typename T, int VEC>
CROSSDIFF_HD void tile_entries(const T* f, const float* w, const Geometry& g, int64_t t, int tid, uint32_t lo,
                               uint32_t hi, TileEntries<T, VEC>& e) {
  e.row = t / g.n_slabs;
  e.col0 = thread_col0(t - e.row * g.n_slabs, tid, g);
  float wr[VEC];
  bool in[VEC];
  load_weights<VEC>(w, g, e.col0, wr, in);
  load_row<T, VEC>(f, g, e.row, true, e.col0, e.f);
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) {
    e.key[v] = entry_key(e.f[v], wr[v]);
    e.above[v] = in[v] && key_above(e.key[v], hi);
    e.tie[v] = in[v] && key_tie(e.key[v], lo, hi);
  }
}

template <typename T, int VEC>
CROSSDIFF_HD int count_ties(const TileEntries<T, VEC>& e) {
  int n = 0;
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) n += e.tie[v];
  return n;
}

template <typename T, int VEC>
CROSSDIFF_HD int choose_entries(const TileEntries<T, VEC>& e, int64_t rank, int64_t need, bool (&chosen)[VEC]) {
  int n = 0;
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) {
    chosen[v] = choose(e.above[v], e.tie[v], rank, need);
    rank += e.tie[v];
    n += chosen[v];
  }
  return n;
}

template <typename T, typename I, int VEC>
CROSSDIFF_HD void write_entries(const TileEntries<T, VEC>& e, const bool (&chosen)[VEC], int64_t slot, T* values,
                                I* indices) {
  CROSSDIFF_UNROLL
  for (int v = 0; v < VEC; ++v) {
    if (chosen[v]) {
      values[slot] = kept_value(e.key[v], e.f[v]);
      indices[slot] = static_cast<I>(e.col0 + v);
      ++slot;
    }
  }
}

}  // namespace select_phases
}  // namespace crossdiff
