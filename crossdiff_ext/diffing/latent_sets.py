"""The latent sets of the paper's patching experiment: halves of the chat-leaning latents ranked by Delta_norm and
by Latent Scaling, and random sets of the same size."""

import math

import torch

from ..errors import InputError
from ..layer import CrossCoder
from ..layer.norms import delta_norm
from .latent_scaling import LatentScalingResult

NU_RANGE = (-0.1, 2.0)  # nu values outside it are estimation noise of rarely firing latents (the paper's filter)


def _per_latent(values: torch.Tensor, latents: torch.Tensor, n_latents: int) -> torch.Tensor:
    full = torch.full((n_latents,), math.nan, dtype=torch.float64)
    full[latents.long()] = values.double().cpu()
    return full


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ascending ranks; ties keep the order of the latent ids (a stable sort)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    return ranks


def paper_latent_sets(
    crosscoder: CrossCoder,
    scaling: LatentScalingResult,
    *,
    min_delta_norm: float = 0.6,
    n: int = 3176,
    n_random: int = 5,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The paper's latent sets for patch_kl.

    The chat-leaning latents are those with Delta_norm >= min_delta_norm, at most the n with the highest
    Delta_norm; of these, the ones with finite nu_error and nu_reconstruction in [-0.1, 2] are ranked two ways and
    split into halves of equal size (the middle latent is left out when their number is odd):
    - by Delta_norm: "delta_norm_better" holds the higher half, "delta_norm_worse" the lower;
    - by Latent Scaling, rank(nu_reconstruction) + rank(nu_error) (low nu = chat-specific):
      "latent_scaling_better" holds the lower half of that score, "latent_scaling_worse" the higher.
    "random_0" .. "random_{n_random-1}" are sets of the same size drawn uniformly from all latents (seed + i).

    Args:
        crosscoder: The crosscoder (its decoder gives Delta_norm; model 0 = base, 1 = chat).
        scaling: Latent Scaling with both targets ("error" and "reconstruction") of at least the chat-leaning
            latents.
        min_delta_norm: The Delta_norm threshold of a chat-leaning latent.
        n: At most this many chat-leaning latents (the highest Delta_norm).
        n_random: Random sets.
        seed: Seed of the random sets.

    Returns:
        {set name: int64 latent ids}.

    Raises:
        InputError: scaling lacks a target, the thresholds are out of range, or fewer than two chat-leaning
            latents have a valid nu.
    """
    _check_arguments(crosscoder, scaling, min_delta_norm, n, n_random)
    F = crosscoder.dict_size
    nu_e = _per_latent(scaling.nu_error, scaling.latents, F)
    nu_r = _per_latent(scaling.nu_reconstruction, scaling.latents, F)
    chat_leaning, valid = _chat_leaning(crosscoder, scaling, nu_e, nu_r, min_delta_norm, n)
    low, high = NU_RANGE
    half = len(valid) // 2
    if half < 1:
        raise InputError(
            f"{len(chat_leaning)} latents have Delta_norm >= {min_delta_norm} and {len(valid)} of them a nu in "
            f"[{low}, {high}]; the halves need at least 2"
        )
    # valid is in descending Delta_norm order.
    score = _ranks(nu_r[valid]) + _ranks(nu_e[valid])
    by_scaling = valid[torch.argsort(score, stable=True)]
    sets = {
        "delta_norm_better": valid[:half],
        "delta_norm_worse": valid[-half:],
        "latent_scaling_better": by_scaling[:half],
        "latent_scaling_worse": by_scaling[-half:],
    }
    for i in range(n_random):
        generator = torch.Generator().manual_seed(seed + i)
        sets[f"random_{i}"] = torch.randperm(F, generator=generator)[:half]
    return {name: ids.to(torch.int64).clone() for name, ids in sets.items()}


def _check_arguments(crosscoder, scaling, min_delta_norm, n, n_random):
    """paper_latent_sets' arguments, before anything is computed."""
    if not isinstance(crosscoder, CrossCoder):
        raise InputError(f"crosscoder must be a crossdiff_ext.CrossCoder, got {type(crosscoder).__name__}")
    if not isinstance(scaling, LatentScalingResult):
        raise InputError(f"scaling must be a LatentScalingResult, got {type(scaling).__name__}")
    missing = [t for t in ("error", "reconstruction") if t not in scaling.targets]
    if missing:
        raise InputError(f"scaling must have both targets 'error' and 'reconstruction'; it lacks {missing}")
    if not 0.0 <= min_delta_norm <= 1.0:
        raise InputError(f"min_delta_norm must be in [0, 1], got {min_delta_norm}")
    if not isinstance(n, int) or n < 2 or not isinstance(n_random, int) or n_random < 0:
        raise InputError(f"n must be an int >= 2 and n_random an int >= 0, got n={n!r}, n_random={n_random!r}")


def _chat_leaning(crosscoder, scaling, nu_e, nu_r, min_delta_norm, n):
    """(the chat-leaning latents, those of them with both nu finite and in NU_RANGE), each in descending
    Delta_norm order; nu_e and nu_r are [F] per latent."""
    dn = delta_norm(crosscoder, scaling.base, scaling.chat).double().cpu()
    chat_leaning = torch.argsort(-dn, stable=True)
    chat_leaning = chat_leaning[dn[chat_leaning] >= min_delta_norm][:n]
    low, high = NU_RANGE
    valid = chat_leaning[
        torch.isfinite(nu_e[chat_leaning])
        & torch.isfinite(nu_r[chat_leaning])
        & (nu_e[chat_leaning] >= low)
        & (nu_e[chat_leaning] <= high)
        & (nu_r[chat_leaning] >= low)
        & (nu_r[chat_leaning] <= high)
    ]
    return chat_leaning, valid
