"""batch_topk and threshold_select: every kernel backend against the reference, exactly (same f, same w)."""

import math

import pytest
import torch
from conftest import backend_device, backend_params, dtypes_for, grid_tensor, plant_specials, rng

import crossdiff_ext as cx
from crossdiff_ext import ops

SHAPES = [  # (B, F, k): odd sizes, a single entry, every entry, large k
    (1, 1, 1),
    (7, 37, 3),
    (33, 129, 9),
    (5, 3, 3),
    (64, 250, 17),
    (3, 1031, 400),
]


def relu_scores(B, F, dtype, device, generator):
    f = torch.relu(torch.randn(B, F, generator=generator)).to(dtype=dtype, device=device)
    w = (torch.rand(F, generator=generator) + 0.25).to(device)
    return f, w


def assert_same_selection(got, expected, equal_nan=False):
    names = ("values", "indices", "row_ptr", "min_score")
    for name, g, e in zip(names, got, expected):
        assert g.dtype == e.dtype, f"{name}: dtype {g.dtype} != {e.dtype}"
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(g.cpu(), e.cpu(), rtol=0, atol=0, equal_nan=equal_nan, msg=lambda m: f"{name}: {m}")


def assert_csr_invariants(values, indices, row_ptr, B, F, nnz):
    assert row_ptr[0] == 0 and row_ptr[-1] == nnz and values.shape[0] == nnz
    assert bool((row_ptr[1:] >= row_ptr[:-1]).all())
    assert bool(((indices >= 0) & (indices < F)).all())
    rows = torch.repeat_interleave(torch.arange(B), (row_ptr[1:] - row_ptr[:-1]).cpu())
    flat = rows * F + indices.cpu().long()
    assert bool((flat[1:] > flat[:-1]).all()), "entries must be in CSR order without duplicates"


def run(name, fn, *args):
    with cx.backend(name):
        return fn(*args)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,F,k", SHAPES)
def test_batch_topk_matches_reference(name, B, F, k, poison):
    device = backend_device(name)
    g = rng(B * 1000 + F)
    for dtype in dtypes_for(name):
        f, w = relu_scores(B, F, dtype, device, g)
        K = min(k * B, B * F)
        got = run(name, ops.batch_topk, f, w, K)
        assert_same_selection(got, ops.batch_topk_reference(f.cpu(), w.cpu(), K))
        assert_csr_invariants(*got[:3], B, F, K)


@pytest.mark.parametrize("name", backend_params())
def test_batch_topk_ties_at_the_boundary(name, poison):
    # Few distinct scores and w = 1: the boundary value is shared by many entries, the lower flat index wins.
    device = backend_device(name)
    g = rng(1)
    for dtype in dtypes_for(name):
        B, F = 19, 23
        f = grid_tensor((B, F), 0, 3, 2, dtype, device, g)
        w = torch.ones(F, device=device)
        for K in (1, 7, 40, 150, B * F - 1):
            got = run(name, ops.batch_topk, f, w, K)
            assert_same_selection(got, ops.batch_topk_reference(f.cpu(), w.cpu(), K))


@pytest.mark.parametrize("name", backend_params())
def test_batch_topk_negative_zero_ties_with_zero(name, poison):
    device = backend_device(name)
    f = torch.tensor([[0.0, -0.0, 1.0], [-0.0, 2.0, 0.0]], device=device)
    w = torch.ones(3, device=device)
    got = run(name, ops.batch_topk, f, w, 4)
    assert_same_selection(got, ops.batch_topk_reference(f.cpu(), w.cpu(), 4))
    # 1.0 and 2.0, then the two zeros with the lowest flat indices (0 and 1, one of them -0.0)
    assert got[1].tolist() == [0, 1, 2, 1] and got[2].tolist() == [0, 3, 4]
    # A negative product that underflows to -0 (-1e-30 * 1e-20) ties with +0 too: a kernel that computed the
    # score as fma(f, w, +0) would keep its sign and rank it below every zero.
    f = torch.tensor([[0.0, 1.0, 0.0], [-1e-30, 0.0, 3.0]], device=device)
    w = torch.tensor([1e-20, 1.0, 1.0], device=device)
    for K in (4, 5):
        got = run(name, ops.batch_topk, f, w, K)
        assert_same_selection(got, ops.batch_topk_reference(f.cpu(), w.cpu(), K))
    assert got[1].tolist() == [0, 1, 2, 0, 2]  # 3 and 1, then the zeros at flat 0, 2 and the -0 at flat 3


