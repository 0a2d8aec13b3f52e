"""crossdiff_ext: fast crosscoders for model diffing (Minder et al. 2025).

Importing the package loads the C++ extension (crossdiff_ext._C), which registers the crossdiff ops.
"""
from .backends import available as available_backends
from .backends import backend, get_backend, set_backend
from . import ops
from .codes import SparseCodes
from .crosscoder import CrossCoder, CrossCoderOutput
from .checkpoints import load_dictionary_learning, to_dictionary_learning
from .analysis import (classify_latents, decoder_cosine, delta_norm, encoder_cosine, encoder_delta_norm,
                       latent_table, write_table)
from .latent_scaling import LatentScalingResult, latent_scaling
from .synthetic import planted_dictionary
from .train import TrainConfig, TrainResult, train
from .data import MixedBatches
from .store import ActivationStore

__version__ = "0.1.0"

__all__ = [
    "available_backends", "backend", "get_backend", "set_backend", "ops", "SparseCodes", "CrossCoder",
    "CrossCoderOutput", "load_dictionary_learning", "to_dictionary_learning", "decoder_cosine", "delta_norm",
    "encoder_cosine", "encoder_delta_norm", "classify_latents", "latent_table", "write_table", "latent_scaling",
    "LatentScalingResult",
    "planted_dictionary", "TrainConfig", "TrainResult", "train", "MixedBatches", "ActivationStore",
]
