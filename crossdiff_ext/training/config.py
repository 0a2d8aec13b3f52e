"""TrainConfig: every setting of a training run (both trainers read it), and TrainResult."""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import losses

MIXED_PRECISION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 2048
    lr: Optional[float] = None  # None: SPEC's default 2e-4 / sqrt(F / 2^14)
    seed: int = 0
    betas: tuple = (0.9, 0.999)
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

    def validate(self):
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

    def learning_rate(self, dict_size):
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(dict_size / 2**14)


@dataclass
class TrainResult:
    steps: int
    last: dict = field(default_factory=dict)  # the last logged record
    checkpoint: Optional[str] = None  # the newest checkpoint directory
