"""Where a training run's log records go: a JSONL file (the default), TensorBoard event files, Weights & Biases.

A log record is the dict the step loop builds every `log_every` steps (step, loss, its terms, lr, grad_norm, fve,
fve_per_model, l0, dead_fraction, threshold, delta_norm_bands). The JSONL log keeps it whole, one line per
record; TensorBoard and W&B receive its numbers flattened into scalars (`scalars`): fve_per_model becomes
fve_per_model/model_0, fve_per_model/model_1, ...; delta_norm_bands becomes delta_norm_bands/<band>.

Resuming from a checkpoint at step s re-runs the steps after s (those a killed run logged after its last
checkpoint). The JSONL log drops its records after s before the run goes on, and TensorBoard gets a purge marker
at s + 1 (its readers discard the older events from there), so both hold each step once. W&B continues the same
run id (kept in <checkpoint_dir>/wandb.json) and receives the re-run steps again: which of the two records of such
a step W&B shows is W&B's choice.

TensorBoard and W&B are optional extras (`pip install 'crossdiff_ext[logging]'`); they are imported when a
logger of theirs opens, and a missing package is an InputError that names the extra.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .. import atomic
from ..errors import InputError, MissingInputError
from .config import LOGGER_NAMES, TrainConfig

JSONL_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_FILE = "wandb.json"


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A log record's numbers as flat scalars, for the backends that plot scalars.

    Args:
        record: A log record (its "step" is the x axis, not a scalar).

    Returns:
        {name: value}: numbers as they are; a list as name/model_i (fve_per_model) or name/i; a dict as name/key;
        None and non-numbers left out.
    """
    out: dict[str, float] = {}
    for name, value in record.items():
        if name == "step":
            continue
        if isinstance(value, (list, tuple)):
            prefix = "model_" if name.endswith("_per_model") else ""
            items: Iterable[tuple[str, Any]] = ((f"{name}/{prefix}{i}", v) for i, v in enumerate(value))
        elif isinstance(value, Mapping):
            items = ((f"{name}/{key}", v) for key, v in value.items())
        else:
            items = ((name, value),)
        for key, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = float(v)
    return out


