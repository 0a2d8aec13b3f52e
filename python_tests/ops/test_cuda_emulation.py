"""The CUDA batch_topk's algorithm on the CPU: crossdiff_emulated::batch_topk runs the kernels of
csrc/cuda/select.cu phase by phase through the same functions (csrc/select_phases.h) and the same launch geometry,
thread by thread, and must equal the reference exactly. Its trace tells which path ran: (passes over f, final
mode, levels resolved, entries staged, elements per 16-byte load, blocks of an f pass). The real kernels are
compared on a GPU (the `gpu` tests here and in test_ops_select.py).

The emulator is serial; every case is small: `pytest python_tests/ops/test_cuda_emulation.py` took 2.5-7 s on
a shared 2-core CPU machine.
"""

import math

import pytest
import torch
from conftest import grid_tensor, plant_specials, rng

import crossdiff_ext  # noqa: F401  (loads the extension, which registers the emulator)
from crossdiff_ext import ops

STAGED, TIES = 1, 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def emulate(f, w, K, cap=-1, sms=132, order=0, relu=False):
    return torch.ops.crossdiff_emulated.batch_topk(f, w, K, cap, sms, order, relu)


def assert_matches_reference(got, f, w, K):
    expected = ops.batch_topk_reference(f, w, K)
    for name, g, e in zip(("values", "indices", "row_ptr", "min_score"), got[:4], expected):
        assert g.dtype == e.dtype, f"{name}: dtype {g.dtype} != {e.dtype}"
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def relu_scores(B, F, dtype, g):
    f = torch.relu(torch.randn(B, F, generator=g)).to(dtype)
    return f, torch.rand(F, generator=g) + 0.25


SHAPES = [  # (B, F, K): F off the slab (256 x 4 fp32, 256 x 8 half), a single row / latent / entry, K = B * F
    (1, 1, 1),
    (1, 37, 5),
    (9, 1, 4),
    (5, 3, 15),
    (33, 129, 297),
    (3, 1031, 1200),
    (6, 2056, 300),
]


