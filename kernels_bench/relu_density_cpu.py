"""Where the L1 (ReLU) crosscoder should switch from sparse to dense kernels on the CPU.

Times one training step (forward, reconstruction + L1 loss, backward) of crossdiff_ext.CrossCoder(activation="relu")
forced into each regime (dense_code_density 0 = dense, 1 = sparse) at a range of code densities, alternating the
two in one run. The density is set by shifting b_enc so that the wanted fraction of pre-activations is positive.
The crossover sets crossdiff_ext.crosscoder.DENSE_CODE_DENSITY.

    python -m kernels_bench.relu_density_cpu            # writes kernels_bench/results/cpu-relu-density.{json,md}
"""

import argparse
import os

import torch

from . import timing

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEM = "cpu-relu-density"
DENSITIES = (0.01, 0.03, 0.06, 0.125, 0.25, 0.5)


def make_model(cx, shape, density, x):
    cc = cx.CrossCoder(shape["d_model"], shape["dict_size"], shape["n_models"], activation="relu")
    with torch.no_grad():
        pre = cx.ops.paired_encode_reference(x[:256], cc.W_enc, torch.zeros_like(cc.b_enc)).float()
        cc.b_enc.fill_(-float(torch.quantile(pre.flatten()[: 1 << 24], 1.0 - density)))
    return cc


def train_step(cc, x, dense_code_density):
    cc.dense_code_density = dense_code_density
    cc.zero_grad(set_to_none=True)
    out = cc(x)
    w = torch.linalg.vector_norm(cc.W_dec, dim=2).sum(1)
    l1 = (out.codes.values * w[out.codes.indices.long()]).sum() / x.shape[0]
    loss = torch.linalg.vector_norm(x - out.recon, dim=-1).mean() + 0.04 * l1
    loss.backward()
    return out.codes.nnz


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import crossdiff_ext as cx

    shape = dict(batch=args.batch, n_models=2, d_model=args.d_model, dict_size=args.dict_size)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 2, args.d_model)
    rows = []
    for density in DENSITIES:
        cc = make_model(cx, shape, density, x)
        measured = train_step(cc, x, 1.0) / (args.batch * args.dict_size)
        samples = timing.alternate(
            {"dense": lambda: train_step(cc, x, 0.0), "sparse": lambda: train_step(cc, x, 1.0)},
            reps=args.reps,
            warmup=1,
        )
        row = dict(
            target_density=density,
            measured_density=measured,
            dense=timing.summarize(samples["dense"]),
            sparse=timing.summarize(samples["sparse"]),
        )
        rows.append(row)
        print(
            f"density {measured:.3f}: dense {row['dense']['median_ms']:.0f} ms, "
            f"sparse {row['sparse']['median_ms']:.0f} ms",
            flush=True,
        )
    crossover = next((r["measured_density"] for r in rows if r["sparse"]["median_ms"] > r["dense"]["median_ms"]), None)
    result = dict(
        machine=dict(timing.machine_info(), commit=timing.git_commit()),
        shape=shape,
        rows=rows,
        first_density_where_dense_wins=crossover,
        command="python -m kernels_bench.relu_density_cpu",
    )
    lines = [
        "# L1 crosscoder step on the CPU: sparse vs dense regime by code density",
        "",
        f"- device: {result['machine']['device']}; torch {result['machine']['torch']}, "
        f"{result['machine']['torch_threads']} threads; "
        f"date {result['machine']['date']}; commit {result['machine']['commit']}",
        f"- shape: {shape}, fp32; step = forward + recon + L1 loss + backward",
        f"- command: `{result['command']}`",
        "",
        "| density | dense median ms | sparse median ms | sparse / dense |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, s = r["dense"]["median_ms"], r["sparse"]["median_ms"]
        lines.append(f"| {r['measured_density']:.3f} | {d:.0f} | {s:.0f} | {s / d:.2f} |")
    lines += ["", f"First measured density where dense wins: {crossover}"]
    print("\n".join(lines))
    if not args.no_write:
        timing.write_json_atomic(os.path.join(RESULTS_DIR, STEM + ".json"), result)
        timing.write_atomic(os.path.join(RESULTS_DIR, STEM + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