@pytest.mark.parametrize("name", backend_params())
def test_batch_topk_rows_keep_zero_or_many(name, poison):
    device = backend_device(name)
    g = rng(2)
    B, F, k = 9, 57, 12
    f = torch.relu(torch.randn(B, F, generator=g))
    f[0] = 0.0  # a row with no positive score
    f[3] *= 100.0  # a row that takes most of the batch's budget
    f[5, :] = torch.rand(F, generator=g) + 1e4  # a row that keeps every latent
    f, w = f.to(device), (torch.rand(F, generator=g) + 0.5).to(device)
    values, indices, row_ptr, min_score = run(name, ops.batch_topk, f, w, k * B)
    counts = (row_ptr[1:] - row_ptr[:-1]).tolist()
    assert counts[0] == 0 and counts[5] == F and counts[3] > k
    assert_same_selection((values, indices, row_ptr, min_score), ops.batch_topk_reference(f.cpu(), w.cpu(), k * B))


@pytest.mark.parametrize("name", backend_params())
def test_batch_topk_fewer_positive_than_k(name, poison):
    # Only 5 positive scores for K = 12: the rest are zeros carried with value 0, and w = 0 zeroes a positive f.
    device = backend_device(name)
    f = torch.zeros(4, 6)
    f[0, 1], f[1, 4], f[2, 0], f[3, 5], f[3, 2], f[2, 3] = 3.0, 1.0, 2.0, 0.5, 4.0, 7.0
    w = torch.ones(6)
    w[3] = 0.0  # f[2, 3] > 0 but its score is 0: kept only as a tie, with value 0
    f, w = f.to(device), w.to(device)
    values, indices, row_ptr, min_score = run(name, ops.batch_topk, f, w, 12)
    assert int((values != 0).sum()) == 5
    assert float(min_score) == 0.5
    assert_same_selection((values, indices, row_ptr, min_score), ops.batch_topk_reference(f.cpu(), w.cpu(), 12))
    none = run(name, ops.batch_topk, torch.zeros_like(f), w, 3)
    assert math.isinf(float(none[3])) and not bool(none[0].any())


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,F,k", SHAPES)
def test_threshold_select_matches_reference(name, B, F, k, poison):
    device = backend_device(name)
    g = rng(B + 7 * F)
    for dtype in dtypes_for(name):
        f, w = relu_scores(B, F, dtype, device, g)
        s = f.float() * w
        for theta in (0.0, float(s.flatten().quantile(0.8)) if s.numel() > 1 else 0.0, float(s.max()) + 1.0):
            got = run(name, ops.threshold_select, f, w, theta)
            expected = ops.threshold_select_reference(f.cpu(), w.cpu(), theta)
            assert_same_selection(got, expected)
            assert_csr_invariants(*got, B, F, expected[0].shape[0])


@pytest.mark.parametrize("name", backend_params())
def test_threshold_is_compared_in_fp32(name, poison):
    # A theta above fp32's largest value rounds to inf, like the scores: an inf score is not above it.
    device = backend_device(name)
    f = torch.tensor([[math.inf, 3e38, 1.0, 0.0]], device=device)
    w = torch.ones(4, device=device)
    for theta, kept in ((6e38, []), (3.2e38, [0]), (0.5, [0, 1, 2])):
        got = run(name, ops.threshold_select, f, w, theta)
        expected = ops.threshold_select_reference(f.cpu(), w.cpu(), theta)
        assert_same_selection(got, expected)
        assert got[1].cpu().tolist() == kept


