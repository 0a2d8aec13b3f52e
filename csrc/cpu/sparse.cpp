// Sparse decoder and the sparse backward on the CPU. Every reduction runs in fp32 in a fixed order (entries
// of a row in CSR order; rows of a latent ascending), so results are deterministic and thread-count free.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "vector_math.h"

namespace crossdiff {
namespace {

// Rows of the sparse ops are short (k ~ 100 entries of M*d floats): a grain of 16 rows keeps thread
// start-up cost small against the work.
constexpr int64_t kRowGrain = 16;

template <typename index_t>
inline int64_t checked_latent(const index_t* ip, int64_t e, int64_t F) {
  const int64_t j = static_cast<int64_t>(ip[e]);
  TORCH_CHECK(j >= 0 && j < F, "indices[", e, "] = ", j, " is out of range for F = ", F, " latents");
  return j;
}

// row_ptr (or col_ptr) must run from 0 to nnz without decreasing: one O(B) pass before any kernel trusts it
// as loop bounds.
inline void check_row_ptr_bounds(const int64_t* rp, int64_t B, int64_t nnz, const char* name = "row_ptr") {
  TORCH_CHECK(rp[0] == 0 && rp[B] == nnz, name, " must start at 0 and end at nnz = ", nnz, ", got ", rp[0], " and ",
              rp[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rp[b] <= rp[b + 1], name, " must be non-decreasing, got ", name, "[", b, "] = ", rp[b], " > ", name,
                "[", b + 1, "] = ", rp[b + 1]);
}

template <typename scalar_t, typename index_t>
void decode_rows(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& row_ptr, const at::Tensor& W,
                 const at::Tensor* bias, at::Tensor& out) {
  const int64_t B = row_ptr.size(0) - 1, F = W.size(0), D = W.size(1) * W.size(2);
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const index_t* ip = indices.data_ptr<index_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const scalar_t* wp = W.data_ptr<scalar_t>();
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  check_row_ptr_bounds(rp, B, values.size(0));
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(D);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < D; ++t) acc[t] = bp ? static_cast<float>(bp[t]) : 0.0f;
      for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
        const float v = static_cast<float>(vp[e]);
        const scalar_t* row = wp + checked_latent(ip, e, F) * D;
        axpy(acc.data(), v, row, D);
      }
      store(op + b * D, acc.data(), D);
    }
  });
}

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& row_ptr,
                             const at::Tensor& W_in, const c10::optional<at::Tensor>& bias_in) {
  check_sparse_decode(values, indices, row_ptr, W_in, bias_in);
  const at::Tensor W = W_in.contiguous(), v = values.contiguous(), idx = indices.contiguous(), rp = row_ptr.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  at::Tensor out = at::empty({row_ptr.size(0) - 1, W.size(1), W.size(2)}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "sparse_decode_cpu", [&] {
    if (idx.scalar_type() == at::kInt)
      decode_rows<scalar_t, int32_t>(v, idx, rp, W, bias.defined() ? &bias : nullptr, out);
    else
      decode_rows<scalar_t, int64_t>(v, idx, rp, W, bias.defined() ? &bias : nullptr, out);
  });
  return out;
}

template <typename scalar_t, typename index_t>
void values_grad_rows(const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& row_ptr,
                      const at::Tensor& W, at::Tensor& grad_values) {
  const int64_t B = row_ptr.size(0) - 1, F = W.size(0), D = W.size(1) * W.size(2);
  const scalar_t* gp = grad_out.data_ptr<scalar_t>();
  const index_t* ip = indices.data_ptr<index_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const scalar_t* wp = W.data_ptr<scalar_t>();
  scalar_t* outp = grad_values.data_ptr<scalar_t>();
  check_row_ptr_bounds(rp, B, indices.size(0));
  at::parallel_for(0, B, kRowGrain, [&](int64_t b0, int64_t b1) {
    std::vector<float> g(D);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < D; ++t) g[t] = static_cast<float>(gp[b * D + t]);
      for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
        const scalar_t* row = wp + checked_latent(ip, e, F) * D;
        outp[e] = static_cast<scalar_t>(dot(g.data(), row, D));
      }
    }
  });
}

at::Tensor sparse_values_grad_cpu(const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& row_ptr,
                                  const at::Tensor& W_in) {
  check_sparse_values_grad(grad_out, indices, row_ptr, W_in);
  const at::Tensor W = W_in.contiguous(), g = grad_out.contiguous(), idx = indices.contiguous(), rp = row_ptr.contiguous();
  at::Tensor grad_values = at::empty({indices.size(0)}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "sparse_values_grad_cpu", [&] {
    if (idx.scalar_type() == at::kInt)
      values_grad_rows<scalar_t, int32_t>(g, idx, rp, W, grad_values);
    else
      values_grad_rows<scalar_t, int64_t>(g, idx, rp, W, grad_values);
  });
  return grad_values;
}

