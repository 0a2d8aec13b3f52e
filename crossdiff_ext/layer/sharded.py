"""Checkpoints of latent-parallel training: one directory per latent shard, loadable into one process.

A sharded step directory holds
  sharding.json                  {"dict_size": F, "shards": [{"dir", "first", "end"}, ...]}
  shard-RRR-of-GGG/              model.safetensors + config.json of the shard (a CrossCoder of end - first
                                 latents) and optimizer.pt (its Adam state and dead-latent counters)
  trainer.pt                     the state every rank shares: step, schedule, data position, RNG, config
It is written under a temporary name by every shard (data rank 0 of each latent rank) and renamed into place by
global rank 0 after a barrier, so a step directory exists whole or not at all (a shared filesystem is assumed).

Every loader goes through the whole crosscoder's state (read_training_state), so any layout resumes any other:
a single-process checkpoint into a sharded run, a sharded one into a single process (train(resume=True) and
CrossCoder.from_pretrained both read it) or into another number of shards.
"""
import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .. import checkpoints as ours
from .layer import merge_states, slice_state
from .mesh import latent_range

SHARDING_NAME, TRAINER_NAME, OPTIMIZER_NAME = "sharding.json", "trainer.pt", "optimizer.pt"
_SLICED_PARAMS = (0, 1, 2)  # optimizer state of W_enc, b_enc, W_dec (CrossCoder.parameters() order); b_dec is 3


def shard_dir_name(rank, size):
    return f"shard-{rank:03d}-of-{size:03d}"


def is_sharded(directory):
    return os.path.isfile(os.path.join(os.fspath(directory), SHARDING_NAME))


def _read_sharding(directory):
    path = os.path.join(directory, SHARDING_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            sharding = json.load(f)
        shards = sharding["shards"]
        ends = [0] + [s["end"] for s in shards[:-1]]
        if [s["first"] for s in shards] != ends or shards[-1]["end"] != sharding["dict_size"]:
            raise ValueError("the shards do not tile [0, dict_size)")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: not a valid sharding record ({e})") from e
    return sharding


def load_merged(directory, *, device=None, dtype=None):
    """The whole CrossCoder of a sharded checkpoint (what CrossCoder.from_pretrained returns for one)."""
    directory = os.fspath(directory)
    sharding = _read_sharding(directory)
    shards = [ours.from_pretrained(os.path.join(directory, s["dir"]), dtype=dtype) for s in sharding["shards"]]
    for s, cc in zip(sharding["shards"], shards):
        if cc.dict_size != s["end"] - s["first"]:
            raise ValueError(f"{directory}/{s['dir']}: holds {cc.dict_size} latents, {SHARDING_NAME} says "
                             f"{s['end'] - s['first']}")
    config = dict(shards[0].config(), dict_size=sharding["dict_size"])
    config["dtype"] = ours._dtype(config["dtype"], directory)
    return ours._build(config, merge_states([cc.state_dict() for cc in shards]), device).eval()


def merge_optimizer_states(states):
    """Adam state dicts of consecutive shards -> the whole crosscoder's."""
    merged = dict(param_groups=states[0]["param_groups"], state={})
    for i, first in states[0]["state"].items():
        merged["state"][i] = {key: torch.cat([s["state"][i][key] for s in states])
                              if i in _SLICED_PARAMS and key != "step" else value for key, value in first.items()}
    return merged


def slice_optimizer_state(state, first, end):
    """The whole crosscoder's Adam state dict restricted to latents [first, end)."""
    return dict(param_groups=state["param_groups"],
                state={i: {key: v[first:end] if i in _SLICED_PARAMS and key != "step" else v for key, v in s.items()}
                       for i, s in state["state"].items()})


def _load(path):
    with open(path, "rb") as fh:  # RNG states stay CPU byte tensors; the caller moves what it needs
        return torch.load(fh, map_location="cpu", weights_only=False)


def read_training_state(checkpoint):
    """(model state dict, trainer state) of the whole crosscoder from any step directory, sharded or not. The
    trainer state has train.py's keys: step, optimizer, schedule, tokens_since_fired, data, rng, config."""
    if not is_sharded(checkpoint):
        weights = load_file(os.path.join(checkpoint, ours.WEIGHTS_NAME), device="cpu")
        return weights, _load(os.path.join(checkpoint, TRAINER_NAME))
    sharding = _read_sharding(checkpoint)
    model = load_merged(checkpoint).state_dict()
    trainer = _load(os.path.join(checkpoint, TRAINER_NAME))
    parts = [_load(os.path.join(checkpoint, s["dir"], OPTIMIZER_NAME)) for s in sharding["shards"]]
    trainer["optimizer"] = merge_optimizer_states([p["optimizer"] for p in parts])
    trainer["tokens_since_fired"] = torch.cat([p["tokens_since_fired"] for p in parts])
    return model, trainer


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _save_torch(obj, path):
    os.replace(ours._atomic_write(path, lambda tmp: torch.save(obj, tmp)), path)


def save_sharded(directory, step, model, shard_state, shared_state, keep):
    """Collective over the whole mesh: write step-NNNNNNNN/ as described above; returns its path."""
    from ..train import CHECKPOINT_PATTERN

    mesh = model.mesh
    final = os.path.join(directory, f"step-{step:08d}")
    tmp = os.path.join(directory, f".step-{step:08d}.partial")
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
            _save_torch(shard_state, os.path.join(shard_dir, OPTIMIZER_NAME))
        except Exception:  # every rank must reach the barrier; the failure is raised on all of them below
            failed += 1
            import traceback

            traceback.print_exc()
    failed = failed.to(model.shard.W_enc.device)
    dist.all_reduce(failed)
    if float(failed):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"writing checkpoint step {step} failed on {int(failed)} shard(s); see their tracebacks")
    if main:
        ranges = [latent_range(model.dict_size, r, mesh.latent_size) for r in range(mesh.latent_size)]
        sharding = dict(dict_size=model.dict_size, shards=[dict(dir=shard_dir_name(r, mesh.latent_size), first=a, end=b)
                                                           for r, (a, b) in enumerate(ranges)])
        text = json.dumps(sharding, indent=2) + "\n"
        path = os.path.join(tmp, SHARDING_NAME)
        os.replace(ours._atomic_write(path, lambda t: _write_text(t, text)), path)
        _save_torch(shared_state, os.path.join(tmp, TRAINER_NAME))
        if os.path.exists(final):  # a rerun of the same step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        ours._fsync_dir(directory)
        steps = sorted(int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(directory)) if m)
        for old in steps[:-keep]:
            shutil.rmtree(os.path.join(directory, f"step-{old:08d}"), ignore_errors=True)
    dist.barrier()
    return final


__all__ = ["is_sharded", "load_merged", "read_training_state", "save_sharded", "slice_optimizer_state",
           "merge_optimizer_states", "slice_state"]
