"""paired_encode: every kernel backend against the reference, forward and gradients, odd shapes and strides."""

import pytest
import torch
from conftest import backend_device, backend_params, close, dtypes_for, grid_tensor, rng

import crossdiff_ext as cx
from crossdiff_ext import ops

SHAPES = [(1, 2, 1, 1), (7, 2, 13, 37), (33, 3, 5, 129), (5, 4, 31, 3), (65, 2, 64, 200)]  # (B, M, d, F)


def inputs(B, M, d, F, dtype, device, g):
    # Grid values make the products and sums exact in fp32, so low-precision outputs round the same value.
    x = grid_tensor((B, M, d), -4, 4, 2, dtype, device, g)
    W = grid_tensor((F, M, d), -8, 8, 16, dtype, device, g)
    b = grid_tensor((F,), -8, 8, 8, dtype, device, g)
    return x, W, b


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,M,d,F", SHAPES)
def test_paired_encode_matches_reference(name, B, M, d, F, poison):
    device = backend_device(name)
    g = rng(B + M + d + F)
    for dtype in dtypes_for(name):
        x, W, b = inputs(B, M, d, F, dtype, device, g)
        with cx.backend(name):
            f = ops.paired_encode(x, W, b)
        expected = ops.paired_encode_reference(x, W, b)
        assert f.dtype == dtype and f.shape == (B, F)
        torch.testing.assert_close(f, expected, rtol=0, atol=0)
        assert bool((f >= 0).all()) and bool((f == 0).any() or B * F < 4)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,M,d,F", SHAPES[1:4])
def test_paired_encode_preactivations(name, B, M, d, F, poison):
    # relu=False: x W^T + b itself (what the crosscoder's selection reads), negatives and NaN included.
    device = backend_device(name)
    g = rng(B * 3 + F)
    for dtype in dtypes_for(name):
        x, W, b = inputs(B, M, d, F, dtype, device, g)
        x[0, 0, 0] = float("nan")
        with cx.backend(name):
            pre = ops.paired_encode(x, W, b, relu=False)
        expected = ops.paired_encode_reference(x, W, b, relu=False)
        torch.testing.assert_close(pre, expected, rtol=0, atol=0, equal_nan=True)
        assert bool((pre < 0).any()) and bool(pre[0].isnan().all())


@pytest.mark.parametrize("name", backend_params())
def test_paired_encode_random_inputs(name, poison):
    device = backend_device(name)
    g = rng(11)
    for dtype in dtypes_for(name):
        x = torch.randn(29, 2, 47, generator=g).to(dtype=dtype, device=device)
        W = (torch.randn(83, 2, 47, generator=g) / 7).to(dtype=dtype, device=device)
        b = torch.randn(83, generator=g).to(dtype=dtype, device=device)
        with cx.backend(name):
            f = ops.paired_encode(x, W, b)
        close(f, ops.paired_encode_reference(x, W, b), dtype, scale=4.0)


@pytest.mark.parametrize("name", backend_params())
def test_paired_encode_reads_strided_models_in_place(name):
    # x[b, m] rows that are not adjacent in memory (a model stride larger than d).
    device = backend_device(name)
    g = rng(5)
    # drawn on the CPU (the generator's device), then moved: the same values on every backend
    big = torch.randn(9, 2, 24, generator=g).to(device)
    x = big[:, :, 3:20]
    W = torch.randn(31, 2, 17, generator=g).to(device)
    b = torch.randn(31, generator=g).to(device)
    with cx.backend(name):
        f = ops.paired_encode(x, W, b)
    close(f, ops.paired_encode_reference(x.contiguous(), W, b), torch.float32, scale=4.0)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("relu", [True, False])
def test_paired_encode_gradients(name, relu):
    device = backend_device(name)
    g = rng(6)
    x0 = torch.randn(13, 2, 9, generator=g).to(device)
    W0 = (torch.randn(21, 2, 9, generator=g) / 3).to(device)
    b0 = torch.randn(21, generator=g).to(device)
    upstream = torch.randn(13, 21, generator=g).to(device)
    grads = {}
    for backend in (name, "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (x0, W0, b0)]
        with cx.backend(backend):
            (ops.paired_encode(*leaves, relu=relu) * upstream).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for got, expected in zip(grads[name], grads["reference"]):
        close(got, expected, torch.float32, scale=4.0)


@pytest.mark.parametrize("name", backend_params())
def test_paired_encode_keeps_nan(name, poison):
    # ReLU(NaN) is NaN (torch.relu): a NaN activation must reach the selection, which ranks NaN highest, not be
    # silently zeroed (a hardware max(x, 0) returns 0 for NaN).
    device = backend_device(name)
    g = rng(12)
    for dtype in dtypes_for(name):
        x, W, b = inputs(6, 2, 9, 23, dtype, device, g)
        x[2, 1, 4] = float("nan")
        with cx.backend(name):
            f = ops.paired_encode(x, W, b)
        assert bool(f[2].isnan().all())
        torch.testing.assert_close(f, ops.paired_encode_reference(x, W, b), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("d", [32, 33])
def test_paired_encode_k_steps(name, d, poison):
    # K = 2 * d: a multiple of every BLOCK_K the Triton encoder runs with (d = 32; its loads then carry no K mask)
    # or of none (d = 33). x flat, flat in rows padded to a 16-byte multiple (the Triton encoder's tensor
    # descriptors, where it uses them, take both for half inputs when K is one too) or not, and with a model stride
    # larger than d.
    device = backend_device(name)
    g = rng(13 + d)
    B, M, F = 19, 2, 40
    K = M * d
    if name == "triton":
        from crossdiff_ext.triton import encode

        configs = encode.HALF_CONFIGS + encode.FP32_CONFIGS
        assert all(encode.even_k(K, c.kwargs["BLOCK_K"]) == (d == 32) for c in configs)
    for dtype in dtypes_for(name):
        x, W, b = inputs(B, M, d, F, dtype, device, g)
        layouts = {"flat": x}
        for pad in (8, 1):
            rows = torch.zeros(B, K + pad, dtype=dtype, device=device)
            rows[:, :K] = x.reshape(B, K)
            layouts[f"rows of {K + pad}"] = rows[:, :K].view(B, M, d)
        wide = torch.zeros(B, M, d + 5, dtype=dtype, device=device)
        wide[:, :, 2 : 2 + d] = x
        layouts["strided models"] = wide[:, :, 2 : 2 + d]
        for layout, xs in layouts.items():
            if name == "triton" and (device == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9):
                tma = d == 32 and layout in ("flat", f"rows of {K + 8}") and dtype != torch.float32
                assert (encode.descriptors(xs, W) is not None) == tma, layout
            with cx.backend(name):
                f = ops.paired_encode(xs, W, b)
            torch.testing.assert_close(f, ops.paired_encode_reference(x, W, b), rtol=0, atol=0, msg=layout)
