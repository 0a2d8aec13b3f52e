"""Batch-wide selection: batch_topk (training) and threshold_select (inference) on s = f * w.

Reference, fake kernels, autograd formulas and the backend-dispatching entry points. The tie rule every
backend follows: among equal scores the lower flat index b * F + j wins; -0 equals +0; NaN ranks highest.
A NaN score (NaN in f or w, or inf * 0) is selected by both ops before any number, whatever K or theta, and
keeps its f as the value, as torch.topk keeps NaN: a NaN propagates to the decoder output instead of vanishing.
"""

import math

import torch

from .. import backends
from . import csr, validate


def selection_scores(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s = f * w in fp32: the exact product every backend ranks."""
    return f.float() * w


def batch_topk_reference(
    f: torch.Tensor, w: torch.Tensor, K: int, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch batch_topk: a stable sort of the scores, the tie rule of the module docstring. relu: f holds
    pre-activations; the selection is that of ReLU(f)."""
    f = torch.relu(f) if relu else f
    B, F = f.shape
    s = selection_scores(f, w).flatten()
    chosen = torch.sort(s, descending=True, stable=True).indices[:K]
    flat = torch.sort(chosen).values
    score = s[flat]
    positive = score > 0
    # A non-positive score carries 0; a NaN score is not non-positive and keeps its f.
    values = torch.where(score <= 0, torch.zeros((), dtype=f.dtype, device=f.device), f.flatten()[flat])
    indices = (flat % F).to(csr.index_dtype(F))
    row_ptr = csr.row_ptr_from_rows(flat // F, B)
    min_score = torch.where(positive, score, torch.full_like(score, math.inf)).min()
    return values, indices, row_ptr, min_score


def threshold_select_reference(
    f: torch.Tensor, w: torch.Tensor, theta: float, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch threshold_select: every entry with s = f * w > theta or s NaN, in CSR order (of ReLU(f) with
    relu)."""
    f = torch.relu(f) if relu else f
    B, F = f.shape
    s = selection_scores(f, w).flatten()
    flat = torch.nonzero((s > theta) | s.isnan()).squeeze(1)
    values = f.flatten()[flat]
    indices = (flat % F).to(csr.index_dtype(F))
    return values, indices, csr.row_ptr_from_rows(flat // F, B)


@torch.library.register_fake("crossdiff::batch_topk")
def batch_topk_fake(
    f: torch.Tensor, w: torch.Tensor, K: int, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake (meta) kernel of batch_topk: K entries, B + 1 row pointers and a scalar min_score."""
    validate.selection(f, w)  # also catches meta tensors mixed with real ones
    B, F = f.shape
    return (
        f.new_empty(K),
        f.new_empty(K, dtype=csr.index_dtype(F)),
        f.new_empty(B + 1, dtype=torch.int64),
        f.new_empty((), dtype=torch.float32),
    )


@torch.library.register_fake("crossdiff::threshold_select")
def threshold_select_fake(
    f: torch.Tensor, w: torch.Tensor, theta: float, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake (meta) kernel of threshold_select: nnz is a dynamic size."""
    validate.threshold_select(f, w, theta)
    B, F = f.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return f.new_empty(nnz), f.new_empty(nnz, dtype=csr.index_dtype(F)), f.new_empty(B + 1, dtype=torch.int64)


def _scatter_to_f(f_shape, grad_values, values, indices, row_ptr, gate):
    # Standalone use only: the gradient w.r.t. f is dense by nature. The CrossCoder avoids it (EncodeSparse).
    B, F = f_shape
    rows = csr.rows_of(row_ptr, values.shape[0])
    g = torch.where(gate, grad_values, torch.zeros((), dtype=grad_values.dtype, device=grad_values.device))
    return grad_values.new_zeros(B, F).index_put((rows, indices.long()), g)


def _setup_select(ctx, inputs, output):
    f = inputs[0]
    values, indices, row_ptr = output[:3]
    ctx.f_shape = tuple(f.shape)
    ctx.save_for_backward(values, indices, row_ptr)
    if len(output) == 4:
        ctx.mark_non_differentiable(output[3])


def _batch_topk_backward(ctx, grad_values, *_):
    values, indices, row_ptr = ctx.saved_tensors
    # Entries kept with a non-positive score carry 0, not f: no gradient reaches f there. Over pre-activations
    # (relu) a kept value != 0 is a positive (or NaN) pre-activation, where ReLU's derivative is 1.
    return _scatter_to_f(ctx.f_shape, grad_values, values, indices, row_ptr, values != 0), None, None, None


def _threshold_select_backward(ctx, grad_values, *_):
    values, indices, row_ptr = ctx.saved_tensors
    return (
        _scatter_to_f(ctx.f_shape, grad_values, values, indices, row_ptr, torch.ones_like(values, dtype=torch.bool)),
        None,
        None,
        None,
    )


def register_selection_autograd(namespace: str) -> None:
    """Register the (dense, standalone-use) gradients of batch_topk and threshold_select in `namespace`."""
    for name, backward in (("batch_topk", _batch_topk_backward), ("threshold_select", _threshold_select_backward)):
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=_setup_select)


register_selection_autograd("crossdiff")


def batch_topk(
    f: torch.Tensor, w: torch.Tensor, K: int, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top K of s = f * w over all of f [B, F]: (values [K], indices [K], row_ptr [B+1], min_score).

    relu=True: f holds the encoder's pre-activations (paired_encode(..., relu=False)) and the result is exactly
    batch_topk(torch.relu(f), w, K): the ReLU is applied as the kernels read f, with no pass of its own.
    """
    validate.batch_topk(f, w, K)
    validate.flag("relu", relu)
    return backends.kernels(backends.resolve(f.device)).batch_topk(f, w, K, relu)


def threshold_select(
    f: torch.Tensor, w: torch.Tensor, theta: float, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries with s = f * w > theta (theta >= 0) or s NaN: (values [nnz], indices [nnz], row_ptr [B+1]).
    relu=True: f holds pre-activations, selected as torch.relu(f) (see batch_topk)."""
    validate.threshold_select(f, w, theta)
    validate.flag("relu", relu)
    return backends.kernels(backends.resolve(f.device)).threshold_select(f, w, float(theta), relu)


# op -> its fake (meta) kernel, shared with the crossdiff_triton ops (ops/triton_ops.py)
FAKES = {"batch_topk": batch_topk_fake, "threshold_select": threshold_select_fake}
