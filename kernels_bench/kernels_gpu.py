"""GPU benchmark of every crossdiff op, for each GPU backend built here, against measured ceilings.

Ceilings measured in the same run:
  matmul   cuBLAS bf16 GEMM at the encoder's exact shape: torch.mm(x [B, M*d], W_enc [F, M*d]^T)
  copy     device-to-device copy bandwidth: (bytes read + bytes written) / time of dst.copy_(src), 1 GiB
Floors derived from them:
  paired_encode      the cuBLAS GEMM above (bias + ReLU are free in an epilogue)
  batch_topk         one read of f [B, F] at copy bandwidth (the selection must see every score once)
  threshold_select   one read of f
  sparse_decode      K gathered rows of W [M*d] + the output [B, M*d] + the codes, at copy bandwidth
  decoder backward   sparse_values_grad (K gathered W rows + grad_out once + K values written)
                     + sparse_weight_grad (K gathered rows of grad_out + grad_W [F, M*d] written)
                     + latent_order (the codes read, perm and rows written)
Peers: torch.topk on the flattened fp32 scores (what the paper's code does).

Timings use triton.testing.do_bench (L2 flushed before every call; median, p20, p80 of the repetitions).

    python -m kernels_bench kernels_gpu               # paper shape, writes kernels_bench/results/<device>-kernels.*
    python -m kernels_bench kernels_gpu --quick       # B=1024, F=16384; writes nothing unless --out
"""
import argparse
import os
import re

import torch

from . import timing

PAPER = dict(batch=4096, n_models=2, d_model=2304, dict_size=73728, k=100)
QUICK = dict(batch=1024, n_models=2, d_model=2304, dict_size=16384, k=100)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def bench_ms(fn):
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80)


def copy_bandwidth():
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (t["median_ms"] * 1e-3), t


