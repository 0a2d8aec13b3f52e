// Batch-wide selection on the CPU: exact top K of s = f * w by radix select on 32-bit order-preserving keys.
// One histogram pass over f narrows the K-th largest key to a 12-bit bin (more passes only while that bin holds
// too many entries to sort); one collection pass gathers the entries above the bin (certainly kept) and those in
// it (candidates); the candidates are ranked exactly and merged in flat order into CSR. Two passes over f in the
// usual case, no [B, F] temporary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../score_key.h"
#include "vector_math.h"

namespace crossdiff {
namespace {

// Radix digits from the top of the key: 12 + 12 + 8 bits.
constexpr int kDigitShift[3] = {20, 8, 0};
constexpr int kDigitBits[3] = {12, 12, 8};
constexpr int64_t kBins = 1 << 12;
// Interleaved histogram copies: the ReLU zeros all hit one bin, and a single counter would serialise their
// increments; four copies of 4096 int64 bins (128 KiB) still sit in L2.
constexpr int64_t kCopies = 4;

// Rows are split into a fixed number of chunks, each with its own histogram and lists, so that the result does
// not depend on which thread ran which chunk.
int64_t chunk_count(int64_t B) { return std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads())); }

template <typename Fn>
void for_each_chunk(int64_t B, int64_t chunks, Fn fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, B * c / chunks, B * (c + 1) / chunks);
  });
}

// The score s = f * w of entry j (of ReLU(f) with kRelu: f holds pre-activations).
template <bool kRelu, typename scalar_t>
inline float score_of(const scalar_t* row, const float* w, int64_t j) {
  return selection_input(static_cast<float>(row[j]), kRelu) * w[j];
}

template <bool kRelu, typename scalar_t>
inline uint32_t key_of(const scalar_t* row, const float* w, int64_t j) {
  return score_key(score_of<kRelu>(row, w, j));
}

// Histogram of one digit of the keys in [lo, hi] (every key when kFilter is false).
template <typename scalar_t, bool kFilter, bool kRelu>
CROSSDIFF_CPU_CLONES void histogram_rows(const scalar_t* f, const float* w, int64_t r0, int64_t r1, int64_t F, uint32_t lo, uint32_t hi,
                    int shift, uint32_t mask, int64_t* hist) {
  for (int64_t b = r0; b < r1; ++b) {
    const scalar_t* row = f + b * F;
    for (int64_t j = 0; j < F; ++j) {
      const uint32_t key = key_of<kRelu>(row, w, j);
      if (!kFilter || (key >= lo && key <= hi)) ++hist[(j & (kCopies - 1)) * kBins + ((key >> shift) & mask)];
    }
  }
}

struct ChunkLists {
  std::vector<int64_t> above;  // flat indices with key > hi: certainly selected
  std::vector<int64_t> cand;   // flat indices with lo <= key <= hi
  std::vector<uint32_t> cand_key;
};

// Entries above the candidate range, and (up to `cap` of) those inside it, in flat order.
template <bool kRelu, typename scalar_t>
CROSSDIFF_CPU_CLONES void collect_rows(const scalar_t* f, const float* w, int64_t r0, int64_t r1, int64_t F,
                                       uint32_t lo, uint32_t hi, int64_t cap, ChunkLists& out) {
  for (int64_t b = r0; b < r1; ++b) {
    const scalar_t* row = f + b * F;
    for (int64_t j = 0; j < F; ++j) {
      const uint32_t key = key_of<kRelu>(row, w, j);
      if (key < lo) continue;  // the common case: one predictable branch per entry
      if (key > hi) {
        out.above.push_back(b * F + j);
      } else if (static_cast<int64_t>(out.cand.size()) < cap) {
        out.cand.push_back(b * F + j);
        out.cand_key.push_back(key);
      }
    }
  }
}

