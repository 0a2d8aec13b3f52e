"""CrossCoder: every kernel backend against the reference backend, forward and all gradients; the threshold,
init, input checks, and the promise that no dense [B, F] tensor appears in the backward pass."""

import pytest
import torch
from conftest import backend_device, backend_params, close, dtypes_for, grid_tensor, rng
from torch.utils._python_dispatch import TorchDispatchMode

import crossdiff_ext as cx

CASES = [  # (B, M, d, F, k, activation)
    (7, 2, 13, 37, 3, "batch_topk"),
    (33, 3, 5, 129, 9, "batch_topk"),
    (16, 2, 24, 64, 64, "batch_topk"),  # k = F: every entry of the batch is kept
    (11, 2, 9, 50, None, "relu"),
    (6, 4, 7, 19, None, "relu"),
]


def make_crosscoder(B, M, d, F, k, activation, dtype, device, g):
    cc = cx.CrossCoder(d, F, M, k=k, activation=activation, dtype=dtype, device=device)
    with torch.no_grad():
        cc.W_enc.copy_(grid_tensor((F, M, d), -8, 8, 16, dtype, device, g))
        cc.b_enc.copy_(grid_tensor((F,), -8, 8, 8, dtype, device, g))
        cc.W_dec.copy_(grid_tensor((F, M, d), -8, 8, 16, dtype, device, g))
        cc.b_dec.copy_(grid_tensor((M, d), -8, 8, 8, dtype, device, g))
    x = grid_tensor((B, M, d), -4, 4, 2, dtype, device, g)
    return cc, x


def loss_fn(x, recon):
    return (x.float() - recon.float()).norm(dim=-1).mean()  # docs/math.md: unsquared L2, mean over rows, models


def l1_penalty(cc, codes):
    """docs/math.md's L1 term, mean_b sum_j f[b, j] w_j, from the codes: differentiable in the values and in W_dec."""
    w = torch.linalg.vector_norm(cc.W_dec, dim=2, dtype=torch.float32).sum(1)
    return (codes.values.float() * w[codes.indices.long()]).sum() / codes.n_rows


def step(cc, x, name):
    cc.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with cx.backend(name):
        out = cc(x)
    loss = loss_fn(x, out.recon)
    if cc.activation == "relu":
        loss = loss + 0.05 * l1_penalty(cc, out.codes)
    loss.backward()
    grads = {n: p.grad for n, p in cc.named_parameters()}
    grads["x"] = x.grad
    return out, loss, grads


# The ReLU crosscoder runs in both of its regimes: dense_code_density 0 forces dense, 1 forces sparse.
STEP_CASES = [case + (density,) for case in CASES for density in ((0.0, 1.0) if case[-1] == "relu" else (1.0,))]


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,M,d,F,k,activation,dense_code_density", STEP_CASES)
def test_training_step_matches_reference(name, B, M, d, F, k, activation, dense_code_density):
    device = backend_device(name)
    for dtype in dtypes_for(name):
        g = rng(B * F + M)
        cc, x = make_crosscoder(B, M, d, F, k, activation, dtype, device, g)
        cc.dense_code_density = dense_code_density
        out, loss, grads = step(cc, x, name)
        ref, ref_loss, ref_grads = step(cc, x, "reference")
        for part in ("indices", "row_ptr", "values"):
            torch.testing.assert_close(getattr(out.codes, part), getattr(ref.codes, part), rtol=0, atol=0)
        if activation == "batch_topk":
            assert out.codes.nnz == k * B
        close(out.recon, ref.recon, dtype, scale=8.0)
        close(loss, ref_loss, dtype)
        for n, expected in ref_grads.items():
            assert grads[n] is not None and grads[n].dtype == dtype, f"no gradient for {n}"
            assert bool(expected.abs().sum() > 0), f"reference gradient of {n} is all zero: weak test case"
            close(grads[n], expected, dtype, scale=8.0)


@pytest.mark.parametrize("name", backend_params())
def test_eval_mode_uses_the_threshold(name):
    device = backend_device(name)
    g = rng(4)
    cc, x = make_crosscoder(23, 2, 10, 41, 4, "batch_topk", torch.float32, device, g)
    cc.eval()
    with pytest.raises(RuntimeError, match="threshold is unset"):
        cc.encode(x)
    w = cc.decoder_norm_weights()
    with torch.no_grad():
        theta = float(torch.quantile(cx.ops.paired_encode_reference(x, cc.W_enc, cc.b_enc).float() * w, 0.9))
    cc.threshold.fill_(theta)
    with torch.no_grad(), cx.backend(name):
        codes = cc.encode(x)
        recon = cc(x).recon
    f = cx.ops.paired_encode_reference(x, cc.W_enc, cc.b_enc)
    expected = f * ((f.float() * w) > theta)
    torch.testing.assert_close(codes.to_dense(), expected, rtol=0, atol=0)
    close(recon, torch.einsum("bf,fmd->bmd", expected, cc.W_dec) + cc.b_dec, torch.float32, scale=4.0)
    with cx.backend(name):  # explicit batch top-k in eval mode
        assert cc.encode(x, use_threshold=False).nnz == 4 * 23


