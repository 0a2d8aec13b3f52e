"""User errors at the `crossdiff` command line: one line `crossdiff <command>: error: <message>` on stderr and exit
status 2, for every subcommand a case applies to; bugs keep their traceback. The commands run in-process on tiny
stores, checkpoints and models built in tmp_path; one case runs as a real subprocess."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.data.store import StoreWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A store (70 rows [2, 4] in shards of 32, with token ids), a crosscoder directory, a training run."""
    root = tmp_path_factory.mktemp("assets")
    g = rng(800)
    with StoreWriter(root / "store", 2, 4, dtype="float32", shard_rows=32) as w:
        w.append(torch.randn(70, 2, 4, generator=g), torch.randint(0, 50, (70,), generator=g), torch.arange(70) % 9)
    with StoreWriter(root / "wide", 2, 6, dtype="float32", shard_rows=32) as w:
        w.append(torch.randn(40, 2, 6, generator=g))
    cc = cx.CrossCoder(4, 8, 2, k=2)
    cc.threshold.fill_(0.05)  # as if trained past threshold_start_step: scale and report read inference codes
    cc.save_pretrained(root / "cc")
    cfg = cx.TrainConfig(steps=2, batch_size=16, warmup_steps=1, progress=False, checkpoint_dir=str(root / "run"))
    cx.train(cx.CrossCoder(4, 8, 2, k=2), cx.ActivationStore(root / "store"), cfg)
    return root


class Inputs:
    """Copies of the good assets for one test, to corrupt; paths as strings for the command line."""

    def __init__(self, assets, tmp_path):
        self.tmp, self.assets = tmp_path, assets
        self.store, self.checkpoint, self.run = (str(assets / n) for n in ("store", "cc", "run"))
        self.dict_size = "8"

    def copy(self, name):
        target = self.tmp / name
        shutil.copytree(self.assets / name, target)
        setattr(self, name if name != "cc" else "checkpoint", str(target))
        return target

    @property
    def step(self):
        return self.tmp / "run" / "step-00000002"


def _truncate(path, keep=-9):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _nan_rows(inputs):
    store = inputs.copy("store")
    raw = np.fromfile(store / "shard-00001.bin", dtype=np.float32)
    raw[[5 * 8 + 1, 12 * 8 + 7]] = [np.nan, np.inf]  # rows 37 and 44 of the store
    raw.tofile(store / "shard-00001.bin")


def _json(path, text):
    path.write_text(text)


# Each case: the subcommands it applies to, what it breaks, and what the message must name.
STORE_CASES = {
    "store missing": (lambda i: setattr(i, "store", str(i.tmp / "nowhere")), r"nowhere is not an activation store"),
    "not a store": (lambda i: (i.tmp / "empty").mkdir() or setattr(i, "store", str(i.tmp / "empty")), "no store.json"),
    "store.json not JSON": (
        lambda i: _json(i.copy("store") / "store.json", '{"format": '),
        r"store/store\.json: not valid JSON",
    ),
    "store.json not a store": (lambda i: _json(i.copy("store") / "store.json", "[]"), r"store\.json: unknown format"),
    "shard missing": (
        lambda i: os.unlink(i.copy("store") / "shard-00001.bin"),
        r"shard-00001\.bin listed in store\.json is missing",
    ),
    "shard truncated": (
        lambda i: _truncate(i.copy("store") / "shard-00001.bin"),
        r"shard shard-00001\.bin has 1015 bytes, store\.json expects 32 rows x 32 bytes = 1024 \(truncated",
    ),
    "token ids missing": (
        lambda i: os.unlink(i.copy("store") / "tokens-00002.npy"),
        r"tokens-00002\.npy listed in store\.json is missing",
    ),
}
CHECKPOINT_CASES = {
    "checkpoint missing": (lambda i: setattr(i, "checkpoint", str(i.tmp / "nocc")), r"nocc: no such checkpoint"),
    "weights truncated": (
        lambda i: _truncate(i.copy("cc") / "model.safetensors"),
        r"cc/model\.safetensors: not a readable safetensors file \(truncated: \d+ bytes, the header describes \d+",
    ),
    "weights missing": (lambda i: os.unlink(i.copy("cc") / "model.safetensors"), r"no model\.safetensors beside"),
    "config not JSON": (lambda i: _json(i.copy("cc") / "config.json", "{"), r"cc/config\.json: cannot read JSON"),
    "config out of range": (
        lambda i: _json(
            i.copy("cc") / "config.json",
            json.dumps(dict(json.loads((i.assets / "cc" / "config.json").read_text()), k=99)),
        ),
        r"cc/config\.json: k must be an int in \[1, dict_size = 8\]",
    ),
    "checkpoint does not fit the store": (
        lambda i: setattr(i, "store", str(i.assets / "wide")),
        r"reads \[M=2, d=4\] rows, the store .*wide holds \[M=2, d=6\]",
    ),
    "checkpoint without an inference threshold": (
        lambda i: (
            cx.CrossCoder(4, 8, 2, k=2).save_pretrained(i.tmp / "raw") or setattr(i, "checkpoint", str(i.tmp / "raw"))
        ),
        r"the checkpoint .*raw has no inference threshold \(-1: it stopped before threshold_start_step = 1000\)",
    ),
    "NaN in the store": (_nan_rows, r"2 of the 70 rows read hold NaN or Inf activations \(store rows \[37, 44\]"),
}
RESUME_CASES = {
    "no checkpoint to resume": (lambda i: setattr(i, "run", str(i.tmp / "fresh")), r"no checkpoint under"),
    "resume: weights truncated": (
        lambda i: i.copy("run") and _truncate(i.step / "model.safetensors", 40),
        r"step-00000002/model\.safetensors: not a readable safetensors file \(truncated",
    ),
    "resume with another dict size": (
        lambda i: setattr(i, "dict_size", "16"),
        r"cannot resume from .*run/step-00000002: W_enc has shape \(8, 2, 4\), expected \(16, 2, 4\)",
    ),
    "resume: trainer state truncated": (
        lambda i: i.copy("run") and _truncate(i.step / "trainer.pt", 100),
        r"step-00000002/trainer\.pt: not a readable torch\.save file",
    ),
}
TRAIN_CASES = {
    "k out of range": (["-k", "9"], r"k must be an int in \[1, dict_size = 8\] for batch_topk, got 9"),
    "steps out of range": (["--steps", "0"], r"^crossdiff train: error: --steps: expected an int >= 1, got 0$"),
    "batch larger than the store": (["--batch-size", "100"], r"has 70 rows, fewer than one batch of 100"),
    "stores of different widths": (["--store", "WIDE"], r"the stores' shapes differ: .*d=4.*d=6"),
    "mix without a fraction per store": (["--store", "STORE", "--mix", "1"], r"--mix needs one fraction per --store"),
    "out is a file": (["--out", "FILE"], r"--out '.*afile' is a file, not a directory"),
    "NaN in the store": (["--store", "NAN"], r"batch 0 of epoch 0: .*hold NaN or Inf activations \(store rows \["),
}


