// Argument checks shared by every backend's C++ entry points. Each message names the argument and what was
// expected, so a bad call fails before a kernel touches memory.
#pragma once
#include <ATen/ATen.h>

namespace crossdiff {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == rank, name, " must have shape ", shape, " (rank ", rank, "), got rank ", t.dim(),
              " with sizes ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(), " and ",
              b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
              t.scalar_type());
}

// Codes need rows: with B = 0 every entry would belong to no row, and the GPU kernels (which do not read
// row_ptr[B] back to the host) would index row 0 of an empty tensor. Checked from sizes alone: no sync.
inline void check_rows_for_codes(const at::Tensor& row_ptr, int64_t nnz, const char* name) {
  TORCH_CHECK(row_ptr.size(0) >= 2 || nnz == 0, name, " has nnz = ", nnz,
              " entries but row_ptr has B+1 = 1 entry (B = 0 rows); codes of an empty batch have nnz = 0");
}

// CSR codes: values [nnz], indices [nnz] (latent ids), row_ptr [B+1] int64.
inline void check_codes(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& row_ptr) {
  check_rank(values, 1, "values", "[nnz]");
  check_rank(indices, 1, "indices", "[nnz]");
  check_rank(row_ptr, 1, "row_ptr", "[B+1]");
  check_index(indices, "indices");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong, "row_ptr must be int64, got ", row_ptr.scalar_type());
  TORCH_CHECK(row_ptr.size(0) >= 1, "row_ptr must have B+1 >= 1 entries");
  TORCH_CHECK(values.size(0) == indices.size(0), "values and indices must have the same length (nnz), got ",
              values.size(0), " and ", indices.size(0));
  check_same_device(values, "values", indices, "indices");
  check_same_device(values, "values", row_ptr, "row_ptr");
  check_rows_for_codes(row_ptr, indices.size(0), "indices");
}

inline void check_paired_encode(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc) {
  check_rank(x, 3, "x", "[B, M, d]");
  check_rank(W_enc, 3, "W_enc", "[F, M, d]");
  check_rank(b_enc, 1, "b_enc", "[F]");
  check_floating(x, "x");
  check_same_dtype(x, "x", W_enc, "W_enc");
  check_same_dtype(x, "x", b_enc, "b_enc");
  check_same_device(x, "x", W_enc, "W_enc");
  check_same_device(x, "x", b_enc, "b_enc");
  TORCH_CHECK(x.size(1) == W_enc.size(1) && x.size(2) == W_enc.size(2), "x [B, M, d] must match W_enc [F, M, d] in M and d, got x ",
              x.sizes(), " and W_enc ", W_enc.sizes());
  TORCH_CHECK(b_enc.size(0) == W_enc.size(0), "b_enc must have F = ", W_enc.size(0), " entries, got ", b_enc.size(0));
}

// Selection inputs: f [B, F] floating, w [F] float32 decoder-norm weights, same device.
inline void check_selection(const at::Tensor& f, const at::Tensor& w) {
  check_rank(f, 2, "f", "[B, F]");
  check_rank(w, 1, "w", "[F]");
  check_floating(f, "f");
  TORCH_CHECK(w.scalar_type() == at::kFloat, "w (decoder-norm weights) must be float32, got ", w.scalar_type());
  check_same_device(f, "f", w, "w");
  TORCH_CHECK(w.size(0) == f.size(1), "w must have F = ", f.size(1), " entries (f is [B, F] = ", f.sizes(), "), got ",
              w.size(0));
}

inline void check_batch_topk(const at::Tensor& f, const at::Tensor& w, int64_t K) {
  check_selection(f, w);
  const int64_t N = f.size(0) * f.size(1);
  TORCH_CHECK(K >= 1 && K <= N, "K = k * B must be in [1, B * F] = [1, ", N, "], got ", K);
}

inline void check_threshold(double theta) {
  TORCH_CHECK(theta >= 0.0, "theta must be >= 0 (an unset threshold is -1: set it or use batch top-k), got ", theta);
}

// W [F, M, d] dictionary rows addressed by the codes; dense [B, M, d] per-row tensors.
inline void check_dictionary(const at::Tensor& values, const at::Tensor& W) {
  check_rank(W, 3, "W", "[F, M, d]");
  check_floating(W, "W");
  check_same_dtype(values, "values", W, "W");
  check_same_device(values, "values", W, "W");
}

