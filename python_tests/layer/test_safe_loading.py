"""Nothing loaded runs code: a pickle that would create a marker file, planted in every torch file a loader reads
(the paper's .pt / pytorch_model.bin / ae.pt, by path and by Hub repo id; a checkpoint's trainer.pt; a sharded
checkpoint's optimizer.pt), is refused with one InputError line and the marker never appears. The trainer state
is plain, so a checkpoint resumes with weights_only=True; an older pickled one resumes only with
trust_checkpoint=True, exactly."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.errors import InputError
from crossdiff_ext.layer import checkpoints, sharded
from crossdiff_ext.training.checkpoints import check_plain

D, F = 8, 24


class Planted:
    """Unpickling this opens (creates) the marker file: what a hostile checkpoint would do with a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def paper_state(salt):
    g = rng(salt)
    return {
        "encoder.weight": torch.randn(2, D, F, generator=g),
        "encoder.bias": torch.randn(F, generator=g),
        "decoder.weight": torch.randn(2, F, D, generator=g),
        "decoder.bias": torch.randn(2, D, generator=g),
    }


def plant(path, marker, around=None):
    """torch.save a state (default: the paper's) with one value replaced by the planted pickle."""
    state = dict(around if around is not None else paper_state(1))
    state["encoder.bias"] = Planted(marker)
    torch.save(state, path)


def assert_refused(call, path, marker):
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused to load") and "io.open" in message, message
    assert not os.path.exists(marker), "the planted pickle ran"


