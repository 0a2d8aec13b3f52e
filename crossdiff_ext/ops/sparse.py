"""Sparse decoder (codes @ W + bias for all M models at once) and its sparse backward.

sparse_values_grad: per-entry dot products; latent_order: a stable sort of the codes by latent;
sparse_weight_grad: per-latent reductions over that order (codes^T @ dense). References, fake kernels, the
decoder's autograd formula, the GPU backends' latent_order and the backend-dispatching entry points.
"""

from collections.abc import Callable
from types import SimpleNamespace
from typing import Optional

import torch

from .. import backends
from . import csr, native, validate


def sparse_decode_reference(
    values: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Plain-PyTorch sparse_decode: the sum over the stored entries of values[e] W[indices[e]] (+ bias) in fp32,
    returned in W's dtype. Not a dense [B, F] @ W: its zeros would multiply every row of W, so a NaN or inf in a
    row that no code uses would reach every output."""
    F, B, D = W.shape[0], row_ptr.shape[0] - 1, W.shape[1] * W.shape[2]  # D explicit: any size may be 0
    rows = csr.rows_of(row_ptr, values.shape[0])
    terms = values.float()[:, None] * W.reshape(F, D).float()[indices.long()]
    out = terms.new_zeros(B, terms.shape[1]).index_add(0, rows, terms)
    if bias is not None:
        out = out + bias.reshape(1, D).float()
    return out.to(W.dtype).view(row_ptr.shape[0] - 1, *W.shape[1:])


def sparse_values_grad_reference(
    grad_out: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """Plain-PyTorch sparse_values_grad: the per-entry dot products in fp32, returned in W's dtype."""
    B, F, D = grad_out.shape[0], W.shape[0], W.shape[1] * W.shape[2]
    rows = csr.rows_of(row_ptr, indices.shape[0])
    g = grad_out.reshape(B, D).float()[rows]
    return (g * W.reshape(F, D).float()[indices.long()]).sum(-1).to(W.dtype)


def latent_order_reference(
    indices: torch.Tensor, row_ptr: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch latent_order: a stable sort of the entries by latent."""
    rows = csr.rows_of(row_ptr, indices.shape[0])
    perm = torch.sort(indices.long(), stable=True).indices  # entries are in row order: rows stay ascending
    col_ptr = csr.row_ptr_from_rows(indices.long(), n_latents)
    return col_ptr, perm, rows[perm]


def latent_order_by_sort(
    indices: torch.Tensor, row_ptr: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """latent_order on the GPU backends (cuda, triton): one stable radix sort of the latent ids (torch.sort),
    the rows gathered in that order, and col_ptr by a binary search of each latent's first entry.

    Entries arrive in row order, so a stable sort keeps rows ascending within each latent. A counting sort
    needs either a serial walk over the rows or a [chunks, F] cursor table per set of codes (at F = 73,728 and
    64 chunks, 38 MB of int64 read and written about eight times by its scans, kernels_bench/results/ledger-*);
    the radix sort of K 32-bit ids moves a few bytes per entry per digit pass. No host sync: the sizes are known.
    """
    validate.latent_order(indices, row_ptr, n_latents)
    nnz = indices.shape[0]
    sorted_ids, perm = torch.sort(indices, stable=True)
    rows = csr.rows_of(row_ptr, nnz)[perm]
    firsts = torch.arange(n_latents, dtype=indices.dtype, device=indices.device)
    col_ptr = torch.cat((torch.searchsorted(sorted_ids, firsts), torch.full((1,), nnz, device=indices.device)))
    return col_ptr, perm, rows


torch.library.impl("crossdiff::latent_order", "CUDA")(latent_order_by_sort)


def sparse_weight_grad_reference(
    values: torch.Tensor, dense: torch.Tensor, col_ptr: torch.Tensor, perm: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch sparse_weight_grad: index_add over the entries in latent order, in fp32."""
    F, B = col_ptr.shape[0] - 1, dense.shape[0]
    latent = csr.rows_of(col_ptr, perm.shape[0])
    v = values[perm].float()
    D = dense.shape[1] * dense.shape[2]
    grad = torch.zeros(F, D, dtype=torch.float32, device=dense.device)
    grad.index_add_(0, latent, v[:, None] * dense.reshape(B, D).float()[rows])
    sums = torch.zeros(F, dtype=torch.float32, device=dense.device).index_add_(0, latent, v)
    return grad.to(dense.dtype).view(F, *dense.shape[1:]), sums


@torch.library.register_fake("crossdiff::sparse_decode")
def sparse_decode_fake(
    values: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Fake (meta) kernel of sparse_decode: an empty [B, M, d] in W's dtype."""
    validate.sparse_decode(values, indices, row_ptr, W, bias)  # also catches meta tensors mixed with real ones
    return W.new_empty(row_ptr.shape[0] - 1, W.shape[1], W.shape[2])


@torch.library.register_fake("crossdiff::sparse_values_grad")
def sparse_values_grad_fake(
    grad_out: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """Fake (meta) kernel of sparse_values_grad: an empty [nnz] in W's dtype."""
    validate.sparse_values_grad(grad_out, indices, row_ptr, W)
    return W.new_empty(indices.shape[0])


@torch.library.register_fake("crossdiff::latent_order")
def latent_order_fake(
    indices: torch.Tensor, row_ptr: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake (meta) kernel of latent_order: empty col_ptr [F+1], perm [nnz], rows [nnz] int64."""
    validate.latent_order(indices, row_ptr, n_latents)
    nnz = indices.shape[0]
    return (
        indices.new_empty(n_latents + 1, dtype=torch.int64),
        indices.new_empty(nnz, dtype=torch.int64),
        indices.new_empty(nnz, dtype=torch.int64),
    )


@torch.library.register_fake("crossdiff::sparse_weight_grad")
def sparse_weight_grad_fake(
    values: torch.Tensor, dense: torch.Tensor, col_ptr: torch.Tensor, perm: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake (meta) kernel of sparse_weight_grad: empty grad_W [F, M, d] and value_sums [F] fp32."""
    validate.sparse_weight_grad(values, dense, col_ptr, perm, rows)
    F = col_ptr.shape[0] - 1
    return dense.new_empty(F, dense.shape[1], dense.shape[2]), dense.new_empty(F, dtype=torch.float32)


def decode_backward(
    kernels: SimpleNamespace,
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    row_ptr: torch.Tensor,
    W: torch.Tensor,
    needs_values: bool,
    needs_W: bool,
    needs_bias: bool,
    order: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of codes @ W + bias w.r.t. values, W and bias, all sparse: no [B, F] tensor. `order`: the codes'
    latent order when the caller has it (it is then not computed again)."""
    grad_out = grad_out.contiguous()
    grad_values = kernels.sparse_values_grad(grad_out, indices, row_ptr, W) if needs_values else None
    grad_W = None
    if needs_W:
        if order is None:
            order = kernels.latent_order(indices, row_ptr, W.shape[0])
        grad_W = kernels.sparse_weight_grad(values, grad_out, *order)[0]
    grad_bias = grad_out.sum(0) if needs_bias else None
    return grad_values, grad_W, grad_bias


def _setup_decode(ctx, inputs, output):
    values, indices, row_ptr, W, bias = inputs
    ctx.save_for_backward(values, indices, row_ptr, W)
    ctx.has_bias = bias is not None


def register_decode_autograd(qualname: str, kernels: Callable[[], SimpleNamespace]) -> None:
    """The sparse backward of a sparse_decode op; `kernels()` gives the kernel table of the op's backend."""

    def backward(ctx, grad_out):
        values, indices, row_ptr, W = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gv, gW, gb = decode_backward(
            kernels(), grad_out, values, indices, row_ptr, W, needs[0], needs[3], ctx.has_bias and needs[4]
        )
        return gv, None, None, gW, gb

    torch.library.register_autograd(qualname, backward, setup_context=_setup_decode)


register_decode_autograd("crossdiff::sparse_decode", lambda: native.KERNELS)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    row_ptr: torch.Tensor,
    W: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out[b] = sum_{e in row b} values[e] W[indices[e]] (+ bias): [B, M, d] in W's dtype."""
    validate.sparse_decode(values, indices, row_ptr, W, bias)
    return backends.kernels(backends.resolve(W.device)).sparse_decode(values, indices, row_ptr, W, bias)


def sparse_values_grad(
    grad_out: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """grad_values[e] = <grad_out[row(e)], W[indices[e]]>: [nnz] in W's dtype."""
    validate.sparse_values_grad(grad_out, indices, row_ptr, W)
    return backends.kernels(backends.resolve(W.device)).sparse_values_grad(grad_out, indices, row_ptr, W)


def latent_order(
    indices: torch.Tensor, row_ptr: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counting sort of the codes by latent: (col_ptr [F+1], perm [nnz], rows [nnz])."""
    validate.latent_order(indices, row_ptr, n_latents)
    return backends.kernels(backends.resolve(indices.device)).latent_order(indices, row_ptr, n_latents)


def sparse_weight_grad(
    values: torch.Tensor, dense: torch.Tensor, col_ptr: torch.Tensor, perm: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """codes^T @ dense by latent: (grad_W [F, M, d] in dense's dtype, value_sums [F] fp32)."""
    validate.sparse_weight_grad(values, dense, col_ptr, perm, rows)
    return backends.kernels(backends.resolve(dense.device)).sparse_weight_grad(values, dense, col_ptr, perm, rows)


# op -> its fake (meta) kernel, shared with the crossdiff_triton ops (ops/triton_ops.py)
FAKES = {
    "sparse_decode": sparse_decode_fake,
    "sparse_values_grad": sparse_values_grad_fake,
    "latent_order": latent_order_fake,
    "sparse_weight_grad": sparse_weight_grad_fake,
}
