"""`python -m kernels_bench [BENCH] [options]`: run a benchmark (default: train_step_cpu)."""
import sys

BENCHES = {"train_step_cpu": "kernels_bench.train_step_cpu", "relu_density_cpu": "kernels_bench.relu_density_cpu",
           "kernels_gpu": "kernels_bench.kernels_gpu"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "train_step_cpu"
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
    if name not in BENCHES:
        sys.exit(f"unknown benchmark {name!r}; choose one of {sorted(BENCHES)}")
    import importlib

    importlib.import_module(BENCHES[name]).main(argv)


if __name__ == "__main__":
    main()
