"""The Triton kernels at the launch geometry a GPU uses, checked where they run (under the interpreter on a CPU).

The interpreter normally takes larger entry steps, few programs and one small encoder tile (triton/_launch.py,
triton/encode.py): the constants a GPU runs with would otherwise never execute before the first GPU run. Here the
GPU's entry step (16), many programs for the streaming kernels (an odd count, so chunks split rows unevenly) and
an encoder config with GROUP_B=8 whose last band of row tiles is partial are forced, and every op is compared
with its reference.
"""

import pytest
import torch
from conftest import backend_device, close, grid_tensor, rng

import crossdiff_ext as cx
from crossdiff_ext import ops

pytestmark = pytest.mark.skipif("triton" not in cx.available_backends(), reason="triton backend not available")


@pytest.fixture
def gpu_geometry(monkeypatch):
    from crossdiff_ext.triton import _launch

    monkeypatch.setattr(_launch, "ENTRY_BLOCK", 16)
    monkeypatch.setattr(_launch, "target_programs", lambda device: 37)


def run(fn, *args):
    with cx.backend("triton"):
        return fn(*args)


def test_selection_at_gpu_geometry(gpu_geometry, poison):
    device, g = backend_device("triton"), rng(41)
    B, F, k = 29, 300, 7
    f = torch.relu(torch.randn(B, F, generator=g)).to(device)
    f[3, :40] = 0.5  # a block of equal scores across tiles and chunks
    w = (torch.rand(F, generator=g) + 0.25).to(device)
    w[:40] = 1.0
    for K in (k * B, 1, B * F):
        got = run(ops.batch_topk, f, w, K)
        for a, e in zip(got, ops.batch_topk_reference(f.cpu(), w.cpu(), K)):
            torch.testing.assert_close(a.cpu(), e, rtol=0, atol=0)
    theta = float((f.float() * w).flatten().quantile(0.9))
    got = run(ops.threshold_select, f, w, theta)
    for a, e in zip(got, ops.threshold_select_reference(f.cpu(), w.cpu(), theta)):
        torch.testing.assert_close(a.cpu(), e, rtol=0, atol=0)


def test_sparse_ops_at_gpu_geometry(gpu_geometry, poison):
    # Grid-valued inputs: every product and sum is exact in fp32, so the kernels must agree bit for bit.
    device, g = backend_device("triton"), rng(43)
    B, M, d, F, k = 23, 2, 40, 97, 19  # 19 entries per row: one full step of 16 and a partial one
    scores = torch.rand(B, F, generator=g)
    values, indices, row_ptr, _ = ops.batch_topk_reference(scores, torch.ones(F), k * B)
    values = grid_tensor(values.shape, -8, 8, 4, torch.float32, generator=g).to(device)
    indices, row_ptr = indices.to(device), row_ptr.to(device)
    W = grid_tensor((F, M, d), -8, 8, 8, torch.float32, generator=g).to(device)
    bias = grid_tensor((M, d), -8, 8, 8, torch.float32, generator=g).to(device)
    grad = grid_tensor((B, M, d), -8, 8, 8, torch.float32, generator=g).to(device)
    cpu = lambda *ts: [t.cpu() for t in ts]

    exact = lambda a, e: torch.testing.assert_close(a.cpu(), e, rtol=0, atol=0)
    exact(
        run(ops.sparse_decode, values, indices, row_ptr, W, bias),
        ops.sparse_decode_reference(*cpu(values, indices, row_ptr, W, bias)),
    )
    exact(
        run(ops.sparse_values_grad, grad, indices, row_ptr, W),
        ops.sparse_values_grad_reference(*cpu(grad, indices, row_ptr, W)),
    )
    order = run(ops.latent_order, indices, row_ptr, F)
    for a, e in zip(order, ops.latent_order_reference(*cpu(indices, row_ptr), F)):
        exact(a, e)
    for a, e in zip(
        run(ops.sparse_weight_grad, values, grad, *order), ops.sparse_weight_grad_reference(*cpu(values, grad, *order))
    ):
        exact(a, e)


def test_encoder_with_gpu_grouping(monkeypatch):
    from crossdiff_ext.triton import encode

    monkeypatch.setenv(encode.PIN_ENV, "16,32,32,8,1,4")  # BLOCK_B, BLOCK_F, BLOCK_K, GROUP_B, stages, warps
    device, g = backend_device("triton"), rng(47)
    B, M, d, F = 16 * 9 + 5, 2, 24, 70  # 10 row tiles: one full band of 8 and a band of 2; a partial F tile
    x = torch.randn(B, M, d, generator=g).to(device)
    W = torch.randn(F, M, d, generator=g).to(device) / d**0.5
    b = torch.randn(F, generator=g).to(device)
    close(run(ops.paired_encode, x, W, b), ops.paired_encode_reference(x.cpu(), W.cpu(), b.cpu()))
    # Per-model slices of a wider buffer (the non-flat K loop) at the same grouping.
    wide = torch.randn(B, M, d + 5, generator=g).to(device)
    x2 = wide[:, :, 2 : 2 + d]
    close(run(ops.paired_encode, x2, W, b), ops.paired_encode_reference(x2.cpu(), W.cpu(), b.cpu()))
    # Half inputs load through tensor descriptors where the encoder uses them (tiles past B and F read as zeros).
    xh, Wh, bh = x.half(), W.half(), b.half()
    if device == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9:
        assert encode.descriptors(xh, Wh) is not None
    close(run(ops.paired_encode, xh, Wh, bh), ops.paired_encode_reference(xh.cpu(), Wh.cpu(), bh.cpu()))


def test_encoder_pin_setting_is_checked_before_launch(monkeypatch):
    from crossdiff_ext.triton import encode

    g = rng(53)
    x, W, b = torch.randn(5, 2, 8, generator=g), torch.randn(7, 2, 8, generator=g), torch.randn(7, generator=g)
    device = backend_device("triton")
    x, W, b = x.to(device), W.to(device), b.to(device)
    for bad in ("16,32", "16,32,32,8,1,3", "8,32,32,8,1,4", "a,b,c,d,e,f"):
        monkeypatch.setenv(encode.PIN_ENV, bad)
        with pytest.raises(cx.InputError, match=encode.PIN_ENV):
            run(ops.paired_encode, x, W, b)
    monkeypatch.setenv(encode.PIN_ENV, "first")
    assert encode.pinned_config(ieee=True) is encode.FP32_CONFIGS[0]
    assert encode.pinned_config(ieee=False) is encode.HALF_CONFIGS[0]
    close(run(ops.paired_encode, x, W, b), ops.paired_encode_reference(x.cpu(), W.cpu(), b.cpu()))


def test_encoder_autotune_key_buckets_the_batch():
    # A new batch size in the same octave must not tune again: the key holds the bucket, never B itself.
    from crossdiff_ext.triton import encode

    assert "B_BUCKET" in encode._encode_autotuned.keys and "B" not in encode._encode_autotuned.keys
    assert [encode.batch_bucket(B) for B in (0, 1, 3000, 4096, 4097)] == [1, 1, 4096, 4096, 8192]
