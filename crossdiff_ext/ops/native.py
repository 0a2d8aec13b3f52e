"""The C++ ops of csrc/ (backends "cpu" and "cuda"): the dispatcher picks the CPU or the CUDA kernel by the
tensors' device."""

from types import SimpleNamespace

import torch

from .. import backends

KERNELS = SimpleNamespace(**{op: getattr(torch.ops.crossdiff, op) for op in backends.OPS})
backends.register(("cpu", "cuda"), KERNELS)
