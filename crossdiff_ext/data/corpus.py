"""Document sources for collection: JSONL / text files, `datasets` sources (a Hub dataset with a split, or local
parquet / arrow / csv files and directories, all streamed), any iterable of documents, and weighted mixtures of
those.

Every source yields its documents in input order. A Corpus numbers them: each document comes as
Document(source, index, content), `source` the position of its source in the corpus, `index` its 0-based place
within that source (the n-th non-empty line of a JSONL file, the n-th row of a dataset). A mixture draws the
source of each next document from a seeded generator (Python's random.Random, whose sequence is fixed across
Python versions) in proportion to the weights; a source that runs out leaves the draw and the others go on with
their weights renormalised. The sequence is a function of the seed and the sources alone, which keeps a resumed
collection exact.

A record becomes a document through its "messages" column (chat: a list of {"role", "content"}, rendered later
with the chat template), else its "conversation" column (the same shape, as in LMSys-Chat-1M), else its "text"
column; a source may name its column instead.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Optional, Union

from ..errors import InputError, MissingInputError

__all__ = [
    "Corpus",
    "DatasetSource",
    "Document",
    "FileSource",
    "IterableSource",
    "Source",
    "open_corpus",
    "open_source",
    "parse_source_spec",
]

CHAT_COLUMNS = ("messages", "conversation")
TEXT_COLUMN = "text"
DATASET_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
JSON_SUFFIXES = (".jsonl", ".txt")
_HUB_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*(/[\w.-]+)?)(\[(?P<subset>[\w.-]+)\])?$")

Content = Union[str, list[Any]]


class Document(NamedTuple):
    """One document of a corpus.

    Attributes:
        source: The position of its source in the corpus (0 for a single source).
        index: Its 0-based place in its source, in the source's order.
        content: A string, or a list of {"role", "content"} messages.
    """

    source: int
    index: int
    content: Content


def record_document(record: Any, where: str, column: Optional[str] = None) -> Content:
    """The document of one record: a string, a message list, or a mapping with a chat or text column.

    Args:
        record: A JSONL line's object, a dataset row, a string or a message list.
        where: How an error names the record (file and line, or source and row).
        column: The column to read; None: "messages", "conversation", then "text".

    Returns:
        A string, or a list of messages.

    Raises:
        InputError: The record has no such column, or is of another kind.
    """
    if isinstance(record, str):
        return record
    if isinstance(record, (list, tuple)):
        return list(record)
    if hasattr(record, "keys"):
        if column is not None:
            if column not in record.keys():
                raise InputError(f"{where}: no column {column!r} (columns: {sorted(record.keys())})")
            return record_document(record[column], where)
        for key in CHAT_COLUMNS:
            if record.get(key) is not None:
                return list(record[key])
        if record.get(TEXT_COLUMN) is not None:
            return record[TEXT_COLUMN]
        raise InputError(f"{where}: a record needs 'text' or 'messages', got keys {sorted(record.keys())}")
    raise InputError(f"{where}: a document must be a string, a message list or a record, got {type(record).__name__}")


class Source:
    """Documents in input order, from one place.

    Attributes:
        name: How the store and the messages name the source.
    """

    name: str = "documents"

    def documents(self) -> Iterator[Content]:
        """The documents, in order (a fresh pass each call)."""
        raise NotImplementedError

    def count(self) -> Optional[int]:
        """The number of documents when it is cheap to know (None otherwise)."""
        return None

    def check(self) -> None:
        """Fail early (before any model loads) on a source that cannot be read: by default, read its first
        document."""
        for _ in self.documents():
            return


class FileSource(Source):
    """A JSONL file ({"text": ...} or {"messages": [...]} per line), a .txt file (one document per non-empty line)
    or a directory of those (files in name order), read line by line.

    Args:
        path: The file or directory.
        column: The column of each JSON object to read (None: messages, conversation, then text).
    """

    def __init__(self, path: Union[os.PathLike, str], column: Optional[str] = None):
        self.path = os.fspath(path)
        self.name = self.path
        self.column = column

    def files(self) -> list[str]:
        """The files read, in order.

        Raises:
            MissingInputError: The path does not exist.
        """
        if os.path.isdir(self.path):
            return [os.path.join(self.path, n) for n in sorted(os.listdir(self.path)) if n.endswith(JSON_SUFFIXES)]
        if not os.path.exists(self.path):
            raise MissingInputError(f"data {self.path!r} does not exist")
        return [self.path]

    def documents(self) -> Iterator[Content]:
        for path in self.files():
            yield from self._file_documents(path)

    def count(self) -> int:
        """Reads every line once, keeping nothing: a malformed line fails here, with its file and line."""
        return sum(1 for _ in self.documents())

    def check(self) -> None:
        self.files()

    def _file_documents(self, path):
        try:
            with open(path, "rb") as fh:  # bytes, decoded per line: a decoding error then names its line
                for i, raw in enumerate(fh, 1):
                    try:
                        line = raw.decode("utf-8").strip()
                    except UnicodeDecodeError as err:
                        raise InputError(f"{path}:{i}: not UTF-8 text ({err})") from None
                    if line:
                        yield self._json_document(line, f"{path}:{i}") if path.endswith(".jsonl") else line
        except (IsADirectoryError, PermissionError) as err:
            raise InputError(f"data {path!r} cannot be read ({err})") from None

    def _json_document(self, line, where):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not JSON ({err})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        return record_document(record, where, self.column)


class IterableSource(Source):
    """Any iterable of documents or records (a list, a datasets.Dataset or IterableDataset, a generator).

    Args:
        items: The documents or records; iterated once per pass (a generator allows one pass only).
        name: How the store names the source (default: the iterable's type).
        column: The column of each record to read (None: messages, conversation, then text).
    """

    def __init__(self, items: Iterable[Any], name: Optional[str] = None, column: Optional[str] = None):
        if not hasattr(items, "__iter__"):
            raise InputError(
                f"data must be a path, a dataset name or an iterable of documents, got {type(items).__name__}"
            )
        self.items = items
        self.name = name or type(items).__name__
        self.column = column

    def documents(self) -> Iterator[Content]:
        for i, r in enumerate(self.items):
            yield record_document(r, f"document {i}", self.column)

    def count(self) -> Optional[int]:
        return len(self.items) if hasattr(self.items, "__len__") else None

    def check(self) -> None:
        if iter(self.items) is self.items:  # a generator: reading its first document would lose it
            return
        super().check()


def _datasets():
    try:
        import datasets
    except ImportError:
        raise InputError(
            "reading a dataset needs the datasets package: pip install 'crossdiff_ext[datasets]'"
        ) from None
    return datasets


class DatasetSource(Source):
    """A dataset, streamed (nothing is loaded whole): a Hub dataset by name, a local parquet / arrow / csv / json
    file, a directory of those, or a directory written by Dataset.save_to_disk (memory-mapped). Parquet files are
    read one row group at a time with pyarrow, the rest through datasets.load_dataset(..., streaming=True).

    Args:
        path: A Hub dataset name ("HuggingFaceFW/fineweb") or a local file or directory.
        split: The split to read (default "train"; local files form one split, "train").
        subset: The Hub dataset's configuration ("sample-10BT"), or None.
        column: The column to read (None: messages, conversation, then text).
        name: How the store names the source (default: `path`, with the subset and split when given).
    """

    def __init__(
        self,
        path: Union[os.PathLike, str],
        split: Optional[str] = None,
        subset: Optional[str] = None,
        column: Optional[str] = None,
        name: Optional[str] = None,
    ):
        self.path = os.fspath(path)
        self.split = split
        self.subset = subset
        self.column = column
        self.name = name or self.path + (f"[{subset}]" if subset else "") + (f":{split}" if split else "")

    def _local_files(self):
        """(builder, files) of a local file or directory of dataset files; (None, None) for a Hub name or a
        save_to_disk directory."""
        if os.path.isdir(self.path):
            if os.path.exists(os.path.join(self.path, "dataset_info.json")) or os.path.exists(
                os.path.join(self.path, "dataset_dict.json")
            ):
                return None, None
            files = sorted(n for n in os.listdir(self.path) if os.path.splitext(n)[1] in DATASET_BUILDERS)
            kinds = {DATASET_BUILDERS[os.path.splitext(n)[1]] for n in files}
            if len(kinds) != 1:
                found = (
                    "no parquet, arrow, csv or json file" if not kinds else f"files of several kinds {sorted(kinds)}"
                )
                raise InputError(f"data {self.path!r}: a dataset directory needs files of one kind, found {found}")
            return kinds.pop(), [os.path.join(self.path, n) for n in files]
        if os.path.isfile(self.path):
            suffix = os.path.splitext(self.path)[1]
            if suffix not in DATASET_BUILDERS:
                known = ", ".join(JSON_SUFFIXES + tuple(DATASET_BUILDERS))
                raise InputError(f"data {self.path!r}: not a data file this reads (suffixes: {known})")
            return DATASET_BUILDERS[suffix], [self.path]
        return None, None

    def _rows(self):
        builder, files = self._local_files()
        split = self.split or "train"
        if builder is not None and split != "train":
            raise InputError(f"data {self.path!r}: no split {split!r} (local data files form one split, 'train')")
        if builder == "parquet":
            return _parquet_rows(files, self._columns_wanted())
        datasets = _datasets()
        try:
            if builder is not None:
                return datasets.load_dataset(builder, data_files=files, split=split, streaming=True)
            if os.path.isdir(self.path):  # Dataset.save_to_disk: memory-mapped arrow, read row by row
                loaded = datasets.load_from_disk(self.path)
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise ValueError(f'Unknown split "{split}". Should be one of {list(loaded)}.')
                    loaded = loaded[split]
                elif self.split not in (None, "train"):
                    raise ValueError(f'Unknown split "{split}": {self.path} holds one split.')
                return loaded
            return datasets.load_dataset(self.path, self.subset, split=split, streaming=True)
        except (ValueError, KeyError) as err:  # datasets' unknown split / bad config
            raise InputError(f"data {self.path!r}, split {split!r}: {_first_line(err)}") from None
        except (FileNotFoundError, ConnectionError, OSError) as err:
            raise InputError(
                f"data {self.path!r} is neither a local path nor a reachable Hub dataset ({_first_line(err)})"
            ) from None

    def _columns_wanted(self):
        """The columns a record's document can come from."""
        return (self.column,) if self.column is not None else (*CHAT_COLUMNS, TEXT_COLUMN)

    def documents(self) -> Iterator[Content]:
        rows = self._rows()
        try:
            for i, row in enumerate(rows):
                yield record_document(row, f"data {self.name!r}, row {i}", self.column)
        except (ValueError, KeyError) as err:
            if isinstance(err, InputError):
                raise
            raise InputError(f"data {self.name!r}: {_first_line(err)}") from None

    def count(self) -> Optional[int]:
        """The rows of a save_to_disk directory or of local parquet files (from their metadata: nothing is read);
        None for other sources."""
        builder, files = self._local_files()
        if builder == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if builder is None and os.path.isdir(self.path):
            rows = self._rows()
            return len(rows) if hasattr(rows, "__len__") else None
        return None


def _parquet_rows(files, wanted):
    """The rows of local parquet files, one row group at a time, reading only the columns a document can come
    from (all of them when none is there, so that the error lists them). Why not datasets' streaming reader: over
    a 265 MiB file of 60 row groups of 1000 texts it grew the process's anonymous memory by 405 MiB (by 168 MiB
    over an 88 MiB file), one row group at a time by 31 MiB over either (datasets 5.2.0, pyarrow 26.0.1; peak
    RssAnon sampled every 200 rows, docs/training.md)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading parquet needs the pyarrow package: pip install 'crossdiff_ext[datasets]'") from None
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(f"data {path!r}: not a readable parquet file ({_first_line(err)})") from None
        columns = [c for c in wanted if c in names] or None
        for group in range(parquet.num_row_groups):
            yield from parquet.read_row_group(group, columns=columns).to_pylist()


def _first_line(err):
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def open_source(
    spec: Union[os.PathLike, str, Iterable[Any], Source],
    *,
    split: Optional[str] = None,
    subset: Optional[str] = None,
    column: Optional[str] = None,
) -> Source:
    """The Source a data argument names.

    Args:
        spec: A Source; a .jsonl / .txt file or a directory of those; a .parquet / .arrow / .csv file, a directory
            of those or of Dataset.save_to_disk; "hf:NAME[:SPLIT]", a Hub dataset name, or NAME[SUBSET] (a Hub
            dataset and its configuration); or an iterable of documents or records (a datasets.Dataset too).
        split: The split of a dataset source (default "train"); refused for a JSONL / text source.
        subset: A Hub dataset's configuration.
        column: The column of each record to read (None: messages, conversation, then text).

    Returns:
        The source.

    Raises:
        MissingInputError: A path with a data file's suffix that does not exist.
        InputError: A split given for a JSONL / text source, or a spec of no known kind.
    """
    if isinstance(spec, Source):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        return IterableSource(spec, column=column)
    path = os.fspath(spec)
    if path.startswith("hf:"):
        name, _, hf_split = path[3:].partition(":")
        return DatasetSource(name, split=split or hf_split or None, subset=subset, column=column)
    if _is_json_source(path):
        if split not in (None, "train"):
            raise InputError(f"data {path!r}: a JSONL / text source has no splits (got split {split!r})")
        return FileSource(path, column=column)
    if os.path.exists(path):
        return DatasetSource(path, split=split, subset=subset, column=column)
    named = _HUB_NAME.match(path)
    if named:  # NAME[SUBSET]: a Hub dataset with its configuration, so a mixture can give each source its own
        return DatasetSource(named["name"], split=split, subset=named["subset"] or subset, column=column)
    raise MissingInputError(f"data {path!r} does not exist (and is not a Hub dataset name)")


def _is_json_source(path):
    """A JSONL / text file (existing or not: a missing one is named as missing), or a directory holding one."""
    if path.endswith(JSON_SUFFIXES):
        return True
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "dataset_info.json")):
        names = os.listdir(path)
        lines, tables = (any(n.endswith(JSON_SUFFIXES) for n in names), any(_is_table(n) for n in names))
        if lines and tables:
            raise InputError(
                f"data {path!r} holds both JSONL / text files and dataset files; give a directory of one kind"
            )
        return lines
    return False


def _is_table(name):
    return os.path.splitext(name)[1] in DATASET_BUILDERS


def parse_source_spec(text: str) -> tuple[str, Optional[float]]:
    """Split a command-line data argument PATH[:WEIGHT] into (path, weight or None). A path that exists as given
    keeps any colon it holds; "hf:NAME:SPLIT" keeps its split.

    Args:
        text: The argument.

    Returns:
        (the source's path or name, its weight or None).
    """
    if os.path.exists(text):
        return text, None
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, None


class Corpus:
    """Numbered documents from one source or a weighted mixture of several (see the module's docstring).

    Args:
        sources: The sources, in the order their ids number them.
        weights: One weight per source (finite, >= 0, positive sum); None: one source, or equal weights.
        seed: The mixture's seed: the same seed gives the same sequence of documents.
    """

    def __init__(self, sources: Sequence[Source], weights: Optional[Sequence[float]] = None, seed: int = 0):
        if not sources:
            raise InputError("data names no source")
        self.sources = list(sources)
        self.weights = _checked_weights(weights, len(self.sources))
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    @property
    def names(self) -> list[str]:
        """The sources' names, by id."""
        return [s.name for s in self.sources]

    @property
    def is_mixture(self) -> bool:
        """Whether documents come from more than one source."""
        return len(self.sources) > 1

    def describe(self) -> dict[str, Any]:
        """What a store records of a mixture, for resume to check: names, weights and seed."""
        return dict(sources=self.names, weights=self.weights, seed=self.seed)

    def check(self) -> None:
        """Open every source and read its first document (a bad column, split or file fails here)."""
        for s in self.sources:
            s.check()

    def count(self) -> Optional[int]:
        """The number of documents, when every source drawn from knows its own (a mixture draws them all in the
        end)."""
        counts = [s.count() for s, w in zip(self.sources, self.weights) if w > 0]
        return None if any(c is None for c in counts) else sum(counts)

    def __iter__(self) -> Iterator[Document]:
        if not self.is_mixture:
            for index, content in enumerate(self.sources[0].documents()):
                yield Document(0, index, content)
            return
        draw = random.Random(self.seed)
        streams = {i: iter(s.documents()) for i, s in enumerate(self.sources) if self.weights[i] > 0}
        taken = dict.fromkeys(streams, 0)
        while streams:
            ids = list(streams)
            chosen = draw.choices(ids, weights=[self.weights[i] for i in ids])[0]
            try:
                content = next(streams[chosen])
            except StopIteration:
                del streams[chosen]
                continue
            yield Document(chosen, taken[chosen], content)
            taken[chosen] += 1


def _checked_weights(weights, n):
    if weights is None:
        return [1.0 / n] * n
    weights = list(weights)
    if len(weights) != n:
        raise InputError(f"data: {len(weights)} weights for {n} sources")
    for w in weights:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise InputError(f"data: a mixture weight must be a finite number >= 0, got {w!r}")
    total = float(sum(weights))
    if total <= 0:
        raise InputError(f"data: the mixture weights {weights} do not sum to a positive number")
    return [float(w) / total for w in weights]


def open_corpus(
    data: Union[os.PathLike, str, Iterable[Any], Source, Corpus, Sequence[tuple[Any, float]]],
    *,
    split: Optional[str] = None,
    subset: Optional[str] = None,
    column: Optional[str] = None,
    seed: int = 0,
) -> Corpus:
    """The Corpus a data argument names: one source (see open_source), a Corpus as it is, or a mixture given as a
    list of (source, weight) pairs.

    Args:
        data: The data argument.
        split, subset, column: As open_source, for every source.
        seed: The mixture's seed.

    Returns:
        The corpus.

    Raises:
        InputError: Weights that are negative, not finite or do not sum to a positive number; a bad source.
    """
    if isinstance(data, Corpus):
        return data
    options = dict(split=split, subset=subset, column=column)
    if _is_weighted_list(data):
        sources = [open_source(spec, **options) for spec, _ in data]
        return Corpus(sources, [w for _, w in data], seed=seed)
    return Corpus([open_source(data, **options)], seed=seed)


def _is_weighted_list(data):
    """A list of (source, weight) pairs: no document is a pair whose second item is a number."""

    def weighted(item):
        return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (int, float))

    return isinstance(data, (list, tuple)) and len(data) > 0 and all(weighted(item) for item in data)
