"""Collect paired activations from a base model and its fine-tuned version into an activation store.

The same token ids go through both models: documents are tokenized once, with the fine-tuned (chat) model's
tokenizer, after checking that both tokenizers have the same vocabulary. Chat data (a list of {"role", "content"}
messages) gets the chat model's chat template. The activation of layer L is the residual stream after block L
(block L's output; for L < n_layers - 1 that is hidden_states[L + 1] of a transformers causal LM). Each model runs
only up to block L (models.blocks.run_to_layer): no later block, final norm or LM head. Padding is dropped, and
optionally the first `drop_first` tokens of every sequence (e.g. 1: BOS, whose activations are outliers). Every
kept token is one row [2, d] of the store (model 0 = base, 1 = chat), with its token id and position, and its
provenance: the index of its document within its source and the source (data.corpus: a file, a streamed dataset,
or a seeded mixture of those).

Resumable: with resume=True the collection re-tokenizes the documents (tokenizer only, no model) to skip the
rows the store already holds, and continues. Deterministic for a given document list: the batches are groups of
batch_size documents in order, whatever was stored before, so a resumed run pads the batch it restarts in as the
uninterrupted run did (runs it whole, keeps the rows not yet stored) and, on the CPU, writes the same bytes.
"""

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch

from ..errors import InputError, OutputExistsError, require_int
from ..models.blocks import hidden_size, run_to_layers
from ..models.loading import Devices, check_tokenizers, default_model_dtype, load_pair, model_devices, model_name
from .corpus import open_corpus
from .store import ActivationStore, StoreWriter

__all__ = [
    "check_tokenizers",
    "collect",
    "iter_documents",
    "paired_activations",
    "read_documents",
    "template_token_ids",
    "tokenize",
]


def iter_documents(source: Union[os.PathLike, str, Iterable[Any]]) -> Iterator[Union[str, list[Any]]]:
    """The documents of `source`, one at a time (see read_documents): a file is read line by line and a dataset
    streamed, so memory does not grow with the corpus.

    Args:
        source: A JSONL / .txt file or directory, a dataset (see corpus.open_source: "hf:NAME[:SPLIT]", a Hub
            name, a local parquet / arrow / csv file or directory), a mixture, or an iterable of documents.

    Yields:
        Each document: a string, or a list of {"role", "content"} messages.

    Raises:
        MissingInputError: The path does not exist.
        InputError: A line is not UTF-8 or not a JSON object, or a record has neither "text" nor "messages" (the
            file and line are named).
    """
    for document in open_corpus(source):
        yield document.content


def read_documents(source: Union[os.PathLike, str, Iterable[Any]]) -> list[Union[str, list[Any]]]:
    """Documents from a JSONL file ({"text": ...} or {"messages": [...]} per line), a .txt file (one document per
    non-empty line), a directory of those, a dataset ("hf:NAME[:SPLIT]", a Hub name, a local parquet / arrow /
    csv file or directory; needs `datasets`), or any iterable of strings, message lists or records with "text" /
    "messages" (e.g. a datasets.Dataset).

    Raises:
        MissingInputError, InputError: As iter_documents.
    """
    return list(iter_documents(source))


def tokenize(doc: Union[str, Sequence[dict[str, Any]]], tokenizer: Any, context_length: int) -> list[int]:
    """Token ids of a document (a string, or chat messages through the chat template), cut to context_length.

    Raises:
        InputError: The document is neither a string nor a message list, or it is chat data and the tokenizer has
            no chat template.
    """
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


class _Tokenized(NamedTuple):
    """A document of the corpus, tokenized: its place in the corpus's order, its source and index there, ids."""

    order: int
    source: int
    index: int
    ids: list[int]


def _windows(corpus, tokenizer, context_length, drop_first, window, sort):
    """The corpus's documents tokenized `window` at a time, those with a row to keep, longest first within each
    window when `sort` (stable): _Tokenized items in the order collect runs and stores them."""
    chunk = []
    for order, doc in enumerate(corpus):
        ids = tokenize(doc.content, tokenizer, context_length)
        if len(ids) > drop_first:
            chunk.append(_Tokenized(order, doc.source, doc.index, ids))
        if len(chunk) == window:
            yield sorted(chunk, key=lambda item: -len(item.ids)) if sort else chunk
            chunk = []
    if chunk:
        yield sorted(chunk, key=lambda item: -len(item.ids)) if sort else chunk


