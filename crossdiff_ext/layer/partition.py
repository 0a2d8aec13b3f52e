"""Dedicated latents (after Jiralerspong & Bricken's Dedicated Feature Crosscoders): a partition of the dictionary
into latents that belong to one model only and latents shared by all.

A partition (n_0, ..., n_{M-1}) gives model m the n_m latents [o_m, o_m + n_m), o_m = n_0 + ... + n_{m-1}, in
model order, and leaves the rest, [sum n, F), shared. For two models that is (n_base_only, n_chat_only): the
base-dedicated latents first, then the chat-dedicated ones, then the shared ones. A dedicated latent's encoder
and decoder rows of every other model (its absent rows) are exactly zero and get no gradient, so it reads and
writes its own model only. The kernels see the zero rows like any others: the selection weight
w_j = sum_m ||W_dec[j, m]|| of a dedicated latent is its own row's norm, and the encoder and decoder multiply by
zeros. A partition whose entries are all zero is no partition (None).

Contiguous blocks keep a latent-parallel shard's part of a partition a partition of the same shape (shard_partition)
and make the gradient mask a few slice fills.
"""

from collections.abc import Sequence
from typing import Optional

import torch

from ..errors import InputError

Partition = tuple[int, ...]


def check_partition(
    partition: Optional[Sequence[int]], n_models: int, dict_size: int, name: str = "partition"
) -> Optional[Partition]:
    """Check a partition against the crosscoder's shape and bring it to its stored form.

    Args:
        partition: None, or one count per model of the latents dedicated to it (e.g. (n_base_only, n_chat_only)).
        n_models: M, the crosscoder's number of models.
        dict_size: F, its number of latents.
        name: How messages name the setting (e.g. "--partition" at the command line).

    Returns:
        A tuple of M ints >= 0 summing to at most F, or None for no partition (None, or all counts zero).

    Raises:
        InputError: partition is not a sequence of M ints >= 0, or they sum beyond dict_size.
    """
    if partition is None:
        return None
    if isinstance(partition, (str, bytes)) or not isinstance(partition, Sequence):
        raise InputError(
            f"{name} must be a sequence of {n_models} latent counts (one per model, e.g. (n_base_only, "
            f"n_chat_only)) or None, got {partition!r}"
        )
    counts = tuple(partition)
    if len(counts) != n_models:
        raise InputError(f"{name} must hold one latent count per model (n_models = {n_models}), got {list(counts)}")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts):
        raise InputError(f"{name} must hold ints >= 0 (latents dedicated to each model), got {list(counts)}")
    if sum(counts) > dict_size:
        raise InputError(
            f"{name} dedicates {sum(counts)} latents ({' + '.join(map(str, counts))}), more than dict_size = "
            f"{dict_size}"
        )
    return counts if any(counts) else None


def dedicated_ranges(partition: Optional[Partition]) -> list[tuple[int, int, int]]:
    """The dedicated latents as blocks.

    Args:
        partition: A checked partition (check_partition) or None.

    Returns:
        [(model, first, end)] for every model with dedicated latents: latents [first, end) belong to `model`.
    """
    ranges, first = [], 0
    for model, n in enumerate(partition or ()):
        if n:
            ranges.append((model, first, first + n))
        first += n
    return ranges


def latent_owner(partition: Optional[Partition], dict_size: int) -> torch.Tensor:
    """The model each latent is dedicated to.

    Args:
        partition: A checked partition or None.
        dict_size: F.

    Returns:
        [F] int64 on the CPU: the model index of a dedicated latent, -1 for a shared one.
    """
    owner = torch.full((dict_size,), -1, dtype=torch.int64)
    for model, first, end in dedicated_ranges(partition):
        owner[first:end] = model
    return owner


def absent_rows(partition: Optional[Partition], dict_size: int, n_models: int) -> torch.Tensor:
    """Which [latent, model] rows a partition fixes at zero.

    Args:
        partition: A checked partition or None.
        dict_size: F.
        n_models: M.

    Returns:
        [F, M] bool on the CPU: True where latent j is dedicated to a model other than m.
    """
    owner = latent_owner(partition, dict_size)
    return (owner[:, None] >= 0) & (owner[:, None] != torch.arange(n_models)[None, :])