def test_threshold_tracks_min_selected_score_after_start_step():
    g = rng(9)
    cc = cx.CrossCoder(6, 20, 2, k=2, threshold_start_step=2, threshold_beta=0.9)
    expected, mins = -1.0, []
    for step in range(6):
        x = torch.randn(5, 2, 6, generator=g)
        out = cc(x)
        with torch.no_grad():
            s = cx.ops.selection_scores(
                cx.ops.paired_encode_reference(x, cc.W_enc, cc.b_enc), cc.decoder_norm_weights()
            )
            kept = s.flatten()[torch.sort(s.flatten(), descending=True, stable=True).indices[:10]]
        m = float(kept[kept > 0].min())
        assert float(out.min_score) == pytest.approx(m, rel=1e-6)
        if step > 2:  # the reference code's rule: start after threshold_start_step steps, first value = the min
            expected = m if expected < 0 else 0.9 * expected + 0.1 * m
        mins.append(m)
        assert float(cc.threshold) == pytest.approx(expected, rel=1e-5)
    assert int(cc.num_batches_tracked) == 6
    cc.eval()
    cc(torch.randn(5, 2, 6, generator=g))  # eval mode does not track
    assert int(cc.num_batches_tracked) == 6


def test_init_follows_spec():
    torch.manual_seed(0)
    cc = cx.CrossCoder(16, 40, 3, k=4)  # init="independent": every model's rows drawn on their own
    assert cc.init == "independent" and cc.config()["init"] == "independent"
    assert torch.equal(cc.W_enc, cc.W_dec)
    cos = torch.nn.functional.cosine_similarity(cc.W_enc[:, 0], cc.W_enc[:, 2], dim=1).detach()
    assert float(cos.abs().max()) < 0.99  # 40 independent pairs in 16 dims: none (anti)parallel
    torch.testing.assert_close(cc.W_dec.norm(dim=2), torch.ones(40, 3))
    assert cc.b_enc.abs().sum() == 0 and cc.b_dec.abs().sum() == 0 and float(cc.threshold) == -1.0
    torch.manual_seed(0)
    shared = cx.CrossCoder(16, 40, 3, k=4, init="shared")
    assert torch.equal(shared.W_enc[:, 0], shared.W_enc[:, 2]) and torch.equal(shared.W_enc, shared.W_dec)
    assert torch.equal(shared.W_enc[:, 1], cc.W_enc[:, 0])  # the same first draw, copied to every model
    for init in ("independent", "shared"):
        l1 = cx.CrossCoder(16, 40, 2, activation="relu", init=init)
        assert float(l1.W_enc.detach().abs().max()) <= (6 / 40) ** 0.5 and torch.equal(l1.W_enc, l1.W_dec)
        assert float(l1.W_enc.detach().norm(dim=2).min()) < 0.9  # L1 rows keep the Kaiming scale, not unit norm
    with pytest.raises(ValueError, match="init must be one of"):
        cx.CrossCoder(16, 40, 2, k=4, init="zeros")


def test_tuple_input_equals_stacked_input():
    g = rng(2)
    cc = cx.CrossCoder(8, 30, 2, k=3)
    base, chat = torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)
    a = cc.encode((base, chat))
    b = cc.encode(torch.stack((base, chat), dim=1))
    assert torch.equal(a.to_dense(), b.to_dense())


