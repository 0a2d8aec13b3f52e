"""The Activation Difference Lens: what a narrow fine-tune writes into the residual stream of generic text, read
back through the fine-tuned model.

Both models read the same generic documents, cut to their first n_positions tokens (as the fine-tuned model's
tokenizer reads them, special tokens included). At block `layer` (default the middle one, n_layers // 2), each
position p gets the mean over documents of h_ft[p] - h_base[p], from forwards stopped after that block. Each
delta_p is then read three ways, all through the fine-tuned model:
  - logit lens: its final norm and unembedding applied to delta_p (top and bottom tokens);
  - Patchscope: delta_p written into a token-identity prompt over a sweep of scales (lens.py has the rule that
    picks the scale);
  - steering (when prompts are given): generation with delta_p's direction added at every position, at the
    strongest strength that keeps the text coherent (coherent_steering.py).
Scales are multiples of the typical residual norm at the layer: the median over the documents' read positions of
||h_ft[p]|| (a median, because the first position of real models carries a norm many times the others').
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..errors import InputError, require_int
from ..models.blocks import n_layers, run_to_layer
from ..models.loading import ModelSpec, model_name
from .coherent_steering import SteeringResult, steer_coherently
from .lens import (
    CONTROL_WORD,
    IDENTITY_PROMPT,
    PATCHSCOPE_SCALES,
    PLACEHOLDER,
    PatchscopeResult,
    logit_lens,
    patchscope,
)
from .token_batches import (
    Data,
    Device,
    ModelPair,
    device_of,
    open_pair,
    pad_id,
    padded_batches,
    ranked_tokens,
    read_corpus,
    token_ids,
)

__all__ = ["ADLResult", "MeanDifference", "adl", "mean_difference"]


@dataclass
class MeanDifference:
    """The per-position mean activation difference and what it was measured on.

    Attributes:
        delta: [n_positions, d] float32: mean over documents of h_ft[p] - h_base[p].
        counts: [n_positions] int64: documents that reach each position.
        typical_norm: The median of ||h_ft[p]|| over every document's read positions.
    """

    delta: torch.Tensor
    counts: torch.Tensor
    typical_norm: float


@torch.no_grad()
def mean_difference(
    pair: ModelPair, layer: int, ids: Sequence[Sequence[int]], n_positions: int, batch_size: int = 32
) -> MeanDifference:
    """The mean over documents of h_ft[p] - h_base[p] at block `layer` for the first n_positions positions.

    Args:
        pair: The loaded models.
        layer: The block read.
        ids: Each document's token ids (only the first n_positions are read).
        n_positions: Positions read.
        batch_size: Documents per forward.

    Returns:
        The MeanDifference.

    Raises:
        InputError: No document reaches the last position.
    """
    cut = [list(t[:n_positions]) for t in ids if len(t)]
    total, counts, norms = None, torch.zeros(n_positions, dtype=torch.int64), []
    for input_ids, attention in padded_batches(cut, batch_size, pad_id(pair.tokenizer), device_of(pair.chat)):
        h_ft = run_to_layer(pair.chat, layer, input_ids=input_ids, attention_mask=attention).float()
        where = device_of(pair.base)
        h_base = run_to_layer(pair.base, layer, input_ids=input_ids.to(where), attention_mask=attention.to(where))
        real = attention.bool()[..., None]  # where, not a product: a padded row may hold NaN in some models
        diff = torch.where(real, h_ft - h_base.float().to(h_ft.device), 0.0).double().sum(0)
        width = diff.shape[0]
        total = torch.zeros(n_positions, diff.shape[1], dtype=torch.float64) if total is None else total
        total[:width] += diff.cpu()
        counts[:width] += attention.sum(0).cpu()
        norms.append(h_ft.norm(dim=-1)[attention.bool()].cpu())
    if int(counts[-1]) == 0:
        longest = int((counts > 0).sum())
        raise InputError(f"n_positions is {n_positions}, but the longest document has {longest} tokens")
    return MeanDifference(
        delta=(total / counts[:, None]).float(),
        counts=counts,
        typical_norm=float(torch.cat(norms).median()),
    )


@dataclass
class ADLResult:
    """What adl returns: the mean difference per position and its three readouts.

    Attributes:
        layer: The block read.
        delta: [n_positions, d] float32: the mean of h_ft[p] - h_base[p] over documents.
        counts: [n_positions]: documents that reach each position.
        typical_norm: The median residual norm of the fine-tuned model at the layer (the unit of scales).
        logit_lens: Per position {"top": [...], "bottom": [...]}: tokens {"token", "id", "score" (logit)} with the
            largest and smallest logits of the fine-tuned model's final norm and unembedding applied to delta_p.
        patchscope: Per position, the PatchscopeResult; None where delta_p is zero (the models agree there: no
            direction to write).
        steering: Per position, the SteeringResult, None where delta_p is zero (the whole list is None when no
            steering prompts were given).
        documents: Documents read.
        base: The base model (path, hub name or class name).
        chat: The fine-tuned model, likewise.
    """

    layer: int
    delta: torch.Tensor
    counts: torch.Tensor
    typical_norm: float
    logit_lens: list[dict[str, list[dict[str, Any]]]]
    patchscope: list[Optional[PatchscopeResult]]
    steering: Optional[list[Optional[SteeringResult]]]
    documents: int
    base: str = ""
    chat: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (delta as one list per position, with its norms).

        Returns:
            The dict.
        """
        return dict(
            layer=self.layer,
            n_positions=int(self.delta.shape[0]),
            documents=self.documents,
            base=self.base,
            chat=self.chat,
            typical_norm=self.typical_norm,
            counts=self.counts.tolist(),
            delta_norm=self.delta.norm(dim=-1).tolist(),
            delta=self.delta.tolist(),
            logit_lens=self.logit_lens,
            patchscope=[None if p is None else p.to_json() for p in self.patchscope],
            steering=None if self.steering is None else [None if s is None else s.to_json() for s in self.steering],
        )


