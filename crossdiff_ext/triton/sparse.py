"""Triton sparse decoder and its sparse backward, for all M models at once (rows of W are [M * d] wide).

References: crossdiff_ext/ops/sparse.py (sparse_decode_reference, sparse_values_grad_reference,
latent_order_reference, sparse_weight_grad_reference).

Every sum runs in fp32 in a fixed order (no float atomics), so results are deterministic:
  sparse_decode       one program per (row, column block): gathers the row's W rows in entry order.
  sparse_values_grad  one program per block of entries: a dot of grad_out[row] with W[latent] per entry.
  latent_order        a stable radix sort of the latent ids (torch.sort; ops/sparse.latent_order_by_sort).
  sparse_weight_grad  one program per group of consecutive latents, each over the whole row width: sums
                      value * dense[row] over the latent's entries in row order, and the value sums (the bias
                      gradient); a latent's index chain is loaded while the previous latent gathers.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import csr
from ..ops.sparse import latent_order_by_sort
from . import _launch


@triton.jit
def _decode_kernel(
    values_ptr,
    indices_ptr,
    row_ptr_ptr,
    W_ptr,
    bias_ptr,
    out_ptr,
    D,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < D
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        live = e < end
        v = tl.load(values_ptr + e, mask=live, other=0.0).to(tl.float32)
        j = tl.load(indices_ptr + e, mask=live, other=0).to(tl.int64)
        w = tl.load(W_ptr + j[:, None] * D + cols[None, :], mask=live[:, None] & inside[None, :], other=0.0)
        acc += tl.sum(v[:, None] * w.to(tl.float32), 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _values_grad_kernel(
    grad_ptr, indices_ptr, rows_ptr, W_ptr, out_ptr, nnz, D, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr
):
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    live = e < nnz
    j = tl.load(indices_ptr + e, mask=live, other=0).to(tl.int64)
    r = tl.load(rows_ptr + e, mask=live, other=0)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = live[:, None] & (cols < D)[None, :]
        g = tl.load(grad_ptr + r[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(W_ptr + j[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(g * w, 1)
    tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _weight_grad_kernel(
    values_ptr,
    dense_ptr,
    col_ptr_ptr,
    perm_ptr,
    rows_ptr,
    grad_ptr,
    sums_ptr,
    F,
    D,
    LATENTS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """LATENTS consecutive latents, one after another, each over the whole row width. The index chain of a latent's
    first BLOCK_E entries (col_ptr -> perm, rows -> values) is loaded while the previous latent gathers its dense
    rows, and once for all its column blocks. Each output element sums [BLOCK_E]-entry tiles in row order, each
    reduced by tl.sum, the same tiles whatever LATENTS; tiles past the first (latents with more than BLOCK_E
    entries) reload their indices in every column block."""
    step = tl.arange(0, BLOCK_E)
    latent = tl.program_id(0).to(tl.int64) * LATENTS
    start = tl.load(col_ptr_ptr + latent)
    end = tl.load(col_ptr_ptr + latent + 1)
    e = start + step
    live = e < end
    p = tl.load(perm_ptr + e, mask=live, other=0)
    r = tl.load(rows_ptr + e, mask=live, other=0)
    v = tl.load(values_ptr + p, mask=live, other=0.0).to(tl.float32)
    for j in range(LATENTS):
        here = latent < F  # a latent past F (the last group) has no entries: it loads nothing, stores nothing
        # the next latent's chain, issued before this latent's gathers (a latent past the group or F loads nothing)
        has_next = (j + 1 < LATENTS) & (latent + 1 < F)
        next_start = tl.load(col_ptr_ptr + latent + 1, mask=has_next, other=0)
        next_end = tl.load(col_ptr_ptr + latent + 2, mask=has_next, other=0)
        next_e = next_start + step
        next_live = next_e < next_end
        next_p = tl.load(perm_ptr + next_e, mask=next_live, other=0)
        next_r = tl.load(rows_ptr + next_e, mask=next_live, other=0)
        next_v = tl.load(values_ptr + next_p, mask=next_live, other=0.0).to(tl.float32)

        total = tl.zeros((BLOCK_E,), dtype=tl.float32) + v
        for s in range(start + BLOCK_E, end, BLOCK_E):
            e_s = s + step
            live_s = e_s < end
            p_s = tl.load(perm_ptr + e_s, mask=live_s, other=0)
            total += tl.load(values_ptr + p_s, mask=live_s, other=0.0).to(tl.float32)
        tl.store(sums_ptr + latent, tl.sum(total, 0), mask=here)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            inside = cols < D
            x = tl.load(dense_ptr + r[:, None] * D + cols[None, :], mask=live[:, None] & inside[None, :], other=0.0)
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32) + tl.sum(v[:, None] * x.to(tl.float32), 0)
            for s in range(start + BLOCK_E, end, BLOCK_E):
                e_s = s + step
                live_s = e_s < end
                p_s = tl.load(perm_ptr + e_s, mask=live_s, other=0)
                r_s = tl.load(rows_ptr + e_s, mask=live_s, other=0)
                v_s = tl.load(values_ptr + p_s, mask=live_s, other=0.0).to(tl.float32)
                x_s = tl.load(
                    dense_ptr + r_s[:, None] * D + cols[None, :], mask=live_s[:, None] & inside[None, :], other=0.0
                )
                acc += tl.sum(v_s[:, None] * x_s.to(tl.float32), 0)
            tl.store(grad_ptr + latent * D + cols, acc.to(grad_ptr.dtype.element_ty), mask=inside & here)
        latent += 1
        start, end, live, r, v = next_start, next_end, next_live, next_r, next_v


def _width(W):
    return W.shape[1] * W.shape[2]


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Launch the sparse decoder: [B, M, d] in W's dtype."""
    W = W.contiguous()
    B, D = row_ptr.shape[0] - 1, _width(W)
    out = torch.empty(B, *W.shape[1:], dtype=W.dtype, device=W.device)
    block_d = _launch.row_block(D)
    has_bias = bias is not None
    grid = (B, triton.cdiv(D, block_d))
    if B > 0:
        _decode_kernel[grid](
            values.contiguous(),
            indices.contiguous(),
            row_ptr.contiguous(),
            W,
            bias.contiguous() if has_bias else W,
            out,
            D,
            HAS_BIAS=has_bias,
            BLOCK_E=_launch.ENTRY_BLOCK,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def sparse_values_grad(
    grad_out: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """Launch the per-entry dot products: [nnz] in W's dtype."""
    W, grad_out = W.contiguous(), grad_out.contiguous()
    nnz, D = indices.shape[0], _width(W)
    out = torch.empty(nnz, dtype=W.dtype, device=W.device)
    if nnz > 0:
        rows = csr.rows_of(row_ptr, nnz)
        block_e = _launch.ENTRY_BLOCK
        _values_grad_kernel[(triton.cdiv(nnz, block_e),)](
            grad_out,
            indices.contiguous(),
            rows,
            W,
            out,
            nnz,
            D,
            BLOCK_E=block_e,
            BLOCK_D=_launch.dot_block(D),
            num_warps=4,
        )
    return out


def latent_order(
    indices: torch.Tensor, row_ptr: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stable sort by latent: (col_ptr [F+1], perm [nnz], rows [nnz]); a library radix sort, as on the CUDA
    backend (ops/sparse.py, latent_order_by_sort says why)."""
    return latent_order_by_sort(indices.contiguous(), row_ptr.contiguous(), n_latents)


def sparse_weight_grad(
    values: torch.Tensor, dense: torch.Tensor, col_ptr: torch.Tensor, perm: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the per-latent reductions: (grad_W [F, M, d] in dense's dtype, value_sums [F] fp32)."""
    dense = dense.contiguous()
    F, D = col_ptr.shape[0] - 1, dense.shape[1] * dense.shape[2]
    grad = torch.empty(F, *dense.shape[1:], dtype=dense.dtype, device=dense.device)
    sums = torch.empty(F, dtype=torch.float32, device=dense.device)
    latents = _launch.GRAD_LATENTS
    if F > 0:
        _weight_grad_kernel[(triton.cdiv(F, latents),)](
            values.contiguous(),
            dense,
            col_ptr.contiguous(),
            perm.contiguous(),
            rows.contiguous(),
            grad,
            sums,
            F,
            D,
            LATENTS=latents,
            BLOCK_E=_launch.ENTRY_BLOCK,
            BLOCK_D=_launch.grad_block(D, dense.element_size()),
            num_warps=4,
        )
    return grad, sums
