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
The first four kinds: a token activates a few of them (about `active_per_token`, Poisson) with magnitudes
Exp(1) + 0.5. The last two fire independently of those, at their own rates. x[n, m] = sum_c a[n, c, m] D[c, m] +
noise. Everything is drawn from one seed; with no concept of the last two kinds and orthogonal=False the draws are
those of the four-kind generator.
"""

from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("shared", "chat_only", "base_only", "weak_in_base", "frequent_weak", "jittered")
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


def _unit_rows(n, d, g):
    v = torch.randn(n, d, generator=g)
    return v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


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
        ValueError: A count is not an int >= 0, d_model or n_tokens is < 1, the model slots are invalid,
            weak_scale, a rate, a magnitude, frequent_scale or jitter is outside its range, there is no concept
            at all, or orthogonal directions were asked for more concepts than d_model.
    """
    counts = dict(
        shared=n_shared,
        chat_only=n_chat_only,
        base_only=n_base_only,
        weak_in_base=n_weak_in_base,
        frequent_weak=n_frequent_weak,
        jittered=n_jittered,
    )
    for name, value in list(counts.items()) + [("n_tokens", n_tokens), ("d_model", d_model)]:
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if d_model < 1 or n_tokens < 1:
        raise ValueError(f"d_model and n_tokens must be >= 1, got {d_model} and {n_tokens}")
    if n_models < 2 or not (0 <= base < n_models and 0 <= chat < n_models and base != chat):
        raise ValueError(f"need n_models >= 2 and distinct base/chat slots in range, got {n_models}, {base}, {chat}")
    if not 0.0 < weak_scale < 1.0:
        raise ValueError(f"weak_scale must be in (0, 1), got {weak_scale}")
    if not 0.0 < frequent_scale < 1.0:
        raise ValueError(f"frequent_scale must be in (0, 1), got {frequent_scale}")
    for name, value in (("frequent_rate", frequent_rate), ("jittered_rate", jittered_rate)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if not frequent_magnitude > 0.0:
        raise ValueError(f"frequent_magnitude must be > 0, got {frequent_magnitude}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    g = torch.Generator().manual_seed(seed)
    kinds = [k for k in KINDS for _ in range(counts[k])]
    C = len(kinds)
    if C == 0:
        raise ValueError("at least one concept is needed")
    if orthogonal and C > d_model:
        raise ValueError(f"orthogonal directions need at most d_model = {d_model} concepts, got {C}")
    D = torch.zeros(C, n_models, d_model)
    shared_dirs = _unit_rows(C, d_model, g)
    if orthogonal:
        shared_dirs = torch.linalg.qr(shared_dirs.T).Q.T.contiguous()
    for c, kind in enumerate(kinds):
        for m in range(n_models):
            D[c, m] = shared_dirs[c]
        if kind == "chat_only":
            D[c, base] = 0.0
        elif kind == "base_only":
            D[c, chat] = 0.0
        elif kind == "weak_in_base":
            D[c, base] *= weak_scale
        elif kind == "frequent_weak":
            D[c, base] *= frequent_scale
    # The first four kinds: each token picks Poisson(active_per_token) of them uniformly (at least one),
    # magnitudes ~ Exp(1) + 0.5.
    C4 = sum(counts[k] for k in KINDS[:4])
    a = torch.zeros(n_tokens, C)
    if C4:
        n_active = torch.poisson(torch.full((n_tokens,), float(active_per_token)), generator=g).clamp(1, C4).long()
        scores = torch.rand(n_tokens, C4, generator=g)
        order = scores.argsort(dim=1)
        mask = torch.arange(C4)[None, :] < n_active[:, None]
        chosen = torch.zeros(n_tokens, C4, dtype=torch.bool).scatter(1, order, mask)
        magnitude = torch.empty(n_tokens, C4).exponential_(1.0, generator=g) + 0.5
        a[:, :C4] = torch.where(chosen, magnitude, torch.zeros(()))
    base_a = None
    if n_frequent_weak or n_jittered:
        fw = slice(C4, C4 + n_frequent_weak)
        on = torch.rand(n_tokens, n_frequent_weak, generator=g) < frequent_rate
        spread = 0.8 + 0.4 * torch.rand(n_tokens, n_frequent_weak, generator=g)
        a[:, fw] = torch.where(on, frequent_magnitude * spread, torch.zeros(()))
        jt = slice(C4 + n_frequent_weak, C)
        on = torch.rand(n_tokens, n_jittered, generator=g) < jittered_rate
        magnitude = torch.empty(n_tokens, n_jittered).exponential_(1.0, generator=g) + 0.5
        a[:, jt] = torch.where(on, magnitude, torch.zeros(()))
        factor = 1.0 - jitter + 2.0 * jitter * torch.rand(n_tokens, n_jittered, generator=g)
        base_a = a.clone()
        base_a[:, jt] *= factor
    x = torch.einsum("nc,cmd->nmd", a, D)
    if base_a is not None:
        x[:, base] = base_a @ D[:, base]
    x += noise * torch.randn(n_tokens, n_models, d_model, generator=g)
    return PlantedDictionary(x=x, directions=D, kinds=kinds, activations=a, base_activations=base_a)


def match_concepts(W_dec: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every planted concept, the learned latent whose concatenated decoder row [M*d] is most similar.
    Returns (latent [C], cosine [C])."""
    learned = torch.nn.functional.normalize(W_dec.detach().float().reshape(W_dec.shape[0], -1), dim=1)
    truth = torch.nn.functional.normalize(directions.float().reshape(directions.shape[0], -1), dim=1)
    cos = truth @ learned.T
    best = cos.max(dim=1)
    return best.indices, best.values
