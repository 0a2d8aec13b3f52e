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

from kernels_bench import triton_variants as variants  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 64)
AMPERE = GPUTarget("cuda", 80, 32)


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


def main():
    # Hopper with every tuned GEMM config; the generic target with one config per encoder variant.
    for target in (HOPPER, AMPERE):
        for v in variants.every_variant(target.arch):
            compile_one(v.label, v.fn, v.signature, v.constexprs, target, v.num_warps, v.num_stages)
    print("all Triton kernels compiled")


if __name__ == "__main__":
    sys.exit(main())