def _command(name, i):
    out = str(i.tmp / "out")
    if name == "train":
        return ["train", "--store", i.store, "--out", out, "--dict-size", "8", "-k", "2", "--steps", "2"] + [
            "--batch-size",
            "16",
            "--quiet",
        ]
    if name == "resume":
        return ["train", "--store", i.store, "--out", i.run, "--dict-size", i.dict_size, "-k", "2", "--steps", "4"] + [
            "--batch-size",
            "16",
            "--resume",
            "--quiet",
        ]
    if name in ("scale", "report"):
        suffix = "t.csv" if name == "scale" else "r.html"
        return [name, "--checkpoint", i.checkpoint, "--store", i.store, "--out", str(i.tmp / suffix), "--quiet"]
    assert name == "verify"
    return ["verify", i.store]


def _fails_with_one_line(argv, capsys, pattern):
    """The command's exit status is 2 and its stderr one line `crossdiff <command>: error: ...` matching pattern."""
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own errors exit from inside parse_args
        code = exit.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"crossdiff {argv[0]}: error: "), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


STORE_PARAMS = [(c, s) for c in STORE_CASES for s in ("train", "scale", "report", "verify")]
CHECKPOINT_PARAMS = [(c, s) for c in CHECKPOINT_CASES for s in ("scale", "report")]


@pytest.mark.parametrize("case,command", STORE_PARAMS + CHECKPOINT_PARAMS, ids=lambda v: v.replace(" ", "_"))
def test_bad_store_or_checkpoint(assets, tmp_path, capsys, case, command):
    inputs = Inputs(assets, tmp_path)
    setup, pattern = {**STORE_CASES, **CHECKPOINT_CASES}[case]
    setup(inputs)
    _fails_with_one_line(_command(command, inputs), capsys, pattern)


@pytest.mark.parametrize("case", list(RESUME_CASES), ids=lambda v: v.replace(" ", "_"))
def test_bad_checkpoint_to_resume(assets, tmp_path, capsys, case):
    inputs = Inputs(assets, tmp_path)
    setup, pattern = RESUME_CASES[case]
    setup(inputs)
    _fails_with_one_line(_command("resume", inputs), capsys, pattern)


