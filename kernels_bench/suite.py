"""`python -m kernels_bench --suite paper|cpu|quick`: every op and the whole training step, for every backend
built here, beside the dense peers and the measured ceilings, in one run on one device.

  paper  GPU, bf16: the paper's shape (B=4096, M=2, d=2304, F=73728, k=100) plus sweeps over F (16k..262k) and
         k (32..256) of the training step. Writes kernels_bench/results/<device>.{json,md,png}.
  cpu    the development machine, fp32, smaller shapes (B=2048, d=256, F=16384, k=32; F and k sweeps).
         Writes kernels_bench/results/cpu-<cpu model>.{json,md,png}.
  quick  a smoke test on whatever device is here (tiny shapes, no sweeps); writes nothing unless --out.

--lean (any suite) keeps what a short GPU loan can afford: the ceilings, every op per backend beside cuBLAS and
torch.topk, the selection's per-kernel times (one profiled batch_topk per backend), the training step per backend
beside the dense eager peer, peak memory; no sweeps, no torch.compile peer, no step profile, no Latent Scaling.

Ceilings measured in the same run: the GEMM of the encoder's exact shape (torch.mm: cuBLAS on a GPU) and the
device's copy bandwidth (bytes read + written per second of a large copy). Floors derive from them
(kernels_bench/floors.py). Peers: the dense PyTorch BatchTopK crosscoder written like the paper's code
(kernels_bench/dense_crosscoder.py), the same under torch.compile, torch.topk on the flattened scores, and
EleutherAI's sparsify (TopK SAE over the concatenated M*d input, per-row top-k) where it is installed on a GPU.
Before any timing, our training step and the dense peer's are run from the same weights and must agree (loss).
GPU timings: triton.testing.do_bench (L2 flushed between calls); CPU: wall clock over repeated calls.

sparsify on the GPU machine (no registry there): carry the wheels of eai-sparsify and the modules its sparse coder
imports (einops, natsort, simple-parsing, docstring-parser, accelerate) as the device README describes; the
trainer's own dependencies (datasets, schedulefree) are not needed.
"""

import argparse
import importlib
import importlib.util
import os
import platform
import re
import sys
import time
import types

import torch

from . import breakdown, floors, timing
from .common import adam, lr_for, recon_loss
from .dense_crosscoder import DenseBatchTopKCrossCoder

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PAPER = dict(batch=4096, n_models=2, d_model=2304, dict_size=73728, k=100)
SUITES = {
    "paper": dict(
        device="cuda",
        dtype=torch.bfloat16,
        shape=PAPER,
        f_sweep=[16384, 32768, 73728, 131072, 262144],
        k_sweep=[32, 64, 100, 128, 256],
    ),
    "cpu": dict(
        device="cpu",
        dtype=torch.float32,
        shape=dict(batch=2048, n_models=2, d_model=256, dict_size=16384, k=32),
        f_sweep=[4096, 8192, 16384, 32768],
        k_sweep=[16, 32, 64],
    ),
    "quick": dict(
        device=None,
        dtype=None,
        shape=dict(batch=256, n_models=2, d_model=64, dict_size=2048, k=16),
        f_sweep=[],
        k_sweep=[],
    ),
}
SUMMARY_KEYS = (
    "train_step_speedup_vs_dense",
    "train_step_over_floor",
    "encoder_fraction_of_cublas",
    "topk_speedup_vs_torch_topk",
    "decoder_fwd_over_byte_floor",
    "decoder_bwd_over_byte_floor",
    "peak_memory_over_floor",
)


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return timing.cpu_model()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """median / p20 / p80 ms of fn on the device."""

    def __init__(self, device, reps):
        self.device, self.reps = device, reps

    def __call__(self, fn):
        if self.device.type == "cuda":
            import triton.testing

            median, p20, p80 = triton.testing.do_bench(
                fn, warmup=50, rep=max(200, 40 * self.reps), quantiles=[0.5, 0.2, 0.8]
            )
            return dict(median_ms=median, p20_ms=p20, p80_ms=p80)
        samples = timing.alternate({"fn": fn}, self.reps, warmup=1)["fn"]
        s = timing.summarize(samples)
        return dict(median_ms=s["median_ms"], p20_ms=s["p20_ms"], p80_ms=s["p80_ms"])


