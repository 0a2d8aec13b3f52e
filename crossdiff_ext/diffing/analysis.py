"""Reading a crosscoder from its decoder (docs/math.md, "Reading a crosscoder"): relative norm difference, cosine of
a latent's decoder rows (and the encoder counterparts), the paper's bands, the classification that Latent Scaling
refines, and the per-latent table. The measures themselves live in layer/norms.py (training logs their bands);
Latent Scaling lives in latent_scaling.py."""

from __future__ import annotations

import csv
import math
import os
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .. import atomic
from ..errors import InputError
from ..layer import CrossCoder
from ..layer.norms import (
    BANDS,
    band_counts,
    decoder_cosine,
    delta_norm,
    delta_norm_band,
    encoder_cosine,
    encoder_delta_norm,
    rows_of,
)
from ..layer.partition import latent_owner

if TYPE_CHECKING:
    from .latent_scaling import LatentScalingResult

__all__ = [
    "BANDS",
    "VERDICTS",
    "band_counts",
    "classify_latents",
    "decoder_cosine",
    "delta_norm",
    "delta_norm_band",
    "encoder_cosine",
    "encoder_delta_norm",
    "latent_partition",
    "latent_table",
    "write_table",
]

# Latent Scaling's verdicts on a chat-only latent (docs/math.md, "Latent Scaling": low nu = genuinely
# chat-specific; high nu_error = Complete Shrinkage; high nu_reconstruction = Latent Decoupling; the paper's
# notebooks keep nu_error < 0.2, nu_recon < 0.5).
VERDICTS = ("chat_specific", "complete_shrinkage", "latent_decoupling", "shrinkage_and_decoupling", "never_fired")


def classify_latents(
    cc: Union[CrossCoder, torch.Tensor],
    scaling: Optional[LatentScalingResult] = None,
    *,
    base: int = 0,
    chat: int = 1,
    chat_only: float = 0.9,
    base_only: float = 0.1,
    shared_width: float = 0.1,
    nu_error_max: float = 0.2,
    nu_reconstruction_max: float = 0.5,
) -> list[str]:
    """One class name per latent: its Delta_norm band, refined by Latent Scaling when given.

    The band is one of base_only, shared, chat_only, other (the paper's bands by default). With a
    LatentScalingResult over all latents, a chat_only latent is refined by its nu values into chat_specific
    (nu_error < nu_error_max and nu_reconstruction < nu_reconstruction_max), complete_shrinkage,
    latent_decoupling, shrinkage_and_decoupling, or never_fired (no nu: the latent never fired on the data).
    A NaN nu counts as not passing its test: the evidence is missing.

    Args:
        cc: The crosscoder whose decoder rows give Delta_norm (or its W_dec [F, M, d]).
        scaling: Latent Scaling of every latent, in order (latents=None); None: the bands only.
        base: Model index of the base model (default 0).
        chat: Model index of the chat model (default 1).
        chat_only: Delta_norm above which a latent is chat_only (default 0.9, the paper's band).
        base_only: Delta_norm below which a latent is base_only (default 0.1).
        shared_width: Half-width of the shared band around 0.5, inclusive (default 0.1: [0.4, 0.6]).
        nu_error_max: nu_error below which a chat_only latent passes the Complete Shrinkage test (default 0.2,
            as the paper's notebooks).
        nu_reconstruction_max: nu_reconstruction below which it passes the Latent Decoupling test (default 0.5).

    Returns:
        A list of F class names (see VERDICTS for the refined ones), indexed by latent.

    Raises:
        InputError: scaling does not cover every latent in order.
    """
    band = delta_norm_band(
        delta_norm(cc, base, chat), chat_only=chat_only, base_only=base_only, shared_width=shared_width
    ).cpu()
    classes = [BANDS[i] for i in band.tolist()]
    if scaling is None:
        return classes
    if scaling.latents.numel() != len(classes) or not torch.equal(scaling.latents, torch.arange(len(classes))):
        raise InputError("classify_latents needs Latent Scaling of every latent (latents=None), in order")
    for j, name in enumerate(classes):
        if name != "chat_only":
            continue
        ne, nr = float(scaling.nu_error[j]), float(scaling.nu_reconstruction[j])
        if math.isnan(ne) and math.isnan(nr):
            classes[j] = "never_fired"
            continue
        shrink = not ne < nu_error_max  # NaN counts as not passing: the evidence is missing
        decouple = not nr < nu_reconstruction_max
        classes[j] = (
            "shrinkage_and_decoupling"
            if shrink and decouple
            else "complete_shrinkage"
            if shrink
            else "latent_decoupling"
            if decouple
            else "chat_specific"
        )
    return classes


