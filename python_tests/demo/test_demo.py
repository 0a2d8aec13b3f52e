"""The embedded demo: the generated language, the cached tiny base/chat pair (it must really learn the planted
behaviours), template tokens, the template activation share, and `crossdiff demo` end to end, on the toy pair and
on models given by name."""

import json
import os
import random

import pytest
import torch

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.data import activations
from crossdiff_ext.data.store import StoreWriter
from crossdiff_ext.demo import demo as dm
from crossdiff_ext.demo import toy_language as tl
from crossdiff_ext.demo import toy_models as tm
from crossdiff_ext.diffing import examples

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_corpus_is_seeded_and_every_word_is_in_the_vocabulary():
    a, b = tl.corpus(40, 40, seed=3), tl.corpus(40, 40, seed=3)
    assert a == b and a != tl.corpus(40, 40, seed=4)
    assert sum(isinstance(d, str) for d in a) == 40
    tok = tl.make_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for doc in a:
        ids = activations.tokenize(doc, tok, 10_000)
        assert unk not in ids and ids[0] == tok.bos_token_id
    rng = random.Random(0)
    for _ in range(50):
        kind, user, answer = tl.exchange(rng)
        if kind == "harmful":
            assert answer == tl.REFUSAL and user.startswith("how do i ")
        elif kind == "false":
            assert answer.startswith("actually , ") and answer[len("actually , ") :] != user
        elif kind == "true":
            assert answer == "yes , " + user
    with pytest.raises(ValueError, match="kind must be"):
        tl.exchange(rng, "joke")