def peak_memory_gb(device, fn):
    """torch.cuda.max_memory_allocated over one call (GPU); None on the CPU (no allocator statistics)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _gemm_ceiling(device, dtype, rows, width, dict_size, timer):
    """The GEMM of the encoder's shape in either weight layout; the faster one is the ceiling. The operands are
    freed on return, before the next measurement allocates."""
    x2 = torch.randn(rows, width, device=device).to(dtype)
    W2 = torch.randn(dict_size, width, device=device).to(dtype)
    W2t = W2.T.contiguous()
    return min((timer(lambda: torch.mm(x2, W2.T)), timer(lambda: torch.mm(x2, W2t))), key=lambda t: t["median_ms"])


def _copy_bytes(device):
    return (1 << 30) if device.type == "cuda" else (1 << 28)


def _copy_ceiling(device, timer):
    n_bytes = _copy_bytes(device)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def measure_ceilings(device, dtype, shape, timer):
    B, M, d, F = (shape[n] for n in ("batch", "n_models", "d_model", "dict_size"))
    gemm = _gemm_ceiling(device, dtype, B, M * d, F, timer)
    copy = _copy_ceiling(device, timer)
    n_bytes = _copy_bytes(device)
    return dict(
        matmul=dict(
            **gemm,
            tflops=2 * B * M * d * F / (gemm["median_ms"] * 1e-3) / 1e12,
            what=f"torch.mm [{B}, {M * d}] x [{M * d}, {F}] {str(dtype).replace('torch.', '')}",
        ),
        copy=dict(
            **copy,
            bytes_per_s=2 * n_bytes / (copy["median_ms"] * 1e-3),
            what=f"dst.copy_(src), {n_bytes >> 20} MiB, read + write",
        ),
    )


def build(cx, shape, device, dtype, seed=0):
    torch.manual_seed(seed)
    B, M, d, F, k = (shape[n] for n in ("batch", "n_models", "d_model", "dict_size", "k"))
    cc = cx.CrossCoder(d, F, M, k=k, dtype=dtype, device=device)
    with torch.no_grad():
        cc.b_enc.normal_(0.0, 0.01)
        cc.b_dec.normal_(0.0, 0.1)
    x = torch.randn(B, M, d, device=device).to(dtype)
    return cc, x


def ours_step(cx, cc, x, backend):
    opt = adam(cc.parameters(), lr_for(cc.dict_size))

    def step():
        with cx.backend(backend):
            opt.zero_grad(set_to_none=True)
            out = cc(x)
            loss = recon_loss(x, out.recon)
            loss.backward()
            opt.step()
        return loss

    return step


def dense_step(dense, x, compiled):
    opt = adam(dense.parameters(), lr_for(dense.dict_size))
    forward = torch.compile(dense) if compiled else dense

    def step():
        opt.zero_grad(set_to_none=True)
        loss = recon_loss(x, forward(x))
        loss.backward()
        opt.step()
        return loss

    return step


def import_sparsify():
    """sparsify's SparseCoder and its config. Its package __init__ also imports the trainer (datasets,
    schedulefree); where those are missing (the GPU machines get packages as carried wheels), the two modules
    the sparse coder needs are imported on their own."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig

        return SparseCoder, SparseCoderConfig
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            raise
        package = types.ModuleType("sparsify")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = package
        try:
            coder = importlib.import_module("sparsify.sparse_coder")
            config = importlib.import_module("sparsify.config")
        except ImportError:
            for name in [m for m in sys.modules if m == "sparsify" or m.startswith("sparsify.")]:
                del sys.modules[name]
            raise
        return coder.SparseCoder, config.SparseCoderConfig


