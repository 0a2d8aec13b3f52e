"""Planted dictionaries: paired activations with known ground truth, to validate a diffing method before trusting
it on real models.

Each concept c has a direction per model, D[c, m] (unit norm unless weak or absent), of one of six kinds:
  shared          the same direction in base and chat
  chat_only       absent in the base model (D[c, base] = 0): a concept fine-tuning introduced
  base_only       absent in the chat model
  weak_in_base    present in both, with norm `weak_scale` in the base model: fine-tuning strengthened it
  frequent_weak   present in both, with norm `frequent_scale` in the base model, firing often (probability
                  `frequent_rate` per token) with small magnitudes (uniform within 20% of `frequent_magnitude`):
                  the setting of Complete Shrinkage. An L1 crosscoder trained on the squared error zeroes a base
                  decoder row when the row's base contribution (frequent_scale * magnitude) falls under about mu,
                  and calls a concept chat-only that the base model still carries (nu_error near frequent_scale)
  jittered        present in both with the same direction and the same tokens, the base magnitude being the chat
                  magnitude times a per-token factor uniform in [1 - jitter, 1 + jitter] (probability
                  `jittered_rate` per token): the setting of Latent Decoupling. One shared latent cannot follow
                  the factor; a base-only plus a chat-only latent can, at the same L1 cost (the penalty sums the
                  decoder norms), whereas BatchTopK pays a second slot for the pair
The first four kinds ("plain"): a token activates a few of them (about `active_per_token`, Poisson) with
magnitudes Exp(1) + 0.5. The last two fire independently of those, at their own rates. x[n, m] = sum_c a[n, c, m]
D[c, m] + noise. Everything is drawn from one generator, in a fixed order (directions, plain magnitudes,
frequent_weak, jittered, noise), so a seed names one dictionary; with no concept of the last two kinds and
orthogonal=False the draws are those of the four-kind generator.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InputError

KINDS = ("shared", "chat_only", "base_only", "weak_in_base", "frequent_weak", "jittered")
PLAIN_KINDS = KINDS[:4]
# The planted kind built to produce each L1 artifact (the mechanism names are classify_latents' verdicts).
ARTIFACT_KINDS = {"complete_shrinkage": "frequent_weak", "latent_decoupling": "jittered"}


@dataclass
class PlantedDictionary:
    """Paired activations with known ground truth (what planted_dictionary returns).

    Attributes:
        x: [N, M, d] activations (float32).
        directions: [C, M, d] ground-truth decoder directions.
        kinds: [C] kind of each concept (one of KINDS).
        activations: [N, C] the concepts' magnitudes per token (sparse in practice), in every model but the base
            model for jittered concepts.
        base_activations: [N, C] the magnitudes in the base model (those of `activations`, times the per-token
            factor for jittered concepts); None means the same as `activations`.
    """

    x: torch.Tensor  # [N, M, d] activations (float32)
    directions: torch.Tensor  # [C, M, d] ground-truth decoder directions
    kinds: list[str]  # [C] kind of each concept (one of KINDS)
    activations: torch.Tensor  # [N, C] the concepts' magnitudes per token (sparse in practice)
    base_activations: Optional[torch.Tensor] = None  # [N, C] the base model's magnitudes (jittered concepts differ)

    @property
    def kind_ids(self) -> torch.Tensor:
        """[C] int64 index in KINDS of each concept's kind."""
        return torch.tensor([KINDS.index(k) for k in self.kinds])


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise InputError(f"{name} must be in {interval}, got {value}")


def _check_settings(counts, n_tokens, d_model, n_models, base, chat, scales, rates, frequent_magnitude, jitter):
    for name, value in list(counts.items()) + [("n_tokens", n_tokens), ("d_model", d_model)]:
        if not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be an int >= 0, got {value!r}")
    if d_model < 1 or n_tokens < 1:
        raise InputError(f"d_model and n_tokens must be >= 1, got {d_model} and {n_tokens}")
    if n_models < 2 or not (0 <= base < n_models and 0 <= chat < n_models and base != chat):
        raise InputError(f"need n_models >= 2 and distinct base/chat slots in range, got {n_models}, {base}, {chat}")
    for name, value in scales.items():
        _check_range(name, value, 0.0, 1.0, low_open=True, high_open=True)
    for name, value in rates.items():
        _check_range(name, value, 0.0, 1.0, low_open=True, high_open=False)
    if not frequent_magnitude > 0.0:
        raise InputError(f"frequent_magnitude must be > 0, got {frequent_magnitude}")
    _check_range("jitter", jitter, 0.0, 1.0, low_open=False, high_open=False)


