"""The L1 (ReLU) crosscoder's whole layer as one autograd function, dense or sparse by the batch's code density.

A ReLU crosscoder keeps every positive f. Early in training about half of all latents are active, and then the
sparse kernels (one gather of a W_dec row per kept entry) lose to dense GEMMs by far; once the L1 penalty has
made the codes sparse they win by far. The function measures the density of each batch after the encoder and
runs the decoder and the whole backward on the cheaper side of `dense_density` (under torch.compile the choice
must be static: sparse, unless dense_density is 0). Both sides compute the same
math (the tests check both against the reference); only the memory and time differ: the dense side saves f
[B, F] for the backward, the sparse side saves only the codes.
"""

from typing import Optional

import torch

from .. import backends
from . import csr, validate
from .autograd import decode_sparse, encode_sparse


class ReluCrossCoder(torch.autograd.Function):
    """(x, W_enc, b_enc, W_dec, b_dec) -> (recon [B, M, d], values, indices, row_ptr) of the ReLU crosscoder.

    values (the kept f) stays differentiable, so a penalty on the codes (the L1 term) trains the encoder.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        dense_density: float,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, keep every positive f, decode: densely or sparsely by the batch's code density."""
        kernels = backends.kernels(backend)
        B, F = x.shape[0], W_enc.shape[0]
        f = kernels.paired_encode(x, W_enc, b_enc)
        ones = torch.ones(F, dtype=torch.float32, device=x.device)
        values, indices, row_ptr = kernels.threshold_select(f, ones, 0.0)
        ctx.backend = backend
        if torch.compiler.is_compiling():
            # A switch on a data-dependent size cannot be traced: compiled graphs stay sparse unless forced dense.
            ctx.dense = dense_density <= 0.0
        else:
            ctx.dense = values.shape[0] > dense_density * B * F
        ctx.mark_non_differentiable(indices, row_ptr)
        if ctx.dense:
            ctx.save_for_backward(x, W_enc, W_dec, values, indices, row_ptr, f)
            recon = torch.addmm(b_dec.reshape(1, -1), f, W_dec.reshape(F, -1)).view(B, *W_dec.shape[1:])
        else:
            ctx.save_for_backward(x, W_enc, W_dec, values, indices, row_ptr, None)
            recon = kernels.sparse_decode(values, indices, row_ptr, W_dec, b_dec)
        return recon, values, indices, row_ptr

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_recon: torch.Tensor,
        grad_values: torch.Tensor,
        _indices: Optional[torch.Tensor],
        _row_ptr: Optional[torch.Tensor],
    ) -> tuple[Optional[torch.Tensor], ...]:
        """The whole layer's gradients, on the side (dense or sparse) the forward chose."""
        x, W_enc, W_dec, values, indices, row_ptr, f = ctx.saved_tensors
        needs_x, needs_W_enc, needs_b_enc, needs_W_dec, needs_b_dec = ctx.needs_input_grad[:5]
        B, F = x.shape[0], W_enc.shape[0]
        g = grad_recon.contiguous()
        grad_b_dec = g.sum(0) if needs_b_dec else None
        if ctx.dense:
            grad_f = g.reshape(B, -1) @ W_dec.reshape(F, -1).T
            rows = csr.rows_of(row_ptr, values.shape[0])
            grad_f = grad_f.index_put((rows, indices.long()), grad_values, accumulate=True)
            grad_pre = torch.where(f > 0, grad_f, torch.zeros((), dtype=grad_f.dtype, device=grad_f.device))
            grad_W_dec = (f.T @ g.reshape(B, -1)).view(W_dec.shape) if needs_W_dec else None
            grad_W_enc = (grad_pre.T @ x.reshape(B, -1)).view(W_enc.shape) if needs_W_enc else None
            grad_b_enc = grad_pre.sum(0) if needs_b_enc else None
            grad_x = (grad_pre @ W_enc.reshape(F, -1)).view(x.shape) if needs_x else None
            return grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None
        kernels = backends.kernels(ctx.backend)
        # Every kept value is a positive f, so the ReLU passes all of its gradient.
        grad_kept = kernels.sparse_values_grad(g, indices, row_ptr, W_dec) + grad_values
        order = kernels.latent_order(indices, row_ptr, F)  # shared by both weight gradients
        grad_W_dec = kernels.sparse_weight_grad(values, g, *order)[0] if needs_W_dec else None
        grad_W_enc = grad_b_enc = None
        if needs_W_enc or needs_b_enc:
            grad_W_enc, sums = kernels.sparse_weight_grad(grad_kept, x, *order)
            grad_b_enc = sums.to(W_enc.dtype) if needs_b_enc else None
            grad_W_enc = grad_W_enc if needs_W_enc else None
        grad_x = kernels.sparse_decode(grad_kept, indices, row_ptr, W_enc, None) if needs_x else None
        return grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None


def relu_crosscoder(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    dense_density: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ReLU crosscoder layer on the current backend: (recon, values, indices, row_ptr)."""
    validate.paired_encode(x, W_enc, b_enc)
    validate.decoder(W_enc, W_dec, b_dec)
    name = backends.resolve(x.device)
    if name == "reference":  # plain differentiable PyTorch: the shared encode/decode path is the whole layer
        ones = torch.ones(W_enc.shape[0], dtype=torch.float32, device=x.device)
        values, indices, row_ptr, _ = encode_sparse(x, W_enc, b_enc, ones, "threshold", 0.0)
        return decode_sparse(values, indices, row_ptr, W_dec, b_dec), values, indices, row_ptr
    return ReluCrossCoder.apply(x, W_enc, b_enc, W_dec, b_dec, dense_density, name)
