"""Max-activating examples: for chosen latents, the tokens where they fire most (and samples at activation
quantiles), each with its surrounding tokens from the same sequence, read from a paired activation store that
holds token ids and positions (what `crossdiff collect` writes); with the document and source of each, when the
store records them.

Identical contexts are shown once: a latent that fires on the same window of tokens many times (a chat
template's opening, a boilerplate line) gets one top example with the number of its firing tokens that share
that window (Example.count), and the next top examples are other contexts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch

from ..data.store import ActivationStore
from ..errors import InputError
from ..layer.crosscoder import CrossCoder
from .latent_scaling import inference_pass

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Example:
    """One context of a latent: the token (a store row) where it fired, with its surrounding tokens."""

    latent: int
    activation: float
    row: int  # row of the store (the token)
    tokens: list[int]  # token ids of the context window
    focus: int  # index of the token itself within `tokens`
    quantile: Optional[float] = None  # None for a top example; the activation quantile it was drawn at otherwise
    count: int = 1  # firing tokens of this latent with the same context (the same tokens around the same focus)
    document: Optional[int] = None  # index of the row's document in its source (None: the store does not record it)
    source: Optional[str] = None  # name of the document's source (None: the store does not record it)

    def text(self, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str]:
        """The context as text, split around the activating token: (before, token, after).

        The whole context is decoded at once, so words keep the spaces the tokenizer puts between them (decoding
        token by token and gluing the pieces loses them); the three parts concatenate to that text exactly, and
        the whitespace around the activating token belongs to its neighbours.

        Args:
            tokenizer: the tokenizer of the models whose activations the store holds.

        Returns:
            (text before the token, the token's text, text after it).
        """
        return split_context(tokenizer, self.tokens, self.focus)


@dataclass
class LatentExamples:
    """A latent's examples: its top contexts and one context nearest each activation quantile."""

    latent: int
    count: int  # tokens where the latent fired
    top: list[Example] = field(default_factory=list)
    quantiles: list[Example] = field(default_factory=list)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_context(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int], focus: int) -> tuple[str, str, str]:
    """Decode `tokens` as one text and split it around the token at index `focus`: (before, token, after).

    The split points are where decoding the tokens before the focus, and through it, stops agreeing with the
    whole text, so the parts concatenate to the whole decoded text for any tokenizer (word-level, byte-level BPE
    whose prefix may end inside a character, SentencePiece). Whitespace at either end of the token's part moves
    to its neighbours.

    Args:
        tokenizer: a transformers tokenizer.
        tokens: the context's token ids.
        focus: index into `tokens` of the activating token.

    Returns:
        (text before the token, the token's text, text after it).

    Raises:
        InputError: if `focus` is not an index into `tokens`.
    """
    if not 0 <= focus < len(tokens):
        raise InputError(f"focus must index the {len(tokens)} tokens, got {focus}")
    tokens = [int(t) for t in tokens]

    def decode(ids):
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""

    whole = decode(tokens)
    start = _common_prefix(decode(tokens[:focus]), whole)
    end = max(start, _common_prefix(decode(tokens[: focus + 1]), whole))
    token = whole[start:end]
    lead, trail = len(token) - len(token.lstrip()), len(token) - len(token.rstrip())
    if token.strip():  # a token that decodes to whitespace only stays as it is
        start, end = start + lead, end - trail
    return whole[:start], whole[start:end], whole[end:]


