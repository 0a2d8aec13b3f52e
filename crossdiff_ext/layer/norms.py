"""The decoder-norm measures of a crosscoder (docs/math.md, "Reading a crosscoder"): relative norm difference
Delta_norm, cosine of a latent's decoder rows (and the encoder counterparts), and the paper's Delta_norm bands.
Training logs the band counts; diffing/analysis.py builds the latent classes on them."""

from typing import Union

import torch

from ..errors import InputError

# Delta_norm bands of the paper: base-only < 0.1, chat-only > 0.9, shared within 0.1 of 0.5, other in between.
BANDS = ("base_only", "shared", "chat_only", "other")


def rows_of(cc_or_W: Union[torch.nn.Module, torch.Tensor], attr: str = "W_dec") -> torch.Tensor:
    """The [F, M, d] rows (detached, float) of a crosscoder's `attr`, or of a tensor given as is."""
    W = getattr(cc_or_W, attr) if hasattr(cc_or_W, attr) else cc_or_W
    if W.dim() != 3 or W.shape[1] < 2:
        raise InputError(f"W_dec must be [F, M, d] with M >= 2, got {tuple(W.shape)}")
    return W.detach().float()


def delta_norm(cc_or_W: Union[torch.nn.Module, torch.Tensor], base: int = 0, chat: int = 1) -> torch.Tensor:
    """Relative decoder norm difference of every latent: 0 = base-only, 1 = chat-only.

    Delta_norm[j] = 0.5 * ((||W_dec[j, chat]|| - ||W_dec[j, base]||) / max(both) + 1). A latent with both rows
    zero gets 0.5 (it favours neither).

    Args:
        cc_or_W: A crosscoder (its W_dec is read) or a decoder tensor [F, M, d] with M >= 2.
        base: Model index of the base model.
        chat: Model index of the fine-tuned (chat) model.

    Returns:
        [F] float32 values in [0, 1].

    Raises:
        InputError: The rows are not [F, M, d] with M >= 2.
    """
    W = rows_of(cc_or_W)
    nb = torch.linalg.vector_norm(W[:, base], dim=-1)
    nc = torch.linalg.vector_norm(W[:, chat], dim=-1)
    top = torch.maximum(nb, nc)
    diff = torch.where(top > 0, (nc - nb) / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
    return 0.5 * (diff + 1.0)


def decoder_cosine(cc_or_W: Union[torch.nn.Module, torch.Tensor], base: int = 0, chat: int = 1) -> torch.Tensor:
    """Cosine similarity of each latent's base and chat decoder rows (0 where a row is zero).

    Args:
        cc_or_W: A crosscoder (its W_dec is read) or a decoder tensor [F, M, d] with M >= 2.
        base: Model index of the base model.
        chat: Model index of the fine-tuned (chat) model.

    Returns:
        [F] float32 cosines in [-1, 1].

    Raises:
        InputError: The rows are not [F, M, d] with M >= 2.
    """
    W = rows_of(cc_or_W)
    return torch.nn.functional.cosine_similarity(W[:, base], W[:, chat], dim=-1, eps=1e-12)


def encoder_delta_norm(cc: Union[torch.nn.Module, torch.Tensor], base: int = 0, chat: int = 1) -> torch.Tensor:
    """delta_norm of the encoder rows W_enc[j, m].

    Args:
        cc: A crosscoder (its W_enc is read) or an encoder tensor [F, M, d] with M >= 2.
        base: Model index of the base model.
        chat: Model index of the fine-tuned (chat) model.

    Returns:
        [F] float32 values in [0, 1]: 0 = base-only, 1 = chat-only.

    Raises:
        InputError: The rows are not [F, M, d] with M >= 2.
    """
    return delta_norm(rows_of(cc, "W_enc"), base, chat)


def encoder_cosine(cc: Union[torch.nn.Module, torch.Tensor], base: int = 0, chat: int = 1) -> torch.Tensor:
    """decoder_cosine of the encoder rows W_enc[j, m].

    Args:
        cc: A crosscoder (its W_enc is read) or an encoder tensor [F, M, d] with M >= 2.
        base: Model index of the base model.
        chat: Model index of the fine-tuned (chat) model.

    Returns:
        [F] float32 cosines in [-1, 1].

    Raises:
        InputError: The rows are not [F, M, d] with M >= 2.
    """
    return decoder_cosine(rows_of(cc, "W_enc"), base, chat)


def delta_norm_band(
    dn: torch.Tensor, *, chat_only: float = 0.9, base_only: float = 0.1, shared_width: float = 0.1
) -> torch.Tensor:
    """Band name index per latent: 0 base_only (< base_only), 1 shared (within shared_width of 0.5), 2 chat_only
    (> chat_only), 3 other (see BANDS; defaults are the paper's)."""
    band = torch.full(dn.shape, 3, dtype=torch.int64, device=dn.device)
    band[(dn - 0.5).abs() <= shared_width] = 1
    band[dn < base_only] = 0
    band[dn > chat_only] = 2
    return band


def band_counts(cc_or_W: Union[torch.nn.Module, torch.Tensor], base: int = 0, chat: int = 1) -> dict[str, int]:
    """{band: number of latents} by Delta_norm."""
    counts = torch.bincount(delta_norm_band(delta_norm(cc_or_W, base, chat)), minlength=len(BANDS))
    return {name: int(c) for name, c in zip(BANDS, counts.tolist())}
