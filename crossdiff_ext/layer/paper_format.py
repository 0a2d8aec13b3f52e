"""Reading the paper's checkpoints (the dictionary_learning library, science-of-finetuning fork) into any
crosscoder class: the format, below the class that layer/dictionary_learning.py and CrossCoder.from_pretrained
build with it.

They hold encoder.weight [M, d, F] and decoder.weight [M, F, d] in one of the library's layouts:
- a Hub repo or its download (PyTorchModelHubMixin): model.safetensors (or pytorch_model.bin) and config.json (the
  constructor's arguments: activation_dim, dict_size, num_layers, k, code_normalization), often with
  trainer_config.json ({"trainer": {"dict_class", "k", "lm_name", "layer", ...}, "buffer": ...});
- a training run's output: ae.pt beside config.json ({"trainer": ..., "buffer": ...});
- a bare torch .pt / .pth / .bin state dict.
Torch files load with weights_only=True only: a planted pickle is refused, never run.
"""

import os
from collections.abc import Mapping
from typing import Optional, Union

import torch

from ..errors import InputError, MissingInputError
from .checkpoints import (
    CONFIG_NAME,
    DTYPES,
    FORMAT,
    WEIGHTS_NAME,
    Module,
    build,
    load_weights,
    read_config,
    torch_dtype,
    torch_load_safely,
)

# dictionary_learning's CodeNormalization enum (values from enum.auto()). Only CROSSCODER (w_j = sum over models
# of per-model decoder norms) is what our selection computes; the others would silently select other latents.
_CODE_NORMS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
_DL_WEIGHTS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
_DL_NORMALIZER = ("target_rms", "activation_mean", "activation_std", "activation_global_scale")
_DL_KEYS = set(_DL_WEIGHTS) | set(_DL_NORMALIZER) | {"k", "threshold", "code_normalization_id"}
# The weight files of the library's layouts, in the order its own loaders prefer them.
WEIGHT_FILES = (WEIGHTS_NAME, "pytorch_model.bin", "ae.pt")
TRAINER_CONFIG_NAME = "trainer_config.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
CROSSCODER_CLASSES = ("CrossCoder", "BatchTopKCrossCoder")


def is_dictionary_learning(path: Union[os.PathLike, str]) -> bool:
    """Whether a local path holds one of the library's layouts (and not one of our checkpoints).

    Args:
        path: A directory, or a weight file in one (a torch file counts on its own: our format has none).

    Returns:
        True for a torch file, or a directory (a file's own) with trainer_config.json, a config.json of the
        library (constructor arguments or a training run's {"trainer": ...}), or the library's torch weight files
        without a config.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path.endswith(TORCH_SUFFIXES) or is_dictionary_learning(os.path.dirname(path) or ".")
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, TRAINER_CONFIG_NAME)):
        return True
    config_path = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(config_path):
        config = read_config(config_path)
        return config.get("format") != FORMAT and ("trainer" in config or "activation_dim" in config)
    return any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES[1:])


def _read_dictionary_learning(path):
    """-> (state dict, [(config file, facts)] beside it, source name for messages)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise MissingInputError(f"{path}: a dictionary_learning directory needs one of {list(WEIGHT_FILES)}")
        path = found[0]
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such file or directory")
    config = _configs_beside(path)
    if path.endswith(".safetensors"):
        return load_weights(path), config, path
    return _read_torch_state(path), config, path


def _configs_beside(path):
    """[(config file, its facts)] for the library's config.json and trainer_config.json beside a weight file: the
    constructor's arguments, or the trainer's record of a {"trainer": ...} file (its dictionary class checked)."""
    directory = os.path.dirname(path) or "."
    found = []
    for source in (os.path.join(directory, CONFIG_NAME), os.path.join(directory, TRAINER_CONFIG_NAME)):
        if not os.path.isfile(source):
            continue
        config = read_config(source)
        if config.get("format") == FORMAT:
            raise InputError(f"{source}: this is a {FORMAT} checkpoint; load it with CrossCoder.from_pretrained")
        trainer = config.get("trainer")
        if isinstance(trainer, dict):
            _check_dict_class(trainer, source)
            keys = ("activation_dim", "dict_size", "k", "code_normalization")
            config = {key: trainer[key] for key in keys if key in trainer}
        found.append((source, config))
    return found


def _check_dict_class(trainer, source):
    """A trainer record names the dictionary class it trained: only the crosscoders load as CrossCoders."""
    name = trainer.get("dict_class")
    if name is not None and name not in CROSSCODER_CLASSES:
        raise InputError(f"{source}: dict_class = {name!r} is not a crosscoder (loadable: {list(CROSSCODER_CLASSES)})")


def _read_torch_state(path):
    """The state dict of a .pt / .pth / .bin file (the library saves plain state dicts with torch.save), read
    with weights_only=True."""
    state = torch_load_safely(path, "a dictionary_learning state dict")
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


def load_as(
    cls: type[Module],
    path_or_state_dict: Union[Mapping[str, torch.Tensor], Union[os.PathLike, str]],
    *,
    dtype: Optional[Union[torch.dtype, str]] = None,
    device: Optional[Union[torch.device, str]] = None,
) -> Module:
    """A `cls` (CrossCoder) holding the paper's checkpoint: the work of load_dictionary_learning (see there for
    the arguments and errors), for a class this module cannot name."""
    if isinstance(path_or_state_dict, Mapping):
        state, configs, source = path_or_state_dict, [], "state dict"
    else:
        state, configs, source = _read_dictionary_learning(path_or_state_dict)
    state = _library_tensors(state, source)
    M, d, F = _dimensions(state, source)
    _check_code_normalization(state, M, source)
    normalizer = _normalizer(state, dict(kv for _, config in configs for kv in config.items()), M, d, source)
    k = int(_scalar(state, "k", source)) if "k" in state else None
    for config_path, config in configs:
        k = _check_hub_config(config, M, d, F, k, config_path)
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
        return build(cls, cc_config, _our_tensors(state, normalizer), device).eval()
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
    """Cross-check a config (constructor arguments or trainer record) against the tensors; returns k (the
    config's when the tensors lack it)."""
    for key, value in (("num_layers", M), ("activation_dim", d), ("dict_size", F)):
        if key in config and config[key] != value:
            raise InputError(f"{source}: {key} = {config[key]!r} but the tensors give {value}")
    norm = config.get("code_normalization")
    # The library writes the enum as "CROSSCODER", "crosscoder" or "CodeNormalization.CROSSCODER".
    if norm is not None and str(norm).rsplit(".", 1)[-1].upper() != "CROSSCODER":
        raise InputError(f"{source}: code_normalization = {norm!r} is not supported (only CROSSCODER)")
    if config.get("k") is not None:
        if k is not None and int(config["k"]) != k:
            raise InputError(f"{source}: k = {config['k']!r} but the k tensor is {k}")
        k = int(config["k"])
    return k
