"""`cx.train(crosscoder, data, cx.TrainConfig(...))`: docs/math.md's training recipe with checkpoints that resume
exactly. The step loop (run) is also distributed.train's: a Runtime says what differs between process layouts.

Per step: forward in training mode (BatchTopK selection; the crosscoder tracks its inference threshold), the
reconstruction loss (unsquared L2 by default), plus alpha_aux * the auxiliary loss of the dead latents
(BatchTopK) or mu * the decoder-norm-weighted L1 penalty (ReLU), backward, gradient clipping, Adam with linear
warm-up and optional linear decay, dead-latent counters. A non-finite loss stops training with an error before
the optimizer touches the weights, and the last checkpoint stays as it was.

Checkpoints (every `checkpoint_every` steps and at the end, when `checkpoint_dir` is set) are directories
step-NNNNNNNN/ holding the model (model.safetensors + config.json, loadable with CrossCoder.from_pretrained) and
trainer.pt (optimizer, schedule, step, dead counters, data position, RNG states, config), written to a temporary
directory and renamed into place, so a checkpoint directory either exists whole or not at all. `resume=True`
continues from the newest one: N steps straight and N/2 + resume + N/2 give identical weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from ..data import ActivationStore, as_batches, statistics
from ..data.batches import BatchSource
from ..errors import InputError
from ..layer import CrossCoder, CrossCoderOutput, SparseCodes, checkpoints
from ..layer.norms import band_counts
from . import losses
from .checkpoints import latest_checkpoint, resume_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import MIXED_PRECISION, TrainConfig, TrainResult
from .loggers import LoggerSpec, TrainingLogger, make_loggers

TrainData = Union[torch.Tensor, ActivationStore, BatchSource, Iterable[torch.Tensor]]


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """The lr schedule's multiplier as a function of the optimizer steps taken: linear warm-up over warmup_steps,
    then linear decay to 0 from decay_start * steps (when set)."""
    decay_from = None if config.decay_start is None else int(config.decay_start * config.steps)

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        f = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        if decay_from is not None and step >= decay_from:
            f *= max(0.0, (config.steps - step) / max(1, config.steps - decay_from))
        return f

    return factor


class Progress:
    """A run's loggers (training/loggers.py: the JSONL log by default) and tqdm bar; both off when enabled is False
    (ranks other than 0)."""

    def __init__(self, config: TrainConfig, initial: int, loggers: Sequence[TrainingLogger], enabled: bool = True):
        self.loggers: list[TrainingLogger] = []
        self.bar = None
        if enabled:
            try:
                for logger in loggers:
                    logger.open(config, initial)
                    self.loggers.append(logger)
            except BaseException:
                self.close()  # the ones already opened
                raise
        if enabled and config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.steps, initial=initial, desc="train", dynamic_ncols=True)

    def record(self, last: dict[str, Any]) -> None:
        """Hand a log record to every logger and show its loss, FVE, L0 and dead fraction on the bar."""
        for logger in self.loggers:
            logger.log(last)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{last['loss']:.4g}",
                fve=f"{last['fve']:.3f}",
                l0=f"{last['l0']:.1f}",
                dead=f"{last['dead_fraction']:.2%}",
            )

    def tick(self) -> None:
        """Advance the bar by one step."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar and the loggers."""
        if self.bar is not None:
            self.bar.close()
        for logger in self.loggers:
            logger.close()


def init_b_dec(cc: CrossCoder, x: torch.Tensor, config: TrainConfig) -> None:
    """Initialise cc.b_dec in place from the first batch x [B, M, d] as config.init_b_dec says (geometric median
    per model, or zero)."""
    mode = config.init_b_dec
    if mode == "auto":
        mode = "geometric_median" if cc.activation == "batch_topk" else "zero"
    with torch.no_grad():
        if mode == "zero":
            cc.b_dec.zero_()
        else:
            for m in range(cc.n_models):
                cc.b_dec[m].copy_(losses.geometric_median(x[:, m]).to(cc.b_dec.dtype))


