"""TrainConfig: every setting of a training run (both trainers read it), and TrainResult."""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import losses

MIXED_PRECISION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Every setting of a training run; both trainers (train and distributed.train) read it.

    Attributes:
        steps: Optimizer steps of the run, and the length of the lr schedule (default 1000).
        batch_size: Rows (tokens) per global batch (default 2048).
        lr: Adam learning rate; None: SPEC's default 2e-4 / sqrt(F / 2^14) for dictionary size F.
        seed: Seed of the data order (default 0).
        betas: Adam's (beta1, beta2) (default (0.9, 0.999)).
        warmup_steps: Linear warm-up from lr / warmup_steps over this many steps (default 1000; 0: none).
        decay_start: Fraction of `steps` after which lr decays linearly to 0 (None, the default: never).
        grad_clip: Max global gradient norm (default 1.0; None: no clipping).
        reconstruction: "l2" (default, SPEC): mean ||x - xhat||_2; "squared": mean ||x - xhat||^2.
        aux_alpha: BatchTopK auxiliary loss weight (default 1/32).
        dead_tokens: A latent not selected for this many tokens is dead (default 10_000_000 tokens).
        k_aux: Dead latents decoded per row by the auxiliary loss; None: d_model // 2 (SPEC).
        l1_coefficient: mu of the L1 crosscoder (activation "relu") (default 0.041).
        init_b_dec: "auto" (default): geometric median of the first batch for BatchTopK, zero for ReLU;
            "geometric_median" or "zero" force one.
        fit_normalization: Crosscoders built with target_rms: fit the input normaliser at step 0 from the whole
            data's statistics (stores: their running mean/variance; tensors: exact; mixtures: by proportion;
            iterables: the first batch). False keeps the statistics already set on the crosscoder (default True).
        mixed_precision: None (default): compute in the parameters' dtype. "bf16" / "fp16": fp32 master weights
            (the crosscoder must be fp32), forward and backward in the narrow dtype; "fp16" adds dynamic loss
            scaling (torch.amp.GradScaler).
        log_every: Steps between log records (default 100).
        log_path: JSONL log file; None (default): <checkpoint_dir>/log.jsonl when checkpoint_dir is set.
        checkpoint_every: Steps between checkpoints (default 0: only at the end).
        checkpoint_dir: Directory of the step-NNNNNNNN/ checkpoints (None, the default: no checkpoints).
        keep_checkpoints: Newest checkpoints kept; older ones are deleted (default 2).
        progress: Show a tqdm progress bar (default True).
    """

    steps: int = 1000
    batch_size: int = 2048
    lr: Optional[float] = None  # None: SPEC's default 2e-4 / sqrt(F / 2^14)
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000  # linear warm-up from lr / warmup_steps
    decay_start: Optional[float] = None  # fraction of `steps` after which lr decays linearly to 0 (None: never)
    grad_clip: Optional[float] = 1.0  # max global gradient norm (None: no clipping)
    reconstruction: str = "l2"  # "l2": mean ||x - xhat||_2 (SPEC default); "squared": mean ||x - xhat||^2
    aux_alpha: float = 1.0 / 32  # BatchTopK auxiliary loss weight
    dead_tokens: int = 10_000_000  # a latent not selected for this many tokens is dead
    k_aux: Optional[int] = None  # None: d_model // 2 (SPEC)
    l1_coefficient: float = 0.041  # mu of the L1 crosscoder (activation "relu")
    init_b_dec: str = "auto"  # "auto": geometric median of the first batch for BatchTopK, zero for ReLU
    # Crosscoders built with target_rms: fit the input normaliser at step 0 from the whole data's statistics
    # (stores: their running mean/variance; tensors: exact; mixtures: by proportion; iterables: the first batch).
    # False keeps the statistics already set on the crosscoder.
    fit_normalization: bool = True
    # None: compute in the parameters' dtype. "bf16" / "fp16": fp32 master weights (the crosscoder must be fp32),
    # forward and backward in the narrow dtype; "fp16" adds dynamic loss scaling (torch.amp.GradScaler).
    mixed_precision: Optional[str] = None
    log_every: int = 100
    log_path: Optional[str] = None  # JSONL; default <checkpoint_dir>/log.jsonl when checkpoint_dir is set
    checkpoint_every: int = 0  # 0: only at the end
    checkpoint_dir: Optional[str] = None
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm progress bar

    def validate(self) -> None:
        """Check every setting's type and range.

        Raises:
            ValueError: A setting is out of its range or not one of its allowed values (the message names it).
        """
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "dead_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0 or None, got {self.lr}")
        if self.decay_start is not None and not 0.0 <= self.decay_start < 1.0:
            raise ValueError(f"TrainConfig.decay_start must be in [0, 1) or None, got {self.decay_start}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.reconstruction not in losses.RECONSTRUCTIONS:
            raise ValueError(
                f"TrainConfig.reconstruction must be one of {losses.RECONSTRUCTIONS}, got {self.reconstruction!r}"
            )
        if self.init_b_dec not in ("auto", "geometric_median", "zero"):
            raise ValueError(
                f"TrainConfig.init_b_dec must be 'auto', 'geometric_median' or 'zero', got {self.init_b_dec!r}"
            )
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or self.k_aux < 1):
            raise ValueError(f"TrainConfig.k_aux must be an int >= 1 or None, got {self.k_aux!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"TrainConfig.mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"TrainConfig.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    def learning_rate(self, dict_size: int) -> float:
        """The run's peak learning rate: `lr`, or SPEC's default 2e-4 / sqrt(F / 2^14) when lr is None.

        Args:
            dict_size: F, the crosscoder's number of latents.

        Returns:
            The learning rate before warm-up and decay.
        """
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(dict_size / 2**14)


@dataclass
class TrainResult:
    """What a training call returns.

    Attributes:
        steps: Optimizer steps taken when the call returned (the run's step count, not this call's).
        last: The last logged record (a dict of step, loss, loss terms, lr, grad_norm, fve, l0, ...); empty when
            nothing was logged.
        checkpoint: The newest checkpoint directory (None when none was written or resumed from).
    """

    steps: int
    last: dict = field(default_factory=dict)  # the last logged record
    checkpoint: Optional[str] = None  # the newest checkpoint directory
