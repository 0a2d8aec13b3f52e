"""truth/: the two matching rules and recovery scoring against values worked out by hand on small rows. Learned
rows are scaled by fresh positive factors (per latent, or per model row where the rule compares models apart):
every rule reads directions only, so the hand values hold at any scale."""

import math

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext import truth

E = torch.eye(4)


def scaled(W, salt, per_model=False):
    shape = (W.shape[0], W.shape[1] if per_model else 1, 1)
    return W * (0.5 + 4 * torch.rand(shape, generator=rng(salt)))


def test_match_by_decoder_cosine_compares_concatenated_rows():
    # Concepts (base | chat), concatenated: c0 = (e0 | e0) / sqrt 2, c1 = (0 | e1).
    # Latents, concatenated and normalised:
    #   l0 = (0 | e1)            cos c0 = 0,                    cos c1 = 1
    #   l1 = (e0 | e1) / sqrt 2  cos c0 = 1 / 2,                cos c1 = 1 / sqrt 2
    #   l2 = (e0 | e0 + e1) / sqrt 3  cos c0 = 2 / sqrt 6 = 0.816, cos c1 = 1 / sqrt 3 = 0.577
    # Best per concept: c0 -> l2 (0.816 beats 0.5), c1 -> l0 (1).
    directions = torch.stack([torch.stack([E[0], E[0]]), torch.stack([0 * E[1], E[1]])])
    W_dec = torch.stack([torch.stack([0 * E[0], E[1]]), torch.stack([E[0], E[1]]), torch.stack([E[0], E[0] + E[1]])])
    latent, cosine = truth.match_by_decoder_cosine(scaled(W_dec, 911), directions)
    assert latent.tolist() == [2, 0]
    torch.testing.assert_close(cosine, torch.tensor([2 / math.sqrt(6), 1.0]), atol=1e-6, rtol=0)


def test_assign_latents_to_concepts_compares_the_models_where_both_live():
    # Concepts: c0 = (e0 | e0) lives in both models, c1 = (0 | e1) in the chat model only.
    # A latent lives in a model where its row has >= 0.2 of its largest row's norm.
    #   l0 = (0.1 e1 | e1): lives in chat only; c1 there: cos 1 -> c1. c0 there: cos 0 -> no.
    #   l1 = (0.3 e1 | e1): lives in both; c1 shares chat only: cos 1 -> c1 (its base row is not compared).
    #   l2 = (e0 | 0.8 e0 + 0.6 e1): c0: cos 1 (base), 0.8 (chat) < 0.9 -> no; c1: chat cos 0.6 -> no: -1.
    #   l3 = (e0 | 0.95 e0 + 0.312 e1): c0: cos 1 and 0.95 -> c0 (mean 0.975).
    directions = torch.stack([torch.stack([E[0], E[0]]), torch.stack([0 * E[1], E[1]])])
    s = math.sqrt(1 - 0.95**2)
    W_dec = torch.stack(
        [
            torch.stack([0.1 * E[1], E[1]]),
            torch.stack([0.3 * E[1], E[1]]),
            torch.stack([E[0], 0.8 * E[0] + 0.6 * E[1]]),
            torch.stack([E[0], 0.95 * E[0] + s * E[1]]),
        ]
    )
    # Scaling a latent as a whole keeps where it lives; the rule is then scale-free.
    W = scaled(W_dec, 912)
    assert truth.assign_latents_to_concepts(W, directions).tolist() == [1, 1, -1, 0]
    # At min_cosine 0.75, l2's chat cosine 0.8 passes: c0 (mean 0.9; c1's 0.6 still fails).
    assert truth.assign_latents_to_concepts(W, directions, min_cosine=0.75).tolist() == [1, 1, 0, 0]
    # At lives = 0.05, l0 lives in both models too; c1 still shares only the chat model with it.
    assert truth.assign_latents_to_concepts(W, directions, lives=0.05).tolist() == [1, 1, -1, 0]