template <typename scalar_t, typename index_t, bool kRelu>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_topk_impl(const at::Tensor& f_in, const at::Tensor& w_in,
                                                                       int64_t K) {
  const at::Tensor f = f_in.contiguous(), w = w_in.contiguous();
  const int64_t B = f.size(0), F = f.size(1);
  const scalar_t* fp = f.data_ptr<scalar_t>();
  const float* wp = w.data_ptr<float>();
  const int64_t chunks = chunk_count(B);
  // Candidates are ranked by a sort: allow about K of them (the sort then costs about what the merge does).
  const int64_t candidate_limit = std::max<int64_t>(K, 1 << 16);

  // Narrow [lo, hi] digit by digit until it holds the K-th largest key and few enough entries.
  uint32_t lo = 0, hi = 0xFFFFFFFFu;
  int64_t n_above = 0, n_in_range = B * F;
  std::vector<int64_t> hist(chunks * kCopies * kBins);
  for (int level = 0; level < 3 && n_in_range > candidate_limit; ++level) {
    const int shift = kDigitShift[level];
    const uint32_t mask = (1u << kDigitBits[level]) - 1;
    std::fill(hist.begin(), hist.end(), 0);
    for_each_chunk(B, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
      int64_t* h = hist.data() + c * kCopies * kBins;
      if (level == 0)
        histogram_rows<scalar_t, false, kRelu>(fp, wp, r0, r1, F, lo, hi, shift, mask, h);
      else
        histogram_rows<scalar_t, true, kRelu>(fp, wp, r0, r1, F, lo, hi, shift, mask, h);
    });
    int64_t cum = 0;
    for (int64_t digit = mask; digit >= 0; --digit) {
      int64_t n = 0;
      for (int64_t copy = 0; copy < chunks * kCopies; ++copy) n += hist[copy * kBins + digit];
      if (n_above + cum + n >= K) {
        n_above += cum;
        n_in_range = n;
        lo |= static_cast<uint32_t>(digit) << shift;
        hi = lo | ((shift == 0) ? 0u : ((1u << shift) - 1));
        break;
      }
      cum += n;
      TORCH_INTERNAL_ASSERT(digit > 0, "batch_topk: the histogram holds fewer than K entries");
    }
  }
  const bool exact = lo == hi;  // every candidate has the boundary key: the lowest flat indices win
  const int64_t need = K - n_above;  // candidates to keep, 1 <= need <= n_in_range

  std::vector<ChunkLists> lists(chunks);
  // With an exact boundary key each chunk needs at most `need` ties: the lowest flat indices win.
  const int64_t cap = exact ? need : std::numeric_limits<int64_t>::max();
  for_each_chunk(B, chunks, [&](int64_t c, int64_t r0, int64_t r1) { collect_rows<kRelu>(fp, wp, r0, r1, F, lo, hi, cap, lists[c]); });

  // Rank the candidates (flat order across chunks) by key, descending; a stable sort keeps lower flat indices
  // first among equal keys, which is the tie rule.
  std::vector<int64_t> cand;
  std::vector<uint32_t> cand_key;
  std::vector<int64_t> above;
  above.reserve(n_above);
  for (const ChunkLists& l : lists) {
    above.insert(above.end(), l.above.begin(), l.above.end());
    cand.insert(cand.end(), l.cand.begin(), l.cand.end());
    cand_key.insert(cand_key.end(), l.cand_key.begin(), l.cand_key.end());
  }
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(above.size()) == n_above && static_cast<int64_t>(cand.size()) >= need,
                        "batch_topk: collected ", above.size(), " + ", cand.size(), " entries, expected ", n_above,
                        " + at least ", need);
  std::vector<char> taken(cand.size(), 0);
  if (exact) {
    std::fill(taken.begin(), taken.begin() + need, 1);
  } else {
    std::vector<int64_t> order(cand.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cand_key[a] > cand_key[b]; });
    for (int64_t i = 0; i < need; ++i) taken[order[i]] = 1;
  }

  // Merge the two flat-ordered lists into CSR order.
  at::Tensor values = at::empty({K}, f.options());
  at::Tensor indices = at::empty({K}, f.options().dtype(c10::CppTypeToScalarType<index_t>::value));
  at::Tensor row_ptr = at::zeros({B + 1}, f.options().dtype(at::kLong));
  scalar_t* vp = values.data_ptr<scalar_t>();
  index_t* ip = indices.data_ptr<index_t>();
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  float min_score = std::numeric_limits<float>::infinity();
  size_t a = 0, c = 0;
  for (int64_t out = 0; out < K; ++out) {
    while (c < cand.size() && !taken[c]) ++c;
    const bool from_above = c == cand.size() || (a < above.size() && above[a] < cand[c]);
    const int64_t flat = from_above ? above[a++] : cand[c++];
    const int64_t b = flat / F, j = flat - b * F;
    const float s = score_of<kRelu>(fp + b * F, wp, j);
    // The kept value is the unscaled f (s > 0: f > 0 also with kRelu); an entry kept with a non-positive score carries 0. A NaN score is not
    // non-positive: it keeps its f (NaN, or the inf whose weight was 0), so NaN reaches the output.
    vp[out] = s <= 0.0f ? scalar_t(0) : fp[flat];
    if (s > 0.0f) min_score = std::min(min_score, s);
    ip[out] = static_cast<index_t>(j);
    ++rp[b + 1];
  }
  for (int64_t b = 0; b < B; ++b) rp[b + 1] += rp[b];
  return {values, indices, row_ptr, at::scalar_tensor(min_score, f.options().dtype(at::kFloat))};
}

