"""Checkpoints: our own format (save_pretrained / from_pretrained) and the paper's dictionary_learning format.

Our format is a directory with model.safetensors (the CrossCoder's parameters and buffers under their own names)
and config.json (CrossCoder.config() plus a format tag). The paper's checkpoints come from the dictionary_learning
library (science-of-finetuning fork): encoder.weight [M, d, F], decoder.weight [M, F, d], as a torch .pt state dict
or a Hugging Face hub directory (model.safetensors + config.json); see load_dictionary_learning.
"""
import inspect
import json
import math
import os
import secrets
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from .crosscoder import CrossCoder

# Version 2 added target_rms and the input-normalisation buffers; version 1 files read as target_rms=None.
FORMAT, FORMAT_VERSION = "crossdiff_ext", 2
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CC_ARGS = set(inspect.signature(CrossCoder).parameters) - {"device"}

# dictionary_learning's CodeNormalization enum (values from enum.auto()). Only CROSSCODER (w_j = sum over models
# of per-model decoder norms) is what our selection computes; the others would silently select other latents.
_CODE_NORMS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
_DL_WEIGHTS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
_DL_NORMALIZER = ("target_rms", "activation_mean", "activation_std", "activation_global_scale")
_DL_KEYS = set(_DL_WEIGHTS) | set(_DL_NORMALIZER) | {"k", "threshold", "code_normalization_id"}


# ----------------------------------------------------------------------------------------------- our own format

def _atomic_write(path, write):
    """Run write(tmp_path) on a temp file beside `path`, fsync it, and return the temp path (not yet renamed).

    The temp file lives in the same directory so the later os.replace is a same-filesystem rename: readers see
    either the old file or the complete new one, never a prefix."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    # Not mkstemp: its 0600 mode would survive the rename; mode 0666 here gets the umask like a plain open().
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, mode)  # safetensors' save_file recreates the file as 0600
        with open(tmp, "rb+") as f:  # save_file closes its own handle, so reopen to flush to disk
            os.fsync(f.fileno())
        return tmp
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory):
    # Makes the renames themselves durable; directories cannot be opened this way on Windows, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_pretrained(model, directory):
    """Write `directory`/model.safetensors and config.json (created if needed), each atomically."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    config = dict(model.config(), format=FORMAT, format_version=FORMAT_VERSION)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    weights_path, config_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    # Both temp files are complete before either rename, so the window where the pair disagrees is two renames.
    tmps = []
    try:
        tmps.append(_atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})))
        tmps.append(_atomic_write(config_path, write_config))
        os.replace(tmps[0], weights_path)
        os.replace(tmps[1], config_path)
    finally:
        for tmp in tmps:
            _remove(tmp)  # no-op after a successful rename
    _fsync_dir(directory)


