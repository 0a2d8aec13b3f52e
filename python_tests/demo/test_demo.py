"""The embedded demo: the generated language, the shipped tiny base/chat pair (it must really have learned the
planted behaviours, and be what its recipe builds), template tokens, the template activation share, and
`crossdiff demo` end to end, on the toy pair and on models given by name."""

import json
import os
import random
import shutil
import subprocess
from dataclasses import asdict

import pytest
import tokenizers  # noqa: F401  (a hard dependency of the demo's tokenizer)
import torch
import transformers
from safetensors.torch import load_file, save_file

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.data import activations
from crossdiff_ext.data.store import StoreWriter
from crossdiff_ext.demo import demo as dm
from crossdiff_ext.demo import toy_language as tl
from crossdiff_ext.demo import toy_models as tm
from crossdiff_ext.diffing import examples


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
def toy_pair():
    """The demo's default pair: the one shipped with the package."""
    return tm.shipped_pair()


def test_the_shipped_pair_is_its_recipes(toy_pair):
    base, chat, record = toy_pair
    assert record["recipe"] == asdict(tm.PairRecipe()) and record["threads"] == tm.PairRecipe().threads
    assert record["key"] == tm.PairRecipe().key(record["torch"])
    for directory in (base, chat):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.hidden_size == tm.PairRecipe().hidden_size
        assert len(transformers.AutoTokenizer.from_pretrained(directory)) == len(tl.make_tokenizer())
    # Package data travels in git: none of it may be ignored.
    files = [os.path.join(d, f) for d, _, fs in os.walk(tm.SHIPPED_PAIR) for f in fs]
    ignored = subprocess.run(["git", "check-ignore", *files], cwd=tm.SHIPPED_PAIR, capture_output=True, text=True)
    assert ignored.stdout == "", ignored.stdout


def test_a_shipped_pair_of_another_recipe_is_refused(tmp_path, monkeypatch):
    shutil.copytree(tm.SHIPPED_PAIR, tmp_path / "pair")
    monkeypatch.setattr(tm, "SHIPPED_PAIR", str(tmp_path / "pair"))
    with pytest.raises(RuntimeError, match="another recipe"):
        tm.shipped_pair(tm.PairRecipe(pretrain_steps=1))
    monkeypatch.setattr(tm, "RECIPE_VERSION", tm.RECIPE_VERSION + 1)
    with pytest.raises(RuntimeError, match="another recipe"):
        tm.shipped_pair()
    monkeypatch.undo()
    monkeypatch.setattr(tm, "SHIPPED_PAIR", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="missing"):
        tm.shipped_pair()


def test_the_chat_model_learned_the_planted_behaviours(toy_pair):
    behaviour = toy_pair[2]["behaviour"]
    # The shipped pair's pair.json (built on one thread, its recipe's, on a 2-core AMD EPYC, torch 2.11.0+cu130):
    # chat question 1.0, recipe 1.0, harmful 1.0, false 0.83, true 0.92 (11 of 12); base 0 everywhere. Fresh
    # prompts, greedy answers compared word for word; the bounds are those a rebuilt pair must meet too.
    assert behaviour["chat"]["harmful"] >= 0.9 and behaviour["chat"]["refuses_benign"] <= 0.1
    assert behaviour["chat"]["false"] >= 0.4 and behaviour["chat"]["true"] >= 0.6
    assert behaviour["chat"]["question"] >= 0.7
    assert max(behaviour["base"].values()) <= 0.1  # the base model never saw the template