def _check_resumable(out, info):
    """Before any model loads: a store to resume must hold this run (the same models, layer and batching)."""
    path = os.path.join(os.fspath(out), "store.json")
    try:
        with open(path) as fh:
            stored = json.load(fh).get("info", {})
    except (OSError, ValueError, AttributeError):
        return  # unreadable: StoreWriter names what is wrong with it
    changed = sorted(k for k in info if k in stored and stored[k] != info[k])
    if changed:
        raise InputError(
            f"{path} holds another collection: " + ", ".join(f"{k} {stored[k]!r} (now {info[k]!r})" for k in changed)
        )


def collect(
    base: Union[str, tuple[Any, Any]],
    chat: Union[str, tuple[Any, Any]],
    layer: Union[int, Sequence[int]],
    data: Union[os.PathLike, str, Iterable[Any]],
    out: Union[os.PathLike, str],
    *,
    max_tokens: Optional[int] = None,
    context_length: int = 1024,
    batch_size: int = 8,
    drop_first: int = 1,
    dtype: str = "float16",
    shard_rows: int = 1 << 18,
    device: Devices = None,
    model_dtype: Optional[Union[torch.dtype, str]] = None,
    resume: bool = False,
    progress: bool = True,
    pack_window: int = 64,
    max_norm_ratio: Optional[float] = None,
    split: Optional[str] = None,
    subset: Optional[str] = None,
    column: Optional[str] = None,
    seed: int = 0,
) -> Union[ActivationStore, dict[int, ActivationStore]]:
    """Run both models over `data` and write layer `layer`'s paired activations to the store at `out`; with a list
    of layers, one store per layer under `out` (out/layer-L), all from one forward up to the deepest.

    Documents stream: they are read and tokenized `pack_window` batches at a time, and within such a window
    sorted by length (longest first) before they are cut into batches, so a batch pads little. The batches are
    a function of the documents alone, so a resumed run runs exactly the batches of an uninterrupted one.

    Args:
        base: The base model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        chat: The chat model, likewise (its tokenizer and chat template read the documents).
        layer: The block whose output is stored, or a list of blocks (each model runs only up to the deepest).
        data: A JSONL / .txt file or directory; a dataset streamed with `datasets` (a Hub name with `split`, a
            local parquet / arrow / csv file or directory, "hf:NAME[:SPLIT]"); an iterable of documents or records
            (a datasets.Dataset too); or a mixture: a list of (source, weight) pairs, drawn from `seed`
            (data.corpus). Records give their "messages" (chat template), "conversation" or "text" column.
        out: The store directory.
        max_tokens: Stop after this many rows (None: the whole data).
        context_length: Tokens kept per document.
        batch_size: Documents per forward.
        drop_first: Leading positions of every document not stored (default 1: the first position's massive
            activation; 0 keeps it).
        dtype: Storage dtype: float16, bfloat16 or float32.
        shard_rows: Rows per shard file.
        device: Where the models run: one device, or (base, chat) for models that do not fit together (default:
            CUDA when available).
        model_dtype: dtype to load the models in (default: bfloat16 on a GPU, float32 on the CPU; loaded models
            given as (model, tokenizer) keep theirs).
        resume: Continue a store this collection started.
        progress: Show a tqdm bar over documents with the tokens per second.
        pack_window: Batches per length-sorting window (1: no sorting, documents in their order).
        max_norm_ratio: Drop rows whose norm in either model exceeds this multiple of that model's median row
            norm over the batch (e.g. 10: the outliers of massive activations past the first position); None
            keeps every row. store.json counts the rows dropped per reason ("dropped").
        split: The split of a dataset source (default "train").
        subset: The configuration of a Hub dataset (e.g. "sample-10BT"), or None.
        column: The column of each record read as the document (default: messages, conversation, then text).
        seed: The seed a mixture draws its sources from (the same seed, the same documents in the same order).

    Returns:
        The ActivationStore at `out`, or {layer: ActivationStore} for a list of layers.

    Raises:
        InputError: A bad setting, an unreadable or empty data file (file and line named), a dataset without the
            column or split, mixture weights that do not sum to a positive number, models that do not fit each
            other, a layer out of range, or a store at `out` that holds another collection (all before any weights
            load); non-finite activations (the batch and documents named).
        MissingInputError: `data` names a path that does not exist.
        OutputExistsError: `out` holds a store and resume is False.
    """
    _check_settings(max_norm_ratio, drop_first, context_length, batch_size, pack_window)
    single, layers = _layer_list(layer)
    outs = {x: os.fspath(out) if single else os.path.join(os.fspath(out), f"layer-{x}") for x in layers}
    has_store = _existing_stores(outs, resume)
    corpus = open_corpus(data, split=split, subset=subset, column=column, seed=seed)
    source, count = _describe_data(data, corpus)
    infos = {
        x: _store_info(base, chat, x, drop_first, context_length, batch_size, pack_window, max_norm_ratio, corpus)
        for x in layers
    }
    for x in layers:
        if resume and has_store[x]:
            _check_resumable(outs[x], infos[x])

    m_base, m_chat, t_chat = _load_models(base, chat, layers, device, model_dtype)
    writers = {
        x: StoreWriter(
            outs[x],
            2,
            hidden_size(m_base),
            dtype=dtype,
            shard_rows=shard_rows,
            info=infos[x],
            resume=resume and has_store[x],
            source_names=corpus.names,
        )
        for x in layers
    }
    pad = t_chat.pad_token_id if t_chat.pad_token_id is not None else 0
    run = _Collection(writers, (m_base, m_chat), pad, drop_first, max_tokens, max_norm_ratio, corpus, source)
    bar = _Progress(count, len(layers)) if progress and not run.full() else None
    try:
        windows = _windows(corpus, t_chat, context_length, drop_first, batch_size * pack_window, pack_window > 1)
        for window in windows:
            if run.full():
                break
            run.window(window, batch_size)
            if bar is not None:
                bar.window_done(window, run)
        if run.wrote_nothing() and count is None:
            raise InputError(f"data {source} holds no documents with a token to keep (drop_first = {drop_first})")
        run.close()
    finally:
        if bar is not None:
            bar.close()
    if single:
        return ActivationStore(outs[layer])
    return {x: ActivationStore(outs[x]) for x in layers}


