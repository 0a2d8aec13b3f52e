"""cx.train: exact resume, the stop on a non-finite loss, logs and checkpoints, and recovery of a planted
dictionary (the check a researcher runs before trusting a diffing method)."""

import json
import os

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext import truth
from crossdiff_ext.diffing import analysis
from crossdiff_ext.training import losses


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return cx.CrossCoder(8, 32, 2, k=2, threshold_start_step=2, **kwargs)


def config(tmp, **kwargs):
    base = dict(
        steps=12,
        batch_size=16,
        lr=3e-3,
        warmup_steps=3,
        decay_start=0.5,
        dead_tokens=48,
        checkpoint_every=4,
        checkpoint_dir=str(tmp),
        log_every=2,
        progress=False,
        seed=3,
    )
    base.update(kwargs)
    return cx.TrainConfig(**base)


def test_resume_continues_exactly(tmp_path):
    data = torch.randn(200, 2, 8, generator=rng(31))
    straight = tiny()
    cx.train(straight, data, config(tmp_path / "a"))
    first = tiny()
    cx.train(first, data, config(tmp_path / "b"), until=6)  # interrupted after step 6 (a checkpoint is written)
    resumed = tiny(seed=123)  # fresh weights: everything must come from the checkpoint
    result = cx.train(resumed, data, config(tmp_path / "b"), resume=True)
    assert result.steps == 12
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert float(straight.threshold) > 0  # the threshold was tracked (from step 2 on) and restored
    logs = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in logs] == [2, 4, 6, 8, 10, 12]
    assert {
        "reconstruction",
        "aux",
        "fve",
        "fve_per_model",
        "l0",
        "dead_fraction",
        "threshold",
        "lr",
        "delta_norm_bands",
    } <= set(logs[-1])
    assert sorted(os.listdir(tmp_path / "b")) == ["log.jsonl", "step-00000008", "step-00000012"]  # keep 2
    with pytest.raises(FileExistsError, match="already holds checkpoints"):  # never mix two runs' checkpoints
        cx.train(tiny(), data, config(tmp_path / "b"))


def test_aux_loss_turns_on_for_dead_latents(tmp_path):
    # dead_tokens = one batch: a latent that did not fire in the last batch is dead for the next step.
    data = torch.randn(200, 2, 8, generator=rng(32))
    cc = tiny()
    cx.train(
        cc,
        data,
        config(tmp_path, checkpoint_dir=None, log_every=1, dead_tokens=16, log_path=str(tmp_path / "log.jsonl")),
    )
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert any(r["dead_fraction"] > 0 for r in records)
    assert any(r["aux"] > 0 for r in records)
    # the aux loss of a step uses the dead set left by the previous step
    assert all((now["aux"] > 0) == (before["dead_fraction"] > 0) for before, now in zip(records, records[1:]))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    g = rng(33)
    good = [torch.randn(16, 2, 8, generator=g) for _ in range(3)]
    bad = torch.randn(16, 2, 8, generator=g)
    bad[3, 1, 2] = float("nan")
    cc = tiny()
    with pytest.raises(FloatingPointError, match="non-finite loss at step 4"):
        cx.train(cc, good + [bad], config(tmp_path, checkpoint_every=2))
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "step-00000002"]  # no half-written directory
    weights = cx.CrossCoder.from_pretrained(tmp_path / "step-00000002")
    assert all(bool(torch.isfinite(p).all()) for p in weights.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in cc.parameters())  # the failing step changed nothing


def test_bad_configuration_is_named():
    cc = tiny()
    data = torch.randn(64, 2, 8)
    for kwargs, match in (
        (dict(steps=0), "steps"),
        (dict(lr=-1.0), "lr"),
        (dict(reconstruction="l1"), "reconstruction"),
        (dict(decay_start=1.5), "decay_start"),
        (dict(batch_size=100), "fewer than one batch"),
    ):
        with pytest.raises(ValueError, match=match):
            cx.train(cc, data, cx.TrainConfig(progress=False, **{"batch_size": 16, **kwargs}))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        cx.train(cc, data, cx.TrainConfig(batch_size=16, progress=False, checkpoint_dir="/nonexistent"), resume=True)
    with pytest.raises(ValueError, match="k_aux"):
        cx.train(cc, data, cx.TrainConfig(batch_size=16, progress=False, k_aux=0))
    with pytest.raises(ValueError, match="data must be"):
        cx.train(cc, 3.0, cx.TrainConfig(batch_size=16, progress=False))


