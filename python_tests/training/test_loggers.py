"""The training loggers: JSONL, TensorBoard and W&B (offline) record the same metrics of a real run (each read back
with its own reader), a resumed run's logs hold every step once, bad logger choices are named, and the HTML
report draws the run's curves from its log."""

import glob
import json
import math
import os
import shutil
import struct
import sys

import pytest
import torch
import wandb
from conftest import rng
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.cli import config_flags
from crossdiff_ext.diffing import curves, report
from crossdiff_ext.training.loggers import scalars

# What the loop computes and every backend must carry (fve/model_i: FVE per model).
CORE = {"loss", "reconstruction", "aux", "lr", "grad_norm", "fve", "l0", "dead_fraction", "threshold"}


def tiny(seed=0):
    torch.manual_seed(seed)
    return cx.CrossCoder(8, 32, 2, k=2, threshold_start_step=2)


def config(run_dir, **kwargs):
    base = dict(
        steps=12,
        batch_size=16,
        lr=3e-3,
        warmup_steps=3,
        dead_tokens=48,
        checkpoint_every=4,
        checkpoint_dir=None if run_dir is None else str(run_dir),
        log_every=2,
        progress=False,
        seed=3,
    )
    return cx.TrainConfig(**dict(base, **kwargs))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode, writing under tmp_path only: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "crossdiff-test")
    return tmp_path / "wandb-dir"


def wandb_history(wandb_dir):
    """{step: {key: value}} of the offline runs' history records, read from their .wandb files (W&B's LevelDB-style
    log: a 7-byte file header, then 32 KiB blocks of chunks with a 7-byte header: crc, length, type)."""
    # run.finish() can return before wandb's service process has written the last records (seen here in 3 of 21
    # tries); shutting the service down waits for them.
    wandb.teardown()
    history = {}
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, parts = 7, []
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left  # a block's tail too short for a chunk header is padding
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            parts.append(data[pos + 7 : pos + 7 + length])
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(b"".join(parts))
                parts = []
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    history.setdefault(record.history.step.num, {}).update(
                        {k: v for k, v in items.items() if not k.startswith("_")}
                    )
    return history


