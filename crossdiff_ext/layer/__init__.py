"""The crosscoder layer: CrossCoder, its sparse codes, its checkpoints (ours, sharded, the paper's
dictionary_learning format; local or on the Hugging Face Hub) and its decoder-norm measures."""

from .codes import SparseCodes
from .crosscoder import CrossCoder, CrossCoderOutput
from .dictionary_learning import load_dictionary_learning, to_dictionary_learning
from .hub import CardFacts
from .sharded import is_sharded

__all__ = [
    "CardFacts",
    "CrossCoder",
    "CrossCoderOutput",
    "SparseCodes",
    "is_sharded",
    "load_dictionary_learning",
    "to_dictionary_learning",
]
