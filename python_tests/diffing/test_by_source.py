"""Max-activating examples show identical contexts once (with their count) and name each one's document and
source; a latent's firing split by source (diffing/by_source.py) against a dense count; `crossdiff scale` and
`crossdiff report` with --by-source, and their one-line refusal of a store without sources."""

import csv

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.data.store import StoreWriter
from crossdiff_ext.diffing import by_source, examples, report


def relu_reader(d, F):
    """A ReLU crosscoder whose latent 0 reads coordinate 0 of both models (activation = that coordinate)."""
    cc = cx.CrossCoder(d, F, 2, activation="relu")
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, :, 0] = 0.5
        cc.b_enc.zero_()
    return cc


def test_identical_contexts_are_shown_once_with_their_count(tmp_path):
    # Six sequences of four tokens from two sources. Sequences 0, 2 and 4 are the same tokens and fire latent 0
    # most at their third token; the others are distinct and fire it less.
    g = rng(501)
    same = torch.randint(10, 60, (4,), generator=g)
    tokens, values = [], []
    for s in range(6):
        tokens.append(same if s % 2 == 0 else torch.randint(10, 60, (4,), generator=g) + 100 * s)
        values.append(torch.tensor([0.1, 0.2, 9.0 - s / 10 if s % 2 == 0 else 5.0 - s / 10, 0.3]))
    x = torch.zeros(24, 2, 3)
    x[:, :, 0] = torch.cat(values)[:, None]
    documents = torch.arange(6).repeat_interleave(4)
    sources = (torch.arange(6) % 2).repeat_interleave(4)
    with StoreWriter(tmp_path / "s", 2, 3, dtype="float32", shard_rows=5, source_names=["web", "chat"]) as w:
        w.append(x, torch.cat(tokens), torch.arange(4).repeat(6), documents=documents, sources=sources)
    store = cx.ActivationStore(tmp_path / "s")
    cc = relu_reader(3, 4)
    found = examples.max_activating_examples(cc, store, [0], n=3, before=2, after=1)[0]
    assert found.count == 24
    top = found.top
    assert [e.row for e in top] == [2, 6, 14]  # the third token of sequences 0, 1 and 3
    assert [e.count for e in top] == [3, 1, 1]  # sequences 0, 2 and 4 share one context
    assert [(e.source, e.document) for e in top] == [("web", 0), ("chat", 1), ("chat", 3)]
    assert top[0].tokens == same[:4].tolist() and top[0].focus == 2
    repeated = examples.max_activating_examples(cc, store, [0], n=3, before=2, after=1, distinct=False)[0].top
    assert [e.row for e in repeated] == [2, 10, 18] and all(e.count == 3 for e in repeated)
    html = report.render(
        {"latent": [0, 1, 2, 3], "class": ["chat_only"] * 4, "delta_norm": [1.0] * 4, "decoder_cosine": [0.0] * 4},
        examples={0: found},
    )
    assert "&times;3" in html and "(web, document 0)" in html and "(chat, document 1)" in html


def test_firing_by_source_matches_a_dense_count(tmp_path):
    g = rng(502)
    d, F = 6, 10
    stores = []
    for k, names in enumerate((["web", "chat"], ["chat"])):
        n = 37 + 5 * k
        x = torch.randn(n, 2, d, generator=g)
        sources = torch.randint(0, len(names), (n,), generator=g)
        with StoreWriter(tmp_path / f"s{k}", 2, d, dtype="float32", shard_rows=9, source_names=names) as w:
            w.append(x, documents=torch.arange(n), sources=sources)
        stores.append(cx.ActivationStore(tmp_path / f"s{k}"))
    cc = cx.CrossCoder(d, F, 2, activation="relu")
    with torch.no_grad():
        cc.b_enc.copy_(torch.randn(F, generator=g) * 0.3)
    firing = by_source.firing_by_source(cc, stores, batch_size=8)
    assert firing.names == ["web", "chat"]
    expected_fires = torch.zeros(2, F, dtype=torch.int64)
    expected_sum = torch.zeros(2, F, dtype=torch.float64)
    expected_tokens = torch.zeros(2, dtype=torch.int64)
    cc.eval()
    for store in stores:
        dense = cc.encode(store[0 : len(store)], use_threshold=False).to_dense().double()  # [n, F], all at once
        ids = torch.tensor([firing.names.index(n) for n in store.source_names])[store.sources()]
        expected_tokens.index_add_(0, ids, torch.ones_like(ids))
        expected_fires.index_add_(0, ids, (dense > 0).long())
        expected_sum.index_add_(0, ids, dense)
    assert torch.equal(firing.tokens, expected_tokens) and torch.equal(firing.fires, expected_fires)
    torch.testing.assert_close(firing.activation, expected_sum)
    assert 0 < int(firing.fires.sum()) < 2 * F * len(stores[0])  # some latents fire, not all everywhere
    table = {"latent": list(range(F))}
    assert by_source.add_source_columns(table, firing) == ["web", "chat"]
    torch.testing.assert_close(torch.tensor(table["freq[chat]"]), expected_fires[1] / expected_tokens[1])


def test_source_labels():
    assert by_source.source_labels(["/d/web.parquet", "HuggingFaceFW/fineweb[sample-10BT]:train", "chat.jsonl"]) == [
        "web",
        "fineweb",
        "chat",
    ]
    assert by_source.source_labels(["a/web.parquet", "b/web.parquet"]) == ["a/web.parquet", "b/web.parquet"]


def test_scale_and_report_by_source(tmp_path, capsys):
    g = rng(503)
    d, F, n = 5, 12, 60
    x = torch.randn(n, 2, d, generator=g)
    with StoreWriter(tmp_path / "s", 2, d, dtype="float32", shard_rows=16, source_names=["web.parquet", "chat"]) as w:
        w.append(
            x,
            torch.randint(0, 50, (n,), generator=g),
            torch.arange(n) % 10 + 1,
            documents=torch.arange(n) // 10,
            sources=(torch.arange(n) // 10) % 2,
        )
    with StoreWriter(tmp_path / "bare", 2, d, dtype="float32") as w:
        w.append(x)
    cc = cx.CrossCoder(d, F, 2, activation="relu")
    cc.save_pretrained(tmp_path / "cc")
    common = ["--checkpoint", str(tmp_path / "cc"), "--quiet", "--batch-size", "16"]
    assert (
        cli.main(["scale", *common, "--store", str(tmp_path / "s"), "--out", str(tmp_path / "t.csv"), "--by-source"])
        == 0
    )
    assert "firing split by source: web, chat" in capsys.readouterr().out
    with open(tmp_path / "t.csv") as fh:
        rows = list(csv.DictReader(fh))
    firing = by_source.firing_by_source(cc, [cx.ActivationStore(tmp_path / "s")])
    for j, row in enumerate(rows):
        for s, label in enumerate(("web", "chat")):
            assert float(row[f"freq[{label}]"]) == pytest.approx(float(firing.frequency()[s, j]))
    assert (
        cli.main(["report", *common, "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r.html"), "--by-source"])
        == 0
    )
    assert "<h2>Firing by source</h2>" in (tmp_path / "r.html").read_text()
    capsys.readouterr()
    code = cli.main(
        ["scale", *common, "--store", str(tmp_path / "bare"), "--out", str(tmp_path / "u.csv"), "--by-source"]
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "the store records no source per row" in err[0], err
