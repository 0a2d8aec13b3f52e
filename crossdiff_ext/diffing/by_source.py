"""A latent's firing split by the source of its tokens: for a store collected from a mixture (say web text and chat
conversations), how often each latent fires on each source's tokens, and how much of its activation falls there.
The paper compares the chat-specific latents' firing on chat data against web data in this way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..data.store import ActivationStore
from ..errors import InputError
from ..layer.crosscoder import CrossCoder
from .latent_scaling import inference_pass

__all__ = ["SourceFiring", "add_source_columns", "check_sources", "firing_by_source", "source_labels"]


@dataclass
class SourceFiring:
    """Per source and latent: the tokens where the latent fires and the sum of its activations there.

    Attributes:
        names: The sources' names (as the stores record them).
        tokens: [S] tokens read per source.
        fires: [S, F] int64, tokens of each source where each latent fires (inference-mode code > 0).
        activation: [S, F] float64, the sum of each latent's activation over each source's tokens.
    """

    names: list[str]
    tokens: torch.Tensor
    fires: torch.Tensor
    activation: torch.Tensor

    def frequency(self) -> torch.Tensor:
        """[S, F] float64: the share of each source's tokens where each latent fires (NaN for a source with no
        token)."""
        tokens = self.tokens.double()[:, None]
        return torch.where(tokens > 0, self.fires.double() / tokens.clamp_min(1), torch.nan)

    def share(self) -> torch.Tensor:
        """[S, F] float64: the share of each latent's firing tokens that come from each source (NaN for a latent
        that never fires)."""
        total = self.fires.sum(0, keepdim=True).double()
        return torch.where(total > 0, self.fires.double() / total.clamp_min(1), torch.nan)


def check_sources(stores: Sequence[ActivationStore]) -> None:
    """Refuse stores that do not record each row's source (before any pass over them).

    Args:
        stores: The stores.

    Raises:
        InputError: A store has no source column (written before provenance, or not by collect).
    """
    for store in stores:
        if not isinstance(store, ActivationStore) or store.source_names is None or store.sources() is None:
            where = store.path if isinstance(store, ActivationStore) else type(store).__name__
            raise InputError(f"{where}: the store records no source per row (collect it again to split by source)")


@torch.inference_mode()
def firing_by_source(cc: CrossCoder, stores: Sequence[ActivationStore], *, batch_size: int = 4096) -> SourceFiring:
    """Count each latent's firing per source over the stores (one pass each); sources of the same name in several
    stores are added up.

    Args:
        cc: The crosscoder.
        stores: Stores that record each row's source (written by collect).
        batch_size: Rows per encoder batch.

    Returns:
        The SourceFiring, sources in the order they first appear.

    Raises:
        InputError: A store records no sources (written before provenance, or not by collect), or the BatchTopK
            threshold is unset.
    """
    if cc.activation == "batch_topk" and float(cc.threshold) < 0:
        raise InputError("the crosscoder's inference threshold is unset (-1); set cc.threshold or train longer")
    check_sources(stores)
    names: list[str] = []
    parts = []
    for store in stores:
        for name in store.source_names:
            if name not in names:
                names.append(name)
        parts.append((_one_store(cc, store, batch_size), [names.index(n) for n in store.source_names]))
    device = cc.W_enc.device
    tokens = torch.zeros(len(names), dtype=torch.int64)
    fires = torch.zeros(len(names), cc.dict_size, dtype=torch.int64, device=device)
    activation = torch.zeros(len(names), cc.dict_size, dtype=torch.float64, device=device)
    for (t, f, a), ids in parts:
        index = torch.tensor(ids, dtype=torch.long)
        tokens.index_add_(0, index, t)
        fires.index_add_(0, index.to(device), f)
        activation.index_add_(0, index.to(device), a)
    return SourceFiring(names, tokens, fires.cpu(), activation.cpu())


def _one_store(cc, store, batch_size):
    """(tokens [S], fires [S, F], activation [S, F]) of one store, S its own sources."""
    sources = store.sources()
    n_sources, F, device = len(store.source_names), cc.dict_size, cc.W_enc.device
    tokens = torch.bincount(sources, minlength=n_sources)
    fires = torch.zeros(n_sources * F, dtype=torch.int64, device=device)
    activation = torch.zeros(n_sources * F, dtype=torch.float64, device=device)
    offset = 0
    with inference_pass(cc, store, batch_size) as batches:
        for x in batches:
            codes = cc.encode(
                cc.normalize(x.float()).to(cc.input_dtype), normalized=True, use_threshold=cc.activation == "batch_topk"
            )
            fired = codes.values != 0
            row_source = sources[offset : offset + x.shape[0]].to(device)[codes.rows()[fired]]
            flat = row_source * F + codes.indices.long()[fired]
            fires.index_add_(0, flat, torch.ones_like(flat))
            activation.index_add_(0, flat, codes.values[fired].double())
            offset += x.shape[0]
    return tokens, fires.view(n_sources, F), activation.view(n_sources, F)


def source_labels(names: Sequence[str]) -> list[str]:
    """Short labels for source names: the last part of each path or Hub name (without a data file's suffix and
    split), or the full names where those would collide.

    Args:
        names: The sources' names.

    Returns:
        One label per name.
    """
    short = []
    for name in names:
        base = os.path.basename(name.rstrip("/").split(":")[0].split("[")[0]) or name
        stem, suffix = os.path.splitext(base)
        short.append(stem if suffix in (".jsonl", ".txt", ".parquet", ".arrow", ".csv") and stem else base)
    return short if len(set(short)) == len(short) else list(names)


def add_source_columns(table: dict[str, list[Any]], firing: SourceFiring) -> list[str]:
    """Add to a latent table, per source, the firing frequency on that source's tokens ("freq[LABEL]") and the
    share of the latent's firing tokens from it ("share[LABEL]").

    Args:
        table: The latent table (diffing.analysis.latent_table), one row per latent; changed in place.
        firing: firing_by_source's result for the same crosscoder.

    Returns:
        The source labels, in order.

    Raises:
        InputError: The table and the firing count differ in latents.
    """
    if firing.fires.shape[1] != len(table["latent"]):
        raise InputError(f"the table has {len(table['latent'])} latents, the firing counts {firing.fires.shape[1]}")
    labels = source_labels(firing.names)
    frequency, share = firing.frequency(), firing.share()
    for s, label in enumerate(labels):
        table[f"freq[{label}]"] = frequency[s].tolist()
        table[f"share[{label}]"] = share[s].tolist()
    return labels
