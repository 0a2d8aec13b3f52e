"""Output differences of a base model and its fine-tuned version over a corpus: where their next-token
distributions disagree, and which tokens the fine-tune made more likely.

Per position t of each document (the same token ids in both models), with P the next-token distribution there:
  kl[t]      = KL(P_ft || P_base) = sum_v P_ft(v) (log P_ft(v) - log P_base(v))
  rise[v]    = mean over every position of log P_ft(v) - log P_base(v)
The contexts where the models disagree most are the positions with the largest kl; the tokens the fine-tune
promotes are those with the largest rise (and the ones it suppresses, the smallest). Log-probabilities are taken
in fp32 (or the models' wider dtype) and the sums in float64.
"""

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..errors import require_int
from ..models.loading import ModelSpec, model_name
from .token_batches import (
    Data,
    Device,
    device_of,
    open_pair,
    pad_id,
    padded_batches,
    ranked_tokens,
    read_corpus,
    token_ids,
    token_text,
)

__all__ = ["LogitDiffResult", "logit_diff"]


@dataclass
class LogitDiffResult:
    """What logit_diff returns.

    Attributes:
        kl: One [T_i] float32 tensor per document (those with no token are skipped; "document" below counts the
            kept ones): KL(P_ft || P_base) of the next-token distributions at each of its positions.
        mean_kl: The mean of kl over every position.
        rise: [V] float32: the mean over every position of log P_ft(v) - log P_base(v).
        top_tokens: The tokens with the largest rise, largest first: [{"token", "id", "score"}].
        bottom_tokens: The tokens with the smallest rise, smallest first.
        top_contexts: The positions with the largest kl, largest first: [{"document", "position", "kl",
            "context" (the text up to and including the position), "ft_token", "base_token" (each model's most
            likely next token there)}].
        positions: Positions scored.
        documents: Documents scored.
        context_length: Tokens read per document.
        base: The base model (path, hub name or class name).
        chat: The fine-tuned model, likewise.
    """

    kl: list[torch.Tensor]
    mean_kl: float
    rise: torch.Tensor
    top_tokens: list[dict[str, Any]]
    bottom_tokens: list[dict[str, Any]]
    top_contexts: list[dict[str, Any]]
    positions: int
    documents: int
    context_length: int
    base: str = ""
    chat: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything but the [V] rise (its top and bottom tokens are kept).

        Returns:
            The dict; kl as one list of floats per document.
        """
        keep = ("mean_kl", "top_tokens", "bottom_tokens", "top_contexts", "positions", "documents", "context_length")
        return dict(
            {k: getattr(self, k) for k in keep}, base=self.base, chat=self.chat, kl=[k.tolist() for k in self.kl]
        )


def _log_probs(logits):
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@torch.no_grad()
def _both_log_probs(pair, input_ids, attention):
    """Both models' next-token log-probabilities [B, T, V] on the fine-tuned model's device."""
    logp_ft = _log_probs(pair.chat(input_ids=input_ids, attention_mask=attention, use_cache=False).logits)
    where = device_of(pair.base)
    logits = pair.base(input_ids=input_ids.to(where), attention_mask=attention.to(where), use_cache=False).logits
    return logp_ft, _log_probs(logits).to(logp_ft.device)


def _top_contexts(kl, best, ids, tokenizer, n):
    """The n positions with the largest KL over all documents, largest first (ties: the earlier position)."""
    flat = torch.cat(kl)
    if n == 0 or flat.numel() == 0:
        return []
    owner = torch.cat([torch.full((len(k),), i, dtype=torch.long) for i, k in enumerate(kl)])
    offset = torch.cat([torch.arange(len(k)) for k in kl])
    order = torch.sort(flat, descending=True, stable=True).indices[:n]
    out = []
    for i in order.tolist():
        doc, pos = int(owner[i]), int(offset[i])
        ft_id, base_id = best[doc][pos].tolist()
        out.append(
            {
                "document": doc,
                "position": pos,
                "kl": float(flat[i]),
                "context": tokenizer.decode(ids[doc][: pos + 1]),
                "ft_token": token_text(tokenizer, ft_id),
                "base_token": token_text(tokenizer, base_id),
            }
        )
    return out


def logit_diff(
    base: ModelSpec,
    chat: ModelSpec,
    data: Data,
    *,
    context_length: int = 128,
    batch_size: int = 8,
    top_k: int = 30,
    n_contexts: int = 10,
    device: Device = None,
    model_dtype: Optional[Union[torch.dtype, str]] = None,
) -> LogitDiffResult:
    """Compare the two models' next-token distributions over a corpus (see the module docstring).

    Args:
        base: The base model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        chat: The fine-tuned model, likewise; its tokenizer reads the corpus.
        data: Documents: a JSONL / .txt file or directory, "hf:NAME[:SPLIT]", or an iterable of strings, message
            lists or {"text" | "messages"} records.
        context_length: Tokens read per document (its first ones).
        batch_size: Documents per forward.
        top_k: Tokens listed in top_tokens and bottom_tokens.
        n_contexts: Positions listed in top_contexts.
        device: Where the models run (default: loaded models on CUDA when available, given ones where they are).
        model_dtype: dtype to load the models in (None: the checkpoint's).

    Returns:
        The LogitDiffResult.

    Raises:
        InputError: A setting out of range, an empty corpus, or models whose tokenizers or widths differ (all
            before any weights load).
    """
    for name, value in (("context_length", context_length), ("batch_size", batch_size)):
        require_int(name, value, 1)
    require_int("top_k", top_k, 1)
    require_int("n_contexts", n_contexts, 0)
    docs = read_corpus(data)
    pair = open_pair(base, chat, device=device, model_dtype=model_dtype)
    ids = token_ids(docs, pair.tokenizer, context_length)
    kl, best, rise_sum, positions = [], [], 0.0, 0
    for input_ids, attention in padded_batches(ids, batch_size, pad_id(pair.tokenizer), device_of(pair.chat)):
        logp_ft, logp_base = _both_log_probs(pair, input_ids, attention)
        real, lengths = attention.bool(), attention.sum(1).tolist()
        gap = (logp_ft - logp_base)[real]  # [n, V]: the batch's real positions, document after document
        kl += list((logp_ft[real].exp() * gap).sum(-1).float().cpu().split(lengths))
        argmax = torch.stack([logp_ft.argmax(-1), logp_base.argmax(-1)], -1)[real].cpu()
        best += list(argmax.split(lengths))
        rise_sum = rise_sum + gap.double().sum(0)
        positions += gap.shape[0]
    rise = (rise_sum / positions).float().cpu()
    return LogitDiffResult(
        kl=kl,
        mean_kl=float(torch.cat(kl).double().mean()),
        rise=rise,
        top_tokens=ranked_tokens(pair.tokenizer, rise, top_k),
        bottom_tokens=ranked_tokens(pair.tokenizer, rise, top_k, largest=False),
        top_contexts=_top_contexts(kl, best, ids, pair.tokenizer, n_contexts),
        positions=positions,
        documents=len(ids),
        context_length=context_length,
        base=model_name(base),
        chat=model_name(chat),
    )
