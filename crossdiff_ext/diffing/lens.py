"""Reading a residual-stream vector through a model: the logit lens (the model's own final norm and unembedding)
and Patchscope (the vector written into a token-identity prompt, the model asked what it names).

Patchscope. The identity prompt (default "cat -> cat\\n1135 -> 1135\\nhello -> hello\\n? ->") teaches the model
to repeat a token; its placeholder "?" is where the vector goes: block `layer`'s output at the placeholder's
position is replaced by scale * typical_norm * v / ||v||, and the next-token distribution at the prompt's last
position is read, for every scale of a sweep. The scale is chosen by a deterministic rule:
  1. A control checks, at each scale, that the prompt still works at that norm: the model's own representation of
     a control word (its block-`layer` output at the placeholder of the prompt with the word in its place),
     rescaled to the same norm and written the same way, must come back as the top next token (its text, stripped,
     begins the control word). A scale where it does "parses".
  2. Among the scales that parse, the one whose next-token distribution for v has the lowest entropy (the model
     is surest what v names); ties go to the smaller scale. No scale parses: no scale is chosen (chosen_scale is
     None, chosen_tokens empty); the per-scale tokens are still reported.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import InputError
from ..models.blocks import edit_block_output, n_layers, run_to_layer
from .token_batches import device_of, ranked_tokens, token_text

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n? ->"
PLACEHOLDER = "?"
CONTROL_WORD = "dog"
PATCHSCOPE_SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def logit_lens(model: Any, vectors: torch.Tensor) -> torch.Tensor:
    """The model's final norm and unembedding applied to residual-stream vectors.

    The vectors are written as the last block's output of a forward, so whatever the architecture does after its
    blocks (final norm, unembedding, logit soft-capping) is what they go through.

    Args:
        model: A transformers decoder.
        vectors: [n, d] residual-stream vectors.

    Returns:
        [n, V] float32 logits.

    Raises:
        InputError: vectors is not [n, d] with the model's width.
    """
    width = model.get_input_embeddings().weight.shape[1]
    if vectors.dim() != 2 or vectors.shape[1] != width or vectors.shape[0] == 0:
        raise InputError(f"vectors must be [n >= 1, d = {width}], got {list(vectors.shape)}")
    device = device_of(model)
    written = vectors.to(device)[None]
    ids = torch.zeros(
        1, vectors.shape[0], dtype=torch.long, device=device
    )  # read by nothing: the last block's output is replaced
    with torch.no_grad(), edit_block_output(model, n_layers(model) - 1, lambda h: written.to(h.dtype)):
        return model(input_ids=ids, use_cache=False).logits[0].float()


def placeholder_position(tokenizer: Any, prompt: str, placeholder: str) -> tuple[list[int], int]:
    """The prompt's token ids and the position of the placeholder's last token (its last occurrence).

    Args:
        tokenizer: A transformers tokenizer.
        prompt: The prompt.
        placeholder: Text in the prompt.

    Returns:
        (ids, position).

    Raises:
        InputError: The placeholder is not in the prompt, or the tokenizer merges it with the text after it.
    """
    at = prompt.rfind(placeholder) if placeholder else -1
    if at < 0:
        raise InputError(f"the identity prompt {prompt!r} does not hold the placeholder {placeholder!r}")
    ids = list(tokenizer(prompt)["input_ids"])
    head = list(tokenizer(prompt[: at + len(placeholder)])["input_ids"])
    if not head or ids[: len(head)] != head:
        raise InputError(
            f"the placeholder {placeholder!r} is not a token boundary of the identity prompt {prompt!r}: the tokenizer "
            "merges it with the text after it"
        )
    return ids, len(head) - 1


@dataclass
class PatchscopeResult:
    """What patchscope returns (see the module docstring for the rule that chooses the scale).

    Attributes:
        scales: The sweep: multiples of typical_norm.
        tokens: Per scale, the top next tokens [{"token", "id", "score" (probability)}].
        entropy: Per scale, the next-token entropy (nats) for the vector.
        parses: Per scale, whether the control word came back.
        chosen_scale: The chosen scale, or None when no scale parses.
        chosen_tokens: The tokens at the chosen scale (empty when none is chosen).
        position: The placeholder's position in the prompt's token ids.
        typical_norm: The norm a scale of 1 writes.
    """

    scales: list[float]
    tokens: list[list[dict[str, Any]]]
    entropy: list[float]
    parses: list[bool]
    chosen_scale: Optional[float]
    chosen_tokens: list[dict[str, Any]]
    position: int
    typical_norm: float

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict.

        Returns:
            The dict.
        """
        return dict(vars(self))


