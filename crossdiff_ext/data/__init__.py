"""Activations for training and analysis: the store format (store.py), batch sources with exact positions
(batches.py) and collection from Hugging Face models (activations.py)."""

from .batches import IterableBatches, MixedBatches, TensorBatches, as_batches, statistics
from .store import ActivationStore, StoreBatches, StoreWriter

__all__ = [
    "ActivationStore",
    "StoreBatches",
    "StoreWriter",
    "IterableBatches",
    "MixedBatches",
    "TensorBatches",
    "as_batches",
    "statistics",
]
