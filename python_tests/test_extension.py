"""Loading crossdiff_ext._C: a missing or stale build is an ImportError that says how to rebuild."""

import sys

import pytest

from crossdiff_ext import _extension


def test_stale_build_is_refused(monkeypatch):
    monkeypatch.setattr(_extension, "source_hash", lambda csrc: "0123456789abcdef")
    with pytest.raises(ImportError, match=r"stale.*pip install --no-build-isolation -e \."):
        _extension.load()


def test_missing_build_is_refused(monkeypatch):
    import crossdiff_ext

    monkeypatch.delattr(crossdiff_ext, "_C")
    monkeypatch.setitem(sys.modules, "crossdiff_ext._C", None)  # makes `from . import _C` fail
    with pytest.raises(ImportError, match=r"missing or was built against another torch.*pip install"):
        _extension.load()


def test_current_build_loads():
    C = _extension.load()
    assert isinstance(C.source_hash(), str) and len(C.source_hash()) == 16
    assert isinstance(C.cuda_kernels(), bool)