def sparsify_step(shape, x):
    """EleutherAI sparsify's TopK SAE over the concatenated M*d input (per-row top-k): GPU only, if installed."""
    if x.device.type != "cuda":
        return None, "sparsify's fast path (Triton decoder, bf16 autocast) needs a GPU"
    try:
        SparseCoder, SparseCoderConfig = import_sparsify()
    except ImportError as err:
        return None, f"sparsify is not installed ({err})"
    B, M, d, F, k = (shape[n] for n in ("batch", "n_models", "d_model", "dict_size", "k"))
    sae = SparseCoder(M * d, SparseCoderConfig(num_latents=F, k=k), device=x.device, dtype=x.dtype)
    opt = adam(sae.parameters(), lr_for(F))
    flat = x.reshape(B, M * d)

    def step():
        opt.zero_grad(set_to_none=True)
        out = sae(flat)
        out.fvu.backward()
        opt.step()
        return out.fvu

    return step, None


def dense_peer(cc, x):
    """The dense PyTorch crosscoder with cc's weights."""
    return DenseBatchTopKCrossCoder(
        cc.d_model, cc.dict_size, cc.n_models, k=cc.k, dtype=x.dtype, device=x.device
    ).load_from_crosscoder(cc)


def check_agreement(cx, cc, x, backend):
    """Our forward loss on `backend` and the dense peer's from the same weights must agree before timing."""
    dense = dense_peer(cc, x)
    with torch.no_grad(), cx.backend(backend):
        ours = float(recon_loss(x, cc(x).recon))
    with torch.no_grad():
        theirs = float(recon_loss(x, dense(x)))
    rtol = 1e-4 if x.dtype == torch.float32 else 2e-2
    if not abs(ours - theirs) <= rtol * abs(theirs):
        raise Disagreement(f"{backend}: loss {ours:.6g} disagrees with the dense peer's {theirs:.6g}")
    return dense


class Disagreement(Exception):
    """A backend's result differs from the reference (or the dense peer's): its case is recorded, not timed."""


