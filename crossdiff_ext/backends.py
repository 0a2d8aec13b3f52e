"""Backend choice: which implementation of the crossdiff ops runs.

"reference": plain PyTorch (dense where simplest), the ground truth for tests; "cpu": the C++ kernels;
"cuda": the CUDA kernels of csrc/cuda; "triton": the Triton kernels; "auto": the fastest built backend for the
tensors' device. A backend that is asked for and not built raises; nothing falls back silently.
"""
import contextlib
import importlib.util
import os
from types import SimpleNamespace

import torch

from . import _extension

NAMES = ("auto", "reference", "cpu", "triton", "cuda")
_C = _extension.load()
_current = ["auto"]
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once: resolve() runs inside compiled code


def _unavailable_reason(name):
    """None when `name` can run here, else why not."""
    if name in ("auto", "reference", "cpu"):
        return None
    if name == "cuda":
        if not _C.cuda_kernels():
            return ("crossdiff_ext._C was built without CUDA kernels (needs a CUDA build of torch, nvcc and "
                    "csrc/cuda sources at build time; CROSSDIFF_CUDA=1 forces them)")
        return None
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "the triton package is not installed"
        if not torch.cuda.is_available() and not triton_interpreted():
            return ("Triton kernels need a CUDA GPU, or Triton's interpreter for CPU tensors "
                    "(TRITON_INTERPRET=1 before triton is imported)")
        return None
    raise ValueError(f"backend must be one of {NAMES}, got {name!r}")


def available():
    """Names of the backends that can run in this build."""
    return tuple(n for n in NAMES if _unavailable_reason(n) is None)


def _require(name):
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} was requested but is not available: {reason}")


def set_backend(name):
    """Select the backend for every crossdiff op (process-wide)."""
    _require(name)
    _current[0] = name


def get_backend():
    return _current[0]


@contextlib.contextmanager
def backend(name):
    """Context manager: `with crossdiff_ext.backend("reference"): ...`."""
    _require(name)
    previous = _current[0]
    _current[0] = name
    try:
        yield
    finally:
        _current[0] = previous


def resolve(device, name=None):
    """The concrete backend that runs for tensors on `device` (resolves "auto"; checks device support)."""
    name = _current[0] if name is None else name
    _require(name)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and _gpu_backends():
            return AUTO_GPU
        raise RuntimeError(
            f"backend 'auto' has no kernels for {device.type} tensors in this build; choose one explicitly "
            f"(available: {available()}), e.g. crossdiff_ext.set_backend('reference')"
        )
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(f"backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                           f"got tensors on {device}")
    return name


def triton_interpreted():
    """Triton's interpreter is on: its kernels run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# "auto" on CUDA tensors: per GPU model (torch.cuda.get_device_name) and op, the faster of "cuda" and "triton"
# in the kernels_bench result file that AUTO_GPU_SOURCES names for that model. The block between the markers is
# written by `python -m kernels_bench auto_table kernels_bench/results/<device>.json --write`, never by hand.
# BEGIN AUTO_GPU_TABLES
AUTO_GPU_TABLES = {}
AUTO_GPU_SOURCES = {}
# END AUTO_GPU_TABLES

# A GPU model with no measured table takes AUTO_GPU_TABLE: "triton" for every op, whose kernels the CPU suite
# checks under Triton's interpreter (no GPU had been lent to the sessions that wrote the kernels when this was
# written, so no measurement backs either choice).
AUTO_GPU = "auto-gpu"
AUTO_GPU_TABLE = {op: "triton" for op in ("paired_encode", "batch_topk", "threshold_select", "sparse_decode",
                                          "sparse_values_grad", "latent_order", "sparse_weight_grad")}
AUTO_GPU_SOURCE = None  # the result file AUTO_GPU_TABLE comes from (none: see above)


def _gpu_backends():
    return [n for n in ("triton", "cuda") if _unavailable_reason(n) is None and (n != "triton" or torch.cuda.is_available())]


def auto_gpu_table(device_name=None):
    """{op: backend} that "auto" runs on a GPU model (default: the current CUDA device's): its measured table,
    else AUTO_GPU_TABLE."""
    if device_name is None:
        device_name = torch.cuda.get_device_name(torch.cuda.current_device())
    return AUTO_GPU_TABLES.get(device_name, AUTO_GPU_TABLE)


def _auto_gpu_kernels():
    built = _gpu_backends()
    if not built:
        raise RuntimeError(f"backend 'auto' has no GPU kernels in this build (available: {available()})")
    chosen = {op: name if name in built else built[0] for op, name in auto_gpu_table().items()}
    return SimpleNamespace(**{op: getattr(kernels(name), op) for op, name in chosen.items()})


def kernels(name):
    """The op implementations of a concrete backend, as a namespace of callables."""
    if name == AUTO_GPU:
        return _auto_gpu_kernels()
    if name == "reference":
        from .ops import reference

        return reference.KERNELS
    if name in ("cpu", "cuda"):
        return DISPATCHER_KERNELS
    if name == "triton":
        from .ops import triton_ops

        return triton_ops.KERNELS
    _require(name)
    raise RuntimeError(f"backend {name!r} has no kernel table")


# The C++ ops: the dispatcher picks the CPU or CUDA kernel by the tensors' device.
_ops = torch.ops.crossdiff
DISPATCHER_KERNELS = SimpleNamespace(
    paired_encode=_ops.paired_encode,
    batch_topk=_ops.batch_topk,
    threshold_select=_ops.threshold_select,
    sparse_decode=_ops.sparse_decode,
    sparse_values_grad=_ops.sparse_values_grad,
    latent_order=_ops.latent_order,
    sparse_weight_grad=_ops.sparse_weight_grad,
)
