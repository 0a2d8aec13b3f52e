"""The paths of the Triton batch_topk, each forced and compared bit for bit with batch_topk_reference.

The kernel's final state says which path ran: mode STAGED after one level over f (the usual case), STAGED after
extra levels (the boundary bin held more than the staging capacity), or TIES (more entries at or above one exact
boundary key than the capacity). CROSSDIFF_TOPK_STAGE_CAP shrinks the capacity so that small inputs take the
rarer paths. Interpreted (no GPU) the whole file took 39-45 s on a 2-core machine shared with other jobs
(`pytest --durations=5 python_tests/triton/test_triton_select_paths.py`).
"""

import pytest
import torch
from conftest import backend_device, dtypes_for, grid_tensor, plant_specials, rng

import crossdiff_ext as cx
from crossdiff_ext import errors, ops

DEVICE = backend_device("triton")
# On a GPU machine these run compiled on the GPU: marked gpu there, so the GPU session's op tests (-m gpu) take them.
pytestmark = [pytest.mark.skipif("triton" not in cx.available_backends(), reason="triton backend not available")] + (
    [pytest.mark.gpu] if DEVICE == "cuda" else []
)
DTYPES = dtypes_for("triton")
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture
def select():
    from crossdiff_ext.triton import select

    return select


@pytest.fixture
def cap(monkeypatch, select):
    """cap(n): the staging capacity of the following launches is n entries (None: the default)."""

    def set_cap(n):
        if n is None:
            monkeypatch.delenv(select.CAP_ENV, raising=False)
        else:
            monkeypatch.setenv(select.CAP_ENV, str(n))

    return set_cap


def identical(got, expected):
    """Same dtypes, shapes and bits (NaN payloads and the sign of zero included)."""
    names = ("values", "indices", "row_ptr", "min_score")
    for name, g, e in zip(names, got, expected):
        g = g.cpu()
        assert g.dtype == e.dtype and g.shape == e.shape, (
            f"{name}: {g.dtype} {tuple(g.shape)} != {e.dtype} {tuple(e.shape)}"
        )
        if g.is_floating_point():
            g, e = g.view(BITS[g.dtype]), e.view(BITS[e.dtype])
        assert torch.equal(g, e), f"{name}: {g.tolist()[:40]} != {e.tolist()[:40]}"


def run(select, f, w, K, mode=None, levels=None, relu=False):
    """The Triton batch_topk against the reference; checks the path its state reports. relu: f holds
    pre-activations, compared with the reference on ReLU(f)."""
    *got, state = select.batch_topk_with_state(f.to(DEVICE), w.to(DEVICE), K, relu)
    identical(got, ops.batch_topk_reference(torch.relu(f) if relu else f, w, K))
    if mode is not None:
        assert int(state[select.MODE]) == mode, f"mode {int(state[select.MODE])}, expected {mode}"
    if levels is not None:
        assert levels(int(state[select.LEVELS])), f"{int(state[select.LEVELS])} levels over f"
    return got


def relu_scores(B, F, g, scale=1.0):
    return torch.relu(torch.randn(B, F, generator=g)) * scale, torch.rand(F, generator=g) + 0.25


@pytest.mark.parametrize(
    "B,F,Ks",
    [
        (1, 1, (1,)),  # one entry
        (1, 37, (1, 5)),  # one row
        (6, 2500, (240, 15000)),  # two slabs of 2048 latents, the second partial; K = B * F
        (29, 45, (29,)),  # K = B
    ],
)
def test_usual_case_is_one_level_then_staged(select, B, F, Ks, poison):
    g = rng(B * 7919 + F)
    for dtype in DTYPES:
        f, w = relu_scores(B, F, g)
        for K in Ks:
            run(select, f.to(dtype), w, K, mode=select.STAGED, levels=lambda n: n == 1)


def test_through_the_op_at_gpu_geometry(select, monkeypatch, poison):
    # Many programs (an odd count: row chunks of unequal size) over several slabs: the tiles reserve staging
    # slots out of flat order, which the ordered write must undo. Short steps over a tile's staged entries: the
    # positions and tie ranks carry from step to step, here through a block of ties at the boundary.
    from crossdiff_ext.triton import _launch

    monkeypatch.setattr(_launch, "target_programs", lambda device: 37)
    monkeypatch.setattr(_launch, "TILE_STEP", 16)
    g = rng(5)
    f, w = relu_scores(13, 4100, g)
    f[3, 2040:2100], w[2040:2100] = 2.5, 1.0  # 60 equal scores across the first two slabs of row 3
    n_above = int((f * w > 2.5).sum())
    for K in (13 * 30, n_above + 45, 7):
        with cx.backend("triton"):
            got = ops.batch_topk(f.to(DEVICE), w.to(DEVICE), K)
        identical(got, ops.batch_topk_reference(f, w, K))


