"""Hash of the C++/CUDA sources, compiled into crossdiff_ext._C and compared at import to catch stale builds.

Standalone (standard library only) because setup.py loads it by path before the package is importable.
"""

import hashlib
import os

SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


def source_hash(csrc_dir: str) -> str:
    """First 16 hex digits of a SHA-256 over the relative paths and contents of the sources under `csrc_dir`."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(csrc_dir):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(SOURCE_SUFFIXES):
                continue
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, csrc_dir).replace(os.sep, "/").encode())
            with open(path, "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()[:16]
