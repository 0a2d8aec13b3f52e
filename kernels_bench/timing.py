"""Timing and reporting helpers shared by the benchmarks: wall-clock timers, percentiles, machine facts and
atomic result files (through crossdiff_ext.atomic). Standard library + torch only at import."""

import datetime
import json
import os
import platform
import subprocess
import time

import torch


def percentile(samples, q):
    """q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentile of no samples")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms):
    """{median_ms, p20_ms, p80_ms, min_ms, n} of a list of milliseconds."""
    return dict(
        median_ms=percentile(samples_ms, 50),
        p20_ms=percentile(samples_ms, 20),
        p80_ms=percentile(samples_ms, 80),
        min_ms=min(samples_ms),
        n=len(samples_ms),
    )


def time_once_ms(fn):
    """Wall-clock milliseconds of one call (CPU work is synchronous, no device sync needed)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def alternate(cases, reps, warmup=1):
    """Run every case `warmup` times, then `reps` rounds of one call per case in turn (so slow drifts of the
    machine, thermal or noisy neighbours, hit all cases alike). cases: {name: fn}. Returns {name: [ms, ...]}."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            samples[name].append(time_once_ms(fn))
    return samples


def cpu_model():
    """The CPU's model name (lscpu, else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(cwd=None):
    """HEAD's commit hash, or None (no git, no commits yet). CROSSDIFF_COMMIT names it where the tree is a copy
    without .git (the GPU machine: kernels_bench/gpu_session.sh)."""
    if os.environ.get("CROSSDIFF_COMMIT"):
        return os.environ["CROSSDIFF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def git_dirty_paths(cwd=None, paths=("csrc", "crossdiff_ext", "setup.py")):
    """Tracked or untracked files under `paths` that differ from HEAD, or None. `--no-optional-locks` keeps
    git status from refreshing the index: the benchmark changes no repository state."""
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", *paths],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=cwd,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def machine_info():
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = None
    return dict(
        device=f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        cpu_model=cpu_model(),
        nproc=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cpu_capability=capability,
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def write_atomic(path, text):
    """Write text to path (its directory created if needed) with crossdiff_ext's atomic writer."""
    from crossdiff_ext import atomic  # here, not at the top: the benchmarks import crossdiff_ext when they run

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_text(path, text)


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
