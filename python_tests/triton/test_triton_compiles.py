"""Every Triton kernel compiles to a cubin for Hopper (sm_90a) and Ampere (sm_80) on this machine, GPU or not:
the interpreted CPU tests check the kernels' results, this checks that the compiled dialect accepts them."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_triton_kernel_compiles_for_gpu_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The repository root first: the checkout's package is compiled, not an installed copy from elsewhere.
    root = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.path.dirname(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_aot_compile.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "all Triton kernels compiled" in proc.stdout
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") >= 233, proc.stdout[-2000:]
