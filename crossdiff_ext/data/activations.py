"""Collect paired activations from a base model and its fine-tuned version into an activation store.

The same token ids go through both models: documents are tokenized once, with the fine-tuned (chat) model's
tokenizer, after checking that both tokenizers have the same vocabulary. Chat data (a list of {"role", "content"}
messages) gets the chat model's chat template. The activation of layer L is the residual stream after block L
(block L's output; for L < n_layers - 1 that is hidden_states[L + 1] of a transformers causal LM). Each model runs
only up to block L (decoder_blocks.run_to_layer): no later block, final norm or LM head. Padding is dropped, and
optionally the first `drop_first` tokens of every sequence (e.g. 1: BOS, whose activations are outliers). Every
kept token is one row [2, d] of the store (model 0 = base, 1 = chat), with its token id and position.

Resumable: with resume=True the collection re-tokenizes the documents (tokenizer only, no model) to skip the
rows the store already holds, and continues. Deterministic for a given document list: the batches are groups of
batch_size documents in order, whatever was stored before, so a resumed run pads the batch it restarts in as the
uninterrupted run did (runs it whole, keeps the rows not yet stored) and, on the CPU, writes the same bytes.
"""

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch

from ..errors import InputError, MissingInputError, OutputExistsError
from .decoder_blocks import hidden_size, run_to_layer
from .models import check_tokenizers, load_pair, model_name
from .store import ActivationStore, StoreWriter

__all__ = ["check_tokenizers", "collect", "paired_activations", "read_documents", "template_token_ids", "tokenize"]


def _record(record, where):
    """A document from a JSONL line or a dataset row: its "messages" (chat) or "text"."""
    if isinstance(record, str):
        return record
    if isinstance(record, (list, tuple)):
        return list(record)
    if hasattr(record, "keys"):
        if record.get("messages") is not None:
            return list(record["messages"])
        if record.get("text") is not None:
            return record["text"]
        raise InputError(f"{where}: a record needs 'text' or 'messages', got keys {sorted(record.keys())}")
    raise InputError(f"{where}: a document must be a string, a message list or a record, got {type(record).__name__}")


def _hub_dataset(spec):
    """ "hf:NAME[:SPLIT]" -> the rows of datasets.load_dataset(NAME, split=SPLIT or "train")."""
    name, _, split = spec[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"data {spec!r} is a Hugging Face dataset and needs the datasets package (pip install datasets)"
        ) from None
    return datasets.load_dataset(name, split=split or "train")


def read_documents(source: Union[os.PathLike, str, Iterable[Any]]) -> list[Union[str, list[Any]]]:
    """Documents from a JSONL file ({"text": ...} or {"messages": [...]} per line), a .txt file (one document per
    non-empty line), a directory of those, "hf:NAME[:SPLIT]" (a Hugging Face dataset, needs `datasets`), or any
    iterable of strings, message lists or records with "text" / "messages" (e.g. a datasets.Dataset)."""
    if isinstance(source, str) and source.startswith("hf:"):
        source = _hub_dataset(source)
    if not isinstance(source, (str, os.PathLike)):
        if not hasattr(source, "__iter__"):
            raise ValueError(f"data must be a path, 'hf:NAME' or an iterable of documents, got {type(source).__name__}")
        return [_record(r, f"document {i}") for i, r in enumerate(source)]
    path = os.fspath(source)
    if os.path.isdir(path):
        docs = []
        for name in sorted(os.listdir(path)):
            if name.endswith((".jsonl", ".txt")):
                docs += read_documents(os.path.join(path, name))
        return docs
    if not os.path.exists(path):
        raise MissingInputError(f"data {path!r} does not exist")
    docs = []
    try:
        with open(path, "rb") as fh:  # bytes, decoded per line: a decoding error then names its line
            for i, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as err:
                    raise InputError(f"{path}:{i}: not UTF-8 text ({err})") from None
                if not line:
                    continue
                if path.endswith(".jsonl"):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise InputError(f"{path}:{i}: not JSON ({err})") from None
                    if not isinstance(record, dict):
                        raise InputError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
                    docs.append(_record(record, f"{path}:{i}"))
                else:
                    docs.append(line)
    except (IsADirectoryError, PermissionError) as err:
        raise InputError(f"data {path!r} cannot be read ({err})") from None
    return docs