@pytest.mark.parametrize("case", list(TRAIN_CASES), ids=lambda v: v.replace(" ", "_"))
def test_bad_training_settings(assets, tmp_path, capsys, case):
    inputs = Inputs(assets, tmp_path)
    extra, pattern = TRAIN_CASES[case]
    (tmp_path / "afile").write_text("x")
    if "NAN" in extra:
        _nan_rows(inputs)
    names = dict(WIDE=str(assets / "wide"), STORE=inputs.store, NAN=inputs.store, FILE=str(tmp_path / "afile"))
    argv = _command("train", inputs)
    if "--store" in extra and "NAN" in extra:
        argv = argv[:1] + argv[3:]  # replace the store
    argv += [names.get(a, a) for a in extra]
    _fails_with_one_line(argv, capsys, pattern)


def test_train_refuses_an_output_with_checkpoints_without_resume(assets, tmp_path, capsys):
    inputs = Inputs(assets, tmp_path)
    argv = _command("resume", inputs)
    argv.remove("--resume")
    _fails_with_one_line(argv, capsys, r"already holds checkpoints .*pass resume=True")


def test_verify_names_a_flipped_byte_and_reports_old_stores_as_unchecked(assets, tmp_path, capsys):
    inputs = Inputs(assets, tmp_path)
    assert cli.main(["verify", inputs.store]) == 0
    assert re.fullmatch(r".*store: 3 shards, 70 rows, 9 files: 9 match their checksums\n", capsys.readouterr().out)
    store = inputs.copy("store")
    data = bytearray((store / "shard-00002.bin").read_bytes())
    data[17] ^= 1
    (store / "shard-00002.bin").write_bytes(bytes(data))
    line = _fails_with_one_line(["verify", inputs.store], capsys, r"shard-00002\.bin fails its checksum")
    assert "shard-00000" not in line and "shard-00001" not in line
    meta = json.loads((store / "store.json").read_text())
    for shard in meta["shards"]:
        del shard["checksums"]
    (store / "store.json").write_text(json.dumps(meta))
    assert cli.main(["verify", inputs.store]) == 0
    assert "0 match their checksums, 9 unchecked (the store recorded no checksum" in capsys.readouterr().out


# --- collect and demo, on tiny transformers models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_models import WORDS, make_model

    root = tmp_path_factory.mktemp("models")
    paths = dict(base=make_model(root / "base", 0), chat=make_model(root / "chat", 1))
    paths["other_vocab"] = make_model(root / "other", 2, words=WORDS[:-3] + ["x", "y", "z"])
    from transformers import LlamaForCausalLM

    broken = LlamaForCausalLM.from_pretrained(paths["chat"])
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")  # NaN from the first block on
    broken.save_pretrained(root / "nan")
    shutil.copy(os.path.join(paths["chat"], "tokenizer.json"), root / "nan")
    shutil.copy(os.path.join(paths["chat"], "tokenizer_config.json"), root / "nan")
    paths["nan"] = str(root / "nan")
    (root / "not_a_model").mkdir()
    paths["not_a_model"] = str(root / "not_a_model")
    data = root / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": "<bos> " + " ".join(f"w{j}" for j in range(i, i + 9))}) for i in range(6))
    )
    paths["data"] = str(data)
    return paths


def _collect_case(models, tmp_path, case):
    args = dict(base=models["base"], chat=models["chat"], layer="1", data=models["data"], out=str(tmp_path / "s"))
    bad = tmp_path / "bad.jsonl"
    if case == "base model directory missing":
        args["base"] = str(tmp_path / "no_model")
    elif case == "not a model directory":
        args["chat"] = models["not_a_model"]
    elif case == "data file missing":
        args["data"] = str(tmp_path / "missing.jsonl")
    elif case == "malformed JSONL":
        bad.write_text('{"text": "w1"}\n\n{"text": "w2"\n')
        args["data"] = str(bad)
    elif case == "record without text":
        bad.write_text('{"text": "w1"}\n{"prompt": "w2"}\n')
        args["data"] = str(bad)
    elif case == "data not UTF-8":
        bad.write_bytes(b'{"text": "w1"}\n{"text": "\xff\xfe"}\n')
        args["data"] = str(bad)
    elif case == "no documents":
        bad.write_text("\n\n")
        args["data"] = str(bad)
    elif case == "layer out of range":
        args["layer"] = "3"
    elif case == "tokenizers differ":
        args["chat"] = models["other_vocab"]
    elif case == "NaN activations":
        args["chat"] = models["nan"]
    elif case == "store exists":
        os.makedirs(args["out"])
        (tmp_path / "s" / "store.json").write_text("{}")
    elif case == "out is a file":
        (tmp_path / "s").write_text("x")
    argv = ["collect"] + [a for k, v in args.items() for a in (f"--{k}", v)] + ["--device", "cpu", "--quiet"]
    return argv + (["--batch-size", "0"] if case == "batch size 0" else [])


