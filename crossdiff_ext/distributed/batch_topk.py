"""Exact batch-wide top-k when the latents are split over ranks (latent parallelism).

Rank r of the latent group holds the selection scores s = f * w of its contiguous block of latents, [B, F_r],
blocks in rank order (rank 0 holds the lowest latent ids). With a data group as well (a 2-D mesh: data replicas x
latent shards), data rank p holds rows [p * B, (p + 1) * B) of the global batch of D * B rows. The result must equal
the single-process selection: the K = k * D * B largest scores of the whole [D * B, F] matrix, ties broken by the
lower global flat index b * F + j (ops.select's rule). Every count below is summed over both groups (one
all-reduce per group).

How, with five small collectives per group whatever the data (no bisection), the first an all-reduce of the sizes:
  1. the scores become order-preserving 32-bit keys (csrc/score_key.h's map: -0 == +0, NaN highest);
  2. a 65536-bin histogram of the keys' high 16 bits, all-reduced, locates the bin holding the K-th largest key;
  3. a 65536-bin histogram of the low 16 bits inside that bin, all-reduced, gives the K-th largest key t exactly,
     and how many keys are greater (g); need = K - g entries equal to t are kept;
  4. the per-row counts of keys equal to t, one row per rank, all-reduced into [D, G, B]: the ties a rank may
     keep at row b are those whose global tie rank (all ties of earlier global rows, then of lower latent ranks in
     row b, then the local order) is below `need`: the lower-flat-index rule across ranks;
  5. one all-reduce (MIN) of the smallest kept positive score, the threshold the crosscoder tracks.
Each rank then keeps its own entries; nothing [B, F]-sized crosses the network.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import InputError
from ..ops import csr

BINS = 1 << 16


def score_keys(s: torch.Tensor) -> torch.Tensor:
    """int64 order-preserving keys of fp32 scores (the map of csrc/score_key.h): key(a) > key(b) iff a > b,
    -0 and +0 share a key, every NaN gets the largest key."""
    s = s.float() + 0.0  # -0 + +0 = +0
    u = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(u >= 0x80000000, u ^ 0xFFFFFFFF, u | 0x80000000)
    return torch.where(torch.isnan(s), torch.full_like(key, 0xFFFFFFFF), key)


def _all_reduce(t, groups, op=dist.ReduceOp.SUM):
    """Reduce t over every group in `groups` in turn: over a product mesh, the reduction over all its ranks."""
    for group in groups:
        dist.all_reduce(t, op=op, group=group)
    return t


def _groups(group, data_group):
    return [group] if data_group is None else [group, data_group]


def _locate(hist, K):
    """(bin, count above it): the bin holding the K-th largest of the counted keys, from the top."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # keys in higher bins
    b = int(torch.nonzero((above < K) & (above + hist >= K)).max())
    return b, int(above[b])


def kth_largest_key(
    keys: torch.Tensor,
    K: int,
    group: Optional[dist.ProcessGroup] = None,
    data_group: Optional[dist.ProcessGroup] = None,
) -> tuple[int, int]:
    """(t, greater): the K-th largest key over every rank's `keys` and how many keys are greater than t. Two
    all-reduces of 65536 counts per group."""
    groups = _groups(group, data_group)
    hi = keys >> 16
    h, above_h = _locate(_all_reduce(torch.bincount(hi.flatten(), minlength=BINS), groups), K)
    low = keys[hi == h] & 0xFFFF
    low_key, above_l = _locate(_all_reduce(torch.bincount(low.flatten(), minlength=BINS), groups), K - above_h)
    return (h << 16) | low_key, above_h + above_l


def batch_topk_sharded(
    f: torch.Tensor,
    w: torch.Tensor,
    K: int,
    group: Optional[dist.ProcessGroup] = None,
    data_group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank's share of the exact global batch top-k. f [B, F_r] this rank's codes (its rows, its latents),
    w [F_r] its latents' decoder-norm weights; K = k * (global rows) over the whole batch. `group`: the latent
    group (None: the default group); `data_group`: the data-parallel group over which the rows are split (None:
    every rank of `group` holds the same rows). Returns (values, local indices, row_ptr, min_score) in
    ops.batch_topk's CSR layout (indices are local to the shard; add the shard's first latent id for global ids)
    and min_score, the smallest kept positive score over all ranks (inf if none)."""
    if f.dim() != 2 or w.dim() != 1 or w.shape[0] != f.shape[1]:
        raise InputError(f"f must be [B, F_r] and w [F_r], got {tuple(f.shape)} and {tuple(w.shape)}")
    B, F_local = f.shape
    groups = _groups(group, data_group)
    G, rank = dist.get_world_size(group), dist.get_rank(group)
    D, part = (1, 0) if data_group is None else (dist.get_world_size(data_group), dist.get_rank(data_group))
    sizes = torch.zeros(D, G, 2, dtype=torch.int64, device=f.device)
    sizes[part, rank, 0], sizes[part, rank, 1] = B, F_local
    sizes = _all_reduce(sizes, groups)
    if bool((sizes[:, :, 0] != B).any()):
        raise InputError(
            f"every rank must hold the same number of rows; rows per [data rank, latent rank]: "
            f"{sizes[:, :, 0].tolist()}"
        )
    if bool((sizes[:, :, 1] != sizes[:1, :, 1]).any()):
        raise InputError(f"latent shard sizes differ between data replicas: {sizes[:, :, 1].tolist()}")
    total = D * B * int(sizes[0, :, 1].sum())
    if not 1 <= K <= total:
        raise InputError(f"K must be in [1, B * F] = [1, {total}], got {K}")
    s = f.float() * w.float()
    keys = score_keys(s)
    t, greater = kth_largest_key(keys, K, group, data_group)
    need = K - greater  # >= 1 entries equal to t are kept
    tie = keys == t
    counts = torch.zeros(D, G, B, dtype=torch.int64, device=f.device)
    counts[part, rank] = tie.sum(1)
    counts = _all_reduce(counts, groups)
    per_row = counts.sum(1).flatten()  # ties per global row, rows in global order
    before_row = (torch.cumsum(per_row, 0) - per_row).view(D, B)[part]  # ties in earlier global rows
    before_rank = counts[part, :rank].sum(0)  # ties of lower latent ranks in the same row
    local_rank = torch.cumsum(tie.to(torch.int64), 1) - 1  # order of each tie within its local row
    tie_rank = before_row[:, None] + before_rank[:, None] + local_rank
    keep = (keys > t) | (tie & (tie_rank < need))
    flat = torch.nonzero(keep.flatten()).squeeze(1)
    score = s.flatten()[flat]
    positive = score > 0
    # A non-positive score carries 0; a NaN score keeps its f (the rule of ops.select).
    values = torch.where(score <= 0, torch.zeros((), dtype=f.dtype, device=f.device), f.flatten()[flat])
    indices = (flat % F_local).to(csr.index_dtype(F_local))
    row_ptr = csr.row_ptr_from_rows(flat // F_local, B)
    local_min = (
        torch.where(positive, score, torch.full_like(score, math.inf)).min()
        if flat.numel()
        else torch.tensor(math.inf, device=f.device)
    )
    min_score = _all_reduce(local_min.reshape(1).clone(), groups, dist.ReduceOp.MIN)[0]
    return values, indices, row_ptr, min_score
