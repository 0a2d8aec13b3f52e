"""distributed.train: cx.train's recipe on a mesh of data replicas x latent shards, with the same result as one
process training on the same global batches (to float rounding).

Per step, on every rank: read this data rank's block of the global batch; forward through its ShardedCrossCoder
(exact mesh-wide batch top-k, one all-reduce of the partial reconstructions over the latent group); its rows'
share of the loss; backward (no collective for the weight gradients); sum the gradients over the data group (one
all-reduce per parameter); clip by the global norm (one scalar all-reduce over the latent group); Adam on the
local shard; dead-latent counters from the latents fired anywhere in the global batch (a MAX all-reduce of [F_r]
flags over the data group). Logging, progress and the shared checkpoint state come from global rank 0.
"""
import dataclasses
import math

import torch
import torch.distributed as dist

from ..data import as_batches, statistics
from ..layer.norms import band_counts
from ..layer.sharded import slice_optimizer_state, slice_state
from ..training import losses as single
from ..training.checkpointing import latest_checkpoint, resume_checkpoint, rng_state, set_rng_state
from ..training.config import MIXED_PRECISION, TrainConfig, TrainResult
from ..training.loop import Progress, adam, init_b_dec, lr_factor
from . import losses
from .checkpoints import read_training_state, save_sharded
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
    """train.fraction_of_variance_explained over the global batch, from all-reduced sums."""
    x, recon = x.float(), recon.float()
    sums = torch.cat([(x - recon).pow(2).sum(dim=(0, 2)), x.pow(2).sum(dim=(0, 2)), x.sum(0).flatten()])
    all_reduce_(sums, [mesh.data_group])
    M = x.shape[1]
    err, square, total = sums[:M], sums[M:2 * M], sums[2 * M:].view(M, -1)
    var = square - total.pow(2).sum(1) / total_rows
    per_model = (1 - err / var.clamp_min(1e-30)).tolist()
    return float(1 - err.sum() / var.sum().clamp_min(1e-30)), per_model


def _underlying(source):
    return getattr(source, "source", source)