def adam(params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Adam:
    """torch.optim.Adam, fused where this torch and device support it (one kernel per step), foreach otherwise."""
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


def fraction_of_variance_explained(x: torch.Tensor, recon: torch.Tensor) -> tuple[float, list[float]]:
    """(overall, [per model]) FVE = 1 - sum ||x - xhat||^2 / sum ||x - mean x||^2 over the batch."""
    x, recon = x.float(), recon.float()
    err = (x - recon).pow(2).sum(dim=(0, 2))
    var = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    per_model = (1 - err / var.clamp_min(1e-30)).tolist()
    return float(1 - err.sum() / var.sum().clamp_min(1e-30)), per_model


class Runtime:
    """What the step loop asks of the process layout it runs in: one process here; distributed.train's
    ShardedRuntime overrides these methods for a mesh of latent shards x data replicas (selection over the
    shards inside the model, gradient all-reduce over the replicas, global-norm clipping, dead latents fired
    anywhere, statistics over the mesh, sharded checkpoints). Only one process scales fp16 losses."""

    main = True  # this process writes the log and shows progress

    def __init__(self, crosscoder: CrossCoder, config: TrainConfig):
        if not isinstance(crosscoder, CrossCoder):
            raise InputError(f"crosscoder must be a crossdiff_ext.CrossCoder, got {type(crosscoder).__name__}")
        self.model = self.cc = crosscoder  # the module called in the loop; the CrossCoder holding the parameters
        self.dict_size = crosscoder.dict_size
        self.check(config)
        device = self.cc.W_enc.device
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
        self.scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None

    def check(self, config: TrainConfig) -> None:
        """Refuse a config this layout cannot run (mixed precision needs fp32 master weights)."""
        if MIXED_PRECISION[config.mixed_precision] is not None and self.cc.W_enc.dtype != torch.float32:
            raise InputError(
                f"TrainConfig.mixed_precision = {config.mixed_precision!r} keeps fp32 master weights: "
                f"the crosscoder must be float32, got {self.cc.W_enc.dtype}"
            )

    def batches(self, source: BatchSource) -> BatchSource:
        """The batches this process reads of the global batch source."""
        return source

    def load(
        self,
        checkpoint: str,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        opt: torch.optim.Optimizer,
        tokens_since_fired: torch.Tensor,
    ) -> None:
        """This process's part of a whole crosscoder's training state (any layout wrote it)."""
        checkpoints.check_state(weights, self.cc.state_dict(), f"cannot resume from {checkpoint}")
        checkpoints.check_resume_partition(checkpoint, self.cc.partition)
        self.cc.load_state_dict(weights)
        self.cc.check_partition_rows(checkpoint)
        opt.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            if "scaler" not in state:
                raise InputError(f"{checkpoint}: was not trained with mixed_precision='fp16' (no loss-scaler state)")
            self.scaler.load_state_dict(state["scaler"])
        tokens_since_fired.copy_(state["tokens_since_fired"].to(tokens_since_fired.device))

    def input_statistics(self, source: BatchSource, first_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of the data for the input normaliser, fitted at step 0."""
        stats = statistics(source)
        if stats is None:  # an iterable: its first batch is all that can be seen without consuming it
            stats = (first_batch.double().mean(0), first_batch.double().var(0, unbiased=False))
        return stats

    def global_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The whole global batch (b_dec's step-0 initialisation sees what one process would)."""
        return x

    def reconstruction_loss(self, x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
        """The reconstruction loss of the global batch (losses.reconstruction_loss)."""
        return losses.reconstruction_loss(x, recon, kind)

    def count_fired(self, tokens_since_fired: torch.Tensor, codes: SparseCodes) -> None:
        """Update the dead-latent counters in place with this batch's codes."""
        losses.update_dead_counters(tokens_since_fired, codes)

    def aux_loss(self, x: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor, k_aux: Optional[int]) -> torch.Tensor:
        """The auxiliary loss of the dead latents (losses.aux_loss)."""
        return losses.aux_loss(self.cc, x, recon, dead, k_aux)

    def l1_penalty(self, codes: SparseCodes, w: torch.Tensor) -> torch.Tensor:
        """The L1 crosscoder's decoder-norm-weighted sparsity penalty (losses.l1_penalty)."""
        return losses.l1_penalty(codes, w)

    def loss_values(
        self, loss: torch.Tensor, terms: dict[str, torch.Tensor]
    ) -> tuple[float, Optional[dict[str, float]]]:
        """(loss as a float, {term: float} or None to read the terms only when they are logged)."""
        return float(loss.detach()), None  # the step's one host sync

    def backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Backpropagate the loss (scaled, then unscaled before clipping, under fp16)."""
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)  # clip the true gradients; the scaler skips a step whose gradients overflowed

    def clip(self, params: Iterable[torch.nn.Parameter], max_norm: Optional[float]) -> Optional[torch.Tensor]:
        """The gradients' global norm (None when not clipping), clipped to max_norm."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm is not None else None

    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        """Step the optimizer (through the loss scaler under fp16)."""
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()

    def record(
        self,
        x: torch.Tensor,
        out: CrossCoderOutput,
        tokens_since_fired: torch.Tensor,
        config: TrainConfig,
        **values: Any,
    ) -> dict[str, Any]:
        """The log record of a step: `values` (step, loss, the loss terms, lr, grad_norm) plus batch statistics."""
        fve, fve_models = fraction_of_variance_explained(x, out.recon.detach())
        grad_norm = values.pop("grad_norm")
        lr = values.pop("lr")
        return dict(
            **values,
            lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            fve=fve,
            fve_per_model=fve_models,
            l0=out.codes.nnz / x.shape[0],
            dead_fraction=float((tokens_since_fired >= config.dead_tokens).float().mean()),
            threshold=float(self.cc.threshold),
            delta_norm_bands=band_counts(self.cc),
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
        """Write step `step`'s checkpoint (the model and trainer.pt) and return its directory."""
        return save_checkpoint(
            config.checkpoint_dir,
            step,
            self.cc,
            dict(
                step=step,
                optimizer=opt.state_dict(),
                schedule=schedule.state_dict(),
                tokens_since_fired=tokens_since_fired.cpu(),
                data=source.state_dict(),
                rng=rng_state(),
                config=dataclasses.asdict(config),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            ),
            config.keep_checkpoints,
        )


def run(
    runtime: Runtime,
    data: TrainData,
    config: TrainConfig,
    *,
    resume: bool = False,
    until: Optional[int] = None,
    loggers: Optional[Sequence[LoggerSpec]] = None,
) -> TrainResult:
    """The step loop of both trainers (see the module docstring), in `runtime`'s process layout; `loggers`
    (names or TrainingLogger objects) replace config.log's."""
    made_loggers = make_loggers(config, loggers)  # checked on every process, so all refuse a bad one together
    cc = runtime.cc
    device = cc.W_enc.device
    compute_dtype = MIXED_PRECISION[config.mixed_precision]
    source = runtime.batches(as_batches(data, config.batch_size, seed=config.seed, device=device))
    params = list(cc.parameters())
    opt = adam(params, lr=config.learning_rate(runtime.dict_size), betas=tuple(config.betas))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config))
    tokens_since_fired = torch.zeros(cc.dict_size, dtype=torch.int64, device=device)
    step = 0
    checkpoint = resume_checkpoint(config, resume)
    if checkpoint:
        # Any layout: a sharded run's checkpoint is merged into the whole crosscoder's state. RNG states stay CPU
        # byte tensors; load_state_dict casts the rest to the parameters' device and dtype.
        weights, state = checkpoints.read_training_state(CrossCoder, checkpoint, trust_pickle=config.trust_checkpoint)
        runtime.load(checkpoint, weights, state, opt, tokens_since_fired)
        schedule.load_state_dict(state["schedule"])
        source.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step = state["step"]
    last = {}
    stop = config.steps if until is None else min(int(until), config.steps)
    previous_compute_dtype = cc.compute_dtype
    progress = None
    try:
        progress = Progress(config, step, made_loggers, enabled=runtime.main)
        runtime.model.train()
        cc.compute_dtype = compute_dtype
        while step < stop:
            x = source.next()
            if step == 0 and cc.target_rms is not None and config.fit_normalization:
                cc.set_input_normalization(*runtime.input_statistics(source, x))
            # The loss lives in the normalised space: that is what balances the models' scales.
            x = cc.normalize(x.float()).to(cc.input_dtype) if cc.target_rms is not None else x.to(cc.input_dtype)
            if step == 0:
                init_b_dec(cc, runtime.global_rows(x), config)
            out = runtime.model(x, normalized=True)
            recon_loss = runtime.reconstruction_loss(x, out.recon, config.reconstruction)
            terms = dict(reconstruction=recon_loss)
            # Counted with this batch first (the paper's order): a latent selected now is never dead.
            runtime.count_fired(tokens_since_fired, out.codes)
            if cc.activation == "batch_topk":
                dead = tokens_since_fired >= config.dead_tokens
                terms["aux"] = runtime.aux_loss(x, out.recon, dead, config.k_aux)
                loss = recon_loss + config.aux_alpha * terms["aux"]
            else:
                terms["l1"] = runtime.l1_penalty(out.codes, losses.decoder_norms(cc))
                loss = recon_loss + config.l1_coefficient * terms["l1"]
            loss_value, values = runtime.loss_values(loss, terms)
            if not math.isfinite(loss_value):
                values = values if values is not None else {name: float(t.detach()) for name, t in terms.items()}
                raise FloatingPointError(
                    f"non-finite loss at step {step + 1}: {values}; the weights were not updated"
                    + (
                        f"; the last good checkpoint is {latest_checkpoint(config.checkpoint_dir)}"
                        if config.checkpoint_dir
                        else ""
                    )
                )
            opt.zero_grad(set_to_none=True)
            runtime.backward(loss, opt)
            grad_norm = runtime.clip(params, config.grad_clip)
            lr_used = opt.param_groups[0]["lr"]
            runtime.optimizer_step(opt)
            schedule.step()
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                values = values if values is not None else {name: float(t.detach()) for name, t in terms.items()}
                last = runtime.record(
                    x,
                    out,
                    tokens_since_fired,
                    config,
                    step=step,
                    loss=loss_value,
                    **values,
                    lr=lr_used,
                    grad_norm=grad_norm,
                )
                progress.record(last)
            progress.tick()
            if config.checkpoint_dir and (
                step == stop or (config.checkpoint_every and step % config.checkpoint_every == 0)
            ):
                checkpoint = runtime.save(config, step, opt, schedule, tokens_since_fired, source)
    finally:
        cc.compute_dtype = previous_compute_dtype
        if hasattr(source, "close"):
            source.close()  # stops a store's prefetch thread
        if progress is not None:
            progress.close()
    return TrainResult(steps=step, last=last, checkpoint=checkpoint)


def train(
    crosscoder: CrossCoder,
    data: TrainData,
    config: Optional[TrainConfig] = None,
    *,
    resume: bool = False,
    until: Optional[int] = None,
    loggers: Optional[Union[LoggerSpec, Sequence[LoggerSpec]]] = None,
) -> TrainResult:
    """Train `crosscoder` in place on `data` for config.steps steps (docs/math.md's recipe; see the module docstring).

    Args:
        crosscoder: The CrossCoder to train; its parameters are updated in place.
        data: A tensor [N, M, d], an activation store, a batch source (next/state_dict/load_state_dict) or an
            iterable of [B, M, d] batches.
        config: The run's settings (None: TrainConfig()); config.steps is the schedule's length.
        resume: Continue from the newest checkpoint under config.checkpoint_dir (N steps straight and N/2 +
            resume + N/2 give identical weights).
        until: Stop this call after that step (a checkpoint is written there when checkpoint_dir is set), e.g. to
            train in sessions; None: run to config.steps.
        loggers: Where the log records go, replacing config.log: a name ("jsonl", "tensorboard", "wandb"), a
            TrainingLogger (e.g. TensorBoardLogger(log_dir) or WandbLogger(project=...)), or a list of them.

    Returns:
        A TrainResult: the steps taken, the last log record and the newest checkpoint.

    Raises:
        InputError: A setting of config is invalid, crosscoder is not a CrossCoder, the config does not fit it
            (e.g. mixed precision on a non-fp32 crosscoder), or a logger is unknown or its package missing.
        MissingInputError: resume=True but checkpoint_dir holds no checkpoint.
        OutputExistsError: resume=False but checkpoint_dir already holds checkpoints.
        FloatingPointError: A step's loss was not finite (the weights were not updated).
    """
    config = config or TrainConfig()
    config.validate()
    return run(Runtime(crosscoder, config), data, config, resume=resume, until=until, loggers=loggers)