@pytest.mark.parametrize("B,F,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_topk_matches_reference(B, F, K, dtype):
    g = rng(B * 7919 + F)
    f, w = relu_scores(B, F, dtype, g)
    for sms in (1, 3, 132):  # one, a few and many row blocks per slab
        got = emulate(f, w, K, sms=sms)
        assert_matches_reference(got, f, w, K)
        # The default capacity takes every small input in one level: f is read twice.
        assert got[4][:2].tolist() == [2, STAGED]


def test_emulated_topk_uses_the_launch_geometry():
    g = rng(11)
    f, w = relu_scores(6, 2056, torch.float16, g)
    assert emulate(f, w, 50)[4][4] == 8  # 16-byte loads of 8 halves
    assert emulate(f, w, 50, sms=1)[4][5] == 2 * 2  # 2 slabs x 2 row blocks of 3 rows (4 blocks per SM)
    # f or w off 16-byte alignment: scalar loads, same selection
    flat = torch.cat([torch.zeros(1, dtype=f.dtype), f.flatten()])
    f_odd = flat[1:].view(6, 2056)
    w_odd = torch.cat([torch.zeros(1), w])[1:]
    for fa, wa, vec in ((f_odd, w, 1), (f, w_odd, 8)):
        got = emulate(fa, wa, 50, sms=1)
        assert got[4][4] == vec
        assert_matches_reference(got, fa, wa, 50)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_topk_ties_at_the_boundary(dtype):
    # Few distinct scores (w = 1): the boundary key is shared by many entries; the lower flat index wins.
    g = rng(1)
    B, F = 19, 23
    f = grid_tensor((B, F), 0, 3, 2, dtype, "cpu", g)
    w = torch.ones(F)
    for K in (1, 7, 40, 150, B * F - 1, B * F):
        for cap in (-1, K, 0):  # staged; staged or ties; ties
            got = emulate(f, w, K, cap=cap, sms=2)
            assert_matches_reference(got, f, w, K)
            if cap == 0:
                assert got[4][1] == TIES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_topk_special_values(dtype):
    # NaN ranks highest and keeps its f, inf * 0 is NaN, -inf and negative scores carry 0, -0 ties with +0,
    # an underflowed negative product is -0.
    g = rng(2)
    B, F = 7, 41
    f = torch.randn(B, F, generator=g)
    picks = torch.randperm(B * F, generator=g)[:40]
    specials = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-30, -1e-30, 3e38, 1e-40]
    f.view(-1)[picks] = torch.tensor(specials * 5)[:40]
    f = f.to(dtype)
    w = torch.rand(F, generator=g) + 0.5
    w[3], w[5], w[8] = 0.0, 1e-20, -2.0
    for K in (1, 5, 60, B * F // 2, B * F):
        for cap in (-1, 0):
            assert_matches_reference(emulate(f, w, K, cap=cap, sms=1), f, w, K)


def test_emulated_topk_all_equal_scores_take_the_ties_path():
    B, F = 11, 300
    w = torch.ones(F)
    for dtype in DTYPES:
        f = torch.full((B, F), 0.75, dtype=dtype)
        for K in (1, 17, B * F // 2, B * F):
            got = emulate(f, w, K, cap=B * F - 1, sms=2)
            assert_matches_reference(got, f, w, K)
            passes, mode, levels = got[4][:3].tolist()
            assert mode == TIES
            # K = B * F takes the level-0 bin whole (count + write follow it); otherwise every level runs to the
            # exact key first.
            assert (passes, levels) == ((3, 1) if K == B * F else (5, 3))


def test_emulated_topk_zero_f():
    B, F = 8, 200
    f = torch.zeros(B, F)
    w = torch.rand(F, generator=rng(3)) + 0.5
    for K in (1, 100, B * F):
        for cap in (-1, 10):
            got = emulate(f, w, K, cap=cap, sms=3)
            assert_matches_reference(got, f, w, K)
            assert not bool(got[0].any()) and math.isinf(float(got[3]))
            assert got[4][1] == (STAGED if cap == -1 else TIES)


def test_emulated_topk_extra_level_when_the_boundary_bin_overflows():
    # Every score in [1, 1.2), inside one 11-bit bin of level 0: a capacity below B * F sends the search to level 1
    # over f, whose bins are fine enough for the entries with key >= lo to fit: three passes over f. bfloat16
    # has 26 values below 1.2, so its level-1 bin holds about B * F / 26 entries.
    g = rng(4)
    B, F, K = 12, 333, 50
    w = torch.ones(F)
    for dtype, cap in ((torch.float32, 3 * K), (torch.bfloat16, K + 300)):
        f = (1.0 + torch.rand(B, F, generator=g) * 0.2).to(dtype)
        got = emulate(f, w, K, cap=cap, sms=2)
        assert_matches_reference(got, f, w, K)
        passes, mode, levels, staged = got[4][:4].tolist()
        assert (passes, mode) == (3, STAGED) and levels >= 2 and K <= staged <= cap
        default = emulate(f, w, K, sms=2)
        assert_matches_reference(default, f, w, K)
        assert default[4][:2].tolist() == [2, STAGED] and default[4][2] >= 2  # staged levels resolve the rest


def test_emulated_topk_negative_weights():
    g = rng(5)
    B, F = 10, 97
    f, w = relu_scores(B, F, torch.float32, g)
    w = w * torch.where(torch.rand(F, generator=g) < 0.5, -1.0, 1.0)
    n_positive = int((f * w > 0).sum())
    for K in (max(1, n_positive // 2), n_positive, n_positive + 40, B * F):
        for cap in (-1, K):
            assert_matches_reference(emulate(f, w, K, cap=cap, sms=2), f, w, K)


def test_emulated_topk_does_not_depend_on_the_reservation_order():
    # Blocks run in grid order, reversed and shuffled: the tiles reserve staging slots in other orders, and the
    # output, read through the tile table in flat order, stays the same.
    g = rng(6)
    B, F, K = 40, 700, 900
    f, w = relu_scores(B, F, torch.float16, g)
    runs = [emulate(f, w, K, sms=3, order=order) for order in (0, 1, 2, 12345)]
    assert runs[0][4][1] == STAGED and runs[0][4][5] > 1
    for got in runs:
        assert_matches_reference(got, f, w, K)
        for a, b in zip(got, runs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_topk_over_preactivations(dtype):
    # relu: the kernels read pre-activations and ReLU them as they load f; every path (one level, extra levels,
    # ties) and every reservation order must select exactly what the reference selects on ReLU(pre). Negative
    # weights make a negative pre-activation's raw product positive.
    g = rng(8)
    B, F = 13, 530
    pre = plant_specials(torch.randn(B, F, generator=g), g, nan=4, neg_inf=4, neg_zero=12).to(dtype)
    w = torch.randn(F, generator=g)
    f = torch.relu(pre)
    n_positive = int((f.float() * w > 0).sum())
    for K in (5, n_positive - 3, n_positive + 50, B * F):
        for cap in (-1, K + 2, 0):
            for order in (0, 2):
                got = emulate(pre, w, K, cap=cap, sms=2, order=order, relu=True)
                assert_matches_reference(got, f, w, K)
    modes = {int(emulate(pre, w, K, cap=cap, sms=2, relu=True)[4][1]) for K in (5, B * F) for cap in (-1, 0)}
    assert modes == {STAGED, TIES}


def test_emulated_topk_checks_its_arguments():
    f, w = torch.ones(2, 3), torch.ones(3)
    with pytest.raises(RuntimeError, match="K = k \\* B must be in"):
        emulate(f, w, 7)
    with pytest.raises(RuntimeError, match="sms must be >= 1"):
        emulate(f, w, 2, sms=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cap", [None, "0", "60"])
def test_cuda_topk_paths_match_the_emulator(cap, monkeypatch):
    # The real kernels, with the staging capacity forced small (CROSSDIFF_CUDA_TOPK_CAP) to take the extra-level
    # and ties paths, against the emulator and the reference.
    import crossdiff_ext as cx

    if cap is not None:
        monkeypatch.setenv("CROSSDIFF_CUDA_TOPK_CAP", cap)
    g = rng(7)
    cases = [
        relu_scores(33, 2056, torch.bfloat16, g),
        (torch.full((9, 300), 0.5), torch.ones(300)),
        (1.0 + torch.rand(12, 333, generator=g) * 1e-3, torch.ones(333)),
    ]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for f, w in cases:
        for K in (1, 40, f.numel() // 3, f.numel()):
            for relu in (False, True):
                pre = f - 0.25 if relu else f  # pre-activations: the kernels ReLU them as they load f
                with cx.backend("cuda"):
                    got = ops.batch_topk(pre.cuda(), w.cuda(), K, relu)
                emulated = emulate(pre, w, K, cap=-1 if cap is None else int(cap), sms=sms, relu=relu)
                for a, b in zip(got, emulated[:4]):
                    torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)
                assert_matches_reference(emulated, torch.relu(pre), w, K)
