"""Recovery scoring: how much of a planted dictionary a crosscoder found, and whether Delta_norm put each concept
where its kind belongs (docs/math.md, "Reading a crosscoder").

A planted concept is recovered when its best latent (match_by_decoder_cosine) has cosine > `threshold`, and in
band when it is recovered and that latent's Delta_norm lies in the band of the concept's kind (EXPECTED_BAND, the
paper's bands). "In band" is the claim a diffing method makes about a concept; "recovered" is its precondition.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch

from ..errors import InputError
from ..layer.norms import BANDS, delta_norm, delta_norm_band
from .matching import match_by_decoder_cosine
from .planted import KINDS, PlantedDictionary

THRESHOLD = 0.9
# The Delta_norm band (layer.norms.BANDS names) of each kind's latent at the planted defaults: a weak_in_base
# concept (base norm 0.3: Delta_norm 0.85) and a frequent_weak one (0.4: 0.8) sit between shared and chat-only; a
# jittered concept has equal norms in both models.
EXPECTED_BAND = {
    "shared": "shared",
    "chat_only": "chat_only",
    "base_only": "base_only",
    "weak_in_base": "other",
    "frequent_weak": "other",
    "jittered": "shared",
}


@dataclass
class RecoveryScore:
    """Per planted concept: its best latent, that latent's cosine and Delta_norm, and the verdicts.

    Attributes:
        kinds: [C] the concepts' kinds.
        latent: [C] int64 the best latent of each concept (match_by_decoder_cosine).
        cosine: [C] float32 cosine of the concept's and that latent's concatenated decoder rows.
        delta_norm: [C] float32 that latent's Delta_norm.
        band: [C] that latent's Delta_norm band (a BANDS name).
        recovered: [C] bool, cosine > threshold.
        in_band: [C] bool, recovered and band == EXPECTED_BAND of the kind.
    """

    kinds: list[str]
    latent: torch.Tensor
    cosine: torch.Tensor
    delta_norm: torch.Tensor
    band: list[str]
    recovered: torch.Tensor
    in_band: torch.Tensor

    @property
    def n_in_band(self) -> int:
        """The concepts recovered and in their band."""
        return int(self.in_band.sum())

    @property
    def all_in_band(self) -> bool:
        """Whether every planted concept is recovered and in its band."""
        return bool(self.in_band.all())

    def rows(self) -> list[dict[str, Any]]:
        """One dict per concept: concept, kind, latent, cosine, delta_norm, band, recovered, in_band.

        Returns:
            A list of C dicts of plain Python values (JSON-ready).
        """
        return [
            dict(
                concept=i,
                kind=kind,
                latent=int(self.latent[i]),
                cosine=float(self.cosine[i]),
                delta_norm=float(self.delta_norm[i]),
                band=self.band[i],
                recovered=bool(self.recovered[i]),
                in_band=bool(self.in_band[i]),
            )
            for i, kind in enumerate(self.kinds)
        ]


def score_recovery(
    cc_or_W_dec: Union[torch.nn.Module, torch.Tensor],
    planted: PlantedDictionary,
    *,
    threshold: float = THRESHOLD,
    base: int = 0,
    chat: int = 1,
) -> RecoveryScore:
    """Score a crosscoder against the planted dictionary it was trained on (see the module docstring).

    Args:
        cc_or_W_dec: A crosscoder (its W_dec is read) or its decoder rows [F, M, d].
        planted: The planted dictionary (its directions and kinds).
        threshold: Cosine above which a concept counts as recovered (default 0.9).
        base: Model index of the base model.
        chat: Model index of the chat model.

    Returns:
        A RecoveryScore with one entry per planted concept.

    Raises:
        InputError: The decoder and the planted directions differ in models or width, or a concept's kind has no
            expected band.
    """
    W_dec = getattr(cc_or_W_dec, "W_dec", cc_or_W_dec)
    if W_dec.dim() != 3 or W_dec.shape[1:] != planted.directions.shape[1:]:
        raise InputError(
            f"the decoder rows {tuple(W_dec.shape)} and the planted directions "
            f"{tuple(planted.directions.shape)} must share [M, d]"
        )
    unknown = sorted(set(planted.kinds) - set(EXPECTED_BAND))
    if unknown:
        raise InputError(f"no expected Delta_norm band for the kinds {unknown}")
    latent, cosine = match_by_decoder_cosine(W_dec, planted.directions)
    dn = delta_norm(W_dec, base, chat)[latent.to(W_dec.device)].cpu()
    band = [BANDS[i] for i in delta_norm_band(dn).tolist()]
    cosine = cosine.cpu()
    recovered = cosine > threshold
    expected = [EXPECTED_BAND[kind] for kind in planted.kinds]
    in_band = recovered & torch.tensor([got == want for got, want in zip(band, expected)], dtype=torch.bool)
    return RecoveryScore(
        kinds=list(planted.kinds),
        latent=latent.cpu(),
        cosine=cosine,
        delta_norm=dn,
        band=band,
        recovered=recovered,
        in_band=in_band,
    )


def recovery_by_kind(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pool RecoveryScore.rows() (of one score or several) per kind: the fractions recovered and in band, and the
    Delta_norm range of the recovered concepts.

    Args:
        rows: Concept rows with at least kind, recovered, in_band and delta_norm.

    Returns:
        {kind: {concepts, recovery, in_band, delta_norm_min, delta_norm_max}} for the kinds present, in KINDS
        order; the Delta_norm range is None where nothing of the kind was recovered.
    """
    rows = list(rows)
    out = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        found = [r["delta_norm"] for r in mine if r["recovered"]]
        out[kind] = dict(
            concepts=len(mine),
            recovery=sum(r["recovered"] for r in mine) / len(mine),
            in_band=sum(r["in_band"] for r in mine) / len(mine),
            delta_norm_min=min(found) if found else None,
            delta_norm_max=max(found) if found else None,
        )
    return out
