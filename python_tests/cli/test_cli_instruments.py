"""`crossdiff adl` and `crossdiff logit-diff` on the tiny model pair: the JSON they write holds what the library
returns, and bad input gives one line and exit status 2 before any weights load."""

import json

import pytest
import torch
import transformers
from tiny_models import WORDS, make_model

import crossdiff_ext as cx
from crossdiff_ext import cli

# The models here are 16 wide: one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_adl_writes_the_librarys_result(pair, data, tmp_path, capsys):
    out = tmp_path / "adl.json"
    argv = ["adl", "--base", pair[0], "--chat", pair[1], "--data", data, "--out", str(out), "--positions", "3"]
    assert (
        cli.main(
            [
                *argv,
                "--layer",
                "2",
                "--scales",
                "1",
                "4",
                "--steer-prompt",
                "w1 w2",
                "--steer-steps",
                "1",
                "--steer-tokens",
                "3",
            ]
        )
        == 0
    )
    written = json.loads(out.read_text())
    expected = cx.adl(*pair, data, layer=2, n_positions=3, patchscope_scales=[1.0, 4.0])
    assert written["layer"] == 2 and written["n_positions"] == 3
    torch.testing.assert_close(torch.tensor(written["delta"]), expected.delta, rtol=1e-5, atol=1e-7)
    assert written["logit_lens"][0]["top"][0]["id"] == expected.logit_lens[0]["top"][0]["id"]
    assert [p["scales"] for p in written["patchscope"]] == [[1.0, 4.0]] * 3

    assert len(written["steering"]) == 3 and len(written["steering"][0]["texts"]) == 1
    assert "position 0: logit lens" in capsys.readouterr().out


def test_adl_of_a_model_against_itself_reports_agreement(pair, data, tmp_path, capsys):
    out = tmp_path / "same.json"
    argv = ["adl", "--base", pair[0], "--chat", pair[0], "--data", data, "--out", str(out), "--positions", "2"]
    assert cli.main(argv) == 0
    assert json.loads(out.read_text())["patchscope"] == [None, None]
    assert capsys.readouterr().out.count("the models agree here") == 2


def test_logit_diff_writes_the_librarys_result(pair, data, tmp_path):
    out = tmp_path / "diff.json"
    argv = ["logit-diff", "--base", pair[0], "--chat", pair[1], "--data", data, "--out", str(out), "--top-k", "4"]
    assert cli.main([*argv, "--context-length", "6", "--contexts", "2"]) == 0
    written = json.loads(out.read_text())
    expected = cx.logit_diff(*pair, data, context_length=6, top_k=4, n_contexts=2)
    assert [t["id"] for t in written["top_tokens"]] == [t["id"] for t in expected.top_tokens]
    assert written["mean_kl"] == pytest.approx(expected.mean_kl, rel=1e-5)
    assert len(written["top_contexts"]) == 2 and len(written["kl"]) == expected.documents


CASES = [
    ("tokenizer", "the tokenizers disagree"),
    ("empty", "data holds no documents"),
    ("out", "the directory"),
]


@pytest.mark.parametrize(
    "command, case, message",
    [("adl", "layer", "layer must be an int in [0, 3) for the base model (3 blocks), got 5")]
    + [(command, *case) for command in ("adl", "logit-diff") for case in CASES],
)
def test_bad_input_gives_one_line_before_weights_load(pair, tmp_path, capsys, monkeypatch, command, case, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other = make_model(tmp_path / "other", 3, words=WORDS + ["w99"]) if case == "tokenizer" else pair[1]
    data = str(empty) if case == "empty" else str(tmp_path / "data.txt")
    (tmp_path / "data.txt").write_text("w1 w2 w3\n")
    out = str(tmp_path / ("missing/x.json" if case == "out" else "x.json"))
    argv = [command, "--base", pair[0], "--chat", other, "--data", data, "--out", out]
    if case == "layer":
        argv += ["--layer", "5"]

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    capsys.readouterr()  # what building the models printed
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"crossdiff {command}: error: "), err
    assert message in err, err
