"""Reading a crosscoder: decoder norms and latent classes (analysis.py), Latent Scaling, max-activating examples
and the HTML report."""

from .analysis import (
    classify_latents,
    decoder_cosine,
    delta_norm,
    encoder_cosine,
    encoder_delta_norm,
    latent_table,
    write_table,
)
from .latent_scaling import LatentScalingResult, latent_scaling

__all__ = [
    "classify_latents",
    "decoder_cosine",
    "delta_norm",
    "encoder_cosine",
    "encoder_delta_norm",
    "latent_table",
    "write_table",
    "LatentScalingResult",
    "latent_scaling",
]
