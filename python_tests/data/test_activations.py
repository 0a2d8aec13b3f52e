"""Activation collection from two (tiny, random) transformers models: the same token ids into both, chat
templates, dropped padding and BOS, resume, clear errors, and collect -> train -> reload."""

import pytest
import torch
import transformers
from tiny_models import WORDS, make_model, make_tokenizer

import crossdiff_ext as cx
from crossdiff_ext.data import activations
from crossdiff_ext.data.store import ActivationStore
from crossdiff_ext.errors import InputError, MissingInputError


def test_collect_feeds_the_same_tokens_and_drops_bos(pair, data, tmp_path):
    store = activations.collect(
        *pair,
        1,
        data,
        tmp_path / "store",
        drop_first=1,
        dtype="float32",
        batch_size=4,
        shard_rows=50,
        device="cpu",
        progress=False,
        pack_window=1,  # documents in their order
    )
    tok = make_tokenizer()
    docs = [activations.tokenize(d, tok, 1024) for d in activations.read_documents(data)]
    assert len(store) == sum(len(d) - 1 for d in docs)
    assert torch.equal(store.token_ids(), torch.tensor([t for d in docs for t in d[1:]]))
    assert store.meta["info"]["layer"] == 1 and store.meta["info"]["hidden_states_index"] == 2
    # the first document, run alone through each model, gives the first rows
    first = torch.tensor([docs[0]])
    for m, path in enumerate(pair):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            h = model(input_ids=first, output_hidden_states=True).hidden_states[2][0, 1:]
        torch.testing.assert_close(store[torch.arange(len(docs[0]) - 1)][:, m], h, rtol=1e-4, atol=1e-5)
    assert docs[0][:3] == [
        tok.convert_tokens_to_ids("<bos>"),
        tok.convert_tokens_to_ids("user"),
        tok.convert_tokens_to_ids(":"),
    ]  # chat data went through the chat template