def _check_settings(n_positions, batch_size, top_k, layer, scales, prompt, placeholder):
    """What can be refused before any weights load (the readouts check the rest again where they run)."""
    require_int("n_positions", n_positions, 1)
    require_int("batch_size", batch_size, 1)
    require_int("top_k", top_k, 1)
    if layer is not None:
        require_int("layer", layer, 0)
    if not scales or any(not isinstance(s, (int, float)) or not 0 < s < float("inf") for s in scales):
        raise InputError(f"patchscope_scales must be positive finite numbers, got {list(scales)}")
    if not placeholder or placeholder not in prompt:
        raise InputError(f"the identity prompt {prompt!r} does not hold the placeholder {placeholder!r}")


def _check_steering(prompts, factor, max_scale, steps, tokens):
    """The steering settings, refused before any weights load."""
    if prompts is None:
        return
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise InputError(f"steering_prompts must be a non-empty list of non-empty strings, got {prompts!r}"[:300])
    if not (isinstance(factor, (int, float)) and 1 < factor < float("inf")):
        raise InputError(f"steering_factor must be a number > 1, got {factor!r}")
    if not (isinstance(max_scale, (int, float)) and 0 < max_scale < float("inf")):
        raise InputError(f"steering_max_scale must be a positive number, got {max_scale!r}")
    require_int("steering_steps", steps, 0)
    require_int("steering_tokens", tokens, 1)


