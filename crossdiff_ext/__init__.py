"""crossdiff_ext: fast crosscoders for model diffing (Minder et al. 2025).

Importing the package loads the C++ extension (crossdiff_ext._C), which registers the crossdiff ops.
"""

from . import ops
from .backends import available as available_backends
from .backends import backend, get_backend, set_backend
from .data import ActivationStore, MixedBatches, OnlineActivations, StoreWriter
from .data.activations import collect
from .diffing import (
    ADLResult,
    LatentScalingResult,
    LogitDiffResult,
    ablate,
    adl,
    causal,
    classify_latents,
    decoder_cosine,
    delta_norm,
    encoder_cosine,
    encoder_delta_norm,
    latent_scaling,
    latent_table,
    logit_diff,
    steer,
    write_table,
)
from .diffing.causal import attribution, patch_kl
from .errors import InputError, MissingInputError, OutputExistsError
from .layer import CrossCoder, CrossCoderOutput, SparseCodes, load_dictionary_learning, to_dictionary_learning
from .layer.hub import CardFacts
from .training import TrainConfig, TrainResult, train
from .training.loggers import JsonlLogger, TensorBoardLogger, TrainingLogger, WandbLogger, read_log
from .truth import (
    LatentReadout,
    Organism,
    PlantedDictionary,
    RecoveryScore,
    build_organism,
    crosscoder_readouts,
    fine_tune_leaning_latents,
    grade_causal,
    grade_instrument,
    grade_latents,
    grade_tokens,
    load_organism,
    planted_dictionary,
    score_recovery,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "backend",
    "get_backend",
    "set_backend",
    "ops",
    "SparseCodes",
    "CrossCoder",
    "CrossCoderOutput",
    "CardFacts",
    "load_dictionary_learning",
    "to_dictionary_learning",
    "decoder_cosine",
    "delta_norm",
    "encoder_cosine",
    "encoder_delta_norm",
    "classify_latents",
    "latent_table",
    "write_table",
    "latent_scaling",
    "LatentScalingResult",
    "causal",
    "patch_kl",
    "attribution",
    "steer",
    "ablate",
    "adl",
    "ADLResult",
    "logit_diff",
    "LogitDiffResult",
    "planted_dictionary",
    "PlantedDictionary",
    "score_recovery",
    "RecoveryScore",
    "build_organism",
    "load_organism",
    "Organism",
    "grade_tokens",
    "grade_latents",
    "grade_causal",
    "grade_instrument",
    "LatentReadout",
    "crosscoder_readouts",
    "fine_tune_leaning_latents",
    "TrainConfig",
    "TrainResult",
    "train",
    "TrainingLogger",
    "JsonlLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "read_log",
    "collect",
    "OnlineActivations",
    "StoreWriter",
    "MixedBatches",
    "ActivationStore",
    "InputError",
    "MissingInputError",
    "OutputExistsError",
]
