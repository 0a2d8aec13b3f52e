"""Our checkpoint format (save_pretrained / from_pretrained), and the loaders that read any training checkpoint.

A checkpoint is a directory with model.safetensors (the CrossCoder's parameters and buffers under their own names)
and config.json (CrossCoder.config() plus a format tag). A latent-parallel run writes one such directory per
latent shard under a step directory with sharding.json (layer/sharded.py); every loader here merges those shards
into the whole crosscoder, so any layout loads and resumes into any other. The loaders build the module class
they are given (CrossCoder passes itself), which keeps this module below the layer it serves.
"""

import inspect
import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from typing import Any, Optional, TypeVar, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import InputError, MissingInputError
from . import sharded
from .partition import check_partition, merge_partitions, shard_partition

# Version 2 added target_rms and the input-normalisation buffers; version 1 files read as target_rms=None.
# Version 3 added partition (dedicated latents); older files read as partition=None.
FORMAT, FORMAT_VERSION = "crossdiff_ext", 3
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The module class a loader builds (CrossCoder passes itself; this module sits below it and cannot name it).
Module = TypeVar("Module", bound=torch.nn.Module)


def save_pretrained(model: torch.nn.Module, directory: Union[os.PathLike, str]) -> None:
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
    pairs = []
    try:
        pairs.append(
            (
                atomic.temp_beside(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
                weights_path,
            )
        )
        pairs.append((atomic.temp_beside(config_path, write_config), config_path))
    except BaseException:
        for tmp, _ in pairs:
            atomic.remove(tmp)
        raise
    atomic.replace_all(pairs)


def read_config(path: Union[os.PathLike, str]) -> dict[str, Any]:
    """The JSON object of a config.json; MissingInputError or InputError naming the file otherwise."""
    if not os.path.isfile(path):
        directory = os.path.dirname(os.fspath(path)) or "."
        if not os.path.isdir(directory):
            raise MissingInputError(f"{directory}: no such checkpoint directory")
        raise MissingInputError(f"{path}: no {CONFIG_NAME} (expected a directory written by save_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _safetensors_cause(path):
    """Why a safetensors file does not load, when its size says so: the header's own length and the tensors'
    byte ranges give the size the file must have."""
    size = os.path.getsize(path)
    if size < 8:
        return f"truncated: {size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if 8 + length > size:
            return f"truncated: {size} bytes, the header alone needs {8 + length}"
        try:
            header = json.loads(fh.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "its header is not valid JSON"
    if 8 + length + end > size:
        return f"truncated: {size} bytes, the header describes {8 + length + end}"
    return None


def load_weights(path: Union[os.PathLike, str]) -> dict[str, torch.Tensor]:
    """The tensors of a model.safetensors on the CPU, with errors that name the file and the cause.

    Args:
        path: The safetensors file.

    Returns:
        {name: tensor}.

    Raises:
        MissingInputError: The file does not exist.
        InputError: It is not a readable safetensors file (truncated, or a corrupt header).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such file")
    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        cause = _safetensors_cause(path) or str(e)
        raise InputError(f"{path}: not a readable safetensors file ({cause}; safetensors: {e})") from e


def check_state(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check with messages that name the key; dtype casts are left to the caller."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(f"{source}: state dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise InputError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}")


def build(
    cls: type[Module],
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    device: Optional[Union[torch.device, str]],
) -> Module:
    """cls(**config) holding `state` (cast to the module's dtypes) on `device`, without a throwaway init: the
    module is built on the meta device and the loaded tensors are assigned into it."""
    model = cls(**config, device="meta")
    expected = model.state_dict()
    # Fresh contiguous storage: the sources may be permuted views or tensors the caller still owns.
    state = {
        name: torch.empty(ref.shape, dtype=ref.dtype, device=device or "cpu").copy_(state[name])
        for name, ref in expected.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model


def torch_dtype(value: Union[torch.dtype, str], source: str) -> torch.dtype:
    """A torch dtype or its name -> one of DTYPES' dtypes; InputError naming `source` otherwise."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        value = str(value).removeprefix("torch.")
    if value not in DTYPES:
        raise InputError(f"{source}: dtype must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[value]


def from_pretrained(
    cls: type[Module],
    directory: Union[os.PathLike, str],
    *,
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
) -> Module:
    """Load a `cls` (CrossCoder) written by save_pretrained, or the whole crosscoder of a latent-parallel
    checkpoint (distributed.train's step directories). `dtype` (torch dtype or name) overrides the stored one."""
    directory = os.fspath(directory)
    if os.path.isfile(directory) and os.path.basename(directory) == WEIGHTS_NAME:
        directory = os.path.dirname(directory) or "."
    if sharded.is_sharded(directory):
        return load_merged(cls, directory, device=device, dtype=dtype).eval()
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    config = read_config(config_path)
    if config.pop("format", None) != FORMAT:
        raise InputError(
            f'{config_path}: not a {FORMAT} checkpoint (no "format": "{FORMAT}"); for the paper\'s '
            "dictionary_learning checkpoints use crossdiff_ext.load_dictionary_learning"
        )
    version = config.pop("format_version", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            f"{config_path}: format_version {version!r} is not supported (this version reads "
            f"<= {FORMAT_VERSION}; upgrade crossdiff_ext)"
        )
    unknown = sorted(set(config) - (set(inspect.signature(cls).parameters) - {"device"}))
    if unknown:
        raise InputError(f"{config_path}: unknown config keys {unknown}")
    config["dtype"] = torch_dtype(dtype if dtype is not None else config.get("dtype", "float32"), config_path)
    if not os.path.isfile(weights_path):
        raise MissingInputError(f"{weights_path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    try:  # the constructor's argument checks, on the meta device: named with the config file
        expected = cls(**config, device="meta").state_dict()
    except InputError as e:
        raise InputError(f"{config_path}: {e}") from e
    tensors = load_weights(weights_path)
    check_state(tensors, expected, weights_path)
    model = build(cls, config, tensors, device).eval()
    model.check_partition_rows(weights_path)
    return model


def load_merged(
    cls: type[Module],
    directory: Union[os.PathLike, str],
    *,
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
) -> Module:
    """The whole crosscoder of a sharded checkpoint (what from_pretrained returns for one)."""
    directory = os.fspath(directory)
    sharding = sharded.read_sharding(directory)
    shards = [from_pretrained(cls, os.path.join(directory, s["dir"]), dtype=dtype) for s in sharding["shards"]]
    for s, cc in zip(sharding["shards"], shards):
        if cc.dict_size != s["end"] - s["first"]:
            raise InputError(
                f"{directory}/{s['dir']}: holds {cc.dict_size} latents, {sharded.SHARDING_NAME} says "
                f"{s['end'] - s['first']}"
            )
    config = dict(shards[0].config(), dict_size=sharding["dict_size"])
    config["dtype"] = torch_dtype(config["dtype"], directory)
    config["partition"] = merged_partition(directory, sharding, [cc.partition for cc in shards], shards[0].n_models)
    return build(cls, config, sharded.merge_states([cc.state_dict() for cc in shards]), device).eval()


def merged_partition(
    directory: str, sharding: Mapping[str, Any], parts: list[Optional[tuple[int, ...]]], n_models: int
) -> Optional[list[int]]:
    """The whole crosscoder's partition from its shards' (they add up), checked to line up: every shard must
    hold exactly its latents' part of the sum (InputError naming the shard otherwise)."""
    total = merge_partitions(parts, n_models)
    for s, part in zip(sharding["shards"], parts):
        if part != shard_partition(total, s["first"], s["end"]):
            raise InputError(
                f"{directory}/{s['dir']}: partition {part} does not fit latents [{s['first']}, {s['end']}) of the "
                f"whole crosscoder's partition {total}"
            )
    return None if total is None else list(total)


def stored_partition(checkpoint: Union[os.PathLike, str]) -> Optional[tuple[int, ...]]:
    """The partition a step directory's crosscoder was saved with (sharded or not), as CrossCoder.partition
    holds it: a tuple, or None (also for files older than partitions)."""
    checkpoint = os.fspath(checkpoint)
    if not sharded.is_sharded(checkpoint):
        return _config_partition(os.path.join(checkpoint, CONFIG_NAME))
    sharding = sharded.read_sharding(checkpoint)
    paths = [os.path.join(checkpoint, s["dir"], CONFIG_NAME) for s in sharding["shards"]]
    n_models = read_config(paths[0]).get("n_models")
    merged = merged_partition(checkpoint, sharding, [_config_partition(p) for p in paths], n_models)
    return None if merged is None else tuple(merged)


def _config_partition(path):
    """The checked partition of one config.json (None when it has none)."""
    config = read_config(path)
    try:
        return check_partition(config.get("partition"), config.get("n_models"), config.get("dict_size"))
    except (InputError, TypeError) as e:
        raise InputError(f"{path}: {e}") from e


def check_resume_partition(checkpoint: Union[os.PathLike, str], partition: Optional[tuple[int, ...]]) -> None:
    """Refuse to resume a crosscoder from a checkpoint saved with another partition (InputError)."""
    stored = stored_partition(checkpoint)
    if stored != partition:
        raise InputError(
            f"{checkpoint}: saved with partition {None if stored is None else list(stored)}, the crosscoder to "
            f"resume has partition {None if partition is None else list(partition)}; build it with the same one"
        )


def torch_load_safely(
    path: Union[os.PathLike, str], what: str, *, trust_pickle: bool = False, remedy: Optional[str] = None
) -> Any:
    """torch.load a file on the CPU with weights_only=True: tensors and plain Python values only, so a planted
    pickle cannot run code.

    Args:
        path: The torch.save file.
        what: What the file is, for messages (e.g. "a checkpoint's training state").
        trust_pickle: Load with weights_only=False when the safe load refuses the file: this runs whatever code
            its pickle names, so only for a file from a source you trust (a checkpoint written by an older version
            of this library, whose RNG state held numpy arrays).
        remedy: What the user can do about a refused file, appended to the message (e.g. the opt-in flag).

    Returns:
        The loaded object.

    Raises:
        MissingInputError: The file does not exist.
        InputError: The file is damaged, or (without trust_pickle) its pickle names a global outside the plain
            types: one line naming the file and that global.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such file ({what})")
    try:
        with open(path, "rb") as fh:  # RNG states stay CPU byte tensors; the caller moves what it needs
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = UNSAFE_GLOBAL.search(str(e))
        if refused is None:  # not a refusal: a damaged file
            raise InputError(f"{path}: not a readable torch.save file ({_first_line(e)})") from e
        if not trust_pickle:
            raise InputError(
                f"{path}: refused to load {what}: its pickle calls {refused.group(1)}, which could run code "
                "(only tensors and plain values load safely)" + (f"; {remedy}" if remedy else "")
            ) from None
    except (RuntimeError, EOFError) as e:  # torch.load's errors for a damaged file
        raise InputError(f"{path}: not a readable torch.save file ({_first_line(e)})") from e
    with open(path, "rb") as fh:
        return torch.load(fh, map_location="cpu", weights_only=False)


# torch's weights_only refusal names the global the pickle asked for.
UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
RESUME_REMEDY = (
    "if you trust who wrote it (e.g. a checkpoint of an older crossdiff_ext), resume with trust_checkpoint=True / "
    "--trust-checkpoint"
)


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_training_state(
    cls: type[torch.nn.Module], checkpoint: Union[os.PathLike, str], *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, trainer state) of the whole crosscoder from any step directory, sharded or not. The
    trainer state has the trainer's keys: step, optimizer, schedule, tokens_since_fired, data, rng, config.

    The torch files load with weights_only=True; trust_pickle=True also loads one that holds other Python
    objects (checkpoints written before the trainer state was plain, see torch_load_safely)."""

    def load(path):
        return torch_load_safely(path, "a checkpoint's training state", trust_pickle=trust_pickle, remedy=RESUME_REMEDY)

    if not sharded.is_sharded(checkpoint):
        weights = load_weights(os.path.join(checkpoint, WEIGHTS_NAME))
        return weights, load(os.path.join(checkpoint, sharded.TRAINER_NAME))
    sharding = sharded.read_sharding(checkpoint)
    model = load_merged(cls, checkpoint).state_dict()
    trainer = load(os.path.join(checkpoint, sharded.TRAINER_NAME))
    parts = [load(os.path.join(checkpoint, s["dir"], sharded.OPTIMIZER_NAME)) for s in sharding["shards"]]
    trainer["optimizer"] = sharded.merge_optimizer_states([p["optimizer"] for p in parts])
    trainer["tokens_since_fired"] = torch.cat([p["tokens_since_fired"] for p in parts])
    return model, trainer
