"""Steering with and ablating crosscoder latents in a transformers model, as context managers around forward or
model.generate.

steer adds scale * a_j * W_dec[j, m] (raw activation space: divided by the crosscoder's input scale) for each
chosen latent j to block L's output, a_j being the latent's maximum activation. ablate projects the latents'
decoder directions W_dec[j, m] out of block L's output. Both act through a hook on the block's output only.
"""

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch

from ..errors import InputError
from ..layer import CrossCoder
from ..models.blocks import edit_block_output, hidden_size
from .latent_scaling import LatentScalingResult

MODES = ("all_tokens", "prompt")

MaxActivation = Union[float, Sequence[float], torch.Tensor, LatentScalingResult, dict]


def _latent_ids(latents, crosscoder):
    ids = torch.as_tensor(latents).flatten()
    if ids.numel() == 0:
        raise InputError("latents is empty")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"latents must be integer latent ids, got {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= crosscoder.dict_size)]
    if bad.numel():
        raise InputError(f"latents has ids outside [0, {crosscoder.dict_size}): {bad[:5].tolist()}")
    return ids.long()


def _check(model, crosscoder, model_index):
    if not isinstance(crosscoder, CrossCoder):
        raise InputError(f"crosscoder must be a crossdiff_ext.CrossCoder, got {type(crosscoder).__name__}")
    if not isinstance(model_index, int) or not 0 <= model_index < crosscoder.n_models:
        raise InputError(f"model_index must be in [0, {crosscoder.n_models}), got {model_index!r}")
    if hidden_size(model) != crosscoder.d_model:
        raise InputError(f"the model's width is {hidden_size(model)}, the crosscoder's d_model {crosscoder.d_model}")


def _raw_rows(crosscoder, ids, model_index):
    rows = crosscoder.W_dec.detach()[ids.to(crosscoder.W_dec.device), model_index].float()
    if crosscoder.target_rms is not None:
        rows = rows / crosscoder.input_scale[model_index].float()
    return rows


def max_activations(source: MaxActivation, latents: torch.Tensor) -> torch.Tensor:
    """The maximum activation of each latent from what records it.

    Args:
        source: A number (every latent), a sequence or tensor with one value per latent in `latents`, a
            LatentScalingResult (its activation_max), or a latent table (diffing.latent_table, its
            "max_activation" column).
        latents: The latent ids.

    Returns:
        [len(latents)] float32.

    Raises:
        InputError: The source does not record every latent, or has the wrong length.
    """
    if isinstance(source, LatentScalingResult):
        if source.activation_max is None:
            raise InputError("the LatentScalingResult records no activation_max")
        where = {int(j): i for i, j in enumerate(source.latents.tolist())}
        missing = [int(j) for j in latents if int(j) not in where]
        if missing:
            raise InputError(f"the LatentScalingResult did not score latents {missing[:5]}")
        values = source.activation_max[[where[int(j)] for j in latents]]
    elif isinstance(source, dict):
        if "max_activation" not in source:
            raise InputError("the latent table has no 'max_activation' column (run it with a LatentScalingResult)")
        column = source["max_activation"]
        values = torch.tensor([float(column[int(j)]) for j in latents])
    elif isinstance(source, (int, float)):
        values = torch.full((len(latents),), float(source))
    else:
        values = torch.as_tensor(source, dtype=torch.float32).flatten()
        if values.numel() != len(latents):
            raise InputError(f"max_activation has {values.numel()} values for {len(latents)} latents")
    values = values.float()
    if not bool(torch.isfinite(values).all()):
        raise InputError("max_activation holds non-finite values (a latent that never fired?)")
    return values


@contextlib.contextmanager
def steer(
    model: Any,
    crosscoder: CrossCoder,
    latents: Union[torch.Tensor, Sequence[int]],
    *,
    layer: int,
    scale: float = 1.0,
    model_index: int = 1,
    mode: str = "all_tokens",
    max_activation: Optional[MaxActivation] = None,
) -> Iterator[torch.Tensor]:
    """Within the block, `model` has scale * a_j * W_dec[j, model_index] (raw space) added to block `layer`'s
    output for every latent j in `latents`.

    mode="all_tokens" steers every position of every forward; mode="prompt" only the prompt: the first forward
    after entering (the prefill of model.generate) at all its positions, and in a later forward that re-reads the
    sequence without a cache, its first prompt-length positions; single-token forwards (cached decoding) are left
    alone.

    Args:
        model: A transformers decoder.
        crosscoder: The crosscoder whose decoder rows steer.
        latents: The latent ids.
        layer: The block whose output is steered (the crosscoder's layer).
        scale: Multiplier of each latent's maximum activation.
        model_index: The decoder whose rows are added (default 1, the chat model).
        mode: "all_tokens" or "prompt".
        max_activation: a_j: a number (every latent), one value per latent, or a LatentScalingResult or latent
            table that records it (see max_activations). Required: the default None is refused.

    Yields:
        The [d] raw-space vector added.

    Raises:
        InputError: Bad arguments, or no max_activation (checked on entry, before any forward).
    """
    _check(model, crosscoder, model_index)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    ids = _latent_ids(latents, crosscoder)
    if max_activation is None:
        raise InputError(
            "max_activation is required: a number, one value per latent, or a LatentScalingResult / latent table "
            "that records the latents' maximum activations"
        )
    amount = max_activations(max_activation, ids)
    rows = _raw_rows(crosscoder, ids, model_index)
    vector = (float(scale) * amount.to(rows.device)[:, None] * rows).sum(0)
    state = {"prompt": None}

    def add(hidden):
        v = vector.to(hidden.device, torch.float32)
        if mode == "all_tokens":
            return (hidden.float() + v).to(hidden.dtype)
        if state["prompt"] is None:
            state["prompt"] = hidden.shape[1]
        if hidden.shape[1] == 1 and state["prompt"] != 1:
            return hidden
        out = hidden.float()
        out[:, : state["prompt"]] += v
        return out.to(hidden.dtype)

    with edit_block_output(model, layer, add):
        yield vector


@contextlib.contextmanager
def ablate(
    model: Any,
    crosscoder: CrossCoder,
    latents: Union[torch.Tensor, Sequence[int]],
    *,
    layer: int,
    model_index: int = 1,
) -> Iterator[torch.Tensor]:
    """Within the block, the decoder directions W_dec[j, model_index] of `latents` are projected out of block
    `layer`'s output at every position (h <- h - Q Q^T h, Q an orthonormal basis of the directions).

    Args:
        model: A transformers decoder.
        crosscoder: The crosscoder whose decoder rows are ablated.
        latents: The latent ids.
        layer: The block (the crosscoder's layer).
        model_index: The decoder whose rows are used (default 1, the chat model).

    Yields:
        Q, the [d, r] orthonormal basis projected out.

    Raises:
        InputError: Bad arguments, or all chosen rows are zero.
    """
    _check(model, crosscoder, model_index)
    ids = _latent_ids(latents, crosscoder)
    rows = _raw_rows(crosscoder, ids, model_index).double()
    u, sv, _ = torch.linalg.svd(rows.T, full_matrices=False)
    rank = int((sv > sv.max() * 1e-6).sum()) if sv.numel() and float(sv.max()) > 0 else 0
    if rank == 0:
        raise InputError("the chosen latents' decoder rows are all zero: nothing to ablate")
    basis = u[:, :rank].float()

    def project(hidden):
        q = basis.to(hidden.device)
        h = hidden.float()
        return (h - (h @ q) @ q.T).to(hidden.dtype)

    with edit_block_output(model, layer, project):
        yield basis