def test_ties_at_the_boundary_are_staged(select, poison):
    # Few distinct scores: the boundary key is shared by many entries, which fit in the staging buffer.
    g = rng(11)
    B, F = 17, 61
    for dtype in DTYPES:
        f = grid_tensor((B, F), 0, 3, 2, dtype, generator=g)
        for K in (1, 100, B * F - 1):
            run(select, f, torch.ones(F), K, mode=select.STAGED, levels=lambda n: n == 1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 under the interpreter
def test_specials_and_negative_weights(select, poison):
    # NaN (ranks highest, keeps f), +-inf, -0 == +0, negative scores (kept with value 0), inf * 0 = NaN.
    g = rng(13)
    B, F = 9, 50
    for dtype in DTYPES:
        f = plant_specials(torch.randn(B, F, generator=g), g, nan=6, inf=6, neg_inf=6, neg_zero=12, zero=10)
        w = torch.randn(F, generator=g)
        w[3], w[7] = 0.0, -0.0  # inf * 0: NaN scores
        f = f.to(dtype)
        for K in (3, B * F // 2, B * F - 3):
            run(select, f, w, K, mode=select.STAGED)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 under the interpreter
def test_preactivations_on_every_path(select, cap, poison):
    # relu: the kernels ReLU the pre-activations as they read them; a negative pre-activation times a negative
    # weight must not rank as a positive score. The zeros of the ReLU tie at the boundary when K exceeds the
    # positive scores: staged by default, the ties path under a small capacity.
    g = rng(14)
    B, F = 9, 61
    for dtype in DTYPES:
        pre = plant_specials(torch.randn(B, F, generator=g), g, nan=2, neg_inf=2, neg_zero=2)
        pre, w = pre.to(dtype), torch.randn(F, generator=g)
        n_positive = int((torch.relu(pre).float() * w > 0).sum())
        for K in (4, n_positive + 20):
            cap(None)
            run(select, pre, w, K, mode=select.STAGED, relu=True)
        cap(10)
        run(select, pre, w, n_positive + 20, mode=select.TIES, relu=True)
        run(select, pre, w, 4, mode=select.STAGED, levels=lambda n: n >= 1, relu=True)


def test_zero_f(select, cap, poison):
    f, w = torch.zeros(7, 33), torch.rand(33, generator=rng(17)) - 0.5
    for K in (1, 100, 7 * 33):
        run(select, f, w, K, mode=select.STAGED, levels=lambda n: n == 1)
    cap(50)  # every score is the same key: more ties than the capacity
    for K in (1, 100, 7 * 33):
        run(select, f, w, K, mode=select.TIES)


def test_all_equal_scores_take_the_ties_path(select, cap, poison):
    cap(20)
    g = rng(19)
    for dtype in DTYPES:
        B, F = 11, 70
        f = torch.full((B, F), 1.5, dtype=dtype)
        for K in (19, B * F):
            run(select, f, torch.ones(F), K, mode=select.TIES, levels=lambda n: n >= 2)
        # a few larger scores, then a tie block at the boundary larger than the capacity
        f = torch.full((B, F), 0.75)
        f.view(-1)[torch.randperm(B * F, generator=g)[:12]] = torch.rand(12, generator=g) + 1.0
        for K in (12, 13, 200):
            mode = select.STAGED if K <= 12 else select.TIES
            run(select, f.to(dtype), torch.ones(F), K, mode=mode)


def distinct_scores(B, F, g):
    """A third zeros, the rest distinct multiples of 1/64 (exact in fp16): no exact ties among positive scores."""
    perm = torch.randperm(B * F, generator=g).float() - B * F // 3
    return (perm.clamp(min=0) / 64).view(B, F)


@pytest.mark.parametrize("scale", [1.0, 1e-9, 1e7])  # inside level 0's window, below it, above it
def test_a_small_cap_forces_extra_levels(select, cap, scale, poison):
    g = rng(23)
    B, F = 19, 83
    for dtype in DTYPES:
        f, w = distinct_scores(B, F, g).to(dtype), torch.full((F,), scale)
        for K in (7, 150):
            cap(K + 3)
            run(select, f, w, K, mode=select.STAGED, levels=lambda n: n >= 2)


def test_narrow_scores_need_every_level(select, cap, poison):
    # Distinct scores within 2^-12 of each other, all in one level-0 bin: the staged candidates need every level.
    B, F = 23, 57
    f = (1.0 + torch.randperm(B * F, generator=rng(29)).float() * 2.0**-23).view(B, F)
    for K in (3, 500):
        cap(None)
        run(select, f, torch.ones(F), K, mode=select.STAGED, levels=lambda n: n == 1)
        cap(K + 2)
        run(select, f, torch.ones(F), K, mode=select.STAGED, levels=lambda n: n >= 3)


def test_stage_cap_setting(select, monkeypatch):
    assert select.stage_cap(10) == 10 + 2**16 and select.stage_cap(10**6) == 2 * 10**6
    monkeypatch.setenv(select.CAP_ENV, "7")
    assert select.stage_cap(10**6) == 7
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(select.CAP_ENV, bad)
        with pytest.raises(errors.InputError, match=select.CAP_ENV):
            select.stage_cap(5)


def test_topk_plan_reads_f_twice(select):
    plan = select.topk_plan(B=4096, F=65536, K=4096 * 64, dtype_bytes=2, device_programs=8 * 132)
    assert sum(p["passes_over_f"] for p in plan) == 2
    f_bytes = 4096 * 65536 * 2
    assert sum(p["bytes_read"] for p in plan) < 2.2 * f_bytes
    level0 = next(p for p in plan if p["name"] == "_level_kernel")
    slab, n_slabs, rows_per_chunk, row_chunks = select._slab_grid(4096, 65536, 8 * 132)
    assert level0["grid"] == (n_slabs, row_chunks) and n_slabs * slab == 65536
