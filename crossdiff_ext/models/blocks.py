"""The residual stream after block L of any transformers decoder: find the blocks, stop the forward after block L,
and replace block L's output.

Everything here acts on block outputs only, through forward hooks on the model's own forward, so attention masks,
position ids, rotary embeddings and caches stay whatever the architecture makes them. A block returns its hidden
states either as a tensor or as the first entry of a tuple (it depends on the architecture and the transformers
version); both are handled.

hidden_states[L + 1] of a full forward with output_hidden_states=True is block L's output for every block but the
last, where transformers applies the final norm; use L < n_layers - 1 for the raw residual stream.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError

# Where the common decoder families keep their blocks (Llama, Mistral, Qwen2, Gemma 2: model.layers; GPT-2,
# GPT-J, Bloom: transformer.h; GPT-NeoX: gpt_neox.layers; OPT: model.decoder.layers). Anything else is found by
# the search in decoder_blocks.
_KNOWN_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")


def n_layers(model: nn.Module) -> int:
    """The number of decoder blocks, from the model's config.

    Args:
        model: A transformers model (its config has num_hidden_layers, or n_layer).

    Returns:
        The number of blocks.

    Raises:
        InputError: The config names no layer count.
    """
    return _config_int(model.config, ("num_hidden_layers", "n_layer", "num_layers"), "number of layers")


def hidden_size(model_or_config: Any) -> int:
    """The residual-stream width d, from a model's or config's hidden_size (or n_embd / d_model).

    Args:
        model_or_config: A transformers model or its config.

    Returns:
        d.

    Raises:
        InputError: The config names no width.
    """
    config = getattr(model_or_config, "config", model_or_config)
    return _config_int(config, ("hidden_size", "n_embd", "d_model"), "hidden size")


def _config_int(config, names, what):
    for source in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int):
                return value
    raise InputError(f"the model's config ({type(config).__name__}) gives no {what} (looked for {', '.join(names)})")


def check_layer(config_or_model: Any, layer: int, name: str = "the model") -> None:
    """Check that `layer` is a block index of the model.

    Args:
        config_or_model: A transformers model or its config (a config is enough: no weights needed).
        layer: The block index.
        name: How the model is called in the message (e.g. "the base model").

    Raises:
        InputError: layer is not an int in [0, n_layers).
    """
    config = getattr(config_or_model, "config", config_or_model)
    count = _config_int(config, ("num_hidden_layers", "n_layer", "num_layers"), "number of layers")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < count:
        raise InputError(f"layer must be an int in [0, {count}) for {name} ({count} blocks), got {layer!r}")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, in order.

    Looks at the paths the common families use, then for the one nn.ModuleList with as many entries as the
    config has layers (the outermost, if several nest).

    Args:
        model: A transformers causal LM (or its base model).

    Returns:
        The nn.ModuleList of its blocks.

    Raises:
        InputError: No such list, or more than one candidate.
    """
    count = n_layers(model)
    for path in _KNOWN_PATHS:
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList) and len(found) == count:
            return found
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    outer = [(n, m) for n, m in candidates if not any(n != o and n.startswith(o + ".") for o, _ in candidates)]
    if len(outer) != 1:
        names = [n for n, _ in outer] or "none"
        raise InputError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected one nn.ModuleList of "
            f"{count} blocks, found {names}"
        )
    return outer[0][1]


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden states [B, T, d] in a block's output (a tensor, or the first entry of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def output_format(output: Any) -> Any:
    """What skip_through_layer needs of a block's output to imitate it: its entries besides the hidden states."""
    return tuple(output[1:]) if isinstance(output, tuple) else None