def tensorboard_scalars(log_dir):
    """{step: {tag: value}} of the event files (the purge markers applied, as TensorBoard shows them)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    found = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            found.setdefault(event.step, {})[tag] = event.value
    return found


def test_every_backend_records_the_same_metrics(tmp_path, offline_wandb):
    data = torch.randn(160, 2, 8, generator=rng(3001))
    run_dir = tmp_path / "run"
    cx.train(tiny(), data, config(run_dir, log=("jsonl", "tensorboard", "wandb")))
    records = cx.read_log(run_dir / "log.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    expected = {r["step"]: scalars(r) for r in records}
    assert CORE | {"fve_per_model/model_0", "fve_per_model/model_1"} <= set(expected[12])
    assert any(v["aux"] != expected[2]["aux"] for v in expected.values())  # real numbers that move, not a constant
    board = tensorboard_scalars(run_dir / "tensorboard")
    history = wandb_history(offline_wandb)
    assert sorted(board) == sorted(history) == sorted(expected)
    for step, values in expected.items():
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        assert set(board[step]) == set(finite), step
        assert set(history[step]) == set(values), step
        for key, value in finite.items():
            assert board[step][key] == pytest.approx(value, rel=1e-6, abs=1e-30), (step, key)  # float32 events
            assert history[step][key] == pytest.approx(value, rel=1e-12, abs=0), (step, key)
    assert json.loads((run_dir / "wandb.json").read_text())["project"] == "crossdiff-test"


def test_a_resumed_run_logs_every_step_once(tmp_path, offline_wandb):
    data = torch.randn(200, 2, 8, generator=rng(3002))
    straight = tmp_path / "straight"
    cx.train(tiny(), data, config(straight))
    run_dir = tmp_path / "run"
    names = ("jsonl", "tensorboard", "wandb")
    cx.train(tiny(), data, config(run_dir, log=names), until=6)
    # A kill after step 6 was logged but before its checkpoint: the resume starts at 4 and runs 5 and 6 again.
    shutil.rmtree(run_dir / "step-00000006")
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write('{"step": 8, "loss": 0.')  # and a line torn by the kill
    (run_dir / ".log.jsonl.0123456789abcdef.tmp").write_text('{"step": 2')  # and a rewrite of the log it killed
    result = cx.train(tiny(seed=9), data, config(run_dir, log=names), resume=True)
    assert result.steps == 12
    lines = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    want = [json.loads(line) for line in open(straight / "log.jsonl")]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    assert lines == want  # exact resume: the same records as the run that was never interrupted
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".log.jsonl")]  # the torn rewrite is gone
    board = tensorboard_scalars(run_dir / "tensorboard")
    assert sorted(board) == [2, 4, 6, 8, 10, 12]
    for record in want:
        assert board[record["step"]]["loss"] == pytest.approx(record["loss"], rel=1e-6)
    # W&B continued the same run: one run id in both sessions' offline directories, each step of each session.
    runs = glob.glob(str(offline_wandb / "wandb" / "offline-run-*"))
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    # (named offline-run-<time>-<id>, with a -1 suffix when both sessions started within the same second)
    assert len(runs) == 2 and all(f"-{run_id}" in os.path.basename(r) for r in runs)
    assert sorted(wandb_history(offline_wandb)) == [2, 4, 6, 8, 10, 12]


def test_loggers_given_as_objects_replace_the_config(tmp_path):
    data = torch.randn(96, 2, 8, generator=rng(3003))
    board = tmp_path / "board"
    cx.train(tiny(), data, config(None, steps=4), loggers=[cx.TensorBoardLogger(board), cx.JsonlLogger(tmp_path / "l")])
    assert sorted(tensorboard_scalars(board)) == [2, 4]
    assert [r["step"] for r in cx.read_log(tmp_path / "l")] == [2, 4]


def test_wandb_alone_creates_the_run_directory(tmp_path, offline_wandb):
    run_dir = tmp_path / "new" / "run"  # nothing else writes there before W&B's run id
    cx.train(tiny(), torch.randn(96, 2, 8, generator=rng(3005)), config(run_dir, steps=4, log=("wandb",)))
    assert sorted(os.listdir(run_dir)) == ["step-00000004", "wandb.json"]
    assert sorted(wandb_history(offline_wandb)) == [2, 4]


def test_bad_logger_choices_are_named(tmp_path, monkeypatch, capsys):
    data = torch.randn(64, 2, 8)
    with pytest.raises(ValueError, match=r"TrainConfig.log must be names from \['jsonl', 'tensorboard', 'wandb'\]"):
        cx.train(tiny(), data, config(tmp_path, log=("csv",)))
    with pytest.raises(ValueError, match="unknown logger 'csv'"):
        cx.train(tiny(), data, config(tmp_path), loggers=["csv"])
    with pytest.raises(ValueError, match="'tensorboard'.*set checkpoint_dir"):
        cx.train(tiny(), data, config(None, log=("tensorboard",)))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"needs the wandb package: pip install 'crossdiff_ext\[logging\]'"):
        cx.train(tiny(), data, config(tmp_path, log=("wandb",)))
    assert not os.path.exists(tmp_path / "step-00000004")  # refused before any step
    argv = ["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--dict-size", "8"]
    assert cli.main(argv + ["--log", "jsonl", "csv"]) == 2
    assert capsys.readouterr().err == (
        "crossdiff train: error: --log: expected names from ['jsonl', 'tensorboard', 'wandb'], each at most once, "
        "got ('jsonl', 'csv')\n"
    )
    parser = cli.build_parser()
    args = parser.parse_args(argv + ["--log", "jsonl", "tensorboard"])
    assert config_flags.train_config_from_args(args, "o", False).log == ("jsonl", "tensorboard")


def test_the_report_draws_the_curves_of_a_real_run(tmp_path):
    data = torch.randn(160, 2, 8, generator=rng(3004))
    cc = tiny()
    cx.train(cc, data, config(tmp_path, log_every=1))
    records = cx.read_log(tmp_path / "log.jsonl")
    assert len(records) == 12
    drawn = curves.curve_series(records)
    assert list(drawn) == ["loss", "fve", "l0", "dead_fraction", "threshold", "lr", "grad_norm"]
    assert set(drawn["loss"]) == {"loss", "reconstruction", "aux"}
    assert set(drawn["fve"]) == {"fve", "fve_per_model/model_0", "fve_per_model/model_1"}
    steps, values = drawn["l0"]["l0"]
    assert steps == list(range(1, 13)) and values == [r["l0"] for r in records]
    table = cx.latent_table(cc)
    plain = report.render(table)
    page = report.render(table, curves=records)
    assert "Training curves" in page and "Training curves" not in plain
    assert page.count("<img") == plain.count("<img") + len(drawn)
    for name in drawn:
        assert page.count(f"alt='training curve: {name}' src='data:image/png;base64,") == 1


def test_a_bad_curves_log_is_named_before_anything_loads(tmp_path, capsys):
    argv = ["report", "--checkpoint", str(tmp_path / "nothing"), "--store", str(tmp_path / "nothing")]
    argv += ["--out", str(tmp_path / "r.html")]
    assert cli.main(argv + ["--curves", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err == (
        f"crossdiff report: error: --curves: {tmp_path / 'missing.jsonl'}: no such training log\n"
    )
    (tmp_path / "not-a-log.jsonl").write_text('{"loss": 1.0}\n{"step": 2}\n')
    assert cli.main(argv + ["--curves", str(tmp_path / "not-a-log.jsonl")]) == 2
    assert "line 1 is not a log record" in capsys.readouterr().err
