"""Autograd functions of the crosscoder layer: encoder + selection, and the sparse decoder.

EncodeSparse fuses paired_encode with the selection so that its backward never sees a dense [B, F] gradient:
only the kept entries carry gradient, and the encoder's weight gradient is a per-latent reduction over them.
Both functions remember the backend that ran the forward, so backward runs on the same kernels even when it is
called outside a `crossdiff_ext.backend(...)` block. The "reference" backend bypasses them: its ops are plain
differentiable PyTorch.
"""

import math
from typing import Any, Optional, Union

import torch

from .. import backends
from . import validate
from .sparse import decode_backward


def _encode_select(kernels, x, W_enc, b_enc, w, mode, param, with_order=False):
    # The encoder writes the pre-activations and the selection applies the ReLU as it reads them: the same codes
    # as selecting on ReLU(pre), without a ReLU pass over [B, F] where the GEMM cannot fuse one (cuBLAS).
    pre = kernels.paired_encode(x, W_enc, b_enc, False)
    if mode == "topk":
        out = kernels.batch_topk(pre, w, param, True)
    else:
        values, indices, row_ptr = kernels.threshold_select(pre, w, param, True)
        out = (values, indices, row_ptr, torch.full((), math.inf, dtype=torch.float32, device=pre.device))
    if with_order:  # the by-latent order both weight gradients of a training step reduce over
        out = (*out, *kernels.latent_order(out[1], out[2], W_enc.shape[0]))
    return out


class EncodeSparse(torch.autograd.Function):
    """(x, W_enc, b_enc, w) -> CSR codes of ReLU(x W_enc^T + b_enc) selected on s = f * w.

    mode "topk": exact batch top-K (param = K); mode "threshold": s > theta (param = theta).
    Returns (values, indices, row_ptr, min_score); min_score is +inf in threshold mode. With `with_order` it also
    returns the codes' latent order (col_ptr, perm, rows): a training step computes it once, here, and both sparse
    backwards (this one's encoder gradient and the decoder's, given the order) reduce over it.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        w: torch.Tensor,
        mode: str,
        param: Union[int, float],
        backend: str,
        with_order: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Encode and select on the backend `backend`: (values, indices, row_ptr, min_score[, col_ptr, perm,
        rows])."""
        return _encode_select(backends.kernels(backend), x, W_enc, b_enc, w, mode, param, with_order)

    @staticmethod
    def setup_context(
        ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]
    ) -> None:
        """Save x, W_enc, the codes (and their latent order, when computed) for the sparse backward, and the
        backend that ran."""
        x, W_enc, backend = inputs[0], inputs[1], inputs[6]
        values, indices, row_ptr, min_score, *order = output
        ctx.backend = backend
        ctx.save_for_backward(x, W_enc, values, indices, row_ptr, *order)
        ctx.mark_non_differentiable(indices, row_ptr, min_score, *order)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_values: torch.Tensor, *_: Optional[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients of x, W_enc and b_enc through the kept values only (no dense [B, F] gradient)."""
        x, W_enc, values, indices, row_ptr, *order = ctx.saved_tensors
        kernels = backends.kernels(ctx.backend)
        # A kept entry with value 0 is either a ReLU zero or a non-positive score: neither passes gradient.
        gpre = torch.where(values != 0, grad_values, torch.zeros((), dtype=grad_values.dtype, device=values.device))
        needs_x, needs_W, needs_b = ctx.needs_input_grad[:3]
        grad_x = kernels.sparse_decode(gpre, indices, row_ptr, W_enc, None) if needs_x else None
        grad_W = grad_b = None
        if needs_W or needs_b:
            if len(order) == 0:
                order = kernels.latent_order(indices, row_ptr, W_enc.shape[0])
            grad_W, sums = kernels.sparse_weight_grad(gpre, x, *order)
            grad_b = sums.to(W_enc.dtype) if needs_b else None
            grad_W = grad_W if needs_W else None
        return grad_x, grad_W, grad_b, *(None,) * (len(ctx.needs_input_grad) - 3)


class SparseDecode(torch.autograd.Function):
    """(values, indices, row_ptr, W, bias[, col_ptr, perm, rows]) -> codes @ W + bias, [B, M, d], with a sparse
    backward; given the codes' latent order, the weight gradient reduces over it instead of sorting again."""

    @staticmethod
    def forward(
        values: torch.Tensor,
        indices: torch.Tensor,
        row_ptr: torch.Tensor,
        W: torch.Tensor,
        bias: Optional[torch.Tensor],
        backend: str,
        *order: torch.Tensor,
    ) -> torch.Tensor:
        """Decode on the backend `backend`: [B, M, d] in W's dtype."""
        return backends.kernels(backend).sparse_decode(values, indices, row_ptr, W, bias)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        """Save the codes (with their latent order, when given) and W for the sparse backward, and the backend."""
        values, indices, row_ptr, W, bias, backend, *order = inputs
        ctx.backend = backend
        ctx.has_bias = bias is not None
        ctx.save_for_backward(values, indices, row_ptr, W, *order)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], ...]:
        """Sparse gradients of values, W and bias (see decode_backward)."""
        values, indices, row_ptr, W, *order = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gv, gW, gb = decode_backward(
            backends.kernels(ctx.backend),
            grad_out,
            values,
            indices,
            row_ptr,
            W,
            needs[0],
            needs[3],
            ctx.has_bias and needs[4],
            tuple(order) if len(order) > 0 else None,
        )
        return gv, None, None, gW, gb, *(None,) * (len(needs) - 5)


LatentOrder = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def encode_sparse(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w: torch.Tensor,
    mode: str,
    param: Union[int, float],
    *,
    with_order: bool = False,
) -> tuple[Any, ...]:
    """Encoder + selection on the current backend; differentiable in x, W_enc, b_enc through the kept values.

    Returns (values, indices, row_ptr, min_score); with `with_order`, a fifth element: the codes' latent order
    (col_ptr, perm, rows) for decode_sparse(..., order=...), computed once for both sparse backwards of a training
    step (None on the reference backend, whose ops are plain differentiable PyTorch and need none).
    """
    validate.encode_selection(x, W_enc, b_enc, w, mode, param)
    name = backends.resolve(x.device)
    if name == "reference":
        out = _encode_select(backends.kernels(name), x, W_enc, b_enc, w, mode, param)
        return (*out, None) if with_order else out
    out = EncodeSparse.apply(x, W_enc, b_enc, w, mode, param, name, with_order)
    return (*out[:4], tuple(out[4:])) if with_order else out


def decode_sparse(
    values: torch.Tensor,
    indices: torch.Tensor,
    row_ptr: torch.Tensor,
    W: torch.Tensor,
    bias: Optional[torch.Tensor],
    order: Optional[LatentOrder] = None,
) -> torch.Tensor:
    """Sparse decoder on the current backend, differentiable in values, W and bias. `order`: the codes' latent
    order from encode_sparse(..., with_order=True), reused by the weight gradient (None: sorted in backward)."""
    validate.sparse_decode(values, indices, row_ptr, W, bias)
    if order is not None:
        validate.codes_order(order, values, W)
    name = backends.resolve(W.device)
    if name == "reference":
        return backends.kernels(name).sparse_decode(values, indices, row_ptr, W, bias)
    return SparseDecode.apply(values, indices, row_ptr, W, bias, name, *(order or ()))
