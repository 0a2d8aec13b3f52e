"""Document sources and mixtures (crossdiff_ext/data/corpus.py): local parquet / csv / arrow / save_to_disk / JSONL
sources written with `datasets` itself and streamed, chat messages through a tiny tokenizer's template, a Hub name
with its split and subset, a mixture's proportions and determinism, and bad input named in one line."""

import json
import math
import sys
import types

import pytest
import torch
from conftest import rng
from tiny_models import make_tokenizer

from crossdiff_ext.data import activations, corpus
from crossdiff_ext.errors import InputError, MissingInputError

datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
parquet = pytest.importorskip("pyarrow.parquet", reason="the datasets extra is not installed")


def random_texts(salt, n):
    """n random documents (3 to 19 words) in the tiny models' vocabulary."""
    g = rng(salt)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    return [" ".join(f"w{int(j)}" for j in torch.randint(0, 50, (k,), generator=g)) for k in lengths]


def conversations(texts):
    return [[{"role": "user", "content": t}, {"role": "assistant", "content": "w1 w2"}] for t in texts]


@pytest.fixture
def texts():
    return random_texts(301, 23)


def test_local_dataset_files_stream_in_order(tmp_path, texts):
    table = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    table.to_parquet(tmp_path / "one.parquet")
    table.to_csv(tmp_path / "one.csv", index=False)
    table.to_json(tmp_path / "one.jsonl")
    table.to_json(tmp_path / "one.json")  # read by datasets' json builder
    table.save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "parts").mkdir()
    table.select(range(10)).to_parquet(tmp_path / "parts" / "a.parquet")  # files in name order
    table.select(range(10, len(texts))).to_parquet(tmp_path / "parts" / "b.parquet")
    counts = {"one.parquet": len(texts), "one.jsonl": len(texts), "saved": len(texts), "parts": len(texts)}
    for path in ("one.parquet", "one.csv", "one.jsonl", "one.json", "saved", arrow, "parts"):
        source = corpus.open_source(str(tmp_path / path))
        assert list(source.documents()) == texts, path
        assert [d.index for d in corpus.open_corpus(str(tmp_path / path))] == list(range(len(texts)))
        assert source.count() == counts.get(path), path  # known without reading the rows, or None
    # Streamed: parquet a row group at a time, the other kinds through datasets' streaming reader.
    table.to_parquet(tmp_path / "groups.parquet", batch_size=4)  # row groups of 4 rows
    streamed = corpus.open_source(str(tmp_path / "groups.parquet"))._rows()
    assert isinstance(streamed, types.GeneratorType) and list(streamed) == [{"text": t} for t in texts]  # one column
    assert parquet.ParquetFile(tmp_path / "groups.parquet").num_row_groups == 6
    assert isinstance(corpus.open_source(str(tmp_path / "one.csv"))._rows(), datasets.IterableDataset)
    assert activations.read_documents(str(tmp_path / "parts")) == texts


