"""Batches for training, with a position that a checkpoint can save and restore exactly.

TensorBatches: shuffled batches of an in-memory tensor [N, M, d], a fresh permutation per epoch drawn from
(seed, epoch) alone, so the batch at any step is a pure function of the seed and the position.
IterableBatches: batches from any iterable (a generator, a DataLoader); resuming re-iterates and skips the
batches already consumed (exact when the iterable is deterministic).
MixedBatches: several sources (tensors, stores) in fixed proportions per batch.
"""

from collections.abc import Iterable, Sequence
from typing import Any, Optional, Protocol, Union

import torch

from ..errors import InputError
from .sampling import epoch_generator, part_of
from .store import ActivationStore, StoreBatches


class BatchSource(Protocol):
    """What training draws batches from: next(), and a position that state_dict / load_state_dict save exactly."""

    def next(self) -> torch.Tensor:
        """The next batch [B, M, d]."""

    def state_dict(self) -> dict[str, Any]:
        """The current position, for a checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position state_dict saved."""


class TensorBatches:
    """Shuffled batches of an in-memory tensor [N, M, d]; the last partial batch of an epoch is dropped.

    Args:
        data: The rows, [N, M, d] with N >= batch_size.
        batch_size: Rows per batch.
        seed: Seed of the per-epoch permutations (drawn from (seed, epoch) alone).
        shuffle: Permute the rows every epoch; False reads them in order.
        device: Device of the batches (default: data's).
        pin_memory: Pin CPU batches headed for a CUDA device.
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        pin_memory: bool = False,
    ):
        if not isinstance(data, torch.Tensor) or data.dim() != 3:
            raise InputError(
                f"data must be a tensor [N, M, d], got {type(data).__name__}"
                + (f" of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else "")
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if data.shape[0] < batch_size:
            raise InputError(f"data has {data.shape[0]} rows, fewer than one batch of batch_size = {batch_size}")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.device = torch.device(device) if device is not None else data.device
        self.pin_memory = pin_memory and data.device.type == "cpu" and self.device.type == "cuda"
        self.batches_per_epoch = data.shape[0] // batch_size  # the last partial batch of an epoch is dropped
        self.epoch, self.offset = 0, 0
        self.part = (0, 1)  # (index, count): read only this block of every batch (data parallelism)
        self._order = None

    def _permutation(self):
        if self._order is None or self._order[0] != self.epoch:
            n = self.data.shape[0]
            if self.shuffle:
                perm = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch))
            else:
                perm = torch.arange(n)
            self._order = (self.epoch, perm)
        return self._order[1]

    def next(self) -> torch.Tensor:
        """The next batch [batch_size, M, d] (this rank's block of it under data parallelism)."""
        if self.offset >= self.batches_per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0
        rows = self._permutation()[self.offset * self.batch_size : (self.offset + 1) * self.batch_size]
        rows = part_of(rows, self.part)
        self.offset += 1
        batch = self.data[rows.to(self.data.device)]
        if self.pin_memory:
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, offset) and what it is valid for."""
        return dict(
            kind="tensor",
            epoch=self.epoch,
            offset=self.offset,
            seed=self.seed,
            n_rows=int(self.data.shape[0]),
            batch_size=self.batch_size,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a state_dict's position; InputError when it was saved for other data."""
        if state.get("kind") != "tensor":
            raise InputError(f"the checkpoint's data position is for {state.get('kind')!r} data, not a tensor")
        for key in ("seed", "batch_size"):
            if state[key] != getattr(self, key):
                raise InputError(
                    f"cannot resume: the checkpoint's data {key} is {state[key]}, now {getattr(self, key)}"
                )
        if state["n_rows"] != self.data.shape[0]:
            raise InputError(
                f"cannot resume: the checkpoint was trained on {state['n_rows']} rows, the data now has "
                f"{self.data.shape[0]}"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]