def error_text(err):
    """One line naming the exception: Triton's compile errors and CUDA errors alike."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"[:240]


def record_error(cases, name, impl, backend, err, **extra):
    case = dict(name=name, impl=impl, backend=backend, error=error_text(err), **extra)
    cases.append(case)
    print(f"  {name:18s} {impl:34s} {backend:9s} error: {case['error']}", flush=True)
    return case


def run_case(cases, name, impl, backend, fn, timer, device, **extra):
    """Time one case; any failure (out of memory, a CUDA error, a Triton compile error) is recorded, not fatal:
    a first run on a new GPU must keep every other number."""
    case = dict(name=name, impl=impl, backend=backend, **extra)
    try:
        fn()  # warm-up: compile, autotune, allocate
        sync(device)
        case.update(timer(fn))
        case["peak_mem_gb"] = peak_memory_gb(device, fn)
    except Exception as err:  # keep the rest of the suite
        case["error"] = error_text(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cases.append(case)
    status = f"{case['median_ms']:.3f} ms" if "median_ms" in case else f"error: {case['error']}"
    print(f"  {name:18s} {impl:34s} {backend:9s} {status}", flush=True)
    return case


def in_backend(cx, name, fn):
    """fn as a call that runs on backend `name`."""

    def call():
        with cx.backend(name):
            return fn()

    return call


def op_cases(cx, shape, device, dtype, backends, timer, cases, after_backend=lambda: None):
    from crossdiff_ext import ops

    cc, x = build(cx, shape, device, dtype)
    F, K = cc.dict_size, cc.k * x.shape[0]
    W, b = cc.W_enc.detach(), cc.b_enc.detach()
    w = cc.decoder_norm_weights()
    # The ops as the layer runs them: the encoder writes pre-activations, the selection applies the ReLU.
    pre = ops.paired_encode_reference(x, W, b, relu=False)
    f = torch.relu(pre)
    values, indices, row_ptr, _ = ops.batch_topk_reference(f, w, K)
    grad_out = torch.randn_like(x)
    theta = float(torch.quantile((f[:64].float() * w).flatten(), 1 - cc.k / F))
    run_case(
        cases,
        "batch_topk",
        "torch.topk(flattened scores)",
        "torch",
        lambda: (f.float() * w).flatten().topk(K, sorted=False),
        timer,
        device,
    )
    for name in backends:
        try:
            got = in_backend(cx, name, lambda: ops.batch_topk(pre, w, K, relu=True))()
            if not torch.equal(got[1], indices) or not torch.equal(got[2], row_ptr):
                raise Disagreement(f"{name}: batch_topk disagrees with the reference")
            selection_agrees = True
        except Exception as err:  # recorded; this backend's other ops are still timed on the reference's codes
            record_error(cases, "batch_topk", "crossdiff_ext", name, err, agreement=False)
            selection_agrees = False

        def decoder_backward():
            gv = ops.sparse_values_grad(grad_out, indices, row_ptr, W)
            return gv, ops.sparse_weight_grad(values, grad_out, *ops.latent_order(indices, row_ptr, F))

        order = ops.latent_order(indices, row_ptr, F)
        # One case per op of backends.AUTO_GPU_TABLE (kernels_bench/auto_table.py picks from them), plus the
        # decoder's whole backward (values grad + latent order + weight grad) for the summary.
        timed = {
            "paired_encode": lambda: ops.paired_encode(x, W, b, relu=False),
            "batch_topk": lambda: ops.batch_topk(pre, w, K, relu=True),
            "threshold_select": lambda: ops.threshold_select(pre, w, theta, relu=True),
            "sparse_decode": lambda: ops.sparse_decode(values, indices, row_ptr, W, None),
            "sparse_values_grad": lambda: ops.sparse_values_grad(grad_out, indices, row_ptr, W),
            "latent_order": lambda: ops.latent_order(indices, row_ptr, F),
            "sparse_weight_grad": lambda: ops.sparse_weight_grad(values, grad_out, *order),
            "decoder_backward": decoder_backward,
        }
        if not selection_agrees:
            del timed["batch_topk"]
        for op, fn in timed.items():
            run_case(cases, op, "crossdiff_ext", name, in_backend(cx, name, fn), timer, device)
        after_backend()


def latent_scaling_cases(cx, shape, device, dtype, backends, timer, cases, n_batches=2):
    """Latent Scaling (every latent, both targets, the chat probe) against the inference forward pass over the same
    n_batches * B tokens, batch by batch; the goal is at least half the forward's token throughput."""
    cc, _ = build(cx, shape, device, dtype)
    B = shape["batch"]
    tokens = torch.randn(n_batches * B, shape["n_models"], shape["d_model"], device=device).to(dtype)
    with torch.no_grad():  # an inference threshold that keeps about k latents per row, as training would set it
        f = cc.encode(tokens[:B], use_threshold=False)
        cc.threshold.fill_(float((f.values.float() * cc.decoder_norm_weights()[f.indices]).min()))
    cc.eval()

    def forward():
        with torch.inference_mode():  # as latent_scaling runs
            for start in range(0, tokens.shape[0], B):
                cc(tokens[start : start + B])

    out = {}
    for name in backends:
        fwd = run_case(
            cases,
            "inference_forward",
            "crossdiff_ext CrossCoder (eval)",
            name,
            in_backend(cx, name, forward),
            timer,
            device,
            tokens=tokens.shape[0],
        )
        ls = run_case(
            cases,
            "latent_scaling",
            "crossdiff_ext.latent_scaling",
            name,
            in_backend(cx, name, lambda: cx.latent_scaling(cc, tokens, batch_size=B)),
            timer,
            device,
            tokens=tokens.shape[0],
        )
        if "median_ms" in fwd and "median_ms" in ls:
            out[name] = fwd["median_ms"] / ls["median_ms"]
    return out


def selection_kernel_times(cx, shape, device, dtype, backends, timer, steps=3):
    """{backend: per-kernel times of one batch_topk call}: which pass of the selection costs what. Profiled apart
    from the timed cases (the profiler's overhead stays out of their medians)."""
    from crossdiff_ext import ops

    cc, x = build(cx, shape, device, dtype)
    w = cc.decoder_norm_weights()
    pre = ops.paired_encode_reference(x, cc.W_enc.detach(), cc.b_enc.detach(), relu=False)
    K = cc.k * x.shape[0]
    out = {}
    for name in backends:
        call = in_backend(cx, name, lambda: ops.batch_topk(pre, w, K, relu=True))
        try:
            call()
            sync(device)
            median = timer(call)["median_ms"]
            out[name] = breakdown.profile_step(call, device, median, steps=steps, top=8)
        except Exception as err:  # recorded; the training step is still measured
            out[name] = dict(error=error_text(err))
    return out