def test_geometric_median_initialises_the_decoder_bias():
    data = torch.randn(64, 2, 8, generator=rng(34)) + 5.0
    cc = tiny()
    cx.train(cc, data, cx.TrainConfig(steps=1, batch_size=64, lr=1e-12, progress=False, grad_clip=None, warmup_steps=0))
    expected = torch.stack([losses.geometric_median(data[:, m]) for m in range(2)])
    # The trainer sees the rows shuffled: the same median up to the summation order of Weiszfeld's sums.
    torch.testing.assert_close(cc.b_dec.detach(), expected, rtol=1e-5, atol=1e-5)


def test_batch_topk_recovers_a_planted_dictionary():
    # 34 concepts in 64 dimensions, about 3 active per token; k = 3 matches that sparsity. Measured over 6 seeds
    # (3000 steps): every concept recovered at cosine > 0.99 and classified into its Delta_norm band.
    seed = int(torch.randint(0, 2**31, (1,), generator=rng(35)))
    planted = truth.planted_dictionary(
        n_tokens=30000, d_model=64, n_shared=16, n_chat_only=6, n_base_only=6, n_weak_in_base=6, seed=seed
    )
    torch.manual_seed(seed)
    cc = cx.CrossCoder(64, 96, 2, k=3, threshold_start_step=100)
    cx.train(
        cc,
        planted.x,
        cx.TrainConfig(
            steps=3000,
            batch_size=256,
            lr=1e-3,
            warmup_steps=100,
            decay_start=0.8,
            dead_tokens=12800,
            progress=False,
            log_every=1000,
        ),
    )
    latent, cosine = truth.match_by_decoder_cosine(cc.W_dec, planted.directions)
    assert float((cosine > 0.9).float().mean()) >= 0.97, cosine
    dn = analysis.delta_norm(cc)[latent]
    found = lambda kind: [float(dn[i]) for i, k in enumerate(planted.kinds) if k == kind and cosine[i] > 0.9]
    assert all(v > 0.9 for v in found("chat_only")), found("chat_only")
    assert all(v < 0.1 for v in found("base_only")), found("base_only")
    assert all(abs(v - 0.5) < 0.1 for v in found("shared")), found("shared")
    assert all(0.6 < v < 0.9 for v in found("weak_in_base")), found("weak_in_base")


def test_dead_latents_are_counted_with_the_current_batch(monkeypatch):
    """The paper's order: the counters take in this batch before the aux loss, so every latent the batch selected
    is alive for it, and a latent becomes dead in the step where its counter reaches dead_tokens."""
    seen = []
    original = losses.aux_loss

    def recording(cc, x, recon, dead, k_aux=None):
        with torch.no_grad():  # the same selection the step made (no threshold tracking before step 100)
            out = cc(x, normalized=True)
        seen.append((dead.clone(), losses.fired_latents(out.codes)))
        return original(cc, x, recon, dead, k_aux)

    monkeypatch.setattr(losses, "aux_loss", recording)
    data = torch.randn(160, 2, 8, generator=rng(36))
    # dead_tokens = one batch: a latent is dead in any step it was not selected in.
    torch.manual_seed(0)
    cc = cx.CrossCoder(8, 32, 2, k=2, threshold_start_step=100)
    cx.train(cc, data, cx.TrainConfig(steps=4, batch_size=16, dead_tokens=16, progress=False, seed=3))
    assert len(seen) == 4
    for step, (dead, fired) in enumerate(seen, 1):
        assert not (dead & fired).any(), f"step {step}: a latent selected in this batch was counted dead"
        assert torch.equal(dead, ~fired), f"step {step}: dead must be exactly the latents this batch left out"


def test_a_latent_selected_in_the_batch_gets_no_aux_gradient():
    g = rng(37)
    cc = tiny()
    x = torch.randn(16, 2, 8, generator=g)
    out = cc(x)
    counters = torch.full((cc.dict_size,), 10**6, dtype=torch.int64)  # every latent at the dead limit before
    dead = losses.update_dead_counters(counters, out.codes) >= 10**6
    fired = losses.fired_latents(out.codes)
    assert fired.any() and dead.any() and torch.equal(dead, ~fired)
    losses.aux_loss(cc, x, out.recon.detach(), dead).backward()
    assert float(cc.W_enc.grad[fired].abs().max()) == 0.0 and float(cc.W_dec.grad[fired].abs().max()) == 0.0
    assert float(cc.W_enc.grad[dead].abs().sum()) > 0 and float(cc.W_dec.grad[dead].abs().sum()) > 0


def test_loaded_crosscoder_is_in_eval_mode_and_training_puts_it_back(tmp_path):
    cc = tiny()
    cc.save_pretrained(tmp_path)
    loaded = cx.CrossCoder.from_pretrained(tmp_path)
    assert not loaded.training
    cx.train(loaded, torch.randn(64, 2, 8, generator=rng(38)), cx.TrainConfig(steps=2, batch_size=16, progress=False))
    assert loaded.training and int(loaded.num_batches_tracked) == 2  # the steps ran the batch top-k
