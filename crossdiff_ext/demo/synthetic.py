"""Planted dictionaries: paired activations with known ground truth, to validate a diffing method before trusting
it on real models.

Each concept c has a direction per model, D[c, m] (unit norm unless weak or absent), of one of four kinds:
  shared         the same direction in base and chat
  chat_only      absent in the base model (D[c, base] = 0): a concept fine-tuning introduced
  base_only      absent in the chat model
  weak_in_base   present in both, with norm `weak_scale` in the base model: fine-tuning strengthened it
A token activates a few concepts (about `active_per_token`, Poisson) with magnitudes from an exponential law;
x[n, m] = sum_c a[n, c] D[c, m] + noise. Everything is drawn from one seed.
"""

from dataclasses import dataclass

import torch

KINDS = ("shared", "chat_only", "base_only", "weak_in_base")


@dataclass
class PlantedDictionary:
    """Paired activations with known ground truth (what planted_dictionary returns).

    Attributes:
        x: [N, M, d] activations (float32).
        directions: [C, M, d] ground-truth decoder directions.
        kinds: [C] kind of each concept (one of KINDS).
        activations: [N, C] the concepts' magnitudes per token (sparse in practice).
    """

    x: torch.Tensor  # [N, M, d] activations (float32)
    directions: torch.Tensor  # [C, M, d] ground-truth decoder directions
    kinds: list[str]  # [C] kind of each concept (one of KINDS)
    activations: torch.Tensor  # [N, C] the concepts' magnitudes per token (sparse in practice)

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

    Returns:
        A PlantedDictionary (x, directions, kinds, activations).

    Raises:
        ValueError: A count is not an int >= 0, d_model or n_tokens is < 1, the model slots are invalid,
            weak_scale is outside (0, 1), or there is no concept at all.
    """
    counts = dict(shared=n_shared, chat_only=n_chat_only, base_only=n_base_only, weak_in_base=n_weak_in_base)
    for name, value in list(counts.items()) + [("n_tokens", n_tokens), ("d_model", d_model)]:
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if d_model < 1 or n_tokens < 1:
        raise ValueError(f"d_model and n_tokens must be >= 1, got {d_model} and {n_tokens}")
    if n_models < 2 or not (0 <= base < n_models and 0 <= chat < n_models and base != chat):
        raise ValueError(f"need n_models >= 2 and distinct base/chat slots in range, got {n_models}, {base}, {chat}")
    if not 0.0 < weak_scale < 1.0:
        raise ValueError(f"weak_scale must be in (0, 1), got {weak_scale}")
    g = torch.Generator().manual_seed(seed)
    kinds = [k for k in KINDS for _ in range(counts[k])]
    C = len(kinds)
    if C == 0:
        raise ValueError("at least one concept is needed")
    D = torch.zeros(C, n_models, d_model)
    shared_dirs = _unit_rows(C, d_model, g)
    for c, kind in enumerate(kinds):
        for m in range(n_models):
            D[c, m] = shared_dirs[c]
        if kind == "chat_only":
            D[c, base] = 0.0
        elif kind == "base_only":
            D[c, chat] = 0.0
        elif kind == "weak_in_base":
            D[c, base] *= weak_scale
    # Each token picks Poisson(active_per_token) concepts uniformly (at least one), magnitudes ~ Exp(1) + 0.5.
    n_active = torch.poisson(torch.full((n_tokens,), float(active_per_token)), generator=g).clamp(1, C).long()
    scores = torch.rand(n_tokens, C, generator=g)
    order = scores.argsort(dim=1)
    mask = torch.arange(C)[None, :] < n_active[:, None]
    chosen = torch.zeros(n_tokens, C, dtype=torch.bool).scatter(1, order, mask)
    magnitude = torch.empty(n_tokens, C).exponential_(1.0, generator=g) + 0.5
    a = torch.where(chosen, magnitude, torch.zeros(()))
    x = torch.einsum("nc,cmd->nmd", a, D) + noise * torch.randn(n_tokens, n_models, d_model, generator=g)
    return PlantedDictionary(x=x, directions=D, kinds=kinds, activations=a)


def match_concepts(W_dec: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every planted concept, the learned latent whose concatenated decoder row [M*d] is most similar.
    Returns (latent [C], cosine [C])."""
    learned = torch.nn.functional.normalize(W_dec.detach().float().reshape(W_dec.shape[0], -1), dim=1)
    truth = torch.nn.functional.normalize(directions.float().reshape(directions.shape[0], -1), dim=1)
    cos = truth @ learned.T
    best = cos.max(dim=1)
    return best.indices, best.values
