"""Backend selection: explicit choices, context manager, and clear errors instead of silent fallbacks."""

from types import SimpleNamespace

import pytest
import torch

import crossdiff_ext as cx
from crossdiff_ext import backends


def test_set_backend_and_context_manager():
    assert cx.get_backend() == "auto"
    cx.set_backend("reference")
    assert cx.get_backend() == "reference"
    with cx.backend("cpu"):
        assert cx.get_backend() == "cpu"
        assert backends.resolve("cpu") == "cpu"
    assert cx.get_backend() == "reference"
    cx.set_backend("auto")
    assert backends.resolve("cpu") == "cpu"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        cx.set_backend("fast")


def test_an_old_triton_is_refused_with_its_version(monkeypatch):
    # tl.histogram takes a mask from triton 3.4 on: an older triton would fail to compile the selection kernels
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)
    monkeypatch.setattr(backends, "_TRITON_VERSION", (3, 3))
    assert backends._unavailable_reason("triton") == "the Triton kernels need triton >= 3.4, found 3.3"


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_missing_backend_raises(name):
    if name in cx.available_backends():
        pytest.skip(f"{name} is built here")
    with pytest.raises(RuntimeError, match=f"backend '{name}' was requested but is not available"):
        cx.set_backend(name)
    with pytest.raises(RuntimeError, match="not available"):
        with cx.backend(name):
            pass
    assert cx.get_backend() == "auto"


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(RuntimeError, match="backend 'cpu' runs on CPU tensors"):
        backends.resolve("meta", "cpu")


def test_auto_without_gpu_kernels_raises_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(backends, "_gpu_backends", lambda: [])  # a build with no GPU kernels, on any machine
    with pytest.raises(RuntimeError, match="no kernels for cuda tensors"):
        backends.resolve(torch.device("cuda", 0))


@pytest.mark.parametrize("activation", ["batch_topk", "relu"])
def test_backward_uses_the_forward_backend(monkeypatch, activation):
    # The backward pass runs on the kernels that ran the forward, even outside the `with` block.
    cc = cx.CrossCoder(
        6, 20, 2, k=2 if activation == "batch_topk" else None, activation=activation, dense_code_density=1.0
    )
    x = torch.randn(4, 2, 6)
    with cx.backend("cpu"):
        out = cc(x)
    cx.set_backend("reference")
    asked = []
    real_kernels = backends.kernels
    monkeypatch.setattr(backends, "kernels", lambda name: asked.append(name) or real_kernels(name))
    out.recon.sum().backward()
    assert asked and set(asked) == {"cpu"}, asked
    assert cc.W_enc.grad is not None


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.resolve("cpu", "triton")
    f = torch.rand(3, 5)
    with pytest.raises(RuntimeError, match="crossdiff_triton::batch_topk got CPU tensors"):
        torch.ops.crossdiff_triton.batch_topk(f, torch.ones(5), 2)


def test_auto_picks_the_measured_table_of_the_current_gpu_model(monkeypatch):
    # Simulated GPU: both GPU backends "built", a measured table for one model, none for another.
    monkeypatch.setattr(backends, "_gpu_backends", lambda: ["triton", "cuda"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    triton_table = SimpleNamespace(**{op: ("triton", op) for op in backends.AUTO_GPU_TABLE})
    cuda_table = SimpleNamespace(**{op: ("cuda", op) for op in backends.AUTO_GPU_TABLE})
    real_kernels = backends.kernels
    monkeypatch.setattr(
        backends, "kernels", lambda name: {"triton": triton_table, "cuda": cuda_table}.get(name) or real_kernels(name)
    )
    measured = dict(backends.AUTO_GPU_TABLE, batch_topk="cuda", sparse_decode="cuda")
    monkeypatch.setattr(backends, "AUTO_GPU_TABLES", {"GPU A": measured})
    for model, table in [("GPU A", measured), ("GPU B", backends.AUTO_GPU_TABLE)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None, model=model: model)
        assert backends.auto_gpu_table() == table
        chosen = real_kernels(backends.AUTO_GPU)
        assert {op: getattr(chosen, op) for op in table} == {op: (b, op) for op, b in table.items()}