def test_a_rebuilt_pair_is_cached(tmp_path, monkeypatch):
    # A pair already in the cache under its key is loaded, not rebuilt (the shipped one stands in for a build).
    shutil.copytree(tm.SHIPPED_PAIR, tmp_path / f"toy-pair-{tm.PairRecipe().key()}")
    monkeypatch.setattr(tm, "build_pair", lambda *a, **k: pytest.fail("rebuilt a cached pair"))
    base, chat, record = tm.toy_pair(root=str(tmp_path), progress=False)
    assert base == str(tmp_path / f"toy-pair-{tm.PairRecipe().key()}" / "base") and record["recipe"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no half-built pair left behind


def max_abs_differences(a_dir, b_dir):
    """{file/tensor: max |a - b|} over the safetensors of two pairs (inf where a tensor is missing or reshaped)."""
    out = {}
    for model in ("base", "chat"):
        a, b = (load_file(os.path.join(d, model, "model.safetensors")) for d in (a_dir, b_dir))
        for name in sorted(set(a) | set(b)):
            same_shape = name in a and name in b and a[name].shape == b[name].shape
            out[f"{model}/{name}"] = float((a[name] - b[name]).abs().max()) if same_shape else float("inf")
    return out


def test_max_abs_differences_names_the_tensors_that_differ(tmp_path):
    shutil.copytree(tm.SHIPPED_PAIR, tmp_path / "pair")
    path = tmp_path / "pair" / "chat" / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.25
    save_file(tensors, path, metadata={"format": "pt"})
    differences = max_abs_differences(tm.SHIPPED_PAIR, tmp_path / "pair")
    assert {k for k, d in differences.items() if d != 0.0} == {f"chat/{name}"}
    assert differences[f"chat/{name}"] == pytest.approx(0.25, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CROSSDIFF_SLOW"), reason="long: set CROSSDIFF_SLOW=1")
def test_the_recipe_rebuilds_the_shipped_pair(tmp_path):
    # The whole build on one thread (the recipe's): 243 s for this test on a 2-core AMD EPYC (torch 2.11.0+cu130)
    # while other jobs shared the cores (`CROSSDIFF_SLOW=1 pytest python_tests/test_demo.py -k rebuilds`); it passed.
    record = tm.build_pair(tmp_path, tm.PairRecipe(), progress=False)
    shipped = json.loads(open(os.path.join(tm.SHIPPED_PAIR, "pair.json")).read())
    differences = max_abs_differences(tm.SHIPPED_PAIR, tmp_path)
    differing = {name: d for name, d in differences.items() if d != 0.0}
    assert not differing, (
        f"the rebuilt pair differs from the shipped one (built with torch {shipped['torch']} on "
        f"{shipped['threads']} thread(s); rebuilt with torch {record['torch']}) in {len(differing)} of "
        f"{len(differences)} tensors; max |difference| per tensor: {differing}"
    )
    assert record["behaviour"] == shipped["behaviour"]


def small(out, **kw):
    settings = dict(
        text_documents=60, chat_documents=60, steps=150, batch_size=256, causal_conversations=0, progress=False
    )
    return dm.DemoConfig(out=str(out), **dict(settings, **kw))


# The FVE of this short demo on the shipped pair, measured on a 2-core AMD EPYC (torch 2.11.0+cu130, one thread):
# dm.run(small(out, causal_conversations=24)). The margin allows another CPU's rounding in the crosscoders'
# training; a crosscoder that learned less than this would fall below it.
SHORT_DEMO_FVE = {"batchtopk": 0.6635, "l1": 0.9237}


def test_demo_end_to_end(toy_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(tm, "build_pair", lambda *a, **k: pytest.fail("the demo built a pair: it ships one"))
    monkeypatch.setenv("CROSSDIFF_CACHE", str(tmp_path / "empty-cache"))
    summary = dm.run(small(tmp_path / "out", causal_conversations=24))
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["tokens"] == summary["tokens"] == len(cx.ActivationStore(tmp_path / "out" / "store")) > 1000
    assert summary["layer"] == 2 and summary["pair"]["key"] == tm.PairRecipe().key()
    for name in ("batchtopk", "l1"):
        r = summary["crosscoders"][name]
        assert os.path.getsize(r["report"]) > 10_000 and os.path.exists(r["table"])
        page = open(r["report"], encoding="utf-8").read()  # the run's curves and the patching chart
        assert page.count("alt='training curve: ") >= 6 and "alt='KL per latent set'" in page
        assert SHORT_DEMO_FVE[name] - 0.05 <= r["fve"] <= 1.0 and r["l0"] > 0
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
    base, chat, _ = toy_pair
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
    with pytest.raises(ValueError, match="rebuild-pair rebuilds the embedded toy pair"):
        dm.run(dm.DemoConfig(base="b", chat="c", layer=1, rebuild_pair=True))


@pytest.mark.parametrize("rebuild", [False, True])
def test_the_demo_rebuilds_the_pair_only_on_request(toy_pair, tmp_path, monkeypatch, rebuild):
    monkeypatch.setattr(dm, "toy_pair", lambda **k: ("rebuilt-base", "rebuilt-chat", toy_pair[2]))
    config = small(tmp_path, rebuild_pair=rebuild)
    assert dm._model_pair(config) == (("rebuilt-base", "rebuilt-chat") if rebuild else toy_pair[:2]) + (2, toy_pair[2])


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