def test_chat_messages_go_through_the_chat_template(tmp_path, texts):
    chats = conversations(texts[:5])
    datasets.Dataset.from_dict({"messages": chats}).to_parquet(tmp_path / "chat.parquet")
    datasets.Dataset.from_dict({"conversation": chats, "model": ["m"] * 5}).to_parquet(tmp_path / "lmsys.parquet")
    datasets.Dataset.from_dict({"body": texts[:5]}).to_parquet(tmp_path / "body.parquet")
    assert list(corpus.open_source(str(tmp_path / "chat.parquet")).documents()) == chats
    assert list(corpus.open_source(str(tmp_path / "lmsys.parquet")).documents()) == chats
    assert list(corpus.open_source(str(tmp_path / "body.parquet"), column="body").documents()) == texts[:5]
    tok = make_tokenizer()
    ids = activations.tokenize(chats[0], tok, 1024)
    expected = tok.apply_chat_template(chats[0], tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert ids[:3] == tok.convert_tokens_to_ids(["<bos>", "user", ":"])


def test_a_hub_name_is_streamed_with_its_split_and_subset(tmp_path, texts, monkeypatch):
    # No network in tests: load_dataset is replaced by one that records its arguments and streams a local file.
    datasets.Dataset.from_dict({"text": texts}).to_parquet(tmp_path / "hub.parquet")
    calls = []

    def load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
        if path == "parquet":
            return real(path, split=split, streaming=streaming, **kwargs)
        calls.append((path, name, split, streaming))
        return real("parquet", data_files=str(tmp_path / "hub.parquet"), split="train", streaming=True)

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = corpus.open_source("HuggingFaceFW/fineweb", split="validation", subset="sample-10BT")
    assert list(source.documents()) == texts and source.name == "HuggingFaceFW/fineweb[sample-10BT]:validation"
    assert list(corpus.open_source("hf:lmsys/lmsys-chat-1m:train").documents()) == texts
    assert list(corpus.open_source("HuggingFaceFW/fineweb[sample-350BT]").documents()) == texts
    assert calls == [
        ("HuggingFaceFW/fineweb", "sample-10BT", "validation", True),
        ("lmsys/lmsys-chat-1m", None, "train", True),
        ("HuggingFaceFW/fineweb", "sample-350BT", "train", True),
    ]


def test_mixture_proportions_and_determinism():
    web = corpus.IterableSource([f"web {i}" for i in range(3000)], name="web")
    chat = corpus.IterableSource([f"chat {i}" for i in range(1000)], name="chat")
    seed = int(torch.randint(0, 2**31, (1,), generator=rng(302)))
    mixed = list(corpus.Corpus([web, chat], [3.0, 1.0], seed=seed))
    again = list(corpus.Corpus([web, chat], [3.0, 1.0], seed=seed))
    other = list(corpus.Corpus([web, chat], [3.0, 1.0], seed=seed + 1))
    assert mixed == again and mixed != other
    # Every document once, each source in its own order, with its index there.
    for s, name in enumerate(("web", "chat")):
        mine = [d for d in mixed if d.source == s]
        assert [d.index for d in mine] == list(range(len(mine)))
        assert [d.content for d in mine] == [f"{name} {i}" for i in range(len(mine))]
    assert len(mixed) == 4000
    # The first 2000 draws (both sources still full): web with probability 3/4, within 5 standard deviations.
    n = 2000
    share = sum(d.source == 0 for d in mixed[:n])
    assert abs(share - 0.75 * n) < 5 * math.sqrt(n * 0.75 * 0.25), share
    # A weight of 0 leaves a source out; the mixture's record names sources, weights and seed.
    only_web = corpus.Corpus([web, chat], [1.0, 0.0], seed=seed)
    assert {d.source for d in only_web} == {0}
    assert only_web.describe() == dict(sources=["web", "chat"], weights=[1.0, 0.0], seed=seed)


def test_a_weighted_list_is_a_mixture(tmp_path, texts):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    datasets.Dataset.from_dict({"messages": conversations(texts)}).to_parquet(tmp_path / "b.parquet")
    mix = corpus.open_corpus([(str(tmp_path / "a.jsonl"), 0.5), (str(tmp_path / "b.parquet"), 0.5)], seed=3)
    assert mix.is_mixture and mix.names == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    drawn = list(mix)
    assert sorted((d.source, d.index) for d in drawn) == [(s, i) for s in (0, 1) for i in range(len(texts))]
    assert all(isinstance(d.content, str) == (d.source == 0) for d in drawn)
    # A plain list of documents stays a list of documents.
    assert not corpus.open_corpus(texts).is_mixture


def test_command_line_source_specs(tmp_path):
    from crossdiff_ext.cli.collect import data_argument

    odd = tmp_path / "odd:0.5.jsonl"
    odd.write_text('{"text": "w1"}\n')
    assert corpus.parse_source_spec("web.parquet:0.25") == ("web.parquet", 0.25)
    assert corpus.parse_source_spec("hf:HuggingFaceFW/fineweb:train") == ("hf:HuggingFaceFW/fineweb:train", None)
    assert corpus.parse_source_spec("hf:lmsys/lmsys-chat-1m:train:2") == ("hf:lmsys/lmsys-chat-1m:train", 2.0)
    assert corpus.parse_source_spec(str(odd)) == (str(odd), None)  # an existing path keeps its colons
    assert data_argument(["a.parquet"]) == "a.parquet"
    assert data_argument(["a.parquet:1", "b.parquet:3"]) == [("a.parquet", 1.0), ("b.parquet", 3.0)]
    assert data_argument(["a.parquet", "b.parquet"]) == [("a.parquet", 1.0), ("b.parquet", 1.0)]
    with pytest.raises(InputError, match=r"give every source of a mixture a weight .*\['b.parquet'\]"):
        data_argument(["a.parquet:1", "b.parquet"])


def test_without_the_datasets_package_one_line_names_the_extra(tmp_path, texts, monkeypatch):
    datasets.Dataset.from_dict({"text": texts}).to_csv(tmp_path / "a.csv")
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an environment without the extra sees
    with pytest.raises(
        InputError, match=r"^reading a dataset needs the datasets package: pip install 'crossdiff_ext\[datasets\]'$"
    ):
        corpus.open_corpus(str(tmp_path / "a.csv")).check()


def test_bad_sources_are_named_in_one_line(tmp_path, texts):
    datasets.Dataset.from_dict({"body": texts}).to_parquet(tmp_path / "body.parquet")
    (tmp_path / "a.jsonl").write_text('{"text": "w1"}\n')
    body = str(tmp_path / "body.parquet")
    with pytest.raises(
        InputError, match=r"body\.parquet', row 0: a record needs 'text' or 'messages', got keys \['body'\]"
    ):
        corpus.open_corpus(body).check()
    with pytest.raises(InputError, match=r"no column 'content' \(columns: \['body'\]\)"):
        corpus.open_corpus(body, column="content").check()
    with pytest.raises(
        InputError, match=r"body\.parquet': no split 'test' \(local data files form one split, 'train'\)"
    ):
        corpus.open_corpus(body, split="test").check()
    (tmp_path / "saved").mkdir()
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "saved" / "one")
    with pytest.raises(InputError, match=r"one', split 'test': Unknown split \"test\""):
        corpus.open_corpus(str(tmp_path / "saved" / "one"), split="test").check()
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"broken\.parquet': not a readable parquet file"):
        corpus.open_corpus(str(tmp_path / "broken.parquet")).check()
    with pytest.raises(InputError, match=r"a JSONL / text source has no splits \(got split 'test'\)"):
        corpus.open_corpus(str(tmp_path / "a.jsonl"), split="test")
    with pytest.raises(MissingInputError, match=r"missing\.parquet' does not exist"):
        corpus.open_corpus(str(tmp_path / "missing.parquet"))
    for weights, message in (
        ([0.0, 0.0], r"the mixture weights \[0\.0, 0\.0\] do not sum to a positive number"),
        ([1.0, -1.0], r"a mixture weight must be a finite number >= 0, got -1\.0"),
        ([1.0, float("nan")], r"a mixture weight must be a finite number >= 0, got nan"),
    ):
        with pytest.raises(InputError, match=message):
            corpus.open_corpus([(body, weights[0]), (str(tmp_path / "a.jsonl"), weights[1])])
    (tmp_path / "mixed").mkdir()
    datasets.Dataset.from_dict({"text": texts}).to_parquet(tmp_path / "mixed" / "a.parquet")
    datasets.Dataset.from_dict({"text": texts}).to_csv(tmp_path / "mixed" / "b.csv")
    (tmp_path / "notes.md").write_text("w1")
    with pytest.raises(
        InputError, match=r"notes\.md': not a data file this reads \(suffixes: \.jsonl, \.txt, \.parquet"
    ):
        corpus.open_corpus(str(tmp_path / "notes.md")).check()
    (tmp_path / "mixed" / "c.jsonl").write_text('{"text": "w1"}\n')
    with pytest.raises(InputError, match=r"mixed' holds both JSONL / text files and dataset files"):
        corpus.open_corpus(str(tmp_path / "mixed"))
    (tmp_path / "mixed" / "c.jsonl").unlink()
    with pytest.raises(InputError, match=r"needs files of one kind, found files of several kinds \['csv', 'parquet'\]"):
        corpus.open_corpus(str(tmp_path / "mixed")).check()
