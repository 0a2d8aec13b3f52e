"""Training a crosscoder: TrainConfig, the losses, checkpointing, the loggers (JSONL, TensorBoard, W&B), and the
step loop (loop.py) that both the one-process trainer and distributed.train run."""

from .config import TrainConfig, TrainResult
from .loggers import JsonlLogger, TensorBoardLogger, TrainingLogger, WandbLogger, read_log
from .loop import train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "TrainingLogger",
    "JsonlLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "read_log",
]
