"""`python -m kernels_bench auto_table RESULT.json [...] [--write]`: backend "auto"'s per-op choice on a GPU model,
from the suite's measured op cases.

For every op of backends.AUTO_GPU_TABLE the backend ("cuda" or "triton") with the lower median at the suite's
main shape wins. A result that lacks a measured case of some op, or comes from a CPU or partial run, is refused:
a table is only ever written whole, from one finished GPU run. --write rewrites the package data file
crossdiff_ext/auto_tables.json (atomically), replacing the tables of the results' device names and keeping those
of other GPU models; without it the updated file is printed.
"""

import argparse
import json
import os
import sys

from crossdiff_ext import atomic, backends

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The source tree's copy (what a commit ships), not an installed package's.
AUTO_TABLES_JSON = os.path.join(REPO_ROOT, "crossdiff_ext", os.path.basename(backends.AUTO_TABLES_PATH))
GPU_BACKENDS = backends.GPU_BACKENDS


def ops():
    return tuple(backends.AUTO_GPU_TABLE)


def choose(result, op_names=None):
    """{op: (backend, {backend: median_ms})} from a suite result; raises ValueError naming what is missing."""
    op_names = ops() if op_names is None else op_names
    if result.get("complete") is False:
        raise ValueError("the result is partial (its run did not finish); choose from a finished run")
    if (
        result.get("suite") != "paper"
        or result.get("backends") is None
        or not set(result["backends"]) & set(GPU_BACKENDS)
    ):
        raise ValueError(
            f"the result is not from the GPU suite at the paper's shape (suite {result.get('suite')!r}, backends "
            f"{result.get('backends')!r})"
        )
    chosen, missing = {}, []
    for op in op_names:
        times = {
            c["backend"]: c["median_ms"]
            for c in result["cases"]
            if c["name"] == op
            and c.get("impl") == "crossdiff_ext"
            and c["backend"] in GPU_BACKENDS
            and "median_ms" in c
            and "shape" not in c
        }
        if not times:
            missing.append(op)
            continue
        chosen[op] = (min(times, key=times.get), times)
    if missing:
        raise ValueError(f"the result has no measured GPU case of {missing}; run the suite with every op")
    return chosen


def read_tables(path=None):
    """(AUTO_GPU_TABLES, AUTO_GPU_SOURCES) of an auto tables file (default: the source tree's), checked as backends
    reads it."""
    return backends.read_auto_tables(path or AUTO_TABLES_JSON)


def render(tables, sources):
    """The auto tables file's text: devices sorted, each table in the ops' order."""
    data = dict(
        tables={device: {op: tables[device][op] for op in ops()} for device in sorted(tables)},
        sources={device: sources[device] for device in sorted(sources)},
    )
    return json.dumps(data, indent=2) + "\n"


def update(tables, sources, device, table, source):
    """The tables and sources with `device`'s replaced (other devices kept)."""
    return dict(tables, **{device: dict(table)}), dict(sources, **{device: source})


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels_bench auto_table", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="suite result files (kernels_bench/results/<device>.json)")
    p.add_argument("--write", action="store_true", help=f"rewrite {AUTO_TABLES_JSON}")
    args = p.parse_args(argv)
    tables, sources = read_tables()
    for path in args.results:
        with open(path) as fh:
            result = json.load(fh)
        try:
            chosen = choose(result)
        except ValueError as err:
            sys.exit(f"{path}: {err}")
        source = os.path.relpath(os.path.abspath(path), REPO_ROOT) + f" (commit {result.get('commit', '?')[:12]})"
        print(f"{result['device']} from {source}:")
        for op, (backend, times) in chosen.items():
            print(f"  {op:20s} {backend:7s} " + "  ".join(f"{b} {ms:.4f} ms" for b, ms in sorted(times.items())))
        tables, sources = update(tables, sources, result["device"], {op: b for op, (b, _) in chosen.items()}, source)
    text = render(tables, sources)
    if args.write:
        atomic.write_text(AUTO_TABLES_JSON, text)
        print(f"wrote {AUTO_TABLES_JSON}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
