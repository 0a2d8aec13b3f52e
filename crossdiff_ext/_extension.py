"""Loads crossdiff_ext._C (which registers the crossdiff ops) and refuses a missing or stale build."""

import os
from types import ModuleType

from ._build_hash import source_hash

REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the repository root"


def load() -> ModuleType:
    """Import crossdiff_ext._C; ImportError when it is missing, built against another torch, or stale."""
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(
            f"crossdiff_ext._C could not be loaded ({err}). The C++ extension is missing or was built against "
            f"another torch; {REBUILD}."
        ) from err
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    if os.path.isdir(csrc):  # a source checkout (editable install): the build must match the sources
        expected = source_hash(csrc)
        if _C.source_hash() != expected:
            raise ImportError(
                f"crossdiff_ext._C is stale: built from csrc hash {_C.source_hash()}, the sources now hash to "
                f"{expected}; {REBUILD}."
            )
    return _C
