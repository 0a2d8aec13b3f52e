"""Provenance of every row: collect from a mixture of a parquet file and a JSONL file records each row's document
and source, a resumed collection equals an uninterrupted one in every column, a store written before provenance
opens without it (and resumes without it), and bad data arguments at the command line end in one line, exit 2."""

import json
import os

import pytest
import torch
import transformers
from conftest import rng
from tiny_models import make_tokenizer

from crossdiff_ext import cli
from crossdiff_ext.data import activations, corpus
from crossdiff_ext.data.store import ActivationStore
from crossdiff_ext.errors import InputError

datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")

# The models here are 16 wide: one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = dict(dtype="float32", device="cpu", progress=False, batch_size=3, shard_rows=7)


def random_words(g, n):
    return " ".join(f"w{int(j)}" for j in torch.randint(0, 50, (n,), generator=g))


@pytest.fixture
def mixture(tmp_path):
    """A web parquet file of texts and a chat JSONL file of conversations, with random lengths: [(path, weight)]."""
    g = rng(401)
    texts = [random_words(g, int(torch.randint(3, 18, (1,), generator=g))) for _ in range(11)]
    chats = [
        [{"role": "user", "content": random_words(g, int(torch.randint(2, 9, (1,), generator=g)))},
         {"role": "assistant", "content": random_words(g, 3)}]
        for _ in range(7)
    ]  # fmt: skip
    datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).to_parquet(tmp_path / "web.parquet")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    return [(str(tmp_path / "web.parquet"), 0.6), (str(tmp_path / "chat.jsonl"), 0.4)]


def columns(store):
    return dict(
        rows=store[0 : len(store)],
        tokens=store.token_ids(),
        positions=store.positions(),
        documents=store.documents(),
        sources=store.sources(),
    )


def test_every_row_knows_its_document_and_source(pair, mixture, tmp_path):
    store = activations.collect(*pair, 1, mixture, tmp_path / "store", seed=11, pack_window=2, **OPTIONS)
    assert store.source_names == [path for path, _ in mixture]
    assert store.meta["info"]["mixture"] == dict(sources=store.source_names, weights=[0.6, 0.4], seed=11)
    docs = [list(corpus.open_source(path).documents()) for path, _ in mixture]
    tok = make_tokenizer()
    ids = {(s, i): activations.tokenize(d, tok, 1024) for s in (0, 1) for i, d in enumerate(docs[s])}
    c = columns(store)
    # Each row's token is the token at its position in the document it names, every document is there whole.
    for token, position, document, source in zip(c["tokens"], c["positions"], c["documents"], c["sources"]):
        assert ids[int(source), int(document)][int(position)] == int(token)
    seen = {(int(s), int(d)) for s, d in zip(c["sources"], c["documents"])}
    assert seen == set(ids) and len(store) == sum(len(v) - 1 for v in ids.values())
    # The draw's order, kept within each length-sorting window of 2 batches x 3 documents.
    drawn = [(d.source, d.index) for d in corpus.open_corpus(mixture, seed=11)]
    starts = [(int(s), int(d)) for s, d, p in zip(c["sources"], c["documents"], c["positions"]) if p == 1]
    assert [sorted(starts[i : i + 6]) for i in range(0, 18, 6)] == [sorted(drawn[i : i + 6]) for i in range(0, 18, 6)]


def test_a_resumed_mixture_equals_an_uninterrupted_one(pair, mixture, tmp_path, monkeypatch):
    whole = activations.collect(*pair, 1, mixture, tmp_path / "whole", seed=3, **OPTIONS)
    stop = int(torch.randint(5, len(whole) - 5, (1,), generator=rng(402)))
    part = activations.collect(*pair, 1, mixture, tmp_path / "part", seed=3, max_tokens=stop, **OPTIONS)
    assert len(part) == stop
    resumed = activations.collect(*pair, 1, mixture, tmp_path / "part", seed=3, resume=True, **OPTIONS)
    for key, value in columns(whole).items():
        assert torch.equal(columns(resumed)[key], value), key
    assert resumed.source_names == whole.source_names and resumed.meta["info"] == whole.meta["info"]

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(InputError, match=r"holds another collection: mixture .*'seed': 3.* \(now .*'seed': 4"):
        activations.collect(*pair, 1, mixture, tmp_path / "part", seed=4, resume=True, **OPTIONS)


