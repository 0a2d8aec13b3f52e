"""TrainConfig: every setting of a training run (both trainers read it), and TrainResult.

Each field carries its own documentation and check in its dataclass metadata (`doc`, `check`): validate() runs
the checks, and the `crossdiff train` flags are generated from the same fields, so defaults, help and range
checks have one source.
"""

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import InputError
from . import losses

MIXED_PRECISION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGGER_NAMES = ("jsonl", "tensorboard", "wandb")  # the backends of training/loggers.py

# A check returns None for a good value, else what was expected (e.g. "an int >= 1"); validate() words the message.
Check = Callable[[Any], Optional[str]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(low: int, optional: bool = False) -> Check:
    """A check: an int >= low (or None when optional)."""

    def check(value: Any) -> Optional[str]:
        if (optional and value is None) or (_is_int(value) and value >= low):
            return None
        return f"an int >= {low}{' or None' if optional else ''}"

    return check


def positive(optional: bool = False) -> Check:
    """A check: a number > 0 (or None when optional)."""

    def check(value: Any) -> Optional[str]:
        if (optional and value is None) or (_is_number(value) and value > 0):
            return None
        return f"a number > 0{' or None' if optional else ''}"

    return check


def non_negative(value: Any) -> Optional[str]:
    """A check: a number >= 0."""
    return None if _is_number(value) and value >= 0 else "a number >= 0"


def fraction_or_none(value: Any) -> Optional[str]:
    """A check: a number in [0, 1), or None."""
    return None if value is None or (_is_number(value) and 0 <= value < 1) else "a number in [0, 1) or None"


def one_of(*choices: Any) -> Check:
    """A check: one of the choices."""

    def check(value: Any) -> Optional[str]:
        return None if value in choices else f"one of {list(choices)}"

    check.choices = choices  # listed in the generated flag's help
    return check


def betas_in_unit_interval(value: Any) -> Optional[str]:
    """A check: Adam's (beta1, beta2), each in [0, 1)."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1 for b in value):
        return None
    return "two numbers in [0, 1)"


def boolean(value: Any) -> Optional[str]:
    """A check: True or False."""
    return None if isinstance(value, bool) else "True or False"


def optional_path(value: Any) -> Optional[str]:
    """A check: a path (str or os.PathLike) or None."""
    return None if value is None or isinstance(value, (str, os.PathLike)) else "a path or None"


def integer(value: Any) -> Optional[str]:
    """A check: any int."""
    return None if _is_int(value) else "an int"


def names_from(*choices: str) -> Check:
    """A check: a tuple (or list) of distinct names, each one of the choices (empty: none)."""

    def check(value: Any) -> Optional[str]:
        if isinstance(value, (tuple, list)) and all(v in choices for v in value) and len(set(value)) == len(value):
            return None
        return f"names from {list(choices)}, each at most once"

    check.choices = choices  # listed in the generated flag's help
    return check


def setting(default: Any, doc: str, check: Check) -> Any:
    """A TrainConfig field: its default, its one-line documentation (the flag's help) and its check."""
    return field(default=default, metadata={"doc": doc, "check": check})


@dataclass
class TrainConfig:
    """Every setting of a training run; both trainers (train and distributed.train) read it.

    Attributes:
        steps: Optimizer steps of the run, and the length of the lr schedule (default 1000).
        batch_size: Rows (tokens) per global batch (default 2048).
        lr: Adam learning rate; None: docs/math.md's default 2e-4 / sqrt(F / 2^14) for dictionary size F.
        seed: Seed of the data order (default 0).
        betas: Adam's (beta1, beta2) (default (0.9, 0.999)).
        warmup_steps: Linear warm-up from lr / warmup_steps over this many steps (default 1000; 0: none).
        decay_start: Fraction of `steps` after which lr decays linearly to 0 (None, the default: never).
        grad_clip: Max global gradient norm (default 1.0; None: no clipping).
        reconstruction: "l2" (default, docs/math.md): mean ||x - xhat||_2; "squared": mean ||x - xhat||^2.
        aux_alpha: BatchTopK auxiliary loss weight (default 1/32).
        dead_tokens: A latent not selected for this many tokens is dead (default 10_000_000 tokens).
        k_aux: Dead latents decoded per row by the auxiliary loss; None: d_model // 2 (docs/math.md).
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
        log: Where the log records go (training/loggers.py): any of "jsonl" (the default, log_path),
            "tensorboard" (<checkpoint_dir>/tensorboard) and "wandb" (a W&B run); () for none.
        checkpoint_every: Steps between checkpoints when checkpoint_dir is set (default 1000; 0: only at the end).
        checkpoint_dir: Directory of the step-NNNNNNNN/ checkpoints (None, the default: no checkpoints).
        keep_checkpoints: Newest checkpoints kept; older ones are deleted (default 2).
        progress: Show a tqdm progress bar (default True).
        trust_checkpoint: On resume, also load a trainer state that holds Python objects beyond tensors and plain
            values (a checkpoint of a version before the trainer state was plain): its pickle can run code, so
            only for a checkpoint you trust (default False: such a file is refused, with one line naming it).
    """

    steps: int = setting(1000, "optimizer steps of the run, and the length of the lr schedule", int_at_least(1))
    batch_size: int = setting(2048, "rows (tokens) per global batch", int_at_least(1))
    lr: Optional[float] = setting(
        None, "Adam learning rate (none: docs/math.md's 2e-4 / sqrt(F / 2^14) for F latents)", positive(optional=True)
    )
    seed: int = setting(0, "seed of the data order", integer)
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam's beta1 and beta2", betas_in_unit_interval)
    warmup_steps: int = setting(
        1000, "linear lr warm-up from lr / warmup_steps over this many steps (0: none)", int_at_least(0)
    )
    decay_start: Optional[float] = setting(
        None, "fraction of the steps after which lr decays linearly to 0 (none: never)", fraction_or_none
    )
    grad_clip: Optional[float] = setting(1.0, "max global gradient norm (none: no clipping)", positive(optional=True))
    reconstruction: str = setting(
        "l2", "l2: mean ||x - xhat||_2 (docs/math.md); squared: mean ||x - xhat||^2", one_of(*losses.RECONSTRUCTIONS)
    )
    aux_alpha: float = setting(1.0 / 32, "weight of the BatchTopK auxiliary loss", non_negative)
    dead_tokens: int = setting(10_000_000, "a latent not selected for this many tokens is dead", int_at_least(0))
    k_aux: Optional[int] = setting(
        None, "dead latents decoded per row by the auxiliary loss (none: d_model // 2)", int_at_least(1, optional=True)
    )
    l1_coefficient: float = setting(0.041, "mu of the L1 crosscoder (activation relu)", non_negative)
    init_b_dec: str = setting(
        "auto",
        "auto: geometric median of the first batch for BatchTopK, zero for ReLU; or force geometric_median / zero",
        one_of("auto", "geometric_median", "zero"),
    )
    fit_normalization: bool = setting(
        True, "crosscoders with target_rms: fit the input normaliser at step 0 from the data's statistics", boolean
    )
    mixed_precision: Optional[str] = setting(
        None,
        "bf16 / fp16: fp32 master weights, compute in the narrow dtype (none: the weights' dtype)",
        one_of(*MIXED_PRECISION),
    )
    log_every: int = setting(100, "steps between log records", int_at_least(1))
    log_path: Optional[str] = setting(
        None, "JSONL log file (none: <checkpoint_dir>/log.jsonl when checkpoints are written)", optional_path
    )
    log: tuple[str, ...] = setting(
        ("jsonl",),
        "where the log records go: jsonl (log_path), tensorboard (<checkpoint_dir>/tensorboard), wandb (a W&B run)",
        names_from(*LOGGER_NAMES),
    )
    checkpoint_every: int = setting(1000, "steps between checkpoints (0: only at the end)", int_at_least(0))
    checkpoint_dir: Optional[str] = setting(
        None, "directory of the step-NNNNNNNN/ checkpoints (none: no checkpoints)", optional_path
    )
    keep_checkpoints: int = setting(2, "newest checkpoints kept; older ones are deleted", int_at_least(1))
    progress: bool = setting(True, "show a tqdm progress bar", boolean)
    trust_checkpoint: bool = setting(
        False, "on resume, unpickle an older checkpoint's trainer state (runs its code: only if you trust it)", boolean
    )

    def validate(self, names: Optional[Mapping[str, str]] = None) -> None:
        """Check every setting's type and range.

        Args:
            names: The command-line flag of each field, by field name: a bad value's message then reads
                "<flag>: expected <what>, got <value>"; without one, "TrainConfig.<field> must be <what>, got
                <value>".

        Raises:
            InputError: A setting is out of its range or not one of its allowed values (the message names it).
        """
        names = names or {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = spec.metadata["check"](value)
            if expected is None:
                continue
            if spec.name in names:
                raise InputError(f"{names[spec.name]}: expected {expected}, got {value!r}")
            raise InputError(f"TrainConfig.{spec.name} must be {expected}, got {value!r}")

    def learning_rate(self, dict_size: int) -> float:
        """The run's peak learning rate: `lr`, or docs/math.md's default 2e-4 / sqrt(F / 2^14) when lr is None.

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
