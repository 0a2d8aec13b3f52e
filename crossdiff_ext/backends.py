"""Backend choice: which implementation of the crossdiff ops runs.

"reference": plain PyTorch (dense where simplest), the ground truth for tests; "cpu": the C++ kernels;
"cuda": the CUDA kernels of csrc/cuda; "triton": the Triton kernels; "auto": the fastest built backend for the
tensors' device. A backend that is asked for and not built raises; nothing falls back silently.

This module imports no op: the modules that implement the ops register their kernel tables here (register), so
the backend choice sits below everything that dispatches through it.
"""

import contextlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Optional, Union

import torch

from . import _extension
from .errors import InputError

NAMES = ("auto", "reference", "cpu", "triton", "cuda")
# The crossdiff ops every backend implements (the schemas are declared in csrc/ops.cpp).
OPS = (
    "paired_encode",
    "batch_topk",
    "threshold_select",
    "sparse_decode",
    "sparse_values_grad",
    "latent_order",
    "sparse_weight_grad",
)
_C = _extension.load()
_current = ["auto"]
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once: resolve() runs inside compiled code
# The Triton kernels mask tl.histogram, which triton accepts from 3.4 on (torch 2.6 and 2.7 bring 3.2 and 3.3).
TRITON_MIN_VERSION = (3, 4)


def _triton_version() -> Optional[tuple[int, ...]]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


_TRITON_VERSION = _triton_version() if _TRITON_INSTALLED else None


def _unavailable_reason(name):
    """None when `name` can run here, else why not."""
    if name in ("auto", "reference", "cpu"):
        return None
    if name == "cuda":
        if not _C.cuda_kernels():
            return (
                "crossdiff_ext._C was built without CUDA kernels (needs a CUDA build of torch, nvcc and "
                "csrc/cuda sources at build time; CROSSDIFF_CUDA=1 forces them)"
            )
        return None
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "the triton package is not installed"
        if _TRITON_VERSION is not None and _TRITON_VERSION < TRITON_MIN_VERSION:
            found = ".".join(map(str, _TRITON_VERSION))
            return f"the Triton kernels need triton >= {'.'.join(map(str, TRITON_MIN_VERSION))}, found {found}"
        if not torch.cuda.is_available() and not triton_interpreted():
            return (
                "Triton kernels need a CUDA GPU, or Triton's interpreter for CPU tensors "
                "(TRITON_INTERPRET=1 before triton is imported)"
            )
        return None
    raise InputError(f"backend must be one of {NAMES}, got {name!r}")


def available() -> tuple[str, ...]:
    """Names of the backends that can run in this build.

    Returns:
        The runnable backend names, in the order of NAMES ("auto" and "reference" always among them).
    """
    return tuple(n for n in NAMES if _unavailable_reason(n) is None)


def _require(name):
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} was requested but is not available: {reason}")


def set_backend(name: str) -> None:
    """Select the backend for every crossdiff op (process-wide).

    Args:
        name: One of "auto", "reference", "cpu", "triton", "cuda".

    Raises:
        RuntimeError: The backend is not available in this build (nothing falls back silently).
        InputError: `name` is not a backend name.
    """
    _require(name)
    _current[0] = name


def get_backend() -> str:
    """The backend selected for the crossdiff ops (by set_backend or an enclosing `backend(...)` block).

    Returns:
        The selected name, possibly "auto" (resolve() gives the concrete backend for a device).
    """
    return _current[0]


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend inside its block: `with crossdiff_ext.backend("reference"): ...`.

    The previous backend is restored on exit, also when the block raises.

    Args:
        name: One of "auto", "reference", "cpu", "triton", "cuda".

    Yields:
        None, inside the block.

    Raises:
        RuntimeError: The backend is not available in this build.
        InputError: `name` is not a backend name.
    """
    _require(name)
    previous = _current[0]
    _current[0] = name
    try:
        yield
    finally:
        _current[0] = previous


def resolve(device: Union[torch.device, str], name: Optional[str] = None) -> str:
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
        raise RuntimeError(
            f"backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
            f"got tensors on {device}"
        )
    return name


def triton_interpreted() -> bool:
    """Triton's interpreter is on: its kernels run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# "auto" on CUDA tensors: per GPU model (torch.cuda.get_device_name) and op, the faster of "cuda" and "triton"
# as measured by kernels_bench. The tables live in the package data file auto_tables.json, written by
# `python -m kernels_bench auto_table kernels_bench/results/<device>.json --write`, never by hand.
AUTO_TABLES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_tables.json")
GPU_BACKENDS = ("triton", "cuda")


def read_auto_tables(
    path: Union[os.PathLike, str] = AUTO_TABLES_PATH,
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({device name: {op: backend}}, {device name: the result file it was measured in}) from an auto tables file;
    a malformed file raises (a wrong table would silently pick other kernels)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: the measured auto tables are missing (package data of crossdiff_ext; reinstall the package)"
        ) from None
    if not isinstance(data, dict) or set(data) != {"tables", "sources"} or set(data["tables"]) != set(data["sources"]):
        raise ValueError(
            f'{path}: expected {{"tables": {{device: {{op: backend}}}}, "sources": {{device: file}}}} '
            "with the same devices in both"
        )
    for device, table in data["tables"].items():
        if set(table) != set(OPS) or not set(table.values()) <= set(GPU_BACKENDS):
            raise ValueError(
                f"{path}: the table of {device!r} must name one of {GPU_BACKENDS} for each of {OPS}, got {table}"
            )
    return data["tables"], data["sources"]


AUTO_GPU_TABLES, AUTO_GPU_SOURCES = read_auto_tables()

# A GPU model with no measured table takes AUTO_GPU_TABLE: "triton" for every op, whose kernels the CPU suite
# checks under Triton's interpreter (no measurement backs either choice until a table is written).
AUTO_GPU = "auto-gpu"
AUTO_GPU_TABLE = {op: "triton" for op in OPS}
AUTO_GPU_SOURCE = None  # the result file AUTO_GPU_TABLE comes from (none: see above)


def _gpu_backends():
    return [n for n in GPU_BACKENDS if _unavailable_reason(n) is None and (n != "triton" or torch.cuda.is_available())]


def auto_gpu_table(device_name: Optional[str] = None) -> dict[str, str]:
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


# backend name -> its kernel table; filled by the modules that implement the ops (crossdiff_ext.ops registers
# "reference", "cpu" and "cuda" (the C++ ops through the dispatcher) and "triton").
_REGISTRY = {}


def register(names: Union[str, Iterable[str]], table: SimpleNamespace) -> None:
    """Register `table` (a namespace with one callable per name in OPS) as the kernels of each backend in `names`."""
    names = (names,) if isinstance(names, str) else tuple(names)
    missing = [op for op in OPS if not callable(getattr(table, op, None))]
    if missing:
        raise ValueError(f"the kernel table of {names} lacks {missing}")
    for name in names:
        if name not in NAMES or name == "auto":
            raise ValueError(f"cannot register kernels for {name!r}: backends are {NAMES[1:]}")
        _REGISTRY[name] = table


def kernels(name: str) -> SimpleNamespace:
    """The op implementations of a concrete backend, as a namespace of callables."""
    if name == AUTO_GPU:
        return _auto_gpu_kernels()
    if name in _REGISTRY:
        return _REGISTRY[name]
    _require(name)
    raise RuntimeError(f"backend {name!r} has no kernel table (none was registered: import crossdiff_ext.ops)")