def choose_scale(scales: Sequence[float], entropy: Sequence[float], parses: Sequence[bool]) -> Optional[int]:
    """The index of the chosen scale: the lowest entropy among the scales that parse (ties: the smaller scale).

    Args:
        scales: The sweep.
        entropy: The entropy at each scale.
        parses: Whether the control came back at each scale.

    Returns:
        The index, or None when no scale parses.
    """
    candidates = [i for i in range(len(scales)) if parses[i] and math.isfinite(entropy[i])]
    return min(candidates, key=lambda i: (entropy[i], scales[i])) if candidates else None


def _unit(vector, what):
    norm = vector.float().norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise InputError(f"{what} is zero (or not finite): it has no direction to write")
    return vector.float() / norm


@torch.no_grad()
def _placeholder_residual(model, tokenizer, layer, prompt, placeholder, word):
    """The model's own block-`layer` output at the word's last token, with the word in the placeholder's place."""
    at = prompt.rfind(placeholder)
    filled = prompt[:at] + word + prompt[at + len(placeholder) :]
    ids, position = placeholder_position(tokenizer, filled, word)
    h = run_to_layer(model, layer, input_ids=torch.tensor([ids], device=device_of(model)))
    return h[0, position].float()


def _control_parses(scores, tokenizer, word):
    text = token_text(tokenizer, int(scores.argmax())).strip()
    return bool(text) and word.strip().startswith(text)


@torch.no_grad()
def patchscope(
    model: Any,
    tokenizer: Any,
    vectors: torch.Tensor,
    layer: int,
    typical_norm: float,
    *,
    scales: Sequence[float] = PATCHSCOPE_SCALES,
    prompt: str = IDENTITY_PROMPT,
    placeholder: str = PLACEHOLDER,
    control_word: str = CONTROL_WORD,
    top_k: int = 20,
) -> list[PatchscopeResult]:
    """Write each vector, at each scale of a sweep, into the identity prompt and read what the model names.

    Args:
        model: The model that reads (the fine-tuned one, for ADL).
        tokenizer: Its tokenizer.
        vectors: [n, d] residual-stream vectors (or one [d] vector).
        layer: The block whose output is written.
        typical_norm: The norm a scale of 1 writes (e.g. the median residual norm at that layer).
        scales: Positive multiples of typical_norm.
        prompt: The identity prompt; the next token after it is read.
        placeholder: The text in the prompt whose (last) token position is written.
        control_word: The word whose own representation checks that the prompt parses at each scale.
        top_k: Tokens listed per scale.

    Returns:
        One PatchscopeResult per vector.

    Raises:
        InputError: An empty or non-positive sweep, a non-positive typical_norm, a zero vector, a placeholder
            that is not a token of the prompt, or a layer outside the model.
    """
    if not scales or any(not (isinstance(s, (int, float)) and s > 0 and math.isfinite(s)) for s in scales):
        raise InputError(f"scales must be positive finite numbers, got {list(scales)}")
    if not (typical_norm > 0 and math.isfinite(typical_norm)):
        raise InputError(f"typical_norm must be a positive number, got {typical_norm!r}")
    vectors = vectors.reshape(-1, vectors.shape[-1]).cpu()
    ids, position = placeholder_position(tokenizer, prompt, placeholder)
    control = _placeholder_residual(model, tokenizer, layer, prompt, placeholder, control_word).cpu()
    sizes = torch.tensor([float(s) * typical_norm for s in scales])[:, None]
    units = [_unit(v, f"vector {i}") for i, v in enumerate(vectors)] + [_unit(control, "the control")]
    written = torch.cat([sizes * u for u in units]).to(device_of(model))  # [(n + 1) * S, d], the control last
    batch = torch.tensor([ids], device=device_of(model)).expand(written.shape[0], -1)

    def write(hidden):
        out = hidden.clone()
        out[:, position] = written.to(out.dtype)
        return out

    with edit_block_output(model, layer, write):
        logits = model(input_ids=batch, use_cache=False).logits[:, -1].float()
    logp = torch.log_softmax(logits, -1).view(len(units), len(scales), -1)
    parses = [_control_parses(row, tokenizer, control_word) for row in logp[-1]]
    return [_read_sweep(tokenizer, rows, list(scales), parses, position, typical_norm, top_k) for rows in logp[:-1]]


def _read_sweep(tokenizer, logp, scales, parses, position, typical_norm, top_k):
    """One vector's PatchscopeResult from its next-token log-probabilities at each scale [S, V]."""
    probs = logp.exp()
    entropy = [float(e) for e in -(probs * logp).sum(-1)]
    tokens = [ranked_tokens(tokenizer, p, top_k) for p in probs]
    chosen = choose_scale(scales, entropy, parses)
    return PatchscopeResult(
        scales=[float(s) for s in scales],
        tokens=tokens,
        entropy=entropy,
        parses=list(parses),
        chosen_scale=None if chosen is None else float(scales[chosen]),
        chosen_tokens=[] if chosen is None else tokens[chosen],
        position=position,
        typical_norm=float(typical_norm),
    )