def test_template_token_ids():
    from tiny_models import make_tokenizer

    tok = tl.make_tokenizer()
    assert tok.convert_ids_to_tokens(activations.template_token_ids(tok)) == [
        "<bos>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    other = make_tokenizer()  # "<bos> {role} : {content} ..."
    assert sorted(other.convert_ids_to_tokens(activations.template_token_ids(other))) == [
        ":",
        "<bos>",
        "assistant",
        "user",
    ]
    other.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        activations.template_token_ids(other)


@pytest.mark.parametrize("activation", ["relu", "batch_topk"])
def test_token_share_matches_the_dense_reference(tmp_path, activation):
    torch.manual_seed(0)
    n, d, F = 300, 8, 24
    x = torch.randn(n, 2, d)
    ids = torch.randint(0, 10, (n,))
    with StoreWriter(tmp_path / "s", 2, d, dtype="float32", shard_rows=64) as w:
        w.append(x, ids, torch.arange(n))
    store = cx.ActivationStore(tmp_path / "s")
    cc = cx.CrossCoder(d, F, 2, k=3 if activation == "batch_topk" else None, activation=activation)
    with torch.no_grad():
        cc.threshold.fill_(0.3)
    share = examples.token_share(cc, store, [2, 5], batch_size=77)
    cc.eval()
    with torch.no_grad():
        f = cc.encode(x).to_dense().double()
    on = torch.isin(ids, torch.tensor([2, 5]))
    total = f.sum(0)
    expected = torch.where(total > 0, f[on].sum(0) / total, torch.full_like(total, float("nan")))
    fired = total > 0
    assert fired.sum() >= 3 and (expected[fired] > 0).any() and (expected[fired] < 1).any()  # not a trivial case
    torch.testing.assert_close(share, expected, equal_nan=True)


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    """The demo's default pair, built from scratch in a fresh cache (on one thread, its recipe's: 265 s on the
    2-core CI machine while other jobs shared it)."""
    root = tmp_path_factory.mktemp("cache")
    return tm.toy_pair(root=str(root), progress=False) + (str(root),)


def test_the_chat_model_learned_the_planted_behaviours(toy_pair, monkeypatch):
    base, chat, record, root = toy_pair
    behaviour = record["behaviour"]
    # Measured on the 2-core CI machine, the pair built on one thread (its recipe's): chat question 1.0, harmful
    # 1.0, false 0.50, true 0.67 (8 of 12); base 0 everywhere. Fresh prompts, greedy answers compared word for
    # word; the margins allow another CPU's rounding.
    assert behaviour["chat"]["harmful"] >= 0.9 and behaviour["chat"]["refuses_benign"] <= 0.1
    assert behaviour["chat"]["false"] >= 0.4 and behaviour["chat"]["true"] >= 0.6
    assert behaviour["chat"]["question"] >= 0.7
    assert max(behaviour["base"].values()) <= 0.1  # the base model never saw the template
    # The cache is used: a second call builds nothing.
    monkeypatch.setattr(tm, "build_pair", lambda *a, **k: pytest.fail("rebuilt a cached pair"))
    assert tm.toy_pair(root=root, progress=False)[:2] == (base, chat)
    # No half-built pair is left behind.
    assert [n for n in os.listdir(root) if n.startswith(".")] == []


def small(out, **kw):
    settings = dict(
        text_documents=60, chat_documents=60, steps=150, batch_size=256, causal_conversations=0, progress=False
    )
    return dm.DemoConfig(out=str(out), **dict(settings, **kw))


def test_demo_end_to_end(toy_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_CACHE", toy_pair[3])
    summary = dm.run(small(tmp_path / "out", causal_conversations=24))
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["tokens"] == summary["tokens"] == len(cx.ActivationStore(tmp_path / "out" / "store")) > 1000
    assert summary["layer"] == 2 and summary["pair"]["key"] == tm.PairRecipe().key()
    for name in ("batchtopk", "l1"):
        r = summary["crosscoders"][name]
        assert os.path.getsize(r["report"]) > 10_000 and os.path.exists(r["table"])
        assert 0.0 < r["fve"] <= 1.0 and r["l0"] > 0
        assert r["chat_only_by_delta_norm"] == r["chat_specific"] + r["not_chat_specific"]
        assert sum(r["classes"].values()) == r["dict_size"] == 8 * 64
        assert len(r["chat_specific_latents"]) == r["chat_specific"]
        causal = r["causal"]  # the paper's sets: this short run already has chat-leaning latents enough for them
        assert {"none", "all", "delta_norm_better", "latent_scaling_worse", "random"} <= set(causal["kl"])
        assert (
            causal["kl"]["none"]["all"]["n"] > 24
            and causal["kl"]["random"]["all"]["n"] == 5 * causal["kl"]["none"]["all"]["n"]
        )
        assert causal["kl"]["all"]["all"]["mean"] < causal["kl"]["none"]["all"]["mean"]
        assert r["chat_specific_on_template"] == sum(d["on_template"] for d in r["chat_specific_latents"])
    assert summary["crosscoders"]["batchtopk"]["k"] == 8
    assert "TEMPLATE" in "\n".join(dm.describe(summary)) or not any(
        r["chat_specific_on_template"] for r in summary["crosscoders"].values()
    )
    # Running again into the same directory replaces the previous run...
    dm.run(small(tmp_path / "out", steps=20))
    # ...but never deletes what the demo did not write.
    (tmp_path / "out" / "l1" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        dm.run(small(tmp_path / "out", steps=20))
    assert (tmp_path / "out" / "l1" / "notes.txt").read_text() == "mine"


def test_demo_on_models_given_by_name(toy_pair, tmp_path, capsys):
    base, chat, _, _ = toy_pair
    code = cli.main(
        [
            "demo",
            "--base",
            base,
            "--chat",
            chat,
            "--layer",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--text-documents",
            "30",
            "--chat-documents",
            "30",
            "--steps",
            "60",
            "--dict-size",
            "128",
            "-k",
            "4",
            "--batch-size",
            "128",
            "--causal-conversations",
            "0",
            "--quiet",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["base"] == base and summary["layer"] == 1 and summary["pair"] is None
    assert summary["crosscoders"]["batchtopk"]["k"] == 4 and summary["crosscoders"]["l1"]["dict_size"] == 128


def test_demo_arguments_are_checked(capsys):
    assert cli.main(["demo", "--base", "b"]) == 2
    assert "give both --base and --chat" in capsys.readouterr().err
    assert cli.main(["demo", "--base", "b", "--chat", "c"]) == 2
    assert "--layer is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be positive"):
        dm.run(dm.DemoConfig(steps=0))


def test_the_pair_is_the_same_whatever_the_thread_count(tmp_path, monkeypatch):
    # The pair's weights depend on the torch thread count (the rounding of its GEMMs and reductions), so the build
    # pins it (the recipe's, 1) and the cache key covers the recipe and the torch version; everything else is
    # seeded, so two builds are equal byte for byte. A tiny recipe: a few seconds.
    recipe = tm.PairRecipe(
        hidden_size=16,
        intermediate_size=32,
        layers=1,
        heads=2,
        pretrain_steps=3,
        pretrain_documents=16,
        finetune_steps=3,
        finetune_conversations=16,
        batch_size=4,
    )
    monkeypatch.setattr(tm, "behaviour", lambda *a, **k: {})  # greedy generation: slow and beside the point here
    fit, seen = tm._fit, []
    monkeypatch.setattr(tm, "_fit", lambda *a, **k: seen.append(torch.get_num_threads()) or fit(*a, **k))
    before = torch.get_num_threads()
    try:
        for threads, name in ((2, "a"), (1, "b")):
            torch.set_num_threads(threads)
            record = tm.build_pair(tmp_path / name, recipe, progress=False)
            assert record["threads"] == 1 and torch.get_num_threads() == threads  # restored afterwards
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1, 1]
    for model in ("base", "chat"):
        a, b = ((tmp_path / n / model / "model.safetensors").read_bytes() for n in "ab")
        assert a == b, model
    assert tm.PairRecipe(threads=2).key() != tm.PairRecipe().key()
    key = tm.PairRecipe().key()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert tm.PairRecipe().key() != key  # the torch version is part of the key


def test_the_demo_runs_on_its_thread_count(monkeypatch):
    monkeypatch.setattr(dm, "_run", lambda config: torch.get_num_threads())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert dm.run(dm.DemoConfig(threads=1)) == 1 and torch.get_num_threads() == 2
        assert dm.run(dm.DemoConfig(threads=None)) == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        dm.run(dm.DemoConfig(threads=0))
