"""The paper's checkpoints (the dictionary_learning library, science-of-finetuning fork) as CrossCoders and back.

They hold encoder.weight [M, d, F] and decoder.weight [M, F, d], as a torch .pt state dict or a Hugging Face hub
directory (model.safetensors + config.json); see load_dictionary_learning.
"""

import math
import os
import pickle
from collections.abc import Mapping
from typing import Optional, Union

import torch

from ..errors import InputError, MissingInputError
from .checkpoints import CONFIG_NAME, DTYPES, FORMAT, WEIGHTS_NAME, build, load_weights, read_config, torch_dtype
from .crosscoder import CrossCoder

# dictionary_learning's CodeNormalization enum (values from enum.auto()). Only CROSSCODER (w_j = sum over models
# of per-model decoder norms) is what our selection computes; the others would silently select other latents.
_CODE_NORMS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
_DL_WEIGHTS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
_DL_NORMALIZER = ("target_rms", "activation_mean", "activation_std", "activation_global_scale")
_DL_KEYS = set(_DL_WEIGHTS) | set(_DL_NORMALIZER) | {"k", "threshold", "code_normalization_id"}


def _read_dictionary_learning(path):
    """-> (state dict, hub config or None, source name for messages)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise MissingInputError(f"{path}: a dictionary_learning hub directory needs {WEIGHTS_NAME}")
        path = weights
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such file or directory")
    if path.endswith(".safetensors"):
        config_path = os.path.join(os.path.dirname(path), CONFIG_NAME)
        config = read_config(config_path) if os.path.isfile(config_path) else None
        if config is not None and config.get("format") == FORMAT:
            raise InputError(f"{config_path}: this is a {FORMAT} checkpoint; load it with CrossCoder.from_pretrained")
        return load_weights(path), config, path
    return _read_torch_state(path), None, path


def _read_torch_state(path):
    """The state dict of a .pt / .pth / .bin file (the library saves plain state dicts with torch.save)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch.load's errors for a damaged file
        raise InputError(f"{path}: not a readable torch.save file ({e})") from e
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _scalar(state, key, source):
    t = state[key]
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(f"{source}: {key} must be a scalar tensor, got {shape}")
    return t.reshape(()).item()


def _expect_shape(state, key, shape, source, meaning):
    got = tuple(state[key].shape)
    if got != shape:
        raise InputError(f"{source}: {key} has shape {got}, expected {shape} ({meaning})")


def load_dictionary_learning(
    path_or_state_dict: Union[Mapping[str, torch.Tensor], Union[os.PathLike, str]],
    *,
    dtype: Optional[Union[torch.dtype, str]] = None,
    device: Optional[Union[torch.device, str]] = None,
) -> CrossCoder:
    """Load the paper's crosscoder checkpoint (dictionary_learning library) as a CrossCoder.

    A `k` buffer means a BatchTopKCrossCoder (activation "batch_topk", its threshold is kept), none the L1
    CrossCoder ("relu"). Only the CROSSCODER code normalisation is supported, and input normalisation only as the
    per-model global scale (keep_relative_variance=True, loaded as target_rms): anything else raises rather than
    loading a model that would select different latents.

    Args:
        path_or_state_dict: A state dict; a hub directory (model.safetensors + config.json); a .safetensors file
            (a config.json beside it is cross-checked when present); or a torch file (.pt/.pth/.bin).
        dtype: Parameter dtype (a torch dtype or its name); defaults to the checkpoint's.
        device: Where to put the parameters (default CPU).

    Returns:
        The CrossCoder, in eval mode.

    Raises:
        MissingInputError: The path does not exist, or a hub directory lacks model.safetensors.
        InputError: The file is not a readable safetensors or torch.save file, or the checkpoint is not a
            dictionary_learning CrossCoder we can load faithfully: unknown or missing keys, inconsistent shapes,
            fewer than 2 models, an unsupported code or input normalisation, a config.json that disagrees with the
            tensors, an unsupported dtype, or one of our own checkpoints (load those with
            CrossCoder.from_pretrained).
    """
    if isinstance(path_or_state_dict, Mapping):
        state, config, source = path_or_state_dict, None, "state dict"
    else:
        state, config, source = _read_dictionary_learning(path_or_state_dict)
    state = _library_tensors(state, source)
    M, d, F = _dimensions(state, source)
    _check_code_normalization(state, M, source)
    normalizer = _normalizer(state, config, M, d, source)
    k = int(_scalar(state, "k", source)) if "k" in state else None
    if config is not None:
        k = _check_hub_config(config, M, d, F, k, source)
    enc = state["encoder.weight"]
    if dtype is None:
        dtype = enc.dtype
        if dtype not in DTYPES.values():
            raise InputError(f"{source}: encoder.weight is {dtype}; pass dtype= one of {sorted(DTYPES)}")
    cc_config = dict(
        d_model=d,
        dict_size=F,
        n_models=M,
        k=k,
        activation="batch_topk" if k is not None else "relu",
        dtype=torch_dtype(dtype, "dtype"),
        target_rms=normalizer and normalizer.pop("target_rms"),
    )
    try:  # the constructor's argument checks (a k out of range): the checkpoint is what is wrong
        return build(CrossCoder, cc_config, _our_tensors(state, normalizer), device).eval()
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{source}: {e}") from e


