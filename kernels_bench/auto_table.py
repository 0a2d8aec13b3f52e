"""`python -m kernels_bench auto_table RESULT.json [...] [--write]`: backend "auto"'s per-op choice on a GPU model,
from the suite's measured op cases.

For every op of backends.AUTO_GPU_TABLE the backend ("cuda" or "triton") with the lower median at the suite's
main shape wins. A result that lacks a measured case of some op, or comes from a CPU or partial run, is refused:
a table is only ever written whole, from one finished GPU run. --write replaces the marked block in
crossdiff_ext/backends.py (AUTO_GPU_TABLES / AUTO_GPU_SOURCES, keyed by the result's device name), keeping the
tables of other GPU models; without it the block is printed.
"""
import argparse
import ast
import json
import os
import sys

from . import timing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS_PY = os.path.join(REPO_ROOT, "crossdiff_ext", "backends.py")
BEGIN, END = "# BEGIN AUTO_GPU_TABLES\n", "# END AUTO_GPU_TABLES\n"
GPU_BACKENDS = ("cuda", "triton")


def ops():
    from crossdiff_ext import backends

    return tuple(backends.AUTO_GPU_TABLE)


def choose(result, op_names=None):
    """{op: (backend, {backend: median_ms})} from a suite result; raises ValueError naming what is missing."""
    op_names = ops() if op_names is None else op_names
    if result.get("complete") is False:
        raise ValueError("the result is partial (its run did not finish); choose from a finished run")
    if result.get("suite") != "paper" or result.get("backends") is None \
            or not set(result["backends"]) & set(GPU_BACKENDS):
        raise ValueError(f"the result is not from the GPU suite at the paper's shape (suite {result.get('suite')!r}, backends "
                         f"{result.get('backends')!r})")
    chosen, missing = {}, []
    for op in op_names:
        times = {c["backend"]: c["median_ms"] for c in result["cases"]
                 if c["name"] == op and c.get("impl") == "crossdiff_ext" and c["backend"] in GPU_BACKENDS
                 and "median_ms" in c and "shape" not in c}
        if not times:
            missing.append(op)
            continue
        chosen[op] = (min(times, key=times.get), times)
    if missing:
        raise ValueError(f"the result has no measured GPU case of {missing}; run the suite with every op")
    return chosen


def read_block(text):
    """(AUTO_GPU_TABLES, AUTO_GPU_SOURCES) of backends.py's marked block."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"backends.py must hold exactly one block between {BEGIN.strip()!r} and {END.strip()!r}")
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    values = {}
    for node in ast.parse(block).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError("the AUTO_GPU_TABLES block holds something other than the two assignments")
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values.get("AUTO_GPU_TABLES", {}), values.get("AUTO_GPU_SOURCES", {})


def render_block(tables, sources):
    out = [BEGIN]
    if tables:
        out.append("AUTO_GPU_TABLES = {\n")
        for device in sorted(tables):
            out.append(f"    {device!r}: {{\n")
            out += [f"        {op!r}: {backend!r},\n" for op, backend in tables[device].items()]
            out.append("    },\n")
        out.append("}\n")
    else:
        out.append("AUTO_GPU_TABLES = {}\n")
    if sources:
        out += ["AUTO_GPU_SOURCES = {\n"] + [f"    {d!r}: {sources[d]!r},\n" for d in sorted(sources)] + ["}\n"]
    else:
        out.append("AUTO_GPU_SOURCES = {}\n")
    out.append(END)
    return "".join(out)


def update_text(text, device, table, source):
    """backends.py's text with `device`'s table and source replaced (other devices kept)."""
    tables, sources = read_block(text)
    tables, sources = dict(tables), dict(sources)
    tables[device], sources[device] = dict(table), source
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + render_block(tables, sources) + text[stop:]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels_bench auto_table", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="suite result files (kernels_bench/results/<device>.json)")
    p.add_argument("--write", action="store_true", help=f"rewrite the table block in {BACKENDS_PY}")
    args = p.parse_args(argv)
    with open(BACKENDS_PY) as fh:
        text = fh.read()
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
        text = update_text(text, result["device"], {op: b for op, (b, _) in chosen.items()}, source)
    if args.write:
        timing.write_atomic(BACKENDS_PY, text)
        print(f"wrote {BACKENDS_PY}")
    else:
        print(text[text.index(BEGIN):text.index(END) + len(END)], end="")


if __name__ == "__main__":
    main()