def _read_config(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (expected a directory written by save_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _check_state(tensors, expected, source):
    """Strict key and shape check with messages that name the key; dtype casts are left to the caller."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: state dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}")


def _build(config, state, device):
    """CrossCoder(**config) holding `state` (cast to the module's dtypes) on `device`, without a throwaway init:
    the module is built on the meta device and the loaded tensors are assigned into it."""
    model = CrossCoder(**config, device="meta")
    expected = model.state_dict()
    # Fresh contiguous storage: the sources may be permuted views or tensors the caller still owns.
    state = {name: torch.empty(ref.shape, dtype=ref.dtype, device=device or "cpu").copy_(state[name])
             for name, ref in expected.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def from_pretrained(directory, *, device=None, dtype=None):
    """Load a CrossCoder written by save_pretrained, or the whole crosscoder of a latent-parallel checkpoint
    (distributed.train's step directories). `dtype` (torch dtype or name) overrides the stored one."""
    directory = os.fspath(directory)
    if os.path.isfile(directory) and os.path.basename(directory) == WEIGHTS_NAME:
        directory = os.path.dirname(directory) or "."
    if os.path.isfile(os.path.join(directory, "sharding.json")):  # a latent-parallel checkpoint: merge its shards
        from .distributed.checkpoints import load_merged

        return load_merged(directory, device=device, dtype=dtype).eval()
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    config = _read_config(config_path)
    if config.pop("format", None) != FORMAT:
        raise ValueError(f"{config_path}: not a {FORMAT} checkpoint (no \"format\": \"{FORMAT}\"); for the paper's "
                         "dictionary_learning checkpoints use crossdiff_ext.load_dictionary_learning")
    version = config.pop("format_version", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {version!r} is not supported (this version reads "
                         f"<= {FORMAT_VERSION}; upgrade crossdiff_ext)")
    unknown = sorted(set(config) - _CC_ARGS)
    if unknown:
        raise ValueError(f"{config_path}: unknown config keys {unknown}")
    config["dtype"] = _dtype(dtype if dtype is not None else config.get("dtype", "float32"), config_path)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    tensors = load_file(weights_path, device="cpu")
    _check_state(tensors, CrossCoder(**config, device="meta").state_dict(), weights_path)
    return _build(config, tensors, device).eval()


def _dtype(value, source):
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        value = str(value).removeprefix("torch.")
    if value not in _DTYPES:
        raise ValueError(f"{source}: dtype must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


# ------------------------------------------------------------------------------------ the paper's checkpoints

def _read_dictionary_learning(path):
    """-> (state dict, hub config or None, source name for messages)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{path}: a dictionary_learning hub directory needs {WEIGHTS_NAME}")
        path = weights
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.endswith(".safetensors"):
        config_path = os.path.join(os.path.dirname(path), CONFIG_NAME)
        config = _read_config(config_path) if os.path.isfile(config_path) else None
        if config is not None and config.get("format") == FORMAT:
            raise ValueError(f"{config_path}: this is a {FORMAT} checkpoint; load it with CrossCoder.from_pretrained")
        return load_file(path, device="cpu"), config, path
    # .pt / .pth / .bin (and anything else): the library saves plain state dicts with torch.save.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state, None, path


def _scalar(state, key, source):
    t = state[key]
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{source}: {key} must be a scalar tensor, got {shape}")
    return t.reshape(()).item()


def _expect_shape(state, key, shape, source, meaning):
    got = tuple(state[key].shape)
    if got != shape:
        raise ValueError(f"{source}: {key} has shape {got}, expected {shape} ({meaning})")


def load_dictionary_learning(path_or_state_dict, *, dtype=None, device=None):
    """Load the paper's crosscoder checkpoint (dictionary_learning library) as a CrossCoder.

    path_or_state_dict: a state dict; a hub directory (model.safetensors + config.json); a .safetensors file (a
    config.json beside it is cross-checked when present); or a torch file (.pt/.pth/.bin). A `k` buffer means a
    BatchTopKCrossCoder (activation "batch_topk", its threshold is kept), none the L1 CrossCoder ("relu").
    dtype defaults to the checkpoint's. Only the CROSSCODER code normalisation is supported, and input
    normalisation only as the per-model global scale (keep_relative_variance=True, loaded as target_rms): anything
    else raises rather than loading a model that would select different latents.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, config, source = path_or_state_dict, None, "state dict"
    else:
        state, config, source = _read_dictionary_learning(path_or_state_dict)
    # torch.compile'd modules save their keys under _orig_mod.; None stands for an absent optional buffer.
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items() if v is not None}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{source}: {not_tensors} are not tensors")
    if "W_enc" in state:
        raise ValueError(f"{source}: holds W_enc: a {FORMAT} checkpoint, load it with CrossCoder.from_pretrained")
    unknown = sorted(set(state) - _DL_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} (a dictionary_learning CrossCoder has "
                         f"{sorted(_DL_KEYS)})")
    missing = [k for k in _DL_WEIGHTS if k not in state]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing}")

    enc = state["encoder.weight"]
    if enc.dim() != 3:
        raise ValueError(f"{source}: encoder.weight has shape {tuple(enc.shape)}, expected rank 3 [M, d, F]")
    M, d, F = enc.shape
    _expect_shape(state, "decoder.weight", (M, F, d), source, "[M, F, d] from encoder.weight [M, d, F]")
    _expect_shape(state, "encoder.bias", (F,), source, "[F]")
    _expect_shape(state, "decoder.bias", (M, d), source, "[M, d]")
    if M < 2:
        raise ValueError(f"{source}: num_layers (M) = {M}: a crosscoder needs at least 2 models")

    code_norm = _CODE_NORMS.get(int(_scalar(state, "code_normalization_id", source)), "unknown") \
        if "code_normalization_id" in state else "CROSSCODER"  # absent: saved before the enum existed
    if code_norm != "CROSSCODER":
        raise ValueError(f"{source}: code_normalization_id = {code_norm} is not supported (only CROSSCODER, "
                         "w_j = sum_m ||W_dec[j, m]||)")
    if "threshold" in state and state["threshold"].numel() != 1:
        raise ValueError(f"{source}: threshold has shape {tuple(state['threshold'].shape)}, expected a scalar; a "
                         f"per-model threshold [M] = [{M}] is the DECOUPLED code normalisation, not supported")
    # The library's normaliser is a no-op unless both mean and std are real (its default is NaN-filled); with
    # them, it maps x -> (x - mean) * global_scale per model (keep_relative_variance=True), as our target_rms.
    normalizer = None
    if all(k in state and not torch.isnan(state[k]).any() for k in ("activation_mean", "activation_std")):
        if config is not None and config.get("keep_relative_variance") is False:
            raise ValueError(f"{source}: keep_relative_variance=False (per-feature standardisation) is not supported; "
                             "only the per-model global scale (keep_relative_variance=True) is")
        for key in ("activation_mean", "activation_std"):
            _expect_shape(state, key, (M, d), source, "[M, d]")
        target_rms = float(_scalar(state, "target_rms", source)) if "target_rms" in state else 1.0
        std = state["activation_std"].double()
        scale = state.get("activation_global_scale")
        if scale is None:
            scale = target_rms / (std.pow(2).sum(-1) + 1e-8).sqrt()
        _expect_shape(dict(activation_global_scale=scale), "activation_global_scale", (M,), source, "[M]")
        normalizer = dict(target_rms=target_rms, input_mean=state["activation_mean"], input_std=std,
                          input_scale=scale)

    k = int(_scalar(state, "k", source)) if "k" in state else None
    if config is not None:
        k = _check_hub_config(config, M, d, F, k, source)

    if dtype is None:
        dtype = enc.dtype
        if dtype not in _DTYPES.values():
            raise ValueError(f"{source}: encoder.weight is {dtype}; pass dtype= one of {sorted(_DTYPES)}")
    cc_config = dict(d_model=d, dict_size=F, n_models=M, k=k, activation="batch_topk" if k is not None else "relu",
                     dtype=_dtype(dtype, "dtype"), target_rms=normalizer and normalizer.pop("target_rms"))
    ours = {"W_enc": enc.permute(2, 0, 1), "b_enc": state["encoder.bias"],
            "W_dec": state["decoder.weight"].permute(1, 0, 2), "b_dec": state["decoder.bias"],
            "threshold": state["threshold"].reshape(()) if "threshold" in state else torch.tensor(-1.0),
            "num_batches_tracked": torch.tensor(0)}
    ours.update(normalizer or {})
    return _build(cc_config, ours, device).eval()


def _check_hub_config(config, M, d, F, k, source):
    """Cross-check a hub config.json against the tensors; returns k (the config's when the tensors lack it)."""
    for key, value in (("num_layers", M), ("activation_dim", d), ("dict_size", F)):
        if key in config and config[key] != value:
            raise ValueError(f"{source}: config.json {key} = {config[key]!r} but the tensors give {value}")
    norm = config.get("code_normalization")
    if norm is not None and str(norm).upper() != "CROSSCODER":
        raise ValueError(f"{source}: config.json code_normalization = {norm!r} is not supported (only CROSSCODER)")
    if config.get("k") is not None:
        if k is not None and int(config["k"]) != k:
            raise ValueError(f"{source}: config.json k = {config['k']!r} but the k tensor is {k}")
        k = int(config["k"])
    return k


def to_dictionary_learning(model, *, normalizer_buffers=False):
    """The CrossCoder as a dictionary_learning state dict (torch.save it for their CrossCoder /
    BatchTopKCrossCoder.from_pretrained). A crosscoder with target_rms exports its normaliser as the library's
    buffers; without one, newer versions of the library still expect the (unused, NaN-filled) normaliser buffers:
    pass normalizer_buffers=True for those."""
    def own(t):  # a contiguous copy, never a view of the module's storage
        return t.detach().clone(memory_format=torch.contiguous_format)

    dev = model.W_enc.device
    state = {"encoder.weight": own(model.W_enc.permute(1, 2, 0)), "encoder.bias": own(model.b_enc),
             "decoder.weight": own(model.W_dec.permute(1, 0, 2)), "decoder.bias": own(model.b_dec),
             "code_normalization_id": torch.tensor(1, dtype=torch.int64, device=dev)}
    if model.activation == "batch_topk":
        state["k"] = torch.tensor(model.k, dtype=torch.int32, device=dev)
        state["threshold"] = own(model.threshold).float()
    if model.target_rms is not None:
        state.update(target_rms=torch.tensor(model.target_rms, device=dev), activation_mean=own(model.input_mean),
                     activation_std=own(model.input_std), activation_global_scale=own(model.input_scale))
    elif normalizer_buffers:
        M, d = model.n_models, model.d_model
        state.update(target_rms=torch.tensor(1.0, device=dev), activation_mean=torch.full((M, d), math.nan, device=dev),
                     activation_std=torch.full((M, d), math.nan, device=dev),
                     activation_global_scale=torch.ones(M, device=dev))
    return state
