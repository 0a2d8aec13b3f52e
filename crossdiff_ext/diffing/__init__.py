"""Reading a crosscoder: decoder norms and latent classes (analysis.py), Latent Scaling, max-activating examples,
the HTML report, causal evidence by activation patching (causal.py) and steering (steering.py); instruments that
need no crosscoder: the Activation Difference Lens (activation_difference.py) and output differences
(output_difference.py)."""

from . import causal
from .activation_difference import ADLResult, adl
from .analysis import (
    classify_latents,
    decoder_cosine,
    delta_norm,
    encoder_cosine,
    encoder_delta_norm,
    latent_partition,
    latent_table,
    write_table,
)
from .by_source import SourceFiring, firing_by_source
from .latent_scaling import LatentScalingResult, latent_scaling
from .output_difference import LogitDiffResult, logit_diff
from .steering import ablate, steer

__all__ = [
    "classify_latents",
    "decoder_cosine",
    "delta_norm",
    "encoder_cosine",
    "encoder_delta_norm",
    "latent_partition",
    "latent_table",
    "write_table",
    "LatentScalingResult",
    "latent_scaling",
    "causal",
    "steer",
    "ablate",
    "adl",
    "ADLResult",
    "logit_diff",
    "LogitDiffResult",
    "SourceFiring",
    "firing_by_source",
]