@torch.no_grad()
def zero_absent_rows_(W: torch.Tensor, partition: Optional[Partition]) -> torch.Tensor:
    """Set the absent rows of W [F, M, d] (an encoder or decoder) to zero, in place.

    Args:
        W: [F, M, d] weights.
        partition: A checked partition or None (nothing to do).

    Returns:
        W.
    """
    for model, first, end in dedicated_ranges(partition):
        W[first:end, :model] = 0
        W[first:end, model + 1 :] = 0
    return W


def nonzero_absent_latents(W: torch.Tensor, partition: Optional[Partition]) -> torch.Tensor:
    """The latents whose absent rows in W [F, M, d] are not all zero (a broken partition).

    Args:
        W: [F, M, d] weights.
        partition: A checked partition or None.

    Returns:
        1-D int64 latent ids on the CPU (empty when the partition holds).
    """
    bad = []
    for model, first, end in dedicated_ranges(partition):  # only the dedicated blocks are read
        rows = W.detach()[first:end]
        nonzero = (rows[:, :model] != 0).flatten(1).any(1) | (rows[:, model + 1 :] != 0).flatten(1).any(1)
        bad.append(torch.nonzero(nonzero).flatten().cpu() + first)
    return torch.cat(bad) if bad else torch.zeros(0, dtype=torch.int64)


class _MaskAbsentGradient(torch.autograd.Function):
    """Identity in the forward pass (a view, no copy); the backward pass zeroes the absent rows' gradient."""

    @staticmethod
    def forward(W, ranges):
        return W.view_as(W)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.ranges = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()  # the incoming gradient may be shared with another branch of the graph
        for model, first, end in ctx.ranges:
            grad[first:end, :model] = 0
            grad[first:end, model + 1 :] = 0
        return grad, None


def mask_absent_gradient(W: torch.Tensor, partition: Optional[Partition]) -> torch.Tensor:
    """W [F, M, d] as it is, with the gradient that reaches it through the result zero on the absent rows.

    Args:
        W: [F, M, d] weights (a parameter, or a cast of one).
        partition: A checked partition or None.

    Returns:
        W itself without dedicated latents; else a view of W whose backward zeroes the absent rows' gradient.
    """
    ranges = tuple(dedicated_ranges(partition))
    if not ranges or not (W.requires_grad and torch.is_grad_enabled()):
        return W
    return _MaskAbsentGradient.apply(W, ranges)


def shard_partition(partition: Optional[Partition], first: int, end: int) -> Optional[Partition]:
    """The partition of the latents [first, end) taken on their own (a latent-parallel shard's).

    Args:
        partition: The whole crosscoder's checked partition, or None.
        first: The shard's first latent.
        end: One past its last latent.

    Returns:
        Per model, how many of its dedicated latents fall in [first, end); None when none do.
    """
    counts = tuple(max(0, min(b, end) - max(a, first)) for _, a, b in _blocks(partition))
    return counts if any(counts) else None


def _blocks(partition):
    """(model, first, end) for every model of the partition, empty blocks included."""
    first = 0
    for model, n in enumerate(partition or ()):
        yield model, first, first + n
        first += n


def merge_partitions(parts: Sequence[Optional[Partition]], n_models: int) -> Optional[Partition]:
    """The whole crosscoder's partition from those of its consecutive shards (they add up).

    Args:
        parts: The shards' partitions, in latent order (None for a shard without dedicated latents).
        n_models: M.

    Returns:
        The sum, or None when no shard has dedicated latents. The caller checks that every shard's part is
        shard_partition of the sum (the blocks must line up).
    """
    total = [0] * n_models
    for part in parts:
        for m, n in enumerate(part or ()):
            total[m] += n
    return tuple(total) if any(total) else None
