"""`python -m kernels_bench --suite paper|cpu|quick` runs the benchmark suite (kernels_bench/suite.py);
`python -m kernels_bench BENCH [options]` runs one of the single benchmarks (default: train_step_cpu)."""

import importlib
import sys

BENCHES = {
    "train_step_cpu": "kernels_bench.train_step_cpu",
    "relu_density_cpu": "kernels_bench.relu_density_cpu",
    "scaling": "kernels_bench.scaling",
    "auto_table": "kernels_bench.auto_table",
    "recovery": "kernels_bench.recovery",
    "causal_cost": "kernels_bench.causal_cost",
    "online_training": "kernels_bench.online_training",
    "collect_stream": "kernels_bench.collect_stream",
    "ledger": "kernels_bench.ledger",
    "diffing": "kernels_bench.diffing",
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--suite" or a.startswith("--suite=") for a in argv):
        importlib.import_module("kernels_bench.suite").main(argv)
        return
    name = "train_step_cpu"
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
    if name not in BENCHES:
        sys.exit(f"unknown benchmark {name!r}; choose one of {sorted(BENCHES)} or --suite paper|cpu|quick")
    importlib.import_module(BENCHES[name]).main(argv)


if __name__ == "__main__":
    main()
