"""Hugging Face model access: loading a checked base/chat pair (loading.py) and acting on a decoder's blocks
(blocks.py): running to block L, skipping through it, editing its output. Harvest, causal patching and steering
use these."""

from .blocks import (
    check_layer,
    decoder_blocks,
    edit_block_output,
    hidden_size,
    n_layers,
    run_to_layer,
    run_to_layers,
    skip_through_layer,
)
from .loading import ModelSpec, check_tokenizers, load_pair, model_name, place_model

__all__ = [
    "ModelSpec",
    "check_layer",
    "check_tokenizers",
    "decoder_blocks",
    "edit_block_output",
    "hidden_size",
    "load_pair",
    "model_name",
    "n_layers",
    "place_model",
    "run_to_layer",
    "run_to_layers",
    "skip_through_layer",
]