inline void check_sparse_decode(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& row_ptr,
                                const at::Tensor& W, const c10::optional<at::Tensor>& bias) {
  check_codes(values, indices, row_ptr);
  check_dictionary(values, W);
  if (bias.has_value()) {
    check_rank(*bias, 2, "bias", "[M, d]");
    check_same_dtype(W, "W", *bias, "bias");
    check_same_device(W, "W", *bias, "bias");
    TORCH_CHECK(bias->size(0) == W.size(1) && bias->size(1) == W.size(2), "bias must be [M, d] = [", W.size(1), ", ",
                W.size(2), "], got ", bias->sizes());
  }
}

inline void check_rows_dense(const at::Tensor& dense, const char* name, const at::Tensor& row_ptr, const at::Tensor& W) {
  check_rank(dense, 3, name, "[B, M, d]");
  TORCH_CHECK(dense.size(0) == row_ptr.size(0) - 1, name, " must have B = ", row_ptr.size(0) - 1,
              " rows (row_ptr has B+1 entries), got ", dense.size(0));
  TORCH_CHECK(dense.size(1) == W.size(1) && dense.size(2) == W.size(2), name, " must be [B, M, d] with M, d of W ",
              W.sizes(), ", got ", dense.sizes());
  check_same_dtype(dense, name, W, "W");
  check_same_device(dense, name, W, "W");
}

inline void check_sparse_values_grad(const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& row_ptr,
                                     const at::Tensor& W) {
  check_rank(indices, 1, "indices", "[nnz]");
  check_index(indices, "indices");
  check_rank(row_ptr, 1, "row_ptr", "[B+1]");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong, "row_ptr must be int64, got ", row_ptr.scalar_type());
  check_rank(W, 3, "W", "[F, M, d]");
  check_floating(W, "W");
  check_rows_dense(grad_out, "grad_out", row_ptr, W);
  check_same_device(indices, "indices", W, "W");
  check_same_device(row_ptr, "row_ptr", W, "W");
  check_rows_for_codes(row_ptr, indices.size(0), "indices");
}

inline void check_latent_order(const at::Tensor& indices, const at::Tensor& row_ptr, int64_t n_latents) {
  check_rank(indices, 1, "indices", "[nnz]");
  check_index(indices, "indices");
  check_rank(row_ptr, 1, "row_ptr", "[B+1]");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong, "row_ptr must be int64, got ", row_ptr.scalar_type());
  TORCH_CHECK(row_ptr.size(0) >= 1, "row_ptr must have B+1 >= 1 entries");
  TORCH_CHECK(n_latents >= 1, "n_latents must be >= 1, got ", n_latents);
  check_same_device(indices, "indices", row_ptr, "row_ptr");
  check_rows_for_codes(row_ptr, indices.size(0), "indices");
}

inline void check_sparse_weight_grad(const at::Tensor& values, const at::Tensor& dense, const at::Tensor& col_ptr,
                                     const at::Tensor& perm, const at::Tensor& rows) {
  check_rank(values, 1, "values", "[nnz]");
  check_floating(values, "values");
  check_rank(dense, 3, "dense", "[B, M, d]");
  check_same_dtype(values, "values", dense, "dense");
  check_same_device(values, "values", dense, "dense");
  check_rank(col_ptr, 1, "col_ptr", "[F+1]");
  TORCH_CHECK(col_ptr.size(0) >= 2, "col_ptr must have F+1 >= 2 entries, got ", col_ptr.size(0));
  for (const auto& [t, name] : {std::pair{&col_ptr, "col_ptr"}, {&perm, "perm"}, {&rows, "rows"}}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
    check_same_device(values, "values", *t, name);
  }
  check_rank(perm, 1, "perm", "[nnz]");
  check_rank(rows, 1, "rows", "[nnz]");
  TORCH_CHECK(perm.size(0) == values.size(0) && rows.size(0) == values.size(0),
              "perm and rows must have nnz = ", values.size(0), " entries, got ", perm.size(0), " and ", rows.size(0));
  TORCH_CHECK(dense.size(0) >= 1 || values.size(0) == 0, "values has nnz = ", values.size(0),
              " entries but dense has B = 0 rows; codes of an empty batch have nnz = 0");
}

}  // namespace crossdiff