@pytest.mark.parametrize("name", backend_params())
def test_selection_gradients_reach_kept_entries_only(name):
    device = backend_device(name)
    g = rng(3)
    f0, w = relu_scores(11, 29, torch.float32, device, g)
    w[4] = 0.0  # latent 4 scores 0 wherever f > 0: batch top-k keeps it only as a tie, with value 0
    f0[0, 4] = 1.5  # flat index 4: among the first zero-score ties, so it is kept
    n_positive = int((f0 * w > 0).sum())
    for op, arg in ((ops.batch_topk, n_positive + 30), (ops.threshold_select, 0.3)):
        grads = []
        for backend in (name, "reference"):
            f = f0.clone().requires_grad_(True)
            with cx.backend(backend):
                values, indices, row_ptr = op(f, w, arg)[:3]
            weight = torch.linspace(0.5, 2.0, values.shape[0], device=device)
            (values * weight).sum().backward()
            grads.append(f.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
        if op is ops.batch_topk:  # the test means something only if a positive f of latent 4 was kept
            rows = torch.repeat_interleave(torch.arange(11), (row_ptr[1:] - row_ptr[:-1]).cpu())
            kept_rows = rows[indices.cpu() == 4]
            assert bool((f0.cpu()[kept_rows, 4] > 0).any())
        assert not bool(grads[0][:, 4].any())
        assert bool(grads[0].any())


def preactivations(B, F, dtype, g):
    """Pre-activations with every special value, and weights of both signs with zeros: a negative f times a
    negative w is a positive product, so ReLU must come before the multiply."""
    pre = plant_specials(torch.randn(B, F, generator=g), g, nan=3, inf=3, neg_inf=3, neg_zero=6)
    w = torch.randn(F, generator=g)
    w[: max(1, F // 10)] = 0.0
    return pre.to(dtype), w


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,F,k", SHAPES[1:])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 under the interpreter
def test_selection_over_preactivations_is_selection_over_their_relu(name, B, F, k, poison):
    device = backend_device(name)
    g = rng(B * 31 + F)
    for dtype in dtypes_for(name):
        pre, w = preactivations(B, F, dtype, g)
        f = torch.relu(pre)
        for K in sorted({1, min(k * B, B * F), B * F}):
            got = run(name, ops.batch_topk, pre.to(device), w.to(device), K, True)
            assert_same_selection(got, ops.batch_topk_reference(f, w, K), equal_nan=True)
        for theta in (0.0, 0.5):
            got = run(name, ops.threshold_select, pre.to(device), w.to(device), theta, True)
            assert_same_selection(got, ops.threshold_select_reference(f, w, theta), equal_nan=True)


@pytest.mark.parametrize("name", backend_params())
def test_selection_over_preactivations_gradients(name):
    # The gradient w.r.t. the pre-activations is ReLU's: the kept values' gradient where pre > 0, else 0.
    device = backend_device(name)
    g = rng(41)
    pre0, w = torch.randn(11, 29, generator=g).to(device), (torch.rand(29, generator=g) - 0.3).to(device)
    for op, arg in ((ops.batch_topk, 120), (ops.threshold_select, 0.2)):
        grads = []
        for backend, relu in ((name, True), ("reference", False)):
            pre = pre0.clone().requires_grad_(True)
            with cx.backend(backend):
                values = op(pre if relu else torch.relu(pre), w, arg, relu)[0]
            (values * torch.linspace(0.5, 2.0, values.shape[0], device=device)).sum().backward()
            grads.append(pre.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
        assert bool(grads[0].any()) and not bool(grads[0][pre0 <= 0].any())


def test_relu_must_be_a_bool():
    f, w = torch.rand(2, 3), torch.rand(3)
    with pytest.raises(cx.errors.InputError, match="relu must be a bool"):
        ops.batch_topk(f, w, 2, relu=1)
    with pytest.raises(cx.errors.InputError, match="relu must be a bool"):
        ops.paired_encode(torch.rand(2, 2, 3), torch.rand(4, 2, 3), torch.rand(4), relu="no")


def test_backend_kernels_have_been_compared():
    # The CPU kernels are always built: the comparisons above must never be vacuous on a CPU-only machine.
    assert "cpu" in cx.available_backends()


def large_scores(kind, B, F, g):
    """[B, F] scores that drive the radix select through each of its paths (N = B * F > 65536 candidates)."""
    if kind == "relu":  # one histogram pass narrows the boundary to a small 12-bit bin
        return torch.relu(torch.randn(B, F, generator=g)), torch.rand(F, generator=g) + 0.5
    if kind == "narrow":  # every score in one 12-bit bin: the second and third digits must split it
        return 1.0 + torch.rand(B, F, generator=g) * 1e-3, torch.ones(F)
    if kind == "ties":  # few distinct values: the boundary key is exact and shared by many entries
        return torch.randint(0, 4, (B, F), generator=g).float(), torch.ones(F)
    if kind == "few_positive":  # fewer positive scores than K: the boundary is the zero key
        f = torch.zeros(B, F)
        f.view(-1)[torch.randperm(B * F, generator=g)[:1000]] = torch.rand(1000, generator=g) + 0.1
        return f, torch.rand(F, generator=g) + 0.5
    raise ValueError(kind)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("kind", ["relu", "narrow", "ties", "few_positive"])
def test_batch_topk_large_inputs_take_every_radix_path(name, kind, poison):
    device = backend_device(name)
    g = rng(17)
    interpreted = name == "triton" and device == "cpu"
    # The interpreter is slow; its kernels take every radix pass whatever N is, so a smaller batch covers them.
    B, F = (33, 1031) if interpreted else (257, 1031)
    f, w = large_scores(kind, B, F, g)
    for dtype in dtypes_for(name):
        fd = f.to(dtype)
        for K in (5 * B, 97 * B):
            expected = ops.batch_topk_reference(fd, w, K)
            for threads in (1,) if interpreted else (1, 2, 3):  # CPU chunking follows the thread count
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    got = run(name, ops.batch_topk, fd.to(device), w.to(device), K)
                finally:
                    torch.set_num_threads(previous)
                assert_same_selection(got, expected)


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,F", [(0, 37), (4, 0), (0, 0)])
def test_threshold_select_of_an_empty_batch(name, B, F, poison):
    device = backend_device(name)
    f, w = torch.rand(B, F, device=device), torch.rand(F, device=device) + 0.5
    got = run(name, ops.threshold_select, f, w, 0.0)
    assert_same_selection(got, ops.threshold_select_reference(f.cpu(), w.cpu(), 0.0))
