"""Matching learned latents to planted concepts, in the two directions a study needs.

match_by_decoder_cosine looks from the concepts: for every planted concept, the latent whose concatenated decoder
row [M*d] is most similar to the concept's concatenated directions, with that cosine. Every concept gets a latent
(the caller judges the cosine); one latent may serve several concepts. Recovery scoring uses it.

assign_latents_to_concepts looks from the latents, model by model: a latent lives in model m when its decoder row
there has at least `lives` of the norm of its largest row (at 0.2, a latent with Delta_norm > 0.9 lives in the chat
model only, a shared one in both); a concept lives where its direction is nonzero. The latent is assigned the
concept with the highest mean cosine over the models where both live, provided that cosine is above `min_cosine`
in each of them and they share at least one model; else none (-1). Comparing per model keeps a chat-only latent
matched to a concept that the base model carries weakly, which the concatenated cosine would blur. Counting the
artifacts among a crosscoder's chat-only latents uses it.
"""

import math

import torch

MIN_COSINE = 0.9
LIVES = 0.2


def _flat_unit_rows(W: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(W.detach().float().reshape(W.shape[0], -1), dim=1)


def match_by_decoder_cosine(W_dec: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every planted concept, the latent whose concatenated decoder row [M*d] is most similar.

    Args:
        W_dec: [F, M, d] decoder rows.
        directions: [C, M, d] planted directions.

    Returns:
        (latent [C] int64, cosine [C] float32): the best latent of each concept and its cosine.
    """
    cos = _flat_unit_rows(directions) @ _flat_unit_rows(W_dec).T
    best = cos.max(dim=1)
    return best.indices, best.values


def assign_latents_to_concepts(
    W_dec: torch.Tensor, directions: torch.Tensor, min_cosine: float = MIN_COSINE, lives: float = LIVES
) -> torch.Tensor:
    """The planted concept each latent is assigned to (-1: none), by the per-model rule of the module docstring.

    Args:
        W_dec: [F, M, d] decoder rows.
        directions: [C, M, d] planted directions.
        min_cosine: Cosine an assignment needs in every model where latent and concept both live.
        lives: Fraction of its largest row's norm above which a latent lives in a model.

    Returns:
        [F] int64 concept index per latent, -1 where none qualifies.
    """
    W = W_dec.detach().float()
    D = directions.float()
    norms = torch.linalg.vector_norm(W, dim=2)  # [F, M]
    latent_lives = norms >= lives * norms.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    concept_lives = torch.linalg.vector_norm(D, dim=2) > 0  # [C, M]
    cos = torch.einsum(
        "fmd,cmd->fcm", torch.nn.functional.normalize(W, dim=2), torch.nn.functional.normalize(D, dim=2)
    )  # [F, C, M]
    both = latent_lives[:, None, :] & concept_lives[None, :, :]
    ok = ((cos > min_cosine) | ~both).all(dim=2) & both.any(dim=2)
    score = torch.where(both, cos, torch.zeros(())).sum(2) / both.sum(2).clamp_min(1)
    score = torch.where(ok, score, torch.full_like(score, -math.inf))
    best = score.max(dim=1)
    return torch.where(torch.isfinite(best.values), best.indices, torch.full_like(best.indices, -1))
