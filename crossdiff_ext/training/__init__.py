"""Training a crosscoder: TrainConfig, the losses, checkpointing, and the step loop (loop.py) that both the
one-process trainer and distributed.train run."""

from .config import TrainConfig, TrainResult
from .loop import train

__all__ = ["TrainConfig", "TrainResult", "train"]