def planted_by_hand():
    # Concepts (base | chat) in d = 4: c0 shared (e0 | e0), c1 chat_only (0 | e1), c2 base_only (e2 | 0),
    # c3 weak_in_base (0.3 e3 | e3).
    directions = torch.stack(
        [
            torch.stack([E[0], E[0]]),
            torch.stack([0 * E[1], E[1]]),
            torch.stack([E[2], 0 * E[2]]),
            torch.stack([0.3 * E[3], E[3]]),
        ]
    )
    kinds = ["shared", "chat_only", "base_only", "weak_in_base"]
    return truth.PlantedDictionary(
        x=torch.zeros(1, 2, 4), directions=directions, kinds=kinds, activations=torch.zeros(1, 4)
    )


# One latent per concept (all other cosines are 0: the concepts use disjoint axes):
#   l0 = (e0 | e0)              c0: cos 1                         Delta_norm 0.5                    shared: in band
#   l1 = (0 | 0.8 e1 + 0.6 e2)  c1: cos 0.8 < 0.9: not recovered  Delta_norm 1 (chat_only band)     not in band
#   l2 = (e2 | 0.3 e2)          c2: cos 1 / sqrt 1.09 = 0.958     Delta_norm 0.5 * (0.3 - 1 + 1) = 0.15: other,
#                                                                 not base_only: recovered, out of band
#   l3 = (0.3 e3 | e3)          c3: cos 1                         Delta_norm 0.5 * (1 - 0.3 + 1) = 0.85: other, in band
LATENTS = torch.stack(
    [
        torch.stack([E[0], E[0]]),
        torch.stack([0 * E[1], 0.8 * E[1] + 0.6 * E[2]]),
        torch.stack([E[2], 0.3 * E[2]]),
        torch.stack([0.3 * E[3], E[3]]),
    ]
)


def test_score_recovery_recovers_misses_and_places_out_of_band():
    planted = planted_by_hand()
    W_dec = scaled(LATENTS, 913)
    score = truth.score_recovery(W_dec, planted)
    assert score.latent.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(score.cosine, torch.tensor([1.0, 0.8, 1 / math.sqrt(1.09), 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(score.delta_norm, torch.tensor([0.5, 1.0, 0.15, 0.85]), atol=1e-6, rtol=0)
    assert score.band == ["shared", "chat_only", "other", "other"]
    assert score.recovered.tolist() == [True, False, True, True]
    assert score.in_band.tolist() == [True, False, False, True]
    assert score.n_in_band == 2 and not score.all_in_band
    # A lower threshold recovers c1, whose latent already sits in the chat-only band.
    assert truth.score_recovery(W_dec, planted, threshold=0.75).in_band.tolist() == [True, True, False, True]
    # Read from a crosscoder, as from its rows.
    cc = cx.CrossCoder(4, 4, 2, k=1)
    with torch.no_grad():
        cc.W_dec.copy_(W_dec)
    assert cx.score_recovery(cc, planted).in_band.tolist() == [True, False, False, True]


def test_recovery_rows_and_their_pooling_by_kind():
    planted = planted_by_hand()
    rows = truth.score_recovery(scaled(LATENTS, 914), planted).rows()
    assert [(r["concept"], r["kind"], r["latent"], r["band"], r["recovered"], r["in_band"]) for r in rows] == [
        (0, "shared", 0, "shared", True, True),
        (1, "chat_only", 1, "chat_only", False, False),
        (2, "base_only", 2, "other", True, False),
        (3, "weak_in_base", 3, "other", True, True),
    ]
    # Two copies pooled: fractions are per kind, the Delta_norm range covers the recovered concepts only.
    pooled = truth.recovery_by_kind(rows + rows)
    assert list(pooled) == ["shared", "chat_only", "base_only", "weak_in_base"]
    assert pooled["chat_only"] == dict(concepts=2, recovery=0.0, in_band=0.0, delta_norm_min=None, delta_norm_max=None)
    assert pooled["base_only"]["recovery"] == 1.0 and pooled["base_only"]["in_band"] == 0.0
    assert pooled["base_only"]["delta_norm_min"] == pytest.approx(0.15) == pooled["base_only"]["delta_norm_max"]


def test_score_recovery_refuses_rows_of_another_shape():
    with pytest.raises(cx.InputError, match="must share"):
        truth.score_recovery(torch.ones(3, 2, 5), planted_by_hand())