def test_collect_sorts_documents_by_length_within_a_window(pair, data, tmp_path):
    options = dict(drop_first=1, dtype="float32", batch_size=2, device="cpu", progress=False)
    packed = activations.collect(*pair, 1, data, tmp_path / "packed", pack_window=3, **options)
    plain = activations.collect(*pair, 1, data, tmp_path / "plain", pack_window=1, **options)
    tok = make_tokenizer()
    docs = [activations.tokenize(d, tok, 1024) for d in activations.read_documents(data)]
    expected = []
    for start in range(0, len(docs), 6):  # windows of batch_size x pack_window documents, longest first
        expected += sorted(docs[start : start + 6], key=lambda ids: -len(ids))
    assert torch.equal(packed.token_ids(), torch.tensor([t for ids in expected for t in ids[1:]]))
    assert packed.meta["info"]["pack_window"] == 3

    # The same rows as documents in their order, up to float rounding of other padded shapes.
    def by_document(store):
        starts = (store.positions() == 1).nonzero().squeeze(1).tolist() + [len(store)]
        pieces = [store[torch.arange(a, b)] for a, b in zip(starts[:-1], starts[1:])]
        return sorted(pieces, key=lambda x: (x.shape[0], x.flatten()[:4].tolist()))

    for a, b in zip(by_document(packed), by_document(plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_collect_refuses_to_resume_another_collection(pair, data, tmp_path, monkeypatch):
    activations.collect(*pair, 1, data, tmp_path / "s", device="cpu", progress=False, max_tokens=20)

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(InputError, match="holds another collection: .*layer 1 \\(now 2\\)"):
        activations.collect(*pair, 2, data, tmp_path / "s", device="cpu", progress=False, resume=True)
    with pytest.raises(InputError, match="pack_window 64 \\(now 8\\)"):
        activations.collect(*pair, 1, data, tmp_path / "s", device="cpu", progress=False, resume=True, pack_window=8)


def test_collect_resumes_to_the_same_store(pair, data, tmp_path):
    once = activations.collect(
        *pair, 2, data, tmp_path / "once", dtype="float32", shard_rows=16, device="cpu", progress=False
    )
    activations.collect(
        *pair, 2, data, tmp_path / "twice", dtype="float32", shard_rows=16, max_tokens=40, device="cpu", progress=False
    )
    assert len(ActivationStore(tmp_path / "twice")) == 40  # a clean stop keeps its last partial shard
    twice = activations.collect(
        *pair, 2, data, tmp_path / "twice", dtype="float32", shard_rows=16, resume=True, device="cpu", progress=False
    )
    assert len(twice) == len(once)
    # the resumed run pads the batch it restarts in as the straight run did: the same floats, bit for bit
    assert torch.equal(twice[torch.arange(len(once))], once[torch.arange(len(once))])
    assert torch.equal(twice.token_ids(), once.token_ids())


def test_collect_errors_are_clear(pair, data, tmp_path):
    other = make_model(tmp_path / "other", 2, words=WORDS[:-3] + ["x", "y", "z"])
    with pytest.raises(InputError, match="tokenizers disagree"):
        activations.collect(pair[0], other, 1, data, tmp_path / "s1", device="cpu", progress=False)
    with pytest.raises(InputError, match=r"layer must be an int in \[0, 3\)"):
        activations.collect(*pair, 3, data, tmp_path / "s2", device="cpu", progress=False)
    with pytest.raises(MissingInputError, match="does not exist"):
        activations.collect(*pair, 1, str(tmp_path / "missing.jsonl"), tmp_path / "s3", device="cpu", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1"}\n')
    with pytest.raises(InputError, match="needs 'text' or 'messages'"):
        activations.collect(*pair, 1, str(bad), tmp_path / "s4", device="cpu", progress=False)


class RowsLikeADataset:
    """What a datasets.Dataset is to read_documents: an iterable of dict rows (the package is optional)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_dataset_rows_are_documents(pair, data, tmp_path):
    from_file = activations.read_documents(data)
    rows = RowsLikeADataset(
        [{"text": d, "id": i} if isinstance(d, str) else {"messages": d, "text": None} for i, d in enumerate(from_file)]
    )
    assert activations.read_documents(rows) == from_file
    a = activations.collect(*pair, 1, data, tmp_path / "a", device="cpu", progress=False)
    b = activations.collect(*pair, 1, rows, tmp_path / "b", device="cpu", progress=False)
    assert torch.equal(a[:], b[:]) and torch.equal(a.token_ids(), b.token_ids())
    with pytest.raises(InputError, match=r"document 1: a record needs 'text' or 'messages', got keys \['prompt'\]"):
        activations.read_documents([{"text": "w1"}, {"prompt": "w2"}])
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match=r"needs the datasets package: pip install 'crossdiff_ext\[datasets\]'"):
            activations.read_documents("hf:some/dataset:train")


def test_collect_train_reload(pair, data, tmp_path):
    store = activations.collect(*pair, 1, data, tmp_path / "store", drop_first=1, device="cpu", progress=False)
    cc = cx.CrossCoder(16, 32, 2, k=2)
    cx.train(
        cc,
        store,
        cx.TrainConfig(steps=5, batch_size=16, warmup_steps=1, progress=False, checkpoint_dir=str(tmp_path / "run")),
    )
    reloaded = cx.CrossCoder.from_pretrained(tmp_path / "run" / "step-00000005")
    for a, b in zip(cc.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_command_line_collect_and_train(pair, data, tmp_path, capsys):
    from crossdiff_ext import cli

    assert (
        cli.main(
            [
                "collect",
                "--base",
                pair[0],
                "--chat",
                pair[1],
                "--layer",
                "1",
                "--data",
                data,
                "--out",
                str(tmp_path / "store"),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "train",
                "--store",
                str(tmp_path / "store"),
                "--out",
                str(tmp_path / "run"),
                "--dict-size",
                "32",
                "-k",
                "2",
                "--steps",
                "4",
                "--batch-size",
                "16",
                "--checkpoint-every",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert "trained 4 steps" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("step-")) == [
        "step-00000002",
        "step-00000004",
    ]
    # Two stores mixed half and half, with input normalisation and bf16 mixed precision.
    assert (
        cli.main(
            [
                "train",
                "--store",
                str(tmp_path / "store"),
                "--store",
                str(tmp_path / "store"),
                "--mix",
                "0.5",
                "0.5",
                "--out",
                str(tmp_path / "run2"),
                "--dict-size",
                "32",
                "-k",
                "2",
                "--steps",
                "3",
                "--batch-size",
                "16",
                "--target-rms",
                "1",
                "--mixed-precision",
                "bf16",
                "--quiet",
            ]
        )
        == 0
    )
    cc = cx.CrossCoder.from_pretrained(tmp_path / "run2" / "step-00000003")
    assert cc.target_rms == 1.0 and cc.W_enc.dtype == torch.float32 and not torch.equal(cc.input_scale, torch.ones(2))
    assert cli.main(["train", "--store", "a", "--store", "b", "--mix", "1", "--out", "r", "--dict-size", "8"]) == 2


def test_collect_places_each_model_and_defaults_to_float32_on_the_cpu(pair, data, tmp_path):
    from crossdiff_ext.models import loading as models

    assert models.model_devices(None)[0].type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.model_devices(("cpu", "meta")) == (torch.device("cpu"), torch.device("meta"))
    assert models.default_model_dtype(torch.device("cuda")) == torch.bfloat16
    assert models.default_model_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(InputError, match="one device or two"):
        models.model_devices(["cpu", "cpu", "cpu"])
    one = activations.collect(*pair, 1, data, tmp_path / "one", device="cpu", dtype="float32", progress=False)
    two = activations.collect(*pair, 1, data, tmp_path / "two", device=["cpu", "cpu"], dtype="float32", progress=False)
    assert torch.equal(one[0 : len(one)], two[0 : len(two)])


def test_collect_several_layers_in_one_pass(pair, data, tmp_path):
    options = dict(dtype="float32", device="cpu", progress=False, batch_size=4, shard_rows=40)
    models = [transformers.AutoModelForCausalLM.from_pretrained(p) for p in pair]
    tok = make_tokenizer()
    fired = []
    for m in models:  # nothing after the deepest layer asked for (1 of 3 blocks) runs
        m.model.layers[2].register_forward_hook(lambda *a: fired.append("block 2"))
        m.lm_head.register_forward_hook(lambda *a: fired.append("head"))
    both = activations.collect((models[0], tok), (models[1], tok), [0, 1], data, tmp_path / "both", **options)
    assert fired == [] and sorted(both) == [0, 1]
    for layer in (0, 1):
        alone = activations.collect(*pair, layer, data, tmp_path / f"alone-{layer}", **options)
        assert both[layer].path == str(tmp_path / "both" / f"layer-{layer}")
        assert both[layer].meta["info"]["layer"] == layer
        assert torch.equal(both[layer][0 : len(alone)], alone[0 : len(alone)]) and len(both[layer]) == len(alone)
        assert torch.equal(both[layer].token_ids(), alone.token_ids())
    # Resume with the stores at different points (a crash between two stores' writes): each continues from its own.
    for layer, rows in ((0, 45), (1, 13)):
        activations.collect(*pair, layer, data, tmp_path / "resumed" / f"layer-{layer}", max_tokens=rows, **options)
    resumed = activations.collect(*pair, [0, 1], data, tmp_path / "resumed", resume=True, **options)
    for layer in (0, 1):
        assert torch.equal(resumed[layer][0 : len(resumed[layer])], both[layer][0 : len(both[layer])])
    with pytest.raises(InputError, match="lists a block more than once"):
        activations.collect(*pair, [1, 1], data, tmp_path / "x", **options)
    from crossdiff_ext import cli

    args = ["collect", "--base", pair[0], "--chat", pair[1], "--layer", "0", "1", "--data", data, "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "cli"), "--quiet", "--max-tokens", "10"]) == 0
    assert [len(activations.ActivationStore(tmp_path / "cli" / f"layer-{x}")) for x in (0, 1)] == [10, 10]


def test_norm_filter_drops_outliers_counts_them_and_resumes_exactly(pair, data, tmp_path):
    options = dict(dtype="float32", device="cpu", progress=False, batch_size=64, pack_window=1)
    every = activations.collect(*pair, 1, data, tmp_path / "every", **options)
    x = every[0 : len(every)]
    norms = torch.linalg.vector_norm(x, dim=2)  # one batch holds every document: its median is the whole store's
    inside = (norms <= 1.05 * norms.median(dim=0).values).all(1)
    assert 0 < int((~inside).sum()) < len(every)
    kept = activations.collect(*pair, 1, data, tmp_path / "kept", max_norm_ratio=1.05, shard_rows=7, **options)
    assert torch.equal(kept[0 : len(kept)], x[inside]) and torch.equal(kept.token_ids(), every.token_ids()[inside])
    documents = len([d for d in activations.read_documents(data)])
    assert kept.meta["dropped"] == {"first_positions": documents, "norm_outliers": int((~inside).sum())}
    assert kept.meta["info"]["max_norm_ratio"] == 1.05 and "norm_outliers" not in every.meta["dropped"]
    # Stopped part way (a shard boundary between candidates) and resumed: the same store and counts.
    part = activations.collect(
        *pair, 1, data, tmp_path / "part", max_norm_ratio=1.05, shard_rows=7, max_tokens=23, **options
    )
    assert len(part) == 23
    whole = activations.collect(
        *pair, 1, data, tmp_path / "part", max_norm_ratio=1.05, shard_rows=7, resume=True, **options
    )
    assert torch.equal(whole[0 : len(whole)], kept[0 : len(kept)]) and whole.meta["dropped"] == kept.meta["dropped"]
    with pytest.raises(InputError, match="max_norm_ratio must be a number > 1"):
        activations.collect(*pair, 1, data, tmp_path / "bad", max_norm_ratio=0.5, **options)
