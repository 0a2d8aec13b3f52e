// paired_encode on CUDA: one cuBLAS(Lt) GEMM with K = M*d and the bias in its epilogue (at::addmm), then an
// in-place ReLU: fp32 accumulation; no TF32 for fp32 inputs unless torch.backends.cuda.matmul.allow_tf32 is set.
// Not cuBLASLt's fused RELU_BIAS epilogue (at::_addmm_activation): it is documented as max(x, 0), which would
// turn NaN into 0 where torch.relu keeps NaN, and ATen takes it only for some shapes. The ReLU pass costs one
// read + write of f, so the crosscoder's encoder + selection skips it: it asks for the pre-activations
// (relu = false) and the selection applies the ReLU as it reads them (batch_topk / threshold_select with
// relu = true; cuda/select.cu). x is read in place when its models are adjacent in memory (x[b] one [M*d] row);
// a larger model stride costs one copy of x here (the Triton encoder reads it in place). Reference:
// crossdiff_ext/ops/encode.py; CPU twin: cpu/encode.cpp.
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace crossdiff {
namespace cuda {
namespace {

at::Tensor paired_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, bool relu) {
  check_paired_encode(x, W_enc, b_enc);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), K = x.size(1) * x.size(2), F = W_enc.size(0);
  const at::Tensor x2 = x.reshape({B, K});  // a view when models are adjacent
  const at::Tensor W2 = W_enc.reshape({F, K});
  at::Tensor f = at::addmm(b_enc, x2, W2.t());
  if (relu) f.relu_();
  return f;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossdiff, CUDA, m) { m.impl("paired_encode", &paired_encode_cuda); }

}  // namespace cuda
}  // namespace crossdiff
