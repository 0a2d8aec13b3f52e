"""The layout of latent-parallel checkpoints, and the state arithmetic that splits and merges them.

A sharded step directory holds
  sharding.json                  {"dict_size": F, "shards": [{"dir", "first", "end"}, ...]}
  shard-RRR-of-GGG/              model.safetensors + config.json of the shard (a CrossCoder of end - first
                                 latents) and optimizer.pt (its Adam state and dead-latent counters)
  trainer.pt                     the state every rank shares: step, schedule, data position, RNG, config
distributed/checkpoints.py writes it; layer/checkpoints.py loads it (into one process, merged).
"""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from ..errors import InputError

SHARDING_NAME, TRAINER_NAME, OPTIMIZER_NAME = "sharding.json", "trainer.pt", "optimizer.pt"
SLICED = ("W_enc", "b_enc", "W_dec")  # split along the latent dimension; every other tensor is replicated
SLICED_PARAMS = (0, 1, 2)  # optimizer state of W_enc, b_enc, W_dec (CrossCoder.parameters() order); b_dec is 3


def shard_dir_name(rank: int, size: int) -> str:
    """Directory name of shard `rank` of `size`: shard-RRR-of-GGG."""
    return f"shard-{rank:03d}-of-{size:03d}"


def is_sharded(directory: Union[os.PathLike, str]) -> bool:
    """Whether `directory` is a latent-parallel step directory (it holds sharding.json)."""
    return os.path.isfile(os.path.join(os.fspath(directory), SHARDING_NAME))


def read_sharding(directory: Union[os.PathLike, str]) -> dict[str, Any]:
    """The sharding record of a step directory, checked to tile [0, dict_size); InputError (a ValueError)
    naming the file otherwise."""
    path = os.path.join(directory, SHARDING_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            sharding = json.load(f)
        shards = sharding["shards"]
        ends = [0] + [s["end"] for s in shards[:-1]]
        if [s["first"] for s in shards] != ends or shards[-1]["end"] != sharding["dict_size"]:
            raise InputError("the shards do not tile [0, dict_size)")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise InputError(f"{path}: not a valid sharding record ({e})") from e
    return sharding


def slice_state(state: Mapping[str, Any], first: int, end: int) -> dict[str, Any]:
    """A crosscoder state dict (or anything keyed like one) restricted to latents [first, end)."""
    return {name: t[first:end] if name in SLICED else t for name, t in state.items()}


def merge_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """State dicts of consecutive shards -> the full crosscoder's. Replicated tensors must agree across shards."""
    merged = {}
    for name, first in states[0].items():
        if name in SLICED:
            merged[name] = torch.cat([s[name] for s in states])
        else:
            for i, s in enumerate(states[1:], 1):
                if not torch.equal(s[name], first):
                    raise InputError(f"shards 0 and {i} disagree on the replicated tensor {name!r}")
            merged[name] = first
    return merged


def merge_optimizer_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Adam state dicts of consecutive shards -> the whole crosscoder's."""
    merged = dict(param_groups=states[0]["param_groups"], state={})
    for i, first in states[0]["state"].items():
        merged["state"][i] = {
            key: torch.cat([s["state"][i][key] for s in states]) if i in SLICED_PARAMS and key != "step" else value
            for key, value in first.items()
        }
    return merged


def slice_optimizer_state(state: Mapping[str, Any], first: int, end: int) -> dict[str, Any]:
    """The whole crosscoder's Adam state dict restricted to latents [first, end)."""
    return dict(
        param_groups=state["param_groups"],
        state={
            i: {key: v[first:end] if i in SLICED_PARAMS and key != "step" else v for key, v in s.items()}
            for i, s in state["state"].items()
        },
    )
