"""What the instruments that run a base and a fine-tuned model over generic text share: the checked pair placed on
its device, and the corpus as right-padded token batches.

Right padding keeps every real position's hidden states and logits exactly what an unpadded forward gives (the
models are causal: a position reads only itself and earlier ones), so per-position statistics need only the
attention mask to skip the padding.
"""

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..data.activations import read_documents, tokenize
from ..errors import InputError
from ..models.loading import ModelSpec, load_pair, place_model

Data = Union[os.PathLike, str, Iterable[Any]]
Device = Optional[Union[torch.device, str]]


@dataclass
class ModelPair:
    """A base model and its fine-tuned version, loaded, checked and in eval mode.

    Attributes:
        base: The base model.
        chat: The fine-tuned model.
        tokenizer: The fine-tuned model's tokenizer (it reads the corpus).
    """

    base: Any
    chat: Any
    tokenizer: Any


def read_corpus(data: Data) -> list[Any]:
    """The corpus's documents, refused when there are none (before any weights load).

    Args:
        data: A JSONL / .txt file or directory, "hf:NAME[:SPLIT]", or an iterable of strings, message lists or
            {"text" | "messages"} records.

    Returns:
        The documents.

    Raises:
        InputError: No documents (or a record that is neither text nor messages).
        MissingInputError: The path does not exist.
    """
    docs = read_documents(data)
    if not docs:
        raise InputError("data holds no documents")
    return docs


def open_pair(
    base: ModelSpec,
    chat: ModelSpec,
    layers: Sequence[int] = (),
    *,
    device: Device = None,
    model_dtype: Optional[Union[torch.dtype, str]] = None,
) -> ModelPair:
    """Check (tokenizers, widths, layers: from the configs, before weights load), load and place the pair.

    Args:
        base: The base model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        chat: The fine-tuned model, likewise.
        layers: Block indices that will be read (each must exist in both models).
        device: Where the models run (default: loaded models on CUDA when available, given ones where they are).
        model_dtype: dtype to load the weights in (None: the checkpoint's).

    Returns:
        The ModelPair.

    Raises:
        InputError: The tokenizers or widths differ, or a layer is out of range (from the configs, before weights
            load), or the models' unembeddings have different numbers of rows.
    """
    (m_base, _), (m_chat, tokenizer) = load_pair(base, chat, list(layers), dtype=model_dtype)
    rows = [m.get_output_embeddings().weight.shape[0] for m in (m_base, m_chat)]
    if rows[0] != rows[1]:
        raise InputError(f"the models' output vocabularies differ: {rows[0]} (base) vs {rows[1]} (chat) logits")
    return ModelPair(place_model(base, m_base, device), place_model(chat, m_chat, device), tokenizer)


def device_of(model: Any) -> torch.device:
    """The device of a model's first parameter.

    Args:
        model: A torch module.

    Returns:
        Its device.
    """
    return next(model.parameters()).device


def token_ids(docs: Sequence[Any], tokenizer: Any, length: int) -> list[list[int]]:
    """Each document's first `length` token ids (as the tokenizer reads it, special tokens included); documents
    without a token are dropped.

    Args:
        docs: Strings or message lists.
        tokenizer: The tokenizer (its chat template reads message lists).
        length: Tokens kept per document.

    Returns:
        The id lists.

    Raises:
        InputError: No document has a token.
    """
    ids = [t for t in (tokenize(doc, tokenizer, length) for doc in docs) if t]
    if not ids:
        raise InputError("data holds no document with a token")
    return ids


def padded_batches(
    ids: Sequence[Sequence[int]], batch_size: int, pad: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The id lists as right-padded batches.

    Args:
        ids: Token id lists.
        batch_size: Lists per batch.
        pad: The padding id.
        device: Where the tensors go.

    Yields:
        (input_ids [B, T], attention_mask [B, T]), the lists in order.
    """
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(t) for t in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, t in enumerate(chunk):
            input_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            attention[i, : len(t)] = 1
        yield input_ids.to(device), attention.to(device)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (its EOS, else 0, when it has none: padded positions are masked anyway).

    Args:
        tokenizer: A transformers tokenizer.

    Returns:
        The id.
    """
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def token_text(tokenizer: Any, token_id: int) -> str:
    """How a token id reads (decoded alone).

    Args:
        tokenizer: A transformers tokenizer.
        token_id: The id.

    Returns:
        Its text.
    """
    return tokenizer.decode([int(token_id)])


def ranked_tokens(tokenizer: Any, scores: torch.Tensor, k: int, largest: bool = True) -> list[dict[str, Any]]:
    """The k tokens with the largest (or smallest) scores, best first, as plain data.

    Args:
        tokenizer: Decodes the ids.
        scores: [V] one score per vocabulary id.
        k: How many (at most V).
        largest: True: the largest scores first; False: the smallest first.

    Returns:
        [{"token": text, "id": id, "score": score}, ...].
    """
    values, ids = torch.topk(scores.float(), min(k, scores.numel()), largest=largest)
    return [
        {"token": token_text(tokenizer, i), "id": int(i), "score": float(v)}
        for v, i in zip(values.tolist(), ids.tolist())
    ]
