"""Steering a model with a residual-stream direction, as strongly as its text stays coherent.

The model generates greedily from each prompt with alpha * v / ||v|| added to block `layer`'s output at every
position (prompt and generated tokens). alpha is scale * typical_norm. Coherence needs no judge: a steered text is
coherent when its mean negative log-likelihood under the unsteered model (mean over the prompts of each
continuation's mean NLL per token, given its prompt) is at most `factor` times that of the unsteered model's own
greedy continuations. The search: scale max_scale is tried first; when incoherent, `steps` bisections of
[0, max_scale] keep the largest coherent scale found (coherence is taken to fall as alpha grows; every probe is
recorded). Every continuation has exactly max_new_tokens tokens (end-of-sequence is not allowed to end it early),
so the NLLs compare texts of one length.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, require_int
from ..models.blocks import edit_block_output
from .token_batches import device_of, pad_id


@dataclass
class SteeringResult:
    """What steer_coherently returns.

    Attributes:
        scale: The largest coherent scale found (a multiple of typical_norm; 0.0 when none above 0 is coherent).
        alpha: scale * typical_norm: the norm added.
        nll_ratio: The steered texts' mean NLL over the unsteered texts' at that scale.
        texts: The steered continuations at that scale, one per prompt.
        unsteered_texts: The unsteered continuations.
        unsteered_nll: Their mean NLL per token under the unsteered model.
        probes: Every scale tried, in order: [{"scale", "nll", "ratio", "coherent"}].
        factor: The coherence bound on nll_ratio.
        typical_norm: The norm a scale of 1 adds.
    """

    scale: float
    alpha: float
    nll_ratio: float
    texts: list[str]
    unsteered_texts: list[str]
    unsteered_nll: float
    probes: list[dict[str, Any]]
    factor: float
    typical_norm: float

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict.

        Returns:
            The dict.
        """
        return dict(vars(self))


def _prompt_ids(tokenizer, prompts, device):
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise InputError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}"[:300])
    return [torch.tensor([tokenizer(p)["input_ids"]], device=device) for p in prompts]


@torch.no_grad()
def _generate(model, tokenizer, prompts, layer, added, max_new_tokens):
    """Greedy continuations [max_new_tokens] of each prompt, with `added` on block `layer`'s output (None: plain)."""
    options = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id(tokenizer),
    )
    out = []
    for ids in prompts:
        if added is None:
            full = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        else:
            with edit_block_output(model, layer, lambda h: (h.float() + added.to(h.device)).to(h.dtype)):
                full = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        out.append(full[0, ids.shape[1] :])
    return out


@torch.no_grad()
def continuation_nll(model: Any, prompt_ids: torch.Tensor, continuation: torch.Tensor) -> float:
    """The mean negative log-likelihood per token of a continuation given its prompt, under the model as it is.

    Args:
        model: A transformers decoder.
        prompt_ids: [1, P] the prompt's ids.
        continuation: [C] the continuation's ids (C >= 1).

    Returns:
        The mean NLL in nats.
    """
    ids = torch.cat([prompt_ids[0], continuation.to(prompt_ids.device)])[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, continuation.to(logits.device)))


def _mean_nll(model, prompts, continuations):
    return sum(continuation_nll(model, p, c) for p, c in zip(prompts, continuations)) / len(prompts)


def steer_coherently(
    model: Any,
    tokenizer: Any,
    vector: torch.Tensor,
    layer: int,
    prompts: Sequence[str],
    typical_norm: float,
    *,
    factor: float = 2.0,
    max_scale: float = 8.0,
    steps: int = 6,
    max_new_tokens: int = 24,
) -> SteeringResult:
    """Find the strongest coherent steering along a direction (see the module docstring) and its texts.

    Args:
        model: The model steered (the fine-tuned one, for ADL); its unsteered self judges coherence.
        tokenizer: Its tokenizer.
        vector: [d] the direction (only its direction counts).
        layer: The block whose output is steered.
        prompts: The prompts generated from.
        typical_norm: The norm a scale of 1 adds (e.g. the median residual norm at that layer).
        factor: Coherent: steered mean NLL <= factor * unsteered mean NLL (> 1).
        max_scale: The largest scale tried.
        steps: Bisection steps below max_scale.
        max_new_tokens: Tokens generated per prompt.

    Returns:
        The SteeringResult.

    Raises:
        InputError: Bad settings, no prompts, or a zero vector.
    """
    if not (factor > 1 and math.isfinite(factor)):
        raise InputError(f"factor must be a number > 1, got {factor!r}")
    if not (max_scale > 0 and math.isfinite(max_scale)) or not (typical_norm > 0 and math.isfinite(typical_norm)):
        raise InputError(f"max_scale and typical_norm must be positive numbers, got {max_scale!r}, {typical_norm!r}")
    require_int("steps", steps, 0)
    require_int("max_new_tokens", max_new_tokens, 1)
    norm = float(vector.float().norm())
    if not (norm > 0 and math.isfinite(norm)):
        raise InputError("the steering vector is zero (or not finite): it has no direction")
    direction = (vector.float() / norm).to(device_of(model))
    ids = _prompt_ids(tokenizer, list(prompts), device_of(model))
    plain = _generate(model, tokenizer, ids, layer, None, max_new_tokens)
    baseline = _mean_nll(model, ids, plain)
    probes, kept = [], {}

    def probe(scale):
        texts = _generate(model, tokenizer, ids, layer, scale * typical_norm * direction, max_new_tokens)
        nll = _mean_nll(model, ids, texts)
        ratio = nll / baseline if baseline > 0 else math.inf
        probes.append({"scale": scale, "nll": nll, "ratio": ratio, "coherent": ratio <= factor})
        kept[scale] = (ratio, texts)
        return ratio <= factor

    low, high = 0.0, float(max_scale)
    kept[0.0] = (1.0, plain)
    if probe(high):
        low = high
    else:
        for _ in range(steps):
            middle = (low + high) / 2
            if probe(middle):
                low = middle
            else:
                high = middle
    ratio, texts = kept[low]
    return SteeringResult(
        scale=low,
        alpha=low * typical_norm,
        nll_ratio=ratio,
        texts=[tokenizer.decode(t) for t in texts],
        unsteered_texts=[tokenizer.decode(t) for t in plain],
        unsteered_nll=baseline,
        probes=probes,
        factor=float(factor),
        typical_norm=float(typical_norm),
    )
