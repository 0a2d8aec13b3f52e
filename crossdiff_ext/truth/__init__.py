"""Ground truth for diffing methods: planted dictionaries (planted.py), matching learned latents to planted
concepts (matching.py) and recovery scoring (recovery.py), the check a researcher runs before trusting a method on
real models; model organisms, fine-tunes with a known implanted behaviour (organisms.py, their template data in
organism_text.py), and a grader of any instrument's readouts against an organism's truth (grading.py), with a
crosscoder's latent readouts in its terms (readouts.py)."""

from .grading import (
    CausalGrade,
    InstrumentGrade,
    LatentGrade,
    LatentReadout,
    TokenGrade,
    grade_causal,
    grade_instrument,
    grade_latents,
    grade_patch_result,
    grade_tokens,
    keyword_hit,
    truth_keywords,
)
from .matching import assign_latents_to_concepts, match_by_decoder_cosine
from .organisms import KINDS as ORGANISM_KINDS
from .organisms import (
    STRENGTHS,
    Organism,
    OrganismRecipe,
    build_organism,
    implant_logprob,
    load_organism,
    organism_data,
)
from .planted import ARTIFACT_KINDS, KINDS, PlantedDictionary, planted_dictionary
from .readouts import crosscoder_readouts, fine_tune_leaning_latents, fired_latents
from .recovery import EXPECTED_BAND, RecoveryScore, recovery_by_kind, score_recovery

__all__ = [
    "ARTIFACT_KINDS",
    "CausalGrade",
    "EXPECTED_BAND",
    "InstrumentGrade",
    "KINDS",
    "LatentGrade",
    "LatentReadout",
    "ORGANISM_KINDS",
    "Organism",
    "OrganismRecipe",
    "PlantedDictionary",
    "RecoveryScore",
    "STRENGTHS",
    "TokenGrade",
    "assign_latents_to_concepts",
    "build_organism",
    "crosscoder_readouts",
    "fine_tune_leaning_latents",
    "fired_latents",
    "grade_causal",
    "grade_instrument",
    "grade_latents",
    "grade_patch_result",
    "grade_tokens",
    "implant_logprob",
    "keyword_hit",
    "load_organism",
    "match_by_decoder_cosine",
    "organism_data",
    "planted_dictionary",
    "recovery_by_kind",
    "score_recovery",
    "truth_keywords",
]
