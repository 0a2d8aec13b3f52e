"""torch.library.opcheck on every crossdiff op: schema, fake kernel, autograd registration, AOT dispatch."""

import pytest
import torch
from conftest import backend_device, backend_params, dtypes_for

from crossdiff_ext import ops

# The CPU and CUDA kernels implement the crossdiff ops; the Triton launchers are ops of their own namespace.
NAMESPACES = {"cpu": torch.ops.crossdiff, "cuda": torch.ops.crossdiff, "triton": torch.ops.crossdiff_triton}


def samples(OPS, device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    B, M, d, F = 6, 2, 5, 13
    rg = dict(requires_grad=requires_grad)
    x = torch.randn(B, M, d, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    W = torch.randn(F, M, d, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    b = torch.randn(F, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    bias = torch.randn(M, d, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    f = torch.relu(torch.randn(B, F, generator=g)).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    pre = torch.randn(B, F, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    w = (torch.rand(F, generator=g) + 0.5).to(device)
    values, indices, row_ptr, _ = ops.batch_topk_reference(f.detach(), w, 3 * B)
    values = (values.detach() + 0.5).requires_grad_(requires_grad)
    dense = torch.randn(B, M, d, generator=g).to(device=device, dtype=dtype)
    order = ops.latent_order_reference(indices, row_ptr, F)
    del rg
    return {
        OPS.paired_encode: [(x, W, b), (x, W, b, False)],
        OPS.batch_topk: [(f, w, 3 * B), (f, w, 1), (f, w, B * F), (pre, w, 3 * B, True)],
        OPS.threshold_select: [(f, w, 0.0), (f, w, 0.7), (pre, w, 0.2, True)],
        OPS.sparse_decode: [(values, indices, row_ptr, W, bias), (values, indices, row_ptr, W, None)],
        OPS.sparse_values_grad: [(dense, indices, row_ptr, W.detach())],
        OPS.latent_order: [(indices, row_ptr, F), (indices.long(), row_ptr, F)],
        OPS.sparse_weight_grad: [(values.detach(), dense, *order)],
    }


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op(name, requires_grad, dtype):
    if dtype not in dtypes_for(name):
        pytest.skip(f"{name} does not run {dtype} here")
    OPS = NAMESPACES[name]
    device = backend_device(name)
    table = samples(OPS, device, dtype, requires_grad)
    assert set(table) == {getattr(OPS, n) for n in OPS}, "every declared op needs opcheck samples"
    for op, cases in table.items():
        for args in cases:
            torch.library.opcheck(op, args)
