"""The compile variants of every Triton kernel of crossdiff_ext: what a GPU can be asked to compile. Imports
triton (and compiles nothing): import it only where Triton kernels are to be compiled.

One list for the ahead-of-time compile test (python_tests/triton/triton_aot_compile.py compiles each for sm_90a
and sm_80 without a GPU) and for the traffic ledger's resource table (kernels_bench/ledger.py reads the paper
shape's variants: bf16, int32 latent ids, slab 2048, the encoder's first Hopper config). A variant's label names
its kernel and, in brackets, the choices that differ between variants.
"""

from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

from crossdiff_ext.triton import _launch, encode, select, sparse

FLOATS = ("bf16", "fp16", "fp32")


class Variant(NamedTuple):
    """One compilation: the kernel, its argument types (Triton signature strings), constexpr values, launch
    options."""

    label: str
    fn: Callable[..., Any]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3


def selection_variants() -> Iterator[Variant]:
    """The selection kernels, every dtype, slab / block 16 and 2048, index dtype and path."""
    state, tables = {"state_ptr": "*i64"}, {"staged_ptr": "*i64", "tile_base_ptr": "*i64", "tile_count_ptr": "*i64"}
    for dt in FLOATS:
        for block in (16, 2048):
            common = {"f_ptr": f"*{dt}", "w_ptr": "*fp32", **state}
            # relu: the selection reads pre-activations (the crosscoder's path) or the encoder's ReLU output
            tiles = {"F": "i32", "n_col_tiles": "i32", "n_tiles": "i64", "tiles_per_chunk": "i64", "relu": "i32"}
            slabs = {"B": "i32", "F": "i32"}
            warps = _launch.select_warps(block)
            for first in (True, False):
                yield Variant(
                    f"select._level_kernel[{dt}, first={first}, slab {block}]",
                    select._level_kernel,
                    {**common, "hist_ptr": "*i64", **slabs, "rows_per_chunk": "i32", "relu": "i32"},
                    {"FIRST": first, "SLAB": block},
                    warps,
                )
            yield Variant(
                f"select._stage_kernel[{dt}, slab {block}]",
                select._stage_kernel,
                {**common, **tables, **slabs, "n_slabs": "i32", "rows_per_chunk": "i32", "relu": "i32"},
                {"SLAB": block},
                warps,
            )
            for idx in ("i32", "i64"):
                yield Variant(
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
                )
            for topk in (True, False):
                yield Variant(
                    f"select._count_kernel[{dt}, topk={topk}, block {block}]",
                    select._count_kernel,
                    {**common, "above_ptr": "*i64", "ties_ptr": "*i64", "theta": "fp32", **tiles},
                    {"TOPK": topk, "BLOCK": block},
                    warps,
                )
                for idx in ("i32", "i64"):
                    yield Variant(
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
                        warps,
                    )
    yield Variant("select._init_kernel", select._init_kernel, {**state, "K": "i64"}, {}, 1)
    for staged_keys in (False, True):
        yield Variant(
            f"select._resolve_kernel[staged_keys={staged_keys}]",
            select._resolve_kernel,
            {**state, "hist_ptr": "*i64", "K": "i64", "cap": "i64"},
            {"STAGED_KEYS": staged_keys},
        )
    yield Variant(
        "select._staged_level_kernel",
        select._staged_level_kernel,
        {**state, "staged_ptr": "*i64", "hist_ptr": "*i64", "per_program": "i64"},
        {"BLOCK": select.STAGED_BLOCK},
    )
    yield Variant(
        "select._tile_count_kernel",
        select._tile_count_kernel,
        {**state, **tables, "above_ptr": "*i64", "ties_ptr": "*i64", "n_tiles": "i64", "tiles_per_program": "i64"},
        {"STEP": _launch.TILE_STEP},
    )


def sparse_variants() -> Iterator[Variant]:
    """The sparse decoder and its backward, every dtype and index dtype, rows of the paper's width (4608)."""
    E = _launch.ENTRY_BLOCK
    for dt in FLOATS:
        for idx in ("i32", "i64"):
            for has_bias in (True, False):
                yield Variant(
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
                )
            yield Variant(
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
            )
        yield Variant(
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
        )


def encoder_variants(arch: int, all_configs: bool) -> Iterator[Variant]:
    """The encoder: every dtype and layout, with and without the K mask and (Hopper, half) tensor descriptors."""
    for dt in FLOATS:
        configs = encode.FP32_CONFIGS if dt == "fp32" else encode.HALF_CONFIGS
        # EVEN_K: the paper's K = 2 * 2304 is a multiple of every BLOCK_K; a masked K loop once per dtype and layout
        variants = [(flat, config, True) for flat in (True, False) for config in configs[:1]]
        variants += [(flat, config, False) for flat in (True, False) for config in configs[:1]]
        variants += [(True, config, True) for config in configs[1:] if all_configs and dt != "fp16"]
        variants = [(flat, config, even_k, False, False) for flat, config, even_k in variants]
        # Tensor descriptors (TMA), which the launcher takes for half inputs on Hopper only: every config a flat x
        # may run with
        if arch >= 90 and dt != "fp32":
            variants += [(True, config, True, True, False) for config in (configs if dt != "fp16" else configs[:1])]
        # The crosscoder reads the pre-activations (relu=False, above); the standalone op's ReLU epilogue once per
        # dtype
        variants.append((True, configs[0], True, arch >= 90 and dt != "fp32", True))
        for flat, config, even_k, desc, relu in variants:
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
            yield Variant(
                f"encode._encode_kernel[{dt}, flat={flat}, even_k={even_k}, desc={desc}, relu={relu}, {config.kwargs}]",
                encode._encode_kernel,
                sig,
                {"FLAT": flat, "IEEE": dt == "fp32", "EVEN_K": even_k, "DESC": desc, "RELU": relu, **config.kwargs},
                config.num_warps,
                config.num_stages,
            )


def every_variant(arch: int) -> list[Variant]:
    """Every variant for a target of compute capability `arch` (90: Hopper, every tuned GEMM config; others: one
    config per encoder variant)."""
    hopper = arch >= 90
    return [*selection_variants(), *sparse_variants(), *encoder_variants(arch, all_configs=hopper)]
