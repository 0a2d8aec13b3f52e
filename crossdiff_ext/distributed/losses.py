"""The training losses of docs/math.md on a mesh: each rank returns its rows' share of the global loss (summed over
the data group by the gradient all-reduce), identical on every rank of a latent group."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..layer import CrossCoder, SparseCodes
from ..training import losses
from .collectives import all_reduce_, sum_over_shards
from .mesh import Mesh


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str, total_rows: int) -> torch.Tensor:
    """This rank's rows' share of the mean over all rows: sum_local / total_rows."""
    return losses.reconstruction_loss(x, recon, kind) * (x.shape[0] / total_rows)


def l1_penalty(codes: SparseCodes, w: torch.Tensor, mesh: Mesh, total_rows: int) -> torch.Tensor:
    """The L1 crosscoder's penalty, summed over the latent shards (differentiably), this rank's rows' share."""
    local = (codes.values.float() * w[codes.indices.long()]).sum() / total_rows
    return sum_over_shards(local, mesh.latent_group)


def aux_loss(
    cc: CrossCoder,
    x: torch.Tensor,
    recon: torch.Tensor,
    dead: torch.Tensor,
    mesh: Mesh,
    total_rows: int,
    k_aux: Optional[int] = None,
) -> torch.Tensor:
    """losses.aux_loss over latents split by `mesh`: per row, the k_aux dead latents with the largest scores over
    every shard (each rank's best k_aux candidates per row, all-gathered over the latent group; ties at the k-th
    score go to lower latent ranks first), decoded locally and summed with one all-reduce. The variance term uses
    the whole batch (two all-reduces over the data group). Costs b * k_aux * 4 bytes per rank and step, only
    while some latent is dead."""
    zero = x.new_zeros((), dtype=torch.float32)
    n_local = int(dead.sum())
    n_dead = int(all_reduce_(torch.tensor([n_local], device=x.device), [mesh.latent_group])[0])
    if n_dead == 0:
        return zero
    k_aux = losses.aux_k(cc, k_aux, n_dead)
    if k_aux < 1:
        return zero
    b = x.shape[0]
    e = (x.float() - recon.float()).detach().reshape(b, -1)
    mean = all_reduce_(e.sum(0), [mesh.data_group]) / total_rows
    variance = all_reduce_((e - mean).pow(2).sum().reshape(1), [mesh.data_group])[0] / total_rows
    if not bool(variance > 0):
        return zero
    dead_ids = torch.nonzero(dead).squeeze(1)
    candidates = torch.full((b, k_aux), -torch.inf, device=x.device)
    if n_local:
        f, s = losses.dead_codes(cc, x, dead_ids)
        top = torch.topk(s, min(k_aux, n_local), dim=1).values
        candidates[:, : top.shape[1]] = top
    gathered = [torch.empty_like(candidates) for _ in range(mesh.latent_size)]
    dist.all_gather(gathered, candidates, group=mesh.latent_group)
    kth = torch.topk(torch.cat(gathered, 1), k_aux, dim=1).values[:, -1:]  # [b, 1] the k_aux-th best score
    xhat = torch.zeros(b, x.shape[1] * x.shape[2], device=x.device)
    if n_local:
        above, tie = s > kth, s == kth
        counts = torch.zeros(mesh.latent_size, 2, b, dtype=torch.int64, device=x.device)
        counts[mesh.latent_rank, 0], counts[mesh.latent_rank, 1] = above.sum(1), tie.sum(1)
    else:
        counts = torch.zeros(mesh.latent_size, 2, b, dtype=torch.int64, device=x.device)
    all_reduce_(counts, [mesh.latent_group])
    if n_local:
        need = k_aux - counts[:, 0].sum(0) - counts[: mesh.latent_rank, 1].sum(0)  # ties left for this rank
        keep = above | (tie & (torch.cumsum(tie.to(torch.int64), 1) <= need[:, None]))
        W_dec = cc.partition_masked(cc.W_dec)[dead_ids].reshape(n_local, -1).float()
        xhat = torch.where(keep, f, torch.zeros_like(f)) @ W_dec
    xhat = sum_over_shards(xhat, mesh.latent_group)
    return (e - xhat).pow(2).sum(-1).sum() / total_rows / variance
