"""Online training (data.online): both models harvest into a shuffle buffer as training goes. The rows are the
ones collect stores, resume is bit-exact, the command line trains without a store, bad input fails before any
weights load."""

import pytest
import torch
import transformers

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.data import activations
from crossdiff_ext.data.online import OnlineActivations
from crossdiff_ext.errors import InputError

LAYER = 1


def sorted_rows(x):
    """Rows [n, 2, d] in a canonical order (lexicographic over their values)."""
    flat = x.reshape(x.shape[0], -1).double()
    order = sorted(range(flat.shape[0]), key=lambda i: flat[i].tolist())
    return flat[order]


def test_one_epoch_of_the_buffer_is_what_collect_stores(pair, data, tmp_path):  # noqa: F811
    store = activations.collect(
        *pair, LAYER, data, tmp_path / "s", drop_first=1, dtype="float32", device="cpu", progress=False
    )
    n = len(store)
    source = OnlineActivations(*pair, LAYER, data, batch_size=n, buffer_tokens=n, device="cpu")
    first = source.next()
    assert first.shape == (n, 2, 16) and source.epoch == 1 and source.document == 0
    torch.testing.assert_close(sorted_rows(first), sorted_rows(store[0:n].float()), rtol=1e-6, atol=1e-6)
    mean, variance = source.statistics()
    torch.testing.assert_close(mean, store[0:n].double().mean(0), rtol=1e-5, atol=1e-6)
    assert variance.shape == (2, 16)


def test_online_training_resumes_bit_exactly(pair, data, tmp_path):  # noqa: F811
    def run(directory, until=None, resume=False):
        torch.manual_seed(0)
        cc = cx.CrossCoder(16, 32, 2, k=3, target_rms=1.0)
        source = OnlineActivations(*pair, LAYER, data, batch_size=16, buffer_tokens=48, forward_batch=3, device="cpu")
        config = cx.TrainConfig(
            steps=12, batch_size=16, checkpoint_dir=str(directory), checkpoint_every=5, progress=False
        )
        result = cx.training.train(cc, source, config, resume=resume, until=until)
        return cc, source, result

    straight, source, _ = run(tmp_path / "a")
    assert source.epoch >= 1  # the run refilled across the documents' end
    run(tmp_path / "b", until=5)
    resumed, _, result = run(tmp_path / "b", resume=True)
    assert result.steps == 12
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_command_line_trains_online(pair, data, tmp_path, capsys):  # noqa: F811
    args = ["train", "--base", pair[0], "--chat", pair[1], "--layer", str(LAYER), "--data", data]
    args += ["--out", str(tmp_path / "run"), "--dict-size", "32", "-k", "3", "--steps", "4", "--batch-size", "16"]
    assert cli.main([*args, "--buffer-tokens", "64", "--quiet"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    loaded = cx.CrossCoder.from_pretrained(next((tmp_path / "run").glob("step-*")))
    assert loaded.d_model == 16
    assert cli.main([*args, "--store", str(tmp_path / "nothing")]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_bad_input_before_any_weights_load(pair, data, monkeypatch):  # noqa: F811
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(InputError, match=r"layer must be an int in \[0, 3\)"):
        OnlineActivations(*pair, 3, data, batch_size=8)
    with pytest.raises(InputError, match="buffer_tokens must be an int >= batch_size"):
        OnlineActivations(*pair, LAYER, data, batch_size=8, buffer_tokens=4)
    with pytest.raises(InputError, match="no documents"):
        OnlineActivations(*pair, LAYER, [], batch_size=8)
