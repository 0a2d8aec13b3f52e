"""kernels_bench/gpu_session.sh, the one GPU call, rehearsed on the CPU: every stage's plumbing runs (or says in one
line that only a GPU can answer), summary.json holds every stage, and the budget cuts stages off. Keeps the script
from rotting between GPU loans. The whole rehearsal took 31 s on the 2-core CPU machine."""

import json
import os
import subprocess
import sys

import pytest

from kernels_bench import gpu_session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "kernels_bench", "gpu_session.sh")
STAGES = ["env", "import", "op-tests", "scale-tests", "scale-run", "bench", "memcheck", "racecheck", "compile-tests"]


def rehearse(out, **env):
    full_env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    full_env.pop("TRITON_INTERPRET", None)  # the script's pytest runs set it themselves, as on a fresh shell
    done = subprocess.run(
        ["bash", SCRIPT, "all", "--rehearse"], env=full_env, capture_output=True, text=True, timeout=300
    )
    summary = json.loads((out / "summary.json").read_text())
    return done, summary, {s["stage"]: s for s in summary["stages"]}


def test_rehearsal_runs_every_stage(tmp_path):
    done, summary, stages = rehearse(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert summary["rehearsal"] is True and summary["failed"] == []
    assert list(stages) == STAGES
    assert stages["env"]["figures"]["torch"].startswith("2.")
    assert "cpu" in stages["import"]["figures"]["backends"]
    tests = stages["op-tests"]["figures"]
    assert tests["passed"] > 10 and "failed" not in tests
    bench = stages["bench"]["figures"]
    assert bench["complete"] is True and set(bench["summary"]) >= {"train_step_speedup_vs_dense"}
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["lean"] is True and result["selection_kernels"]["cpu"]["groups_ms"]["batch_topk"] > 0
    assert {c["impl"] for c in result["cases"] if c["name"] == "train_step"} == {
        "crossdiff_ext CrossCoder",
        "dense PyTorch (paper code)",
    }
    for name in ("scale-run", "memcheck", "compile-tests", "racecheck"):
        assert stages[name]["status"] == "gpu-only" and stages[name]["note"].startswith("needs a GPU: ")
    log = (tmp_path / "session.log").read_text()
    assert all(f"== {name}" in log for name in STAGES)
    returned = ["bench.json", "bench.md", "session.log", "summary.json"]  # the device returns <= 8
    assert sorted(p.name for p in tmp_path.iterdir()) == returned


def test_budget_skips_the_stages_it_cannot_fit(tmp_path):
    done, summary, stages = rehearse(tmp_path, GPU_SESSION_BUDGET_S="12")
    assert done.returncode == 0, done.stdout[-3000:]
    assert stages["env"]["status"] == "ok"
    skipped = [name for name, s in stages.items() if s["status"] == "skipped"]
    assert "bench" in skipped and stages["bench"]["note"] == "no time left in the budget"
    assert list(stages) == STAGES  # every stage is still accounted for


def test_abi3_check_passes_the_build_and_catches_other_symbols(monkeypatch):
    from crossdiff_ext import _C

    path = _C.__file__
    assert path.endswith(".abi3.so")
    assert gpu_session.stable_abi_violations(path) == []
    assert "PyModule_Create2" in gpu_session.undefined_python_symbols(path)
    # A version-specific build imports private symbols, or ones the stable ABI gained after 3.10.
    used = ["PyModule_Create2", "_PyThreadState_UncheckedGet", "PyObject_GetBuffer"]
    monkeypatch.setattr(gpu_session, "undefined_python_symbols", lambda p: used)
    assert gpu_session.stable_abi_violations(path) == [
        "_PyThreadState_UncheckedGet: not in the stable ABI",
        "PyObject_GetBuffer: in the stable ABI only from 3.11",
    ]
    renamed = path.replace(".abi3.so", ".cpython-312-x86_64-linux-gnu.so")
    monkeypatch.setattr(gpu_session, "undefined_python_symbols", lambda p: [])
    assert gpu_session.stable_abi_violations(renamed)[0].endswith("lacks the .abi3.so suffix")


@pytest.mark.parametrize(
    "log,expected",
    [
        ("....\n3 passed, 2 skipped, 1 deselected in 4.1s\n", {"passed": 3, "skipped": 2, "deselected": 1}),
        ("a.py::t PASSED\n========= 2 passed in 9.0s =========\n========= ERROR SUMMARY: 0 errors\n", {"passed": 2}),
        ("a.py::t[cuda] PASSED\na.py::u[cuda] PASSED\na.py::v[cuda] FAILED\n",
         {"passed_before_cutoff": 2, "failed_before_cutoff": 1}),
    ],
)  # fmt: skip
def test_pytest_figures(log, expected):
    assert gpu_session.pytest_figures(log) == expected