def _check_settings(max_norm_ratio, drop_first, context_length, batch_size, pack_window):
    """collect's numeric settings, before anything is read."""
    if max_norm_ratio is not None and not (
        isinstance(max_norm_ratio, (int, float)) and not isinstance(max_norm_ratio, bool) and max_norm_ratio > 1
    ):
        raise InputError(f"max_norm_ratio must be a number > 1 or None, got {max_norm_ratio!r}")
    for name, value, low in (
        ("drop_first", drop_first, 0),
        ("context_length", context_length, 1),
        ("batch_size", batch_size, 1),
        ("pack_window", pack_window, 1),
    ):
        require_int(name, value, low)


def _layer_list(layer):
    """(whether `layer` names one block, the blocks as a list of distinct ints)."""
    single = isinstance(layer, int) and not isinstance(layer, bool)
    layers = [layer] if single else list(layer) if isinstance(layer, (list, tuple)) else None
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise InputError(f"layer must be a block index or a non-empty list of them, got {layer!r}")
    if len(set(layers)) != len(layers):
        raise InputError(f"layer lists a block more than once: {layers}")
    return single, layers


def _existing_stores(outs, resume):
    """{layer: whether its store directory already holds a store}; one there without resume is refused before
    the models load."""
    has_store = {x: os.path.exists(os.path.join(path, "store.json")) for x, path in outs.items()}
    for x, path in outs.items():
        if not resume and has_store[x]:
            raise OutputExistsError(f"{path} already holds a store; pass resume=True to append to it")
    return has_store


def _describe_data(data, corpus):
    """(how messages name `data`, its number of documents or None when unknown without reading it all), once
    every source opens and (JSONL / text files: every line; datasets: the first row) reads."""
    if corpus.is_mixture:
        source = "the mixture of " + ", ".join(repr(n) for n in corpus.names)
    elif isinstance(data, (str, os.PathLike)):
        source = repr(os.fspath(data))
    else:
        source = f"the {type(data).__name__}"
    corpus.check()
    # A JSONL / text file is read once, keeping nothing: a bad line fails before the models load, and the bar
    # knows the total. A streamed dataset is not counted (that would read it whole).
    count = corpus.count()
    if count == 0:
        raise InputError(f"data {source} holds no documents")
    return source, count


def _store_info(base, chat, layer, drop_first, context_length, batch_size, pack_window, max_norm_ratio, corpus):
    """The "info" of one layer's store.json: what a resumed run must match (a mixture's sources, weights and seed
    among it: they decide the documents' order)."""
    return dict(
        base=model_name(base),
        chat=model_name(chat),
        layer=layer,
        drop_first=drop_first,
        context_length=context_length,
        hidden_states_index=layer + 1,
        batch_size=batch_size,
        pack_window=pack_window,
        **({} if max_norm_ratio is None else {"max_norm_ratio": float(max_norm_ratio)}),
        **({"mixture": corpus.describe()} if corpus.is_mixture else {}),
    )