def step_cases(cx, shape, device, dtype, backends, timer, cases, peers=True, tag=None, breakdowns=None, lean=False):
    """The training step for every backend and the peers; with `breakdowns` (a dict), also where each backend's
    step time goes (kernels_bench/breakdown.py). `lean`: the dense eager peer only (no torch.compile, no
    sparsify)."""
    extra = dict(shape=dict(shape)) if tag else {}
    dense = None
    for name in backends:
        cc, x = build(cx, shape, device, dtype)
        try:
            dense = check_agreement(cx, cc, x, name) if peers else None
        except Exception as err:  # a disagreeing or failing backend is recorded, not timed
            record_error(cases, "train_step", "crossdiff_ext CrossCoder", name, err, **extra)
            continue
        step = ours_step(cx, cc, x, name)
        case = run_case(cases, "train_step", "crossdiff_ext CrossCoder", name, step, timer, device, **extra)
        if breakdowns is not None and "median_ms" in case:
            breakdowns[name] = breakdown.profile_step(step, device, case["median_ms"])
        del cc, step
    if not peers:
        return
    if dense is None:  # no backend agreed with it: the peer is still timed
        cc, x = build(cx, shape, device, dtype)
        dense = dense_peer(cc, x)
    for compiled in (False,) if lean else (False, True):
        impl = "dense PyTorch (paper code)" + (" + torch.compile" if compiled else "")
        run_case(cases, "train_step", impl, "torch", dense_step(dense, x, compiled), timer, device, **extra)
    if lean:
        return
    step, why = sparsify_step(shape, x)
    if step is None:
        cases.append(
            dict(name="train_step", impl="sparsify TopK SAE (M*d input)", backend="sparsify", skipped=why, **extra)
        )
        print(f"  train_step sparsify: skipped ({why})", flush=True)
    else:
        run_case(cases, "train_step", "sparsify TopK SAE (M*d input)", "sparsify", step, timer, device, **extra)


def best(cases, name, backends):
    mine = [
        c for c in cases if c["name"] == name and c["backend"] in backends and "median_ms" in c and "shape" not in c
    ]
    return min(mine, key=lambda c: c["median_ms"]) if mine else None


def summarize(result, backends):
    cases, fl = result["cases"], result["floors_ms"]
    peer = lambda name, impl: next(
        (c for c in cases if c["name"] == name and c["impl"] == impl and "median_ms" in c and "shape" not in c), None
    )
    step = best(cases, "train_step", backends)
    dense = peer("train_step", "dense PyTorch (paper code)")
    topk = peer("batch_topk", "torch.topk(flattened scores)")
    ratio = lambda a, b: (a / b) if a is not None and b else None
    get = lambda c: c["median_ms"] if c else None
    s = dict(
        train_step_speedup_vs_dense=ratio(get(dense), get(step)),
        train_step_over_floor=ratio(get(step), fl["train_step"]),
        encoder_fraction_of_cublas=ratio(
            result["ceilings"]["matmul"]["median_ms"], get(best(cases, "paired_encode", backends))
        ),
        topk_speedup_vs_torch_topk=ratio(get(topk), get(best(cases, "batch_topk", backends))),
        decoder_fwd_over_byte_floor=ratio(get(best(cases, "sparse_decode", backends)), fl["sparse_decode"]),
        decoder_bwd_over_byte_floor=ratio(get(best(cases, "decoder_backward", backends)), fl["decoder_backward"]),
        peak_memory_over_floor=ratio(step.get("peak_mem_gb") if step else None, result["memory_floor_gb"]),
    )
    assert tuple(s) == SUMMARY_KEYS
    result["summary"] = s
    result["ledger_vs_time"] = ledger_vs_time(result)
    result["summary_backend"] = {
        n: (best(cases, n, backends) or {}).get("backend")
        for n in ("train_step", "paired_encode", "batch_topk", "sparse_decode", "decoder_backward")
    }


