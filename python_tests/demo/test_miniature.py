"""The planted kinds built for the L1 artifacts, and the paper's finding reproduced in miniature: the L1
crosscoder makes Complete Shrinkage and Latent Decoupling artifacts, Latent Scaling flags them and keeps the true
chat-only concepts, BatchTopK makes far fewer."""

import json

import pytest
import torch

import crossdiff_ext as cx
from crossdiff_ext import cli, truth
from crossdiff_ext.demo import miniature as mini


def test_artifact_kinds_carry_their_ground_truth():
    p = cx.planted_dictionary(
        n_tokens=4000, d_model=24, n_shared=4, n_chat_only=2, n_base_only=2, n_weak_in_base=2,
        n_frequent_weak=3, n_jittered=3, frequent_scale=0.4, jitter=0.5, orthogonal=True, noise=0.0, seed=1,
    )  # fmt: skip
    kinds = p.kinds
    assert kinds[-6:] == ["frequent_weak"] * 3 + ["jittered"] * 3 and p.kind_ids.max() == len(truth.KINDS) - 1
    u = p.directions[:, 1][[i for i, k in enumerate(kinds) if k != "base_only"]]
    torch.testing.assert_close(u @ u.T, torch.eye(u.shape[0]), atol=1e-5, rtol=0)  # orthonormal
    fw = [i for i, k in enumerate(kinds) if k == "frequent_weak"]
    jt = [i for i, k in enumerate(kinds) if k == "jittered"]
    norms = torch.linalg.vector_norm(p.directions, dim=2)
    assert torch.allclose(norms[fw, 0], torch.tensor(0.4)) and torch.allclose(norms[jt, 0], torch.tensor(1.0))
    # x is exactly the planted sum, the base model with its own (jittered) magnitudes.
    torch.testing.assert_close(p.x[:, 1], p.activations @ p.directions[:, 1])
    torch.testing.assert_close(p.x[:, 0], p.base_activations @ p.directions[:, 0])
    a, b = p.activations[:, jt], p.base_activations[:, jt]
    on = a > 0
    assert torch.equal(on, b > 0) and 0.5 - 1e-6 <= (b[on] / a[on]).min() and (b[on] / a[on]).max() <= 1.5 + 1e-6
    assert torch.equal(p.base_activations[:, : jt[0]], p.activations[:, : jt[0]])
    fires = (p.activations[:, fw] > 0).float().mean(0)
    assert ((fires - 0.25).abs() < 0.03).all()
    assert 0.4 - 1e-6 <= p.activations[:, fw][p.activations[:, fw] > 0].min()
    assert p.activations[:, fw].max() <= 0.6 + 1e-6
    # Without the new kinds the generator draws what it always drew.
    plain = cx.planted_dictionary(n_tokens=500, d_model=16, seed=2)
    assert plain.base_activations is None and set(plain.kinds) == set(truth.KINDS[:4])
    with pytest.raises(ValueError, match="orthogonal directions need at most d_model"):
        cx.planted_dictionary(d_model=8, orthogonal=True)
    with pytest.raises(ValueError, match="jitter must be in"):
        cx.planted_dictionary(n_jittered=2, jitter=1.5)
    with pytest.raises(ValueError, match="frequent_rate must be in"):
        cx.planted_dictionary(n_frequent_weak=2, frequent_rate=0.0)


def test_matching_compares_the_models_where_latent_and_concept_live():
    e = torch.eye(4)
    directions = torch.stack(
        [torch.stack([0.4 * e[0], e[0]]), torch.stack([e[1], e[1]]), torch.stack([0 * e[2], e[2]])]
    )
    W_dec = torch.stack(
        [
            torch.stack([0.01 * e[3], e[0]]),  # chat-only by Delta_norm: compared in the chat model only
            torch.stack([e[1], e[1]]),  # shared: both models
            torch.stack([e[3], e[1]]),  # lives in both, base row points elsewhere: no match
            torch.stack([e[2], 0.01 * e[3]]),  # base-only latent, concept 2 lives in the chat only
        ]
    )
    assert truth.assign_latents_to_concepts(W_dec, directions).tolist() == [0, 1, -1, -1]


# Measured: 18 s on 2 CPU cores, 59 s while other jobs loaded them (both crosscoders, 1500 steps each at lr 3e-3,
# 12,000 tokens, d = 32, F = 64). With the L1 penalty's decoder norms detached it fails: 0 Complete Shrinkage, 1
# Latent Decoupling. Seeds 1 and 2 (not tested) measured 6 and 3, 3 and 4 artifacts in L1, none in BatchTopK.
SMALL = dict(
    n_tokens=12000, d_model=32, n_shared=8, n_chat_only=4, n_base_only=2, n_weak_in_base=2,
    n_frequent_weak=6, n_jittered=6,
)  # fmt: skip


def test_miniature_reproduces_the_finding(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mini, "PLANTED", dict(mini.PLANTED, **SMALL))
    monkeypatch.setattr(mini, "DICT_SIZE", 64)
    monkeypatch.setattr(mini, "K", 5)
    assert cli.main(["miniature", "--out", str(tmp_path), "--steps", "1500", "--lr", "3e-3", "--quiet"]) == 0
    assert "BatchTopK: FVE" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    l1, topk = summary["results"]
    assert [l1["model"], topk["model"]] == ["L1", "BatchTopK"]
    for r in (l1, topk):
        assert set(r["false_chat_only_kinds"]) >= {"frequent_weak", "jittered"}
        assert r["chat_only_by_delta_norm"] == len(r["chat_only_latents"])
    # L1 makes artifacts of both mechanisms, Latent Scaling with the paper's thresholds flags them all, and it
    # keeps every planted chat-only concept; BatchTopK makes at most a third as many.
    assert l1["artifacts"]["complete_shrinkage"] >= 3 and l1["artifacts"]["latent_decoupling"] >= 2
    assert l1["artifacts_flagged"] >= 0.9
    assert l1["true_chat_only_kept"] >= 0.9 and topk["true_chat_only_kept"] >= 0.9
    assert 3 * sum(topk["artifacts"].values()) <= sum(l1["artifacts"].values())
    # Latent Scaling recovers the planted base/chat ratio of the weak-in-base concepts BatchTopK found.
    assert topk["weak_in_base_nu_error"] and all(abs(v - 0.3) < 0.05 for v in topk["weak_in_base_nu_error"])
    # The Complete Shrinkage artifacts keep nu_error near the planted base/chat ratio (0.4).
    shrunk = [d for d in l1["chat_only_latents"] if d["kind"] == "frequent_weak"]
    assert all(0.25 < d["nu_error"] < 0.5 for d in shrunk)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "miniature.png").stat().st_size > 10_000
