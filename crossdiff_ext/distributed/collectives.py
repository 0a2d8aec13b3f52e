"""The two differentiable collectives of latent parallelism (Megatron's pair), over torch.distributed.

The loss is computed redundantly on every rank of the latent group, so each rank back-propagates the whole loss:
  sum_over_shards: forward all-reduce of the shards' partial sums, backward identity (each partial's gradient is
                   the full output's gradient, which every rank already holds);
  replicate_to_shards: forward identity, backward all-reduce (an input used by every shard receives the sum of
                   their gradients); only needed when the input itself requires a gradient.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReplicateToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_shards(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """The sum of every shard's partial `t` (forward all-reduce over `group`, backward identity)."""
    return _SumOverShards.apply(t, group)


def replicate_to_shards(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`t` used by every shard (forward identity, backward all-reduce over `group`); `t` itself when it needs no
    gradient."""
    return _ReplicateToShards.apply(t, group) if t.requires_grad else t


def all_reduce_(
    t: torch.Tensor, groups: Iterable[Optional[dist.ProcessGroup]], op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """In place, over every group in turn (non-differentiable)."""
    for group in groups:
        dist.all_reduce(t, op=op, group=group)
    return t
