"""GPU backends at realistic and paper shapes in bf16, against the reference on the same GPU.

Skipped without a CUDA GPU (the CPU suite runs the same kernels at small shapes, Triton under its interpreter).
Paper shape (docs/math.md): B = 4096, M = 2, d = 2304, F = 73728, k = 100.
"""

import pytest
import torch
from conftest import backend_device, backend_params, grid_tensor, rng

import crossdiff_ext as cx
from crossdiff_ext import ops

GPU_BACKENDS = [p for p in backend_params() if backend_device(p.values[0]) == "cuda"]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
if not GPU_BACKENDS:
    GPU_BACKENDS = [pytest.param("none", marks=pytest.mark.skip(reason="no GPU backend in this build"))]

REALISTIC = (1024, 2, 2304, 16384, 100)
PAPER = (4096, 2, 2304, 73728, 100)


def crosscoder_inputs(B, M, d, F, g):
    x = torch.randn(B, M, d, generator=g).to("cuda", torch.bfloat16)
    W = (torch.randn(F, M, d, generator=g) / d**0.5).to("cuda", torch.bfloat16)
    b = (torch.randn(F, generator=g) * 0.1).to("cuda", torch.bfloat16)
    w = (torch.rand(F, generator=g) + 0.5).cuda()
    return x, W, b, w


def check_encode(name, x, W, b):
    with cx.backend(name):
        f = ops.paired_encode(x, W, b)
    expected = ops.paired_encode_reference(x, W, b)
    # bf16 output of an fp32 sum of 4608 products: both sides round once; allow a couple of bf16 ulps.
    torch.testing.assert_close(f.float(), expected.float(), rtol=1.6e-2, atol=2e-2)
    return expected  # the selection tests below rank the reference's f, so they compare exactly


def check_topk(name, f, w, K):
    with cx.backend(name):
        got = ops.batch_topk(f, w, K)
    expected = ops.batch_topk_reference(f, w, K)
    for label, g, e in zip(("values", "indices", "row_ptr", "min_score"), got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, label
        assert torch.equal(g, e), f"{label} differs from the reference"
    return got


def check_sparse(name, codes, W, g):
    values, indices, row_ptr = codes
    B = row_ptr.shape[0] - 1
    bias = torch.randn(W.shape[1:], generator=g).to("cuda", W.dtype)
    dense = torch.randn(B, *W.shape[1:], generator=g).to("cuda", W.dtype)
    with cx.backend(name):
        out = ops.sparse_decode(values, indices, row_ptr, W, bias)
        gv = ops.sparse_values_grad(dense, indices, row_ptr, W)
        order = ops.latent_order(indices, row_ptr, W.shape[0])
        gW, sums = ops.sparse_weight_grad(values, dense, *order)
    tol = dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(
        out.float(), ops.sparse_decode_reference(values, indices, row_ptr, W, bias).float(), **tol
    )
    torch.testing.assert_close(gv.float(), ops.sparse_values_grad_reference(dense, indices, row_ptr, W).float(), **tol)
    expected_order = ops.latent_order_reference(indices, row_ptr, W.shape[0])
    for got, exp in zip(order, expected_order):
        assert torch.equal(got, exp), "latent_order differs from the reference"
    eW, esums = ops.sparse_weight_grad_reference(values, dense, *expected_order)
    torch.testing.assert_close(gW.float(), eW.float(), **tol)
    torch.testing.assert_close(sums, esums, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [REALISTIC, PAPER], ids=["realistic", "paper"])
def test_ops_at_scale_bf16(name, shape):
    B, M, d, F, k = shape
    g = rng(B + F)
    x, W, b, w = crosscoder_inputs(B, M, d, F, g)
    f = check_encode(name, x, W, b)
    values, indices, row_ptr, _ = check_topk(name, f, w, k * B)
    with cx.backend(name):
        theta = float(torch.quantile((f[:64].float() * w).flatten(), 0.995))
        got = ops.threshold_select(f, w, theta)
    for g_, e_ in zip(got, ops.threshold_select_reference(f, w, theta)):
        assert torch.equal(g_, e_), "threshold_select differs from the reference"
    check_sparse(name, (values, indices, row_ptr), W, g)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_crosscoder_step_bf16(name):
    # The whole layer, forward and backward, against the reference backend at a realistic shape. Grid inputs make
    # the encoder's fp32 sums exact, so both backends round the same f and select the same entries.
    B, M, d, F, k = 512, 2, 2304, 16384, 64
    g = rng(99)
    cc = cx.CrossCoder(d, F, M, k=k, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        cc.W_enc.copy_(grid_tensor((F, M, d), -8, 8, 16, torch.bfloat16, "cuda", g))
        cc.b_enc.copy_(grid_tensor((F,), -8, 8, 8, torch.bfloat16, "cuda", g))
    x = grid_tensor((B, M, d), -4, 4, 2, torch.bfloat16, "cuda", g)
    results = {}
    for backend in (name, "reference"):
        cc.zero_grad()
        with cx.backend(backend):
            out = cc(x)
        (x - out.recon).float().norm(dim=-1).mean().backward()
        results[backend] = (out.codes.indices.clone(), [p.grad.float().clone() for p in cc.parameters()])
    assert torch.equal(results[name][0], results["reference"][0])
    for got, expected in zip(results[name][1], results["reference"][1]):
        # bf16 gradients from different fp32 summation orders: a few bf16 ulps of the gradient's scale
        torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_batch_topk_beyond_32bit_flat_offsets(name):
    # B * F = 4.8e9 > 2^32 flat positions. Scores are small integers (exact ties everywhere) with a planted set
    # of 7s in the last rows, whose flat offsets all exceed 2^32: the top K must be every 7, then the first 3s
    # in flat order (the tie rule), and nothing else. About 15 GB of GPU memory.
    B, F, K = 65536, 73728, 1 << 20
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng(5))))
    f = torch.randint(0, 4, (B, F), device="cuda", dtype=torch.uint8, generator=g).to(torch.bfloat16)
    tail = f[-8:]
    planted = torch.randperm(tail.numel(), device="cuda", generator=g)[:5000]
    tail.view(-1)[planted] = 7.0
    assert (B - 8) * F > 2**32
    w = torch.ones(F, device="cuda")
    with cx.backend(name):
        values, indices, row_ptr, min_score = ops.batch_topk(f, w, K)
    assert values.shape == (K,) and row_ptr[-1].item() == K and float(min_score) == 3.0
    rows = torch.repeat_interleave(torch.arange(B, device="cuda"), row_ptr[1:] - row_ptr[:-1])
    flat = rows * F + indices.long()
    assert bool((flat[1:] > flat[:-1]).all()), "entries must be in CSR order"
    sevens = values == 7
    assert int(sevens.sum()) == 5000
    expected_sevens = torch.sort(planted.long() + (B - 8) * F).values
    assert torch.equal(flat[sevens], expected_sevens)
    threes = flat[~sevens]
    assert bool((values[~sevens] == 3).all())
    last = int(threes[-1])  # every 3 up to the last selected one is selected (lower flat index first)
    prefix = f.view(-1)[: last + 1]
    assert int((prefix == 3).sum()) == threes.numel()
