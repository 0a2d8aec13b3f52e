"""The Python half of kernels_bench/gpu_session.sh: the prebuilt extension, its ABI check, and summary.json.

  python -m kernels_bench.gpu_session abi3 FILE.so            static check: FILE uses Python's stable ABI only
  python -m kernels_bench.gpu_session install [--prebuilt DIR] [--need-gpu] [--rehearse]
                                                             put the prebuilt _C in place, import, name backends
  python -m kernels_bench.gpu_session env                     versions, GPU, driver and the commit, one per line
  python -m kernels_bench.gpu_session summary OUT WORK        OUT/summary.json from WORK's stage records and logs

Standard library only at import (the summary runs after every stage and must not pay for torch).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO_ROOT, "crossdiff_ext")
PREBUILT = os.path.join(REPO_ROOT, ".gpu_build")
EXTENSION = "_C.abi3.so"
# The stable ABI the build targets (setup.py's Py_LIMITED_API).
LIMITED_API = (3, 10)


# --- the stable-ABI check ---------------------------------------------------------------------------------------


def undefined_python_symbols(path: str) -> list[str]:
    """The Python C-API symbols `path` imports: its undefined dynamic symbols named Py* or _Py*."""
    nm = shutil.which("nm")
    if nm is None:
        raise SystemExit("abi3 check: `nm` (binutils) is needed to read the symbol table")
    out = subprocess.run([nm, "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
    names = (line.split()[-1] for line in out.splitlines() if line.strip())
    return sorted({n.split("@")[0] for n in names if re.match(r"_?Py", n)})


def stable_abi_violations(path: str) -> list[str]:
    """Symbols `path` imports that are not in the stable ABI of LIMITED_API (abi3info's manifest of CPython's
    Misc/stable_abi.toml), plus a filename that does not say abi3."""
    import abi3info

    stable = {}
    for table in (abi3info.FUNCTIONS, abi3info.DATAS):
        for symbol, entry in table.items():
            stable[symbol.name] = (entry.added.major, entry.added.minor)
    problems = []
    if not os.path.basename(path).endswith(".abi3.so"):
        problems.append(f"{os.path.basename(path)}: the file name lacks the .abi3.so suffix")
    for name in undefined_python_symbols(path):
        added = stable.get(name)
        if added is None:
            problems.append(f"{name}: not in the stable ABI")
        elif added > LIMITED_API:
            problems.append(f"{name}: in the stable ABI only from {added[0]}.{added[1]}")
    return problems


def check_abi3(path: str) -> int:
    problems = stable_abi_violations(path)
    for p in problems:
        print(f"abi3 check: {p}")
    if not problems:
        used = ", ".join(undefined_python_symbols(path))
        print(f"abi3 check: {path} uses the stable ABI of {LIMITED_API[0]}.{LIMITED_API[1]} only ({used})")
    return 1 if problems else 0


# --- the prebuilt extension -------------------------------------------------------------------------------------


def place_prebuilt(prebuilt: str) -> str | None:
    """Copy the prebuilt _C into the package (replacing any other _C build there); its path, or None if absent."""
    src = os.path.join(prebuilt, "lib", "crossdiff_ext", EXTENSION)
    if not os.path.exists(src):
        return None
    for name in os.listdir(PACKAGE):
        if name.startswith("_C.") and name.endswith(".so"):
            os.remove(os.path.join(PACKAGE, name))
    shutil.copy2(src, os.path.join(PACKAGE, EXTENSION))
    return src


def install(prebuilt: str | None, need_gpu: bool, rehearse: bool = False) -> int:
    """Place the prebuilt _C (if given and present) and import the package. Exit 0 when it imports with its CUDA
    kernels (and, with need_gpu, a GPU to run them); otherwise print why, so the caller builds. A rehearsal checks
    the prebuilt's ABI and leaves the checkout's own build in place."""
    if prebuilt and rehearse:
        src = os.path.join(prebuilt, "lib", "crossdiff_ext", EXTENSION)
        if os.path.exists(src):
            problems = stable_abi_violations(src)
            print(f"prebuilt: {src} (rehearsal: ABI checked, not placed)")
            if problems:
                print(f"import error: the prebuilt is not abi3: {'; '.join(problems)}")
                return 1
        else:
            print(f"prebuilt: none under {prebuilt}")
    elif prebuilt:
        src = place_prebuilt(prebuilt)
        print(f"prebuilt: {src}" if src else f"prebuilt: none under {prebuilt}")
    try:
        import torch

        import crossdiff_ext as cx
    except ImportError as err:  # printed whole: an undefined symbol must not read as "no cuda backend"
        print(f"import error: {err}")
        return 1
    print(f"imported: {cx.__file__}")
    print(f"backends: {', '.join(cx.available_backends())}")
    if "cuda" not in cx.available_backends():
        print("import error: the build has no CUDA kernels")
        return 1
    if need_gpu and not torch.cuda.is_available():
        print("import error: no CUDA device is visible")
        return 1
    return 0


# --- the environment --------------------------------------------------------------------------------------------


def commit() -> str:
    """The commit under test: CROSSDIFF_COMMIT, the one the prebuild recorded, or git's (a copy may lack .git)."""
    if os.environ.get("CROSSDIFF_COMMIT"):
        return os.environ["CROSSDIFF_COMMIT"]
    recorded = os.path.join(PREBUILT, "commit.txt")
    if os.path.exists(recorded):
        with open(recorded) as fh:
            return fh.read().strip() + " (recorded by the prebuild)"
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env() -> int:
    import platform

    import torch
    import triton

    print(f"commit: {commit()}")
    print(f"python: {platform.python_version()}")
    print(f"torch: {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"triton: {triton.__version__}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"gpu: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}")
    else:
        print("gpu: none visible")
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True)
        print(f"nvidia-smi: {done.stdout.strip() or done.stderr.strip()}")
    else:
        print("nvidia-smi: not on this machine")
    return 0