def tokenize(doc: Union[str, Sequence[dict[str, Any]]], tokenizer: Any, context_length: int) -> list[int]:
    """Token ids of a document (a string, or chat messages through the chat template), cut to context_length."""
    if isinstance(doc, str):
        ids = tokenizer(doc)["input_ids"]
    elif isinstance(doc, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in doc):
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("chat data needs the chat model's tokenizer to have a chat template")
        ids = tokenizer.apply_chat_template(list(doc), tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        raise InputError(f"a document must be a string or a list of {{'role', 'content'}} messages, got {doc!r:.80}")
    return list(ids)[:context_length]


def collect(
    base: Union[str, tuple[Any, Any]],
    chat: Union[str, tuple[Any, Any]],
    layer: int,
    data: Union[os.PathLike, str, Iterable[Any]],
    out: Union[os.PathLike, str],
    *,
    max_tokens: Optional[int] = None,
    context_length: int = 1024,
    batch_size: int = 8,
    drop_first: int = 0,
    dtype: str = "float16",
    shard_rows: int = 1 << 18,
    device: Optional[Union[torch.device, str]] = None,
    model_dtype: Optional[Union[torch.dtype, str]] = None,
    resume: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Run both models over `data` and write layer `layer`'s paired activations to the store at `out`.
    base/chat: model directories or hub names (or already loaded (model, tokenizer) pairs). Returns the store."""
    if drop_first < 0 or context_length < 1 or batch_size < 1:
        raise InputError(
            f"drop_first must be >= 0, context_length and batch_size >= 1; got {drop_first}, {context_length}, "
            f"{batch_size}"
        )
    if not resume and os.path.exists(os.path.join(os.fspath(out), "store.json")):  # before the models load
        raise OutputExistsError(f"{os.fspath(out)} already holds a store; pass resume=True to append to it")
    source = repr(os.fspath(data)) if isinstance(data, (str, os.PathLike)) else f"the {type(data).__name__}"
    documents = read_documents(data)  # before the models load: a bad data file fails at once
    if not documents:
        raise InputError(f"data {source} holds no documents")

    (m_base, t_base), (m_chat, t_chat) = load_pair(base, chat, [layer], dtype=model_dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    m_base, m_chat = m_base.to(device).eval(), m_chat.to(device).eval()
    d = hidden_size(m_base)
    info = dict(
        base=model_name(base),
        chat=model_name(chat),
        layer=layer,
        drop_first=drop_first,
        context_length=context_length,
        hidden_states_index=layer + 1,
    )
    writer = StoreWriter(
        out,
        2,
        d,
        dtype=dtype,
        shard_rows=shard_rows,
        info=info,
        resume=resume and os.path.exists(os.path.join(os.fspath(out), "store.json")),
    )
    skip = writer.meta["rows"]
    if max_tokens is not None and skip >= max_tokens:
        writer.close()
        return ActivationStore(out)
    pad = t_chat.pad_token_id if t_chat.pad_token_id is not None else 0
    docs = [tokenize(doc, t_chat, context_length) for doc in documents]
    written = skip
    limit = max_tokens if max_tokens is not None else float("inf")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(max(0, len(ids) - drop_first) for ids in docs)
        bar = tqdm(
            total=total if max_tokens is None else min(total, max_tokens), initial=skip, desc="collect", unit="tok"
        )
    # The batches are fixed by the documents alone (batch_size documents that keep a token each), so a resumed run
    # pads and runs exactly the batches of an uninterrupted one: the same shapes give the same floats.
    with_rows = [(index, ids) for index, ids in enumerate(docs) if len(ids) > drop_first]
    try:
        for n_batches, start in enumerate(range(0, len(with_rows), batch_size)):
            group = with_rows[start : start + batch_size]
            stored = sum(len(ids) - drop_first for _, ids in group)
            if skip >= stored:  # the whole batch is already in the store (resume)
                skip -= stored
                continue
            batch = []  # (ids, first position to keep): rows already in the store are run but not kept
            for _, ids in group:
                take = min(skip, len(ids) - drop_first)
                batch.append((ids, drop_first + take))
                skip -= take
            rows, tokens, positions = paired_activations(m_base, m_chat, batch, layer, pad, device)
            if written + rows.shape[0] > limit:
                keep = max(0, int(limit - written))
                rows, tokens, positions = rows[:keep], tokens[:keep], positions[:keep]
            try:
                writer.append(rows, tokens, positions)
            except InputError as err:  # non-finite activations: name the documents that produced them
                raise InputError(
                    f"batch {n_batches} of the collection (documents {group[0][0]} to {group[-1][0]}, 0-based, "
                    f"of {source}), model 0 = base, 1 = chat: {err}"
                ) from err
            written += rows.shape[0]
            if bar is not None:
                bar.update(rows.shape[0])
            if written >= limit:
                break
        writer.close()
    finally:
        if bar is not None:
            bar.close()
    return ActivationStore(out)


@torch.no_grad()
def paired_activations(
    m_base: Any,
    m_chat: Any,
    batch: Sequence[tuple[Sequence[int], int]],
    layer: int,
    pad: int,
    device: Union[torch.device, str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both models' block-`layer` activations of a batch of token lists, padded on the right.

    Args:
        m_base: The base model.
        m_chat: The chat model.
        batch: (token ids, first position to keep) per sequence.
        layer: The block whose output is read (each model runs only up to it).
        pad: The padding token id.
        device: Where the models run.

    Returns:
        (rows [n, 2, d] fp32 on the CPU, token ids [n], positions [n]) of the kept tokens, sequence by sequence.
    """
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
    keep = torch.zeros(len(batch), length, dtype=torch.bool)
    attention = torch.zeros(len(batch), length, dtype=torch.long)
    for i, (ids, first) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        keep[i, first : len(ids)] = True
    input_ids, attention = input_ids.to(device), attention.to(device)
    states = [run_to_layer(m, layer, input_ids=input_ids, attention_mask=attention) for m in (m_base, m_chat)]
    keep = keep.to(device)
    rows = torch.stack([s[keep] for s in states], dim=1).float().cpu()
    positions = torch.arange(length, device=device).expand(len(batch), length)[keep].cpu()
    return rows, input_ids[keep].cpu(), positions


def template_token_ids(tokenizer: Any) -> list[int]:
    """The ids the chat template adds around the messages: a two-turn conversation rendered with the template,
    minus the ids of its contents tokenized alone (with and without a leading space). For a template whose markup
    shares tokens with ordinary text (a newline, a role name), those tokens count as template tokens everywhere."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    contents = ["alpha", "omega"]
    messages = [{"role": "user", "content": contents[0]}, {"role": "assistant", "content": contents[1]}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    content_ids = set()
    for text in contents:
        for variant in (text, " " + text):
            content_ids |= set(tokenizer(variant, add_special_tokens=False)["input_ids"])
    return sorted(set(ids) - content_ids)
