"""Crosscoders built by hand with known answers: the paper's two L1 artifacts on planted concepts."""

import torch
from conftest import rng

import crossdiff_ext as cx


def artifact_crosscoder(d=16, n=4000, seed=74):
    """Five true concepts on orthonormal directions: 0 shared, 1 chat-only, 2 weak in base (0.3), 3 shared,
    4 shared. The L1-style crosscoder has six latents: 0, 1, 2 learned right; 3 with its base decoder row shrunk
    to 0 (Complete Shrinkage); 4 and 5 splitting concept 4 into a chat-row-only and a base-row-only latent
    (Latent Decoupling)."""
    g = rng(seed)
    dirs = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:5]  # orthonormal rows
    truth = dirs[:, None, :].repeat(1, 2, 1)  # [5, M, d]
    truth[1, 0] = 0
    truth[2, 0] *= 0.3
    a = torch.where(torch.rand(n, 5, generator=g) < 0.3, torch.rand(n, 5, generator=g) + 0.5, torch.zeros(()))
    x = torch.einsum("nc,cmd->nmd", a, truth)
    concept = [0, 1, 2, 3, 4, 4]
    W_dec = truth[concept].clone()
    W_dec[3, 0] = 0  # shrunk: the base model uses concept 3, but the latent's base row is gone
    W_dec[4, 0] = 0  # decoupled: latent 4 carries concept 4 for chat only,
    W_dec[5, 1] = 0  # latent 5 for base only
    flat = truth[concept].reshape(6, -1)
    cc = cx.CrossCoder(d, 6, 2, activation="relu")
    with torch.no_grad():
        cc.W_enc.copy_((flat / flat.pow(2).sum(1, keepdim=True)).view(6, 2, d))  # pre_j = a_concept(j) exactly
        cc.W_dec.copy_(W_dec)
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc, x