def train(model, data, config=None, *, resume=False, until=None):
    """Train `model` (this rank's ShardedCrossCoder) in place; every rank of the mesh calls it with the same
    `data` and `config`. config.batch_size is the global batch (split over the data replicas), so the run equals
    cx.train on one process with the same config. Checkpoints are sharded (see distributed.checkpoints);
    resume=True continues from the newest one, whatever layout wrote it. Returns a TrainResult (`last` holds
    the global batch's statistics on every rank)."""
    config = config or TrainConfig()
    config.validate()
    if not isinstance(model, ShardedCrossCoder):
        raise ValueError(f"model must be a distributed.ShardedCrossCoder, got {type(model).__name__}")
    if config.mixed_precision == "fp16":
        raise ValueError("TrainConfig.mixed_precision = 'fp16' (dynamic loss scaling) is not supported by "
                         "distributed.train; use 'bf16', which needs no loss scaling")
    cc, mesh = model.shard, model.mesh
    device = cc.W_enc.device
    compute_dtype = MIXED_PRECISION[config.mixed_precision]
    if compute_dtype is not None and cc.W_enc.dtype != torch.float32:
        raise ValueError(f"TrainConfig.mixed_precision = {config.mixed_precision!r} keeps fp32 master weights: the "
                         f"crosscoder must be float32, got {cc.W_enc.dtype}")
    if config.batch_size % mesh.data_size:
        raise ValueError(f"TrainConfig.batch_size = {config.batch_size} must be divisible by the data-parallel size "
                         f"{mesh.data_size}")
    total_rows = config.batch_size
    source = shard_source(as_batches(data, config.batch_size, seed=config.seed, device=device), mesh.data_rank,
                          mesh.data_size)
    params = list(cc.parameters())
    opt = adam(params, lr=config.learning_rate(model.dict_size), betas=tuple(config.betas))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config))
    tokens_since_fired = torch.zeros(cc.dict_size, dtype=torch.int64, device=device)
    step = 0
    checkpoint = resume_checkpoint(config, resume)
    if checkpoint:
        weights, state = read_training_state(checkpoint)
        if weights["W_enc"].shape[0] != model.dict_size:
            raise ValueError(f"{checkpoint}: a crosscoder of {weights['W_enc'].shape[0]} latents, the model has "
                             f"{model.dict_size}")
        cc.load_state_dict(slice_state(weights, model.first, model.end))
        opt.load_state_dict(slice_optimizer_state(state["optimizer"], model.first, model.end))
        schedule.load_state_dict(state["schedule"])
        tokens_since_fired.copy_(state["tokens_since_fired"][model.first:model.end].to(device))
        source.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step = state["step"]
    progress = Progress(config, step, enabled=dist.get_rank() == 0)
    last = {}
    stop = config.steps if until is None else min(int(until), config.steps)
    previous_compute_dtype = cc.compute_dtype
    try:
        model.train()
        cc.compute_dtype = compute_dtype
        while step < stop:
            x = source.next()
            if step == 0 and cc.target_rms is not None and config.fit_normalization:
                stats = statistics(_underlying(source))
                if stats is None:  # an iterable: the whole first global batch, as one process would see it
                    first = gather_rows(x, mesh.data_group, mesh.data_size).double()
                    stats = (first.mean(0), first.var(0, unbiased=False))
                cc.set_input_normalization(*stats)
            x = cc.normalize(x.float()).to(cc.input_dtype) if cc.target_rms is not None else x.to(cc.input_dtype)
            if step == 0:
                init_b_dec(cc, gather_rows(x, mesh.data_group, mesh.data_size), config)
            out = model(x, normalized=True)
            recon_loss = losses.reconstruction_loss(x, out.recon, config.reconstruction, total_rows)
            terms = dict(reconstruction=recon_loss)
            # Counted with this batch first (the paper's order): a latent selected anywhere in it is never dead.
            fired = single.fired_latents(out.codes).to(torch.int32)
            all_reduce_(fired, [mesh.data_group], dist.ReduceOp.MAX)
            tokens_since_fired.add_(total_rows)
            tokens_since_fired.masked_fill_(fired.bool(), 0)
            if cc.activation == "batch_topk":
                dead = tokens_since_fired >= config.dead_tokens
                terms["aux"] = losses.aux_loss(cc, x, out.recon, dead, mesh, total_rows, config.k_aux)
                loss = recon_loss + config.aux_alpha * terms["aux"]
            else:
                terms["l1"] = losses.l1_penalty(out.codes, cc.decoder_norm_weights(), mesh, total_rows)
                loss = recon_loss + config.l1_coefficient * terms["l1"]
            # The global batch's values, one all-reduce (and the step's one host sync).
            values = all_reduce_(torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()]),
                                 [mesh.data_group]).tolist()
            loss_value, values = values[0], dict(zip(terms, values[1:]))
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"non-finite loss at step {step + 1}: {values}; the weights were not updated"
                    + (f"; the last good checkpoint is {latest_checkpoint(config.checkpoint_dir)}"
                       if config.checkpoint_dir else ""))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in params:
                if p.grad is None:  # every rank must join every all-reduce
                    p.grad = torch.zeros_like(p)
                if mesh.data_size > 1:
                    all_reduce_(p.grad, [mesh.data_group])
            grad_norm = _clip_grad_norm(cc, config.grad_clip, mesh)
            lr_used = opt.param_groups[0]["lr"]
            opt.step()
            schedule.step()
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                last = _record(model, x, out, tokens_since_fired, config, total_rows, step, loss_value, values,
                               lr_used, grad_norm)
                progress.record(last)
            progress.tick()
            if config.checkpoint_dir and (step == stop or
                                          (config.checkpoint_every and step % config.checkpoint_every == 0)):
                checkpoint = save_sharded(
                    config.checkpoint_dir, step, model,
                    dict(optimizer=opt.state_dict(), tokens_since_fired=tokens_since_fired.cpu()),
                    dict(step=step, schedule=schedule.state_dict(), data=source.state_dict(), rng=rng_state(),
                         config=dataclasses.asdict(config), mesh=dict(latent=mesh.latent_size, data=mesh.data_size)),
                    config.keep_checkpoints)
    finally:
        cc.compute_dtype = previous_compute_dtype
        if hasattr(source, "close"):
            source.close()
        progress.close()
    return TrainResult(steps=step, last=last, checkpoint=checkpoint)


def _record(model, x, out, tokens_since_fired, config, total_rows, step, loss_value, values, lr_used, grad_norm):
    """The log record of cx.train, over the global batch and the whole dictionary."""
    cc, mesh = model.shard, model.mesh
    fve, fve_models = _fve(x, out.recon.detach(), mesh, total_rows)
    bands = band_counts(cc)
    counts = torch.tensor([out.codes.nnz, int((tokens_since_fired >= config.dead_tokens).sum())] + list(bands.values()),
                          dtype=torch.int64, device=x.device)
    all_reduce_(counts[:1], [mesh.data_group])  # codes differ per data rank; the rest is the same on replicas
    all_reduce_(counts, [mesh.latent_group])
    counts = counts.tolist()
    return dict(step=step, loss=loss_value, **values, lr=lr_used, grad_norm=float(grad_norm), fve=fve,
                fve_per_model=fve_models, l0=counts[0] / total_rows, dead_fraction=counts[1] / model.dict_size,
                threshold=float(cc.threshold), delta_norm_bands=dict(zip(bands, counts[2:])))
