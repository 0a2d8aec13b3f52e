"""Sharded data loading: every data-parallel rank draws the same global batch order (seeded as in one process)
and reads only its block of rows of each batch."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ..data.batches import BatchSource
from ..data.sampling import part_of
from ..errors import InputError


class _SlicedBatches:
    """A batch source that reads whole batches (iterables, mixtures) cut down to one rank's block."""

    def __init__(self, source: BatchSource, index: int, count: int):
        self.source, self.part = source, (index, count)

    def next(self) -> torch.Tensor:
        batch = self.source.next()
        if batch.shape[0] % self.part[1]:
            raise InputError(
                f"a batch of {batch.shape[0]} rows cannot be split over {self.part[1]} data-parallel ranks"
            )
        return part_of(batch, self.part)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()


def shard_source(source: BatchSource, index: int, count: int) -> BatchSource:
    """`source` (from data.as_batches, yielding global batches) restricted to block `index` of `count` of every
    batch. Tensors and stores read only those rows; other sources read whole batches and cut them."""
    if count == 1:
        return source
    batch_size = getattr(source, "batch_size", None)
    if batch_size is not None and batch_size % count:
        raise InputError(f"batch_size = {batch_size} must be divisible by the data-parallel size {count}")
    if hasattr(source, "part"):
        source.part = (index, count)
        return source
    return _SlicedBatches(source, index, count)


def gather_rows(x: torch.Tensor, group: Optional[dist.ProcessGroup], size: int) -> torch.Tensor:
    """The global batch from every data rank's rows, in rank order (used once, at step 0)."""
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)
