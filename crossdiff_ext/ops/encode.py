"""paired_encode: f = ReLU(x W_enc^T + b_enc) over all M models in one GEMM with K = M*d.

Reference, fake kernel, autograd formula and the backend-dispatching entry point.
"""

import torch

from .. import backends
from . import validate


def paired_encode_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, relu: bool = True
) -> torch.Tensor:
    """Plain-PyTorch paired_encode: ReLU(x W_enc^T + b_enc) [B, F] in x's dtype, accumulated in fp32 (the
    pre-activations without relu)."""
    B, F, K = x.shape[0], W_enc.shape[0], x.shape[1] * x.shape[2]  # K explicit: B, F or K may be 0
    pre = x.reshape(B, K).float() @ W_enc.reshape(F, K).float().T + b_enc.float()
    return (torch.relu(pre) if relu else pre).to(x.dtype)


@torch.library.register_fake("crossdiff::paired_encode")
def paired_encode_fake(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Fake (meta) kernel of paired_encode: checks the arguments, returns an empty f [B, F]."""
    validate.paired_encode(x, W_enc, b_enc)  # also catches meta tensors mixed with real ones
    return x.new_empty(x.shape[0], W_enc.shape[0])


def _setup_context(ctx, inputs, output):
    x, W_enc = inputs[:2]
    ctx.relu = inputs[3] if len(inputs) > 3 else True
    ctx.save_for_backward(x, W_enc, output)


def _backward(ctx, grad_f):
    # The dense op's own gradient (standalone use). The CrossCoder never materialises grad_f: it uses the
    # sparse backward of ops.autograd.EncodeSparse.
    x, W_enc, f = ctx.saved_tensors
    B, F, K = x.shape[0], W_enc.shape[0], x.shape[1] * x.shape[2]
    gpre = torch.where(f > 0, grad_f, torch.zeros((), dtype=grad_f.dtype, device=grad_f.device)) if ctx.relu else grad_f
    grad_x = (gpre @ W_enc.reshape(F, K)).view(x.shape) if ctx.needs_input_grad[0] else None
    grad_W = (gpre.T @ x.reshape(B, K)).view(W_enc.shape) if ctx.needs_input_grad[1] else None
    grad_b = gpre.sum(0) if ctx.needs_input_grad[2] else None
    return grad_x, grad_W, grad_b, None


def register_encode_autograd(qualname: str) -> None:
    """Register the dense gradient of paired_encode for the op `qualname` (the crossdiff and crossdiff_triton ops)."""
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


register_encode_autograd("crossdiff::paired_encode")


def paired_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """x [B, M, d], W_enc [F, M, d], b_enc [F] -> f [B, F] in x's dtype (fp32 accumulation).

    relu=False returns the pre-activations x W_enc^T + b_enc, for batch_topk / threshold_select with relu=True,
    which apply the ReLU as they read them.
    """
    validate.paired_encode(x, W_enc, b_enc)
    validate.flag("relu", relu)
    return backends.kernels(backends.resolve(x.device)).paired_encode(x, W_enc, b_enc, relu)


# op -> its fake (meta) kernel, shared with the crossdiff_triton ops (ops/triton_ops.py)
FAKES = {"paired_encode": paired_encode_fake}
