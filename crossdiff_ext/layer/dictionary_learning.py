"""The paper's checkpoints (the dictionary_learning library, science-of-finetuning fork) as CrossCoders and back.

They hold encoder.weight [M, d, F] and decoder.weight [M, F, d], as a torch .pt state dict, a training run's
output (ae.pt + config.json) or a Hugging Face Hub repo (model.safetensors + config.json, often trainer_config.json),
local or by repo id; layer/paper_format.py reads them.
"""

import math
import os
from collections.abc import Mapping
from typing import Optional, Union

import torch

from . import hub, paper_format
from .crosscoder import CrossCoder


def load_dictionary_learning(
    path_or_state_dict: Union[Mapping[str, torch.Tensor], Union[os.PathLike, str]],
    *,
    dtype: Optional[Union[torch.dtype, str]] = None,
    device: Optional[Union[torch.device, str]] = None,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    cache_dir: Optional[Union[os.PathLike, str]] = None,
    token: Optional[Union[str, bool]] = None,
) -> CrossCoder:
    """Load the paper's crosscoder checkpoint (dictionary_learning library) as a CrossCoder.

    A `k` buffer (or a config's k) means a BatchTopKCrossCoder (activation "batch_topk", its threshold is kept),
    none the L1 CrossCoder ("relu"). Only the CROSSCODER code normalisation is supported, and input normalisation
    only as the per-model global scale (keep_relative_variance=True, loaded as target_rms): anything else raises
    rather than loading a model that would select different latents. Torch files load with weights_only=True: a
    pickle that names anything but tensors and plain values is refused, never run.

    Args:
        path_or_state_dict: A state dict; a Hub repo id (e.g. science-of-finetuning/gemma-2-2b-L13-k100-lr1e-04-
            local-shuffling-CCLoss) or its download (model.safetensors or pytorch_model.bin, config.json,
            trainer_config.json); a training run's directory (ae.pt + config.json); a .safetensors file; or a torch
            file (.pt/.pth/.bin). Configs found beside the weights are cross-checked against the tensors.
        dtype: Parameter dtype (a torch dtype or its name); defaults to the checkpoint's.
        device: Where to put the parameters (default CPU).
        revision: For a repo id: the branch, tag or commit (default main).
        subfolder: A folder inside the directory or repo that holds the checkpoint.
        cache_dir: For a repo id: the Hub cache (default huggingface_hub's; HF_HUB_OFFLINE=1 reads only it).
        token: For a repo id: a Hub token (default huggingface_hub's, e.g. HF_TOKEN).

    Returns:
        The CrossCoder, in eval mode.

    Raises:
        MissingInputError: The path does not exist, or a directory lacks the library's weight files.
        InputError: The repo or revision is not on the Hub (or not cached offline); the file is not a readable
            safetensors or torch.save file, or its pickle is refused; or the checkpoint is not a dictionary_learning
            CrossCoder we can load faithfully: unknown or missing keys, inconsistent shapes, fewer than 2 models,
            an unsupported code or input normalisation, a dict_class that is not a crosscoder, a config that
            disagrees with the tensors, an unsupported dtype, or one of our own checkpoints (load those with
            CrossCoder.from_pretrained).
    """
    if not isinstance(path_or_state_dict, Mapping):
        path_or_state_dict = hub.resolve(
            path_or_state_dict, revision=revision, subfolder=subfolder, cache_dir=cache_dir, token=token
        )
    return paper_format.load_as(CrossCoder, path_or_state_dict, dtype=dtype, device=device)


def to_dictionary_learning(model: CrossCoder, *, normalizer_buffers: bool = False) -> dict[str, torch.Tensor]:
    """The CrossCoder as a dictionary_learning state dict.

    torch.save it for their CrossCoder / BatchTopKCrossCoder.from_pretrained. A crosscoder with target_rms exports
    its normaliser as the library's buffers.

    Args:
        model: The crosscoder to export.
        normalizer_buffers: Without target_rms, still write the (unused, NaN-filled) normaliser buffers that newer
            versions of the library expect: pass True for those.

    Returns:
        {name: tensor} in the library's layout (encoder.weight [M, d, F], decoder.weight [M, F, d], ...): fresh
        contiguous copies on the model's device, never views of its parameters.
    """

    def own(t):  # a contiguous copy, never a view of the module's storage
        return t.detach().clone(memory_format=torch.contiguous_format)

    dev = model.W_enc.device
    state = {
        "encoder.weight": own(model.W_enc.permute(1, 2, 0)),
        "encoder.bias": own(model.b_enc),
        "decoder.weight": own(model.W_dec.permute(1, 0, 2)),
        "decoder.bias": own(model.b_dec),
        "code_normalization_id": torch.tensor(1, dtype=torch.int64, device=dev),
    }
    if model.activation == "batch_topk":
        state["k"] = torch.tensor(model.k, dtype=torch.int32, device=dev)
        state["threshold"] = own(model.threshold).float()
    if model.target_rms is not None:
        state.update(
            target_rms=torch.tensor(model.target_rms, device=dev),
            activation_mean=own(model.input_mean),
            activation_std=own(model.input_std),
            activation_global_scale=own(model.input_scale),
        )
    elif normalizer_buffers:
        M, d = model.n_models, model.d_model
        state.update(
            target_rms=torch.tensor(1.0, device=dev),
            activation_mean=torch.full((M, d), math.nan, device=dev),
            activation_std=torch.full((M, d), math.nan, device=dev),
            activation_global_scale=torch.ones(M, device=dev),
        )
    return state
