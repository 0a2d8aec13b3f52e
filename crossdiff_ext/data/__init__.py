"""Activations for training and analysis: the store format (store.py), batch sources with exact positions
(batches.py), document sources and mixtures (corpus.py), collection from Hugging Face models (activations.py) and
online harvesting into a shuffle buffer (online.py)."""

from .batches import IterableBatches, MixedBatches, TensorBatches, as_batches, statistics
from .corpus import Corpus, DatasetSource, FileSource, IterableSource, open_corpus
from .online import OnlineActivations
from .store import ActivationStore, StoreBatches, StoreWriter

__all__ = [
    "Corpus",
    "DatasetSource",
    "FileSource",
    "IterableSource",
    "open_corpus",
    "ActivationStore",
    "OnlineActivations",
    "StoreBatches",
    "StoreWriter",
    "IterableBatches",
    "MixedBatches",
    "TensorBatches",
    "as_batches",
    "statistics",
]