@contextlib.contextmanager
def skip_through_layer(model: nn.Module, layer: int, hidden: torch.Tensor, formats: Sequence[Any]) -> Iterator[None]:
    """Within the block, blocks 0..layer do not compute: each returns `hidden` in its own output format, so block
    `layer`'s output is `hidden` and the blocks after it run as usual.

    The model's own forward still runs around them (embeddings, masks, position ids, rotary embeddings), which
    keeps this architecture-generic: a decoder passes each block's output to the next and reads nothing else of
    it. The result equals edit_block_output(model, layer, lambda _: hidden) without the cost of blocks 0..layer.

    Args:
        model: A transformers decoder.
        layer: The last block skipped, in [0, n_layers).
        hidden: [B, T, d] the output block `layer` is to have.
        formats: output_format of each block 0..layer's output in a real forward of the same kind (same
            use_cache / output_attentions settings).

    Raises:
        InputError: layer out of range, or formats not one per skipped block.
    """
    check_layer(model, layer)
    if len(formats) != layer + 1:
        raise InputError(f"formats must describe blocks 0..{layer} ({layer + 1} entries), got {len(formats)}")
    blocks = decoder_blocks(model)
    own = [blocks[i].__dict__.get("forward") for i in range(layer + 1)]  # e.g. a wrapper set by accelerate
    try:
        for i in range(layer + 1):
            rest = formats[i]
            blocks[i].forward = lambda *a, _rest=rest, **k: hidden if _rest is None else (hidden,) + _rest
        yield
    finally:
        for i in range(layer + 1):
            if own[i] is None:
                blocks[i].__dict__.pop("forward", None)
            else:
                blocks[i].forward = own[i]


class _StopForward(Exception):
    """Raised by the hook on block L to end the forward there."""


@torch.no_grad()
def run_to_layers(model: nn.Module, layers: Sequence[int], **inputs: Any) -> dict[int, torch.Tensor]:
    """Run the model's forward only up to the deepest of `layers` and return each of those blocks' outputs.

    No later block, final norm or LM head runs: a hook on the deepest block raises once it has the output, and
    the forward is abandoned there (with use_cache=False, so no cache is left half-filled).

    Args:
        model: A transformers decoder.
        layers: Block indices, each in [0, n_layers).
        **inputs: The model's forward arguments (input_ids, attention_mask, ...).

    Returns:
        {layer: that block's hidden states [B, T, d]} (hidden_states[layer + 1] of a full forward, except for
        the last block, where transformers applies the final norm to that entry).

    Raises:
        InputError: A layer out of range, or no layers.
    """
    if not layers:
        raise InputError("layers must name at least one block")
    for layer in layers:
        check_layer(model, layer)
    blocks, last, captured = decoder_blocks(model), max(layers), {}

    def keep(layer):
        def hook(module, args, output):
            captured[layer] = block_hidden(output)
            if layer == last:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in sorted(set(layers))]
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if last not in captured:
        raise RuntimeError(f"the forward of {type(model).__name__} finished without running block {last}")
    return {layer: captured[layer] for layer in layers}


def run_to_layer(model: nn.Module, layer: int, **inputs: Any) -> torch.Tensor:
    """Run the model's forward only up to block `layer` and return that block's output (run_to_layers with one
    layer).

    Args:
        model: A transformers decoder.
        layer: The block index, in [0, n_layers).
        **inputs: The model's forward arguments (input_ids, attention_mask, ...).

    Returns:
        Block `layer`'s hidden states [B, T, d].

    Raises:
        InputError: layer out of range.
    """
    return run_to_layers(model, [layer], **inputs)[layer]


@contextlib.contextmanager
def edit_block_output(model: nn.Module, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every output of block `layer` is replaced by edit(hidden) ([B, T, d] -> [B, T, d]).

    The hook is removed on exit, also on errors. Works for plain forwards and for model.generate (the edit sees
    each forward's new positions only when a cache is used).

    Args:
        model: A transformers decoder.
        layer: The block index, in [0, n_layers).
        edit: A function of the block's hidden states returning new ones of the same shape.

    Raises:
        InputError: layer out of range.
    """
    check_layer(model, layer)

    def hook(module, args, output):
        hidden = block_hidden(output)
        new = edit(hidden)
        if not isinstance(new, torch.Tensor) or new.shape != hidden.shape:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise InputError(
                f"the edit of block {layer}'s output must keep its shape {tuple(hidden.shape)}, got {shape}"
            )
        return _with_hidden(output, new.to(hidden.dtype))

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
