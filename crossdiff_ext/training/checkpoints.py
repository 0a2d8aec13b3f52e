"""The trainers' checkpoints: step directories that exist whole or not at all, the newest one to resume from, and
the RNG states a resumed run restores.

A one-process run writes step-NNNNNNNN/ holding the model (model.safetensors + config.json, loadable with
CrossCoder.from_pretrained) and trainer.pt (optimizer, schedule, step, dead counters, data position, RNG states,
config); a latent-parallel run writes the sharded layout of layer/sharded.py under the same name. The torch files
hold tensors and plain values only (check_plain), so they load with torch.load(weights_only=True): resuming a
checkpoint someone shared runs none of its code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .. import atomic
from ..errors import MissingInputError, OutputExistsError
from ..layer import sharded

if TYPE_CHECKING:
    from ..layer import CrossCoder
    from .config import TrainConfig

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    """The RNG states a resumed run restores: torch's CPU (and every CUDA device's) generator, Python's random,
    and numpy's global generator when numpy is installed; all as tensors and plain values (see check_plain)."""
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = dict(
            bit_generator=str(name),
            key=torch.from_numpy(key.astype(np.int64)),  # uint32 words, held exactly in int64
            pos=int(pos),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian),
        )
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states that rng_state() returned (CUDA and numpy only where saved and available); an
    older checkpoint's numpy state (the tuple np.random.get_state() returns) is restored too."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        saved = state["numpy"]
        if isinstance(saved, dict):
            key = saved["key"].numpy().astype(np.uint32)
            saved = (saved["bit_generator"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
        np.random.set_state(saved)


# What a trainer state may hold: what torch.load(weights_only=True) rebuilds without running code.
PLAIN_TYPES = (torch.Tensor, torch.Size, torch.dtype, torch.device, str, bytes, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "trainer state") -> None:
    """Check that `obj` holds only tensors and plain values in dicts, lists and tuples, so that it loads with
    torch.load(weights_only=True) (a shared checkpoint resumes without trusting its author).

    Args:
        obj: The object about to be saved.
        where: Its name, for the message.

    Raises:
        TypeError: Something else is inside (a bug of the code that built the state): the message names its path.
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not a str or int")
            check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}: not loadable with weights_only")


def latest_checkpoint(directory: Optional[Union[str, os.PathLike]]) -> Optional[str]:
    """The newest complete checkpoint directory under `directory`, or None."""
    if not directory or not os.path.isdir(directory):
        return None
    steps = sorted(int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(directory)) if m)
    return os.path.join(directory, f"step-{steps[-1]:08d}") if steps else None


def step_dir_name(step: int) -> str:
    """The name of step `step`'s checkpoint directory: step-NNNNNNNN."""
    return f"step-{step:08d}"


def prune(directory: Union[str, os.PathLike], keep: int) -> None:
    """Delete all but the newest `keep` step directories."""
    steps = sorted(int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(directory)) if m)
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(directory, step_dir_name(old)), ignore_errors=True)


def save_torch(obj: Any, path: Union[str, os.PathLike]) -> None:
    """torch.save(obj) to `path` atomically, once check_plain has passed it."""
    check_plain(obj, os.path.basename(os.fspath(path)))
    atomic.save(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    directory: Union[str, os.PathLike], step: int, cc: CrossCoder, trainer_state: dict[str, Any], keep: int
) -> str:
    """Write step-NNNNNNNN/ (the model and trainer.pt) whole: built in a temporary directory, renamed into place."""
    final = os.path.join(directory, step_dir_name(step))
    tmp = atomic.temp_dir(directory, step_dir_name(step))
    try:
        cc.save_pretrained(tmp)
        save_torch(trainer_state, os.path.join(tmp, sharded.TRAINER_NAME))
        atomic.replace_dir(tmp, final)  # a rerun of the same step replaces it whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(directory, keep)
    return final


def resume_checkpoint(config: TrainConfig, resume: bool) -> Optional[str]:
    """The checkpoint to resume from (None for a fresh run), after checking the request against the directory."""
    checkpoint = latest_checkpoint(config.checkpoint_dir) if resume else None
    if resume and checkpoint is None:
        raise MissingInputError(f"resume=True but no checkpoint under checkpoint_dir = {config.checkpoint_dir!r}")
    if not resume and latest_checkpoint(config.checkpoint_dir):
        raise OutputExistsError(
            f"checkpoint_dir = {config.checkpoint_dir!r} already holds checkpoints (newest "
            f"{latest_checkpoint(config.checkpoint_dir)}); pass resume=True to continue that run "
            "or choose a new directory"
        )
    return checkpoint