def latent_partition(cc: Union[CrossCoder, torch.Tensor], *, base: int = 0, chat: int = 1) -> list[str]:
    """Which part of the dictionary each latent belongs to: "shared", "base_dedicated", "chat_dedicated" (or
    "model_<m>_dedicated" for a third model), from the crosscoder's partition (CrossCoder(partition=...)).

    Args:
        cc: The crosscoder; a bare decoder tensor [F, M, d] has no partition (every latent "shared").
        base: Model index of the base model (default 0).
        chat: Model index of the chat model (default 1).

    Returns:
        A list of F names, indexed by latent.
    """
    W = cc.W_dec if isinstance(cc, CrossCoder) else cc
    names = {-1: "shared", base: "base_dedicated", chat: "chat_dedicated"}
    owner = latent_owner(getattr(cc, "partition", None), W.shape[0])
    return [names.get(m, f"model_{m}_dedicated") for m in owner.tolist()]


def latent_table(
    cc: CrossCoder,
    scaling: Optional[LatentScalingResult] = None,
    *,
    base: int = 0,
    chat: int = 1,
    **thresholds: float,
) -> dict[str, list[Any]]:
    """A per-latent table of the crosscoder's decoder and encoder measures, and of Latent Scaling when given.

    The columns: latent, decoder and encoder norms per model, delta_norm, cosines, class, partition (shared or
    dedicated to one model: latent_partition), and with a LatentScalingResult of all latents the betas, nu values,
    firing frequency and mean activation. write_table saves it as CSV (or Parquet).

    A dedicated latent's class comes from its rows like any other's: a chat-dedicated one has Delta_norm 1 (band
    chat_only, refined by Latent Scaling), a base-dedicated one 0 (base_only; its chat-probe betas are NaN, see
    latent_scaling).

    Args:
        cc: The crosscoder to tabulate.
        scaling: Latent Scaling of every latent, in order; None: no Latent Scaling columns.
        base: Model index of the base model (default 0).
        chat: Model index of the chat model (default 1).
        **thresholds: The band and nu thresholds of classify_latents (chat_only, base_only, shared_width,
            nu_error_max, nu_reconstruction_max).

    Returns:
        {column: list} with one row per latent.

    Raises:
        InputError: scaling does not cover every latent in order (classify_latents).
    """
    W_dec, W_enc = rows_of(cc, "W_dec"), rows_of(cc, "W_enc")
    F = W_dec.shape[0]
    table = {"latent": list(range(F))}
    for name, W in (("dec", W_dec), ("enc", W_enc)):
        norms = torch.linalg.vector_norm(W, dim=-1).cpu()
        for m in range(W.shape[1]):
            table[f"{name}_norm_{m}"] = norms[:, m].tolist()
    table["delta_norm"] = delta_norm(W_dec, base, chat).cpu().tolist()
    table["decoder_cosine"] = decoder_cosine(W_dec, base, chat).cpu().tolist()
    table["encoder_delta_norm"] = delta_norm(W_enc, base, chat).cpu().tolist()
    table["encoder_cosine"] = decoder_cosine(W_enc, base, chat).cpu().tolist()
    table["class"] = classify_latents(cc, scaling, base=base, chat=chat, **thresholds)
    table["partition"] = latent_partition(cc, base=base, chat=chat)
    if scaling is not None:
        table["nu_error"] = scaling.nu_error.tolist()
        table["nu_reconstruction"] = scaling.nu_reconstruction.tolist()
        for (target, m), beta in sorted(scaling.beta.items()):
            table[f"beta_{target}_{m}"] = beta.tolist()
        table["firing_frequency"] = scaling.firing_frequency.tolist()
        table["mean_activation"] = scaling.mean_activation.tolist()
        if scaling.activation_max is not None:
            table["max_activation"] = scaling.activation_max.tolist()
    return table


def write_table(table: dict[str, list[Any]], path: Union[str, os.PathLike]) -> str:
    """Write a latent_table to `path`: Parquet when it ends in .parquet (needs pyarrow), CSV otherwise.

    The file is written to a temp file and renamed, so a reader never sees half a table.

    Args:
        table: {column: list}, as latent_table returns it (columns of equal length).
        path: The file to write; a .parquet suffix selects Parquet.

    Returns:
        The path written, as a string.

    Raises:
        ImportError: Parquet was asked for but pyarrow is not installed.
    """
    path = os.fspath(path)

    def write(tmp: str) -> None:
        if path.endswith(".parquet"):
            try:
                import pyarrow
                import pyarrow.parquet
            except ImportError:
                raise ImportError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow); use .csv") from None
            pyarrow.parquet.write_table(pyarrow.table(table), tmp)
        else:
            with open(tmp, "w", newline="") as fh:
                writer = csv.writer(fh)
                columns = list(table)
                writer.writerow(columns)
                writer.writerows(zip(*(table[c] for c in columns)))

    return atomic.save(path, write)