def test_the_plant_is_live(tmp_path):
    """Control: an unrestricted torch.load of the planted file does create the marker."""
    marker = tmp_path / "marker"
    plant(tmp_path / "ae.pt", marker)
    torch.load(tmp_path / "ae.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("layout", ["bare.pt", "ae.pt", "pytorch_model.bin"])
def test_a_planted_dictionary_learning_file_is_refused(tmp_path, layout):
    marker = tmp_path / "marker"
    directory = tmp_path / "repo"
    directory.mkdir()
    path = directory / layout
    plant(path, marker)
    if layout == "ae.pt":  # a training run's output
        (directory / "config.json").write_text(json.dumps(dict(trainer=dict(dict_class="CrossCoder"))))
    elif layout == "pytorch_model.bin":  # an older Hub upload
        (directory / "config.json").write_text(json.dumps(dict(activation_dim=D, dict_size=F, num_layers=2)))
    assert_refused(lambda: cx.load_dictionary_learning(path), path, marker)
    with pytest.raises(InputError) as caught:
        cx.load_dictionary_learning(path)
    assert "trust" not in str(caught.value)  # nothing to opt into: the paper's files are plain state dicts
    if layout != "bare.pt":
        assert_refused(lambda: cx.CrossCoder.from_pretrained(directory), path, marker)
        assert_refused(lambda: cx.load_dictionary_learning(directory), path, marker)


def test_a_planted_file_in_a_hub_repo_is_refused(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    commit = f"{7:040x}"
    snapshot = tmp_path / "cache" / "models--stranger--cc" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    marker = tmp_path / "marker"
    plant(snapshot / "pytorch_model.bin", marker)
    (snapshot / "config.json").write_text(json.dumps(dict(activation_dim=D, dict_size=F, num_layers=2)))
    path = snapshot / "pytorch_model.bin"
    assert_refused(lambda: cx.CrossCoder.from_pretrained("stranger/cc", cache_dir=tmp_path / "cache"), path, marker)


def tiny(seed=0):
    torch.manual_seed(seed)
    return cx.CrossCoder(D, 32, 2, k=2, threshold_start_step=2)


def config(directory, **kwargs):
    base = dict(steps=8, batch_size=16, lr=3e-3, warmup_steps=2, dead_tokens=48, checkpoint_every=4, seed=3)
    return cx.TrainConfig(**(base | kwargs), checkpoint_dir=str(directory), log_every=4, progress=False)


def test_the_trainer_state_loads_with_weights_only(tmp_path):
    data = torch.randn(120, 2, D, generator=rng(2))
    cx.train(tiny(), data, config(tmp_path / "run", steps=4))
    state = torch.load(tmp_path / "run" / "step-00000004" / "trainer.pt", weights_only=True)
    assert set(state) >= {"step", "optimizer", "schedule", "tokens_since_fired", "data", "rng", "config"}
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor) and state["rng"]["numpy"]["key"].numel() == 624
    with pytest.raises(TypeError, match=r"trainer state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        check_plain(dict(rng=dict(numpy=np.zeros(3))))


def as_old_checkpoint(step_dir):
    """Rewrite a checkpoint's trainer.pt as versions before the plain trainer state wrote it: numpy's RNG state
    as the tuple np.random.get_state() returns (an ndarray inside: weights_only refuses it)."""
    path = step_dir / "trainer.pt"
    state = torch.load(path, weights_only=True)
    saved = state["rng"]["numpy"]
    key = saved["key"].numpy().astype(np.uint32)
    state["rng"]["numpy"] = (saved["bit_generator"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    torch.save(state, path)


def test_an_old_checkpoint_resumes_exactly_only_when_trusted(tmp_path):
    data = torch.randn(200, 2, D, generator=rng(3))
    straight = tiny()
    cx.train(straight, data, config(tmp_path / "a"))
    cx.train(tiny(), data, config(tmp_path / "b"), until=4)
    as_old_checkpoint(tmp_path / "b" / "step-00000004")
    np.random.seed(12345)  # the numpy state must come back from the checkpoint
    with pytest.raises(InputError) as caught:
        cx.train(tiny(seed=9), data, config(tmp_path / "b"), resume=True)
    message = str(caught.value)
    assert "\n" not in message and "trainer.pt: refused to load a checkpoint's training state" in message
    assert "numpy" in message and "trust_checkpoint=True / --trust-checkpoint" in message
    resumed = tiny(seed=9)
    cx.train(resumed, data, config(tmp_path / "b", trust_checkpoint=True), resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming the old checkpoint"
    # The trusted resume wrote a new checkpoint in the plain format: it resumes without trust.
    torch.load(tmp_path / "b" / "step-00000008" / "trainer.pt", weights_only=True)


def test_a_planted_trainer_state_is_refused_on_resume(tmp_path):
    data = torch.randn(120, 2, D, generator=rng(4))
    cx.train(tiny(), data, config(tmp_path / "run", steps=4))
    path = tmp_path / "run" / "step-00000004" / "trainer.pt"
    marker = tmp_path / "marker"
    state = torch.load(path, weights_only=True)
    state["schedule"] = Planted(marker)
    torch.save(state, path)
    assert_refused(lambda: cx.train(tiny(), data, config(tmp_path / "run", steps=8), resume=True), path, marker)


def test_a_planted_optimizer_shard_is_refused(tmp_path):
    cc = tiny()
    directory = tmp_path / "step-00000004"
    shards = []
    for r, (first, end) in enumerate([(0, 16), (16, 32)]):
        shard_config = dict(cc.config(), dict_size=end - first, dtype=torch.float32)
        shard = checkpoints.build(cx.CrossCoder, shard_config, sharded.slice_state(cc.state_dict(), first, end), "cpu")
        shard.save_pretrained(directory / sharded.shard_dir_name(r, 2))
        shards.append(dict(dir=sharded.shard_dir_name(r, 2), first=first, end=end))
    (directory / sharded.SHARDING_NAME).write_text(json.dumps(dict(dict_size=32, shards=shards)))
    torch.save(dict(step=4), directory / sharded.TRAINER_NAME)
    marker = tmp_path / "marker"
    torch.save(dict(optimizer={}, tokens_since_fired=torch.zeros(16)), directory / shards[0]["dir"] / "optimizer.pt")
    path = directory / shards[1]["dir"] / "optimizer.pt"
    torch.save(dict(optimizer=Planted(marker), tokens_since_fired=torch.zeros(16)), path)
    assert_refused(lambda: checkpoints.read_training_state(cx.CrossCoder, directory), path, marker)
    shutil.rmtree(directory)


def test_a_refusal_at_the_command_line_is_one_line_and_status_2(tmp_path, capsys):
    data = torch.randn(120, 2, D, generator=rng(5))
    cx.train(tiny(), data, config(tmp_path / "run", steps=4))
    step = tmp_path / "run" / "step-00000004"
    marker = tmp_path / "marker"
    state = torch.load(step / "trainer.pt", weights_only=True)
    state["config"] = Planted(marker)
    torch.save(state, step / "trainer.pt")
    assert cli.main(["push", str(step), "me/never-uploaded"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"crossdiff push: error: {step / 'trainer.pt'}: refused to load")
    assert "push a save_pretrained copy" in err
    assert not marker.exists()
