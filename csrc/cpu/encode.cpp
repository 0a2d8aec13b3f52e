// paired_encode on the CPU: one GEMM with K = M*d over x read as [B, M*d] (a view whenever x's models are
// adjacent in memory), bias in the GEMM, ReLU in place (unless the caller asks for the pre-activations). Half and bfloat16 run the fp32 GEMM on converted copies.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace crossdiff {

at::Tensor paired_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, bool relu) {
  check_paired_encode(x, W_enc, b_enc);
  const int64_t B = x.size(0), K = x.size(1) * x.size(2), F = W_enc.size(0);
  // reshape is a view when x is [B, M, d] with adjacent models (the contiguous case); otherwise one copy.
  at::Tensor x2 = x.reshape({B, K});
  at::Tensor W2 = W_enc.reshape({F, K});
  if (x.scalar_type() != at::kFloat) {
    // ATen's half/bfloat16 CPU GEMM is not IEEE at NaN and Inf: a NaN in one row of x can turn a neighbouring
    // output row into NaN (bfloat16, B = 17, K = 33, F = 15). The fp32 GEMM keeps every output to its own row
    // and column, and accumulates in fp32 as the reference does; the converted copies cost O((B + F) K) beside
    // the GEMM's O(B F K).
    at::Tensor f = at::addmm(b_enc.to(at::kFloat), x2.to(at::kFloat), W2.to(at::kFloat).t());
    if (relu) f.relu_();
    return f.to(x.scalar_type());
  }
  at::Tensor f = at::addmm(b_enc, x2, W2.t());
  if (relu) f.relu_();
  return f;
}

TORCH_LIBRARY_IMPL(crossdiff, CPU, m) { m.impl("paired_encode", &paired_encode_cpu); }

}  // namespace crossdiff