def strip_provenance(path):
    """Rewrite a store as one written before provenance: no source table, no document / source columns."""
    meta = json.loads((path / "store.json").read_text())
    meta.pop("sources")
    for entry in meta["shards"]:
        for key in ("documents", "sources"):
            os.remove(path / entry.pop(key))
            entry["checksums"].pop(f"{key}-{entry['file'][6:11]}.npy")
    (path / "store.json").write_text(json.dumps(meta))


def test_a_store_written_before_provenance_opens_and_resumes_without_it(pair, data, tmp_path):
    from crossdiff_ext.diffing import examples
    from crossdiff_ext.layer import CrossCoder

    whole = activations.collect(*pair, 1, data, tmp_path / "whole", **OPTIONS)
    assert whole.source_names == [data] and whole.sources().unique().tolist() == [0]
    activations.collect(*pair, 1, data, tmp_path / "old", max_tokens=20, **OPTIONS)
    strip_provenance(tmp_path / "old")
    old = ActivationStore(tmp_path / "old", verify=True)
    assert len(old) == 20 and old.source_names is None and old.documents() is None and old.sources() is None
    resumed = activations.collect(*pair, 1, data, tmp_path / "old", resume=True, **OPTIONS)
    assert torch.equal(resumed[0 : len(resumed)], whole[0 : len(whole)])
    assert torch.equal(resumed.token_ids(), whole.token_ids()) and resumed.documents() is None
    assert not any("documents" in e for e in resumed.meta["shards"])
    cc = CrossCoder(16, 8, 2, activation="relu")
    found = examples.max_activating_examples(cc, resumed, range(8), n=2)
    assert any(f.top for f in found.values())
    assert all(e.document is None and e.source is None for f in found.values() for e in f.top)


def fails_with_one_line(argv, capsys, pattern):
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"crossdiff {argv[0]}: error: "), err
    assert pattern in err[0], err[0]


def test_bad_data_arguments_at_the_command_line(pair, mixture, tmp_path, capsys):
    (web, _), (chat, _) = mixture
    datasets.Dataset.from_dict({"body": ["w1 w2"]}).to_parquet(tmp_path / "body.parquet")
    argv = ["collect", "--base", pair[0], "--chat", pair[1], "--layer", "1", "--out", str(tmp_path / "s"), "--quiet"]
    fails_with_one_line(
        argv + ["--data", f"{web}:0", f"{chat}:0"], capsys, "the mixture weights [0.0, 0.0] do not sum to a positive"
    )
    fails_with_one_line(argv + ["--data", f"{web}:1", chat], capsys, "give every source of a mixture a weight")
    fails_with_one_line(
        argv + ["--data", str(tmp_path / "body.parquet")],
        capsys,
        "a record needs 'text' or 'messages', got keys ['body']",
    )
    fails_with_one_line(argv + ["--data", web, "--column", "content"], capsys, "no column 'content'")
    fails_with_one_line(
        argv + ["--data", web, "--split", "test"], capsys, "no split 'test' (local data files form one split"
    )
    fails_with_one_line(argv + ["--data", chat, "--split", "test"], capsys, "a JSONL / text source has no splits")
    assert not os.path.exists(tmp_path / "s" / "store.json")
    # And a good mixture at the command line: the store names both sources.
    capsys.readouterr()
    assert cli.main(argv + ["--data", f"{web}:1", f"{chat}:1", "--seed", "2", "--device", "cpu"]) == 0
    store = ActivationStore(tmp_path / "s")
    assert store.source_names == [web, chat]
    counts = torch.bincount(store.sources()).tolist()
    assert f"tokens per source: {web}: {counts[0]} ({counts[0] / len(store):.1%}), {chat}: {counts[1]}" in (
        capsys.readouterr().out
    )
