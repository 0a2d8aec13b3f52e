"""Training losses of docs/math.md: reconstruction (unsquared L2 by default), the L1 crosscoder's sparsity penalty
weighted by decoder norms, the auxiliary loss for dead latents, and the dead-latent counters.

Reference-quality PyTorch: the auxiliary loss touches only the dead latents (a GEMM over their encoder rows), so
it costs little while few latents are dead, and its gradient reaches exactly those latents' encoder and decoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from ..layer import CrossCoder, SparseCodes

RECONSTRUCTIONS = ("l2", "squared")


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean over rows and models of ||x[b, m] - recon[b, m]||_2 ("l2", the reference default) or of its square
    ("squared")."""
    if kind not in RECONSTRUCTIONS:
        raise InputError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}")
    err = x.float() - recon.float()  # upcast first: a bf16 difference would lose the small errors
    if kind == "l2":
        return torch.linalg.vector_norm(err, dim=-1).mean()
    return err.pow(2).sum(-1).mean()


def decoder_norms(cc: CrossCoder) -> torch.Tensor:
    """[F] float32 w_j = sum_m ||W_dec[j, m]||_2, differentiable in W_dec: the L1 penalty's weights. (The
    selection weights, cc.decoder_norm_weights(), are detached: without the gradient through the norms the
    penalty cannot shrink a decoder row, only the codes, and the decoder grows to make up for them.)"""
    return torch.linalg.vector_norm(cc.partition_masked(cc.W_dec), dim=2, dtype=torch.float32).sum(1)


def l1_penalty(codes: SparseCodes, w: torch.Tensor) -> torch.Tensor:
    """mean_b sum_j f[b, j] * w_j over the kept (sparse) codes: the L1 crosscoder's sparsity term."""
    return (codes.values.float() * w[codes.indices.long()]).sum() / codes.n_rows


def fired_latents(codes: SparseCodes) -> torch.Tensor:
    """[F] bool: latents that carried a non-zero value in this batch."""
    fired = torch.zeros(codes.n_latents, dtype=torch.bool, device=codes.values.device)
    fired[codes.indices.long()[codes.values != 0]] = True
    return fired


def update_dead_counters(tokens_since_fired: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """In place: += B for every latent, reset to 0 where the latent fired (docs/math.md: dead after >= dead_tokens).

    The trainers call it with the current batch BEFORE the aux loss, as the paper's trainer does, so a latent
    selected in this batch is never dead."""
    tokens_since_fired.add_(codes.n_rows)
    tokens_since_fired.masked_fill_(fired_latents(codes), 0)
    return tokens_since_fired


def dead_codes(cc: CrossCoder, x: torch.Tensor, dead_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, s) [B, n_dead] fp32 of the latents dead_ids: their ReLU codes (differentiable) and their selection
    scores f * w (detached)."""
    # In x's dtype: under mixed precision the fp32 master rows are cast like the main encoder's weights.
    W_enc = cc.partition_masked(cc.W_enc)[dead_ids].reshape(dead_ids.numel(), -1).to(x.dtype)
    f = torch.relu(x.reshape(x.shape[0], -1) @ W_enc.T + cc.b_enc[dead_ids].to(x.dtype)).float()
    return f, f.detach() * cc.decoder_norm_weights()[dead_ids]


def aux_k(cc: CrossCoder, k_aux: Optional[int], n_dead: int) -> int:
    """Dead latents decoded per row by the aux loss: k_aux (default d/2), at most the n_dead there are."""
    return min(cc.d_model // 2 if k_aux is None else k_aux, n_dead)


def aux_loss(
    cc: CrossCoder, x: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor, k_aux: Optional[int] = None
) -> torch.Tensor:
    """docs/math.md's auxiliary loss for dead latents.

    Per row, the k_aux = min(d/2, n_dead) dead latents with the largest scores s = f * w are decoded from their
    unscaled f, without the decoder bias: xhat_aux. With e = x - recon detached,
        L_aux = mean_b ||e - xhat_aux||^2 / mean_b ||e - mean_b e||^2   (norms over all models' coordinates),
    0 where undefined (no dead latent, or zero variance). The gradient flows into the dead latents' encoder rows,
    encoder biases and decoder rows only (through xhat_aux; e is a detached target), never into a dedicated
    latent's absent rows (cc.partition_masked).
    """
    dead_ids = torch.nonzero(dead).squeeze(1)
    n_dead = dead_ids.numel()
    zero = x.new_zeros((), dtype=torch.float32)
    if n_dead == 0:
        return zero
    k_aux = aux_k(cc, k_aux, n_dead)
    if k_aux < 1:
        return zero
    B = x.shape[0]
    f, s = dead_codes(cc, x, dead_ids)
    top = torch.topk(s, k_aux, dim=1, sorted=False).indices  # selection is not differentiated
    kept = torch.zeros_like(f).scatter(1, top, f.gather(1, top))
    xhat_aux = kept @ cc.partition_masked(cc.W_dec)[dead_ids].reshape(n_dead, -1).float()
    e = (x.float() - recon.float()).detach().reshape(B, -1)
    variance = (e - e.mean(0)).pow(2).sum(-1).mean()
    if not bool(variance > 0):
        return zero
    return (e - xhat_aux).pow(2).sum(-1).mean() / variance


def geometric_median(points: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm over the rows of points [N, D] (fp32): the point minimising the summed distances."""
    points = points.float()
    y = points.mean(0)
    for _ in range(iters):
        dist = torch.linalg.vector_norm(points - y, dim=1).clamp_min(eps)
        inv = 1.0 / dist
        y_next = (points * inv[:, None]).sum(0) / inv.sum()
        if torch.linalg.vector_norm(y_next - y) <= eps * max(1.0, float(torch.linalg.vector_norm(y))):
            return y_next
        y = y_next
    return y
