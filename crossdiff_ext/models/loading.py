"""Load a base model and its fine-tuned version as a checked pair.

A model is a directory, a hub name or an already loaded (model, tokenizer) pair. The pair is checked before any
weights are read, from the configs and tokenizers alone: both must read the same token ids, have the same width,
and have every requested layer.
"""

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from ..errors import InputError, MissingInputError
from .blocks import check_layer, hidden_size

ModelSpec = Union[str, os.PathLike, tuple[Any, Any]]


def check_tokenizers(tokenizer_base: Any, tokenizer_chat: Any) -> None:
    """Both models must read the same token ids: the vocabularies must agree.

    Args:
        tokenizer_base: The base model's tokenizer.
        tokenizer_chat: The chat model's tokenizer.

    Raises:
        InputError: The vocabularies differ (the message lists a few differences).
    """
    vb, vc = tokenizer_base.get_vocab(), tokenizer_chat.get_vocab()
    if vb != vc:
        only_b, only_c = sorted(set(vb) - set(vc))[:5], sorted(set(vc) - set(vb))[:5]
        moved = [t for t in vb if t in vc and vb[t] != vc[t]][:5]
        raise InputError(
            f"the tokenizers disagree ({len(vb)} vs {len(vc)} tokens; only in base: {only_b}, only in "
            f"chat: {only_c}, different ids: {moved}); the same token ids cannot feed both models"
        )


def _config_and_tokenizer(spec, name):
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise InputError(f"a loaded model must be a (model, tokenizer) pair, got a tuple of {len(spec)}")
        return spec[0].config, spec[1]
    from transformers import AutoConfig, AutoTokenizer

    path = os.fspath(spec)
    if not os.path.exists(path) and path.startswith((".", "/", "~")):
        raise MissingInputError(f"{name} model directory {path!r} does not exist")
    try:
        return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # transformers' errors for a directory or name without a model in it
        raise InputError(f"{name} model {path!r} cannot be loaded: {err}") from err


def load_pair(
    base: ModelSpec,
    chat: ModelSpec,
    layers: Sequence[int],
    *,
    dtype: Optional[Union[torch.dtype, str]] = None,
    width: Optional[int] = None,
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Check, then load, a base model and its fine-tuned version.

    Args:
        base: The base model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        chat: The fine-tuned (chat) model, likewise.
        layers: The block indices that will be read (each must exist in both models).
        dtype: dtype to load the weights in (None: the checkpoint's); loaded pairs are left as they are.
        width: The width the models must have (e.g. a crosscoder's d_model); None: no such check.

    Returns:
        ((base_model, base_tokenizer), (chat_model, chat_tokenizer)).

    Raises:
        MissingInputError: A model directory does not exist.
        InputError: The tokenizers or widths differ (from each other or from `width`), or a layer is out of range
            (all checked before any weights are loaded).
    """
    (config_b, tok_b), (config_c, tok_c) = _config_and_tokenizer(base, "base"), _config_and_tokenizer(chat, "chat")
    check_tokenizers(tok_b, tok_c)
    if hidden_size(config_b) != hidden_size(config_c):
        raise InputError(f"the models' widths differ: {hidden_size(config_b)} (base) vs {hidden_size(config_c)} (chat)")
    if width is not None and hidden_size(config_b) != width:
        raise InputError(f"the crosscoder's d_model is {width}, the models' width is {hidden_size(config_b)}")
    for layer in layers:
        check_layer(config_b, layer, "the base model")
        check_layer(config_c, layer, "the chat model")

    return _load(base, tok_b, "base", dtype), _load(chat, tok_c, "chat", dtype)


def _load(spec, tokenizer, name, dtype):
    if isinstance(spec, tuple):
        return spec
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        return AutoModelForCausalLM.from_pretrained(os.fspath(spec), **kwargs), tokenizer
    except (OSError, ValueError) as err:
        raise InputError(f"{name} model {os.fspath(spec)!r} cannot be loaded: {err}") from err


def load_model(
    spec: ModelSpec,
    name: str = "the",
    *,
    width: Optional[int] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
    device: Any = None,
) -> tuple[Any, Any]:
    """Check, then load, one model: its config and tokenizer are read (and its width checked) before any weights.

    Args:
        spec: A directory, a hub name, or a loaded (model, tokenizer) pair.
        name: How errors name it ("{name} model ...", e.g. "fine-tuned").
        width: The width it must have (e.g. a crosscoder's d_model); None: no such check.
        dtype: dtype to load the weights in (None: the checkpoint's); a loaded model is left as it is.
        device: As place_model.

    Returns:
        (model in eval mode, tokenizer).

    Raises:
        MissingInputError: A model directory does not exist.
        InputError: It cannot be read, or its width differs from `width`.
    """
    config, tokenizer = _config_and_tokenizer(spec, name)
    if width is not None and hidden_size(config) != width:
        raise InputError(f"{name} model's width is {hidden_size(config)}, expected {width}")
    model, tokenizer = _load(spec, tokenizer, name, dtype)
    return place_model(spec, model, device), tokenizer


Devices = Union[None, torch.device, str, Sequence[Union[torch.device, str]]]


def model_devices(device: Devices) -> tuple[torch.device, torch.device]:
    """(base device, chat device) from one device for both, a pair (models that do not fit together), or None
    (CUDA when available, else the CPU).

    Args:
        device: None, a device, or a sequence of two devices (base, chat).

    Returns:
        The two devices.

    Raises:
        InputError: A sequence of another length, or a name torch does not know.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, (list, tuple)):
        if len(device) != 2:
            raise InputError(f"device must be one device or two (base, chat), got {len(device)}: {list(device)}")
        names = list(device)
    else:
        names = [device, device]
    try:
        return torch.device(names[0]), torch.device(names[1])
    except RuntimeError as err:
        raise InputError(f"device {device!r}: {err}") from None


def default_model_dtype(device: torch.device) -> torch.dtype:
    """The dtype models are loaded in when none is asked for: bfloat16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_name(spec: ModelSpec) -> str:
    """How a model spec is recorded: its path or hub name, or the class name of a loaded model."""
    return type(spec[0]).__name__ if isinstance(spec, tuple) else os.fspath(spec)


def place_model(spec: ModelSpec, model: Any, device: Any) -> Any:
    """A model of a loaded pair, in eval mode on its device: `device` when given; else a model loaded here from a
    path or hub name goes to CUDA when available, and a given (model, tokenizer) pair stays where it is."""
    if device is not None:
        model = model.to(device)
    elif not isinstance(spec, tuple):
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval()