def test_tuple_of_slices_of_one_buffer_is_read_without_a_copy():
    from crossdiff_ext.layer.crosscoder import _stack_models

    g = rng(4)
    store = torch.randn(9, 2, 8, generator=g)
    padded = torch.randn(9, 2, 11, generator=g)[:, :, 2:10]  # model stride 11, not d
    for buf in (store, padded):
        parts = (buf[:, 0], buf[:, 1])
        view = _stack_models(parts)
        assert view.data_ptr() == buf.data_ptr() and torch.equal(view, buf)
    x = _stack_models((store[:, 1], store[:, 0]))  # models in reverse memory order: a copy, still right
    assert x.data_ptr() != store.data_ptr() and torch.equal(x, store.flip(1))
    separate = _stack_models((torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)))
    assert separate.shape == (9, 2, 8)
    cc = cx.CrossCoder(8, 30, 2, k=3)
    assert torch.equal(cc.encode((padded[:, 0], padded[:, 1])).to_dense(), cc.encode(padded.contiguous()).to_dense())


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("activation", ["batch_topk", "relu"])
def test_backward_allocates_no_dense_batch_by_latent_tensor(name, activation):
    # B * F = 64 * 500 is larger than any parameter (F * M * d = 500 * 2 * 8): a [B, F] tensor would show.
    # The ReLU crosscoder promises this in its sparse regime (codes no denser than dense_code_density).
    device = backend_device(name)
    B, F = 64, 500
    results = {}
    for backend in (name, "reference"):
        cc = cx.CrossCoder(
            8,
            F,
            2,
            k=5 if activation == "batch_topk" else None,
            activation=activation,
            device=device,
            dense_code_density=1.0,
        )
        x = torch.randn(B, 2, 8, device=device)
        with cx.backend(backend):
            loss = loss_fn(x, cc(x).recon)
        with _LargestAllocation() as probe:
            loss.backward()
        results[backend] = probe.largest
    assert results[name] < B * F, f"{name} backward allocated a tensor of {results[name]} elements"
    assert results["reference"] >= B * F  # the probe does see dense tensors


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("activation", ["batch_topk", "relu"])
def test_training_step_sorts_its_codes_by_latent_once(name, activation, monkeypatch):
    # Both weight gradients (W_enc through the kept values, W_dec through the decoder) reduce over one latent
    # order of the step's codes; sorting them twice would cost a second counting sort per step.
    device = backend_device(name)
    kernels = cx.backends.kernels(name)
    calls = []

    def counted(indices, row_ptr, n_latents, sort=kernels.latent_order):
        calls.append(indices.shape[0])
        return sort(indices, row_ptr, n_latents)

    monkeypatch.setattr(kernels, "latent_order", counted)
    k = 5 if activation == "batch_topk" else None
    cc, x = make_crosscoder(12, 2, 6, 40, k, activation, torch.float32, device, rng(11))
    cc.dense_code_density = 1.0  # the ReLU crosscoder's sparse regime
    out, _, grads = step(cc, x, name)
    assert calls == [out.codes.nnz]
    assert all(grads[n] is not None for n in ("W_enc", "b_enc", "W_dec", "x"))
    calls.clear()
    with torch.no_grad(), cx.backend(name):  # inference: no backward, no sort
        cc(x)
    assert calls == []


@pytest.mark.parametrize("name", backend_params())
def test_relu_regime_follows_the_batch_density(name):
    # About half of the codes are active at initialisation: dense above the threshold, sparse below it.
    device = backend_device(name)
    B, F = 64, 500
    largest = {}
    for density in (0.125, 0.9):
        cc = cx.CrossCoder(8, F, 2, activation="relu", device=device, dense_code_density=density)
        x = torch.randn(B, 2, 8, device=device)
        with cx.backend(name):
            out = cc(x)
        assert 0.125 < out.codes.nnz / (B * F) < 0.9
        with _LargestAllocation() as probe:
            loss_fn(x, out.recon).backward()
        largest[density] = probe.largest
    assert largest[0.125] >= B * F > largest[0.9]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=0, dict_size=8), "d_model"),
        (dict(d_model=4, dict_size=8, n_models=1, k=2), "n_models"),
        (dict(d_model=4, dict_size=8, k=0), "k must be"),
        (dict(d_model=4, dict_size=8, k=9), "k must be"),
        (dict(d_model=4, dict_size=8, k=None), "k must be"),
        (dict(d_model=4, dict_size=8, k=2, activation="relu"), "only used"),
        (dict(d_model=4, dict_size=8, k=2, activation="topk"), "activation"),
        (dict(d_model=4, dict_size=8, k=2, dtype=torch.int32), "dtype"),
        (dict(d_model=4, dict_size=8, activation="relu", dense_code_density=1.5), "dense_code_density"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cx.CrossCoder(**kwargs)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(5, 2, 4), r"\[B, M, d\] = \[B, 2, 6\]"),  # wrong d
        (torch.randn(5, 3, 6), r"\[B, M, d\] = \[B, 2, 6\]"),  # wrong M
        (torch.randn(5, 12), r"\[B, M, d\]"),  # wrong rank
        (torch.randn(0, 2, 6), "at least one row"),
        (torch.randn(5, 2, 6, dtype=torch.float64), "dtype"),
        (torch.randn(5, 2, 6, device="meta"), "device"),
        ((torch.randn(5, 6),), "one \\[B, d\\] tensor per model"),
        ("not a tensor", "must be a tensor"),
    ],
)
def test_forward_rejects_bad_inputs(x, match):
    cc = cx.CrossCoder(6, 10, 2, k=2)
    with pytest.raises(ValueError, match=match):
        cc(x)