template <typename index_t>
void counting_sort(const at::Tensor& indices, const at::Tensor& row_ptr, int64_t F, at::Tensor& col_ptr,
                   at::Tensor& perm, at::Tensor& rows) {
  const int64_t B = row_ptr.size(0) - 1, nnz = indices.size(0);
  const index_t* ip = indices.data_ptr<index_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  int64_t* cp = col_ptr.data_ptr<int64_t>();
  int64_t* pp = perm.data_ptr<int64_t>();
  int64_t* rows_p = rows.data_ptr<int64_t>();
  check_row_ptr_bounds(rp, B, nnz);
  std::fill(cp, cp + F + 1, 0);
  for (int64_t e = 0; e < nnz; ++e) ++cp[checked_latent(ip, e, F) + 1];
  for (int64_t j = 0; j < F; ++j) cp[j + 1] += cp[j];
  std::vector<int64_t> cursor(cp, cp + F);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
      const int64_t pos = cursor[ip[e]]++;
      pp[pos] = e;
      rows_p[pos] = b;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_order_cpu(const at::Tensor& indices, const at::Tensor& row_ptr,
                                                                int64_t n_latents) {
  check_latent_order(indices, row_ptr, n_latents);
  const at::Tensor idx = indices.contiguous(), rp = row_ptr.contiguous();
  auto opts = indices.options().dtype(at::kLong);
  at::Tensor col_ptr = at::empty({n_latents + 1}, opts), perm = at::empty({idx.size(0)}, opts),
             rows = at::empty({idx.size(0)}, opts);
  if (idx.scalar_type() == at::kInt)
    counting_sort<int32_t>(idx, rp, n_latents, col_ptr, perm, rows);
  else
    counting_sort<int64_t>(idx, rp, n_latents, col_ptr, perm, rows);
  return {col_ptr, perm, rows};
}

template <typename scalar_t>
void weight_grad_latents(const at::Tensor& values, const at::Tensor& dense, const at::Tensor& col_ptr,
                         const at::Tensor& perm, const at::Tensor& rows, at::Tensor& grad_W, at::Tensor& sums) {
  const int64_t F = col_ptr.size(0) - 1, B = dense.size(0), D = dense.size(1) * dense.size(2), nnz = values.size(0);
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const scalar_t* dp = dense.data_ptr<scalar_t>();
  const int64_t* cp = col_ptr.data_ptr<int64_t>();
  const int64_t* pp = perm.data_ptr<int64_t>();
  const int64_t* rows_p = rows.data_ptr<int64_t>();
  scalar_t* gp = grad_W.data_ptr<scalar_t>();
  float* sp = sums.data_ptr<float>();
  check_row_ptr_bounds(cp, F, nnz, "col_ptr");
  // Latents are many (F ~ 1e4-1e5) and mostly short: a grain of 64 balances empty and busy latents.
  at::parallel_for(0, F, 64, [&](int64_t j0, int64_t j1) {
    std::vector<float> acc(D);
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      float vsum = 0.0f;
      for (int64_t p = cp[j]; p < cp[j + 1]; ++p) {
        const int64_t e = pp[p], b = rows_p[p];
        TORCH_CHECK(e >= 0 && e < nnz && b >= 0 && b < B, "latent order entry ", p, " (entry ", e, ", row ", b,
                    ") is out of range for nnz = ", nnz, ", B = ", B);
        const float v = static_cast<float>(vp[e]);
        vsum += v;
        const scalar_t* x = dp + b * D;
        axpy(acc.data(), v, x, D);
      }
      store(gp + j * D, acc.data(), D);
      sp[j] = vsum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_weight_grad_cpu(const at::Tensor& values, const at::Tensor& dense,
                                                          const at::Tensor& col_ptr, const at::Tensor& perm,
                                                          const at::Tensor& rows) {
  check_sparse_weight_grad(values, dense, col_ptr, perm, rows);
  const int64_t F = col_ptr.size(0) - 1;
  const at::Tensor v = values.contiguous(), x = dense.contiguous();
  at::Tensor grad_W = at::empty({F, dense.size(1), dense.size(2)}, dense.options());
  at::Tensor sums = at::empty({F}, dense.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "sparse_weight_grad_cpu", [&] {
    weight_grad_latents<scalar_t>(v, x, col_ptr.contiguous(), perm.contiguous(), rows.contiguous(), grad_W, sums);
  });
  return {grad_W, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(crossdiff, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_values_grad", &sparse_values_grad_cpu);
  m.impl("latent_order", &latent_order_cpu);
  m.impl("sparse_weight_grad", &sparse_weight_grad_cpu);
}

}  // namespace crossdiff
