"""Bad inputs to the ops raise clear errors naming the argument, on every backend and through torch.ops."""

import pytest
import torch

import crossdiff_ext as cx
from crossdiff_ext import ops

OPS = torch.ops.crossdiff


def good():
    B, M, d, F = 4, 2, 3, 5
    x, W, b = torch.randn(B, M, d), torch.randn(F, M, d), torch.randn(F)
    f, w = torch.rand(B, F), torch.rand(F)
    values, indices, row_ptr, _ = ops.batch_topk_reference(f, w, 6)
    return dict(x=x, W=W, b=b, f=f, w=w, values=values, indices=indices, row_ptr=row_ptr, bias=torch.randn(M, d))


def bad_calls():
    t = good()
    x, W, b, f, w = t["x"], t["W"], t["b"], t["f"], t["w"]
    v, i, r, bias = t["values"], t["indices"], t["row_ptr"], t["bias"]
    return [
        ("paired_encode", (x[0], W, b), "x must have shape"),
        ("paired_encode", (x, W[:, :1], b), "M and d"),
        ("paired_encode", (x, W, b[:-1]), "b_enc must have F"),
        ("paired_encode", (x.double(), W.double(), b.double()), "float32, float16 or bfloat16"),
        ("paired_encode", (x, W.half(), b), "same dtype"),
        ("batch_topk", (f, w, 0), r"K = k \* B must be in \[1, B \* F\]"),
        ("batch_topk", (f, w, f.numel() + 1), r"K = k \* B must be in \[1, B \* F\]"),
        ("batch_topk", (f, w[:-1], 3), "w must have F"),
        ("batch_topk", (f, w.half(), 3), "w .decoder-norm weights. must be float32"),
        ("batch_topk", (f[0], w, 3), "f must have shape"),
        ("threshold_select", (f, w, -1.0), "theta must be >= 0"),
        ("sparse_decode", (v, i[:-1], r, W, bias), "same length"),
        ("sparse_decode", (v, i.float(), r, W, bias), "indices must be int32 or int64"),
        ("sparse_decode", (v, i, r.int(), W, bias), "row_ptr must be int64"),
        ("sparse_decode", (v, i, r, W, bias[:1]), "bias must be"),
        ("sparse_decode", (v.half(), i, r, W, bias), "same dtype"),
        ("sparse_values_grad", (x[:2], i, r, W), "grad_out must have B"),
        ("latent_order", (i, r, 0), "n_latents must be >= 1"),
        ("sparse_weight_grad", (v, x, r, r, r), "perm and rows must have nnz"),
        # Codes without rows (B = 0, nnz > 0): the GPU kernels would read row 0 of an empty batch.
        ("sparse_decode", (v, i, r[:1], W, bias), r"B = 0 rows"),
        ("sparse_values_grad", (x[:0], i, r[:1], W), r"B = 0 rows"),
        ("latent_order", (i, r[:1], 5), r"B = 0 rows"),
        (
            "sparse_weight_grad",
            (
                v,
                x[:0],
                torch.zeros(6, dtype=torch.int64),
                torch.arange(v.shape[0]),
                torch.zeros(v.shape[0], dtype=torch.int64),
            ),
            r"B = 0 rows",
        ),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op,args,match", bad_calls(), ids=lambda p: p if isinstance(p, str) else "")
def test_python_entry_points_reject_bad_inputs(backend, op, args, match):
    with cx.backend(backend), pytest.raises(ValueError, match=match):
        getattr(ops, op)(*args)


def test_decode_sparse_rejects_an_order_of_other_codes():
    # decode_sparse reuses a latent order for its weight gradient: one of other codes would give a wrong gradient
    t = good()
    v, i, r, W = t["values"], t["indices"], t["row_ptr"], t["W"]
    order = ops.latent_order_reference(i, r, W.shape[0])
    for bad, match in (
        (order[:2], r"order must be \(col_ptr, perm, rows\)"),
        ((order[0][:-1], *order[1:]), "latent order of these codes"),
        ((order[0], order[1][:-1], order[2]), "latent order of these codes"),
        ((order[0], order[1].int(), order[2]), "order's perm must be int64"),
    ):
        with pytest.raises(cx.InputError, match=match):
            ops.decode_sparse(v, i, r, W, None, bad)
    ops.decode_sparse(v, i, r, W, None, order)  # the right order passes


@pytest.mark.parametrize("op,args,match", bad_calls(), ids=lambda p: p if isinstance(p, str) else "")
def test_cpp_entry_points_reject_bad_inputs(op, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(OPS, op)(*args)


def test_cpp_kernels_check_index_ranges():
    t = good()
    bad = t["indices"].clone()
    bad[2] = 5  # F = 5: out of range
    with pytest.raises(RuntimeError, match=r"indices\[2\] = 5 is out of range"):
        OPS.sparse_decode(t["values"], bad, t["row_ptr"], t["W"], None)
    with pytest.raises(RuntimeError, match="row_ptr must start at 0 and end at nnz"):
        OPS.sparse_decode(t["values"], t["indices"], t["row_ptr"] + 1, t["W"], None)


def test_cpp_kernels_refuse_row_pointers_that_leave_the_codes():
    # A row_ptr that starts at 0 and ends at nnz but overshoots in between would send loops past the arrays.
    t = good()
    W, values, indices = t["W"], t["values"], t["indices"]
    bad = torch.tensor([0, 1000, 2, 3, 6])
    dense = torch.randn(4, *W.shape[1:])
    calls = [
        lambda r: OPS.sparse_decode(values, indices, r, W, None),
        lambda r: OPS.sparse_values_grad(dense, indices, r, W),
        lambda r: OPS.latent_order(indices, r, W.shape[0]),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="row_ptr must be non-decreasing"):
            call(bad)
    order = list(OPS.latent_order(indices, t["row_ptr"], W.shape[0]))
    order[0] = torch.tensor([0, 1000, 2, 3, 4, 6])
    with pytest.raises(RuntimeError, match="col_ptr must be non-decreasing"):
        OPS.sparse_weight_grad(values, dense, *order)


def test_meta_tensors_mixed_with_real_ones_are_rejected():
    # The dispatcher sends a call with any meta tensor to the fake kernel, which must not return garbage.
    t = good()
    with pytest.raises(ValueError, match="must be on the same device"):
        OPS.sparse_decode(t["values"], t["indices"], t["row_ptr"].to("meta"), t["W"], None)
    with pytest.raises(ValueError, match="must be on the same device"):
        OPS.paired_encode(t["x"], t["W"].to("meta"), t["b"])


@pytest.mark.parametrize(
    "op,make_args,match",
    [
        ("paired_encode", lambda t: (t["x"], t["W"].to("meta"), t["b"]), "x and W_enc must be on the same device"),
        ("batch_topk", lambda t: (t["f"], t["w"].to("meta"), 3), "w must be on cpu"),
        (
            "sparse_decode",
            lambda t: (t["values"], t["indices"], t["row_ptr"], t["W"].to("meta"), None),
            "values and W must be on the same device",
        ),
    ],
)
def test_mismatched_devices_are_rejected(op, make_args, match):
    with pytest.raises(ValueError, match=match):
        getattr(ops, op)(*make_args(good()))