def inputs(shape, dtype=torch.bfloat16):
    B, M, d, F, k = (shape[n] for n in ("batch", "n_models", "d_model", "dict_size", "k"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, M, d, device="cuda", generator=g).to(dtype)
    W = (torch.randn(F, M, d, device="cuda", generator=g) / d**0.5).to(dtype)
    b = (torch.randn(F, device="cuda", generator=g) * 0.1).to(dtype)
    w = torch.rand(F, device="cuda", generator=g) + 0.5
    return x, W, b, w, k * B


def run(shape, backends):
    import crossdiff_ext as cx
    from crossdiff_ext import ops

    x, W, b, w, K = inputs(shape)
    B, M, d = x.shape
    F, D, elt = W.shape[0], M * d, x.element_size()
    bandwidth, copy_t = copy_bandwidth()
    x2, W2 = x.reshape(B, D), W.reshape(F, D)
    gemm = bench_ms(lambda: torch.mm(x2, W2.T))
    flops = 2 * B * D * F
    ceilings = dict(copy_bytes_per_s=bandwidth, copy=copy_t, matmul=gemm,
                    matmul_tflops=flops / (gemm["median_ms"] * 1e-3) / 1e12)

    f = ops.paired_encode_reference(x, W, b)
    values, indices, row_ptr, _ = ops.batch_topk_reference(f, w, K)
    grad_out = torch.randn_like(x)
    theta = float(torch.quantile((f[:64].float() * w).flatten(), 1 - shape["k"] / F))
    code_bytes = K * (elt + indices.element_size()) + (B + 1) * 8
    floors_ms = {
        "paired_encode": gemm["median_ms"],
        "batch_topk": B * F * elt / bandwidth * 1e3,
        "threshold_select": B * F * elt / bandwidth * 1e3,
        "sparse_decode": (K * D * elt + B * D * elt + code_bytes) / bandwidth * 1e3,
        "decoder_backward": (2 * K * D * elt + B * D * elt + F * D * elt + 2 * code_bytes + 2 * K * 8)
        / bandwidth * 1e3,
    }
    cases = [dict(name="batch_topk", impl="torch.topk(flattened fp32 scores)", backend="torch",
                  **bench_ms(lambda: (f.float() * w).flatten().topk(K)))]
    for name in backends:
        with cx.backend(name):
            def decoder_backward():
                gv = ops.sparse_values_grad(grad_out, indices, row_ptr, W)
                order = ops.latent_order(indices, row_ptr, F)
                return gv, ops.sparse_weight_grad(values, grad_out, *order)

            timed = {
                "paired_encode": lambda: ops.paired_encode(x, W, b),
                "batch_topk": lambda: ops.batch_topk(f, w, K),
                "threshold_select": lambda: ops.threshold_select(f, w, theta),
                "sparse_decode": lambda: ops.sparse_decode(values, indices, row_ptr, W, None),
                "decoder_backward": decoder_backward,
                "latent_order": lambda: ops.latent_order(indices, row_ptr, F),
            }
            got = ops.batch_topk(f, w, K)  # a sanity check before timing (the tests check thoroughly)
            if not torch.equal(got[1], indices):
                raise RuntimeError(f"{name} batch_topk disagrees with the reference at this shape")
            for op, fn in timed.items():
                torch.cuda.reset_peak_memory_stats()
                t = bench_ms(fn)
                case = dict(name=op, impl="crossdiff_ext", backend=name, **t,
                            peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)
                if op in floors_ms:
                    case["floor_ms"] = floors_ms[op]
                    case["over_floor"] = t["median_ms"] / floors_ms[op]
                cases.append(case)
    return ceilings, floors_ms, cases


def summary(cases):
    topk_peer = next(c for c in cases if c["backend"] == "torch")["median_ms"]
    best = {}
    for c in cases:
        if c["backend"] != "torch" and (c["name"] not in best or c["median_ms"] < best[c["name"]]["median_ms"]):
            best[c["name"]] = c
    return dict(
        encoder_fraction_of_cublas=best["paired_encode"]["floor_ms"] / best["paired_encode"]["median_ms"],
        topk_speedup_vs_torch_topk=topk_peer / best["batch_topk"]["median_ms"],
        decoder_fwd_over_byte_floor=best["sparse_decode"]["over_floor"],
        decoder_bwd_over_byte_floor=best["decoder_backward"]["over_floor"],
        best_backend={name: c["backend"] for name, c in best.items()},
    )


def markdown(result):
    lines = [f"# crossdiff ops on {result['device']}", "",
             f"{result['date']}, commit {result['commit']}, torch {result['torch']}, triton {result['triton']}", "",
             f"Shape: {result['shape']}", "",
             f"Ceilings: cuBLAS bf16 GEMM {result['ceilings']['matmul']['median_ms']:.3f} ms "
             f"({result['ceilings']['matmul_tflops']:.0f} TFLOP/s); copy "
             f"{result['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)", "",
             "| op | impl | backend | median ms | p20 | p80 | floor ms | over floor | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        floor = f"{c['floor_ms']:.3f}" if "floor_ms" in c else ""
        over = f"{c['over_floor']:.2f}x" if "over_floor" in c else ""
        peak = f"{c['peak_mem_gb']:.2f}" if "peak_mem_gb" in c else ""
        lines.append(f"| {c['name']} | {c['impl']} | {c['backend']} | {c['median_ms']:.3f} | {c['p20_ms']:.3f} | "
                     f"{c['p80_ms']:.3f} | {floor} | {over} | {peak} |")
    lines += ["", "Summary (best backend per op): " + ", ".join(
        f"{k} = {v:.2f}" for k, v in result["summary"].items() if isinstance(v, float)), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=1024, F=16384; writes nothing unless --out")
    parser.add_argument("--out", help="result stem (default results/<device>-kernels for the paper shape)")
    parser.add_argument("--backends", nargs="*", help="GPU backends to time (default: every one built here)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu needs a CUDA GPU (the CPU benchmarks are train_step_cpu, relu_density_cpu)")
    import triton

    import crossdiff_ext as cx

    backends = args.backends or [n for n in cx.available_backends() if n in ("triton", "cuda")]
    if not backends:
        raise SystemExit("no GPU backend is available in this build")
    shape = QUICK if args.quick else PAPER
    ceilings, floors, cases = run(shape, backends)
    name = torch.cuda.get_device_name()
    result = dict(device=name, date=timing.machine_info()["date"], commit=timing.git_commit(),
                  dirty=timing.git_dirty_paths(), torch=torch.__version__, triton=triton.__version__, shape=shape,
                  ceilings=ceilings, floors_ms=floors, cases=cases, summary=summary(cases))
    text = markdown(result)
    print(text)
    stem = args.out or (None if args.quick else os.path.join(RESULTS_DIR, f"{device_slug(name)}-kernels"))
    if stem:
        timing.write_json_atomic(stem + ".json", result)
        timing.write_atomic(stem + ".md", text)
        print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