def _library_tensors(state, source):
    """The checkpoint's tensors by the library's names, once they are all known and the weights all present."""
    # torch.compile'd modules save their keys under _orig_mod.; None stands for an absent optional buffer.
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items() if v is not None}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise InputError(f"{source}: {not_tensors} are not tensors")
    if "W_enc" in state:
        raise InputError(f"{source}: holds W_enc: a {FORMAT} checkpoint, load it with CrossCoder.from_pretrained")
    unknown = sorted(set(state) - _DL_KEYS)
    if unknown:
        raise InputError(f"{source}: unknown keys {unknown} (a dictionary_learning CrossCoder has {sorted(_DL_KEYS)})")
    missing = [k for k in _DL_WEIGHTS if k not in state]
    if missing:
        raise InputError(f"{source}: missing tensors {missing}")
    return state


def _dimensions(state, source):
    """(models M, width d, latents F) from encoder.weight [M, d, F], once the other weights agree."""
    enc = state["encoder.weight"]
    if enc.dim() != 3:
        raise InputError(f"{source}: encoder.weight has shape {tuple(enc.shape)}, expected rank 3 [M, d, F]")
    M, d, F = enc.shape
    _expect_shape(state, "decoder.weight", (M, F, d), source, "[M, F, d] from encoder.weight [M, d, F]")
    _expect_shape(state, "encoder.bias", (F,), source, "[F]")
    _expect_shape(state, "decoder.bias", (M, d), source, "[M, d]")
    if M < 2:
        raise InputError(f"{source}: num_layers (M) = {M}: a crosscoder needs at least 2 models")
    return M, d, F


def _check_code_normalization(state, M, source):
    """Only the CROSSCODER code normalisation selects the latents our crosscoder selects."""
    code_norm = (
        _CODE_NORMS.get(int(_scalar(state, "code_normalization_id", source)), "unknown")
        if "code_normalization_id" in state
        else "CROSSCODER"
    )  # absent: saved before the enum existed
    if code_norm != "CROSSCODER":
        raise InputError(
            f"{source}: code_normalization_id = {code_norm} is not supported (only CROSSCODER, "
            "w_j = sum_m ||W_dec[j, m]||)"
        )
    if "threshold" in state and state["threshold"].numel() != 1:
        raise InputError(
            f"{source}: threshold has shape {tuple(state['threshold'].shape)}, expected a scalar; a "
            f"per-model threshold [M] = [{M}] is the DECOUPLED code normalisation, not supported"
        )


def _normalizer(state, config, M, d, source):
    """The input normaliser as our buffers (target_rms, input_mean, input_std, input_scale), or None."""
    # The library's normaliser is a no-op unless both mean and std are real (its default is NaN-filled); with
    # them, it maps x -> (x - mean) * global_scale per model (keep_relative_variance=True), as our target_rms.
    if not all(k in state and not torch.isnan(state[k]).any() for k in ("activation_mean", "activation_std")):
        return None
    if config is not None and config.get("keep_relative_variance") is False:
        raise InputError(
            f"{source}: keep_relative_variance=False (per-feature standardisation) is not supported; "
            "only the per-model global scale (keep_relative_variance=True) is"
        )
    for key in ("activation_mean", "activation_std"):
        _expect_shape(state, key, (M, d), source, "[M, d]")
    target_rms = float(_scalar(state, "target_rms", source)) if "target_rms" in state else 1.0
    std = state["activation_std"].double()
    scale = state.get("activation_global_scale")
    if scale is None:
        scale = target_rms / (std.pow(2).sum(-1) + 1e-8).sqrt()
    _expect_shape(dict(activation_global_scale=scale), "activation_global_scale", (M,), source, "[M]")
    return dict(target_rms=target_rms, input_mean=state["activation_mean"], input_std=std, input_scale=scale)


def _our_tensors(state, normalizer):
    """The library's tensors in our layout and names, with the normaliser's buffers when there is one."""
    ours = {
        "W_enc": state["encoder.weight"].permute(2, 0, 1),
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].permute(1, 0, 2),
        "b_dec": state["decoder.bias"],
        "threshold": state["threshold"].reshape(()) if "threshold" in state else torch.tensor(-1.0),
        "num_batches_tracked": torch.tensor(0),
    }
    ours.update(normalizer or {})
    return ours


def _check_hub_config(config, M, d, F, k, source):
    """Cross-check a hub config.json against the tensors; returns k (the config's when the tensors lack it)."""
    for key, value in (("num_layers", M), ("activation_dim", d), ("dict_size", F)):
        if key in config and config[key] != value:
            raise InputError(f"{source}: config.json {key} = {config[key]!r} but the tensors give {value}")
    norm = config.get("code_normalization")
    if norm is not None and str(norm).upper() != "CROSSCODER":
        raise InputError(f"{source}: config.json code_normalization = {norm!r} is not supported (only CROSSCODER)")
    if config.get("k") is not None:
        if k is not None and int(config["k"]) != k:
            raise InputError(f"{source}: config.json k = {config['k']!r} but the k tensor is {k}")
        k = int(config["k"])
    return k


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