template <typename scalar_t, typename index_t, bool kRelu>
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_select_impl(const at::Tensor& f_in, const at::Tensor& w_in,
                                                                     float theta) {
  const at::Tensor f = f_in.contiguous(), w = w_in.contiguous();
  const int64_t B = f.size(0), F = f.size(1);
  const scalar_t* fp = f.data_ptr<scalar_t>();
  const float* wp = w.data_ptr<float>();
  const int64_t chunks = chunk_count(B);

  at::Tensor row_ptr = at::empty({B + 1}, f.options().dtype(at::kLong));
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  rp[0] = 0;
  for_each_chunk(B, chunks, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      int64_t n = 0;
      for (int64_t j = 0; j < F; ++j) n += !(score_of<kRelu>(fp + b * F, wp, j) <= theta);
      rp[b + 1] = n;
    }
  });
  for (int64_t b = 0; b < B; ++b) rp[b + 1] += rp[b];
  const int64_t nnz = rp[B];
  at::Tensor values = at::empty({nnz}, f.options());
  at::Tensor indices = at::empty({nnz}, f.options().dtype(c10::CppTypeToScalarType<index_t>::value));
  scalar_t* vp = values.data_ptr<scalar_t>();
  index_t* ip = indices.data_ptr<index_t>();
  for_each_chunk(B, chunks, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      int64_t out = rp[b];
      for (int64_t j = 0; j < F; ++j)
        if (!(score_of<kRelu>(fp + b * F, wp, j) <= theta)) {  // a NaN score is selected
          vp[out] = fp[b * F + j];
          ip[out++] = static_cast<index_t>(j);
        }
    }
  });
  return {values, indices, row_ptr};
}

// Instantiates `impl` for the dtype of f, the latent id type F needs and the relu choice.
template <typename Out, typename Impl>
Out dispatch_selection(const at::Tensor& f, bool relu, Impl impl) {
  Out out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "selection_cpu", [&] {
    const bool i32 = latent_index_is_int32(f.size(1));
    if (relu)
      out = i32 ? impl(scalar_t(), int32_t(), std::true_type()) : impl(scalar_t(), int64_t(), std::true_type());
    else
      out = i32 ? impl(scalar_t(), int32_t(), std::false_type()) : impl(scalar_t(), int64_t(), std::false_type());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_topk_cpu(const at::Tensor& f, const at::Tensor& w,
                                                                       int64_t K, bool relu) {
  check_batch_topk(f, w, K);
  return dispatch_selection<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>>(
      f, relu, [&](auto s, auto i, auto r) {
        return batch_topk_impl<decltype(s), decltype(i), decltype(r)::value>(f, w, K);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_select_cpu(const at::Tensor& f, const at::Tensor& w,
                                                                    double theta, bool relu) {
  check_selection(f, w);
  check_threshold(theta);
  return dispatch_selection<std::tuple<at::Tensor, at::Tensor, at::Tensor>>(
      f, relu, [&](auto s, auto i, auto r) {
        return threshold_select_impl<decltype(s), decltype(i), decltype(r)::value>(f, w, static_cast<float>(theta));
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(crossdiff, CPU, m) {
  m.impl("batch_topk", &batch_topk_cpu);
  m.impl("threshold_select", &threshold_select_cpu);
}

}  // namespace crossdiff
