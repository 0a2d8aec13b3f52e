"""The training losses of docs/math.md ("Losses"): reconstruction, L1 penalty, the dead-latent auxiliary loss
(value and where its gradient goes), dead counters, geometric median."""

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext.layer.codes import SparseCodes
from crossdiff_ext.training import losses


def test_reconstruction_losses_by_hand():
    x = torch.zeros(2, 2, 2)
    recon = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    # row/model norms: 5, 0, 1, 0 -> mean 1.5; squares: 25, 0, 1, 0 -> mean 6.5
    assert float(losses.reconstruction_loss(x, recon)) == 1.5
    assert float(losses.reconstruction_loss(x, recon, "squared")) == 6.5
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        losses.reconstruction_loss(x, recon, "l1")


def test_l1_penalty_weights_by_decoder_norm():
    codes = SparseCodes(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([0, 2, 3]), 2, 3
    )
    w = torch.tensor([10.0, 100.0, 1000.0])
    assert float(losses.l1_penalty(codes, w)) == (1 * 10 + 2 * 1000 + 3 * 100) / 2


def test_l1_penalty_differentiates_the_decoder_norms():
    # The selection weights are detached; the penalty's are not: without the gradient through ||W_dec[j, m]|| the
    # L1 crosscoder could not shrink a decoder row (Complete Shrinkage), only its codes.
    cc = cx.CrossCoder(4, 3, 2, activation="relu")
    codes = SparseCodes(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([0, 2, 3]), 2, 3
    )
    w = losses.decoder_norms(cc)
    torch.testing.assert_close(w, cc.decoder_norm_weights())
    losses.l1_penalty(codes, w).backward()
    f_sum = torch.tensor([1.0, 3.0, 2.0]) / 2  # each latent's codes, summed, over the 2 rows
    unit = cc.W_dec.detach() / torch.linalg.vector_norm(cc.W_dec.detach(), dim=2, keepdim=True)
    torch.testing.assert_close(cc.W_dec.grad, f_sum[:, None, None] * unit)


def dense_aux_reference(cc, x, recon, dead, k_aux):
    """docs/math.md's formula with dense tensors over all latents."""
    B, F = x.shape[0], cc.dict_size
    f = torch.relu(x.reshape(B, -1) @ cc.W_enc.reshape(F, -1).T + cc.b_enc)
    s = torch.where(dead, f * cc.decoder_norm_weights(), torch.full((), -1.0))
    top = torch.topk(s, k_aux, dim=1).indices
    kept = torch.zeros_like(f).scatter(1, top, f.gather(1, top))
    xhat = kept @ cc.W_dec.reshape(F, -1)
    e = (x - recon).detach().reshape(B, -1)
    return (e - xhat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()


def test_aux_loss_matches_the_formula_and_reaches_only_dead_latents():
    g = rng(21)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    cc = cx.CrossCoder(6, 40, 2, k=3)
    with torch.no_grad():
        cc.b_enc.uniform_(0.0, 0.5)  # most pre-activations positive: every dead latent has candidates
    x = torch.randn(16, 2, 6, generator=g)
    recon = cc(x).recon
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=g)[:9]] = True
    loss = losses.aux_loss(cc, x, recon, dead)  # k_aux = min(d/2, n_dead) = 3
    expected = dense_aux_reference(cc, x, recon, dead, 3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    cc.zero_grad()
    loss.backward()
    for name, grad in (("W_enc", cc.W_enc.grad), ("W_dec", cc.W_dec.grad), ("b_enc", cc.b_enc.grad)):
        per_latent = grad.reshape(40, -1).abs().sum(1)
        assert bool((per_latent[~dead] == 0).all()), f"{name}: aux gradient leaked into live latents"
        assert bool((per_latent[dead] > 0).any()), f"{name}: the aux loss carries no gradient to dead latents"
    assert cc.b_dec.grad is None or not bool(cc.b_dec.grad.any())  # decoded without the bias


def test_aux_loss_is_zero_without_dead_latents():
    cc = cx.CrossCoder(4, 10, 2, k=2)
    x = torch.randn(5, 2, 4)
    assert float(losses.aux_loss(cc, x, cc(x).recon, torch.zeros(10, dtype=torch.bool))) == 0.0


def test_dead_counters_grow_by_batch_and_reset_on_firing():
    counters = torch.tensor([5, 5, 5, 5])
    codes = SparseCodes(
        torch.tensor([1.0, 0.0]), torch.tensor([1, 3], dtype=torch.int32), torch.tensor([0, 1, 2]), 2, 4
    )
    losses.update_dead_counters(counters, codes)
    assert counters.tolist() == [7, 0, 7, 7]  # latent 3 was kept with value 0: it did not fire


def test_geometric_median_minimises_summed_distances():
    g = rng(22)
    points = torch.randn(200, 5, generator=g)
    points[:20] += 50.0  # outliers pull the mean, not the median
    med = losses.geometric_median(points)
    cost = lambda y: torch.linalg.vector_norm(points - y, dim=1).sum()
    assert cost(med) < cost(points.mean(0))
    for _ in range(20):
        assert cost(med) <= cost(med + 0.01 * torch.randn(5, generator=g)) + 1e-4
