"""Compile every Triton kernel of crossdiff_ext ahead of time for real GPU targets, without a GPU.

Run by python_tests/triton/test_triton_compiles.py in a subprocess with TRITON_INTERPRET unset (under the interpreter
the kernels are Python functions and nothing is compiled). Lowering to PTX and ptxas's cubin catches what the
interpreter cannot: type errors of the compiled dialect, unsupported ops, layouts, register/PTX failures.
Prints one line per compiled variant and exits non-zero on the first failure.
"""

import os
import sys
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
    print(f"ok {label} sm_{target.arch} ({time.perf_counter() - t0:.1f} s)", flush=True)


def selection_variants(target):
    for dt in FLOATS:
        for block in (16, 2048):
            common = {"f_ptr": f"*{dt}", "w_ptr": "*fp32", "state_ptr": "*i64"}
            tiles = {"F": "i32", "n_col_tiles": "i32", "n_tiles": "i64", "tiles_per_chunk": "i64"}
            warps = _launch.select_warps(block)
            for p in range(select.RADIX_PASSES):
                compile_one(
                    f"select._histogram_kernel[{dt}, pass {p}, block {block}]",
                    select._histogram_kernel,
                    {**common, "hist_ptr": "*i64", **tiles},
                    {"PASS": p, "RADIX_BITS": select.RADIX_BITS, "BLOCK": block},
                    target,
                    warps,
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
    for p in range(select.RADIX_PASSES):
        compile_one(
            f"select._resolve_kernel[pass {p}]",
            select._resolve_kernel,
            {"state_ptr": "*i64", "hist_ptr": "*i64"},
            {"PASS": p, "RADIX_BITS": select.RADIX_BITS},
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
    for idx in ("i32", "i64"):
        chunked = {
            "indices_ptr": f"*{idx}",
            "row_ptr_ptr": "*i64",
            "n_rows": "i32",
            "rows_per_chunk": "i32",
            "F": "i32",
        }
        compile_one(
            f"sparse._latent_count_kernel[{idx}]",
            sparse._latent_count_kernel,
            {**chunked, "counts_ptr": "*i64"},
            {"BLOCK_E": _launch.ORDER_BLOCK},
            target,
        )
        compile_one(
            f"sparse._latent_place_kernel[{idx}]",
            sparse._latent_place_kernel,
            {**chunked, "cursor_ptr": "*i64", "perm_ptr": "*i64", "rows_ptr": "*i64"},
            {"BLOCK_E": _launch.ORDER_BLOCK},
            target,
            num_stages=1,
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