class IterableBatches:
    """Batches from any iterable of [B, M, d] tensors; resuming re-iterates and skips the consumed batches.

    Args:
        iterable: The batches (re-iterated from the start on resume: exact when it is deterministic).
        device: Device to move every batch to (default: leave it where it is).
    """

    def __init__(self, iterable: Iterable[torch.Tensor], *, device: Optional[Union[torch.device, str]] = None):
        self.iterable, self.device = iterable, device
        self.consumed = 0
        self._it = None

    def next(self) -> torch.Tensor:
        """The next batch; RuntimeError when the iterable ends, InputError when it yields a non-tensor."""
        if self._it is None:
            self._it = iter(self.iterable)
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(
                f"the data iterable ended after {self.consumed} batches; train for fewer steps or "
                "pass an endless iterable"
            ) from None
        self.consumed += 1
        if not isinstance(batch, torch.Tensor):
            raise InputError(f"batches must be tensors [B, M, d], got {type(batch).__name__}")
        return batch.to(self.device) if self.device is not None else batch

    def state_dict(self) -> dict[str, Any]:
        """The position: the number of batches consumed."""
        return dict(kind="iterable", consumed=self.consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a state_dict's position by replaying the iterable."""
        if state.get("kind") != "iterable":
            raise InputError(f"the checkpoint's data position is for {state.get('kind')!r} data, not an iterable")
        self._it = iter(self.iterable)
        self.consumed = 0
        for _ in range(state["consumed"]):  # replay: exact when the iterable is deterministic
            self.next()


class MixedBatches:
    """Batches that mix several sources in fixed proportions, e.g. half web text and half chat.

    MixedBatches([(web_store, 0.5), (chat_store, 0.5)], batch_size=2048): each source contributes
    round(fraction * batch_size) rows per batch (the last source takes the remainder) from its own shuffled
    stream (a tensor, a store or a batch source); the position of every stream is saved, so resuming is exact.

    Args:
        sources: (data, fraction) pairs; each data is anything as_batches takes (a tensor [N, M, d], an
            ActivationStore, a batch source or an iterable of batches); the fractions are > 0 and sum to 1.
        batch_size: Rows per mixed batch.
        seed: Seed of the sources' shuffles (source i uses seed * 7919 + i).
        device: Device of the batches.

    Raises:
        InputError: No sources, fractions that are not positive or do not sum to 1, or a batch_size that gives
            some source no rows.
    """

    def __init__(
        self,
        sources: Sequence[tuple[Any, float]],
        batch_size: int,
        *,
        seed: int = 0,
        device: Optional[Union[torch.device, str]] = None,
    ):
        if not sources:
            raise InputError("MixedBatches needs at least one (data, fraction) pair")
        fractions = [float(f) for _, f in sources]
        if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise InputError(f"fractions must be > 0 and sum to 1, got {fractions}")
        counts = [int(round(f * batch_size)) for f in fractions[:-1]]
        counts.append(batch_size - sum(counts))
        if any(c < 1 for c in counts):
            raise InputError(f"batch_size = {batch_size} gives some source no rows per batch ({counts})")
        self.batch_size, self.counts = batch_size, counts
        self.sources = [
            as_batches(data, c, seed=seed * 7919 + i, device=device)
            for i, ((data, _), c) in enumerate(zip(sources, counts))
        ]

    def next(self) -> torch.Tensor:
        """The next mixed batch: each source's rows in turn, in the order of `sources`.

        Returns:
            [batch_size, M, d], the concatenation of every source's next batch.
        """
        return torch.cat([s.next() for s in self.sources])

    def state_dict(self) -> dict[str, Any]:
        """The position of every source's stream, for a checkpoint.

        Returns:
            {"kind": "mixed", "counts": rows per source, "sources": each source's state_dict()}.
        """
        return dict(kind="mixed", counts=self.counts, sources=[s.state_dict() for s in self.sources])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume every source at the position a state_dict saved.

        Args:
            state: What state_dict returned.

        Raises:
            InputError: The state is not a mixture with the same rows per source (or a source's own state does
                not match it).
        """
        if state.get("kind") != "mixed" or state["counts"] != self.counts:
            raise InputError(
                f"cannot resume: the checkpoint's data was {state.get('kind')!r} with rows per source "
                f"{state.get('counts')}, now 'mixed' with {self.counts}"
            )
        for source, sub in zip(self.sources, state["sources"]):
            source.load_state_dict(sub)

    def close(self) -> None:
        """Close the sources that hold resources (the prefetch threads of store sources)."""
        for source in self.sources:
            if hasattr(source, "close"):
                source.close()


def _moments(tensor, chunk=8192):
    """(mean, population variance) [M, d] in float64 of a tensor [N, M, d], in chunks of rows."""
    n = tensor.shape[0]
    mean = sum(c.double().sum(0) for c in tensor.split(chunk)) / n
    var = sum((c.double() - mean).pow(2).sum(0) for c in tensor.split(chunk)) / n
    return mean, var


def statistics(source: BatchSource) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, variance) [M, d] float64 of everything a batch source draws from, or None when that is unknown
    (an iterable). A mixture weights each source's moments by its share of every batch; a source with a
    statistics() method gives its own."""
    if isinstance(source, TensorBatches):
        return _moments(source.data)
    if isinstance(source, StoreBatches):
        return source.store.mean.double(), source.store.variance.double()
    if isinstance(source, MixedBatches):
        parts = [statistics(s) for s in source.sources]
        if any(p is None for p in parts):
            return None
        weights = [c / source.batch_size for c in source.counts]
        mean = sum(w * m for w, (m, _) in zip(weights, parts))
        second = sum(w * (v + m.pow(2)) for w, (m, v) in zip(weights, parts))
        return mean, (second - mean.pow(2)).clamp_min(0)
    if callable(getattr(source, "statistics", None)):  # a source that knows its moments (data.online)
        return source.statistics()
    return None


def as_batches(
    data: Any, batch_size: int, *, seed: int = 0, device: Optional[Union[torch.device, str]] = None
) -> BatchSource:
    """A batch source for `data`: a tensor [N, M, d], an object with next()/state_dict() (passed through), or an
    iterable of [B, M, d] batches."""
    if isinstance(data, torch.Tensor):
        return TensorBatches(data, batch_size, seed=seed, device=device, pin_memory=True)
    if isinstance(data, ActivationStore):
        return StoreBatches(data, batch_size, seed=seed, device=device)
    if hasattr(data, "next") and hasattr(data, "state_dict") and hasattr(data, "load_state_dict"):
        if getattr(data, "batch_size", batch_size) != batch_size:
            raise InputError(
                f"the batch source yields batches of {data.batch_size} rows, but batch_size = {batch_size}"
            )
        return data
    if hasattr(data, "__iter__"):
        return IterableBatches(data, device=device)
    raise InputError(
        f"data must be a tensor [N, M, d], an activation store or an iterable of batches, got {type(data).__name__}"
    )