def _load_models(base, chat, layers, device, model_dtype):
    """(base model, chat model, chat tokenizer), each model on its device in eval mode."""
    base_device, chat_device = model_devices(device)
    (m_base, _), (m_chat, t_chat) = load_pair(base, chat, layers, dtype=model_dtype or default_model_dtype(chat_device))
    return m_base.to(base_device).eval(), m_chat.to(chat_device).eval(), t_chat


def _norm_inliers(rows, max_norm_ratio):
    """Which rows [n, 2, d] stay under max_norm_ratio times the batch's median row norm, in both models."""
    norms = torch.linalg.vector_norm(rows, dim=2)  # [n, 2]
    return (norms <= max_norm_ratio * norms.median(dim=0).values).all(1)


class _Collection:
    """The batches of one collection, run through both models into one store per layer, with the accounting that
    makes a resumed run equal an uninterrupted one.

    Rows are numbered by candidate index: every kept-position token of every document, in batch order, whether
    stored or not. Each store resumes where it stands among the candidates (a crash between two stores' writes
    leaves one a batch ahead); the batches, and the norm filter's decisions, are functions of the documents alone.
    """

    def __init__(self, writers, models, pad, drop_first, max_tokens, max_norm_ratio, corpus, describe):
        self.writers = writers
        self.models = models
        self.pad = pad
        self.drop_first = drop_first
        self.limit = max_tokens if max_tokens is not None else float("inf")
        self.max_norm_ratio = max_norm_ratio
        self.corpus = corpus
        self.describe = describe  # how messages name the data
        self.resume_at = {x: w.candidates_end for x, w in writers.items()}
        self.written = {x: w.meta["rows"] for x, w in writers.items()}
        self.consumed = 0  # candidates of the batches seen
        self.first_positions = 0  # dropped leading positions of the documents seen
        self.n_batches = 0
        self.fresh = 0  # rows this run stored, over all stores

    def full(self) -> bool:
        """Every store holds max_tokens rows."""
        return all(self.written[x] >= self.limit for x in self.writers)

    def wrote_nothing(self) -> bool:
        return all(w == 0 for w in self.written.values())

    def window(self, window, batch_size):
        """Run a length-sorted window batch by batch, until every store is full."""
        for start in range(0, len(window), batch_size):
            self.batch(window[start : start + batch_size])
            if self.full():
                break

    def batch(self, group):
        """Run one batch of _Tokenized documents through the models for the stores that still want its rows."""
        self.n_batches += 1
        self.first_positions += self.drop_first * len(group)
        first_index = self.consumed
        self.consumed += sum(len(item.ids) - self.drop_first for item in group)
        wanted = [x for x in self.writers if self.written[x] < self.limit and self.resume_at[x] < self.consumed]
        if not wanted:  # already in every store (resume), or every store is full
            return
        ids = [item.ids for item in group]
        states, input_ids = paired_states(*self.models, ids, wanted, self.pad)
        per_document = torch.tensor([len(i) - self.drop_first for i in ids])
        documents = torch.tensor([item.index for item in group]).repeat_interleave(per_document)
        sources = torch.tensor([item.source for item in group]).repeat_interleave(per_document)
        for x in wanted:
            rows, tokens, positions = kept_rows(
                states[x], input_ids, [len(i) for i in ids], [self.drop_first] * len(ids)
            )
            index = torch.arange(first_index, self.consumed)
            self._store(x, group, *self._selected(x, rows, tokens, positions, documents, sources, index))

    def _selected(self, x, *columns):
        """The columns (rows, tokens, positions, documents, sources, candidate index) of the rows layer x's store
        takes: those past
        where it resumed, inside the norm filter, up to max_tokens."""
        index = columns[-1]
        keep = index >= self.resume_at[x]
        if self.max_norm_ratio is not None:
            keep &= _norm_inliers(columns[0], self.max_norm_ratio)
        columns = [c[keep] for c in columns]
        if self.written[x] + columns[0].shape[0] > self.limit:
            n = max(0, int(self.limit - self.written[x]))
            columns = [c[:n] for c in columns]
        return columns

    def _store(self, x, group, rows, tokens, positions, documents, sources, index):
        try:
            self.writers[x].append(rows, tokens, positions, candidates=index, documents=documents, sources=sources)
        except InputError as err:  # non-finite activations: name the documents that produced them
            names = self.corpus.names
            where = sorted((item.source, item.index) for item in group)
            if len(names) > 1:
                listed = "documents " + ", ".join(f"{names[s]!r} {i}" for s, i in where) + ", 0-based"
            else:
                listed = f"documents {[i for _, i in where]}, 0-based, of {self.describe}"
            raise InputError(
                f"batch {self.n_batches - 1} of the collection ({listed}), layer {x}, model 0 = base, 1 = chat: {err}"
            ) from err
        self.written[x] += rows.shape[0]
        self.fresh += rows.shape[0]

    def close(self):
        """Write each store's counts of dropped rows and its last shard."""
        for x, w in self.writers.items():
            # Counted from the documents and the candidate index alone, so a resumed run counts what an
            # uninterrupted one does: the candidates up to where this store stopped, less the rows it kept.
            end = self.consumed if self.written[x] < self.limit else w.candidates_end_after_close()
            w.meta["dropped"] = dict(first_positions=self.first_positions)
            if self.max_norm_ratio is not None:
                w.meta["dropped"]["norm_outliers"] = end - self.written[x]
            w.close()


