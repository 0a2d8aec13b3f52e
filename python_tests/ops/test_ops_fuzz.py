"""Property-based fuzzing of every op against its reference, on every kernel backend under test (the CPU kernels,
and the Triton kernels, interpreted without a GPU).

Hypothesis draws the sizes (0 and 1 where the op accepts them, sizes that are no multiple of any block size), the
kind of values and a seed from which torch draws the tensors. Value kinds:
  - "grid": k / denominator for small integers k, times a power of two: a huge, a unit or a tiny scale (products
    in the denormal range). Products and sums of these are exact in fp32, so every backend must agree with the
    reference bit for bit, in any summation order.
  - "normal": Gaussians, compared with the suite's per-dtype tolerances.
  - "ties": few distinct values; "narrow": every score in a narrow band (deep radix passes).
  - specials: NaN, +inf, -inf, -0, +0 (and, where no sum is taken, denormals) put at random places.
The NaN / Inf policy of each entry point (docs/backends.md) is checked here: the kernels follow the reference,
NaN positions included.

The examples are a function of the suite's seed alone (CROSSDIFF_TEST_SEED, printed in the pytest header; no
example database): a failure prints the falsifying example, and the same seed replays it.
"""

import math
import os

import pytest
import torch
from conftest import SEED, TOLERANCES, backend_device, backend_params, dtypes_for
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import crossdiff_ext as cx
from crossdiff_ext import ops

# Examples per op and backend. The interpreter takes 0.1-0.6 s an example (several launches each), so it gets fewer,
# and smaller sizes. The whole file took 15-50 s (`pytest --durations=0 python_tests/ops/test_ops_fuzz.py`) on the
# 2-core CI machine, depending on the other jobs sharing it. CROSSDIFF_FUZZ_EXAMPLES multiplies every budget, for a
# longer local search.
EXAMPLES = {
    "compiled": dict(paired_encode=40, batch_topk=40, threshold_select=40, sparse_decode=40, sparse_backward=40),
    "interpreted": dict(paired_encode=8, batch_topk=4, threshold_select=6, sparse_decode=10, sparse_backward=5),
}
SCALE = float(os.environ.get("CROSSDIFF_FUZZ_EXAMPLES", "1"))