COLLECT_CASES = {
    "base model directory missing": r"base model directory '.*no_model' does not exist",
    "not a model directory": r"chat model '.*not_a_model' cannot be loaded: ",
    "data file missing": r"data '.*missing\.jsonl' does not exist",
    "malformed JSONL": r"bad\.jsonl:3: not JSON",
    "record without text": r"bad\.jsonl:2: a record needs 'text' or 'messages', got keys \['prompt'\]",
    "data not UTF-8": r"bad\.jsonl:2: not UTF-8 text",
    "no documents": r"data '.*bad\.jsonl' holds no documents",
    "layer out of range": r"layer must be an int in \[0, 3\) for the base model \(3 blocks\), got 3",
    "tokenizers differ": r"the tokenizers disagree \(57 vs 57 tokens; only in base: \['w47', 'w48', 'w49'\]",
    "NaN activations": r"batch 0 of the collection \(documents \[0, 1, 2, 3, 4, 5\], 0-based, of '.*data\.jsonl'\)"
    r".*54 of the 54 rows to append hold non-finite activations .*of models \[1\]",
    "store exists": r"already holds a store; pass resume=True",
    "out is a file": r"--out '.*s' is a file, not a directory",
    "batch size 0": r"argument --batch-size: expected an int >= 1, got 0",
}


@pytest.mark.parametrize("case", list(COLLECT_CASES), ids=lambda v: v.replace(" ", "_"))
def test_bad_collect_inputs(models, tmp_path, capsys, case):
    _fails_with_one_line(_collect_case(models, tmp_path, case), capsys, COLLECT_CASES[case])


DEMO_CASES = {
    "base without chat": (["--base", "BASE"], r"give both --base and --chat"),
    "model directory missing": (["--base", "MISSING", "--chat", "CHAT", "--layer", "1"], r"does not exist"),
    "layer out of range": (["--base", "BASE", "--chat", "CHAT", "--layer", "5"], r"layer must be an int in \[0, 3\)"),
    "k out of range": (["-k", "50", "--dict-size", "10"], r"k must be in \[1, dict_size = 10\], got 50"),
    "out holds other files": (
        ["--base", "BASE", "--chat", "CHAT", "--layer", "1", "--out", "FOREIGN"],
        r"did not write",
    ),
}


@pytest.mark.parametrize("case", list(DEMO_CASES), ids=lambda v: v.replace(" ", "_"))
def test_bad_demo_inputs(models, tmp_path, capsys, case):
    extra, pattern = DEMO_CASES[case]
    (tmp_path / "foreign" / "store").mkdir(parents=True)
    (tmp_path / "foreign" / "store" / "mine.txt").write_text("x")
    names = dict(BASE=models["base"], CHAT=models["chat"], MISSING=str(tmp_path / "none"))
    names["FOREIGN"] = str(tmp_path / "foreign")
    argv = ["demo", "--out", str(tmp_path / "demo"), "--text-documents", "2", "--chat-documents", "2", "--quiet"]
    _fails_with_one_line(argv + [names.get(a, a) for a in extra], capsys, pattern)


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["planted", "-k", "200"], r"k must be an int in \[1, dict_size = 96\]"),
        (["planted", "--tokens", "0"], r"argument --tokens: expected an int >= 1, got 0"),
        (["planted", "--out", "FILE"], r"--out '.*afile' is a file"),
        (["miniature", "--out", "FILE"], r"--out '.*afile' is a file"),
        (["miniature", "--steps", "-3"], r"argument --steps: expected an int >= 1, got -3"),
        (["scale", "--checkpoint", "c", "--store", "s"], r"the following arguments are required: --out"),
        (["report", "--checkpoint", "c", "--store", "s", "--out", "NODIR"], r"the directory .*nodir does not exist"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else "",
)
def test_bad_arguments_of_the_other_commands(tmp_path, capsys, argv, pattern):
    (tmp_path / "afile").write_text("x")
    names = dict(FILE=str(tmp_path / "afile"), NODIR=str(tmp_path / "nodir" / "r.html"))
    _fails_with_one_line([names.get(a, a) for a in argv], capsys, pattern)


def test_a_bug_keeps_its_traceback(assets, tmp_path, monkeypatch):
    """A ValueError that is not an InputError is a bug: main() lets it through (exit status 1, with traceback)."""

    def bug(*args, **kwargs):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(cli.train.training, "train", bug)
    with pytest.raises(ValueError, match="an internal mistake"):
        cli.main(_command("train", Inputs(assets, tmp_path)))


def test_the_command_exits_2_with_one_line(tmp_path):
    """The real process: exit status 2 and a single line on stderr, nothing on stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    argv = ["train", "--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--dict-size", "8"]
    done = subprocess.run([sys.executable, "-m", "crossdiff_ext", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert (
        done.stderr
        == f"crossdiff train: error: {tmp_path / 'nowhere'} is not an activation store (it does not exist)\n"
    )
