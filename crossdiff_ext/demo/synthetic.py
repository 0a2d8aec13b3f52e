"""The demo's names for the planted dictionaries, which live in truth/ (truth.planted, truth.matching); the
command line's `planted` subcommand reads them from here."""

from ..truth.matching import match_by_decoder_cosine as match_concepts
from ..truth.planted import ARTIFACT_KINDS, KINDS, PlantedDictionary, planted_dictionary

__all__ = ["ARTIFACT_KINDS", "KINDS", "PlantedDictionary", "match_concepts", "planted_dictionary"]