# --- summary.json -----------------------------------------------------------------------------------------------

PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def pytest_figures(log: str) -> dict:
    """Counts from pytest's closing line; per-test PASSED/FAILED lines (-v) when the run was cut off."""
    closing = [
        line
        for line in log.splitlines()
        if re.search(r"\d+ (passed|failed|skipped|error)", line) and "ERROR SUMMARY" not in line
    ]  # compute-sanitizer's own "========= ERROR SUMMARY: 0 errors" is not pytest's line
    if closing:
        return {kind.rstrip("s"): int(n) for n, kind in PYTEST_COUNTS.findall(closing[-1])}
    return {
        "passed_before_cutoff": len(re.findall(r" PASSED", log)),
        "failed_before_cutoff": len(re.findall(r" FAILED", log)),
    }


def sanitizer_figures(log: str) -> dict:
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", log)
    return dict(pytest_figures(log), sanitizer_errors=[int(e) for e in errors])


def line_figures(log: str, keys: tuple[str, ...]) -> dict:
    """`key: value` lines of a log."""
    found = {}
    for line in log.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in keys:
            found[key] = value.strip()
    return found


def bench_figures(out: str) -> dict:
    path = os.path.join(out, "bench.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        result = json.load(fh)
    ce = result.get("ceilings", {})
    return dict(
        complete=result.get("complete"),
        device=result.get("device"),
        gemm_tflops=ce.get("matmul", {}).get("tflops"),
        copy_gb_per_s=(ce.get("copy", {}).get("bytes_per_s") or 0) / 1e9 or None,
        summary=result.get("summary"),
        summary_backend=result.get("summary_backend"),
        auto_table={op: v[0] for op, v in (result.get("auto_table") or {}).items()} or None,
        time_over_ledger={
            backend: {op: round(r["time_over_ledger"], 2) for op, r in rows.items()}
            for backend, rows in (result.get("ledger_vs_time") or {}).items()
        }
        or None,
    )


FIGURES = {
    "env": lambda log, out: line_figures(log, ("commit", "python", "torch", "triton", "gpu", "nvidia-smi")),
    "import": lambda log, out: line_figures(log, ("prebuilt", "imported", "backends", "import error")),
    "import-retry": lambda log, out: line_figures(log, ("imported", "backends", "import error")),
    "import-after-build": lambda log, out: line_figures(log, ("imported", "backends", "import error")),
    "op-tests": lambda log, out: pytest_figures(log),
    "scale-tests": lambda log, out: pytest_figures(log),
    "compile-tests": lambda log, out: pytest_figures(log),
    "memcheck": lambda log, out: sanitizer_figures(log),
    "racecheck": lambda log, out: sanitizer_figures(log),
    "bench": lambda log, out: bench_figures(out),
}


def summary(out: str, work: str) -> int:
    """Write OUT/summary.json: one entry per stage run so far (stage, exit code, seconds, status, key figures)."""
    stages = []
    records = os.path.join(work, "stages.jsonl")
    if os.path.exists(records):
        with open(records) as fh:
            stages = [json.loads(line) for line in fh if line.strip()]
    for stage in stages:
        log_path = os.path.join(work, f"{stage['stage']}.log")
        log = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
        figures = FIGURES.get(stage["stage"])
        if figures and stage["status"] not in ("skipped", "gpu-only"):
            stage["figures"] = figures(log, out)
    doc = dict(
        rehearsal=os.environ.get("GPU_SESSION_REHEARSE") == "1",
        budget_s=int(os.environ.get("GPU_SESSION_BUDGET_S", "0")) or None,
        stages=stages,
        failed=[s["stage"] for s in stages if s["status"] in ("failed", "timeout")],
    )
    tmp = os.path.join(out, ".summary.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, os.path.join(out, "summary.json"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.gpu_session", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("abi3").add_argument("path")
    i = sub.add_parser("install")
    i.add_argument("--prebuilt", default=None)
    i.add_argument("--need-gpu", action="store_true")
    i.add_argument("--rehearse", action="store_true", help="check the prebuilt's ABI; do not replace the build")
    sub.add_parser("env")
    s = sub.add_parser("summary")
    s.add_argument("out")
    s.add_argument("work")
    args = p.parse_args(argv)
    if args.command == "abi3":
        return check_abi3(args.path)
    if args.command == "install":
        return install(args.prebuilt, args.need_gpu, args.rehearse)
    if args.command == "env":
        return env()
    return summary(args.out, args.work)


if __name__ == "__main__":
    sys.exit(main())
