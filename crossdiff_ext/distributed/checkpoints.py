"""Checkpoints of latent-parallel training: one directory per latent shard (the layout of layer/sharded.py),
loadable into one process.

A step directory is written under a temporary name by every shard (data rank 0 of each latent rank) and renamed
into place by global rank 0 after a barrier, so it exists whole or not at all (a shared filesystem is assumed).
Every loader goes through the whole crosscoder's state (layer/checkpoints.py), so any layout resumes any other:
a single-process checkpoint into a sharded run, a sharded one into a single process (train(resume=True) and
CrossCoder.from_pretrained both read it) or into another number of shards.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.distributed as dist

from .. import atomic
from ..layer import checkpoints
from ..layer.crosscoder import CrossCoder
from ..layer.sharded import (
    OPTIMIZER_NAME,
    SHARDING_NAME,
    TRAINER_NAME,
    is_sharded,
    merge_optimizer_states,
    shard_dir_name,
    slice_optimizer_state,
    slice_state,
)
from ..training.checkpoints import prune, save_torch, step_dir_name
from .mesh import latent_range

if TYPE_CHECKING:
    from .layer import ShardedCrossCoder


def load_merged(
    directory: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
) -> CrossCoder:
    """The whole CrossCoder of a sharded checkpoint (what CrossCoder.from_pretrained returns for one)."""
    return checkpoints.load_merged(CrossCoder, directory, device=device, dtype=dtype)


def read_training_state(
    checkpoint: Union[str, os.PathLike], *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, trainer state) of the whole crosscoder from any step directory, sharded or not; see
    layer.checkpoints.read_training_state for trust_pickle."""
    return checkpoints.read_training_state(CrossCoder, checkpoint, trust_pickle=trust_pickle)


def save_sharded(
    directory: Union[str, os.PathLike],
    step: int,
    model: ShardedCrossCoder,
    shard_state: dict[str, Any],
    shared_state: dict[str, Any],
    keep: int,
) -> str:
    """Collective over the whole mesh: write step-NNNNNNNN/ as described above; returns its path."""
    mesh = model.mesh
    final = os.path.join(directory, step_dir_name(step))
    tmp = os.path.join(directory, f".{step_dir_name(step)}.partial")  # one name that every rank can compute
    main = dist.get_rank() == 0
    if main:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a run that died while saving this step
        os.makedirs(tmp)
    dist.barrier()
    failed = torch.zeros(1)
    if mesh.data_rank == 0:
        try:
            shard_dir = os.path.join(tmp, shard_dir_name(mesh.latent_rank, mesh.latent_size))
            model.shard.save_pretrained(shard_dir)
            save_torch(shard_state, os.path.join(shard_dir, OPTIMIZER_NAME))
        except Exception:  # every rank must reach the barrier; the failure is raised on all of them below
            failed += 1
            traceback.print_exc()
    failed = failed.to(model.shard.W_enc.device)
    dist.all_reduce(failed)
    if float(failed):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"writing checkpoint step {step} failed on {int(failed)} shard(s); see their tracebacks")
    if main:
        ranges = [latent_range(model.dict_size, r, mesh.latent_size) for r in range(mesh.latent_size)]
        sharding = dict(
            dict_size=model.dict_size,
            shards=[dict(dir=shard_dir_name(r, mesh.latent_size), first=a, end=b) for r, (a, b) in enumerate(ranges)],
        )
        atomic.write_text(os.path.join(tmp, SHARDING_NAME), json.dumps(sharding, indent=2) + "\n")
        save_torch(shared_state, os.path.join(tmp, TRAINER_NAME))
        atomic.replace_dir(tmp, final)  # a rerun of the same step replaces it whole
        prune(directory, keep)
    dist.barrier()
    return final


__all__ = [
    "is_sharded",
    "load_merged",
    "read_training_state",
    "save_sharded",
    "slice_optimizer_state",
    "merge_optimizer_states",
    "slice_state",
]