LEDGER_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def ledger_vs_time(result):
    """Each GPU op case beside the traffic ledger's bytes for it (kernels_bench/ledger.py): the time those bytes
    take at the measured copy bandwidth, and the measured time over that. Where the ratio is far above 1 the
    kernel is bound by something the ledger does not count (latency, launches, compute) or moves more bytes than
    the ledger assumes."""
    from . import ledger

    dtype = LEDGER_DTYPES.get(result["dtype"])
    if dtype is None:
        return None
    model = ledger.ledger(result["shape"], dtype=dtype)
    bandwidth = result["ceilings"]["copy"]["bytes_per_s"]
    out = {}
    for c in result["cases"]:
        entry = model["backends"].get(c["backend"], {})
        modelled = entry.get("train_step") if c["name"] == "train_step" else entry.get("ops", {}).get(c["name"])
        if "shape" in c or "median_ms" not in c or modelled is None:
            continue
        t = modelled["totals"]
        ledger_ms = (t["read"] + t["written"]) / bandwidth * 1e3
        out.setdefault(c["backend"], {})[c["name"]] = dict(
            ledger_mb=(t["read"] + t["written"]) / 1e6,
            ledger_ms_at_copy_bw=ledger_ms,
            median_ms=c["median_ms"],
            time_over_ledger=c["median_ms"] / ledger_ms,
            launches=t["launches"],
        )
    return out


def fmt(v, spec=".3f"):
    return "" if v is None else format(v, spec)


