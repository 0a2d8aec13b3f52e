"""The row arithmetic every batch source shares: one data-parallel rank's block of a batch, and the shuffle
generator of an epoch (a function of the seed and the epoch alone, so positions resume exactly)."""

import torch


def part_of(rows: torch.Tensor, part: tuple[int, int]) -> torch.Tensor:
    """The rows of one data-parallel rank: part = (index, count) splits a batch into count equal blocks."""
    index, count = part
    n = rows.shape[0] // count
    return rows[index * n : (index + 1) * n]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's shuffle: a function of (seed, epoch) alone, so positions resume exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
