"""Reading a crosscoder from its decoder (SPEC.md, "Reading a crosscoder"): relative norm difference, cosine of
a latent's decoder rows (and the encoder counterparts), the paper's bands, the classification that Latent Scaling
refines, and the per-latent table. The measures themselves live in layer/norms.py (training logs their bands);
Latent Scaling lives in latent_scaling.py."""

import csv
import math
import os

import torch

from .. import atomic
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
    "latent_table",
    "write_table",
]

# Latent Scaling's verdicts on a chat-only latent (SPEC: low nu = genuinely chat-specific; high nu_error = Complete
# Shrinkage; high nu_reconstruction = Latent Decoupling; the paper's notebooks keep nu_error < 0.2, nu_recon < 0.5).
VERDICTS = ("chat_specific", "complete_shrinkage", "latent_decoupling", "shrinkage_and_decoupling", "never_fired")


def classify_latents(
    cc,
    scaling=None,
    *,
    base=0,
    chat=1,
    chat_only=0.9,
    base_only=0.1,
    shared_width=0.1,
    nu_error_max=0.2,
    nu_reconstruction_max=0.5,
):
    """One class name per latent: its Delta_norm band (base_only, shared, chat_only, other; the paper's bands by
    default). With a LatentScalingResult over all latents, a chat_only latent is refined by its nu values into
    chat_specific (nu_error < nu_error_max and nu_reconstruction < nu_reconstruction_max), complete_shrinkage,
    latent_decoupling, shrinkage_and_decoupling, or never_fired (no nu: the latent never fired on the data)."""
    band = delta_norm_band(
        delta_norm(cc, base, chat), chat_only=chat_only, base_only=base_only, shared_width=shared_width
    ).cpu()
    classes = [BANDS[i] for i in band.tolist()]
    if scaling is None:
        return classes
    if scaling.latents.numel() != len(classes) or not torch.equal(scaling.latents, torch.arange(len(classes))):
        raise ValueError("classify_latents needs Latent Scaling of every latent (latents=None), in order")
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


def latent_table(cc, scaling=None, *, base=0, chat=1, **thresholds):
    """{column: list} with one row per latent: decoder and encoder norms per model, delta_norm, cosines,
    class, and with a LatentScalingResult of all latents the betas, nu values, firing frequency and mean
    activation. write_table saves it as CSV (or Parquet)."""
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
    if scaling is not None:
        table["nu_error"] = scaling.nu_error.tolist()
        table["nu_reconstruction"] = scaling.nu_reconstruction.tolist()
        for (target, m), beta in sorted(scaling.beta.items()):
            table[f"beta_{target}_{m}"] = beta.tolist()
        table["firing_frequency"] = scaling.firing_frequency.tolist()
        table["mean_activation"] = scaling.mean_activation.tolist()
    return table


def write_table(table, path):
    """Write a latent_table to `path`: Parquet when it ends in .parquet (needs pyarrow), CSV otherwise; written to
    a temp file and renamed, so a reader never sees half a table."""
    path = os.fspath(path)

    def write(tmp):
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
