"""ShardedCrossCoder: one rank's block of latents of a crosscoder on a 2-D mesh, used like the CrossCoder layer.

Forward on a rank (its rows x [b, M, d], its latents [first, end)):
  local paired encode -> exact batch top-k over the whole mesh (batch_topk_sharded: a few small all-reduces) ->
  local sparse decode of its kept codes -> one all-reduce (SUM) of the partial reconstructions over the latent
  group -> + b_dec (replicated).
Backward needs no collective for the weight gradients: each rank's kept codes only touch its own rows of W_enc,
b_enc, W_dec, and b_dec's gradient is the same on every latent rank. Replicas of a shard (the data dimension)
see different rows; the trainer sums their gradients (distributed.train).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import backends
from ..errors import InputError
from ..layer import checkpoints
from ..layer.codes import SparseCodes
from ..layer.crosscoder import CrossCoder, CrossCoderOutput
from ..layer.partition import Partition, check_partition, shard_partition
from ..layer.sharded import merge_states, slice_state
from ..ops import validate
from ..ops.autograd import EncodeSparse, decode_sparse, encode_sparse
from .batch_topk import batch_topk_sharded
from .collectives import replicate_to_shards, sum_over_shards
from .mesh import Mesh


class _EncodeSharded(EncodeSparse):
    """EncodeSparse whose selection is the mesh-wide exact batch top-k; backward is EncodeSparse's (local)."""

    @staticmethod
    def forward(x, W_enc, b_enc, w, K, groups, backend):
        f = backends.kernels(backend).paired_encode(x, W_enc, b_enc)
        return batch_topk_sharded(f, w, K, *groups)


def shard_config(config: dict[str, Any], first: int, end: int) -> dict[str, Any]:
    """CrossCoder.config() of a full crosscoder -> that of a shard holding its latents [first, end) (their part of
    the partition included)."""
    n_latents = end - first
    if config.get("k") is not None and config["k"] > n_latents:
        raise InputError(
            f"a latent shard of {n_latents} latents cannot hold a crosscoder with k = {config['k']} "
            "(k must be <= the shard size); use fewer latent shards"
        )
    partition = config.get("partition")
    part = shard_partition(None if partition is None else tuple(partition), first, end)
    return dict(config, dict_size=n_latents, partition=None if part is None else list(part))


def _module_args(config):
    return dict(config, dtype=checkpoints.torch_dtype(config["dtype"], "config"))