class _Progress:
    """A tqdm bar over the documents read, with the rows stored per second and store."""

    def __init__(self, total, n_stores):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="collect", unit="doc", dynamic_ncols=True)
        self.n_stores = n_stores
        self.seen = 0
        self.started = time.perf_counter()

    def window_done(self, window, run):
        last = max(item.order for item in window) + 1  # documents read so far
        self.bar.update(last - self.seen)
        self.seen = last
        rate = run.fresh / self.n_stores / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(tokens=min(run.written.values()), tok_s=f"{rate:.0f}")

    def close(self):
        self.bar.close()


@torch.no_grad()
def paired_states(
    m_base: Any, m_chat: Any, id_lists: Sequence[Sequence[int]], layers: Sequence[int], pad: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Both models' block outputs at `layers` for a batch of token lists, padded on the right, from one forward
    of each model up to the deepest layer (each model runs where its weights are).

    Args:
        m_base: The base model.
        m_chat: The chat model.
        id_lists: The token ids of each sequence.
        layers: The blocks read.
        pad: The padding token id.

    Returns:
        ({layer: [B, T, 2, d] fp32 on the CPU (model 0 = base, 1 = chat)}, input ids [B, T]).
    """
    length = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), length), pad, dtype=torch.long)
    attention = torch.zeros(len(id_lists), length, dtype=torch.long)
    for i, ids in enumerate(id_lists):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    per_model = []
    for model in (m_base, m_chat):
        where = next(model.parameters()).device
        found = run_to_layers(model, layers, input_ids=input_ids.to(where), attention_mask=attention.to(where))
        per_model.append({x: h.float().cpu() for x, h in found.items()})
    return {x: torch.stack([per_model[0][x], per_model[1][x]], dim=2) for x in layers}, input_ids


def kept_rows(
    states: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int], firsts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of the real tokens of each sequence from its first kept position, in sequence order.

    Args:
        states: [B, T, 2, d] (paired_states).
        input_ids: [B, T].
        lengths: Real tokens per sequence.
        firsts: First position kept per sequence.

    Returns:
        (rows [n, 2, d], token ids [n], positions [n]).
    """
    keep = torch.zeros(input_ids.shape, dtype=torch.bool)
    for i, (n, first) in enumerate(zip(lengths, firsts)):
        keep[i, first:n] = True
    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape)[keep]
    return states[keep], input_ids[keep], positions


def paired_activations(
    m_base: Any,
    m_chat: Any,
    batch: Sequence[tuple[Sequence[int], int]],
    layer: int,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both models' block-`layer` activations of a batch of token lists, padded on the right; each model runs
    where its weights are.

    Args:
        m_base: The base model.
        m_chat: The chat model.
        batch: (token ids, first position to keep) per sequence.
        layer: The block whose output is read (each model runs only up to it).
        pad: The padding token id.

    Returns:
        (rows [n, 2, d] fp32 on the CPU, token ids [n], positions [n]) of the kept tokens, sequence by sequence.
    """
    states, input_ids = paired_states(m_base, m_chat, [ids for ids, _ in batch], [layer], pad)
    return kept_rows(states[layer], input_ids, [len(ids) for ids, _ in batch], [first for _, first in batch])


def template_token_ids(tokenizer: Any) -> list[int]:
    """The ids the chat template adds around the messages: a two-turn conversation rendered with the template,
    minus the ids of its contents tokenized alone (with and without a leading space). For a template whose markup
    shares tokens with ordinary text (a newline, a role name), those tokens count as template tokens everywhere.

    Raises:
        InputError: The tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template")
    contents = ["alpha", "omega"]
    messages = [{"role": "user", "content": contents[0]}, {"role": "assistant", "content": contents[1]}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    content_ids = set()
    for text in contents:
        for variant in (text, " " + text):
            content_ids |= set(tokenizer(variant, add_special_tokens=False)["input_ids"])
    return sorted(set(ids) - content_ids)