def concept_directions(
    kinds: list[str],
    d_model: int,
    n_models: int,
    base: int,
    chat: int,
    base_scale: dict[str, float],
    orthogonal: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """The [C, M, d] planted directions: one random unit direction per concept in every model slot, zeroed in the
    model a one-sided kind is absent from and scaled in the base model for the weak kinds.

    Args:
        kinds: [C] the concepts' kinds (KINDS names).
        d_model: d, the width of each model's activations.
        n_models: M, the model slots.
        base: The base model's slot.
        chat: The chat model's slot.
        base_scale: {kind: norm of its base-model direction} for the kinds weaker in the base model.
        orthogonal: Orthonormalise the directions (needs C <= d_model).
        generator: The generator the directions are drawn from.

    Returns:
        [C, M, d] float32 directions.
    """
    shared = torch.randn(len(kinds), d_model, generator=generator)
    shared = shared / torch.linalg.vector_norm(shared, dim=1, keepdim=True)
    if orthogonal:
        shared = torch.linalg.qr(shared.T).Q.T.contiguous()
    D = shared[:, None, :].repeat(1, n_models, 1)
    for c, kind in enumerate(kinds):
        if kind == "chat_only":
            D[c, base] = 0.0
        elif kind == "base_only":
            D[c, chat] = 0.0
        elif kind in base_scale:
            D[c, base] *= base_scale[kind]
    return D


def _plain_magnitudes(n_tokens, n_plain, active_per_token, g):
    """[N, n_plain]: each token picks Poisson(active_per_token) concepts uniformly (at least one), Exp(1) + 0.5."""
    n_active = torch.poisson(torch.full((n_tokens,), float(active_per_token)), generator=g).clamp(1, n_plain).long()
    order = torch.rand(n_tokens, n_plain, generator=g).argsort(dim=1)
    mask = torch.arange(n_plain)[None, :] < n_active[:, None]
    chosen = torch.zeros(n_tokens, n_plain, dtype=torch.bool).scatter(1, order, mask)
    magnitude = torch.empty(n_tokens, n_plain).exponential_(1.0, generator=g) + 0.5
    return torch.where(chosen, magnitude, torch.zeros(()))


def _frequent_magnitudes(n_tokens, n, rate, magnitude, g):
    """[N, n]: each concept fires with probability `rate`, uniformly within 20% of `magnitude`."""
    on = torch.rand(n_tokens, n, generator=g) < rate
    spread = 0.8 + 0.4 * torch.rand(n_tokens, n, generator=g)
    return torch.where(on, magnitude * spread, torch.zeros(()))


def _jittered_magnitudes(n_tokens, n, rate, jitter, g):
    """([N, n] chat magnitudes, [N, n] per-token base factors): fires with probability `rate`, Exp(1) + 0.5."""
    on = torch.rand(n_tokens, n, generator=g) < rate
    magnitude = torch.empty(n_tokens, n).exponential_(1.0, generator=g) + 0.5
    factor = 1.0 - jitter + 2.0 * jitter * torch.rand(n_tokens, n, generator=g)
    return torch.where(on, magnitude, torch.zeros(())), factor


def planted_dictionary(
    n_tokens: int = 20000,
    d_model: int = 32,
    n_shared: int = 24,
    n_chat_only: int = 8,
    n_base_only: int = 8,
    n_weak_in_base: int = 8,
    active_per_token: float = 3.0,
    weak_scale: float = 0.3,
    noise: float = 0.01,
    base: int = 0,
    chat: int = 1,
    n_models: int = 2,
    seed: int = 0,
    n_frequent_weak: int = 0,
    frequent_rate: float = 0.25,
    frequent_magnitude: float = 0.5,
    frequent_scale: float = 0.4,
    n_jittered: int = 0,
    jittered_rate: float = 0.1,
    jitter: float = 0.6,
    orthogonal: bool = False,
) -> PlantedDictionary:
    """Generate a PlantedDictionary: paired activations of planted concepts (see the module docstring).

    Args:
        n_tokens: N, the tokens (rows) of x.
        d_model: d, the width of each model's activations.
        n_shared: Concepts with the same direction in base and chat.
        n_chat_only: Concepts absent in the base model (fine-tuning introduced them).
        n_base_only: Concepts absent in the chat model.
        n_weak_in_base: Concepts present in both, with norm `weak_scale` in the base model.
        active_per_token: Mean of the Poisson number of concepts a token activates (at least one).
        weak_scale: Base-model norm of the weak_in_base concepts, in (0, 1).
        noise: Standard deviation of the Gaussian noise added to x.
        base: The model slot of x that is the base model.
        chat: The model slot of x that is the chat model.
        n_models: M, the model slots of x (>= 2); slots other than base and chat get the shared directions.
        seed: Seed of the one generator everything is drawn from.
        n_frequent_weak: Concepts of kind frequent_weak (Complete Shrinkage's setting; see the module docstring).
        frequent_rate: Probability that a frequent_weak concept fires on a token, in (0, 1].
        frequent_magnitude: Mean magnitude of a frequent_weak concept (uniform within 20% of it), > 0.
        frequent_scale: Base-model norm of the frequent_weak concepts, in (0, 1).
        n_jittered: Concepts of kind jittered (Latent Decoupling's setting).
        jittered_rate: Probability that a jittered concept fires on a token, in (0, 1]; magnitudes Exp(1) + 0.5.
        jitter: Half-width of the base model's per-token factor on a jittered concept's magnitude, in [0, 1].
        orthogonal: Draw orthonormal concept directions (needs at most d_model concepts): no interference
            between concepts, so a crosscoder's behaviour follows from the kinds alone.

    Returns:
        A PlantedDictionary (x, directions, kinds, activations).

    Raises:
        InputError: A count is not an int >= 0, d_model or n_tokens is < 1, the model slots are invalid,
            weak_scale, a rate, a magnitude, frequent_scale or jitter is outside its range, there is no concept
            at all, or orthogonal directions were asked for more concepts than d_model.
    """
    counts = dict(zip(KINDS, (n_shared, n_chat_only, n_base_only, n_weak_in_base, n_frequent_weak, n_jittered)))
    base_scale = {"weak_in_base": weak_scale, "frequent_weak": frequent_scale}
    _check_settings(
        counts,
        n_tokens,
        d_model,
        n_models,
        base,
        chat,
        {"weak_scale": weak_scale, "frequent_scale": frequent_scale},
        {"frequent_rate": frequent_rate, "jittered_rate": jittered_rate},
        frequent_magnitude,
        jitter,
    )
    kinds = [k for k in KINDS for _ in range(counts[k])]
    if not kinds:
        raise InputError("at least one concept is needed")
    if orthogonal and len(kinds) > d_model:
        raise InputError(f"orthogonal directions need at most d_model = {d_model} concepts, got {len(kinds)}")
    g = torch.Generator().manual_seed(seed)
    D = concept_directions(kinds, d_model, n_models, base, chat, base_scale, orthogonal, g)
    n_plain = sum(counts[k] for k in PLAIN_KINDS)
    parts = [_plain_magnitudes(n_tokens, n_plain, active_per_token, g)] if n_plain else []
    base_a = None
    if n_frequent_weak or n_jittered:
        parts.append(_frequent_magnitudes(n_tokens, n_frequent_weak, frequent_rate, frequent_magnitude, g))
        jittered, factor = _jittered_magnitudes(n_tokens, n_jittered, jittered_rate, jitter, g)
        parts.append(jittered)
        base_a = torch.cat(parts[:-1] + [jittered * factor], dim=1)
    a = torch.cat(parts, dim=1)
    x = torch.einsum("nc,cmd->nmd", a, D)
    if base_a is not None:
        x[:, base] = base_a @ D[:, base]
    x += noise * torch.randn(n_tokens, n_models, d_model, generator=g)
    return PlantedDictionary(x=x, directions=D, kinds=kinds, activations=a, base_activations=base_a)