def sequence_starts(positions: torch.Tensor, *documents: Optional[torch.Tensor]) -> torch.Tensor:
    """[rows] bool: True where a new sequence starts (the position does not continue the previous row's, or one of
    the `documents` columns given, e.g. the store's document and source ids, changes)."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    for column in documents:
        if column is not None:
            starts[1:] |= column[1:] != column[:-1]
    return starts


def context_windows(
    rows: torch.Tensor, token_ids: torch.Tensor, seq_id: torch.Tensor, before: int, after: int
) -> torch.Tensor:
    """The token windows around `rows`: [n, before + 1 + after] token ids, -1 where the window leaves the row's
    sequence (or the store); equal windows are equal contexts.

    Args:
        rows: Store rows [n].
        token_ids: The store's token ids [rows].
        seq_id: The sequence of every store row [rows] (cumsum of sequence_starts).
        before: Tokens before the row.
        after: Tokens after the row.

    Returns:
        [n, before + 1 + after] int64.
    """
    at = rows[:, None] + torch.arange(-before, after + 1)
    inside = (at >= 0) & (at < token_ids.numel())
    at = at.clamp(0, max(token_ids.numel() - 1, 0))
    same = inside & (seq_id[at] == seq_id[rows][:, None])
    return torch.where(same, token_ids[at], torch.full_like(at, -1))


@torch.inference_mode()
def max_activating_examples(
    cc: CrossCoder,
    store: ActivationStore,
    latents: Iterable[int],
    *,
    n: int = 10,
    quantiles: Sequence[float] = (0.25, 0.5, 0.75),
    before: int = 10,
    after: int = 3,
    batch_size: int = 4096,
    progress: bool = False,
    distinct: bool = True,
) -> dict[int, LatentExamples]:
    """{latent: LatentExamples} for each id in `latents`: the n tokens with the largest inference-mode activation
    and one token nearest each activation quantile, with up to `before`/`after` tokens of context from the same
    sequence. Streams the store once; keeps (activation, row) only for the chosen latents.

    Args:
        cc: The crosscoder.
        store: A store written by collect (token ids and positions; document and source ids when it records them).
        latents: The latent ids.
        n: Top examples per latent.
        quantiles: Activation quantiles to draw one example at each.
        before: Context tokens before the activating token.
        after: Context tokens after it.
        batch_size: Rows per encoder batch.
        progress: Show a tqdm bar.
        distinct: Top examples are n distinct contexts (each once, highest activation first, with `count` firing
            tokens sharing it); False: the n highest tokens, repeats included.

    Returns:
        {latent: LatentExamples}; every Example carries its count, document index and source name.

    Raises:
        InputError: store is not an ActivationStore with token ids and positions, a latent id is out of range, or
            the BatchTopK threshold is unset.
    """
    token_ids, positions = _store_tokens(store)
    latents = _checked_latents(cc, latents)
    if not latents:
        return {}
    lat, val, row = _firing_entries(cc, store, latents, batch_size, progress)
    documents, sources, names = store.documents(), store.sources(), store.source_names
    seq_id = torch.cumsum(sequence_starts(positions, documents, sources).long(), 0)

    def example(j: int, value: torch.Tensor, r: torch.Tensor, count: int, q: Optional[float] = None) -> Example:
        lo, hi = max(0, r - before), min(len(store), r + after + 1)
        same = (seq_id[lo:hi] == seq_id[r]).nonzero().squeeze(1) + lo
        lo, hi = int(same.min()), int(same.max()) + 1
        return Example(
            j,
            float(value),
            int(r),
            token_ids[lo:hi].tolist(),
            int(r - lo),
            q,
            count,
            None if documents is None else int(documents[r]),
            None if sources is None else names[int(sources[r])],
        )

    out = {}
    for j in latents:
        mine = lat == j
        v, r = val[mine], row[mine]
        result = LatentExamples(j, int(v.numel()))
        if v.numel():
            windows = context_windows(r, token_ids, seq_id, before, after)
            _, context, counts = torch.unique(windows, dim=0, return_inverse=True, return_counts=True)
            order = torch.argsort(v, descending=True, stable=True)
            chosen = _first_of_each(order, context, n) if distinct else order[:n].tolist()
            result.top = [example(j, v[i], r[i], int(counts[context[i]])) for i in chosen]
            ascending = order.flip(0)
            for q in quantiles:
                i = ascending[min(int(q * v.numel()), v.numel() - 1)]
                result.quantiles.append(example(j, v[i], r[i], int(counts[context[i]]), q))
        out[j] = result
    return out


def _first_of_each(order, context, n):
    """The first n entries of `order` whose context was not seen before in it."""
    seen, chosen = set(), []
    for i in order.tolist():
        c = int(context[i])
        if c not in seen:
            seen.add(c)
            chosen.append(i)
            if len(chosen) == n:
                break
    return chosen


def _store_tokens(store):
    """(token ids, positions) of a store written by collect."""
    if not isinstance(store, ActivationStore):
        raise InputError(f"store must be an ActivationStore (it holds the token ids), got {type(store).__name__}")
    token_ids, positions = store.token_ids(), store.positions()
    if token_ids is None or positions is None:
        raise InputError(
            f"{store.path}: the store has no token ids/positions; examples need a store written by `crossdiff collect`"
        )
    return token_ids, positions


def _checked_latents(cc, latents):
    """The latent ids as a list of ints, once they are in range and cc can give inference-mode codes."""
    latents = [int(j) for j in latents]
    bad = [j for j in latents if not 0 <= j < cc.dict_size]
    if bad:
        raise InputError(f"latents must be ids in [0, {cc.dict_size}), got {bad}")
    if cc.activation == "batch_topk" and float(cc.threshold) < 0:
        raise InputError("the crosscoder's inference threshold is unset (-1); set cc.threshold or train longer")
    return latents


def _firing_entries(cc, store, latents, batch_size, progress):
    """(latent, activation, store row) of every nonzero inference-mode code of the chosen latents, in one pass."""
    wanted = torch.zeros(cc.dict_size, dtype=torch.bool, device=cc.W_enc.device)
    wanted[torch.tensor(latents, device=wanted.device)] = True
    found_latent, found_value, found_row = [], [], []
    offset = 0
    with inference_pass(cc, store, batch_size, desc="examples" if progress else None) as batches:
        for x in batches:
            codes = cc.encode(
                cc.normalize(x.float()).to(cc.input_dtype), normalized=True, use_threshold=cc.activation == "batch_topk"
            )
            idx = codes.indices.long()
            keep = wanted[idx] & (codes.values != 0)
            found_latent.append(idx[keep].cpu())
            found_value.append(codes.values[keep].float().cpu())
            found_row.append(codes.rows()[keep].cpu() + offset)
            offset += x.shape[0]
    return torch.cat(found_latent), torch.cat(found_value), torch.cat(found_row)


@torch.inference_mode()
def token_share(
    cc: CrossCoder, store: ActivationStore, token_ids: Iterable[int], *, batch_size: int = 4096
) -> torch.Tensor:
    """[F] float64: the share of each latent's total inference-mode activation over the store that falls on tokens
    whose id is in `token_ids` (e.g. the chat template's tokens); NaN for latents that never fire. One pass."""
    if not isinstance(store, ActivationStore) or store.token_ids() is None:
        raise InputError("store must be an ActivationStore with token ids (written by `crossdiff collect`)")
    ids = store.token_ids()
    chosen = torch.zeros(int(max(ids.max().item(), max(token_ids, default=0))) + 1, dtype=torch.bool)
    chosen[torch.tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.long)] = True
    device = cc.W_enc.device
    on, total = (torch.zeros(cc.dict_size, dtype=torch.float64, device=device) for _ in range(2))
    offset = 0
    with inference_pass(cc, store, batch_size) as batches:
        for x in batches:
            codes = cc.encode(
                cc.normalize(x.float()).to(cc.input_dtype), normalized=True, use_threshold=cc.activation == "batch_topk"
            )
            idx, values = codes.indices.long(), codes.values.double()
            hit = chosen[ids[offset : offset + x.shape[0]]].to(device)[codes.rows()]
            total.index_add_(0, idx, values)
            on.index_add_(0, idx, values * hit)
            offset += x.shape[0]
    return torch.where(total > 0, on / total.clamp_min(1e-300), torch.full_like(total, float("nan"))).cpu()
