"""Which positions of a document the patching experiment scores.

Position t predicts token t + 1. A plain-text document scores every position from `ignore_first` on (subset
"all"). A conversation ({"messages": [...]}, rendered with the chat model's chat template) scores the positions
that predict its assistant tokens: the first `first_k` of each assistant turn ("first_k") and the others ("rest");
"all" is both. Tokens the template adds (role markers, end-of-turn tokens: data.activations.template_token_ids) do
not count as assistant tokens.

An assistant turn's tokens are found by rendering the conversation up to the turn (with the generation prompt)
and up to its end: the difference is the turn. Templates for which those renderings are not prefixes of the whole
conversation are refused with a clear error rather than guessed at.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..data.activations import template_token_ids, tokenize
from ..errors import InputError

SUBSETS = ("all", "first_k", "rest")
# Per-position labels: what a position is scored as.
NOT_SCORED, FIRST_K, REST, TEXT = 0, 1, 2, 3

Document = Union[str, Sequence[dict[str, Any]]]


@dataclass
class ScoredDocument:
    """A tokenized document and the label of each of its positions.

    Attributes:
        ids: The token ids (cut to the context length).
        labels: [len(ids)] int8: NOT_SCORED, FIRST_K, REST (conversations) or TEXT (plain text).
    """

    ids: list[int]
    labels: torch.Tensor


def is_conversation(doc: Any) -> bool:
    """True for a list of {"role", "content"} messages."""
    return isinstance(doc, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in doc)


def check_documents(docs: Sequence[Any]) -> None:
    """Refuse what cannot be scored, before any model runs: no documents, or a conversation without an assistant
    turn.

    Args:
        docs: Documents as data.activations.read_documents returns them.

    Raises:
        InputError: No documents, or a conversation without an assistant message (its index is named).
    """
    if not docs:
        raise InputError("data holds no documents")
    for i, doc in enumerate(docs):
        if is_conversation(doc) and not any(m.get("role") == "assistant" for m in doc):
            raise InputError(f"document {i} is a conversation without an assistant turn: nothing to score")


def _chat_ids(tokenizer, messages, **kwargs):
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _is_prefix(short, long):
    return len(short) <= len(long) and long[: len(short)] == short


def assistant_spans(messages: Sequence[dict[str, Any]], tokenizer: Any) -> list[tuple[int, int]]:
    """[start, end) token ranges of each assistant turn in the rendered conversation.

    Args:
        messages: The conversation.
        tokenizer: A tokenizer with a chat template.

    Returns:
        One range per assistant message, in order (template tokens inside it included).

    Raises:
        InputError: The template renders a turn that is not a prefix of the whole conversation.
    """
    full = _chat_ids(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        after = _chat_ids(tokenizer, messages[: i + 1])
        before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        if not _is_prefix(before, after):
            before = _chat_ids(tokenizer, messages[:i]) if i else []
        if not (_is_prefix(before, after) and _is_prefix(after, full)):
            raise InputError(
                "the chat template does not render a conversation's turns as prefixes of the whole conversation; "
                "the assistant tokens cannot be located"
            )
        spans.append((len(before), len(after)))
    return spans


def score_document(
    doc: Document,
    tokenizer: Any,
    *,
    context_length: int,
    first_k: int,
    ignore_first: int,
    template_ids: Optional[Collection[int]] = None,
) -> ScoredDocument:
    """Tokenize a document and label its positions (see the module docstring).

    Args:
        doc: A string or a conversation.
        tokenizer: The chat model's tokenizer.
        context_length: Tokens kept per document.
        first_k: Assistant tokens per turn in subset "first_k".
        ignore_first: Positions before this one are never scored.
        template_ids: The chat template's own token ids (None: data.activations.template_token_ids, computed
            when the document is a conversation).

    Returns:
        The ScoredDocument.

    Raises:
        InputError: The document is neither a string nor a conversation, or its template turns cannot be located.
    """
    ids = tokenize(doc, tokenizer, context_length)
    labels = torch.zeros(len(ids), dtype=torch.int8)
    if not is_conversation(doc):
        labels[ignore_first:] = TEXT
        return ScoredDocument(ids, labels)
    template = set(template_token_ids(tokenizer) if template_ids is None else template_ids)
    for start, end in assistant_spans(doc, tokenizer):
        tokens = [t for t in range(max(start, 1), min(end, len(ids))) if ids[t] not in template]
        for rank, t in enumerate(tokens):
            if t - 1 >= ignore_first:
                labels[t - 1] = FIRST_K if rank < first_k else REST
    return ScoredDocument(ids, labels)


def subset_mask(labels: torch.Tensor, subset: str) -> torch.Tensor:
    """Bool mask of the positions in `subset` ("all", "first_k" or "rest") given their labels."""
    if subset == "all":
        return labels != NOT_SCORED
    return labels == (FIRST_K if subset == "first_k" else REST)
