"""`python -m kernels_bench ledger --shape paper`: the traffic ledger, the evidence a machine without a GPU can give.

For every kernel launch of each op and of one BatchTopK training step, on the CUDA and the Triton backend: the
bytes it moves through DRAM (reads, writes), the bytes it re-reads from L2, and how many times it reads f [B, F],
computed from the launch parameters the launchers use (their tiling functions and constants), beside the op's byte
floor (kernels_bench/floors.py: what any implementation must move). Beside the traffic, the resources of the
compiled kernels for sm_90a (registers, stack/spills, shared memory), read with cuobjdump from the CUDA build and
from Triton's cubins, so that a regression in either shows without a GPU.

The byte counts are a model, not a measurement: every launch lists what it must read and write once (a gathered
row of W counts once per gather: rows are hit ~k*B/F times, mostly from DRAM at the paper shape, as the floors
assume), and L2 re-reads are listed apart. Timing them is the GPU benchmark's job (kernels_bench/suite.py); where
the two disagree the ledger's assumptions are what to question.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from . import floors

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = {
    "paper": dict(batch=4096, n_models=2, d_model=2304, dict_size=73728, k=100),
    "small": dict(batch=64, n_models=2, d_model=32, dict_size=1000, k=8),
}
INDEX = 4  # int32 latent ids (F < 2^31)
I64 = 8
H100_SMS = 132  # the launch geometry of the target GPU (H100/H200 SXM: 132 SMs)


@dataclasses.dataclass
class Launch:
    """One kernel launch (or one torch op) and the bytes it moves."""

    op: str
    kernel: str
    grid: str
    read: int  # bytes from DRAM
    written: int
    l2_reread: int = 0  # bytes read again from L2 (e.g. w per tile)
    f_passes: float = 0.0  # reads of f [B, F]
    note: str = ""


def _n(shape, elt):
    n = floors.shape_numbers(shape, elt, INDEX)
    n["N"] = n["B"] * n["F"]
    n["codes"] = n["codes_bytes"]
    return n


def _cdiv(a, b):
    return -(-a // b)


# --- CUDA (csrc/cuda) --------------------------------------------------------------------------------------------


def cuda_batch_topk(n):
    """csrc/cuda/select.cu in the usual case: level 0 over f on a slab grid, the stage pass, then the levels,
    counts, scans and ordered write over the staged entries only (the launch geometry of csrc/select_phases.h)."""
    B, F, N, K, e = n["B"], n["F"], n["N"], n["K"], n["elt"]
    slab = 256 * (16 // e)
    S = _cdiv(F, slab)
    T = B * S
    rows_per_block = min(_cdiv(B, max(1, (4 * H100_SMS) // S)), 1 << 20)
    R = _cdiv(B, rows_per_block)
    staged = min(2 * K, N)  # estimate: the entries at or above the boundary bin (at most the capacity)
    w_reads = R * F * 4
    grid = f"{S}x{R}x256"
    tiles = f"{_cdiv(T, 8)}x256"
    out = [
        Launch("batch_topk", "init_state_kernel", "1x1", 0, 64),
        Launch("batch_topk", "zeros(histograms) (ATen)", "-", 0, 5 * 2048 * I64),
        Launch(
            "batch_topk",
            "histogram_kernel[level 0]",
            grid,
            N * e + w_reads,
            S * R * 2048 * I64,
            f_passes=1,
            note="w[slab] read once per block; written: at most one atomic per non-empty bin per block",
        ),
        Launch("batch_topk", "resolve_kernel[level 0]", "1x1024", 2048 * I64, 64),
    ]
    for level in (1, 2):
        out.append(Launch("batch_topk", f"histogram_kernel[level {level}] (returns)", grid, 0, 0))
        out.append(Launch("batch_topk", f"resolve_kernel[level {level}] (returns)", "1x1024", 0, 0))
    out.append(
        Launch(
            "batch_topk",
            "stage_kernel",
            grid,
            N * e + w_reads,
            staged * (6 + e) + T * 16 + T * I64,
            f_passes=1,
            note="staged: key, column and f of the entries at or above the boundary bin (estimate 2K); tile table",
        )
    )
    for level in (1, 2):
        out.append(Launch("batch_topk", f"staged_histogram_kernel[level {level}]", "-", staged * 4, 2048 * I64))
        out.append(Launch("batch_topk", f"resolve_kernel[staged level {level}]", "1x1024", 2048 * I64, 64))
    out += [
        Launch("batch_topk", "tile_count_kernel", tiles, T * 16 + staged * 4, T * 16),
        Launch("batch_topk", "cumsum + sub over the tiles (ATen)", "-", 2 * T * 16, 2 * T * 16),
        Launch("batch_topk", "zeros(row counts) (ATen)", "-", 0, (B + 1) * I64),
        Launch(
            "batch_topk",
            "staged_write_kernel",
            tiles,
            2 * T * 16 + staged * (6 + e),
            K * (e + INDEX) + T * I64,
        ),
        Launch("batch_topk", "count_kernel + cumsum + write_kernel (ties path: return)", "-", 0, 0),
    ]
    out += _min_score(n, "batch_topk")
    out.append(Launch("batch_topk", "row_counts.cumsum (ATen)", "-", (B + 1) * I64, (B + 1) * I64))
    return out


def _min_score(n, op):
    K = n["K"]
    return [
        Launch(op, "min_score (ATen: gather w, mul, where, min)", "-", K * (n["elt"] + INDEX) + K * 4 * 3, K * 4 * 3)
    ]


def _cuda_row_grid(D, e):
    """csrc/cuda/sparse.cu's launch over rows of D elements read 16 bytes at a time: (column spans, threads)."""
    packs = _cdiv(D, 16 // e)
    threads = min(1024, max(32, _cdiv(packs, 32) * 32))
    return _cdiv(packs, threads), threads


def cuda_sparse_decode(n):
    B, D, K, e = n["B"], n["D"], n["K"], n["elt"]
    spans, threads = _cuda_row_grid(D, e)
    return [
        Launch(
            "sparse_decode",
            "decode_kernel",
            f"{B}x{spans}x{threads}",
            K * D * e + n["codes"] + D * e,
            B * D * e,
        )
    ]


def cuda_values_grad(n):
    B, D, K = n["B"], n["D"], n["K"]
    return [
        Launch(
            "sparse_values_grad",
            "values_grad_kernel",
            f"{_cdiv(K, 8)}x256",
            K * D * n["elt"] + B * D * n["elt"] + K * INDEX + (B + 1) * I64,
            K * n["elt"],
            note="grad_out[row] gathered once per entry of the row (DRAM once, L2 after)",
        )
    ]


def latent_order_launches(n, backend):
    """Both GPU backends: ops/sparse.latent_order_by_sort, a library radix sort of the K latent ids."""
    B, F, K = n["B"], n["F"], n["K"]
    pairs = K * (INDEX + I64)  # int32 ids with their int64 positions
    return [
        Launch(
            "latent_order",
            "sort (torch: radix sort of id/position pairs)",
            "-",
            K * INDEX + 4 * pairs,
            K * I64 + 4 * pairs,
            note="estimate: 4 digit passes, each reading and writing the pairs",
        ),
        Launch("latent_order", "rows_of (torch: repeat_interleave)", "-", 2 * (B + 1) * I64, K * I64),
        Launch("latent_order", "rows[perm] (torch)", "-", 2 * K * I64, K * I64),
        Launch(
            "latent_order",
            "searchsorted + cat (torch)",
            "-",
            F * INDEX,
            F * INDEX + 2 * (F + 1) * I64,
            F * max(1, K.bit_length()) * INDEX,
            note="a binary search per latent",
        ),
    ]


def weight_grad_launches(n, backend):
    """grad_W[j] = sum over the latent's entries of value * dense[row]: gathers K rows of dense [B, D].

    CUDA: one block per latent over the whole row width. Triton: one program per LATENTS consecutive latents,
    each over the whole row width, the next latent's index chain (col_ptr -> perm, rows -> values) loaded while
    the current one gathers."""
    F, D, K, e = n["F"], n["D"], n["K"], n["elt"]
    if backend == "cuda":
        spans, threads = _cuda_row_grid(D, e)
        kernel, grid = "weight_grad_kernel", f"{F}x{spans}x{threads}"
    else:
        from crossdiff_ext.triton import _launch

        kernel, grid = "_weight_grad_kernel", str(_cdiv(F, _launch.GRAD_LATENTS))
    return [
        Launch(
            "sparse_weight_grad",
            kernel,
            grid,
            K * D * e + K * (2 * I64 + e) + (F + 1) * I64,
            F * D * e + F * 4,
            note=f"K rows gathered from a [B, D] tensor of {n['B'] * D * e / 1e6:.0f} MB: L2 may serve many (the "
            "floor assumes DRAM)",
        )
    ]


def cuda_encode(n):
    """The crosscoder's encoder on CUDA: the pre-activations (paired_encode with relu=False); the selection applies
    the ReLU as it reads them, so f is written once and no ReLU pass reads it again."""
    B, D, F, N = n["B"], n["D"], n["F"], n["N"]
    return [
        Launch(
            "paired_encode",
            "addmm (cuBLAS, bias epilogue; ReLU in the selection)",
            "-",
            B * D * n["elt"] + F * D * n["elt"] + F * n["elt"],
            N * n["elt"],
        )
    ]


# --- Triton (crossdiff_ext/triton) ----------------------------------------------------------------------------------


def triton_batch_topk(n):
    """crossdiff_ext/triton/select.py, in the usual case (mode STAGED after level 0): its own topk_plan, from the
    launcher's geometry functions."""
    from crossdiff_ext.triton import select

    plan = select.topk_plan(n["B"], n["F"], n["K"], n["elt"], 8 * H100_SMS)
    return [
        Launch(
            "batch_topk",
            p["name"],
            "-" if p["grid"] is None else "x".join(map(str, p["grid"])),
            p["bytes_read"],
            p["bytes_written"],
            f_passes=p["passes_over_f"],
        )
        for p in plan
    ]


def triton_sparse_decode(n):
    from crossdiff_ext.triton import _launch

    B, D, K = n["B"], n["D"], n["K"]
    block_d = _launch.row_block(D)
    blocks = _cdiv(D, block_d)
    return [
        Launch(
            "sparse_decode",
            "_decode_kernel",
            f"{B}x{blocks}",
            K * D * n["elt"] + n["codes"] + D * n["elt"],
            B * D * n["elt"],
            n["codes"] * (blocks - 1),
            note="every column block of a row reads the row's codes",
        )
    ]


def triton_values_grad(n):
    B, D, K = n["B"], n["D"], n["K"]
    return [
        Launch("sparse_values_grad", "rows_of (torch)", "-", (B + 1) * I64, K * I64),
        Launch(
            "sparse_values_grad",
            "_values_grad_kernel",
            str(_cdiv(K, 16)),
            K * D * n["elt"] + B * D * n["elt"] + K * (INDEX + I64),
            K * n["elt"],
            note="grad_out[row] gathered once per entry of the row (DRAM once, L2 after)",
        ),
    ]


def triton_encode(n):
    B, D, F, N = n["B"], n["D"], n["F"], n["N"]
    return [
        Launch(
            "paired_encode",
            "_encode_kernel (bias epilogue; ReLU in the selection)",
            f"{_cdiv(B, 128) * _cdiv(F, 256)}",
            B * D * n["elt"] + F * D * n["elt"] + F * n["elt"],
            N * n["elt"],
        )
    ]


MODELS = {
    "cuda": dict(
        paired_encode=cuda_encode,
        batch_topk=cuda_batch_topk,
        sparse_decode=cuda_sparse_decode,
        sparse_values_grad=cuda_values_grad,
    ),
    "triton": dict(
        paired_encode=triton_encode,
        batch_topk=triton_batch_topk,
        sparse_decode=triton_sparse_decode,
        sparse_values_grad=triton_values_grad,
    ),
}


def op_launches(n, backend):
    """{op: [Launch]} for the ops of the paper suite on one backend."""
    m = MODELS[backend]
    return {
        "paired_encode": m["paired_encode"](n),
        "batch_topk": m["batch_topk"](n),
        "sparse_decode": m["sparse_decode"](n),
        "sparse_values_grad": m["sparse_values_grad"](n),
        "latent_order": latent_order_launches(n, backend),
        "sparse_weight_grad": weight_grad_launches(n, backend),
    }


def train_step_launches(n, backend, order_per_step):
    """One BatchTopK training step (forward, backward, Adam) as the layer runs it (ops/autograd.py): the encoder,
    the selection, the decoder, the decoder's backward (value and weight gradients), the encoder's weight
    gradient (x needs no gradient), and the torch ops around them."""
    B, F, D, K = n["B"], n["F"], n["D"], n["K"]
    ops = op_launches(n, backend)
    dec = F * D * n["elt"]
    steps = [Launch("step", "decoder norms w (torch)", "-", dec, F * 4)]
    steps += ops["paired_encode"] + ops["batch_topk"] + ops["sparse_decode"]
    steps.append(Launch("step", "loss forward + backward (torch)", "-", 4 * B * D * n["elt"], 2 * B * D * n["elt"]))
    steps += ops["sparse_values_grad"]
    for _ in range(order_per_step):
        steps += ops["latent_order"]
    steps += weight_grad_launches(n, backend)  # W_dec: dense = grad_out
    steps.append(Launch("step", "values != 0 where (torch)", "-", K * 2 * n["elt"], K * n["elt"]))
    steps += weight_grad_launches(n, backend)  # W_enc: dense = x
    steps.append(Launch("step", "bias grads (torch)", "-", B * D * n["elt"], D * n["elt"]))
    params = n["n_params"]
    steps.append(Launch("step", "fused Adam (torch)", "-", 4 * params * n["elt"], 3 * params * n["elt"]))
    return steps


def _totals(launches):
    return dict(
        read=sum(x.read for x in launches),
        written=sum(x.written for x in launches),
        l2_reread=sum(x.l2_reread for x in launches),
        f_passes=sum(x.f_passes for x in launches),
        launches=len(launches),
    )


def op_floors(shape, elt):
    """Byte floors of the ops (floors.byte_counts), keyed like the ledger's ops."""
    b = floors.byte_counts(shape, elt, INDEX)
    n = _n(shape, elt)
    order = n["codes"] + 2 * n["K"] * I64 + (n["F"] + 1) * I64
    return {
        "paired_encode": n["B"] * n["D"] * n["elt"] + n["F"] * n["D"] * n["elt"] + n["N"] * n["elt"],
        "batch_topk": b["batch_topk"],
        "sparse_decode": b["sparse_decode"],
        "sparse_values_grad": n["K"] * n["D"] * n["elt"] + n["B"] * n["D"] * n["elt"] + n["K"] * n["elt"],
        "latent_order": order,
        "sparse_weight_grad": b["encoder_weight_grad"] - order,
    }


def step_floor(shape, elt):
    b = floors.byte_counts(shape, elt, INDEX)
    f = op_floors(shape, elt)
    return (
        f["paired_encode"]
        + b["batch_topk"]
        + b["sparse_decode"]
        + b["decoder_backward"]
        + b["encoder_weight_grad"]
        + b["adam"]
    )


# --- compiled resources -------------------------------------------------------------------------------------------


def _tool(name):
    """A CUDA binary tool: on the PATH, else the copy Triton bundles."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.exists(path) else None
    except ImportError:
        return None


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text, demangle=lambda names: names):
    """cuobjdump --dump-resource-usage output -> [{arch, kernel, registers, stack, shared, local}]."""
    rows, arch, pending = [], None, []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and i + 1 < len(lines):
            m = _RESOURCE.search(lines[i + 1])
            if m:
                pending.append((arch, line[len("Function ") :].rstrip(":"), *map(int, m.groups())))
    names = demangle([p[1] for p in pending])
    for (arch, _, reg, stack, shared, local), name in zip(pending, names):
        rows.append(dict(arch=arch, kernel=name, registers=reg, stack=stack, shared=shared, local=local))
    return rows


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return [_short_name(x) for x in out.splitlines()]


def _short_name(demangled):
    """'void crossdiff::cuda::(anonymous namespace)::write_kernel<c10::BFloat16, int, 8, true>(...)' ->
    'write_kernel<c10::BFloat16, int, 8, true>'."""
    head = demangled.split("(", 1)[0] if "(anonymous" not in demangled else demangled
    head = head.replace("(anonymous namespace)::", "")
    head = re.sub(r"^void ", "", head)
    head = head.split("(", 1)[0]
    return head.replace("crossdiff::cuda::", "")


def cuda_resources(so_path, arch="sm_90a"):
    """Registers, stack and shared memory of the CUDA kernels in a built extension, for one arch."""
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither on the PATH nor bundled with triton)")
    text = subprocess.run([tool, "--dump-resource-usage", so_path], capture_output=True, text=True, check=True).stdout
    return [r for r in parse_resource_usage(text, _demangle) if r["arch"] == arch and _paper_variant(r["kernel"])]


def _paper_variant(kernel):
    """The instantiations the paper shape runs: bf16, int32 latent ids (or no such template argument)."""
    args = kernel.partition("<")[2]
    return not any(t in args for t in ("c10::Half", "float", "long"))


def triton_resources(variants):
    """Compile Triton kernel variants (kernels_bench/triton_variants.py) for sm_90a, no GPU needed, and read their
    cubins' resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = _tool("cuobjdump")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            sig = dict(v.signature, **{k: "constexpr" for k in v.constexprs})
            kernel = triton.compile(
                ASTSource(fn=v.fn, signature=sig, constexprs=v.constexprs, attrs=_launch_specialization(v.fn, sig)),
                target=GPUTarget("cuda", 90, 64),
                options=dict(num_warps=v.num_warps, num_stages=v.num_stages),
            )
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as fh:
                fh.write(kernel.asm["cubin"])
            text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
            for r in parse_resource_usage(text):
                # Triton's shared memory is dynamic (the pipeline's buffers): cuobjdump shows only the static part
                shared = max(r["shared"], kernel.metadata.shared)
                rows.append(dict(r, kernel=v.label, arch="sm_90a", num_warps=v.num_warps, shared=shared))
    return rows


# Integer arguments that are multiples of 16 at the paper shape (B=4096, F=73728, M*d=4608, d=2304).
PAPER_MULTIPLES_OF_16 = frozenset({"B", "F", "K", "D", "d", "stride_xb", "stride_xm"})


def _launch_specialization(fn, signature):
    """What a launch at the paper shape tells the compiler (Triton specialises each launch): every pointer is
    16-byte aligned, and the dimensions that are multiples of 16 say so (tt.divisibility). Without it a kernel
    compiles for unaligned arguments and its register count is not the one that runs."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        kind = signature.get(name, "")
        if kind.startswith("*") or (name in PAPER_MULTIPLES_OF_16 and kind.startswith("i")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def triton_paper_variants():
    """The Triton kernels the paper shape launches: bf16, int32 latent ids, slab 2048, batch top-k's paths, the
    decoder with a bias, the encoder's first Hopper config with descriptors and no K mask."""
    from crossdiff_ext.triton import encode

    from . import triton_variants as variants

    first = str(encode.HALF_CONFIGS[0].kwargs)

    def launched(label):
        choices = label.partition("[")[2]
        if "fp16" in choices or "fp32" in choices or "i64" in choices or "slab 16" in choices:
            return False
        if "block 16" in choices or "topk=False" in choices or "first=False" in choices or "bias=False" in choices:
            return False
        if label.startswith("encode."):
            return "flat=True, even_k=True, desc=True, relu=False" in choices and first in choices
        return True

    return [v for v in variants.every_variant(90) if launched(v.label)]


# --- the ledger ---------------------------------------------------------------------------------------------------


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def ledger(shape, order_per_step=None, dtype="bf16"):
    """The ledger of one shape: a name of SHAPES or a dict (batch, n_models, d_model, dict_size, k)."""
    name, dims = (shape, SHAPES[shape]) if isinstance(shape, str) else ("custom", dict(shape))
    order_per_step = ORDER_PER_STEP if order_per_step is None else order_per_step
    elt = DTYPE_BYTES[dtype]
    n = _n(dims, elt)
    result = dict(shape=name, dims=dims, dtype=dtype, index_dtype="int32", sms=H100_SMS, backends={})
    floors_ = op_floors(dims, elt)
    for backend in MODELS:
        entry = dict(ops={}, train_step={})
        for op, launches in op_launches(n, backend).items():
            entry["ops"][op] = _entry(launches, floors_[op])
        entry["train_step"] = _entry(train_step_launches(n, backend, order_per_step), step_floor(dims, elt))
        result["backends"][backend] = entry
    return result


def _entry(launches, floor_bytes):
    t = _totals(launches)
    return dict(
        launches=[dataclasses.asdict(x) for x in launches],
        totals=t,
        floor_bytes=floor_bytes,
        over_floor=(t["read"] + t["written"]) / floor_bytes,
    )


def _mb(x):
    return f"{x / 1e6:,.1f}"


def render(result, resources):
    lines = [
        f"# Traffic ledger: {result['shape']} shape ({', '.join(f'{k}={v}' for k, v in result['dims'].items())}), "
        f"{result['dtype']}",
        "",
        "Bytes each kernel launch moves through DRAM, modelled from its launch parameters "
        "(`python -m kernels_bench ledger`), against the op's byte floor. MB = 10^6 bytes. Not timed: see the GPU "
        "benchmark for times. The sparse kernels gather rows of W or of a dense [B, M*d] once per entry, which is "
        "what their floors assume, so their byte ratio is 1 by construction: what separates them from their floor "
        "on a GPU is how many loads each thread keeps in flight, which only timing shows.",
        "",
        "## Ops",
        "",
        "| backend | op | launches | passes over f | read MB | written MB | L2 re-read MB | floor MB | x floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, entry in result["backends"].items():
        for op, o in entry["ops"].items():
            t = o["totals"]
            lines.append(
                f"| {backend} | {op} | {t['launches']} | {t['f_passes']:g} | {_mb(t['read'])} | {_mb(t['written'])} "
                f"| {_mb(t['l2_reread'])} | {_mb(o['floor_bytes'])} | {o['over_floor']:.2f} |"
            )
    lines += ["", "## Training step", ""]
    lines += [
        "| backend | launches | passes over f | read MB | written MB | floor MB | x floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, entry in result["backends"].items():
        s = entry["train_step"]
        t = s["totals"]
        lines.append(
            f"| {backend} | {t['launches']} | {t['f_passes']:g} | {_mb(t['read'])} | {_mb(t['written'])} | "
            f"{_mb(s['floor_bytes'])} | {s['over_floor']:.2f} |"
        )
    for backend, entry in result["backends"].items():
        lines += ["", f"### {backend}: every launch of one training step", ""]
        lines += [
            "| op | kernel | grid | read MB | written MB | L2 re-read MB | f passes | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in entry["train_step"]["launches"]:
            lines.append(
                f"| {x['op']} | {x['kernel']} | {x['grid']} | {_mb(x['read'])} | {_mb(x['written'])} | "
                f"{_mb(x['l2_reread'])} | {x['f_passes']:g} | {x['note']} |"
            )
    for backend, rows in resources.items():
        lines += ["", f"## Compiled resources: {backend}, sm_90a", ""]
        if isinstance(rows, str):
            lines.append(rows)
            continue
        lines += ["| kernel | registers | stack B | shared B | local B |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| `{r['kernel']}` | {r['registers']} | {r['stack']} | {r['shared']} | {r['local']} |")
    return "\n".join(lines) + "\n"


def current_build(candidates, csrc_dir):
    """(the first existing build among `candidates` compiled from the sources in `csrc_dir` now, or None; the
    existing ones skipped as stale). A build embeds its source hash (crossdiff_ext/_build_hash.py): a stale
    .gpu_build left from another commit would report another commit's registers."""
    from crossdiff_ext._build_hash import source_hash

    wanted = source_hash(csrc_dir).encode()
    skipped = []
    for path in candidates:
        if not os.path.exists(path):
            continue
        with open(path, "rb") as fh:
            if wanted in fh.read():
                return path, skipped
        skipped.append(path)
    return None, skipped


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels_bench ledger", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="paper", choices=sorted(SHAPES))
    p.add_argument("--so", help="the CUDA build to read resources from (default: .gpu_build's, else the in-tree _C)")
    p.add_argument("--no-resources", action="store_true", help="skip the compiled resources (no compiles)")
    p.add_argument("--out", help="result stem (default: kernels_bench/results/ledger-<shape>)")
    args = p.parse_args(argv)
    result = ledger(args.shape)
    resources = {}
    if not args.no_resources:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        candidates = (
            [args.so]
            if args.so
            else [
                os.path.join(root, ".gpu_build", "lib", "crossdiff_ext", "_C.abi3.so"),
                os.path.join(root, "crossdiff_ext", "_C.abi3.so"),
            ]
        )
        so, skipped = current_build(candidates, os.path.join(root, "csrc"))
        if so is None:
            resources["cuda"] = "no CUDA build of the current sources found" + (
                f" (stale: {', '.join(skipped)})" if skipped else ""
            )
        else:
            try:
                resources["cuda"] = cuda_resources(so)
            except (RuntimeError, subprocess.CalledProcessError) as err:
                resources["cuda"] = f"not read: {err}"
        resources["triton"] = triton_resources(triton_paper_variants())
        result["resources"] = resources
    stem = args.out or os.path.join(RESULTS_DIR, f"ledger-{args.shape}")
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(render(result, resources))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)


# The training step sorts its codes by latent this many times (ops/autograd.py).
ORDER_PER_STEP = 1