# CROSSDIFF_FUZZ_NO_SHRINK=1 reports a failing example as drawn: on a GPU every shrinking step can be a new shape,
# so a new Triton compile, which a short GPU session cannot afford.
NO_SHRINK = os.environ.get("CROSSDIFF_FUZZ_NO_SHRINK") == "1"
settings.register_profile(
    "crossdiff-fuzz",
    phases=[Phase.explicit, Phase.reuse, Phase.generate] if NO_SHRINK else list(Phase),
    deadline=None,
    database=None,  # the examples depend on the seed alone, never on earlier runs
    print_blob=True,
    # the poison fixture is set once per test, not per example, which is what it is for here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("crossdiff-fuzz")


def budget(name, op):
    return max(1, int(EXAMPLES["interpreted" if interpreted(name) else "compiled"][op] * SCALE))


def fuzz(name, op, **strategies):
    """Decorator: a property of the examples `strategies` draw, run with the budget of `op` on backend `name` and
    the suite's seed."""

    def wrap(fn):
        return seed(SEED)(settings(PROFILE, max_examples=budget(name, op))(given(**strategies)(fn)))

    return wrap


SPECIALS = (math.nan, math.inf, -math.inf, -0.0, 0.0)
# Exponents of the grid scales per dtype: (first operand, second operand). "huge" keeps every fp32 partial sum
# below 2^127 (no order-dependent overflow) but overflows fp16 outputs; "tiny" puts fp32 products in the denormal
# range (multiples of 2^-145 or coarser, so still exact) and fp16 inputs among fp16 denormals.
GRID_EXPONENTS = {
    torch.float32: {"huge": (54, 54), "unit": (0, 0), "tiny": (-70, -70)},
    torch.float16: {"huge": (7, 7), "unit": (0, 0), "tiny": (-12, -12)},
}
GRID_EXPONENTS[torch.bfloat16] = GRID_EXPONENTS[torch.float32]  # fp32's range, fewer mantissa bits
DENORMAL = {torch.float32: 2.0**-140, torch.float16: 2.0**-20, torch.bfloat16: 2.0**-130}


def interpreted(name):
    return name == "triton" and backend_device(name) == "cpu"


def size(upper, special=(0, 1)):
    """A size in [0, upper] that is 0, 1, a power of two plus or minus one, or anything."""
    odd = [n for p in (16, 32, 64, 128) for n in (p - 1, p + 1) if n <= upper]
    return st.one_of(st.sampled_from(list(special) + odd), st.integers(min(special), upper))


def grid(shape, exponent, denominator, g, dtype, device, low=-8, high=8):
    k = torch.randint(low, high + 1, shape, generator=g)
    return (k.double() / denominator * 2.0**exponent).to(dtype).to(device)


def sprinkle(t, fraction, g, values=SPECIALS):
    """Put `values` at about `fraction` of the places of `t` (in place)."""
    if t.numel() == 0 or fraction == 0:
        return t
    where = torch.rand(t.shape, generator=g) < fraction
    pick = torch.randint(0, len(values), t.shape, generator=g)
    special = torch.tensor(values, dtype=torch.float64)[pick].to(t.dtype)
    t.copy_(torch.where(where.to(t.device), special.to(t.device), t))
    return t


def compare(got, expected, exact, dtype, scale=1.0, what=""):
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if exact:
        tol = dict(rtol=0, atol=0)
    else:
        tol = dict(rtol=TOLERANCES[dtype]["rtol"], atol=TOLERANCES[dtype]["atol"] * scale)
    torch.testing.assert_close(got.cpu(), expected.cpu(), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def run(name, fn, *args):
    with cx.backend(name):
        return fn(*args)


@st.composite
def dense_case(draw, name, max_rows, max_cols):
    """Sizes, dtype, value kind, scale, specials and a tensor seed for the dense ops."""
    interp = interpreted(name)
    return dict(
        dtype=draw(st.sampled_from(dtypes_for(name))),
        B=draw(size(20 if interp else max_rows)),
        M=draw(st.integers(1, 3)),
        d=draw(size(24 if interp else 70)),
        F=draw(size(40 if interp else max_cols)),
        kind=draw(st.sampled_from(["grid", "grid", "normal"])),
        scale=draw(st.sampled_from(["huge", "unit", "unit", "tiny"])),
        specials=draw(st.sampled_from([0.0, 0.0, 0.02, 0.3])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("name", backend_params())
def test_fuzz_paired_encode(name, poison):
    device = backend_device(name)

    @fuzz(name, "paired_encode", case=dense_case(name, 40, 140))
    def check(case):
        g = torch.Generator().manual_seed(case["seed"])
        B, M, d, F, dtype = case["B"], case["M"], case["d"], case["F"], case["dtype"]
        exact = case["kind"] == "grid"
        if exact:
            ex, ew = GRID_EXPONENTS[dtype][case["scale"]]
            x = grid((B, M, d + 3), ex, 2, g, dtype, device)
            W = grid((F, M, d), ew, 16, g, dtype, device)
            b = grid((F,), ex + ew, 8, g, dtype, device)
        else:
            x = torch.randn(B, M, d + 3, generator=g).to(dtype).to(device)
            W = (torch.randn(F, M, d, generator=g) / math.sqrt(max(1, M * d))).to(dtype).to(device)
            b = torch.randn(F, generator=g).to(dtype).to(device)
        # the model stride is larger than d when strided: x is read in place, not copied
        x = x[:, :, :d] if case["strided"] else x[:, :, :d].contiguous()
        for t in (x, W, b):
            sprinkle(t, case["specials"], g)
        f = run(name, ops.paired_encode, x, W, b)
        expected = ops.paired_encode_reference(x.contiguous().cpu(), W.cpu(), b.cpu())
        compare(f, expected, exact, dtype, scale=4.0, what="f")
        if not case["specials"]:
            assert not bool(f.isnan().any())  # NaN only from NaN inputs (or inf - inf)

    check()


@st.composite
def selection_case(draw, name, smallest):
    """Scores of every kind, weights, K and theta; B and F are at least `smallest`."""
    interp = interpreted(name)
    B = draw(size(12 if interp else 80, special=(smallest, 1, 2)))
    F = draw(size(40 if interp else 1100, special=(smallest, 1, 2)))
    N = max(1, B * F)  # K is drawn only where B * F >= 1 (batch_topk)
    return dict(
        dtype=draw(st.sampled_from(dtypes_for(name))),
        B=B,
        F=F,
        kind=draw(st.sampled_from(["relu", "ties", "narrow", "signed", "tiny", "huge"])),
        w_kind=draw(st.sampled_from(["positive", "ones", "with_zeros", "signed"])),
        specials=draw(st.sampled_from([0.0, 0.0, 0.01, 0.2])),
        denormals=draw(st.sampled_from([0.0, 0.1])),
        # K: 1, all, k * B for a small k, or anything
        K=draw(st.one_of(st.sampled_from([1, N]), st.integers(1, 4).map(lambda k: max(1, min(k * B, N))))),
        K_any=draw(st.integers(1, N)),
        any_K=draw(st.booleans()),
        theta=draw(st.sampled_from(["zero", "quantile", "above_max", "inf", "denormal"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def selection_inputs(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    B, F, dtype, kind = case["B"], case["F"], case["dtype"], case["kind"]
    if kind == "relu":
        f = torch.relu(torch.randn(B, F, generator=g))
    elif kind == "ties":
        f = torch.randint(0, 4, (B, F), generator=g).double() / 2
    elif kind == "narrow":
        f = 1.0 + torch.rand(B, F, generator=g) * 1e-2
    elif kind == "signed":
        f = torch.randn(B, F, generator=g)
    elif kind == "tiny":  # scores among the fp32 denormals, and underflowing to +-0
        f = torch.randn(B, F, generator=g) * (2.0**-60 if dtype != torch.float16 else 2.0**-14)
    else:  # huge: products that overflow fp32 to inf (fp16 inputs: their largest values)
        f = torch.relu(torch.randn(B, F, generator=g)) * (2.0**127 if dtype != torch.float16 else 2.0**14)
    f = f.to(dtype)
    w_kind = case["w_kind"]
    if w_kind == "ones":
        w = torch.ones(F)
    elif w_kind == "positive":
        w = torch.rand(F, generator=g) + 0.25
    elif w_kind == "with_zeros":
        w = (torch.rand(F, generator=g) + 0.25) * (torch.rand(F, generator=g) > 0.3)
    else:
        w = torch.randn(F, generator=g)
    if kind == "tiny":  # fp32 denormal products
        w = w * (2.0**-80 if dtype != torch.float16 else 2.0**-120)
    sprinkle(f, case["denormals"], g, values=(DENORMAL[dtype], -DENORMAL[dtype]))
    sprinkle(f, case["specials"], g)
    sprinkle(w, case["specials"] / 2, g)
    return f.to(device), w.float().to(device)


def assert_csr(values, indices, row_ptr, B, F):
    nnz = values.shape[0]
    assert row_ptr.shape == (B + 1,) and int(row_ptr[0]) == 0 and int(row_ptr[-1]) == nnz
    assert bool((row_ptr.diff() >= 0).all())
    if nnz:
        assert bool(((indices >= 0) & (indices < F)).all())
        rows = torch.repeat_interleave(torch.arange(B), row_ptr.diff().cpu())
        flat = rows * F + indices.cpu().long()
        assert bool((flat.diff() > 0).all()), "entries must be in CSR order without duplicates"


def assert_same(got, expected, names):
    for name, g, e in zip(names, got, expected):
        compare(g, e, True, e.dtype, what=name)


@pytest.mark.parametrize("name", backend_params())
def test_fuzz_batch_topk(name, poison):
    device = backend_device(name)

    @fuzz(name, "batch_topk", case=selection_case(name, smallest=1))
    def check(case):
        f, w = selection_inputs(case, device)
        K = case["K_any"] if case["any_K"] else case["K"]
        got = run(name, ops.batch_topk, f, w, K)
        expected = ops.batch_topk_reference(f.cpu(), w.cpu(), K)
        assert_same(got, expected, ("values", "indices", "row_ptr", "min_score"))
        assert_csr(*got[:3], case["B"], case["F"])
        # the NaN policy: NaN scores rank highest (all kept, up to K) and keep their f
        s = (f.float() * w).cpu()
        rows = torch.repeat_interleave(torch.arange(case["B"]), got[2].diff().cpu())
        cols = got[1].cpu().long()
        kept = s[rows, cols].isnan()
        assert int(kept.sum()) == min(int(s.isnan().sum()), K)
        compare(got[0].cpu()[kept], f.cpu()[rows, cols][kept], True, f.dtype, what="values of NaN scores")

    check()


@pytest.mark.parametrize("name", backend_params())
def test_fuzz_threshold_select(name, poison):
    device = backend_device(name)

    @fuzz(name, "threshold_select", case=selection_case(name, smallest=0))
    def check(case):
        f, w = selection_inputs(case, device)
        s = (f.float() * w).cpu()
        finite = s[s.isfinite()]
        theta = {
            "zero": 0.0,
            "quantile": float(finite.abs().quantile(0.7)) if finite.numel() else 0.0,
            "above_max": float(finite.abs().max()) * 2 if finite.numel() else 1.0,
            "inf": math.inf,
            "denormal": 2.0**-140,
        }[case["theta"]]
        got = run(name, ops.threshold_select, f, w, theta)
        expected = ops.threshold_select_reference(f.cpu(), w.cpu(), theta)
        assert_same(got, expected, ("values", "indices", "row_ptr"))
        assert_csr(*got, case["B"], case["F"])
        assert got[0].shape[0] == int(((s > theta) | s.isnan()).sum())  # NaN scores are always selected

    check()


@pytest.mark.parametrize("name", backend_params())
def test_batch_topk_rejects_an_empty_selection(name):
    # K = k * B must be in [1, B * F]: k = 0, B = 0 or F = 0 is an argument error on every backend, not a crash
    device = backend_device(name)
    refused = 0
    for B in range(4):
        for F in range(4):
            for k in range(3):
                if 1 <= k * B <= B * F:
                    continue
                f, w = torch.rand(B, F, device=device), torch.rand(F, device=device)
                with pytest.raises(ValueError, match=r"K = k \* B must be in \[1, B \* F\]"):
                    run(name, ops.batch_topk, f, w, k * B)
                refused += 1
    assert refused == 33
    # latent_order needs latents (F = 0 is a dictionary without any)
    with pytest.raises(ValueError, match="n_latents must be >= 1"):
        run(
            name,
            ops.latent_order,
            torch.zeros(0, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int64, device=device),
            0,
        )


@st.composite
def sparse_case(draw, name, smallest_F=0):
    interp = interpreted(name)
    return dict(
        dtype=draw(st.sampled_from(dtypes_for(name))),
        B=draw(size(16 if interp else 70)),
        M=draw(st.integers(1, 3)),
        d=draw(size(17 if interp else 70)),
        F=draw(size(40 if interp else 300, special=(smallest_F, 1, 2))),
        density=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        empty_rows=draw(st.booleans()),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        bias=draw(st.booleans()),
        kind=draw(st.sampled_from(["grid", "grid", "normal"])),
        scale=draw(st.sampled_from(["huge", "unit", "unit", "tiny"])),
        specials=draw(st.sampled_from([0.0, 0.0, 0.02, 0.2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def sparse_inputs(case, device):
    """CSR codes (rows sorted by latent, some empty rows), a dictionary W [F, M, d], a dense [B, M, d], a bias."""
    g = torch.Generator().manual_seed(case["seed"])
    B, M, d, F, dtype = case["B"], case["M"], case["d"], case["F"], case["dtype"]
    mask = torch.rand(B, F, generator=g) < case["density"]
    if case["empty_rows"] and B:
        mask[torch.rand(B, generator=g) < 0.3] = False
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    nnz = cols.shape[0]
    exact = case["kind"] == "grid"
    if exact:
        ev, ew = GRID_EXPONENTS[dtype][case["scale"]]
        values = grid((nnz,), ev, 4, g, dtype, "cpu")
        W = grid((F, M, d), ew, 8, g, dtype, "cpu")
        dense = grid((B, M, d), ev, 8, g, dtype, "cpu")
        bias = grid((M, d), ev + ew, 4, g, dtype, "cpu")
    else:
        values = torch.randn(nnz, generator=g).to(dtype)
        W = torch.randn(F, M, d, generator=g).to(dtype)
        dense = torch.randn(B, M, d, generator=g).to(dtype)
        bias = torch.randn(M, d, generator=g).to(dtype)
    for t in (values, W, dense, bias):
        sprinkle(t, case["specials"], g)
    indices = cols.to(case["index_dtype"])
    moved = [t.to(device) for t in (values, indices, row_ptr, W, dense, bias)]
    return (*moved[:5], moved[5] if case["bias"] else None, exact)


@pytest.mark.parametrize("name", backend_params())
def test_fuzz_sparse_decode(name, poison):
    device = backend_device(name)

    @fuzz(name, "sparse_decode", case=sparse_case(name))
    def check(case):
        values, indices, row_ptr, W, _, bias, exact = sparse_inputs(case, device)
        got = run(name, ops.sparse_decode, values, indices, row_ptr, W, bias)
        cpu_bias = None if bias is None else bias.cpu()
        expected = ops.sparse_decode_reference(values.cpu(), indices.cpu(), row_ptr.cpu(), W.cpu(), cpu_bias)
        compare(got, expected, exact, case["dtype"], scale=8.0, what="out")

    check()


@pytest.mark.parametrize("name", backend_params())
def test_fuzz_sparse_backward_ops(name, poison):
    # sparse_values_grad, latent_order and sparse_weight_grad, each against its reference
    device = backend_device(name)

    @fuzz(name, "sparse_backward", case=sparse_case(name, smallest_F=1))
    def check(case):
        values, indices, row_ptr, W, dense, _, exact = sparse_inputs(case, device)
        F, dtype = case["F"], case["dtype"]
        cpu = [t.cpu() for t in (values, indices, row_ptr, W, dense)]
        got = run(name, ops.sparse_values_grad, dense, indices, row_ptr, W)
        expected = ops.sparse_values_grad_reference(cpu[4], cpu[1], cpu[2], cpu[3])
        compare(got, expected, exact, dtype, scale=8.0, what="grad_values")
        order = run(name, ops.latent_order, indices, row_ptr, F)
        expected_order = ops.latent_order_reference(cpu[1], cpu[2], F)
        assert_same(order, expected_order, ("col_ptr", "perm", "rows"))
        grad_W, sums = run(name, ops.sparse_weight_grad, values, dense, *order)
        expected_W, expected_sums = ops.sparse_weight_grad_reference(cpu[0], cpu[4], *expected_order)
        compare(grad_W, expected_W, exact, dtype, scale=8.0, what="grad_W")
        compare(sums, expected_sums, exact, torch.float32, scale=8.0, what="value_sums")

    check()
