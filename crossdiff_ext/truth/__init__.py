"""Ground truth for diffing methods: planted dictionaries (planted.py), matching learned latents to planted
concepts (matching.py) and recovery scoring (recovery.py), the check a researcher runs before trusting a method on
real models."""

from .matching import assign_latents_to_concepts, match_by_decoder_cosine
from .planted import ARTIFACT_KINDS, KINDS, PlantedDictionary, planted_dictionary
from .recovery import EXPECTED_BAND, RecoveryScore, recovery_by_kind, score_recovery

__all__ = [
    "ARTIFACT_KINDS",
    "EXPECTED_BAND",
    "KINDS",
    "PlantedDictionary",
    "RecoveryScore",
    "assign_latents_to_concepts",
    "match_by_decoder_cosine",
    "planted_dictionary",
    "recovery_by_kind",
    "score_recovery",
]
