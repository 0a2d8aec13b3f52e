"""The Triton kernels as custom ops of their own namespace, crossdiff_triton, with the crossdiff schemas.

The CUDA dispatch key of the crossdiff ops belongs to the CUDA backend (csrc/cuda), so the Triton launchers get
ops of their own: opaque to torch.compile (no data-dependent Python traced), checked by torch.library.opcheck,
with the same fake kernels and autograd formulas as the crossdiff ops. The schemas are copied at import from the
ops that csrc/ops.cpp declares, so they are still written once. The CPU key runs the kernels under Triton's
interpreter (TRITON_INTERPRET=1), and only there; triton itself is imported on the first launch.
"""

import importlib
from types import SimpleNamespace

import torch

from .. import backends
from . import encode, select, sparse

NAMESPACE = "crossdiff_triton"
# op -> (module of crossdiff_ext.triton that launches it, its fake kernel): the op family's module name is the
# same in ops/ and triton/.
OPS = {
    op: (family.__name__.rsplit(".", 1)[1], fake)
    for family in (encode, select, sparse)
    for op, fake in family.FAKES.items()
}
if set(OPS) != set(backends.OPS):
    raise RuntimeError(f"the Triton ops {sorted(OPS)} differ from the crossdiff ops {sorted(backends.OPS)}")


def _launcher(name, module):
    def launch(*args):
        if args[0].device.type == "cpu" and not backends.triton_interpreted():
            raise RuntimeError(
                f"{NAMESPACE}::{name} got CPU tensors: the Triton kernels run on CUDA tensors, or on "
                "CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 before importing "
                "triton)"
            )
        fn = getattr(importlib.import_module(f"crossdiff_ext.triton.{module}"), name)
        if args[0].device.type == "cuda":
            # Triton launches on the current device's current stream: make that the tensors' device.
            with torch.cuda.device(args[0].device):
                return fn(*args)
        return fn(*args)

    launch.__name__ = name
    return launch


_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, (_module, _fake) in OPS.items():
    _lib.define(str(getattr(torch.ops.crossdiff, _name).default._schema).split("::", 1)[1])
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _launcher(_name, _module), _key)
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)

encode.register_encode_autograd(f"{NAMESPACE}::paired_encode")
select.register_selection_autograd(NAMESPACE)
sparse.register_decode_autograd(f"{NAMESPACE}::sparse_decode", lambda: KERNELS)

_ops = getattr(torch.ops, NAMESPACE)
KERNELS = SimpleNamespace(**{name: getattr(_ops, name) for name in OPS})
backends.register("triton", KERNELS)
