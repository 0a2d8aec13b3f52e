"""distributed.train: cx.train's recipe on a mesh of data replicas x latent shards, with the same result as one
process training on the same global batches (to float rounding).

Per step, on every rank: read this data rank's block of the global batch; forward through its ShardedCrossCoder
(exact mesh-wide batch top-k, one all-reduce of the partial reconstructions over the latent group); its rows'
share of the loss; backward (no collective for the weight gradients); sum the gradients over the data group (one
all-reduce per parameter); clip by the global norm (one scalar all-reduce over the latent group); Adam on the
local shard; dead-latent counters from the latents fired anywhere in the global batch (a MAX all-reduce of [F_r]
flags over the data group). Logging, progress and the shared checkpoint state come from global rank 0.
The step loop itself is training.loop.run, the one-process trainer's: ShardedRuntime supplies what differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from ..data import statistics
from ..errors import InputError
from ..layer import CrossCoderOutput, SparseCodes, checkpoints
from ..layer.norms import band_counts
from ..layer.sharded import slice_optimizer_state, slice_state
from ..training import losses as single
from ..training.checkpoints import rng_state
from ..training.config import TrainConfig, TrainResult
from ..training.loggers import LoggerSpec
from ..training.loop import BatchSource, Runtime, TrainData, run
from . import losses
from .checkpoints import save_sharded
from .collectives import all_reduce_
from .data import gather_rows, shard_source
from .layer import ShardedCrossCoder


def _clip_grad_norm(cc, max_norm, mesh):
    """torch.nn.utils.clip_grad_norm_ over the whole crosscoder: the shards' squared norms summed over the latent
    group, b_dec (replicated) counted once."""
    sharded = torch.stack([p.grad.float().pow(2).sum() for p in (cc.W_enc, cc.b_enc, cc.W_dec)]).sum()
    total = (all_reduce_(sharded.reshape(1), [mesh.latent_group])[0] + cc.b_dec.grad.float().pow(2).sum()).sqrt()
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in cc.parameters():
            p.grad.mul_(coef.to(p.grad.dtype))
    return total


def _fve(x, recon, mesh, total_rows):
    """training.loop.fraction_of_variance_explained over the global batch, from all-reduced sums."""
    x, recon = x.float(), recon.float()
    sums = torch.cat([(x - recon).pow(2).sum(dim=(0, 2)), x.pow(2).sum(dim=(0, 2)), x.sum(0).flatten()])
    all_reduce_(sums, [mesh.data_group])
    M = x.shape[1]
    err, square, total = sums[:M], sums[M : 2 * M], sums[2 * M :].view(M, -1)
    var = square - total.pow(2).sum(1) / total_rows
    per_model = (1 - err / var.clamp_min(1e-30)).tolist()
    return float(1 - err.sum() / var.sum().clamp_min(1e-30)), per_model


def _underlying(source):
    return getattr(source, "source", source)


class ShardedRuntime(Runtime):
    """The step loop on this rank of the mesh (see the module docstring)."""

    def __init__(self, model: ShardedCrossCoder, config: TrainConfig):
        if not isinstance(model, ShardedCrossCoder):
            raise InputError(f"model must be a distributed.ShardedCrossCoder, got {type(model).__name__}")
        self.model, self.cc, self.mesh = model, model.shard, model.mesh
        self.dict_size = model.dict_size
        self.check(config)
        self.scaler = None
        self.total_rows = config.batch_size  # the global batch
        self.main = dist.get_rank() == 0

    def check(self, config: TrainConfig) -> None:
        """Refuse a config the mesh cannot run: fp16 loss scaling, or a batch the data replicas cannot split."""
        if config.mixed_precision == "fp16":
            raise InputError(
                "TrainConfig.mixed_precision = 'fp16' (dynamic loss scaling) is not supported by "
                "distributed.train; use 'bf16', which needs no loss scaling"
            )
        super().check(config)
        if config.batch_size % self.mesh.data_size:
            raise InputError(
                f"TrainConfig.batch_size = {config.batch_size} must be divisible by the data-parallel "
                f"size {self.mesh.data_size}"
            )

    def batches(self, source: BatchSource) -> BatchSource:
        """This data rank's block of rows of every global batch."""
        return shard_source(source, self.mesh.data_rank, self.mesh.data_size)

    def load(
        self,
        checkpoint: str,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        opt: torch.optim.Optimizer,
        tokens_since_fired: torch.Tensor,
    ) -> None:
        """This shard's slice of a whole crosscoder's training state (any layout wrote it)."""
        model = self.model
        if weights["W_enc"].shape[0] != model.dict_size:
            raise InputError(
                f"{checkpoint}: a crosscoder of {weights['W_enc'].shape[0]} latents, the model has {model.dict_size}"
            )
        checkpoints.check_resume_partition(checkpoint, model.partition)
        self.cc.load_state_dict(slice_state(weights, model.first, model.end))
        self.cc.check_partition_rows(checkpoint)
        opt.load_state_dict(slice_optimizer_state(state["optimizer"], model.first, model.end))
        tokens_since_fired.copy_(state["tokens_since_fired"][model.first : model.end].to(tokens_since_fired.device))

    def input_statistics(self, source: BatchSource, first_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of the whole data (an iterable's: of the whole first global batch)."""
        stats = statistics(_underlying(source))
        if stats is None:  # an iterable: the whole first global batch, as one process would see it
            first = self.global_rows(first_batch).double()
            stats = (first.mean(0), first.var(0, unbiased=False))
        return stats

    def global_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch, gathered from every data rank's rows."""
        return gather_rows(x, self.mesh.data_group, self.mesh.data_size)

    def reconstruction_loss(self, x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
        """This rank's rows' share of the global batch's reconstruction loss."""
        return losses.reconstruction_loss(x, recon, kind, self.total_rows)

    def count_fired(self, tokens_since_fired: torch.Tensor, codes: SparseCodes) -> None:
        """Update this shard's dead-latent counters in place with the latents fired anywhere in the global batch."""
        # A latent selected anywhere in the global batch: its flags MAX-reduced over the data group.
        fired = single.fired_latents(codes).to(torch.int32)
        all_reduce_(fired, [self.mesh.data_group], dist.ReduceOp.MAX)
        tokens_since_fired.add_(self.total_rows)
        tokens_since_fired.masked_fill_(fired.bool(), 0)

    def aux_loss(self, x: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor, k_aux: Optional[int]) -> torch.Tensor:
        """The auxiliary loss over the latents of every shard, this rank's rows' share."""
        return losses.aux_loss(self.cc, x, recon, dead, self.mesh, self.total_rows, k_aux)

    def l1_penalty(self, codes: SparseCodes, w: torch.Tensor) -> torch.Tensor:
        """The L1 penalty summed over the shards, this rank's rows' share."""
        return losses.l1_penalty(codes, w, self.mesh, self.total_rows)

    def loss_values(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        """(the global batch's loss, {term: value}), from one all-reduce over the data group."""
        # The global batch's values, one all-reduce (and the step's one host sync).
        values = all_reduce_(
            torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()]), [self.mesh.data_group]
        ).tolist()
        return values[0], dict(zip(terms, values[1:]))

    def backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Backpropagate, then sum the gradients over the data replicas."""
        loss.backward()
        for p in self.cc.parameters():
            if p.grad is None:  # every rank must join every all-reduce
                p.grad = torch.zeros_like(p)
            if self.mesh.data_size > 1:
                all_reduce_(p.grad, [self.mesh.data_group])

    def clip(self, params: Iterable[torch.nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
        """The whole crosscoder's global gradient norm, the gradients clipped to max_norm (None: not clipped)."""
        return _clip_grad_norm(self.cc, max_norm, self.mesh)

    def record(
        self,
        x: torch.Tensor,
        out: CrossCoderOutput,
        tokens_since_fired: torch.Tensor,
        config: TrainConfig,
        **values: Any,
    ) -> dict[str, Any]:
        """The log record of cx.train, over the global batch and the whole dictionary."""
        cc, mesh, total_rows = self.cc, self.mesh, self.total_rows
        fve, fve_models = _fve(x, out.recon.detach(), mesh, total_rows)
        bands = band_counts(cc)
        counts = torch.tensor(
            [out.codes.nnz, int((tokens_since_fired >= config.dead_tokens).sum())] + list(bands.values()),
            dtype=torch.int64,
            device=x.device,
        )
        all_reduce_(counts[:1], [mesh.data_group])  # codes differ per data rank; the rest is the same on replicas
        all_reduce_(counts, [mesh.latent_group])
        counts = counts.tolist()
        grad_norm = values.pop("grad_norm")
        lr = values.pop("lr")
        return dict(
            **values,
            lr=lr,
            grad_norm=float(grad_norm),
            fve=fve,
            fve_per_model=fve_models,
            l0=counts[0] / total_rows,
            dead_fraction=counts[1] / self.model.dict_size,
            threshold=float(cc.threshold),
            delta_norm_bands=dict(zip(bands, counts[2:])),
        )

    def save(
        self,
        config: TrainConfig,
        step: int,
        opt: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        tokens_since_fired: torch.Tensor,
        source: BatchSource,
    ) -> str:
        """Write step `step`'s sharded checkpoint (a collective over the mesh) and return its directory."""
        mesh = self.mesh
        return save_sharded(
            config.checkpoint_dir,
            step,
            self.model,
            dict(optimizer=opt.state_dict(), tokens_since_fired=tokens_since_fired.cpu()),
            dict(
                step=step,
                schedule=schedule.state_dict(),
                data=source.state_dict(),
                rng=rng_state(),
                config=dataclasses.asdict(config),
                mesh=dict(latent=mesh.latent_size, data=mesh.data_size),
            ),
            config.keep_checkpoints,
        )


def train(
    model: ShardedCrossCoder,
    data: TrainData,
    config: Optional[TrainConfig] = None,
    *,
    resume: bool = False,
    until: Optional[int] = None,
    loggers: Optional[Sequence[LoggerSpec]] = None,
) -> TrainResult:
    """Train `model` (this rank's ShardedCrossCoder) in place; every rank of the mesh calls it with the same
    `data` and `config`. config.batch_size is the global batch (split over the data replicas), so the run equals
    cx.train on one process with the same config. Checkpoints are sharded (see distributed.checkpoints);
    resume=True continues from the newest one, whatever layout wrote it. Returns a TrainResult (`last` holds
    the global batch's statistics on every rank). Rank 0 writes the log: config.log's loggers, or `loggers` (as
    in cx.train)."""
    config = config or TrainConfig()
    config.validate()
    return run(ShardedRuntime(model, config), data, config, resume=resume, until=until, loggers=loggers)
