"""sparse_decode and the sparse backward ops: every kernel backend against the reference."""

import pytest
import torch
from conftest import backend_device, backend_params, close, dtypes_for, grid_tensor, rng

import crossdiff_ext as cx
from crossdiff_ext import ops

SHAPES = [(1, 2, 1, 1, 1), (7, 2, 13, 37, 3), (33, 3, 5, 129, 9), (64, 2, 40, 250, 17)]  # (B, M, d, F, k)


def make_codes(B, F, k, dtype, device, g, index_dtype=torch.int32):
    """Batch top-k codes of random scores, with an empty row and a row that keeps many latents."""
    f = torch.relu(torch.randn(B, F, generator=g))
    f[0] = 0.0
    f[-1] *= 50.0
    w = torch.rand(F, generator=g) + 0.5
    values, indices, row_ptr, _ = ops.batch_topk_reference(f, w, min(k * B, B * F))
    values = grid_tensor(values.shape, 1, 16, 4, dtype, device, g) * (values != 0).to(device)
    return values, indices.to(device=device, dtype=index_dtype), row_ptr.to(device)


def dictionary(F, M, d, dtype, device, g):
    return grid_tensor((F, M, d), -8, 8, 8, dtype, device, g), grid_tensor((M, d), -8, 8, 4, dtype, device, g)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,M,d,F,k", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_decode_matches_reference(name, B, M, d, F, k, index_dtype, poison):
    device = backend_device(name)
    g = rng(B * F + d)
    for dtype in dtypes_for(name):
        codes = make_codes(B, F, k, dtype, device, g, index_dtype)
        W, bias = dictionary(F, M, d, dtype, device, g)
        for b in (bias, None):
            with cx.backend(name):
                out = ops.sparse_decode(*codes, W, b)
            assert out.dtype == dtype and out.shape == (B, M, d)
            torch.testing.assert_close(out, ops.sparse_decode_reference(*codes, W, b), rtol=0, atol=0)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,M,d,F,k", SHAPES)
def test_sparse_backward_ops_match_reference(name, B, M, d, F, k, poison):
    device = backend_device(name)
    g = rng(3 * B + F)
    for dtype in dtypes_for(name):
        values, indices, row_ptr = make_codes(B, F, k, dtype, device, g)
        W, _ = dictionary(F, M, d, dtype, device, g)
        dense = grid_tensor((B, M, d), -8, 8, 8, dtype, device, g)
        with cx.backend(name):
            grad_values = ops.sparse_values_grad(dense, indices, row_ptr, W)
            order = ops.latent_order(indices, row_ptr, F)
            grad_W, sums = ops.sparse_weight_grad(values, dense, *order)
        torch.testing.assert_close(
            grad_values, ops.sparse_values_grad_reference(dense, indices, row_ptr, W), rtol=0, atol=0
        )
        expected_order = ops.latent_order_reference(indices, row_ptr, F)
        for got, expected in zip(order, expected_order):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        expected_W, expected_sums = ops.sparse_weight_grad_reference(values, dense, *expected_order)
        torch.testing.assert_close(grad_W, expected_W, rtol=0, atol=0)
        torch.testing.assert_close(sums, expected_sums, rtol=0, atol=0)


@pytest.mark.parametrize("B,F,k", [(1, 1, 1), (9, 37, 3), (40, 300, 11), (5, 2, 2)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_latent_order_by_sort_matches_reference(B, F, k, index_dtype):
    # The GPU backends' latent_order (a library sort), run here on CPU tensors: the same permutation, rows and
    # col_ptr as the reference, with empty rows, empty latents and a row that keeps every latent.
    _, indices, row_ptr = make_codes(B, F, k, torch.float32, "cpu", rng(B + 7 * F), index_dtype)
    for codes in ((indices, row_ptr), (indices[:0], torch.zeros_like(row_ptr))):
        got = ops.latent_order_by_sort(*codes, F)
        for part, expected in zip(got, ops.latent_order_reference(*codes, F)):
            assert part.dtype == torch.int64
            torch.testing.assert_close(part, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", backend_params())
def test_sparse_decode_gradients(name):
    device = backend_device(name)
    g = rng(8)
    B, M, d, F, k = 17, 2, 11, 45, 4
    values0, indices, row_ptr = make_codes(B, F, k, torch.float32, device, g)
    values0 = values0 + torch.rand(values0.shape, generator=g).to(device)  # fresh random values, never zero
    W0 = torch.randn(F, M, d, generator=g).to(device)
    b0 = torch.randn(M, d, generator=g).to(device)
    upstream = torch.randn(B, M, d, generator=g).to(device)
    grads = {}
    for backend in (name, "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (values0, W0, b0)]
        with cx.backend(backend):
            out = ops.sparse_decode(leaves[0], indices, row_ptr, leaves[1], leaves[2])
        (out * upstream).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for got, expected in zip(grads[name], grads["reference"]):
        close(got, expected, torch.float32, scale=4.0)


def uneven_codes(B, F, dtype, device, g):
    """CSR codes whose list lengths straddle the kernels' steps: latent 0 in every row (more entries than one entry
    step of any backend: 128 staged on CUDA, 64 / 16 on Triton), latent F - 1 in none, row 1 empty, other rows 1
    to 11 latents (list lengths that are not multiples of the gather groups: 4 or 8 on CUDA)."""
    keep = torch.rand(B, F, generator=g) < 0.3
    keep[:, 0] = True
    keep[:, F - 1] = False
    keep[1] = False
    keep[2, :12] = True
    rows, latents = keep.nonzero(as_tuple=True)
    values = grid_tensor(rows.shape, 1, 16, 4, dtype, device, g)
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    return values, latents.to(device=device, dtype=torch.int32), row_ptr.to(device)


@pytest.mark.parametrize("name", backend_params())
def test_sparse_ops_on_uneven_lists(name, poison):
    # F = 10 is not a multiple of the Triton weight gradient's latent group; M * d = 6 is narrower than any vector
    # pack, 16 is exactly two bf16 packs.
    device = backend_device(name)
    g = rng(29)
    B, F = 150, 10
    for M, d in ((2, 3), (2, 8)):
        for dtype in dtypes_for(name):
            values, indices, row_ptr = uneven_codes(B, F, dtype, device, g)
            W, bias = dictionary(F, M, d, dtype, device, g)
            dense = grid_tensor((B, M, d), -8, 8, 8, dtype, device, g)
            with cx.backend(name):
                out = ops.sparse_decode(values, indices, row_ptr, W, bias)
                grad_values = ops.sparse_values_grad(dense, indices, row_ptr, W)
                order = ops.latent_order(indices, row_ptr, F)
                grad_W, sums = ops.sparse_weight_grad(values, dense, *order)
            exact = lambda a, e: torch.testing.assert_close(a, e, rtol=0, atol=0)
            exact(out, ops.sparse_decode_reference(values, indices, row_ptr, W, bias))
            exact(grad_values, ops.sparse_values_grad_reference(dense, indices, row_ptr, W))
            expected_order = ops.latent_order_reference(indices, row_ptr, F)
            for got, expected in zip(order, expected_order):
                exact(got, expected)
            expected_W, expected_sums = ops.sparse_weight_grad_reference(values, dense, *expected_order)
            exact(grad_W, expected_W)
            exact(sums, expected_sums)
