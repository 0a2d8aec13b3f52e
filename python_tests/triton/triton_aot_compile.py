"""Compile every Triton kernel of crossdiff_ext ahead of time for real GPU targets, without a GPU.

Run by python_tests/triton/test_triton_compiles.py in a subprocess with TRITON_INTERPRET unset (under the interpreter
the kernels are Python functions and nothing is compiled). Lowering to PTX and ptxas's cubin catches what the
interpreter cannot: type errors of the compiled dialect, unsupported ops, layouts, register/PTX failures.
Prints one line per compiled variant and exits non-zero on the first failure. With CROSSDIFF_AOT_RESOURCES=1 each
line also gives the cubin's registers per thread, spill stores/loads and static shared memory (Triton's bundled
ptxas -v on the kernel's PTX); without a GPU the loaded kernel's n_regs / n_spills are not available.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from crossdiff_ext.triton import _launch, encode, select, sparse  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 64)
AMPERE = GPUTarget("cuda", 80, 32)
FLOATS = ("bf16", "fp16", "fp32")


def compile_one(label, fn, signature, constexprs, target, num_warps=4, num_stages=3):
    # Constexpr parameters appear in the signature as "constexpr" with their value in `constexprs`.
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    assert kernel.asm.get("cubin"), f"{label}: no cubin"
    usage = f" [{resources(kernel, target)}]" if RESOURCES else ""
    print(f"ok {label} sm_{target.arch} ({time.perf_counter() - t0:.1f} s){usage}", flush=True)


RESOURCES = os.environ.get("CROSSDIFF_AOT_RESOURCES") == "1"


def resources(kernel, target):
    """Registers, spills and shared memory of one compiled kernel, from ptxas -v on its PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{target.arch}a" if target.arch == 90 else f"sm_{target.arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        out = subprocess.run(
            [get_ptxas(target.arch).path, "-v", f"--gpu-name={arch}", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (
        f"regs {regs.group(1) if regs else '?'}, spill st/ld {spills.group(1)}/{spills.group(2)} B, "
        f"shared {kernel.metadata.shared} B (Triton's dynamic)"
    )


def selection_variants(target):
    state, tables = {"state_ptr": "*i64"}, {"staged_ptr": "*i64", "tile_base_ptr": "*i64", "tile_count_ptr": "*i64"}
    for dt in FLOATS:
        for block in (16, 2048):
            common = {"f_ptr": f"*{dt}", "w_ptr": "*fp32", **state}
            tiles = {"F": "i32", "n_col_tiles": "i32", "n_tiles": "i64", "tiles_per_chunk": "i64"}
            slabs = {"B": "i32", "F": "i32"}
            warps = _launch.select_warps(block)
            for first in (True, False):
                compile_one(
                    f"select._level_kernel[{dt}, first={first}, slab {block}]",
                    select._level_kernel,
                    {**common, "hist_ptr": "*i64", **slabs, "rows_per_chunk": "i32"},
                    {"FIRST": first, "SLAB": block},
                    target,
                    warps,
                )
            compile_one(
                f"select._stage_kernel[{dt}, slab {block}]",
                select._stage_kernel,
                {**common, **tables, **slabs, "n_slabs": "i32", "rows_per_chunk": "i32"},
                {"SLAB": block},
                target,
                warps,
            )
            for idx in ("i32", "i64"):
                compile_one(
                    f"select._staged_write_kernel[{dt}, {idx}, slab {block}]",
                    select._staged_write_kernel,
                    {
                        "f_ptr": f"*{dt}",
                        **state,
                        **tables,
                        "above_before_ptr": "*i64",
                        "ties_before_ptr": "*i64",
                        "values_ptr": f"*{dt}",
                        "indices_ptr": f"*{idx}",
                        "row_count_ptr": "*i64",
                        "F": "i32",
                        "n_slabs": "i32",
                        "n_tiles": "i64",
                        "tiles_per_program": "i64",
                    },
                    {"SLAB": block, "STEP": _launch.TILE_STEP},
                    target,
                )
            for topk in (True, False):
                compile_one(
                    f"select._count_kernel[{dt}, topk={topk}, block {block}]",
                    select._count_kernel,
                    {**common, "above_ptr": "*i64", "ties_ptr": "*i64", "theta": "fp32", **tiles},
                    {"TOPK": topk, "BLOCK": block},
                    target,
                    warps,
                )
                for idx in ("i32", "i64"):
                    compile_one(
                        f"select._write_kernel[{dt}, {idx}, topk={topk}, block {block}]",
                        select._write_kernel,
                        {
                            **common,
                            "above_before_ptr": "*i64",
                            "ties_before_ptr": "*i64",
                            "values_ptr": f"*{dt}",
                            "indices_ptr": f"*{idx}",
                            "row_count_ptr": "*i64",
                            "theta": "fp32",
                            **tiles,
                        },
                        {"TOPK": topk, "BLOCK": block},
                        target,
                        warps,
                    )
    compile_one("select._init_kernel", select._init_kernel, {**state, "K": "i64"}, {}, target, 1)
    for staged_keys in (False, True):
        compile_one(
            f"select._resolve_kernel[staged_keys={staged_keys}]",
            select._resolve_kernel,
            {**state, "hist_ptr": "*i64", "K": "i64", "cap": "i64"},
            {"STAGED_KEYS": staged_keys},
            target,
        )
    compile_one(
        "select._staged_level_kernel",
        select._staged_level_kernel,
        {**state, "staged_ptr": "*i64", "hist_ptr": "*i64", "per_program": "i64"},
        {"BLOCK": select.STAGED_BLOCK},
        target,
    )
    compile_one(
        "select._tile_count_kernel",
        select._tile_count_kernel,
        {**state, **tables, "above_ptr": "*i64", "ties_ptr": "*i64", "n_tiles": "i64", "tiles_per_program": "i64"},
        {"STEP": _launch.TILE_STEP},
        target,
    )


def sparse_variants(target):
    E = _launch.ENTRY_BLOCK
    for dt in FLOATS:
        for idx in ("i32", "i64"):
            for has_bias in (True, False):
                compile_one(
                    f"sparse._decode_kernel[{dt}, {idx}, bias={has_bias}]",
                    sparse._decode_kernel,
                    {
                        "values_ptr": f"*{dt}",
                        "indices_ptr": f"*{idx}",
                        "row_ptr_ptr": "*i64",
                        "W_ptr": f"*{dt}",
                        "bias_ptr": f"*{dt}",
                        "out_ptr": f"*{dt}",
                        "D": "i32",
                    },
                    {"HAS_BIAS": has_bias, "BLOCK_E": E, "BLOCK_D": _launch.row_block(4608)},
                    target,
                )
            compile_one(
                f"sparse._values_grad_kernel[{dt}, {idx}]",
                sparse._values_grad_kernel,
                {
                    "grad_ptr": f"*{dt}",
                    "indices_ptr": f"*{idx}",
                    "rows_ptr": "*i64",
                    "W_ptr": f"*{dt}",
                    "out_ptr": f"*{dt}",
                    "nnz": "i32",
                    "D": "i32",
                },
                {"BLOCK_E": E, "BLOCK_D": _launch.dot_block(4608)},
                target,
            )
        compile_one(
            f"sparse._weight_grad_kernel[{dt}]",
            sparse._weight_grad_kernel,
            {
                "values_ptr": f"*{dt}",
                "dense_ptr": f"*{dt}",
                "col_ptr_ptr": "*i64",
                "perm_ptr": "*i64",
                "rows_ptr": "*i64",
                "grad_ptr": f"*{dt}",
                "sums_ptr": "*fp32",
                "F": "i32",
                "D": "i32",
            },
            {
                "LATENTS": _launch.GRAD_LATENTS,
                "BLOCK_E": E,
                "BLOCK_D": _launch.grad_block(4608, 4 if dt == "fp32" else 2),
            },
            target,
        )


def encoder_variants(target, all_configs):
    for dt in FLOATS:
        configs = encode.FP32_CONFIGS if dt == "fp32" else encode.HALF_CONFIGS
        # EVEN_K: the paper's K = 2 * 2304 is a multiple of every BLOCK_K; a masked K loop once per dtype and layout
        variants = [(flat, config, True) for flat in (True, False) for config in configs[:1]]
        variants += [(flat, config, False) for flat in (True, False) for config in configs[:1]]
        variants += [(True, config, True) for config in configs[1:] if all_configs and dt != "fp16"]
        variants = [(flat, config, even_k, False) for flat, config, even_k in variants]
        # Tensor descriptors (TMA), which the launcher takes for half inputs on Hopper only: every config a flat x
        # may run with
        if target.arch >= 90 and dt != "fp32":
            variants += [(True, config, True, True) for config in (configs if dt != "fp16" else configs[:1])]
        for flat, config, even_k, desc in variants:
            blocks = config.kwargs
            sig = {
                "x_ptr": f"tensordesc<{dt}[{blocks['BLOCK_B']}, {blocks['BLOCK_K']}]>" if desc else f"*{dt}",
                "W_ptr": f"tensordesc<{dt}[{blocks['BLOCK_F']}, {blocks['BLOCK_K']}]>" if desc else f"*{dt}",
                "b_ptr": f"*{dt}",
                "f_ptr": f"*{dt}",
                "B": "i32",
                "F": "i32",
                "K": "i32",
                "d": "i32",
                "stride_xb": "i32",
                "stride_xm": "i32",
                "B_BUCKET": "i32",
            }
            compile_one(
                f"encode._encode_kernel[{dt}, flat={flat}, even_k={even_k}, desc={desc}, {config.kwargs}]",
                encode._encode_kernel,
                sig,
                {"FLAT": flat, "IEEE": dt == "fp32", "EVEN_K": even_k, "DESC": desc, **config.kwargs},
                target,
                config.num_warps,
                config.num_stages,
            )


def main():
    selection_variants(HOPPER)
    sparse_variants(HOPPER)
    encoder_variants(HOPPER, all_configs=True)
    # The generic target: every kernel but the Hopper-tuned GEMM configs (one config per variant).
    selection_variants(AMPERE)
    sparse_variants(AMPERE)
    encoder_variants(AMPERE, all_configs=False)
    print("all Triton kernels compiled")


if __name__ == "__main__":
    sys.exit(main())