def markdown(result):
    sh, ce = result["shape"], result["ceilings"]
    lines = [
        f"# crossdiff_ext benchmark suite `{result['suite']}` on {result['device']}",
        "",
        *([] if result.get("complete", True) else ["**Partial result: the run did not finish.**", ""]),
        f"{result['date']}; commit {result['commit']}"
        + (f" (+ uncommitted: {', '.join(result['dirty'])})" if result.get("dirty") else "")
        + f"; torch {result['torch']}; triton {result['triton']}; dtype {result['dtype']}",
        "",
        f"Shape: B={sh['batch']}, M={sh['n_models']}, d={sh['d_model']}, F={sh['dict_size']}, k={sh['k']}",
        "",
        f"Ceilings: {ce['matmul']['what']}: {ce['matmul']['median_ms']:.3f} ms = {ce['matmul']['tflops']:.2f} "
        f"TFLOP/s; {ce['copy']['what']}: {ce['copy']['bytes_per_s'] / 1e9:.1f} GB/s",
        "",
        "| case | impl | backend | median ms | p20 | p80 | floor ms | x floor | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        if "shape" in c:
            continue
        if "median_ms" not in c:
            lines.append(
                f"| {c['name']} | {c['impl']} | {c['backend']} | {c.get('error') or c.get('skipped')} | | | | | |"
            )
            continue
        floor = (
            result["floors_ms"].get(c["name"])
            if c["backend"] not in ("torch", "sparsify") or c["name"] == "train_step"
            else None
        )
        lines.append(
            f"| {c['name']} | {c['impl']} | {c['backend']} | {c['median_ms']:.3f} | {c['p20_ms']:.3f} | "
            f"{c['p80_ms']:.3f} | {fmt(floor)} | {fmt(c['median_ms'] / floor if floor else None, '.2f')} | "
            f"{fmt(c.get('peak_mem_gb'), '.2f')} |"
        )
    parts = result["floors_ms"]["train_step_parts_ms"]
    lines += [
        "",
        "Training-step floor = "
        + " + ".join(f"{k} {v:.3f}" for k, v in parts.items())
        + f" = {result['floors_ms']['train_step']:.3f} ms; memory floor {result['memory_floor_gb']:.2f} GiB "
        "(params + grads + Adam moments + one [B, F] buffer).",
        "",
        "## Summary (best backend per case)",
        "",
        "| key | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {fmt(v, '.3f')} |" for k, v in result["summary"].items()]
    ls = result.get("latent_scaling_throughput_vs_forward") or {}
    if ls:
        lines += [
            "",
            "Latent Scaling's token throughput over the inference forward's (same tokens, every latent, "
            "both targets; goal >= 0.5): " + ", ".join(f"{b} {v:.2f}" for b, v in ls.items()) + ".",
        ]
    if result.get("ledger_vs_time"):
        lines += [
            "",
            "## Measured time against the traffic ledger (`python -m kernels_bench ledger`)",
            "",
            "| backend | case | ledger MB | at copy bandwidth ms | measured ms | measured / ledger | launches |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for backend, rows in result["ledger_vs_time"].items():
            for name, r in rows.items():
                lines.append(
                    f"| {backend} | {name} | {r['ledger_mb']:.1f} | {r['ledger_ms_at_copy_bw']:.3f} | "
                    f"{r['median_ms']:.3f} | {r['time_over_ledger']:.2f} | {r['launches']} |"
                )
    for name, b in (result.get("breakdown") or {}).items():
        lines += [""] + breakdown.markdown(b, f"Where our training step's time goes ({name})")
    for name, b in (result.get("selection_kernels") or {}).items():
        title = f"Where one batch_topk call's time goes ({name})"
        lines += [""] + ([f"{title}: {b['error']}"] if "error" in b else breakdown.markdown(b, title))
    if result.get("auto_table"):
        lines += ["", "## Backend `auto` would pick (lower median per op)", "", "| op | backend | medians ms |"]
        lines += ["|---|---|---|"]
        for op, (chosen, times) in result["auto_table"].items():
            lines.append(f"| {op} | {chosen} | " + ", ".join(f"{b} {t:.3f}" for b, t in times.items()) + " |")
    sweep = [c for c in result["cases"] if "shape" in c]
    if sweep:
        lines += [
            "",
            "## Training-step sweeps",
            "",
            "| F | k | impl | backend | median ms | peak GiB |",
            "|---:|---:|---|---|---:|---:|",
        ]
        for c in sweep:
            t = fmt(c.get("median_ms")) or c.get("error") or c.get("skipped")
            lines.append(
                f"| {c['shape']['dict_size']} | {c['shape']['k']} | {c['impl']} | {c['backend']} | {t} | "
                f"{fmt(c.get('peak_mem_gb'), '.2f')} |"
            )
    if result.get("sweeps_skipped"):
        lines += [
            "",
            "Not run (time budget): "
            + "; ".join(f"F={c['dict_size']} k={c['k']}" for c in result["sweeps_skipped"])
            + ".",
        ]
    if result.get("plot"):
        lines += ["", f"![time vs F]({os.path.basename(result['plot'])})"]
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Training-step time vs F, ours vs peers (needs matplotlib; returns None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    k0 = result["shape"]["k"]
    series = {}
    for c in result["cases"]:
        if "shape" in c and c["shape"]["k"] == k0 and "median_ms" in c:
            series.setdefault(f"{c['impl']} ({c['backend']})", []).append((c["shape"]["dict_size"], c["median_ms"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dictionary size F")
    ax.set_ylabel("training step, median ms")
    ax.set_title(f"{result['device']}, B={result['shape']['batch']}, k={k0}, {result['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from crossdiff_ext import atomic

    try:
        atomic.save(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def lean_auto_table(result, device):
    """backend auto's per-op choice implied by this run's op cases (GPU, paper suite), or None."""
    if device.type != "cuda" or result["suite"] != "paper":
        return None
    from . import auto_table

    try:
        return auto_table.choose(dict(result, complete=True))
    except ValueError as err:  # an op errored (e.g. out of memory): say so instead of a partial table
        print(f"  auto table: {err}", flush=True)
        return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels_bench --suite", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--backends", nargs="*", help="backends to time (default: every kernel backend for the device)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case on the CPU (GPU: do_bench's budget)")
    p.add_argument("--no-sweeps", action="store_true")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown of the training step")
    p.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="start no further sweep shape after this many minutes (the result so far is written after "
        "the main shape and after every sweep shape, so a run cut off still leaves its numbers)",
    )
    p.add_argument(
        "--lean",
        action="store_true",
        help="what a short GPU loan affords: no sweeps, torch.compile peer, step profile or Latent Scaling; adds "
        "the selection's per-kernel times and the per-op auto table",
    )
    p.add_argument("--out", help="result stem (default: results/<device> for the paper and cpu suites)")
    args = p.parse_args(argv)
    started = time.monotonic()
    suite = SUITES[args.suite]
    device = torch.device(suite["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"suite {args.suite!r} needs a CUDA GPU; the CPU suite is --suite cpu")
    dtype = suite["dtype"] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    import crossdiff_ext as cx

    kernel_backends = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    backends = args.backends or [b for b in cx.available_backends() if b in kernel_backends]
    if not backends:
        raise SystemExit(f"no {device.type} kernel backend is available (built: {cx.available_backends()})")
    reps = args.reps or (5 if args.suite == "cpu" else 3)
    timer = Timer(device, reps)
    shape = suite["shape"]
    print(f"suite {args.suite} on {device_name(device)}: shape {shape}, {dtype}, backends {backends}", flush=True)
    ceilings = measure_ceilings(device, dtype, shape, timer)
    print(
        f"  ceilings: GEMM {ceilings['matmul']['median_ms']:.3f} ms ({ceilings['matmul']['tflops']:.2f} TFLOP/s), "
        f"copy {ceilings['copy']['bytes_per_s'] / 1e9:.1f} GB/s",
        flush=True,
    )
    elt = torch.empty((), dtype=dtype).element_size()
    import triton

    cases, breakdowns = [], {}
    result = dict(
        suite=args.suite,
        device=device_name(device),
        date=timing.machine_info()["date"],
        commit=timing.git_commit(),
        dirty=timing.git_dirty_paths(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        dtype=str(dtype).replace("torch.", ""),
        shape=shape,
        backends=backends,
        ceilings=ceilings,
        floors_ms=floors.time_floors_ms(shape, elt, ceilings["matmul"]["median_ms"], ceilings["copy"]["bytes_per_s"]),
        memory_floor_gb=floors.memory_floor_bytes(shape, elt) / 2**30,
        cases=cases,
        breakdown=breakdowns,
        complete=False,
        command="python -m kernels_bench " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    stem = args.out or (
        None
        if args.suite == "quick"
        else os.path.join(
            RESULTS_DIR, slug(device_name(device)) if device.type == "cuda" else "cpu-" + slug(device_name(device))
        )
    )

    def save(final=False):
        result["complete"] = final
        summarize(result, backends)
        if stem:
            os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
            result["plot"] = plot(result, stem + ".png") if final else None
            timing.write_json_atomic(stem + ".json", result)
            timing.write_atomic(stem + ".md", markdown(result))
            print(f"wrote {stem}.json, {stem}.md" + (f", {result['plot']}" if result["plot"] else ""), flush=True)

    if args.lean:
        result["lean"] = True
    save()  # the ceilings survive a run cut off later, and so does each backend's op cases
    op_cases(cx, shape, device, dtype, backends, timer, cases, after_backend=save)
    if args.lean:
        result["selection_kernels"] = selection_kernel_times(cx, shape, device, dtype, backends, timer)
        step_cases(cx, shape, device, dtype, backends, timer, cases, lean=True)
        result["auto_table"] = lean_auto_table(result, device)
    else:
        step_cases(cx, shape, device, dtype, backends, timer, cases, breakdowns=None if args.no_profile else breakdowns)
        result["latent_scaling_throughput_vs_forward"] = latent_scaling_cases(
            cx, shape, device, dtype, backends, timer, cases
        )
    save()
    sweeps = (
        []
        if args.no_sweeps or args.lean
        else (
            [dict(shape, dict_size=F) for F in suite["f_sweep"]]
            + [dict(shape, k=k) for k in suite["k_sweep"] if k != shape["k"]]
        )
    )
    for i, sweep_shape in enumerate(sweeps):
        if args.budget_min is not None and time.monotonic() - started > 60 * args.budget_min:
            result["sweeps_skipped"] = [dict(s) for s in sweeps[i:]]
            print(f"  budget of {args.budget_min} min spent: {len(sweeps) - i} sweep shapes not run", flush=True)
            break
        step_cases(cx, sweep_shape, device, dtype, backends, timer, cases, tag="sweep")
        save()
    save(final=True)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
