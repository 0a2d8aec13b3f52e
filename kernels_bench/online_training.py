"""Online training (data.OnlineActivations: both models harvest as training goes) against training from a store
of the same rows, in tokens per second, side by side in one run.

Per model shape (random Llama weights, as in causal_cost), the same documents of random token ids: the rows are
collected once into a tensor for the "from a store" case (what a store's batches cost to read is measured in the
suite), then each case trains a fresh BatchTopK crosscoder (F = 4 d, k = 8) for the same steps.

    python -m kernels_bench online_training           # writes results/cpu-online-training.{json,md}
    python -m kernels_bench online_training --quick   # small and short, writes nothing unless --out
"""

import argparse
import os
import sys

import torch

from . import timing
from .causal_cost import QUICK, SHAPES, IdTokenizer, random_llama

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure(shape, steps, batch_size, documents):
    import crossdiff_ext as cx
    from crossdiff_ext.data.online import OnlineActivations

    pair = ((random_llama(shape, 0), IdTokenizer(shape.vocab)), (random_llama(shape, 1), IdTokenizer(shape.vocab)))
    g = torch.Generator().manual_seed(3)
    docs = [
        " ".join(f"t{int(t)}" for t in torch.randint(0, shape.vocab, (shape.tokens,), generator=g))
        for _ in range(documents)
    ]
    buffer = 4 * batch_size

    def source():
        return OnlineActivations(*pair, shape.layer, docs, batch_size, buffer_tokens=buffer, device="cpu")

    every = OnlineActivations(*pair, shape.layer, docs, batch_size, buffer_tokens=buffer, device="cpu")
    rows = torch.cat([every.next() for _ in range(steps)])
    config = cx.TrainConfig(steps=steps, batch_size=batch_size, progress=False)

    def train(data):
        torch.manual_seed(0)
        cc = cx.CrossCoder(shape.hidden, 4 * shape.hidden, 2, k=8)
        cx.train(cc, data, config)

    samples = timing.alternate({"from a store": lambda: train(rows), "online": lambda: train(source())}, reps=3)
    median = {name: timing.summarize(s)["median_ms"] for name, s in samples.items()}
    tokens = steps * batch_size
    rate = {name: tokens / (ms / 1e3) for name, ms in median.items()}
    return dict(
        shape=shape.name,
        layer=shape.layer,
        hidden=shape.hidden,
        layers=shape.layers,
        steps=steps,
        batch_size=batch_size,
        tokens_per_s=rate,
        online_over_store=rate["online"] / rate["from a store"],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels_bench online_training", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    rows = [measure(s, 4 if args.quick else 20, 64 if args.quick else 512, 16 if args.quick else 64) for s in shapes]
    record = dict(
        machine=timing.machine_info(),
        commit=timing.git_commit(),
        command="python -m kernels_bench online_training " + " ".join(argv if argv is not None else sys.argv[1:]),
        rows=rows,
    )
    lines = [
        "# Online training against training from a store",
        "",
        f"Machine: {record['machine']['device']}, {record['machine']['torch_threads']} threads; "
        f"commit {record['commit']}. Command: `{record['command']}`. Medians of 3 alternating runs.",
        "",
        "| shape | steps x batch | from a store tok/s | online tok/s | online / store |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} (d {r['hidden']}, {r['layers']} blocks, layer {r['layer']}) | {r['steps']} x "
            f"{r['batch_size']} | {r['tokens_per_s']['from a store']:.0f} | {r['tokens_per_s']['online']:.0f} "
            f"| {r['online_over_store']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or (None if args.quick else os.path.join(RESULTS, "cpu-online-training"))
    if out:
        timing.write_json_atomic(out + ".json", record)
        timing.write_atomic(out + ".md", text)


if __name__ == "__main__":
    main()
