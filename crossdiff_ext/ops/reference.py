"""The plain-PyTorch references of every op, as the "reference" backend's kernel table."""

from types import SimpleNamespace

from .. import backends
from . import encode, select, sparse


def _reference(op):
    """`<op>_reference` of the op family that defines it."""
    found = [
        getattr(family, f"{op}_reference") for family in (encode, select, sparse) if hasattr(family, f"{op}_reference")
    ]
    if len(found) != 1:
        raise RuntimeError(
            f"op {op!r} needs exactly one reference implementation in crossdiff_ext.ops, found {len(found)}"
        )
    return found[0]


KERNELS = SimpleNamespace(**{op: _reference(op) for op in backends.OPS})
backends.register("reference", KERNELS)