def parse_records(lines: Iterable[str], source: str) -> list[dict[str, Any]]:
    """The records of a JSONL log's lines, tolerating one torn last line (a kill while it was written).

    Raises:
        InputError: A line other than the last is not a JSON object with a "step".
    """
    lines = [line for line in lines if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # written up to a kill: the records before it are whole
            raise InputError(f"{source}: line {i + 1} is not JSON: {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise InputError(f"{source}: line {i + 1} is not a log record (a JSON object with an int 'step')")
        records.append(record)
    return records


def read_log(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """A run's JSONL log, one record per step in step order.

    Args:
        path: The log file (`log.jsonl` of a checkpoint directory, or TrainConfig.log_path).

    Returns:
        The records; where a step was logged twice (a log of a run resumed before resume trimmed the log), the
        later record.

    Raises:
        MissingInputError: The file does not exist.
        InputError: It is not a log (a line that is not a record).
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"{os.fspath(path)}: no such training log")
    with open(path, encoding="utf-8") as fh:
        records = parse_records(fh, os.fspath(path))
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


class TrainingLogger:
    """What the step loop asks of a log backend. Subclasses write somewhere; the loop calls open() once before
    the first step of a call to train, log() per record and close() at the end (also after an error)."""

    name = "logger"

    def check(self, config: TrainConfig) -> None:
        """Refuse, before any training, a run this logger cannot record (every process calls it).

        Args:
            config: The run's settings.
        """

    def open(self, config: TrainConfig, step: int) -> None:
        """Start (step 0) or resume (step s > 0: forget what was recorded after s) the run's log.

        Args:
            config: The run's settings (where the files go; W&B's run config).
            step: The step the run starts from.
        """

    def log(self, record: Mapping[str, Any]) -> None:
        """Record one log record.

        Args:
            record: A log record (see the module docstring).

        Raises:
            NotImplementedError: A subclass must say where records go.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the logger holds."""


def _directory(config: TrainConfig, given: Optional[str], default_name: str, what: str) -> str:
    """`given`, else <checkpoint_dir>/<default_name>, else an InputError that says how to give one."""
    if given is not None:
        return os.fspath(given)
    if config.checkpoint_dir:
        return os.path.join(config.checkpoint_dir, default_name)
    raise InputError(f"TrainConfig.log has {what!r}, which writes under checkpoint_dir: set checkpoint_dir")


class JsonlLogger(TrainingLogger):
    """One JSON line per record, appended (and flushed) as the run goes.

    Args:
        path: The log file; None: TrainConfig.log_path, else <checkpoint_dir>/log.jsonl, else no log at all (a
            run without checkpoints and without log_path has nowhere to keep one).
    """

    name = "jsonl"

    def __init__(self, path: Optional[Union[str, os.PathLike]] = None):
        self.path = None if path is None else os.fspath(path)
        self.file = None

    def open(self, config: TrainConfig, step: int) -> None:
        """Open the log for appending, after dropping its records after `step` (all of them for a fresh run).

        Args:
            config: The run's settings.
            step: The step the run starts from (0: a fresh run).
        """
        path = self.path or config.log_path
        if path is None and config.checkpoint_dir:
            path = os.path.join(config.checkpoint_dir, JSONL_NAME)
        if path is None:
            return
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._remove_torn_rewrites(path)
        self._drop_after(path, step)
        self.file = open(path, "a", encoding="utf-8")

    @staticmethod
    def _remove_torn_rewrites(path: str) -> None:
        """Delete the temporary files of a rewrite (_drop_after) that a killed run left beside the log: never read,
        and only the run that owns the log writes them."""
        directory, name = os.path.split(os.path.abspath(path))
        for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp")):
            atomic.remove(stale)

    @staticmethod
    def _drop_after(path: str, step: int) -> None:
        """Rewrite the log without its records after `step` (and a torn last line), only when it has any."""
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        lines = text.splitlines()
        kept = [json.dumps(r) for r in parse_records(lines, path) if r["step"] <= step]
        if len(kept) != len([line for line in lines if line.strip()]) or (text and not text.endswith("\n")):
            atomic.write_text(path, "".join(line + "\n" for line in kept))

    def log(self, record: Mapping[str, Any]) -> None:
        """Append the record as one JSON line and flush it.

        Args:
            record: A log record (see the module docstring).
        """
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        """Close the file."""
        if self.file is not None:
            self.file.close()
            self.file = None


def _missing(package: str, name: str) -> InputError:
    return InputError(
        f"the {name!r} logger needs the {package} package: pip install 'crossdiff_ext[logging]' (or {package})"
    )


class TensorBoardLogger(TrainingLogger):
    """TensorBoard event files (`tensorboard --logdir <checkpoint_dir>/tensorboard`), one scalar per number.

    Args:
        log_dir: The event files' directory; None: <checkpoint_dir>/tensorboard.
    """

    name = "tensorboard"

    def __init__(self, log_dir: Optional[Union[str, os.PathLike]] = None):
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.writer = None

    @staticmethod
    def writer_class() -> Any:
        """torch's SummaryWriter class.

        Returns:
            torch.utils.tensorboard.SummaryWriter.

        Raises:
            InputError: The tensorboard package is not installed.
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        return SummaryWriter

    def check(self, config: TrainConfig) -> None:
        """Refuse a run without a place for the event files, or without the tensorboard package.

        Args:
            config: The run's settings.
        """
        _directory(config, self.log_dir, TENSORBOARD_DIR, self.name)
        self.writer_class()

    def open(self, config: TrainConfig, step: int) -> None:
        """Open a writer whose purge marker at step + 1 hides what an earlier session logged after `step`.

        Args:
            config: The run's settings.
            step: The step the run starts from (0: a fresh run).
        """
        directory = _directory(config, self.log_dir, TENSORBOARD_DIR, self.name)
        self.writer = self.writer_class()(log_dir=directory, purge_step=step + 1)

    def log(self, record: Mapping[str, Any]) -> None:
        """Add each of the record's finite scalars at its step.

        Args:
            record: A log record (see the module docstring).
        """
        for name, value in scalars(record).items():
            if math.isfinite(value):
                self.writer.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLogger(TrainingLogger):
    """A Weights & Biases run (WANDB_MODE=offline keeps it on disk for `wandb sync`).

    Args:
        project: The W&B project; None: $WANDB_PROJECT, else "crossdiff".
        name: The run's display name; None: the checkpoint directory's name.
        directory: Where wandb writes its files; None: $WANDB_DIR, else the checkpoint directory.
        init_kwargs: More keyword arguments for wandb.init (entity, tags, group, ...).
    """

    name = "wandb"

    def __init__(
        self,
        project: Optional[str] = None,
        name: Optional[str] = None,
        directory: Optional[Union[str, os.PathLike]] = None,
        **init_kwargs: Any,
    ):
        self.project, self.run_name, self.init_kwargs = project, name, init_kwargs
        self.directory = None if directory is None else os.fspath(directory)
        self.run = None

    @staticmethod
    def module() -> Any:
        """The wandb package, imported.

        Returns:
            The wandb module.

        Raises:
            InputError: The wandb package is not installed.
        """
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        return wandb

    def check(self, config: TrainConfig) -> None:
        """Refuse a run without the wandb package.

        Args:
            config: The run's settings.
        """
        self.module()

    def open(self, config: TrainConfig, step: int) -> None:
        """Start the W&B run, or continue the checkpoint directory's run when resuming (step > 0).

        Args:
            config: The run's settings.
            step: The step the run starts from (0: a fresh run).
        """
        wandb = self.module()
        run_file = os.path.join(config.checkpoint_dir, WANDB_RUN_FILE) if config.checkpoint_dir else None
        run_id = None
        if step > 0 and run_file and os.path.exists(run_file):
            with open(run_file, encoding="utf-8") as fh:
                run_id = json.load(fh).get("id")
        directory = self.directory or os.environ.get("WANDB_DIR") or config.checkpoint_dir
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(
            project=self.project or os.environ.get("WANDB_PROJECT") or "crossdiff",
            name=self.run_name or (os.path.basename(os.path.abspath(config.checkpoint_dir)) if run_file else None),
            dir=directory,
            id=run_id,
            resume="allow" if run_id else None,
            config=dataclasses.asdict(config),
            **self.init_kwargs,
        )
        if run_file and run_id is None:
            os.makedirs(config.checkpoint_dir, exist_ok=True)
            atomic.write_json(run_file, dict(id=self.run.id, project=self.run.project))

    def log(self, record: Mapping[str, Any]) -> None:
        """Log the record's scalars at its step.

        Args:
            record: A log record (see the module docstring).
        """
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        """Finish the run (an offline run's files are then complete)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


BY_NAME = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}

LoggerSpec = Union[str, TrainingLogger]


def make_loggers(config: TrainConfig, loggers: Optional[Sequence[LoggerSpec]] = None) -> list[TrainingLogger]:
    """The run's loggers: `loggers` when given (names or TrainingLogger objects), else config.log's names.

    Each logger's check() runs here, before any training (an optional backend's package is installed, its files
    have a place).

    Args:
        config: The run's settings.
        loggers: Names or TrainingLogger objects; None: config.log.

    Returns:
        The loggers, not opened yet.

    Raises:
        InputError: An unknown name, an object that is not a TrainingLogger, a missing package, or no directory
            for a backend that writes under checkpoint_dir.
    """
    specs: Sequence[Any] = config.log if loggers is None else loggers
    if isinstance(specs, (str, TrainingLogger)):
        specs = [specs]
    made = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in BY_NAME:
                raise InputError(f"unknown logger {spec!r}: expected one of {list(LOGGER_NAMES)}")
            spec = BY_NAME[spec]()
        if not isinstance(spec, TrainingLogger):
            raise InputError(f"loggers: expected names or TrainingLogger objects, got {type(spec).__name__}")
        spec.check(config)
        made.append(spec)
    return made