def adl(
    base: ModelSpec,
    chat: ModelSpec,
    data: Data,
    *,
    layer: Optional[int] = None,
    n_positions: int = 5,
    batch_size: int = 32,
    top_k: int = 20,
    patchscope_scales: Sequence[float] = PATCHSCOPE_SCALES,
    identity_prompt: str = IDENTITY_PROMPT,
    placeholder: str = PLACEHOLDER,
    control_word: str = CONTROL_WORD,
    steering_prompts: Optional[Sequence[str]] = None,
    steering_factor: float = 2.0,
    steering_max_scale: float = 8.0,
    steering_steps: int = 6,
    steering_tokens: int = 24,
    device: Device = None,
    model_dtype: Optional[Union[torch.dtype, str]] = None,
) -> ADLResult:
    """The Activation Difference Lens of a fine-tune (see the module docstring).

    Args:
        base: The base model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        chat: The fine-tuned model, likewise; its tokenizer reads the corpus, its head and prompts read delta.
        data: Generic documents: a JSONL / .txt file or directory, "hf:NAME[:SPLIT]", or an iterable of strings,
            message lists or {"text" | "messages"} records.
        layer: The block read (default: the middle one, n_layers // 2).
        n_positions: The first positions read per document.
        batch_size: Documents per forward.
        top_k: Tokens listed per readout.
        patchscope_scales: Patchscope's sweep, in multiples of the typical residual norm.
        identity_prompt: Patchscope's token-identity prompt.
        placeholder: The text in it whose position is written.
        control_word: The word that checks, per scale, that the prompt still parses.
        steering_prompts: Prompts to steer from (None: no steering).
        steering_factor: Coherent: steered mean NLL <= factor * unsteered mean NLL.
        steering_max_scale: The strongest steering tried, in multiples of the typical residual norm.
        steering_steps: Bisection steps of the steering search.
        steering_tokens: Tokens generated per steering prompt.
        device: Where the models run (default: loaded models on CUDA when available, given ones where they are).
        model_dtype: dtype to load the models in (None: the checkpoint's).

    Returns:
        The ADLResult.

    Raises:
        InputError: A setting out of range, an empty corpus, a layer outside the models, models whose tokenizers
            or widths differ (all before any weights load), no document as long as n_positions, or a placeholder
            that is not a token of the identity prompt.
    """
    _check_settings(n_positions, batch_size, top_k, layer, patchscope_scales, identity_prompt, placeholder)
    _check_steering(steering_prompts, steering_factor, steering_max_scale, steering_steps, steering_tokens)
    docs = read_corpus(data)
    pair = open_pair(base, chat, [] if layer is None else [layer], device=device, model_dtype=model_dtype)
    layer = n_layers(pair.chat) // 2 if layer is None else layer
    ids = token_ids(docs, pair.tokenizer, n_positions)
    measured = mean_difference(pair, layer, ids, n_positions, batch_size)
    logits = logit_lens(pair.chat, measured.delta)
    lens = [
        {"top": ranked_tokens(pair.tokenizer, row, top_k), "bottom": ranked_tokens(pair.tokenizer, row, top_k, False)}
        for row in logits
    ]
    # A zero difference (the models agree at that position, e.g. a fine-tune that changed nothing) has no
    # direction for Patchscope or steering to write: those readouts are None there, not an error.
    directed = [i for i, norm in enumerate(measured.delta.float().norm(dim=-1).tolist()) if norm > 0]
    read = (
        patchscope(
            pair.chat,
            pair.tokenizer,
            measured.delta[directed],
            layer,
            measured.typical_norm,
            scales=patchscope_scales,
            prompt=identity_prompt,
            placeholder=placeholder,
            control_word=control_word,
            top_k=top_k,
        )
        if directed
        else []
    )
    scopes: list[Optional[PatchscopeResult]] = [None] * len(measured.delta)
    for i, scope in zip(directed, read):
        scopes[i] = scope
    steering = None
    if steering_prompts is not None:
        steering = [
            steer_coherently(
                pair.chat,
                pair.tokenizer,
                vector,
                layer,
                steering_prompts,
                measured.typical_norm,
                factor=steering_factor,
                max_scale=steering_max_scale,
                steps=steering_steps,
                max_new_tokens=steering_tokens,
            )
            if i in directed
            else None
            for i, vector in enumerate(measured.delta)
        ]
    return ADLResult(
        layer=layer,
        delta=measured.delta,
        counts=measured.counts,
        typical_norm=measured.typical_norm,
        logit_lens=lens,
        patchscope=scopes,
        steering=steering,
        documents=len(ids),
        base=model_name(base),
        chat=model_name(chat),
    )