class ShardedCrossCoder(nn.Module):
    """The latents [first, end) of a crosscoder of dict_size latents, on `mesh` (distributed.make_mesh).

    `shard` is a CrossCoder holding those latents (its dict_size is the shard's size); the encoder, selection
    and decoder run on its backend like the layer's. Every rank of the mesh must call forward together (it runs
    collectives). forward(x) takes this rank's rows and returns their full reconstruction; the codes index the
    shard's latents (add `first` for global ids); min_score is the mesh-wide smallest kept score. `partition` is
    the whole crosscoder's (CrossCoder.partition); the shard must hold its latents' part of it.
    """

    def __init__(self, shard: CrossCoder, mesh: Mesh, dict_size: int, *, partition: Optional[Partition] = None):
        super().__init__()
        if not isinstance(shard, CrossCoder):
            raise InputError(f"shard must be a CrossCoder, got {type(shard).__name__}")
        self.first, self.end = mesh.latent_range(dict_size)
        if shard.dict_size != self.end - self.first:
            raise InputError(
                f"latent rank {mesh.latent_rank} of {mesh.latent_size} holds latents [{self.first}, "
                f"{self.end}) of {dict_size}, but the shard has {shard.dict_size}"
            )
        self.partition = check_partition(partition, shard.n_models, dict_size)
        if shard.partition != shard_partition(self.partition, self.first, self.end):
            raise InputError(
                f"the shard's partition {shard.partition} is not its latents' [{self.first}, {self.end}) part of "
                f"partition {self.partition}"
            )
        self.shard, self.mesh, self.dict_size = shard, mesh, dict_size

    @classmethod
    def from_crosscoder(cls, cc: CrossCoder, mesh: Mesh) -> ShardedCrossCoder:
        """This rank's shard of a full crosscoder (e.g. one built with the same seed on every rank)."""
        first, end = mesh.latent_range(cc.dict_size)
        config = _module_args(shard_config(cc.config(), first, end))
        state = slice_state(cc.state_dict(), first, end)
        shard = checkpoints.build(CrossCoder, config, state, cc.W_enc.device)
        shard.compute_dtype = cc.compute_dtype
        return cls(shard, mesh, cc.dict_size, partition=cc.partition)

    def full_config(self) -> dict[str, Any]:
        """CrossCoder.config() of the whole crosscoder."""
        partition = None if self.partition is None else list(self.partition)
        return dict(self.shard.config(), dict_size=self.dict_size, partition=partition)

    def gather(self) -> CrossCoder:
        """The whole crosscoder on every rank (an all-gather of the shards over the latent group)."""
        states = [None] * self.mesh.latent_size
        local = {name: t.detach().cpu() for name, t in self.shard.state_dict().items()}
        dist.all_gather_object(states, local, group=self.mesh.latent_group)
        return checkpoints.build(
            CrossCoder, _module_args(self.full_config()), merge_states(states), self.shard.W_enc.device
        )

    def forward(
        self, x: torch.Tensor, *, normalized: bool = False, use_threshold: Optional[bool] = None
    ) -> CrossCoderOutput:
        """This rank's rows x [b, M, d] (or [M, d]) through the sharded crosscoder: their full reconstruction,
        the codes of this shard's latents and the mesh-wide min_score (a collective: every rank calls it)."""
        cc, mesh = self.shard, self.mesh
        x = cc.as_batch(x)
        if not normalized:
            x = cc.normalize(x)
        W_enc, b_enc, W_dec, b_dec = cc.compute_weights()
        x_in = replicate_to_shards(x, mesh.latent_group)
        min_score = torch.full((), math.inf, dtype=torch.float32, device=x.device)
        if cc.activation == "relu":
            w = torch.ones(cc.dict_size, dtype=torch.float32, device=x.device)
            values, indices, row_ptr, _ = encode_sparse(x_in, W_enc, b_enc, w, "threshold", 0.0)
        else:
            w = cc.decoder_norm_weights()
            use_threshold = (not self.training) if use_threshold is None else use_threshold
            if use_threshold:
                if float(cc.threshold) < 0:
                    raise RuntimeError(
                        "the inference threshold is unset (-1): train past threshold_start_step "
                        "first, or call forward(x, use_threshold=False)"
                    )
                values, indices, row_ptr, _ = encode_sparse(x_in, W_enc, b_enc, w, "threshold", float(cc.threshold))
            else:
                validate.encode_selection(x_in, W_enc, b_enc, w, "threshold", 0.0)  # shapes, dtypes, devices
                K = cc.k * x.shape[0] * mesh.data_size
                values, indices, row_ptr, min_score = _EncodeSharded.apply(
                    x_in, W_enc, b_enc, w, K, (mesh.latent_group, mesh.data_group), backends.resolve(x.device)
                )
                if self.training:
                    cc.track_threshold(min_score)
        partial = decode_sparse(values, indices, row_ptr, W_dec, None)
        recon = sum_over_shards(partial, mesh.latent_group) + b_dec
        codes = SparseCodes(values, indices, row_ptr, x.shape[0], cc.dict_size)
        return CrossCoderOutput(recon if normalized else cc.denormalize(recon), codes, min_score)

    def extra_repr(self) -> str:
        """The shard's latent range and mesh position, for repr()."""
        return (
            f"latents [{self.first}, {self.end}) of {self.dict_size}, latent rank {self.mesh.latent_rank}/"
            f"{self.mesh.latent_size}, data rank {self.mesh.data_rank}/{self.mesh.data_size}"
        )
