"""The decoder-norm measures every diffing claim rests on (layer/norms.py, re-exported as cx.delta_norm, ...),
against values worked out by hand on 2-dimensional rows. Each latent's rows are scaled by a fresh positive factor:
both measures are ratios, so the hand values hold at any scale."""

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext.layer.norms import BANDS, delta_norm_band

# Rows [F=5, M=2, d=2] (base, chat) and the hand values:
#   latent 0: (3, 4) | (0, 0)   norms 5, 0  Delta_norm 0.5 * ((0 - 5) / 5 + 1) = 0      cosine 0 (a zero row)
#   latent 1: (1, 0) | (2, 0)   norms 1, 2  Delta_norm 0.5 * ((2 - 1) / 2 + 1) = 0.75   cosine 1
#   latent 2: (1, 1) | (-1, 1)  norms equal Delta_norm 0.5                              cosine (-1 + 1) / 2 = 0
#   latent 3: (0, 0) | (0, 0)   both zero:  Delta_norm 0.5 (favours neither)            cosine 0
#   latent 4: (0, 2) | (3, 4)   norms 2, 5  Delta_norm 0.5 * ((5 - 2) / 5 + 1) = 0.8    cosine 8 / (2 * 5) = 0.8
ROWS = torch.tensor(
    [
        [[3.0, 4.0], [0.0, 0.0]],
        [[1.0, 0.0], [2.0, 0.0]],
        [[1.0, 1.0], [-1.0, 1.0]],
        [[0.0, 0.0], [0.0, 0.0]],
        [[0.0, 2.0], [3.0, 4.0]],
    ]
)
DELTA_NORM = [0.0, 0.75, 0.5, 0.5, 0.8]
COSINE = [0.0, 1.0, 0.0, 0.0, 0.8]


def scaled_rows(salt):
    return ROWS * (0.1 + 10 * torch.rand(ROWS.shape[0], 1, 1, generator=rng(salt)))


def crosscoder_with(W_enc, W_dec):
    cc = cx.CrossCoder(2, W_dec.shape[0], W_dec.shape[1], k=1)
    with torch.no_grad():
        cc.W_enc.copy_(W_enc)
        cc.W_dec.copy_(W_dec)
    return cc


def test_delta_norm_and_decoder_cosine_match_the_hand_values():
    W = scaled_rows(901)
    torch.testing.assert_close(cx.delta_norm(W), torch.tensor(DELTA_NORM), atol=1e-6, rtol=0)
    torch.testing.assert_close(cx.decoder_cosine(W), torch.tensor(COSINE), atol=1e-6, rtol=0)
    # Swapping which slot is the chat model mirrors Delta_norm around 0.5 and leaves the cosine.
    torch.testing.assert_close(cx.delta_norm(W, base=1, chat=0), 1 - torch.tensor(DELTA_NORM), atol=1e-6, rtol=0)
    torch.testing.assert_close(cx.decoder_cosine(W, base=1, chat=0), torch.tensor(COSINE), atol=1e-6, rtol=0)


def test_the_measures_read_the_named_slots_of_more_than_two_models():
    # A third slot in between (rows 7 * e0, far from both) must not enter: base = 0, chat = 2.
    W = scaled_rows(902)
    three = torch.stack([W[:, 0], torch.tensor([7.0, 0.0]).expand(W.shape[0], 2), W[:, 1]], dim=1)
    torch.testing.assert_close(cx.delta_norm(three, 0, 2), torch.tensor(DELTA_NORM), atol=1e-6, rtol=0)
    torch.testing.assert_close(cx.decoder_cosine(three, 0, 2), torch.tensor(COSINE), atol=1e-6, rtol=0)


def test_encoder_measures_read_the_encoder_rows():
    # The decoder gets the rows with the models swapped, so a measure that read W_dec would give 1 - Delta_norm.
    W = scaled_rows(903)
    cc = crosscoder_with(W_enc=W, W_dec=W.flip(1))
    torch.testing.assert_close(cx.encoder_delta_norm(cc), torch.tensor(DELTA_NORM), atol=1e-6, rtol=0)
    torch.testing.assert_close(cx.encoder_cosine(cc), torch.tensor(COSINE), atol=1e-6, rtol=0)
    torch.testing.assert_close(cx.delta_norm(cc), 1 - torch.tensor(DELTA_NORM), atol=1e-6, rtol=0)
    torch.testing.assert_close(cx.decoder_cosine(cc), torch.tensor(COSINE), atol=1e-6, rtol=0)


def test_paper_bands_of_the_hand_values():
    # 0 < 0.1: base_only; 0.75: other; 0.5: shared (twice); 0.8: other.
    assert cx.classify_latents(scaled_rows(904)) == ["base_only", "other", "shared", "shared", "other"]
    values = torch.tensor([0.45, 0.55, 0.09, 0.91, 0.3])
    assert [BANDS[i] for i in delta_norm_band(values).tolist()] == [
        "shared",
        "shared",
        "base_only",
        "chat_only",
        "other",
    ]


def test_rows_that_are_not_paired_are_refused():
    with pytest.raises(ValueError, match=r"\[F, M, d\] with M >= 2"):
        cx.delta_norm(torch.ones(3, 1, 2))
